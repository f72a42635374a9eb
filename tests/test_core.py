"""Core behaviour: attention split, calibration statistics, NoRA/AIRA maths, rank allocation."""
import copy
import math

import pytest
import torch
from torch import nn

import lora_zoo as lz
from conftest import tiny_clip
from lora_zoo.adapter import fan_uniform
from lora_zoo.aira import AiraLinear
from lora_zoo.calibration import LayerStats
from lora_zoo.rank_allocation import allocate_ranks, outlier_score


def encode(model, images, texts):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


@pytest.mark.parametrize("backbone", ["tiny-vit", "tiny-vit-custom"])
def test_split_attention_equals_original(backbone, images, texts):
    original = tiny_clip(backbone)
    split = lz.split_attention(copy.deepcopy(original))
    assert isinstance(split.visual.transformer.resblocks[0].attn, lz.SplitAttention)
    assert isinstance(split.transformer.resblocks[1].attn, lz.SplitAttention)
    for a, b in zip(encode(split, images, texts), encode(original, images, texts)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the split layers hold exactly the fused weights
    block, fused = split.transformer.resblocks[0].attn, original.transformer.resblocks[0].attn
    in_proj = fused.in_proj_weight
    torch.testing.assert_close(torch.cat([block.q.weight, block.k.weight, block.v.weight]), in_proj, rtol=0, atol=0)
    assert lz.split_attention(split) is split  # idempotent
    assert split.transformer.resblocks[0].attn is block


def test_split_attention_rejects_unknown_attention():
    model = tiny_clip()
    model.transformer.resblocks[0].attn = nn.Identity()
    with pytest.raises(TypeError, match="cannot split attention of type .*Identity.*expected"):
        lz.split_attention(model)


def test_apply_adapters_targets_and_layers():
    model = tiny_clip()
    adapters = lz.apply_adapters(model, "lora", encoders=("vision",), targets=("v", "o"), layers=[-1])
    assert sorted(adapters) == ["visual.transformer.resblocks.1.attn.o", "visual.transformer.resblocks.1.attn.v"]
    assert model.visual.transformer.resblocks[1].attn.v is adapters["visual.transformer.resblocks.1.attn.v"]
    with pytest.raises(ValueError, match="already has adapters"):
        lz.apply_adapters(model, "lora")
    with pytest.raises(ValueError, match="unknown adapter method 'nope'; expected one of .*lora"):
        lz.apply_adapters(tiny_clip(), "nope")
    with pytest.raises(ValueError, match="unknown target 'x'"):
        lz.apply_adapters(tiny_clip(), "lora", targets=("x",))
    with pytest.raises(ValueError, match="layer index 5 out of range"):
        lz.apply_adapters(tiny_clip(), "lora", layers=[5])
    with pytest.raises(ValueError, match="unknown option.*bogus"):
        lz.apply_adapters(tiny_clip(), "lora", bogus=1)


def test_wrap_linear_on_any_linear():
    torch.manual_seed(0)
    linear = nn.Linear(20, 12)
    x = torch.randn(7, 20)
    expected = linear(x).detach()
    for method, options in [("lora", dict(rank=3)), ("nora", dict(outer_rank=8, inner_rank=2))]:
        adapter = lz.wrap_linear(copy.deepcopy(linear), method, **options)
        adapter.eval()
        torch.testing.assert_close(adapter(x), expected, atol=1e-5, rtol=1e-5)
    stats = LayerStats(torch.rand(20) + 0.1, torch.rand(20) + 0.1, torch.rand(12) + 0.1, tokens=7)
    adapter = lz.wrap_linear(copy.deepcopy(linear), "aira", stats=stats, rank=3)
    torch.testing.assert_close(adapter(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs calibration stats"):
        lz.wrap_linear(copy.deepcopy(linear), "aira", rank=3)


def test_calibration_statistics_match_a_manual_computation(images, texts):
    model = lz.split_attention(tiny_clip())
    captured = {}

    def capture(key):
        def hook(module, inputs, output):
            captured[key] = (inputs[0].clone(), output.clone())
        return hook

    handles = [model.visual.transformer.resblocks[1].attn.k.register_forward_hook(capture("vision")),
               model.transformer.resblocks[0].attn.v.register_forward_hook(capture("text"))]
    encode(model, images, texts)
    for h in handles:
        h.remove()
    stats = lz.collect_activation_stats(model, [images[:2], images[2:]], [texts], targets=("q", "k", "v"))
    assert len(stats) == 12
    x, z = captured["vision"]
    got = stats["visual.transformer.resblocks.1.attn.k"]
    torch.testing.assert_close(got.first_token_output_l2, z[:, 0].norm(dim=-1).mean())  # CLS output norm
    x, z = x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])
    assert got.tokens == x.shape[0] == 3 * 17
    torch.testing.assert_close(got.input_abs_mean, x.abs().mean(0))
    torch.testing.assert_close(got.input_l2, x.norm(dim=0))
    torch.testing.assert_close(got.output_abs_mean, z.abs().mean(0))
    # the authors' calibration keeps the padding positions
    padded = lz.collect_activation_stats(model, None, [texts], include_padding=True)["transformer.resblocks.0.attn.v"]
    x, z = captured["text"]
    assert padded.tokens == texts.numel() == 4 * 32
    torch.testing.assert_close(padded.input_abs_mean, x.reshape(-1, x.shape[-1]).abs().mean(0))
    torch.testing.assert_close(padded.output_abs_mean, z.reshape(-1, z.shape[-1]).abs().mean(0))
    x, z = captured["text"]
    valid = (texts != 0).reshape(-1)  # padding (token id 0) is excluded
    x, z = x.reshape(-1, x.shape[-1])[valid], z.reshape(-1, z.shape[-1])[valid]
    got = stats["transformer.resblocks.0.attn.v"]
    assert got.tokens == int((texts != 0).sum()) == 5 + 9 + 14 + 20
    torch.testing.assert_close(got.input_abs_mean, x.abs().mean(0))
    torch.testing.assert_close(got.input_l2, x.norm(dim=0))
    torch.testing.assert_close(got.output_abs_mean, z.abs().mean(0))


def test_nora_sigma_init_and_collapsed_forward():
    torch.manual_seed(0)
    linear = nn.Linear(40, 30)
    weight = linear.weight.detach().clone()
    sigma = torch.linalg.svdvals(weight)
    adapter = lz.wrap_linear(linear, "nora", outer_rank=0.5, inner_rank=4)
    assert adapter.outer_rank == 15 and lz.count_trainable(adapter) == 2 * 15 * 4
    inner = adapter.lora_inner_B @ adapter.lora_inner_A
    expected = torch.zeros(15, 15)
    expected[range(4), range(4)] = sigma[:4]
    torch.testing.assert_close(inner, expected, atol=1e-5, rtol=1e-5)
    # ΔW(θ₀) is the best rank-4 approximation of W, and W_frozen = W − ΔW(θ₀)
    u, s, vt = torch.linalg.svd(weight)
    top4 = u[:, :4] @ torch.diag(s[:4]) @ vt[:4]
    torch.testing.assert_close(adapter.initial_delta_weight(), top4, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter.base_layer.weight, weight - top4, atol=1e-5, rtol=1e-4)
    # the collapsed forward equals x (W_frozen + ΔW)ᵀ + b after the inner factors move
    with torch.no_grad():
        adapter.lora_inner_B.add_(0.1 * torch.randn_like(adapter.lora_inner_B))
    x = torch.randn(5, 40)
    dense = x @ (adapter.base_layer.weight + adapter.delta_weight()).t() + adapter.base_layer.bias
    torch.testing.assert_close(adapter(x), dense, atol=1e-5, rtol=1e-5)
    # without the residual the init perturbs the layer by exactly that top-4 part
    plain = lz.wrap_linear(nn.Linear(40, 30).requires_grad_(False), "nora", outer_rank=15, inner_rank=4, residual=False)
    assert not plain.has_residual


def test_nora_outer_rank_int_or_ratio_and_errors():
    linear = nn.Linear(50, 20)
    assert lz.wrap_linear(copy.deepcopy(linear), "nora", outer_rank=0.8).outer_rank == 16
    assert lz.wrap_linear(copy.deepcopy(linear), "nora", outer_rank=18).outer_rank == 18
    with pytest.raises(ValueError, match=r"nora outer_rank 21 exceeds min\(d_in, d_out\) = 20 of a 20×50"):
        lz.wrap_linear(copy.deepcopy(linear), "nora", outer_rank=21)
    with pytest.raises(ValueError, match="inner_rank 16 exceeds outer_rank 10"):
        lz.wrap_linear(copy.deepcopy(linear), "nora", outer_rank=10)
    with pytest.raises(ValueError, match="inner_init must be one of"):
        lz.wrap_linear(copy.deepcopy(linear), "nora", inner_init="zeros")


def planted_outlier_layer():
    """A layer whose inputs have a few channels ~30× larger than the rest, and calibration data for it."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 48, generator=g) / 7)
    x = torch.randn(512, 48, generator=g)
    x[:, [3, 17, 40]] *= 30.0
    z = linear(x).detach()
    stats = LayerStats(x.abs().mean(0), x.norm(dim=0), z.abs().mean(0), tokens=512)
    return linear, x, stats


def test_owsvd_beats_plain_svd_on_weighted_output_error():
    linear, x, stats = planted_outlier_layer()
    weight = linear.weight.detach().clone()
    errors = {}
    for beta in (1.0, 0.0):  # β = 0 is the plain SVD of W
        adapter = lz.wrap_linear(copy.deepcopy(linear), "aira", stats=stats, rank=4, owsvd_beta=beta,
                                 act_scale=False, rank_alloc=False)
        approx = adapter.initial_delta_weight()
        errors[beta] = (x @ (weight - approx).t()).norm().item()
    plain = torch.linalg.svd(weight)
    best_weight_approx = plain.U[:, :4] @ torch.diag(plain.S[:4]) @ plain.Vh[:4]
    torch.testing.assert_close((x @ (weight - best_weight_approx).t()).norm().item(), errors[0.0], rtol=1e-4, atol=0)
    assert errors[1.0] < 0.8 * errors[0.0], errors


def test_aira_activation_scale_calibrated_and_batch():
    linear, x, stats = planted_outlier_layer()
    adapter = lz.wrap_linear(copy.deepcopy(linear), "aira", stats=stats, rank=4)
    scale = adapter.lora_output_scale
    torch.testing.assert_close(scale.mean(), torch.tensor(1.0))
    torch.testing.assert_close(scale, stats.output_abs_mean / stats.output_abs_mean.mean())
    torch.testing.assert_close(adapter(x[:4]), linear(x[:4]), atol=1e-4, rtol=1e-4)  # residual
    # predictions do not depend on which inputs share the batch
    torch.testing.assert_close(adapter(x[:4]), adapter(x[:8])[:4])
    per_batch = lz.wrap_linear(copy.deepcopy(linear), "aira", stats=stats, rank=4, act_scale="batch")
    assert not torch.allclose(per_batch(x[:4]), per_batch(x[:64])[:4])
    with pytest.raises(RuntimeError, match="not mergeable"):
        per_batch.merge()


def test_outlier_score_matches_definition():
    weight = torch.tensor([[1.0, 0.1], [0.2, 0.1]])
    norms = torch.tensor([10.0, 1.0])
    # |W|·n = [[10, .1], [2, .1]], mean 3.05; above 1 × mean: one entry of four
    assert outlier_score(weight, norms, threshold=1.0) == 0.25
    assert outlier_score(weight, norms, threshold=5.0) == 0.0


def test_rank_allocation_monotone_bounded_within_budget_and_deterministic():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(24, generator=g).tolist()
    costs = [128] * 12 + [96] * 12
    budget = 8 * sum(costs)
    ranks = allocate_ranks(scores, costs, budget, r_min=2, r_max=32)
    assert ranks == allocate_ranks(scores, costs, budget, r_min=2, r_max=32)
    assert all(2 <= r <= 32 for r in ranks)
    spent = sum(f * r for f, r in zip(costs, ranks))
    assert spent <= budget and budget - spent < min(costs)  # nothing left that one more rank would fit
    for group in (range(12), range(12, 24)):  # equal costs: a higher score never gets a lower rank
        for i in group:
            for j in group:
                if scores[i] > scores[j]:
                    assert ranks[i] >= ranks[j]
    # interior layers follow the water-filling law r ∝ LOD / f (up to integer rounding)
    lam = [scores[i] / (costs[i] * ranks[i]) for i in range(24) if 2 < ranks[i] < 32]
    assert max(lam) / min(lam) < 1.6


def test_rank_allocation_edges():
    assert allocate_ranks([0.1, 0.2], [10, 10], budget=1000, r_min=1, r_max=8) == [8, 8]
    assert allocate_ranks([0.0, 0.0], [10, 10], budget=100, r_min=1, r_max=8, uniform_rank=4) == [4, 4]
    assert allocate_ranks([0.0, 0.3], [10, 10], budget=60, r_min=1, r_max=8) == [1, 5]
    with pytest.raises(ValueError, match="below the minimum"):
        allocate_ranks([0.1, 0.2], [10, 10], budget=30, r_min=2, r_max=8)


@pytest.mark.parametrize("method, options, what", [
    ("nora", dict(outer_rank=21), "outer_rank"),
    ("pissa", dict(rank=21), "rank"),
    ("adalora", dict(init_rank=21), "init_rank"),
    ("aira", dict(rank=21, rank_alloc=False, act_scale=False), "rank"),
])
def test_a_rank_above_the_layer_size_is_refused_alike(method, options, what):
    stats = LayerStats(torch.ones(50), torch.ones(50), torch.ones(20), tokens=4)
    with pytest.raises(ValueError) as err:
        lz.wrap_linear(nn.Linear(50, 20), method, stats=stats, **options)
    assert str(err.value) == f"{method} {what} 21 exceeds min(d_in, d_out) = 20 of a 20×50 (d_out×d_in) layer"
    at_the_limit = lz.wrap_linear(nn.Linear(50, 20), method, stats=stats, **{**options, what: 20})
    assert at_the_limit(torch.ones(3, 50)).shape == (3, 20)


def test_aira_allocation_never_exceeds_a_layer_s_size():
    torch.manual_seed(0)
    linears = {"wide": nn.Linear(48, 32), "narrow": nn.Linear(6, 40)}
    stats = {name: LayerStats(torch.rand(l.in_features) + 0.5, torch.rand(l.in_features) + 0.5,
                              torch.rand(l.out_features) + 0.5, tokens=4) for name, l in linears.items()}
    config = lz.build_config("aira", rank=8, rank_min=8, rank_max=16, act_scale=False)
    plan = AiraLinear.plan_layers(linears, stats, config)
    assert plan["narrow"] == {"rank": 6}  # the allocation's 8 or more, clipped to min(d_in, d_out)
    assert 8 <= plan["wide"]["rank"] <= 16
    adapter = lz.wrap_linear(linears["narrow"], "aira", stats=stats["narrow"], act_scale=False, rank_alloc=False,
                             **plan["narrow"])
    assert adapter.lora_A.shape == (6, 6) and adapter.lora_B.shape == (40, 6)


def test_fan_uniform_draws_what_kaiming_uniform_draws():
    """Bit for bit: ``nn.init.kaiming_uniform_`` with a=√5 (nn.Linear's, bound 1/√fan) and a=0 (√(6/fan))."""
    for shape, scale, a in [((8, 768), 1.0, math.sqrt(5)), ((24, 512), 1.0, math.sqrt(5)),
                            ((256, 48), math.sqrt(6), 0.0), ((7, 3), math.sqrt(6), 0.0)]:
        expected = torch.empty(shape)
        nn.init.kaiming_uniform_(expected, a=a, generator=torch.Generator().manual_seed(1))
        drawn = fan_uniform(shape, shape[1], scale, generator=torch.Generator().manual_seed(1))
        assert torch.equal(drawn, expected)
        bound = scale / math.sqrt(shape[1])
        assert drawn.abs().max() <= bound and drawn.abs().max() > 0.9 * bound
    torch.manual_seed(2)  # without a generator: torch's default one, as nn.Linear's init
    expected = nn.Linear(40, 6).weight.detach()
    torch.manual_seed(2)
    assert torch.equal(fan_uniform((6, 40), 40), expected)


def test_load_rejects_missing_or_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        lz.load_adapters(tiny_clip(), tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="no adapters"):
        lz.save_adapters(tiny_clip(), tmp_path / "a.safetensors")


def test_ci_runs_exactly_the_readme_commands():
    """README's two commands are the whole set-up (the second installs the test requirements, then tests), and
    .ci/run is those two lines in a fresh environment: nothing CI installs that README does not."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(readme) == 2 and "main_nora.py --demo" in readme[0]
    assert readme[0].startswith("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && ")
    assert readme[1] == ".venv/bin/pip install -r tests/requirements.txt && .venv/bin/python -m pytest -q"
    setup = {"#!/usr/bin/env bash", "set -euo pipefail", 'cd "$(dirname "$0")/.."', "rm -rf .venv"}
    ci = [line for line in (root / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert [line for line in ci if line not in setup] == readme
    assert ci[:len(ci) - 2] == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "rm -rf .venv"]
