"""Every method that peft implements, compared numerically with peft on identical weights.

LoRA, rsLoRA, DoRA (with and without dropout, train and eval), PiSSA, VeRA,
AdaLoRA (forward, regulariser, decisions over a schedule, a short training run),
the LoRA+ parameter groups and LoRA-FA's frozen A. Both sides get the same
trainable tensors (peft's are copied into ours) and, where there is dropout, the
same fixed mask, so any difference is a difference in what is computed.

peft is a test-only requirement (``tests/requirements.txt``, pinned); without it
this module is skipped. Known, deliberate differences (not tested as equal):
AdaLoRA's scale (peft divides α by ``r + 1e-5``, we by r: neutralised here by
setting peft's ``ranknum`` to ``r − 1e-5``), LoRA-FA's gradient projection in
peft's optimizer, PiSSA's singular-vector signs (ours canonical, peft LAPACK's).
"""
import copy
import types

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import lora_zoo as lz  # noqa: E402
from conftest import FixedDropout  # noqa: E402
from lora_zoo import adalora, vera  # noqa: E402


class OneLayer(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.lin = linear

    def forward(self, x):
        return self.lin(x)


class TwoLayers(nn.Module):
    """``lin1`` 48×40 with bias, ``lin2`` 64×64 without; input of 64 features (lin1 reads the first 40).
    With ``with_loss`` the output has a ``.loss`` (0, or Σ out·weights), to which peft's AdaLoRA adds its regulariser."""

    def __init__(self, with_loss=False):
        super().__init__()
        self.lin1 = nn.Linear(40, 48)
        self.lin2 = nn.Linear(64, 64, bias=False)
        self.with_loss = with_loss
        self.loss_weights = None

    def forward(self, x):
        out = (self.lin1(x[..., :40]), self.lin2(x))
        if not self.with_loss:
            return out
        loss = (sum((o * w).sum() for o, w in zip(out, self.loss_weights)) if self.loss_weights
                else 0.0 * out[0].sum())
        return types.SimpleNamespace(loss=loss, out=out)


def randn(generator, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=generator)


def dropout_mask(generator, shape, p):
    return (torch.rand(shape, generator=generator) >= p).float() / (1 - p)


def peft_model(model, config):
    return peft.get_peft_model(copy.deepcopy(model), config)


def peft_layer(model, name):
    return getattr(model.base_model.model, name)


def assert_grads_close(pairs, atol=1e-5):
    """Gradients of (peft tensor, our tensor) pairs; no gradient counts as a zero one."""
    for theirs, ours in pairs:
        expected = torch.zeros_like(theirs) if theirs.grad is None else theirs.grad
        got = torch.zeros_like(theirs) if ours.grad is None else ours.grad.view(theirs.shape)
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5)


def assert_same_train_and_eval(theirs, ours, pairs, x, weights):
    """Outputs and gradients of peft's module and ours, in training and in eval mode."""
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        for t, o in pairs:
            t.grad = o.grad = None
        y_theirs, y_ours = theirs(x), ours(x)
        torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
        (y_theirs * weights).sum().backward()
        (y_ours * weights).sum().backward()
        assert_grads_close(pairs)


# ---- LoRA, rsLoRA, DoRA -----------------------------------------------------------------------------
LORA_CASES = {
    "lora": dict(method="lora", shape=(48, 40, True), rank=4, alpha=2.0, rslora=False, dropout=0.25),
    "rslora (CLIP-LoRA preset)": dict(method="lora", shape=(64, 64, False), rank=2, alpha=1.0, rslora=True, dropout=0.25),
    "dora": dict(method="dora", shape=(48, 40, True), rank=4, alpha=2.0, rslora=False, dropout=0.0),
    "dora with dropout": dict(method="dora", shape=(48, 40, True), rank=4, alpha=2.0, rslora=False, dropout=0.25),
    "dora rslora with dropout": dict(method="dora", shape=(64, 64, False), rank=2, alpha=1.0, rslora=True, dropout=0.25),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_and_dora_match_peft(case):
    c = LORA_CASES[case]
    d_out, d_in, bias = c["shape"]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, bias=bias)
    theirs_model = peft_model(OneLayer(linear), peft.LoraConfig(
        r=c["rank"], lora_alpha=c["alpha"], use_rslora=c["rslora"], lora_dropout=c["dropout"], target_modules=["lin"],
        use_dora=c["method"] == "dora"))
    theirs = peft_layer(theirs_model, "lin")
    ours = lz.wrap_linear(copy.deepcopy(linear), c["method"], rank=c["rank"], alpha=c["alpha"], rslora=c["rslora"],
                          dropout=c["dropout"])
    assert ours.scale == pytest.approx(theirs.scaling["default"], rel=1e-12)
    pairs = [(theirs.lora_A["default"].weight, ours.lora_A), (theirs.lora_B["default"].weight, ours.lora_B)]
    if c["method"] == "dora":
        pairs.append((theirs.lora_magnitude_vector["default"].weight, ours.lora_magnitude))
        torch.testing.assert_close(ours.lora_magnitude, pairs[-1][0])  # row norms of W at init
    with torch.no_grad():
        for t, o in pairs:
            t.copy_(t * (1 + 0.3 * randn(g, *t.shape)) if t.ndim == 1 else randn(g, *t.shape, scale=0.2))
            o.copy_(t)
    x, weights = randn(g, 4, 5, d_in), randn(g, 4, 5, d_out)
    if c["dropout"] > 0:
        mask = dropout_mask(g, x.shape, c["dropout"])
        theirs.lora_dropout["default"] = FixedDropout(mask)
        ours.dropout = FixedDropout(mask)
    assert_same_train_and_eval(theirs_model, ours, pairs, x, weights)
    theirs_model.eval()
    ours.eval()
    original = linear.weight.detach().clone()
    theirs.merge()
    ours.merge()
    torch.testing.assert_close(ours.base_layer.weight, theirs.get_base_layer().weight, atol=1e-6, rtol=1e-6)
    ours.unmerge()  # both subtract the ΔW they merged (DoRA the one it kept): W to within one rounding
    torch.testing.assert_close(ours.base_layer.weight, original, atol=1e-6, rtol=0)


# ---- PiSSA --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, rank, alpha", [((48, 40), 4, 4.0), ((64, 64), 4, 8.0)])
def test_pissa_matches_peft_up_to_singular_vector_signs(shape, rank, alpha):
    torch.manual_seed(1)
    linear = nn.Linear(shape[1], shape[0])
    theirs_model = peft_model(OneLayer(linear), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"],
                                                                init_lora_weights="pissa"))
    theirs = peft_layer(theirs_model, "lin")
    ours = lz.wrap_linear(copy.deepcopy(linear), "pissa", rank=rank, alpha=alpha)
    a, b = theirs.lora_A["default"].weight.detach(), theirs.lora_B["default"].weight.detach()
    signs = torch.sign((a * ours.lora_A).sum(dim=1)).detach()  # one ±1 per singular triplet
    torch.testing.assert_close(signs[:, None] * ours.lora_A, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.lora_B * signs[None, :], b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.base_layer.weight, theirs.get_base_layer().weight, atol=1e-5, rtol=1e-5)
    x = torch.randn(6, shape[1])
    theirs_model.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), theirs_model(x), atol=1e-5, rtol=1e-5)


# ---- VeRA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, seed, dropout", [(8, 0, 0.0), (16, 7, 0.1)])
def test_vera_projections_are_peft_s_bit_for_bit_and_the_layers_match(rank, seed, dropout):
    torch.manual_seed(2)
    toy = TwoLayers()
    theirs_model = peft_model(toy, peft.VeraConfig(r=rank, target_modules=["lin1", "lin2"], projection_prng_key=seed,
                                                   vera_dropout=dropout, d_initial=0.1))
    vera._SHARED.clear()
    linears = {"lin1": toy.lin1, "lin2": toy.lin2}
    config = lz.build_config("vera", rank=rank, projection_seed=seed, dropout=dropout)
    plan = vera.VeraLinear.plan_layers(linears, None, config)
    ours = {n: lz.wrap_linear(copy.deepcopy(linear), "vera", rank=rank, projection_seed=seed, dropout=dropout, **plan[n])
            for n, linear in linears.items()}
    assert torch.equal(ours["lin1"].lora_vera_A, theirs_model.base_model.vera_A["default"])
    assert torch.equal(ours["lin1"].lora_vera_B, theirs_model.base_model.vera_B["default"])
    assert ours["lin2"].lora_vera_A is ours["lin1"].lora_vera_A
    g = torch.Generator().manual_seed(3)
    for name, layer in ours.items():
        theirs = peft_layer(theirs_model, name)
        pairs = [(theirs.vera_lambda_b["default"], layer.lora_lambda_b), (theirs.vera_lambda_d["default"], layer.lora_lambda_d)]
        torch.testing.assert_close(layer.lora_lambda_d, pairs[1][0])  # d = 0.1, b = 0 at init
        torch.testing.assert_close(layer.lora_lambda_b, pairs[0][0])
        with torch.no_grad():
            for t, o in pairs:
                t.copy_(randn(g, *t.shape, scale=0.5))
                o.copy_(t)
        x, weights = randn(g, 4, layer.in_features), randn(g, 4, layer.out_features)
        if dropout > 0:
            mask = dropout_mask(g, x.shape, dropout)
            theirs.vera_dropout["default"] = FixedDropout(mask)
            layer.dropout = FixedDropout(mask)
        assert_same_train_and_eval(theirs, layer, pairs, x, weights)
        torch.testing.assert_close(layer.delta_weight(), theirs.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


# ---- AdaLoRA ------------------------------------------------------------------------------------------
ADA_LAYERS = ("lin1", "lin2")


def adalora_pair(total, t_init, t_final, delta_t, init_rank=3, target_rank=2, gamma=0.1, dropout=0.0):
    """(peft model, our model, our allocator) with the same P, λ (peft's E), Q; peft's scale set to α/r."""
    torch.manual_seed(3)
    toy = TwoLayers(with_loss=True)
    theirs = peft_model(toy, peft.AdaLoraConfig(
        init_r=init_rank, target_r=target_rank, lora_alpha=float(init_rank), target_modules=list(ADA_LAYERS),
        total_step=total, tinit=t_init, tfinal=t_final, deltaT=delta_t, orth_reg_weight=gamma, beta1=0.85,
        beta2=0.85, lora_dropout=dropout))
    ours = copy.deepcopy(toy)
    for name in ADA_LAYERS:
        setattr(ours, name, lz.wrap_linear(getattr(ours, name), "adalora", init_rank=init_rank, dropout=dropout))
    allocator = adalora.RankAllocator(ours, total, options=adalora.AdaLoraSchedule(
        target_rank=target_rank, orth_reg=gamma, t_init=t_init / total, t_final=t_final / total, delta_t=delta_t))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t, o in adalora_tensors(theirs, ours):
            t.copy_(randn(g, *t.shape, scale=0.5 if t.shape[-1] == 1 else 0.3))
            o.copy_(t.view(o.shape))
        for name in ADA_LAYERS:  # α / (ranknum + 1e-5) = α / r
            peft_layer(theirs, name).ranknum["default"].fill_(init_rank - 1e-5)
    return theirs, ours, allocator


def adalora_tensors(theirs, ours):
    """[(peft tensor, our tensor)]: (B, P), (E, λ), (A, Q) of every layer; peft's E is r×1, our λ r."""
    return [(getattr(peft_layer(theirs, n), t)["default"], getattr(getattr(ours, n), o)) for n in ADA_LAYERS
            for t, o in (("lora_B", "lora_P"), ("lora_E", "lora_lambda"), ("lora_A", "lora_Q"))]


def kept(theirs, ours):
    """The triplets the last decision kept: peft's ``rank_pattern`` (None before the first), our masks."""
    pattern = theirs.peft_config["default"].rank_pattern
    theirs_kept = [True] * (2 * len(getattr(ours, ADA_LAYERS[0]).lora_rank_mask)) if pattern is None else [
        bool(v) for n in ADA_LAYERS for v in pattern[f"{n}.lora_E.default"]]
    return theirs_kept, [bool(v) for n in ADA_LAYERS for v in getattr(ours, n).lora_rank_mask]


def test_adalora_forward_regulariser_and_merge_match_peft():
    theirs, ours, allocator = adalora_pair(100, 10, 30, 10, dropout=0.25)
    pairs = adalora_tensors(theirs, ours)
    g = torch.Generator().manual_seed(5)
    x = randn(g, 4, 64)
    for name in ADA_LAYERS:
        mask = dropout_mask(g, (4, 40 if name == "lin1" else 64), 0.25)
        peft_layer(theirs, name).lora_dropout["default"] = FixedDropout(mask)
        getattr(ours, name).dropout = FixedDropout(mask)
    # the regulariser alone (the toy's own loss is 0): peft adds it in base_model's forward
    regulariser = theirs.base_model(x).loss
    assert regulariser.item() > 0.1
    ours_regulariser = allocator.regularizer()
    torch.testing.assert_close(ours_regulariser, regulariser, atol=1e-6, rtol=1e-6)
    regulariser.backward()
    ours_regulariser.backward()
    assert_grads_close(pairs, atol=1e-6)
    # task loss + regulariser, train and eval
    weights = [randn(g, 4, 48), randn(g, 4, 64)]
    theirs.base_model.model.loss_weights = ours.loss_weights = weights
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        for t, o in pairs:
            t.grad = o.grad = None
        out_theirs, out_ours = theirs.base_model(x), ours(x)
        for a, b in zip(out_ours.out, out_theirs.out):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        loss_ours = out_ours.loss + allocator.regularizer()
        torch.testing.assert_close(loss_ours, out_theirs.loss, atol=1e-4, rtol=1e-5)
        out_theirs.loss.backward()
        loss_ours.backward()
        assert_grads_close(pairs, atol=1e-4)
    for name in ADA_LAYERS:
        peft_layer(theirs, name).merge()
        getattr(ours, name).merge()
        torch.testing.assert_close(getattr(ours, name).base_layer.weight, peft_layer(theirs, name).get_base_layer().weight,
                                   atol=1e-6, rtol=1e-5)


def test_adalora_decisions_over_a_schedule_match_peft():
    total, t_init, t_final, delta_t = 100, 10, 30, 10
    theirs, ours, allocator = adalora_pair(total, t_init, t_final, delta_t)
    rank_allocator = theirs.base_model.rankallocator
    peft_decisions, step = [], [0]
    mask_to_budget = rank_allocator.mask_to_budget

    def logged(model, budget):
        peft_decisions.append((step[0], budget))
        return mask_to_budget(model, budget)

    rank_allocator.mask_to_budget = logged
    g = torch.Generator().manual_seed(6)
    pairs = adalora_tensors(theirs, ours)
    for t in range(total):  # the same gradient on both sides every step, no optimizer: only the schedule acts
        step[0] = t
        for a, b in pairs:
            grad = randn(g, *a.shape, scale=0.1)
            a.grad, b.grad = grad.clone(), grad.view(b.shape).clone()
        allocator.after_step(t)
        theirs.base_model.update_and_allocate(t)
        peft_kept, ours_kept = kept(theirs, ours)
        assert ours_kept == peft_kept, f"kept triplets differ after step {t}"
        for a, b in pairs:
            assert torch.equal(a.view(-1), b.view(-1))
    assert allocator.decisions == peft_decisions
    assert peft_decisions == [(20, 5), (30, 4), (40, 4), (50, 4), (60, 4), (70, 4)]
    assert all(rank_allocator.budget_schedule(t)[0] == allocator.budget(t) for t in range(total))


def test_adalora_training_run_matches_peft():
    total, t_init, t_final, delta_t = 60, 6, 18, 4
    theirs, ours, allocator = adalora_pair(total, t_init, t_final, delta_t)
    pairs = adalora_tensors(theirs, ours)
    optimizer_theirs = torch.optim.AdamW([a for a, _ in pairs], lr=5e-3, weight_decay=1e-2)
    optimizer_ours = torch.optim.AdamW([b for _, b in pairs], lr=5e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(7)
    target = [randn(g, 48, 40, scale=0.3), randn(g, 64, 64, scale=0.3)]
    decisions_kept = []
    for t in range(total):
        x = randn(g, 16, 64)
        wanted = (x[..., :40] @ target[0].t(), x @ target[1].t())

        def task(out):
            return sum(((y - z) ** 2).mean() for y, z in zip(out, wanted))

        out = theirs.base_model(x)  # peft's documented loop: backward, step, update_and_allocate(t), zero_grad
        (out.loss + task(out.out)).backward()
        optimizer_theirs.step()
        theirs.base_model.update_and_allocate(t)
        optimizer_theirs.zero_grad()
        allocator.before_forward(t)  # ours: the hook contract of train.py
        loss = task(ours(x).out) + allocator.regularizer()
        optimizer_ours.zero_grad(set_to_none=True)
        loss.backward()
        allocator.after_backward(t)
        optimizer_ours.step()
        allocator.after_step(t)
        peft_kept, ours_kept = kept(theirs, ours)
        assert ours_kept == peft_kept, f"kept triplets differ after step {t}"
        decisions_kept.append(sum(ours_kept))
    allocator.finish()
    for a, b in pairs:
        torch.testing.assert_close(b.view(-1), a.view(-1), atol=1e-5, rtol=0)
    assert decisions_kept[-1] == 4 and len(allocator.decisions) > 5


# ---- LoRA+ and LoRA-FA ----------------------------------------------------------------------------------
def lora_toy_pair(method, use_dora=False, rank=4, alpha=4.0):
    torch.manual_seed(8)
    toy = TwoLayers()
    theirs = peft_model(toy, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ADA_LAYERS), use_dora=use_dora))
    ours = copy.deepcopy(toy)
    for name in ADA_LAYERS:
        setattr(ours, name, lz.wrap_linear(getattr(ours, name), method, rank=rank, alpha=alpha, rslora=False, dropout=0.0))
    return theirs, ours


KIND = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "m", "lora_magnitude": "m"}


def tensor_key(name):
    """("lin1", "A") from peft's ``base_model.model.lin1.lora_A.default.weight`` or our ``lin1.lora_A``."""
    parts = name.split(".")
    kind = next(p for p in parts if p in KIND)
    return parts[parts.index(kind) - 1], KIND[kind]


def group_settings(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {tensor_key(names[id(p)]): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_loraplus_groups_match_peft(method):
    from peft.optimizers import create_loraplus_optimizer

    theirs, ours = lora_toy_pair(method, use_dora=method == "dora")
    lr, ratio, wd = 1e-3, 16.0, 1e-2
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=wd)
    expected = group_settings(theirs, optimizer.param_groups)
    got = group_settings(ours, lz.param_groups(ours, lr, wd, optimizer="loraplus", lr_ratio=ratio))
    assert got == expected
    assert {kind for _, kind in got} == ({"A", "B", "m"} if method == "dora" else {"A", "B"})
    assert got[("lin1", "B")] == (lr * ratio, wd) and got[("lin1", "A")] == (lr, wd)


def test_lorafa_freezes_a_and_otherwise_computes_peft_s_lora():
    from peft.optimizers import create_lorafa_optimizer

    theirs, ours = lora_toy_pair("lora", rank=4, alpha=8.0)
    create_lorafa_optimizer(theirs, r=4, lora_alpha=8.0, lr=1e-3)
    lz.param_groups(ours, 1e-3, optimizer="lorafa")
    g = torch.Generator().manual_seed(9)
    pairs = []
    for name in ADA_LAYERS:
        t, o = peft_layer(theirs, name), getattr(ours, name)
        assert not t.lora_A["default"].weight.requires_grad and not o.lora_A.requires_grad
        assert t.lora_B["default"].weight.requires_grad and o.lora_B.requires_grad
        with torch.no_grad():
            o.lora_A.copy_(t.lora_A["default"].weight)
            t.lora_B["default"].weight.copy_(randn(g, 48 if name == "lin1" else 64, 4, scale=0.2))
            o.lora_B.copy_(t.lora_B["default"].weight)
        pairs.append((t.lora_B["default"].weight, o.lora_B))
    x = randn(g, 8, 64)
    y_theirs, y_ours = theirs(x), ours(x)
    weights = [randn(g, 8, 48), randn(g, 8, 64)]
    for a, b in zip(y_ours, y_theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    sum((y * w).sum() for y, w in zip(y_theirs, weights)).backward()
    sum((y * w).sum() for y, w in zip(y_ours, weights)).backward()
    assert_grads_close(pairs)
    assert all(getattr(ours, n).lora_A.grad is None for n in ADA_LAYERS)
