"""Adapters as peft LoRA adapters on transformers' CLIPModel (``lora_zoo.peft_export``, ``lora_zoo.hf_clip``).

The model is ``tiny-vit`` (conftest ``tiny_clip``): an open_clip ViT with the default
plain pre-norm blocks, ``nn.GELU``, class-token pooling and argmax text pooling, all of
which transformers' CLIP represents. Every registered method has a row in ``CASES``
(exported, or refused with the reason). Each exported case: inject on q/k/v/o/fc2 of
both towers (and fc1 in one case), train 3 steps on random data (every trainable tensor moves), export,
``to_hf_clip`` + ``PeftModel.from_pretrained``; the *unnormalised* image and text
embeddings (``encode_image`` / ``encode_text`` against ``get_image_features`` /
``get_text_features``) agree within 1e-4 in fp32, and so do peft's ``merge_and_unload()``
and our merged model (embeddings and every merged weight and bias).
"""
import copy
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import open_clip  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lora_zoo as lz  # noqa: E402
from conftest import tiny_clip  # noqa: E402
from lora_zoo.hf_clip import hf_clip_state_dict, to_hf_clip  # noqa: E402
from method_cases import CASES, CLASSES, LABELS, apply_case, cases_with, column, method_of, missing_rows  # noqa: E402
from lora_zoo.models import TINY_CONFIGS  # noqa: E402
from lora_zoo.peft_export import CONFIG_NAME, WEIGHTS_NAME, export_peft, hf_module_name  # noqa: E402

# fc1 of the text tower's first block is left out: open_clip's encode_text reads resblocks[0].mlp.c_fc.weight,
# which an adapter there hides (case lora_all_targets adapts fc1 in block 1 only)
TARGETS = ("q", "k", "v", "o", "fc2")
TOLERANCE = 1e-4
REPO = Path(__file__).resolve().parents[1]

EXPORTED = [c for c in cases_with("export") if "refused" not in CASES[c]["export"]]
REFUSED = [c for c in cases_with("export") if "refused" in CASES[c]["export"]]


def test_every_method_has_a_row():
    assert not missing_rows(), f"add a row to tests/method_cases.py for {missing_rows()}"
    assert {method_of(c) for c in cases_with("export")} == set(lz.list_methods())  # each export is tested


def objective(model, images, texts):
    """A random objective on both towers; for a method without a weight update (a learner, whose tensors the
    towers alone never reach), plus its classifier's cross-entropy."""
    loss = (model.encode_image(images) @ model.encode_text(texts).t()).pow(2).mean()
    if not lz.kind_of(model).merges:
        scorer = lz.scorer_of(model)
        logits = scorer.logits(model, scorer.inputs(model, images), scorer.class_state(model, CLASSES))
        loss = loss + torch.nn.functional.cross_entropy(logits, LABELS[:len(images)])
    return loss


def train_steps(model, images, texts, steps=3):
    """A few AdamW steps of the method's optimizer and schedule on a random objective (as test_architecture); a
    learner (no weight of the towers changes) on its own classifier's cross-entropy too."""
    optimizer = lz.build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999))
    hooks, scorer = lz.training_hooks(model, steps), lz.scorer_of(model)
    model.train()
    for step in range(steps):
        hooks.before_forward(step)
        loss = objective(model, images, texts) + hooks.regularizer()
        optimizer.zero_grad()
        loss.backward()
        hooks.after_backward(step)
        optimizer.step()
        hooks.after_step(step)
    hooks.finish()
    return model.eval()


def trained(case, images, texts):
    """(pretrained model, adapted model trained 3 steps) for one case."""
    base = tiny_clip()
    lz.split_attention(base)
    export = column(case, "export")
    model = copy.deepcopy(base)
    apply_case(model, case, images, texts, export["options"], export.get("targets", TARGETS), export.get("layers"))
    before = {n: p.detach().clone() for n, p in lz.named_trainable_parameters(model).items()}
    train_steps(model, images, texts)
    trainable = lz.named_trainable_parameters(model)  # after the optimizer builder froze what it freezes
    pruned = {f"{n}.lora_lambda" for n, a in lz.adapter_modules(model).items() if getattr(a, "rank", 1) == 0}
    still = sorted(n for n, p in trainable.items() if torch.equal(p, before[n]) and n not in pruned)
    assert trainable and not still, f"tensors that did not move: {still[:3]}"
    return base, model


@torch.no_grad()
def ours(model, images, texts):
    return model.encode_image(images), model.encode_text(texts)


@torch.no_grad()
def theirs(hf_model, images, texts):
    return (hf_model.get_image_features(pixel_values=images).pooler_output,
            hf_model.get_text_features(input_ids=texts).pooler_output)


def assert_same(got, expected):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("case", EXPORTED)
def test_export_reproduces_the_adapted_model_in_transformers(case, images, texts, tmp_path):
    base, model = trained(case, images, texts)
    expected, pretrained = ours(model, images, texts), ours(base, images, texts)
    assert all((a - b).abs().max() > 10 * TOLERANCE for a, b in zip(expected, pretrained))  # the adapters moved both
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    adapted = peft.PeftModel.from_pretrained(to_hf_clip(model), tmp_path)
    assert_same(theirs(adapted, images, texts), expected)
    with adapted.disable_adapter():  # to_hf_clip of the adapted model is the pretrained model
        assert_same(theirs(adapted, images, texts), pretrained)

    adapters = lz.adapter_modules(model)
    assert sorted(config["target_modules"]) == sorted(hf_module_name(n) for n in adapters)
    form = CASES[case]["export"]["form"]
    if form == "lokr":  # peft's own LoKr: the same r, alpha and factor tensors
        options = column(case, "export")["options"]
        assert config["peft_type"] == "LOKR" and (config["r"], config["alpha"]) == (options["rank"], options["alpha"])
        assert {config["r"]} == CASES[case]["export"]["ranks"] and not config["rank_pattern"]
    else:
        check_lora_config(case, config, adapters)
    lz.merge_adapters(model)
    merged = adapted.merge_and_unload()
    assert_same(theirs(merged, images, texts), ours(model, images, texts))
    merged_state = merged.state_dict()
    for name, adapter in adapters.items():
        module = hf_module_name(name)
        torch.testing.assert_close(merged_state[module + ".weight"], adapter.base_layer.weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged_state[module + ".bias"], adapter.base_layer.bias, atol=1e-6, rtol=0)


def check_lora_config(case, config, adapters):
    """A LoRA export's config: scaling 1 everywhere, the row's form (DoRA, bias) and ranks."""
    ranks = {m: config["rank_pattern"].get(m, config["r"]) for m in config["target_modules"]}
    assert all(config["alpha_pattern"].get(m, config["lora_alpha"]) == r for m, r in ranks.items())  # scaling 1
    assert not config["use_rslora"]
    form = CASES[case]["export"]["form"]
    assert config["use_dora"] == (form == "dora") and config["lora_bias"] == (form == "lora_bias")
    if CASES[case]["export"]["ranks"] is not None:
        assert set(ranks.values()) == CASES[case]["export"]["ranks"]
    else:  # AIRA's allocation, AdaLoRA's pruned ranks: per-layer ranks in rank_pattern
        assert config["rank_pattern"] and len(set(ranks.values())) > 1
    if case == "adalora":
        # pruned triplets are left out; a layer pruned to nothing exports one zero component
        expected_ranks = {hf_module_name(n): max(1, a.rank) for n, a in adapters.items()}
        assert min(a.rank for a in adapters.values()) < 6 and sum(a.rank for a in adapters.values()) > 0
        assert ranks == expected_ranks


@pytest.mark.parametrize("case", ["pissa", "nora_authors", "dora"])
def test_a_merged_adapter_exports_what_an_unmerged_one_does(case, images, texts, tmp_path):
    base, model = trained(case, images, texts)
    export_peft(model, tmp_path / "unmerged")
    pretrained = hf_clip_state_dict(model)
    lz.merge_adapters(model)
    export_peft(model, tmp_path / "merged")
    unmerged_tensors = load_file(tmp_path / "unmerged" / WEIGHTS_NAME)
    merged_tensors = load_file(tmp_path / "merged" / WEIGHTS_NAME)
    assert unmerged_tensors.keys() == merged_tensors.keys()
    for key, value in unmerged_tensors.items():
        assert torch.equal(value, merged_tensors[key]), key
    assert (tmp_path / "unmerged" / CONFIG_NAME).read_text() == (tmp_path / "merged" / CONFIG_NAME).read_text()
    for key, value in hf_clip_state_dict(model).items():  # the base is the pretrained model either way
        torch.testing.assert_close(value, pretrained[key], atol=1e-6, rtol=0)
    for key, value in hf_clip_state_dict(base).items():
        torch.testing.assert_close(value, pretrained[key], atol=1e-6, rtol=0)


# ---- to_hf_clip of a plain model ---------------------------------------------------------------------
def tiny_variant(**changes):
    """tiny-vit's open_clip config with ``changes`` (``vision_cfg`` / ``text_cfg`` entries merged)."""
    config = copy.deepcopy(TINY_CONFIGS["tiny-vit"])
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    torch.manual_seed(0)
    return open_clip.CLIP(**config).eval()


@pytest.mark.parametrize("name, build, act", [
    ("tiny-vit", lambda: tiny_clip("tiny-vit"), "gelu"),
    ("tiny-vit, attention split", lambda: lz.split_attention(tiny_clip("tiny-vit")), "gelu"),
    ("tiny-vit-custom (open_clip's Attention)", lambda: tiny_clip("tiny-vit-custom"), "gelu"),
    ("tiny-clip (shipped weights)", lambda: tiny_clip("tiny-clip"), "gelu"),
    ("QuickGELU (OpenAI's layout)", lambda: tiny_variant(quick_gelu=True), "quick_gelu"),
    ("eos pooling", lambda: tiny_variant(text_cfg=dict(pool_type="eos", eos_id=49407)), "gelu"),
])
def test_to_hf_clip_reproduces_open_clip(name, build, act, texts):
    model = build()
    size = model.visual.image_size[0]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    hf_model = to_hf_clip(model)
    assert hf_model.config.vision_config.hidden_act == hf_model.config.text_config.hidden_act == act
    assert hf_model.logit_scale.item() == model.logit_scale.item()
    image, text = ours(model, images, texts)
    assert_same(theirs(hf_model, images, texts), (image, text))
    assert image.abs().max() > 0.1 and text.abs().max() > 0.1


def test_argmax_pooling_is_open_clips_for_any_token_ids():
    """open_clip pools the largest token id; transformers does so with eos_token_id 2 (no end token needed)."""
    model = tiny_clip()
    tokens = torch.randint(1, 49000, (3, 32), generator=torch.Generator().manual_seed(4))
    hf_model = to_hf_clip(model)
    assert hf_model.config.text_config.eos_token_id == 2
    with torch.no_grad():
        torch.testing.assert_close(hf_model.get_text_features(input_ids=tokens).pooler_output,
                                   model.encode_text(tokens), atol=TOLERANCE, rtol=0)


def test_vit_b_16_converts_to_openais_transformers_config():
    """The OpenAI ViT-B/16 layout (built on the meta device: no weights) gives openai/clip-vit-base-patch16's
    config values (hidden sizes, depths, heads, patch, context, projection, quick_gelu, eos_token_id 2)."""
    from lora_zoo.hf_clip import convertible_config
    model = open_clip.create_model("ViT-B-16-quickgelu", device="meta")
    config = convertible_config(model)
    assert config["projection_dim"] == 512
    assert config["vision_config"] == dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, num_channels=3, image_size=224, patch_size=16, projection_dim=512)
    assert config["text_config"] == dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, vocab_size=49408, max_position_embeddings=77, projection_dim=512, eos_token_id=2)


# ---- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, feature", [
    (dict(vision_cfg=dict(ls_init_value=0.1)), "layer scale (ls_init_value)"),
    (dict(vision_cfg=dict(attentional_pool=True)), "attentional pooling"),
    (dict(vision_cfg=dict(pool_type="avg")), "image pooling 'avg'"),
    (dict(vision_cfg=dict(no_ln_pre=True)), "no_ln_pre"),
    (dict(vision_cfg=dict(qk_norm=True)), "qk_norm"),
    (dict(vision_cfg=dict(scale_fc=True)), "scale_fc"),
    (dict(vision_cfg=dict(scaled_cosine_attn=True)), "scaled_cosine_attn"),
    (dict(vision_cfg=dict(layers=(1, 1, 1, 1), width=32, image_size=64)), "ModifiedResNet image tower"),
    (dict(text_cfg=dict(pool_type="last")), "text pooling 'last'"),
    (dict(text_cfg=dict(pool_type="eos", eos_id=2)), "eos_id 2"),
    (dict(text_cfg=dict(no_causal_mask=True)), "no_causal_mask"),
    (dict(text_cfg=dict(proj_bias=True)), "proj_bias"),
    (dict(init_logit_bias=-10.0), "a logit bias"),
])
def test_an_architecture_transformers_cannot_represent_is_refused(changes, feature):
    model = tiny_variant(**changes)
    with pytest.raises(ValueError, match="cannot convert to transformers' CLIPModel exactly") as error:
        to_hf_clip(model)
    assert feature in str(error.value) and "\n" not in str(error.value)


def assert_refused(model, directory, message):
    with pytest.raises(ValueError, match=message) as error:
        export_peft(model, directory)
    assert "\n" not in str(error.value)
    assert not directory.exists()  # nothing written, not even the folder


@pytest.mark.parametrize("case", REFUSED)
def test_a_method_that_cannot_be_exported_exactly_is_refused(case, images, texts, tmp_path):
    _, model = trained(case, images, texts)
    assert_refused(model, tmp_path / case, f"{method_of(case)} cannot be exported as a peft adapter: .*"
                                           f"{CASES[case]['export']['refused']}")


def test_a_model_without_adapters_or_with_an_unrepresentable_feature_is_refused(tmp_path):
    assert_refused(tiny_clip(), tmp_path / "plain", "no lora_zoo adapters")
    scaled = tiny_variant(vision_cfg=dict(ls_init_value=0.1))
    lz.apply_adapters(scaled, "lora")
    assert_refused(scaled, tmp_path / "layer_scale", "layer scale")


def test_an_update_that_is_not_the_product_of_the_factors_is_refused(tmp_path):
    """A method whose merged ΔW is not ``up @ down`` (here twice it) cannot be carried by peft's LoRA."""
    model = tiny_clip()
    adapters = lz.apply_adapters(model, "lora", rank=2)
    adapter = adapters["visual.transformer.resblocks.1.attn.v"]
    plain = type(adapter)
    adapter.__class__ = type("Doubled", (plain,), {"_delta": lambda self, tensors: 2 * plain._delta(self, tensors)})
    with torch.no_grad():
        adapter.lora_B.normal_()
    assert_refused(model, tmp_path / "doubled", "at visual.transformer.resblocks.1.attn.v its merged update is not the "
                                                "product of its factors")


@pytest.mark.parametrize("package", ["peft", "transformers"])
def test_a_missing_package_is_named(package, monkeypatch, tmp_path):
    model = tiny_clip()
    lz.apply_adapters(model, "lora")
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    call = (lambda: export_peft(model, tmp_path / "out")) if package == "peft" else (lambda: to_hf_clip(model))
    with pytest.raises(ImportError, match=rf"needs {package} \(pip install peft transformers\)"):
        call()
    assert not (tmp_path / "out").exists()


# ---- stock peft and transformers, nothing of ours ---------------------------------------------------
LOADER = textwrap.dedent("""
    import sys
    import torch
    from peft import PeftModel
    from transformers import CLIPModel
    base_dir, adapter_dir, data_file = sys.argv[1:]
    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(base_dir), adapter_dir).eval()
    data = torch.load(data_file)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=data["images"]).pooler_output
        text = model.get_text_features(input_ids=data["texts"]).pooler_output
    print(max(float((image - data["image"]).abs().max()), float((text - data["text"]).abs().max())))
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("lora_zoo", "open_clip", "datasets")))
""")


def test_the_export_loads_in_a_process_with_only_torch_transformers_and_peft(images, texts, tmp_path):
    _, model = trained("aira", images, texts)
    export_peft(model, tmp_path / "adapter")
    to_hf_clip(model).save_pretrained(tmp_path / "base")
    image, text = ours(model, images, texts)
    torch.save(dict(images=images, texts=texts, image=image, text=text), tmp_path / "data.pt")
    (tmp_path / "load.py").write_text(LOADER)
    # -I: isolated (no PYTHONPATH, no current folder on the path), run from tmp_path: lora_zoo is not importable
    proc = subprocess.run([sys.executable, "-I", "load.py", "base", "adapter", "data.pt"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    difference, imported = proc.stdout.strip().splitlines()[-2:]
    assert float(difference) <= TOLERANCE and imported == "[]"


def test_readme_snippet_runs(images, texts, tmp_path, monkeypatch):
    """README's "Using an adapter in transformers" block, run as written on a trained tiny model."""
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "PeftModel" in b)
    _, model = trained("nora", images, texts)
    assert lz.export_peft is export_peft and lz.to_hf_clip is to_hf_clip  # the package's public names
    monkeypatch.chdir(tmp_path)
    scope = {"lz": lz, "model": model}
    exec(compile(block, "README.md", "exec"), scope)
    assert_same(theirs(scope["adapted"], images, texts), ours(model, images, texts))
