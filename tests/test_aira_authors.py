"""AIRA ``variant="authors"``: what the authors' CLIP code (lliai/LoRA-Zoo ``aira/``) computes, checked with numbers.

The reference functions below re-derive the authors' ``AwLinear`` (init, forward, merge) and
their rank allocation from the formulas (docs/METHODS.md ("AIRA: the authors' CLIP code")), independently of
``lora_zoo.aira``: the layer runs sequence-first as theirs does, the allocation is solved in
closed form over the breakpoints of the water level instead of by bisection.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_zoo as lz
from conftest import tiny_clip
from lora_zoo.aira import AiraLinear, batch_output_scale
from lora_zoo.calibration import LayerStats
from lora_zoo.rank_allocation import allocate_ranks, continuous_ranks

AUTHORS = dict(variant="authors", rank_alloc=False)


# ---- reference: the authors' layer, sequence-first (L, N, d) like their CLIP ----------------
def reference_init(weight, rank):
    """torch.svd (old API: returns V, not Vᵀ), A = first r rows of V, B = U_r diag(S_r)."""
    u, s, v = torch.svd(weight)
    return v[:rank, :], u[:, :rank] @ torch.diag(s[:rank])


def reference_forward(x_seq_first, weight, bias, lora_a, lora_b, alpha=2.0):
    out = F.linear(x_seq_first, weight, bias)
    channel = out.abs().mean(dim=0)  # over tokens: one value per sample and output channel
    channel = (channel - channel.min()) / (channel.max() - channel.min())
    return out + alpha * F.linear(x_seq_first, lora_b @ lora_a) * channel


def square_layer(d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d, d)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
        linear.bias.copy_(torch.randn(d, generator=g) * 0.1)
    return linear


def authors_adapter(linear, rank=4, perturb=True):
    adapter = lz.wrap_linear(copy.deepcopy(linear), "aira", rank=rank, **AUTHORS)
    if perturb:  # move away from the init, as training would
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in adapter.trainable_tensors().values():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return adapter


def batch_first_tokens(n=5, length=7, d=24, seed=3):
    return torch.randn(n, length, d, generator=torch.Generator().manual_seed(seed))


# ---- options -------------------------------------------------------------------------------
def test_variant_defaults_resolve_to_explicit_values():
    authors = lz.build_config("aira", variant="authors").to_dict()
    assert {k: authors[k] for k in ("rank", "alpha", "scale_by_rank", "init", "residual", "act_scale", "dropout",
                                    "rank_alloc", "rank_importance", "rank_rounding", "rank_min", "rank_max",
                                    "rank_budget", "calibration")} == dict(
        rank=16, alpha=2.0, scale_by_rank=False, init="authors_svd", residual=False, act_scale="batch", dropout=0.0,
        rank_alloc=True, rank_importance="act", rank_rounding="floor", rank_min=2, rank_max=33,
        rank_budget=734003.2, calibration="authors")
    paper = lz.build_config("aira").to_dict()
    assert (paper["variant"], paper["rank"], paper["init"], paper["residual"], paper["act_scale"],
            paper["rank_rounding"], paper["rank_max"], paper["calibration"]) == (
        "paper", 8, "owsvd", True, True, "greedy", 32, "standard")
    assert lz.build_config("aira", variant="authors").scale == 2.0  # alpha, not alpha / r
    # an explicit value wins (a residual needs act_scale other than batch, or init lora: see below)
    assert lz.build_config("aira", variant="authors", residual=True, act_scale=False).residual is True
    # a saved config rebuilds the same layer config, even with the other variant's defaults around
    assert lz.build_config("aira", **authors).to_dict() == authors


@pytest.mark.parametrize("options, message", [
    (dict(scale_by_rank=False), "scale_by_rank=false needs a number for alpha"),
    (dict(rank_min=5, rank_max=3), "rank_min <= rank_max"),
    (dict(variant="authors", rank_budget=0), "rank_budget must be positive"),
    (dict(variant="author"), "variant must be one of 'paper', 'authors'"),
    (dict(variant="authors", rank_importance="outliers"), "rank_importance must be one of"),
    (dict(variant="authors", calibration="full"), "calibration must be one of"),
])
def test_bad_options_fail_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as error:
        lz.build_config("aira", **options)
    assert "\n" not in str(error.value)


def test_per_batch_scaling_has_no_residual_unless_the_init_is_zero():
    """W − ΔW(θ₀) + m̂ ⊙ ΔW(θ₀)x ≠ Wx: with act_scale batch a residual cannot keep the model at init."""
    assert lz.build_config("aira", act_scale="batch").residual is False  # the paper variant's default yields
    with pytest.raises(ValueError, match="residual=true with act_scale='batch' and init='authors_svd' changes the "
                                         "output at init") as error:
        lz.build_config("aira", variant="authors", residual=True)
    assert "\n" not in str(error.value)
    # what it would compute: the output moves at init by (m̂ − 1) ⊙ ΔW(θ₀)x (m̂ of the residual's output)
    torch.manual_seed(0)
    linear, x = nn.Linear(24, 32), batch_first_tokens()
    adapter = lz.wrap_linear(copy.deepcopy(linear), "aira", rank=4, **AUTHORS)
    delta = adapter.delta_weight()
    with torch.no_grad():
        adapter.base_layer.weight.sub_(delta)  # the residual it would have taken
        moved = adapter(x) - linear(x)
        expected = (batch_output_scale(adapter.base_layer(x)) - 1) * (x @ delta.t())  # m̂ of W − ΔW(θ₀)
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-4)
    assert moved.abs().max() > 1e-2
    # init lora: ΔW(θ₀) = 0, so the residual is exact and allowed
    zero_init = lz.wrap_linear(copy.deepcopy(linear), "aira", rank=4, init="lora", residual=True, **AUTHORS)
    assert zero_init.has_residual
    with torch.no_grad():
        torch.testing.assert_close(zero_init(x), linear(x), atol=0, rtol=0)


def test_bad_layers_fail_in_one_line():
    with pytest.raises(ValueError, match="d_in=20, d_out=12") as error:  # their indexing needs d_in <= d_out
        lz.wrap_linear(nn.Linear(20, 12), "aira", **AUTHORS)
    assert "\n" not in str(error.value)
    stats = {"l": LayerStats(torch.ones(8), torch.ones(8), torch.ones(8), tokens=4)}  # no first-token norm
    with pytest.raises(ValueError, match="first_token_output_l2"):
        AiraLinear.plan_layers({"l": nn.Linear(8, 8)}, stats, lz.build_config("aira", variant="authors"))


# ---- the layer -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(24, 24), (32, 24)])
def test_init_reproduces_their_indexing(shape):
    linear = nn.Linear(shape[1], shape[0])
    adapter = lz.wrap_linear(copy.deepcopy(linear), "aira", rank=4, **AUTHORS)
    lora_a, lora_b = reference_init(linear.weight.detach(), 4)
    torch.testing.assert_close(adapter.lora_A, lora_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapter.lora_B, lora_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapter.base_layer.weight, linear.weight, rtol=0, atol=0)  # no residual
    # not the top-r approximation U_r Σ_r V_rᵀ: A's rows are not right singular vectors
    u, s, vh = torch.linalg.svd(linear.weight.detach())
    assert not torch.allclose(adapter.lora_B @ adapter.lora_A, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-3)


def test_forward_matches_theirs_in_train_and_eval():
    linear = square_layer()
    adapter = authors_adapter(linear)
    x = batch_first_tokens()
    expected = reference_forward(x.transpose(0, 1), linear.weight, linear.bias,
                                 adapter.lora_A.detach(), adapter.lora_B.detach()).transpose(0, 1)
    for mode in (True, False):  # never merged: evaluation runs the same forward
        adapter.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-6)
    rows = x[0]  # a plain 2-D input: mean over its rows, as their code does with dim 0
    with torch.no_grad():
        torch.testing.assert_close(adapter(rows), reference_forward(rows, linear.weight, linear.bias,
                                                                    adapter.lora_A, adapter.lora_B),
                                   rtol=1e-5, atol=1e-6)


def test_a_sample_depends_on_its_batch_as_in_theirs():
    linear = square_layer()
    adapter = authors_adapter(linear)
    x = batch_first_tokens(n=8)
    with torch.no_grad():
        alone, together = adapter(x[:1]), adapter(x)[:1]
        for batch, got in ((x[:1], alone), (x, adapter(x))):
            torch.testing.assert_close(got, reference_forward(batch.transpose(0, 1), linear.weight, linear.bias,
                                                              adapter.lora_A, adapter.lora_B).transpose(0, 1),
                                       rtol=1e-5, atol=1e-6)
    assert (alone - together).norm() > 0.01 * together.norm()


def test_batch_output_scale_by_hand():
    out = torch.tensor([[[1.0, -2.0], [3.0, 0.0]],      # sample 0: mean |y| per channel (2, 1)
                        [[-5.0, 4.0], [5.0, 2.0]]])     # sample 1: (5, 3); min 1, max 5 over both samples
    torch.testing.assert_close(batch_output_scale(out), torch.tensor([[[0.25, 0.0]], [[1.0, 0.5]]]))
    torch.testing.assert_close(batch_output_scale(out[0]), torch.tensor([1.0, 0.0]))  # 2-D: over rows


def test_delta_weight_is_their_merge_and_merging_is_refused():
    adapter = authors_adapter(square_layer())
    torch.testing.assert_close(adapter.delta_weight(), 2.0 * adapter.lora_B @ adapter.lora_A)  # no m̂ in it
    with pytest.raises(RuntimeError, match="not mergeable"):
        adapter.merge()


# ---- rank allocation -------------------------------------------------------------------------
def reference_floor_ranks(scores, costs, budget, low, high):
    """Maximise Σ θ log r s.t. Σ f r <= budget, r in [low, high]: r_i = clip(θ_i μ / f_i) with the water level μ
    found exactly. The spent budget is linear in μ between breakpoints; walk them in order."""
    def spent(mu):
        return sum(f * min(max(s * mu / f, low), high) for s, f in zip(scores, costs))
    if spent(float("inf")) <= budget:
        return [high] * len(scores), [float(high)] * len(scores)
    points = sorted({b * f / s for s, f in zip(scores, costs) for b in (low, high)})
    before = 0.0
    for mu in points:
        if spent(mu) >= budget:
            break
        before = mu
    lo_spent, hi_spent = spent(before), spent(mu)
    level = before + (budget - lo_spent) * (mu - before) / (hi_spent - lo_spent)
    continuous = [min(max(s * level / f, low), high) for s, f in zip(scores, costs)]
    return [math.floor(r) for r in continuous], continuous


def test_floor_allocation_by_hand():
    # unclipped optimum r = θ μ with μ = 2: [2, 2, 4, 8]; with r <= 6 the last is clipped and μ becomes 2.5
    assert allocate_ranks([1, 1, 2, 4], [1, 1, 1, 1], 16, 2, 33, rounding="floor") == [2, 2, 4, 8]
    assert continuous_ranks([1, 1, 2, 4], [1, 1, 1, 1], 16, 2, 6) == pytest.approx([2.5, 2.5, 5.0, 6.0])
    assert allocate_ranks([1, 1, 2, 4], [1, 1, 1, 1], 16, 2, 6, rounding="floor") == [2, 2, 5, 6]
    assert allocate_ranks([1, 1, 2, 4], [1, 1, 1, 1], 16, 2, 6, rounding="greedy") == [3, 2, 5, 6]  # gain log(3/2) > 2 log(6/5)


def test_continuous_optimum_meets_kkt_and_floors_match_an_exact_solution():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(36, generator=g) * 50 + 0.5).tolist()
    scores[0], scores[1] = 1e-3, 1e4                  # one layer at the lower bound, one at the upper
    costs = [1536] * 24 + [1024] * 12                   # ViT-B/16 vision and text q/k/v
    budget = 0.7 * 2 ** 20
    ranks = continuous_ranks(scores, costs, budget, 2, 33)
    assert sum(f * r for f, r in zip(costs, ranks)) == pytest.approx(budget, rel=1e-9)  # budget binds
    levels = [s / (f * r) for s, f, r in zip(scores, costs, ranks)]  # θ_i / (f_i r_i) = λ where not clipped
    interior = [lv for lv, r in zip(levels, ranks) if 2 < r < 33]
    lam = interior[0]
    assert max(interior) == pytest.approx(min(interior), rel=1e-9)
    assert ranks[0] == 2 and levels[0] < lam and ranks[1] == 33 and levels[1] > lam
    floors, exact = reference_floor_ranks(scores, costs, budget, 2, 33)
    assert ranks == pytest.approx(exact, rel=1e-9)
    assert min(abs(r - round(r)) for r in exact if 2 < r < 33) > 1e-4  # no floor here sits on an integer
    assert allocate_ranks(scores, costs, budget, 2, 33, rounding="floor") == floors
    assert allocate_ranks([s * 1000 for s in scores], costs, budget, 2, 33, rounding="floor") == floors


def test_authors_variant_on_the_tiny_model(images, texts):
    """Allocation from the first-token output norms, floored; the layers then train and save like any adapter."""
    model = lz.split_attention(tiny_clip())
    stats = lz.collect_activation_stats(model, [images], [texts[:1]], include_padding=True)
    options = dict(variant="authors", rank_budget=8000.0)
    adapters = lz.apply_adapters(model, "aira", stats=stats, **options)
    names = list(adapters)
    costs = [a.in_features + a.out_features for a in adapters.values()]
    expected, _ = reference_floor_ranks([float(stats[n].first_token_output_l2) for n in names], costs, 8000.0, 2, 33)
    assert [lz.layer_ranks(model)[n] for n in names] == expected
    assert len(set(expected)) > 1 and sum(f * r for f, r in zip(costs, expected)) <= 8000
    assert lz.count_trainable(model) == sum(f * r for f, r in zip(costs, expected))
    assert all(not a.mergeable and a.scale == 2.0 and not a.has_residual for a in adapters.values())
