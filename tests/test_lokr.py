"""LoKr (``lora_zoo/lokr.py``) against Hugging Face peft 0.21.2's ``LoKrConfig`` on identical weights.

peft is the reference here: the same factor shapes and rule for which factor is low-rank, the same init drawn in
the same order from the same seed, the same ΔW, forward and one AdamW training step (loss, gradients, updated
tensors), for Linear layers of several shapes, ranks and both ``decompose_both`` settings.
"""
import copy
import math

import pytest
import torch
from torch import nn

import lora_zoo as lz
from lora_zoo.lokr import factorization

peft = pytest.importorskip("peft")

SHAPES = [  # (d_out, d_in, r, decompose_both, peft init_weights)
    (12, 8, 2, False, True), (64, 32, 2, True, True), (64, 32, 16, False, True), (24, 36, 1, True, "lycoris"),
    (48, 40, 4, False, "lycoris"), (96, 64, 64, True, True)]


def pair(d_out, d_in, r, both, init, seed=5):
    """(our adapter, peft's LoKr layer) around copies of one Linear, each built after ``torch.manual_seed(seed)``."""
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out)
    torch.manual_seed(seed)
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(linear)), peft.LoKrConfig(
        r=r, alpha=3.0, target_modules=["0"], decompose_both=both, init_weights=init))
    torch.manual_seed(seed)
    ours = lz.wrap_linear(copy.deepcopy(linear), "lokr", rank=r, alpha=3.0, decompose_both=both,
                          init="peft" if init is True else "lycoris")
    return ours, model.base_model.model[0]


def theirs_by_our_names(layer) -> dict[str, torch.Tensor]:
    return {n.replace("lokr_", "lora_").replace(".default", ""): p for n, p in layer.named_parameters() if "lokr" in n}


def test_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in [*range(1, 300), 768, 3072, 4096, 11008, 14336, 1024, 127]:
        for factor in (-1, 2, 3, 4, 5, 7, 8, 16):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)
    assert factorization(4096) == (64, 64) and factorization(11008) == (86, 128) and factorization(128, 16) == (16, 8)


@pytest.mark.parametrize("shape", SHAPES)
def test_same_tensors_at_init_and_the_same_update_forward_and_training_step(shape):
    ours, theirs = pair(*shape)
    mine, reference = ours.trainable_tensors(), theirs_by_our_names(theirs)
    assert sorted(mine) == sorted(reference)
    for name in mine:
        assert torch.equal(mine[name], reference[name]), name  # the same draws from the same seed
    with torch.no_grad():
        for name, tensor in mine.items():
            value = torch.randn_like(tensor)
            tensor.copy_(value)
            reference[name].copy_(value)
    assert ours.scale == theirs.scaling["default"] == 3.0 / shape[2]
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), atol=0, rtol=0)
    x = torch.randn(3, 5, shape[1], generator=torch.Generator().manual_seed(2))
    target = torch.randn(3, 5, shape[0], generator=torch.Generator().manual_seed(3))
    optimizers = [torch.optim.AdamW(list(t.values()), lr=1e-2) for t in (mine, reference)]
    losses = []
    for layer, optimizer in zip((ours, theirs), optimizers):
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for name in mine:
        torch.testing.assert_close(mine[name].grad, reference[name].grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine[name], reference[name], atol=1e-6, rtol=1e-5)


def test_the_forward_never_forms_delta_w_and_equals_the_product_form():
    ours, _ = pair(1024, 1024, 8, False, True)
    with torch.no_grad():
        ours.lora_w1.normal_()
    x = torch.randn(2, 3, 1024)
    expected = x @ ours.delta_weight().t()
    torch.testing.assert_close(ours.adapter_output(x, None), expected, atol=1e-3, rtol=1e-4)
    up, down = ours.factors(ours.trainable_tensors())
    assert up.shape == (1024, 32 * 8) and down.shape == (32 * 8, 1024)  # kron(w1, w2_a) · kron(I, w2_b)
    torch.testing.assert_close(up @ down, ours.delta_weight(), atol=1e-4, rtol=1e-4)


def test_parameter_counts_of_the_notes_worked_shapes():
    """peft's LoKr parameter counts at r 8 of CLIP and LLaMA layers (w1 full, w2 a rank-8 pair)."""
    for (d_out, d_in), count in {(768, 768): 1088, (3072, 768): 1920, (11008, 4096): 7040,
                                 (1024, 4096): 2816}.items():
        layer = lz.wrap_linear(nn.Linear(d_in, d_out, device="meta"), "lokr", rank=8)
        assert layer.num_trainable() == count
        assert math.prod(layer.lora_w1.shape) + layer.lora_w2_a.numel() + layer.lora_w2_b.numel() == count
