"""One place changes weights (``adapter.apply_delta``): a planted method with a bias update (``extra_bias``) is
merged, unmerged, exported and loaded from a checkpoint through it, and all four agree with a model whose weights
and biases were changed by hand."""
import copy

import pytest
import torch
from torch import nn

import lora_zoo as lz
import lora_zoo.adapter
import lora_zoo.kinds
import lora_zoo.export
from conftest import tiny_clip
from lora_zoo import registry
from lora_zoo.export import fused_state_dict
from lora_zoo.lora import LoraConfig, LoraLinear


@pytest.fixture
def biased():
    """A throwaway layer method (LoRA plus a trainable bias update Δb), registered for one test, then removed."""
    import lora_zoo.catalog  # noqa: F401 - every method registered first

    @registry.register_method("biased_test", display_name="Biased", citation="a test", lr=1e-3)
    class BiasedLinear(LoraLinear):
        config_class = LoraConfig

        def __init__(self, base_layer, config, stats=None):
            super().__init__(base_layer, config, stats)
            self.lora_bias = nn.Parameter(torch.zeros(self.out_features))

        def extra_bias(self):
            return self.lora_bias

    yield "biased_test"
    registry._METHODS.pop("biased_test")


@pytest.fixture
def calls(monkeypatch):
    """Every ``apply_delta`` call, by the module that made it (the name each module imported is wrapped)."""
    seen = []
    real = lora_zoo.adapter.apply_delta

    def spy(module):
        def wrapped(weight, bias, weight_delta, bias_delta=None, sign=1):
            seen.append((module, bias_delta is not None, sign))
            return real(weight, bias, weight_delta, bias_delta, sign)
        return wrapped

    for module in (lora_zoo.adapter, lora_zoo.export, lora_zoo.kinds):  # kinds: checkpoint loading
        monkeypatch.setattr(module, "apply_delta", spy(module.__name__.rsplit(".", 1)[1]))
    return seen


def outputs(model, images, texts):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def test_merge_export_and_checkpoint_loading_agree_through_apply_delta(biased, calls, images, texts, tmp_path):
    model = tiny_clip()
    lz.apply_adapters(model, biased, targets=("q", "v"), rank=2, dropout=0.0)
    adapters = lz.adapter_modules(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_B.normal_(std=0.2, generator=g)
            adapter.lora_bias.normal_(std=0.2, generator=g)
    unmerged = outputs(model, images, texts)

    # the reference: a plain split model whose weights and biases were changed by hand, not by apply_delta
    by_hand = tiny_clip()
    lz.split_attention(by_hand)
    with torch.no_grad():
        for name, adapter in adapters.items():
            linear = by_hand.get_submodule(name)
            up, down = adapter.factors(adapter.trainable_tensors())
            linear.weight.copy_(linear.weight + up @ down)
            linear.bias.copy_(linear.bias + adapter.lora_bias)
    for ours, reference in zip(unmerged, outputs(by_hand, images, texts)):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)  # the unmerged forward adds Δb too

    weights = {n: (a.base_layer.weight.clone(), a.base_layer.bias.clone()) for n, a in adapters.items()}
    lz.merge_adapters(model)
    assert [c for c in calls if c[0] == "adapter"] == [("adapter", True, 1)] * len(adapters)
    for name, adapter in adapters.items():  # merging folded Δb into the bias
        torch.testing.assert_close(adapter.base_layer.bias, weights[name][1] + adapter.lora_bias, rtol=0, atol=0)
    for ours, reference in zip(outputs(model, images, texts), unmerged):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    lz.unmerge_adapters(model)
    assert calls[-1] == ("adapter", True, -1)
    for name, adapter in adapters.items():
        torch.testing.assert_close(adapter.base_layer.weight, weights[name][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.base_layer.bias, weights[name][1], rtol=0, atol=1e-6)

    calls.clear()
    plain = tiny_clip()
    plain.load_state_dict(fused_state_dict(model, reference=tiny_clip()), strict=True)
    assert calls == [("export", True, 1)] * len(adapters)
    for ours, reference in zip(outputs(plain, images, texts), unmerged):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)

    lz.save_adapters(model, tmp_path / "a.safetensors")
    fresh = tiny_clip()  # no adapters: loading injects them, and changes no weight
    lz.load_adapters(fresh, tmp_path / "a.safetensors")
    for ours, reference in zip(outputs(fresh, images, texts), unmerged):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for adapter in lz.adapter_modules(merged).values():
            adapter.lora_bias.zero_()  # other tensors: loading must replace them
    lz.merge_adapters(merged)
    calls.clear()
    lz.load_adapters(merged, tmp_path / "a.safetensors")  # unmerged (Δb out), tensors swapped, merged again (Δb in)
    assert calls == [("adapter", True, -1), ("adapter", True, 1)] * len(adapters)
    assert all(a.merged for a in lz.adapter_modules(merged).values())
    for ours, reference in zip(outputs(merged, images, texts), unmerged):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_a_merge_that_would_make_a_weight_non_finite_changes_nothing(images, texts):
    """Safe merge, as peft's ``safe_merge``: the sums are computed into new tensors and committed only when finite.
    An fp16 model whose update overflows fp16 (65504) is refused with the weights and the merged flag unchanged."""
    from lora_zoo.errors import NonFiniteError

    model = tiny_clip()
    adapters = lz.apply_adapters(model, "lora", targets=("v",), rank=2, dropout=0.0)
    model.half()
    adapter = adapters["visual.transformer.resblocks.0.attn.v"]
    with torch.no_grad():
        adapter.lora_B.fill_(1e4)  # ΔW = (1/√2) · B A: every entry 0.707 · 2 · 1e4 · 10 ≈ 1.4e5 > fp16 max
        adapter.lora_A.fill_(10.0)
    before = {n: a.base_layer.weight.clone() for n, a in adapters.items()}
    with pytest.raises(NonFiniteError, match="left unchanged"):
        lz.merge_adapters(model)
    assert not adapter.merged
    assert all(torch.equal(a.base_layer.weight, before[n]) for n, a in adapters.items())
