"""NoRA ``variant="authors"``: every choice of the authors' ablation tables A–C against an independent
re-derivation of their layers' formulas (lliai/LoRA-Zoo ``NoRALinear_A/B/C``, written here in their own
layout, ``y = x W_ABᵀ…``; docs/METHODS.md), the variant's defaults and errors, the double bias and the
saved SVD signs.

The layer is a fixed "trained-like" one (decaying spectrum, non-square, activations with outlier
channels): the check on real pretrained layers against the authors' own classes runs outside the
project (it needs their code).
"""
import copy

import pytest
import torch
from torch import nn

import lora_zoo as lz
import lora_zoo.nora as nora
from lora_zoo.calibration import LayerStats

D_OUT, D_IN = 40, 48


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def trained_like_layer():
    """(nn.Linear, calibration inputs): W = U diag(σ) Vᵀ with σ decaying, inputs with 4 outlier channels."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(D_OUT, D_OUT, generator=g))
    v, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))
    sigma = 2.0 * torch.exp(-torch.arange(D_OUT) / 6.0) + 0.05
    linear = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        linear.weight.copy_(u @ torch.diag(sigma) @ v[:, :D_OUT].T)
        linear.bias.copy_(torch.randn(D_OUT, generator=g) * 0.3)
    channel = torch.ones(D_IN)
    channel[torch.randperm(D_IN, generator=g)[:4]] = 30.0
    x = torch.randn(200, D_IN, generator=g) * channel
    return linear.requires_grad_(False), x


def stats_of(x):
    s = x.abs().mean(0)
    return LayerStats(s, x.norm(dim=0), torch.ones(D_OUT), tokens=x.shape[0])


# ---- an independent derivation of the authors' layers, in their layout ----------------------------
def authors_outer(weight, s, r, side):
    """Their frozen factors: lora_A (d_in × r) = diag(s)⁻¹ Û Σ_A, lora_B (r × d_out) = Σ_B Ĥ, from the SVD
    of the transposed weighted matrix (W diag(s))ᵀ = Û Σ Ĥ; Σ_A Σ_B = Σ as their init_method places it."""
    u_hat, sig, h_hat = torch.linalg.svd((weight * s).T, full_matrices=False)
    sig, ones = sig[:r], torch.ones(r)
    on_a, on_b = {"input": (sig, ones), "output": (ones, sig), "split": (sig.sqrt(), sig.sqrt()),
                  "none": (ones, ones)}[side]
    return (u_hat[:, :r] * on_a) / s[:, None], on_b[:, None] * h_hat[:r]


def their_inner(adapter):
    """Our trainable tensors as the authors' W_a / W_b tensors (their shapes)."""
    t = {n: p.detach().T for n, p in adapter.trainable_tensors().items()}
    structure = adapter.config.inner_structure
    if structure in ("nested", "down_parallel"):
        return {"a1": t["lora_inner_A"], "a2": t["lora_inner_B"]}
    if structure in ("output", "up_parallel"):
        return {"b1": t["lora_inner_A"], "b2": t["lora_inner_B"]}
    if structure == "nested_full":
        return {"a1": t["lora_inner_full"]}
    if structure == "output_full":
        return {"b1": t["lora_inner_full"]}
    return {"A": t["lora_outer_A"], "B": t["lora_outer_B"]}


def authors_w_ab(structure, lora_A, lora_B, inner):
    """Their product W_AB (d_in × d_out): the layer's forward adds scale · (x W_AB + b)."""
    a, b = lora_A, lora_B
    return {"nested": lambda: a @ inner["a1"] @ inner["a2"] @ b,
            "output": lambda: a @ b @ inner["b1"] @ inner["b2"],
            "nested_full": lambda: a @ inner["a1"] @ b,
            "output_full": lambda: a @ b @ inner["b1"],
            "down_parallel": lambda: (a + inner["a1"] @ inner["a2"]) @ b,
            "up_parallel": lambda: a @ (b + inner["b1"] @ inner["b2"]),
            "none": lambda: inner["A"] @ inner["B"]}[structure]()


# their shapes per structure, with r = r_out and k the inner rank (REPORT of their lora_lib.py)
THEIR_SHAPES = {
    "nested": lambda r, k: {"a1": (r, k), "a2": (k, r)},
    "output": lambda r, k: {"b1": (D_OUT, k), "b2": (k, D_OUT)},
    "nested_full": lambda r, k: {"a1": (r, r)},
    "output_full": lambda r, k: {"b1": (D_OUT, D_OUT)},
    "down_parallel": lambda r, k: {"a1": (D_IN, k), "a2": (k, r)},
    "up_parallel": lambda r, k: {"b1": (r, k), "b2": (k, D_OUT)},
    "none": lambda r, k: {"A": (D_IN, r), "B": (r, D_OUT)},
}

# (case id, our options, their inner rank k or None); table C: r_out = floor(0.8 · 40) = 32, k = 16
CASES = [(f"C-{side}-{structure}", dict(sigma_side=side, inner_structure=structure), 16)
         for side in ("input", "output", "split") for structure in ("nested", "output")]
CASES += [(f"B-{side}-{structure}", dict(sigma_side=side, inner_structure=structure, outer_rank=24,
                                         inner_init="kaiming_authors"), k)
          for side in ("none", "output", "split")
          for structure, k in (("down_parallel", 12), ("nested", 16), ("nested_full", None), ("up_parallel", 12),
                               ("output", 12), ("output_full", None))]
CASES += [("B-kaiming-outer-up_parallel", dict(outer_init="kaiming_authors", inner_structure="up_parallel",
                                               outer_rank=24, inner_init="kaiming_authors"), 12)]
CASES += [(f"A-{side}", dict(sigma_side=side, inner_structure="none", outer_rank=16), None)
          for side in ("input", "output", "split")]
CASES += [("A-kaiming-outer", dict(outer_init="kaiming_authors", inner_structure="none", outer_rank=16), None)]


@pytest.mark.parametrize("case_id, options, k", CASES, ids=[c[0] for c in CASES])
def test_update_and_forwards_equal_the_authors_layer(case_id, options, k):
    linear, x = trained_like_layer()
    stats = stats_of(x)
    torch.manual_seed(0)
    adapter = lz.wrap_linear(copy.deepcopy(linear), "nora", stats=stats, variant="authors", **options).eval()
    r = adapter.outer_rank
    assert adapter.inner_rank == k and adapter.scale == pytest.approx(1.0 / r)
    kaiming_outer = options.get("outer_init") == "kaiming_authors"
    if kaiming_outer:  # their kaiming(a=√5) lora_A (fan r) and zero lora_B; the draw is ours
        drawn = (adapter.lora_outer_A if "lora_outer_A" in adapter.trainable_tensors() else adapter.lora_outer_Q)
        assert drawn.abs().max() <= r ** -0.5
        outer = (drawn.detach().T, torch.zeros(r, D_OUT))
    else:
        outer = authors_outer(linear.weight, stats.input_abs_mean, r, adapter.config.sigma_side)
    for moved in (False, True):  # at init, then after the trainable tensors move
        if moved:
            with torch.no_grad():
                for p in adapter.trainable_tensors().values():
                    p.add_(0.05 * torch.randn_like(p))
        inner = their_inner(adapter)
        assert {n: tuple(t.shape) for n, t in inner.items()} == THEIR_SHAPES[adapter.config.inner_structure](r, k)
        if adapter.config.inner_structure == "none" and not moved:  # table A starts from their factors
            torch.testing.assert_close(inner["A"], outer[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(inner["B"], outer[1], rtol=1e-5, atol=1e-6)
        scale = 1.0 / r
        expected_delta = scale * authors_w_ab(adapter.config.inner_structure, *outer, inner).T
        expected = x @ (linear.weight + expected_delta).T + (1 + scale) * linear.bias  # the bias twice
        assert rel(adapter.delta_weight(), expected_delta) <= 1e-5
        with torch.no_grad():
            assert rel(adapter(x), expected) <= 1e-5
            up, down = adapter.factors(adapter.trainable_tensors())  # the per-step cost: a rank-k LoRA
            assert up.shape == (D_OUT, down.shape[0]) and down.shape[1] == D_IN
            assert down.shape[0] == (k if adapter.config.inner_structure in ("nested", "output") else r)
            adapter.merge()
            assert rel(adapter(x), expected) <= 1e-5
            torch.testing.assert_close(adapter.base_layer.bias, (1 + scale) * linear.bias)
            adapter.unmerge()
            torch.testing.assert_close(adapter.base_layer.bias, linear.bias, rtol=0, atol=1e-6)  # b + s·b − s·b


def test_variant_defaults_resolve_to_explicit_values_that_round_trip():
    authors = lz.build_config("nora", variant="authors")
    assert {k: v for k, v in authors.to_dict().items() if k not in ("dropout", "act_beta")} == dict(
        variant="authors", outer_rank=0.8, inner_rank=16, alpha=1.0, inner_init="randn", residual=False,
        act_weighted=True, sigma_side="input", inner_structure="nested", outer_init="svd", double_bias=True,
        calibration="authors")
    paper = lz.build_config("nora")
    assert (paper.inner_rank, paper.alpha, paper.inner_init, paper.residual, paper.act_weighted, paper.sigma_side,
            paper.inner_structure, paper.double_bias, paper.calibration) == (
        16, None, "sigma", True, False, "none", "nested", False, "standard")
    # the authors' inner ranks: 16 (table C; nested), r_out // 2 (table B's parallel and kaiming output pairs)
    rank = {s: lz.build_config("nora", variant="authors", inner_structure=s, inner_init="kaiming_authors").inner_rank
            for s in ("nested", "output", "down_parallel", "up_parallel", "nested_full", "output_full")}
    assert rank == dict(nested=16, output=0.5, down_parallel=0.5, up_parallel=0.5, nested_full=None, output_full=None)
    assert lz.build_config("nora", variant="authors", inner_structure="output").inner_rank == 16
    kaiming = lz.build_config("nora", variant="authors", inner_structure="none", outer_init="kaiming_authors")
    assert (kaiming.sigma_side, kaiming.act_weighted, kaiming.inner_init, kaiming.needs_calibration) == (
        "none", False, None, False)
    assert authors.needs_calibration and not paper.needs_calibration
    for config in (authors, paper, kaiming, lz.build_config("nora", variant="authors", inner_structure="output_full")):
        assert type(config).from_dict(config.to_dict()) == config  # what a checkpoint saves rebuilds it


@pytest.mark.parametrize("options, message", [
    (dict(sigma_side="input"), "sigma_side='input' exists only for variant='authors'"),
    (dict(inner_structure="output"), "inner_structure='output' exists only for variant='authors'"),
    (dict(double_bias=True), "double_bias=True exists only for variant='authors'"),
    (dict(inner_init="kaiming_authors"), "inner_init='kaiming_authors' is not one of variant='paper'"),
    (dict(variant="authors", inner_init="sigma"), "is not one of variant='authors''s: randn, kaiming_authors"),
    (dict(variant="authors", outer_init="kaiming_authors"), "inner_structure='nested' with outer_init="
                                                            "'kaiming_authors' never trains"),
    (dict(variant="authors", outer_init="kaiming_authors", inner_structure="none", sigma_side="input"),
     "sigma_side='input' has no meaning with outer_init='kaiming_authors'"),
    (dict(variant="authors", outer_init="kaiming_authors", inner_structure="none", act_weighted=True),
     "act_weighted=True has no meaning"),
    (dict(variant="authors", inner_structure="output_full", inner_rank=8), "inner_rank has no meaning"),
    (dict(variant="authors", inner_structure="none", inner_init="randn"), "inner_init='randn' has no meaning"),
    (dict(variant="authors", inner_rank=1.5), "inner_rank must be a positive int or a ratio"),
    (dict(variant="authors", inner_structure="sideways"), "inner_structure must be one of"),
    (dict(variant="author"), "variant must be one of 'paper', 'authors'"),
])
def test_bad_combinations_fail_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as err:
        lz.build_config("nora", **options)
    assert "\n" not in str(err.value)


def test_residual_turns_the_double_bias_off_and_keeps_the_model_at_init():
    """W − ΔW(θ₀) leaves the authors' extra scale·b; with residual=true double_bias defaults to false (removing
    scale·b from the frozen bias too would compute exactly that), and asking for both is refused."""
    torch.manual_seed(0)
    linear, x = nn.Linear(D_IN, D_OUT), torch.randn(6, D_IN)
    options = dict(variant="authors", act_weighted=False, outer_rank=24)
    assert lz.build_config("nora", **options).double_bias is True  # their defaults are untouched
    adapter = lz.wrap_linear(copy.deepcopy(linear), "nora", residual=True, **options)
    assert adapter.config.double_bias is False and adapter.extra_bias() is None and adapter.has_residual
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), linear(x), atol=1e-5, rtol=1e-5)
        # what both together would give: off by exactly scale·b
        both = lz.wrap_linear(copy.deepcopy(linear), "nora", residual=False, **options)
        both._make_residual()
        torch.testing.assert_close(both(x) - linear(x), (both.scale * linear.bias).expand(6, -1), atol=1e-5, rtol=1e-5)
        assert both.scale * linear.bias.abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"residual=true with double_bias=true changes the output at init by "
                                         r"scale \* bias") as err:
        lz.build_config("nora", residual=True, double_bias=True, **options)
    assert "\n" not in str(err.value)


def test_saved_svd_signs_decide_the_update(monkeypatch):
    """The frozen factors are rebuilt canonical from W; the signs LAPACK gave where the adapter was built
    are saved with it, so another LAPACK (other signs) loading the tensors gets the same ΔW."""
    linear, x = trained_like_layer()
    stats = stats_of(x)
    built = lz.wrap_linear(copy.deepcopy(linear), "nora", stats=stats, variant="authors")
    canonical = built.lora_outer_P
    assert torch.all(canonical.gather(0, canonical.abs().argmax(0, keepdim=True)) > 0)
    saved = {n: t.clone() for n, t in built.state_dict().items() if n.startswith("lora_")}
    assert "lora_outer_signs" in saved and "lora_outer_P" not in saved  # signs saved, factors rebuilt
    real_svd = nora.weighted_svd
    flips = torch.where(torch.arange(built.outer_rank) % 3 == 0, -1.0, 1.0)

    def other_lapack(*args, **kwargs):
        u, sigma, vt = real_svd(*args, **kwargs)
        return u * flips, sigma, flips[:, None] * vt

    monkeypatch.setattr(nora, "weighted_svd", other_lapack)
    elsewhere = lz.wrap_linear(copy.deepcopy(linear), "nora", stats=stats, variant="authors")
    torch.testing.assert_close(elsewhere.lora_outer_P, canonical)
    assert not torch.equal(elsewhere.lora_outer_signs, saved["lora_outer_signs"])
    elsewhere.load_state_dict(saved, strict=False)
    torch.testing.assert_close(elsewhere.delta_weight(), built.delta_weight(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("structure", ["nested", "output", "nested_full", "output_full", "down_parallel",
                                       "up_parallel"])
def test_kaiming_authors_bounds_follow_their_layout(structure):
    """Their kaiming_uniform_ on (their) tensors: fan = their second dimension = our rows; a=√5 → 1/√fan on
    input-side and full tensors, a=0 → √(6/fan) on output-side tensors."""
    linear, x = trained_like_layer()
    torch.manual_seed(1)
    adapter = lz.wrap_linear(linear, "nora", stats=stats_of(x), variant="authors", inner_structure=structure,
                             outer_rank=24, inner_init="kaiming_authors")
    for name, tensor in adapter.trainable_tensors().items():
        gain = 6 ** 0.5 if name == "lora_inner_B" else 1.0
        bound = gain / tensor.shape[0] ** 0.5
        assert tensor.abs().max() <= bound and tensor.abs().max() > 0.9 * bound, (name, bound)
