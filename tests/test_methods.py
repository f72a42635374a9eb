"""Table-driven test matrix over every registered method (peft's test_custom_models style).

Each method has one row in ``tests/method_cases.py``: the small options used on the tiny model,
whether it promises an unchanged output at init, and its trainable-parameter formula. A registered
method without a row fails ``test_every_method_has_a_row``.
"""
import copy
import json

import pytest
import torch

import lora_zoo as lz
from conftest import tiny_clip
from method_cases import CASES, CLASSES, LABELS, apply_case, method_of as case_method, missing_rows


def test_every_method_has_a_row():
    assert not missing_rows(), f"add a row to tests/method_cases.py for {missing_rows()}"
    for case in CASES:
        assert lz.get_method(case_method(case)).kind == CASES[case]["kind"], case


def adapted(case_id, images, texts, seed=0):
    """(split model before the method, adapted model, its optimizer) for one case, built as a run builds it: the
    method (``method_cases.apply_case``), then the method's optimizer builder (which may freeze tensors: LoRA-FA's
    A)."""
    base = tiny_clip(seed=seed)
    lz.split_attention(base)
    model = copy.deepcopy(base)
    apply_case(model, case_id, images, texts)
    optimizer = lz.build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999))
    return base, model, optimizer


def logits(model, images):
    """The adapted model's classifier over ``CLASSES`` (``kinds.scorer_of``: CLIP's, or a learner's)."""
    scorer = lz.scorer_of(model)
    return scorer.logits(model, scorer.inputs(model, images), scorer.class_state(model, CLASSES))


def outputs(model, images, texts):
    """Both towers' features and the classifier's logits, these / 100 (the logit scale): on the features' scale,
    so one tolerance fits all three."""
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts), logits(model, images) / 100


@torch.no_grad()
def perturb(model, seed=3):
    """Move every trainable tensor away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    for p in lz.trainable_parameters(model):
        p.add_(0.05 * torch.randn(p.shape, generator=g))


ALL = sorted(CASES)


@pytest.mark.parametrize("case_id", ALL)
def test_output_unchanged_at_init(case_id, images, texts):
    if not CASES[case_id]["preserves"]:
        pytest.skip("this method does not promise an unchanged output at init")
    base, model, _ = adapted(case_id, images, texts)
    for before, after in zip(outputs(base, images, texts), outputs(model, images, texts)):
        torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case_id", ALL)
def test_merge_unmerge(case_id, images, texts):
    _, model, _ = adapted(case_id, images, texts)
    perturb(model)
    if not CASES[case_id]["mergeable"]:
        if CASES[case_id]["kind"] == "weights":
            with pytest.raises(RuntimeError, match="not mergeable"):
                lz.merge_adapters(model)
        else:  # no weight update: nothing is merged, and the model computes what it computed
            expected = outputs(model, images, texts)
            assert lz.kind_of(model).merge(model) is False and not lz.kind_of(model).merges
            for a, b in zip(outputs(model, images, texts), expected):
                assert torch.equal(a, b)
        return
    unmerged = outputs(model, images, texts)
    weights = {n: a.base_layer.weight.clone() for n, a in lz.adapter_modules(model).items()}
    lz.merge_adapters(model)
    merged_weights = {n: a.base_layer.weight.clone() for n, a in lz.adapter_modules(model).items()}
    assert any(not torch.equal(weights[n], merged_weights[n]) for n in weights)
    for a, b in zip(outputs(model, images, texts), unmerged):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    lz.merge_adapters(model)  # repeated merge is idempotent
    for n, a in lz.adapter_modules(model).items():
        assert torch.equal(a.base_layer.weight, merged_weights[n])
    lz.unmerge_adapters(model)
    for n, a in lz.adapter_modules(model).items():
        torch.testing.assert_close(a.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    for a, b in zip(outputs(model, images, texts), unmerged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case_id", ALL)
def test_only_adapter_tensors_train(case_id, images, texts):
    _, model, optimizer = adapted(case_id, images, texts)
    named = lz.named_trainable_parameters(model)
    assert named and all(lz.is_adapter_tensor(n) for n in named)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in named.values()}
    frozen = {n: p.clone() for n, p in model.named_parameters() if n not in named}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in named)
    before = {n: p.clone() for n, p in named.items()}
    model.train()
    for _ in range(2):  # two steps: zero-initialised factors make their partners' first grads zero
        optimizer.zero_grad()
        img, txt = model.encode_image(images), model.encode_text(texts)
        loss = (img @ txt.t()).pow(2).mean() + img.pow(2).mean()
        loss = loss + torch.nn.functional.cross_entropy(logits(model, images), LABELS[:len(images)])
        loss.backward()
        for n, p in model.named_parameters():
            if n not in named:
                assert p.grad is None, f"frozen {n} got a gradient"
        optimizer.step()
    later = CASES[case_id].get("later_stage", ())  # trained by a later stage of the method's hooks
    for n, p in model.named_parameters():
        if n in named and any(n.endswith(name) for name in later):
            assert torch.equal(p, before[n]), f"{n} of a later stage changed"
        elif n in named:
            assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


@pytest.mark.parametrize("case_id", ALL)
def test_trainable_count_formula(case_id, images, texts):
    _, model, _ = adapted(case_id, images, texts)
    if CASES[case_id]["kind"] == "weights":
        assert len(lz.adapter_modules(model)) == 2 * 2 * 3  # 2 towers × 2 blocks × q/k/v
    assert lz.count_trainable(model) == CASES[case_id]["count"](model)


def test_aira_allocation_respects_budget(images, texts):
    _, model, _ = adapted("aira", images, texts)
    ranks = lz.layer_ranks(model)
    adapters = lz.adapter_modules(model)
    budget = sum(4 * (a.in_features + a.out_features) for a in adapters.values())
    assert lz.count_trainable(model) == sum(r * (adapters[n].in_features + adapters[n].out_features)
                                            for n, r in ranks.items())
    assert lz.count_trainable(model) <= budget
    assert all(1 <= r <= 16 for r in ranks.values())
    assert len(set(ranks.values())) > 1  # the allocation is not uniform on this model


@pytest.mark.parametrize("case_id", ALL)
def test_save_load_round_trip(case_id, images, texts, tmp_path):
    _, model, _ = adapted(case_id, images, texts)
    perturb(model)
    expected = outputs(model, images, texts)
    lz.save_adapters(model, tmp_path / "adapters.safetensors")
    assert (tmp_path / "adapters.json").is_file()
    fresh = tiny_clip()  # plain model: adapters are injected from the checkpoint
    lz.load_adapters(fresh, tmp_path / "adapters.safetensors")
    for a, b in zip(outputs(fresh, images, texts), expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert lz.layer_ranks(fresh) == lz.layer_ranks(model)
    # into an already adapted model with the same setup (and merged: it stays merged)
    _, same, _ = adapted(case_id, images, texts)
    mergeable = CASES[case_id].get("mergeable", True)
    if mergeable:
        lz.merge_adapters(same)
    lz.load_adapters(same, tmp_path / "adapters.safetensors")
    assert all(a.merged == mergeable for a in lz.adapter_modules(same).values())
    for a, b in zip(outputs(same, images, texts), expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_format_1_checkpoints_load_unless_their_layers_changed(images, texts, tmp_path):
    """A format-1 file (lora_zoo 0.1: no "layer" key) loads; VeRA's frozen pair and AIRA's act_scale batch have
    changed since, so theirs are refused with a one-line error naming the file."""
    paths = {}
    for case_id in ("lora", "vera", "aira_authors"):
        _, model, _ = adapted(case_id, images, texts)
        perturb(model)
        paths[case_id] = lz.save_adapters(model, tmp_path / f"{case_id}.safetensors")
        config = paths[case_id].with_suffix(".json")
        meta = json.loads(config.read_text())
        del meta["layer"], meta["record_sha256"]  # lora_zoo 0.1 recorded neither
        config.write_text(json.dumps({**meta, "format_version": 1}))
        if case_id == "lora":
            expected = outputs(model, images, texts)
    fresh = tiny_clip()
    assert lz.load_adapters(fresh, paths["lora"])["format_version"] == 2
    for a, b in zip(outputs(fresh, images, texts), expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for case_id, layer in (("vera", "vera"), ("aira_authors", "aira")):
        with pytest.raises(ValueError) as err:
            lz.load_adapters(tiny_clip(), paths[case_id])
        message = str(err.value)
        assert message.startswith(f"{tmp_path / case_id}.json is a format_version 1 {layer} checkpoint and cannot "
                                  "be loaded: ") and message.endswith("retrain it") and "\n" not in message


@pytest.mark.parametrize("change, message", [
    (dict(method="nora", options=dict(outer_rank=0.5, inner_rank=4)), "method"),
    (dict(method="lora", options=dict(rank=2, alpha=8)), "rank"),
    (dict(method="lora", options=dict(rank=4, alpha=8), targets=("q", "v")), "targets"),
])
def test_mismatched_load_fails_clearly(change, message, images, texts, tmp_path):
    _, model, _ = adapted("lora", images, texts)
    lz.save_adapters(model, tmp_path / "a.safetensors")
    other = tiny_clip()
    lz.apply_adapters(other, change["method"], targets=change.get("targets", ("q", "k", "v")), **change["options"])
    with pytest.raises(ValueError, match=message):
        lz.load_adapters(other, tmp_path / "a.safetensors")
