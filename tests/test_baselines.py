"""The defining property of each baseline method (LoRA+, LoRA-FA, VeRA, AdaLoRA, DyLoRA, DoRA, PiSSA),
with numbers, plus a few iterations of each through ``main.py`` on synthetic data.

The shared behaviour (unchanged output at init, merge/unmerge, only adapter tensors train, save/load,
parameter counts) is in ``test_methods.py``.
"""
import json

import pytest
import torch
from torch import nn

import lora_zoo as lz
from conftest import FixedDropout, tiny_clip
from lora_zoo import adalora, vera


def adapted(method, **options):
    model = tiny_clip()
    torch.manual_seed(0)  # adapters' random init
    lz.apply_adapters(model, method, **options)
    return model


def clip_loss(model, images, texts):
    img, txt = model.encode_image(images), model.encode_text(texts)
    return (img @ txt.t()).pow(2).mean() + img.pow(2).mean()


def run_loop(model, images, texts, steps, lr=1e-2, watch=None):
    """The training loop's hook contract (train.py), on the fixture inputs; returns the hooks.
    ``watch(step)`` is called at the end of every step."""
    optimizer = torch.optim.AdamW(lz.param_groups(model, lr, 0.0))
    hooks = lz.training_hooks(model, steps)
    model.train()
    for step in range(steps):
        hooks.before_forward(step)
        loss = clip_loss(model, images, texts) + hooks.regularizer()
        optimizer.zero_grad()
        loss.backward()
        hooks.after_backward(step)
        optimizer.step()
        hooks.after_step(step)
        if watch is not None:
            watch(step)
    hooks.finish()
    model.eval()
    return hooks


# ---- LoRA+ ------------------------------------------------------------------------------------
def test_loraplus_groups_carry_the_lr_ratio():
    model = adapted("loraplus", rank=2)
    groups = lz.param_groups(model, lr=1e-3, weight_decay=0.01, lr_ratio=16.0)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"down (A)", "up (B)"}
    assert by_name["down (A)"]["lr"] == pytest.approx(1e-3) and by_name["up (B)"]["lr"] == pytest.approx(16e-3)
    assert all(g["weight_decay"] == 0.01 for g in groups)
    named = lz.named_trainable_parameters(model)
    for name, group in (("lora_A", "down (A)"), ("lora_B", "up (B)")):
        expected = {id(p) for n, p in named.items() if n.endswith(name)}
        assert {id(p) for p in by_name[group]["params"]} == expected and len(expected) == 12
    # the ratio survives the shared loop's cosine schedule
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=0.0)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["up (B)"] / lrs["down (A)"] == pytest.approx(16.0)


@pytest.mark.parametrize("method, fast, slow", [
    ("pissa", {"lora_B"}, {"lora_A"}),
    ("dora", {"lora_B", "lora_magnitude"}, {"lora_A"}),    # 1-D tensors join B, as in peft's builder
    ("nora", {"lora_inner_B"}, {"lora_inner_A"}),
])
def test_loraplus_optimizer_works_with_any_method(method, fast, slow, images, texts):
    options = {"nora": dict(outer_rank=0.5, inner_rank=4)}.get(method, dict(rank=2))
    model = adapted(method, **options)
    optimizer = lz.build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), optimizer="loraplus", lr_ratio=8.0)
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    by_lr = {round(g["lr"], 9): {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert by_lr == {8e-3: fast, 1e-3: slow}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(lz.trainable_parameters(model))


# ---- LoRA-FA ----------------------------------------------------------------------------------
def test_lorafa_a_never_changes(images, texts, tmp_path):
    model = adapted("lorafa", rank=2)
    adapters = lz.adapter_modules(model)
    a_before = {n: a.lora_A.detach().clone() for n, a in adapters.items()}
    b_before = {n: a.lora_B.detach().clone() for n, a in adapters.items()}
    run_loop(model, images, texts, steps=3)  # its optimizer builder freezes A
    assert all(not a.lora_A.requires_grad for a in adapters.values())
    assert lz.count_trainable(model) == 12 * 2 * 64
    for n, a in adapters.items():
        assert torch.equal(a.lora_A, a_before[n])
        assert a.lora_A.grad is None
        assert not torch.equal(a.lora_B, b_before[n])
    lz.save_adapters(model, tmp_path / "fa.safetensors")  # A is saved, so a loaded model has the same A
    fresh = tiny_clip()
    lz.load_adapters(fresh, tmp_path / "fa.safetensors")
    for n, a in lz.adapter_modules(fresh).items():
        assert torch.equal(a.lora_A, a_before[n])


def test_lorafa_optimizer_freezes_the_input_side_of_any_method():
    model = adapted("nora", outer_rank=0.5, inner_rank=4)
    lz.build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), optimizer="lorafa")
    trainable = {n.rsplit(".", 1)[-1] for n in lz.named_trainable_parameters(model)}
    assert trainable == {"lora_inner_B"}


@pytest.mark.parametrize("structure", ["nested_full", "output_full"])
def test_lorafa_refuses_layers_without_an_input_side(structure):
    """NoRA's full structures train one matrix on the output side: LoRA-FA would freeze nothing."""
    model = adapted("nora", variant="authors", inner_structure=structure, act_weighted=False, outer_rank=16)
    before = lz.count_trainable(model)
    with pytest.raises(ValueError, match=r"optimizer lorafa freezes input-side tensors, but \S+ \(nora\) has "
                                         "none") as err:
        lz.build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), optimizer="lorafa")
    assert "\n" not in str(err.value)
    assert lz.count_trainable(model) == before > 0  # nothing was frozen on the way


# ---- VeRA -------------------------------------------------------------------------------------
def test_vera_matrices_are_shared_and_regenerate_from_the_seed():
    model = adapted("vera", rank=16, projection_seed=7)
    adapters = list(lz.adapter_modules(model).values())
    first = adapters[0]
    for a in adapters:
        assert a.lora_vera_A is first.lora_vera_A and a.lora_vera_B is first.lora_vera_B
        down, up = a.projections()
        assert down.untyped_storage().data_ptr() == first.lora_vera_A.untyped_storage().data_ptr()
        assert up.untyped_storage().data_ptr() == first.lora_vera_B.untyped_storage().data_ptr()
    assert first.lora_vera_A.shape == (16, 64) and first.lora_vera_B.shape == (64, 16)
    saved = lz.adapter_state_dict(model)
    assert not any("vera_A" in n or "vera_B" in n for n in saved)  # not stored per layer
    assert len(saved) == 2 * len(adapters)  # only d and b
    # a dtype/device move keeps one tensor for the model
    model.to(torch.float64)
    assert all(a.lora_vera_A is first.lora_vera_A for a in adapters)
    assert first.lora_vera_A.dtype == torch.float64
    down_values = first.lora_vera_A.float().clone()
    # regenerated from the seed: same values, new tensor
    vera._SHARED.clear()
    again = list(lz.adapter_modules(adapted("vera", rank=16, projection_seed=7)).values())[0]
    assert again.lora_vera_A is not first.lora_vera_A
    torch.testing.assert_close(again.lora_vera_A, down_values, rtol=0, atol=0)
    for matrix, fan_in in ((again.lora_vera_A, 64), (again.lora_vera_B, 16)):  # A: 64 columns, B: r = 16
        bound = (6 / fan_in) ** 0.5  # Kaiming-uniform with gain √2, as peft draws them
        assert 0.95 * bound < matrix.abs().max() <= bound
    other = list(lz.adapter_modules(adapted("vera", rank=16, projection_seed=8)).values())[0]
    assert not torch.equal(other.lora_vera_A, again.lora_vera_A)


def test_vera_slices_the_largest_pair_per_layer():
    torch.manual_seed(0)
    linears = {"wide_in": nn.Linear(48, 20), "wide_out": nn.Linear(16, 40)}
    config = lz.build_config("vera", rank=8, d_init=0.1)
    plan = vera.VeraLinear.plan_layers(linears, None, config)
    assert plan["wide_in"] == {"max_in_features": 48, "max_out_features": 40} == plan["wide_out"]
    layers = {n: lz.wrap_linear(l, "vera", rank=8, **plan[n]) for n, l in linears.items()}
    shared_a, shared_b = layers["wide_in"].lora_vera_A, layers["wide_in"].lora_vera_B
    assert shared_a.shape == (8, 48) and shared_b.shape == (40, 8) and layers["wide_out"].lora_vera_A is shared_a
    x = torch.randn(5, 16)
    layer = layers["wide_out"]
    with torch.no_grad():
        layer.lora_lambda_b.copy_(torch.linspace(-1, 1, 40))
        layer.lora_lambda_d.copy_(torch.linspace(0.5, 2, 8))
        expected_delta = torch.diag(layer.lora_lambda_b) @ shared_b[:40] @ torch.diag(layer.lora_lambda_d) @ shared_a[:, :16]
        torch.testing.assert_close(layer.delta_weight(), expected_delta)
        torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + expected_delta).t() + layer.base_layer.bias)
        assert layer.num_trainable() == 8 + 40


# ---- AdaLoRA ----------------------------------------------------------------------------------
def test_adalora_budget_schedule_numbers():
    budget = lambda t: adalora.budget_schedule(t, 100, initial=72, target=48, t_init=0.1, t_final=0.3)
    assert [budget(t) for t in (0, 5, 10)] == [72, 72, 72]
    assert budget(40) == 48 + int(24 * 0.5 ** 3) == 51  # halfway through the cubic phase
    assert budget(25) == int(48 + 24 * 0.75 ** 3) == 58
    assert [budget(t) for t in (70, 85, 100)] == [48, 48, 48]
    values = [budget(t) for t in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never increases


def test_adalora_decides_on_the_grid_at_step_t_then_freezes_the_final_pattern(images, texts, tmp_path):
    steps = 20  # t_i = round(0.1·20) = 2, t_F = 20 − round(0.25·20) = 15
    model = adapted("adalora", init_rank=6, target_rank=3, t_init=0.1, t_final=0.25, delta_t=2)
    layers = lz.adapter_modules(model)
    regrown = {}

    def watch(step):  # largest |λ| among the triplets the last decision pruned
        regrown[step] = max(a.lora_lambda[a.lora_rank_mask == 0].abs().max().item() if a.rank < 6 else 0.0
                            for a in layers.values())

    allocator = run_loop(model, images, texts, steps, lr=5e-3, watch=watch)
    grid = [4, 6, 8, 10, 12, 14]  # t_i < t < t_F and t % delta_t == 0, budget at t (peft's step index)
    assert allocator.decisions == [(t, allocator.budget(t)) for t in grid] + [(15, 36)]
    assert [b for _, b in allocator.decisions] == [57, 47, 41, 38, 36, 36, 36]  # int(36 + 36·(1 − (t − 2)/13)³)
    budget_after = {t: b for t, b in allocator.decisions}
    expected, current = [], 72
    for t in range(steps):
        current = budget_after.get(t, current)
        expected.append(current)
    assert allocator.rank_history == expected
    assert regrown[4] == 0 and regrown[5] > 1e-4  # pruned λ stay trainable between decisions (as in peft)
    assert all(regrown[t] == 0 for t in range(15, steps))  # frozen pattern: zeroed after every step
    ranks = allocator.summary()["adalora_final_ranks"]
    assert sum(ranks.values()) == 3 * len(layers) and allocator.summary()["adalora_total_rank"] == 36
    assert len(set(ranks.values())) > 1  # the budget is not spread uniformly
    for name, a in layers.items():
        assert ranks[name] == int(a.lora_rank_mask.sum())
        assert torch.all(a.lora_lambda[a.lora_rank_mask == 0] == 0)
    # the mask and the zeroed λ are saved: a loaded model evaluates with the same pruned triplets
    expected_features = model.encode_image(images).detach()
    lz.save_adapters(model, tmp_path / "ada.safetensors")
    fresh = tiny_clip()
    lz.load_adapters(fresh, tmp_path / "ada.safetensors")
    for name, a in lz.adapter_modules(fresh).items():
        assert torch.equal(a.lora_rank_mask, layers[name].lora_rank_mask)
    torch.testing.assert_close(fresh.encode_image(images), expected_features, atol=1e-5, rtol=1e-5)


def adalora_allocator(layers, total_steps=10, **schedule):
    model = nn.Sequential(*layers)
    return adalora.RankAllocator(model, total_steps, options=adalora.AdaLoraSchedule(**schedule))


@pytest.mark.parametrize("form, value, p_grad", [
    ("official", 0.1 * (6 + 0) / 2, 0.1 / 2),  # γ · mean(||3I||_F, 0) over the 2 matrices; d/dP = γ/2 · P
    ("paper", 0.1 * (36 + 0), 0.1 * 12),       # γ · (||3I||²_F + 0);                     d/dP = 12γ · P
])
def test_adalora_orthogonality_regulariser(form, value, p_grad):
    layer = lz.wrap_linear(nn.Linear(12, 10), "adalora", init_rank=4)
    allocator = adalora_allocator([layer], target_rank=2, orth_reg=0.1, orth_reg_form=form)
    with torch.no_grad():  # orthonormal P columns and Q rows: zero penalty
        layer.lora_P.copy_(torch.linalg.qr(torch.randn(10, 4))[0])
        layer.lora_Q.copy_(torch.linalg.qr(torch.randn(12, 4))[0].t())
    assert allocator.regularizer().item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        layer.lora_P.mul_(2.0)  # PᵀP = 4I: PᵀP − I = 3I, ||3I||_F = 6 (r = 4)
    penalty = allocator.regularizer()
    assert penalty.item() == pytest.approx(value, rel=1e-5)
    penalty.backward()
    torch.testing.assert_close(layer.lora_P.grad, p_grad * layer.lora_P.detach(), atol=1e-5, rtol=1e-4)
    assert adalora_allocator([layer], target_rank=2, orth_reg=0.0).regularizer() == 0.0


def test_adalora_importance_uses_the_stepped_weights_and_skips_non_finite_gradients():
    layer = lz.wrap_linear(nn.Linear(12, 10), "adalora", init_rank=4)
    allocator = adalora_allocator([layer], total_steps=10, target_rank=2)
    for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q):
        p.grad = torch.ones_like(p)
    with torch.no_grad():  # θ after the optimizer step: after_step sees these values
        layer.lora_lambda.copy_(torch.tensor([1.0, 0.0, 2.0, 0.5]))
    allocator.after_step(0)
    # one update from zero: Ī = 0.15 |θ·g|, Ū = 0.15 · 0.85 |θ·g|, s = Ī·Ū
    s = lambda value: 0.15 * 0.15 * 0.85 * value ** 2
    lam = s(torch.tensor([1.0, 0.0, 2.0, 0.5]))
    p_part = s(layer.lora_P.detach().abs()).mean(dim=0)
    q_part = s(layer.lora_Q.detach().abs()).mean(dim=1)
    torch.testing.assert_close(allocator.triplet_scores("0"), lam + p_part + q_part)
    before = {k: v.clone() for k, v in allocator.smoothed.items()}
    layer.lora_Q.grad[0, 0] = float("nan")
    layer.lora_lambda.grad[1] = float("inf")
    allocator.after_step(1)  # not a finite step: the averages keep their values
    assert all(torch.equal(allocator.smoothed[k], v) for k, v in before.items())
    assert allocator.summary()["adalora_skipped_importance_steps"] == 1
    torch.testing.assert_close(allocator.triplet_scores("0"), lam + p_part + q_part)


def test_adalora_allocation_is_recomputed_each_time_and_prunes_ties():
    layers = [lz.wrap_linear(nn.Linear(8, 8), "adalora", init_rank=3) for _ in range(2)]
    allocator = adalora_allocator(layers, target_rank=1)

    def set_scores(first, second):  # s(λ) = Ī·Ū with Ū = 1; P and Q contribute nothing
        for name, values in (("0", first), ("1", second)):
            allocator.smoothed[(name, "lora_lambda")] = torch.tensor(values)
            allocator.uncertainty[(name, "lora_lambda")] = torch.ones(3)

    for layer in layers:
        layer.lora_lambda.data.fill_(1.0)
    set_scores([0.5, 0.1, 0.3], [0.2, 0.6, 0.4])
    allocator.allocate(3, 4)  # threshold: 2nd smallest score 0.2
    assert [a.lora_rank_mask.tolist() for a in layers] == [[1, 0, 1], [0, 1, 1]]
    assert [a.lora_lambda.tolist() for a in layers] == [[1, 0, 1], [0, 1, 1]]
    set_scores([0.1, 0.9, 0.3], [0.8, 0.2, 0.4])  # triplet 0.1 comes back, 0.0 goes
    allocator.allocate(6, 3)
    assert [a.lora_rank_mask.tolist() for a in layers] == [[0, 1, 0], [1, 0, 1]]
    assert allocator.decisions == [(3, 4), (6, 3)] and allocator.total_rank() == 3
    set_scores([0.5, 0.2, 0.2], [0.2, 0.6, 0.4])  # three tied at the threshold 0.2: all pruned (peft's rule)
    allocator.allocate(9, 4)
    assert [a.lora_rank_mask.tolist() for a in layers] == [[1, 0, 0], [0, 1, 1]]


# ---- DyLoRA -----------------------------------------------------------------------------------
def test_dylora_trains_varying_ranks_and_evaluates_at_full_rank(images, texts):
    model = adapted("dylora", rank=4, alpha=4.0, dropout=0.0)
    layers = lz.adapter_modules(model)
    layer = next(iter(layers.values()))
    with torch.no_grad():
        for a in layers.values():
            a.lora_B.normal_()
    sampler = lz.training_hooks(model, total_steps=12, seed=3)  # seeded from the run's seed
    twin = lz.training_hooks(adapted("dylora", rank=4), total_steps=12, seed=3)
    other = lz.training_hooks(adapted("dylora", rank=4), total_steps=12, seed=4)
    model.train()
    x = torch.randn(3, 64)
    for step in range(12):
        sampler.before_forward(step)
        twin.before_forward(step)
        b = sampler.sampled[-1]
        assert all(a.active_rank == b for a in layers.values())
        expected = (4.0 / b) * (x @ layer.lora_A[:b].t()) @ layer.lora_B[:, :b].t()
        torch.testing.assert_close(layer.adapter_output(x, None), expected)
        model.zero_grad()
        layer.adapter_output(x, None).pow(2).sum().backward()
        assert torch.all(layer.lora_A.grad[b:] == 0) and torch.all(layer.lora_B.grad[:, b:] == 0)
        assert layer.lora_A.grad[:b].abs().sum() > 0
    for step in range(12):
        other.before_forward(step)
    assert sampler.sampled == twin.sampled  # seeded: the same sequence again
    assert sampler.sampled != other.sampled  # another run seed, another sequence
    assert set(sampler.sampled) == {1, 2, 3, 4}
    sampler.finish()
    assert all(a.active_rank is None for a in layers.values())
    model.eval()
    full = (x @ layer.lora_A.t()) @ layer.lora_B.t()  # scale α/r = 1
    torch.testing.assert_close(layer.adapter_output(x, None), full)
    torch.testing.assert_close(layer.delta_weight(), layer.lora_B @ layer.lora_A)
    summary = sampler.summary()
    assert summary["dylora_eval_rank"] == 4 and sum(summary["dylora_sampled_rank_counts"].values()) == 12
    # a chosen evaluation rank
    small = lz.wrap_linear(nn.Linear(64, 64), "dylora", rank=4, alpha=4.0, eval_rank=2).eval()
    with torch.no_grad():
        small.lora_B.normal_()
    torch.testing.assert_close(small.delta_weight(), 2.0 * small.lora_B[:, :2] @ small.lora_A[:2])


def test_dylora_training_loop_records_varying_ranks(images, texts):
    model = adapted("dylora", rank=4, alpha=4.0)
    sampler = run_loop(model, images, texts, steps=8)
    assert len(set(sampler.sampled)) > 1 and len(sampler.sampled) == 8
    assert all(a.active_rank is None and not a.training for a in lz.adapter_modules(model).values())


# ---- DoRA -------------------------------------------------------------------------------------
def test_dora_merged_rows_have_the_magnitude_norms():
    torch.manual_seed(0)
    layer = lz.wrap_linear(nn.Linear(24, 16), "dora", rank=3, alpha=3.0, dropout=0.0)
    torch.testing.assert_close(layer.lora_magnitude, layer.base_layer.weight.norm(dim=1))
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude.mul_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(7, 24)
    original = layer.base_layer.weight.clone()
    unmerged = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight.norm(dim=1), layer.lora_magnitude.detach())
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.original_weight(), original, rtol=0, atol=1e-6)
    merged_delta = layer.lora_merged_delta.clone()  # the ΔW merged: unmerge takes out this one, not a recomputed one
    torch.testing.assert_close(layer.base_layer.weight, original + merged_delta, rtol=0, atol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)  # one rounding of W + ΔW − ΔW
    assert layer.lora_merged_delta is None


def test_dora_norm_is_constant_in_backward():
    torch.manual_seed(1)
    layer = lz.wrap_linear(nn.Linear(10, 6), "dora", rank=2, alpha=2.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    x = torch.randn(4, 10)
    layer(x).pow(2).sum().backward()
    got = [layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), layer.lora_magnitude.grad.clone()]

    def reference(detach):
        a, b, m = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
        combined = layer.base_layer.weight + layer.scale * b @ a
        norm = combined.norm(dim=1)
        norm = norm.detach() if detach else norm
        (x @ ((m / norm)[:, None] * combined).t() + layer.base_layer.bias).pow(2).sum().backward()
        return [a.grad, b.grad, m.grad]

    for mine, ref in zip(got, reference(detach=True)):
        torch.testing.assert_close(mine, ref)
    assert not torch.allclose(got[1], reference(detach=False)[1], atol=1e-4)


def test_dora_dropout_reaches_the_magnitude_term():
    torch.manual_seed(3)
    layer = lz.wrap_linear(nn.Linear(10, 6), "dora", rank=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        layer.lora_magnitude.mul_(torch.linspace(0.5, 1.5, 6))
    x = torch.randn(4, 10)
    mask = (torch.rand(4, 10) > 0.5).float() / 0.5
    layer.dropout = FixedDropout(mask)
    w, bias, a, b = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.detach(), layer.lora_B.detach()
    g = layer.lora_magnitude.detach() / (w + layer.scale * b @ a).norm(dim=1)
    dropped = x * mask
    # the DoRA authors' (and peft's) formula: x̃ in both adapter terms, the bias once and unscaled
    expected = x @ w.t() + bias + (g - 1) * (dropped @ w.t()) + g * layer.scale * (dropped @ a.t() @ b.t())
    layer.train()
    torch.testing.assert_close(layer(x), expected)
    assert (layer(x) - (g * (x @ w.t()) + bias + g * layer.scale * (dropped @ a.t() @ b.t()))).abs().max() > 0.1
    layer.eval()  # no dropout: g ⊙ (xWᵀ + s·xAᵀBᵀ) + bias, the merged layer's output
    torch.testing.assert_close(layer(x), g * (x @ w.t() + layer.scale * x @ a.t() @ b.t()) + bias)


# ---- PiSSA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [None, 1.0])
def test_pissa_adapter_is_the_top_singular_part(alpha):
    torch.manual_seed(2)
    linear = nn.Linear(20, 12)
    weight = linear.weight.detach().clone()
    layer = lz.wrap_linear(linear, "pissa", rank=3, alpha=alpha)
    u, s, vt = torch.linalg.svd(weight, full_matrices=False)
    top = u[:, :3] @ torch.diag(s[:3]) @ vt[:3]
    product = layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer.scale * product, top, atol=1e-5, rtol=1e-5)
    if alpha is None:
        assert layer.scale == 1.0
        torch.testing.assert_close(product, top, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, weight - top, atol=1e-5, rtol=1e-5)  # residual frozen
    # B = U_r Σ_r^{1/2} (up to the sign of each singular pair), and A = Σ_r^{1/2} V_rᵀ
    torch.testing.assert_close(layer.lora_B.norm(dim=0), (s[:3] / layer.scale).sqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A.norm(dim=1), (s[:3] / layer.scale).sqrt(), atol=1e-5, rtol=1e-5)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


# ---- decay toward the initial value (any residual-initialised method) ---------------------------
def residual_layer(method, **options):
    torch.manual_seed(5)
    layer = lz.wrap_linear(nn.Linear(32, 24), method, **options)
    model = nn.Sequential(layer)
    model.lora_zoo_setup = lz.inject.AdapterSetup(method, method, layer.config.to_dict(), (), (), None)
    return model, layer


RESIDUAL = {"nora": dict(outer_rank=0.5, inner_rank=4), "pissa": dict(rank=4)}


@pytest.mark.parametrize("method", sorted(RESIDUAL))
def test_decay_to_init_keeps_theta0_with_no_task_gradient(method):
    lr, wd, steps = 1e-2, 0.1, 50
    runs = {}
    for decay_to_init in (False, True):
        model, layer = residual_layer(method, **RESIDUAL[method])
        optimizer = lz.build_optimizer(model, lr, weight_decay=wd, betas=(0.9, 0.999), decay_to_init=decay_to_init)
        for _ in range(steps):
            for p in lz.trainable_parameters(model):
                p.grad = torch.zeros_like(p)  # zero task gradient: only the decay acts
            optimizer.step()
        runs[decay_to_init] = layer
    for layer in runs.values():
        assert layer.has_residual
    plain, anchored = runs[False], runs[True]
    for name, tensor in plain.trainable_tensors().items():  # AdamW: θ₀ · (1 − lr·wd)^steps
        torch.testing.assert_close(tensor, getattr(plain, name + "_init") * (1 - lr * wd) ** steps)
    for name, tensor in anchored.trainable_tensors().items():
        assert torch.equal(tensor, getattr(anchored, name + "_init"))
    drift = (plain.delta_weight() - plain.initial_delta_weight()).norm() / plain.original_weight().norm()
    assert drift > 0.01 and torch.equal(anchored.delta_weight(), anchored.initial_delta_weight())


def test_decay_to_init_is_adamw_centred_on_theta0():
    lr, wd, steps = 1e-2, 0.1, 6
    model, layer = residual_layer("nora", **RESIDUAL["nora"])
    optimizer = lz.build_optimizer(model, lr, weight_decay=wd, betas=(0.9, 0.999), decay_to_init=True)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["adapters, decay toward init"]
    assert groups["adapters, decay toward init"]["weight_decay"] == 0.0
    assert groups["adapters, decay toward init"]["decay_to_init"] == wd
    tensors = layer.trainable_tensors()
    offsets = {n: torch.zeros_like(t, requires_grad=True) for n, t in tensors.items()}  # φ = θ − θ₀ under plain AdamW
    reference = torch.optim.AdamW(list(offsets.values()), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for name, tensor in tensors.items():
            tensor.grad = torch.randn(tensor.shape, generator=g)
            offsets[name].grad = tensor.grad.clone()
        optimizer.step()
        reference.step()
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor - getattr(layer, name + "_init"), offsets[name].detach(), atol=1e-6, rtol=1e-5)
        assert offsets[name].abs().max() > 2 * lr  # it moved (each Adam step moves an entry by about lr)


@pytest.mark.parametrize("method, options", [("lora", dict(rank=2)), ("nora", dict(outer_rank=0.5, inner_rank=4,
                                                                                      inner_init="lora", residual=False))])
def test_decay_to_init_changes_nothing_without_a_residual(method, options):
    finals = {}
    for decay_to_init in (False, True):
        model, layer = residual_layer(method, **options)
        assert not layer.has_residual
        optimizer = lz.build_optimizer(model, 1e-2, weight_decay=0.1, betas=(0.9, 0.999), decay_to_init=decay_to_init)
        assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [("adapters", 0.1)]
        assert not optimizer._optimizer_step_pre_hooks
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in lz.trainable_parameters(model):
                p.grad = torch.randn(p.shape, generator=g)
            optimizer.step()
        finals[decay_to_init] = [p.detach().clone() for p in lz.trainable_parameters(model)]
    assert all(torch.equal(a, b) for a, b in zip(finals[False], finals[True]))


def test_train_adapters_passes_decay_to_init(images, texts):
    from lora_zoo.config import TrainConfig
    from lora_zoo.train import train_adapters

    model = adapted("pissa", rank=2)
    loader = [(images, torch.tensor([0, 1, 2]))]
    result = train_adapters(model, loader, texts[:3], TrainConfig(decay_to_init=True, lr=1e-3), iterations=2,
                            device=torch.device("cpu"), progress=False)
    assert [g["name"] for g in result.optimizer_groups] == ["adapters, decay toward init"]


# ---- end to end through main.py ---------------------------------------------------------------
BASELINES = ["loraplus", "lorafa", "vera", "adalora", "dylora", "dora", "pissa"]


def test_every_baseline_is_registered_with_its_metadata():
    assert set(BASELINES) <= set(lz.list_methods())
    for method in BASELINES:
        spec = lz.get_method(method)
        assert spec.display_name and spec.citation and spec.lr > 0


@pytest.mark.parametrize("method", BASELINES)
def test_main_runs_a_few_iterations(method, data_root, tmp_path, capsys):
    import main

    code = main.run(["--method", method, "--root_path", str(data_root), "--dataset", "dtd", "--shots", "1",
                     "--seed", "1", "--backbone", "tiny-vit", "--n_iters", "4", "--batch_size", "3",
                     "--eval_batch_size", "16", "--num_workers", "0", "--device", "cpu",
                     "--output_dir", str(tmp_path), "--quiet"])
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "tiny-vit" / "dtd" / "1shots" / "seed1" / method
    result = json.loads((run / "result.json").read_text())
    assert result["method"] == method and result["iterations"] == 4 and result["merged"] is True
    assert 0.0 <= result["accuracy"] <= 100.0
    options = result["method_config"]
    model = tiny_clip()
    lz.load_adapters(model, run / "adapters.safetensors")
    lz.build_optimizer(model, lr=1.0, weight_decay=0.0, betas=(0.9, 0.999), optimizer=result["optimizer"])  # LoRA-FA's builder freezes A
    assert lz.count_trainable(model) == result["trainable_params"] > 0
    assert result["config"]["train"]["lr"] == lz.get_method(method).lr  # the registered protocol lr
    if method == "adalora":  # the run ends at the target budget and records the final ranks
        ranks = result["hooks_summary"]["adalora_final_ranks"]
        assert len(ranks) == 12 and sum(ranks.values()) == 12 * options["target_rank"]
        assert {n: int(a.lora_rank_mask.sum()) for n, a in lz.adapter_modules(model).items()} == ranks
    if method == "dylora":
        assert sum(result["hooks_summary"]["dylora_sampled_rank_counts"].values()) == 4
