"""MaPLe and PLOT++ against their official trainers' arithmetic, and as runs of the pipeline.

The references below are written from the official files (muzairkhattak/multimodal-prompt-learning
``trainers/maple.py`` and ``clip/model.py``; CHENGY12/PLOT ``plot-pp/trainers/plotpp.py`` and
``plot-pp/clip/model.py``; Dassl's SGD and per-epoch schedule) in plain torch on a second copy of the same
tiny-clip weights: the prompts concatenated into the token sequences by hand, each residual block as CLIP's
(``x + attn(ln_1 x)``, ``+ mlp(ln_2 x)``), the text tower at the full context, their Sinkhorn, and SGD
(momentum 0.9, L2 weight decay 5e-4) by hand. Our side is the loop's own step (``train.training_step``)
under the method's recipe (``build_loop``): loss, gradients and updated tensors agree step by step.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import lora_zoo as lz
from lora_zoo.config import TrainConfig
from lora_zoo.models import build_clip
from lora_zoo.plot import sinkhorn
from lora_zoo.train import build_loop, train_adapters, training_step

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # under fp16 the GradScaler skips the first steps on purpose (the last test); the schedule steps every iteration
    pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before:UserWarning"),
]
CPU = torch.device("cpu")
NAMES = ("dog", "red car", "blue jay")
LABELS = torch.tensor([0, 1, 2, 1])


def tiny_clip_backbone():
    return build_clip("tiny-clip", seed=0)


def images():
    return torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(3))


def block(layer, x, mask=None):
    """CLIP's residual block (clip/model.py ResidualAttentionBlock) on open_clip's block's weights."""
    h = layer.ln_1(x)
    x = x + layer.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    return x + layer.mlp(layer.ln_2(x))


def text_tower(model, prompts, tokens, swap=None):
    """Their TextEncoder on prompt embeddings; ``swap(i, x)`` is a block's token swap (MaPLe's deep prompts)."""
    x = prompts + model.positional_embedding
    for i, layer in enumerate(model.transformer.resblocks):
        x = swap(i, x) if swap else x
        x = block(layer, x, model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ model.text_projection


def image_tower(model, pixels, appended, swap=None):
    """Their VisionTransformer with ``appended`` (sets × n × width) after the positional embedding: M passes."""
    v = model.visual
    x = v.conv1(pixels).flatten(2).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(len(x), 1, x.shape[-1]), x], dim=1) + v.positional_embedding
    sets, batch = appended.shape[0], len(x)
    x = torch.cat([x.unsqueeze(0).expand(sets, -1, -1, -1), appended.unsqueeze(1).expand(-1, batch, -1, -1)], dim=2)
    x = v.ln_pre(x.reshape(sets * batch, x.shape[2], x.shape[3]))
    for i, layer in enumerate(v.transformer.resblocks):
        x = swap(i, x) if swap else x
        x = block(layer, x)
    return (v.ln_post(x[:, 0]) @ v.proj).view(sets, batch, -1)


def dassl_sgd(params, buffers, lr):
    """torch SGD as Dassl builds it: d = g + 5e-4·p, buf = d (first step) or 0.9·buf + d, p -= lr·buf."""
    with torch.no_grad():
        for i, p in enumerate(params):
            d = p.grad + 5e-4 * p
            buffers[i] = d.clone() if buffers[i] is None else 0.9 * buffers[i] + d
            p -= lr * buffers[i]
            p.grad = None


def adapted(method, options):
    """(tiny-clip with the learner as a run applies it, its classes, the loop settings of the method's recipe)."""
    backbone = tiny_clip_backbone()
    classes = lz.ClassSet.of(NAMES, [f"a photo of a {n}." for n in NAMES], backbone.tokenizer)
    torch.manual_seed(0)
    lz.apply_method(backbone.model, method, classes=classes, **options)
    spec = lz.get_method(method)
    return backbone, classes, TrainConfig(precision="fp32").resolved(spec.recipe_settings(16, "dtd"), lr=spec.lr)


def our_steps(method, options, iterations, lrs):
    """The loop's steps under the method's recipe (one batch, one batch per epoch), as ``train_adapters`` takes
    them: per step (loss, {tensor: grad}, {tensor: value after the step}); checks the schedule's lr on the way."""
    backbone, classes, config = adapted(method, options)
    loop = build_loop(backbone.model, config, iterations, CPU, 1, "fp32", per_epoch=1)
    learner, steps = backbone.model.lora_zoo_learner, []
    initial = {n: p.detach().clone() for n, p in learner.named_parameters()}
    backbone.model.train()
    for step in range(iterations):
        assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[step])
        if step in loop.restarts:
            loop.optimizer.state.clear()
        loss = training_step(backbone.model, images(), LABELS, classes, loop.optimizer, loop.hooks, step, CPU, "fp32",
                             loop.scaler)
        steps.append((float(loss), {n: None if p.grad is None else p.grad.clone()
                                    for n, p in learner.named_parameters()},
                      {n: p.detach().clone() for n, p in learner.named_parameters()}))
        loop.scheduler.step()
    return initial, steps, backbone


def close(ours, theirs):
    """Equal up to float32 summation order (our text tower runs on the shortest context, theirs on the full one):
    within 1e-5 of the tensor's largest entry."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()))


# long: their forward, loss and two SGD steps, written out beside ours
def test_maple_two_steps_equal_their_trainer():
    depth, n_ctx = 3, 2
    lrs = [1e-5, 0.0035]  # Dassl: the warm-up epoch, then the cosine's first epoch at the base lr
    initial, steps, backbone = our_steps("maple", dict(depth=depth), 2, lrs)
    model = build_clip("tiny-clip", seed=0).model  # their CLIP: the same weights, no learner
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    ctx, deep_text = leaf(initial["lora_text_prompts"][0]), [leaf(t) for t in initial["lora_text_prompts"][1:]]
    weights, biases = initial["lora_coupling_weight"], initial["lora_coupling_bias"]
    proj_w, proj_b = leaf(weights[0]), leaf(biases[0])  # their proj (F_0) and compound_prompt_projections
    deep_w, deep_b = [leaf(w) for w in weights[1:]], [leaf(b) for b in biases[1:]]
    params = [ctx, proj_w, proj_b, *deep_text, *deep_w, *deep_b]
    buffers = [None] * len(params)
    tokens = backbone.tokenizer([f"a photo of a {name}." for name in NAMES])  # prompt_prefix = CTX_INIT
    with torch.no_grad():
        embedding = model.token_embedding(tokens)
    assert torch.equal(initial["lora_text_prompts"][0], embedding[0, 1:1 + n_ctx])  # "a photo" starts P_0
    assert torch.equal(weights[1], weights[2])  # their _get_clones: deep couplings start as one layer
    for step, lr in enumerate(lrs):
        prompts = torch.cat([embedding[:, :1], ctx.expand(len(NAMES), -1, -1), embedding[:, 1 + n_ctx:]], dim=1)

        def text_swap(i, x):  # ResidualAttentionBlock_MaPLe, text_layer: counter = i - 1
            if 0 < i <= len(deep_text):
                return torch.cat([x[:, :1], deep_text[i - 1].expand(len(x), -1, -1), x[:, 1 + n_ctx:]], dim=1)
            return x

        visual_deep = [t @ w.t() + b for t, w, b in zip(deep_text, deep_w, deep_b)]

        def image_swap(i, x):
            if 0 < i <= len(visual_deep):
                return torch.cat([x[:, :-n_ctx], visual_deep[i - 1].expand(len(x), -1, -1)], dim=1)
            return x

        text = text_tower(model, prompts, tokens, text_swap)
        image = image_tower(model, images(), (ctx @ proj_w.t() + proj_b)[None], image_swap)[0]
        logits = 100.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()  # logit_scale.exp()
        loss = F.cross_entropy(logits, LABELS)
        loss.backward()
        ours_loss, grads, after = steps[step]
        assert ours_loss == pytest.approx(loss.item(), rel=1e-5)
        close(grads["lora_text_prompts"], torch.stack([ctx.grad, *[t.grad for t in deep_text]]))
        close(grads["lora_coupling_weight"], torch.stack([proj_w.grad, *[w.grad for w in deep_w]]))
        close(grads["lora_coupling_bias"], torch.stack([proj_b.grad, *[b.grad for b in deep_b]]))
        dassl_sgd(params, buffers, lr)
        close(after["lora_text_prompts"], torch.stack([ctx, *deep_text]).detach())
        close(after["lora_coupling_weight"], torch.stack([proj_w, *deep_w]).detach())
        close(after["lora_coupling_bias"], torch.stack([proj_b, *deep_b]).detach())
    assert not torch.equal(steps[1][2]["lora_text_prompts"], initial["lora_text_prompts"])


def their_sinkhorn(K, u, v, max_iter=100, thresh=1e-2):
    """CustomCLIP.Sinkhorn (plotpp.py)."""
    r, c = torch.ones_like(u), torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(K.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < thresh:
            break
    return torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * K


def plot_reference(model, tokenizer, ctx, ctx_vision, tradeoff, templates):
    """CustomCLIP.forward and the trainer's cross-entropy (plotpp.py), M = len(ctx_vision), N = len(ctx)."""
    n, n_ctx, count = len(ctx), ctx.shape[1], len(NAMES)
    tokens = torch.cat([tokenizer([f"{t} {name}." for name in NAMES]) for t in templates])  # template-major
    with torch.no_grad():
        embedding = model.token_embedding(tokens)
    context = ctx.unsqueeze(0).expand(count, -1, -1, -1).permute(1, 0, 2, 3).reshape(n * count, n_ctx, -1)
    prompts = torch.cat([embedding[:, :1], context, embedding[:, 1 + n_ctx:]], dim=1)
    text = text_tower(model, prompts, tokens).view(n, count, -1)
    image = image_tower(model, images(), ctx_vision)
    image_pool, text_pool = F.normalize(image.mean(0), dim=1), F.normalize(text.mean(0), dim=1)
    image, text = F.normalize(image, dim=2), F.normalize(text, dim=2)
    m, b = image.shape[:2]
    sim = torch.einsum("mbd,ncd->mnbc", image, text).contiguous().view(m, n, b * count).permute(2, 0, 1)
    u, v = torch.full((b * count, m), 1.0 / m), torch.full((b * count, n), 1.0 / n)
    with torch.no_grad():
        T = their_sinkhorn(torch.exp(-(1.0 - sim) / 0.1), u, v)
    sim_op = torch.sum(T * sim, dim=(1, 2)).contiguous().view(b, count)
    logits2 = 100.0 * sim_op
    if tradeoff:
        logits2 = 100.0 * image_pool @ text_pool.t() + logits2
    return F.cross_entropy(logits2, LABELS)


# long: their two runs (vision-only, then joint from its prompts), step by step beside our one run
def test_plot_stages_equal_their_two_runs_step_by_step():
    lrs = [1e-5, 0.002, 1e-5, 0.002]  # each stage a Dassl run: a warm-up epoch, then the base lr
    initial, steps, backbone = our_steps("plot", dict(n_visual=3, n_text=2), 4, lrs)
    model, templates = build_clip("tiny-clip", seed=0).model, backbone.model.lora_zoo_learner.templates
    assert templates == ["a photo of a", "this is a photo"]  # no dataset named: their SUN397/Caltech templates
    ctx = initial["lora_text_context"].clone()
    ctx_vision = initial["lora_visual_prompts"].clone().requires_grad_(True)
    with torch.no_grad():
        start = model.token_embedding(backbone.tokenizer(templates))[:, 1:5]
    assert torch.equal(ctx, start)
    buffers = [None]
    for step, lr in enumerate(lrs):
        joint = step >= 2
        if step == 2:  # main_joint.sh: a new trainer loads the first stage's prompts, MODEL_UPD joint, TRADE_OFF off
            ctx.requires_grad_(True)
            buffers = [None, None]
        params = [ctx_vision, ctx] if joint else [ctx_vision]
        loss = plot_reference(model, backbone.tokenizer, ctx, ctx_vision, tradeoff=not joint, templates=templates)
        loss.backward()
        ours_loss, grads, after = steps[step]
        assert ours_loss == pytest.approx(loss.item(), rel=1e-5)
        close(grads["lora_visual_prompts"], ctx_vision.grad)
        if joint:
            close(grads["lora_text_context"], ctx.grad)
        else:
            assert grads["lora_text_context"] is None  # frozen in the first stage: no grad, no decay
        dassl_sgd(params, buffers, lr)
        close(after["lora_visual_prompts"], ctx_vision.detach())
        close(after["lora_text_context"], ctx.detach())
    assert torch.equal(steps[1][2]["lora_text_context"], initial["lora_text_context"])
    assert not torch.equal(steps[3][2]["lora_text_context"], initial["lora_text_context"])
    assert backbone.model.lora_zoo_learner.stage == "joint"  # before_forward(3); finish() leaves it joint too
    # the loop itself (train_adapters: stages, schedule and the optimizer's restart at the switch) ends there too
    again, classes, config = adapted("plot", dict(n_visual=3, n_text=2))
    result = train_adapters(again.model, [(images(), LABELS)], classes, config, iterations=4, device=CPU, seed=1,
                            per_epoch=1, progress=False)
    assert result.curves["lr"] == pytest.approx(lrs) and result.hooks_summary == {"plot_joint_from_iteration": 2}
    for name, value in again.model.lora_zoo_learner.named_parameters():
        assert torch.equal(value, steps[3][2][name]), name


def hand_sinkhorn(kernels, u, v, iterations, threshold):
    """Sinkhorn over plain floats for a batch of M × N kernels, stopped on the batch's mean |Δr| (their rule)."""
    rows = [[1.0] * len(u) for _ in kernels]
    columns = [[1.0] * len(v) for _ in kernels]
    for done in range(1, iterations + 1):
        change = 0.0
        for k, K in enumerate(kernels):
            new = [u[i] / sum(K[i][j] * columns[k][j] for j in range(len(v))) for i in range(len(u))]
            change += sum(abs(a - b) for a, b in zip(new, rows[k]))
            rows[k] = new
            columns[k] = [v[j] / sum(K[i][j] * new[i] for i in range(len(u))) for j in range(len(v))]
        if change / (len(kernels) * len(u)) < threshold:
            break
    plans = [[[rows[k][i] * columns[k][j] * K[i][j] for j in range(len(v))] for i in range(len(u))]
             for k, K in enumerate(kernels)]
    return plans, done


def test_sinkhorn_is_their_iteration_and_their_stopping_rule():
    costs = [[[0.1, 0.5, 0.9], [0.7, 0.2, 0.4]], [[0.3, 0.3, 0.8], [0.05, 0.6, 0.2]]]
    kernels = [[[math.exp(-c / 0.1) for c in row] for row in K] for K in costs]
    u, v = [0.5, 0.5], [1 / 3] * 3
    K = torch.tensor(kernels, dtype=torch.float64)
    mass_u, mass_v = torch.tensor([u, u], dtype=torch.float64), torch.tensor([v, v], dtype=torch.float64)
    for threshold in (1e-2, 1e-9, 10.0):
        plans, done = hand_sinkhorn(kernels, u, v, 100, threshold)
        ours = sinkhorn(K, mass_u, mass_v, 100, threshold)
        torch.testing.assert_close(ours, torch.tensor(plans, dtype=torch.float64), rtol=1e-12, atol=0)
        torch.testing.assert_close(ours, their_sinkhorn(K, mass_u, mass_v, 100, threshold), rtol=1e-12, atol=0)
        if threshold == 1e-9:  # converged: the plan's marginals are u and v
            torch.testing.assert_close(ours.sum(2), mass_u, rtol=0, atol=1e-9)
            torch.testing.assert_close(ours.sum(1), mass_v, rtol=0, atol=1e-9)
        assert done == {1e-2: 15, 1e-9: 44, 10.0: 1}[threshold]
    # the rule reads the whole batch: the first problem alone runs 16 iterations, not the batch's 15
    alone = sinkhorn(K[:1], mass_u[:1], mass_v[:1], 100, 1e-2)
    torch.testing.assert_close(alone, torch.tensor(hand_sinkhorn(kernels[:1], u, v, 100, 1e-2)[0], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    assert hand_sinkhorn(kernels[:1], u, v, 100, 1e-2)[1] == 16
    assert not torch.equal(alone[0], sinkhorn(K, mass_u, mass_v, 100, 1e-2)[0])


def test_an_fp16_run_of_their_recipe_counts_only_the_steps_the_scaler_skipped(monkeypatch):
    """The loop counts the steps the optimizer takes (``train.count_steps``): SGD keeps no count of its own and a
    new part of PLOT++'s run (its joint stage, from iteration 5 of 8) starts a fresh optimizer state."""
    import lora_zoo.train as train

    backbone, classes, config = adapted("plot", dict(n_visual=1, n_text=2))
    unchanged, original = [], train.training_step

    def watched(model, *args, **kwargs):
        before = [p.detach().clone() for p in lz.trainable_parameters(model)]
        loss = original(model, *args, **kwargs)
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, lz.trainable_parameters(model))))
        return loss

    monkeypatch.setattr(train, "training_step", watched)
    result = train_adapters(backbone.model, [(images(), LABELS)], classes, dataclasses.replace(config, precision="fp16"),
                            iterations=8, device=CPU, seed=1, per_epoch=1, progress=False)
    assert 0 < sum(unchanged) < 8 and result.skipped_steps == sum(unchanged), unchanged


def test_the_prompt_hooks_act_only_while_the_learner_encodes_and_leave_with_detach():
    import copy

    backbone, classes, _ = adapted("maple", dict(depth=3))
    model, plain = backbone.model, build_clip("tiny-clip", seed=0).model.requires_grad_(False)  # frozen, as model
    learner = model.lora_zoo_learner
    blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    assert [len(b._forward_pre_hooks) for b in blocks] == [0, 1, 1, 0] * 2  # blocks 1..depth-1 of each tower
    assert len(model.visual.ln_pre._forward_pre_hooks) == 1
    with torch.no_grad():
        expected = plain.encode_image(images()), plain.encode_text(classes.tokens)
        prompted = learner.image_features(model, images())
        torch.testing.assert_close(model.encode_image(images()), expected[0], rtol=0, atol=0)  # the model's own use
        torch.testing.assert_close(model.encode_text(classes.tokens), expected[1], rtol=0, atol=0)
        assert not torch.allclose(prompted, F.normalize(expected[0], dim=-1), atol=1e-3)
        twin = copy.deepcopy(model)  # a copy's hooks fill the copy's slots
        torch.testing.assert_close(twin.lora_zoo_learner.image_features(twin, images()), prompted, rtol=0, atol=0)
        learner.detach()
        assert all(not b._forward_pre_hooks for b in blocks) and not model.visual.ln_pre._forward_pre_hooks
        torch.testing.assert_close(learner.image_features(model, images()), F.normalize(expected[0], dim=-1),
                                   rtol=0, atol=0)  # no tokens reach the towers any more
        torch.testing.assert_close(twin.lora_zoo_learner.image_features(twin, images()), prompted, rtol=0, atol=0)
