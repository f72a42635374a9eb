"""CoOp, CoCoOp, KgCoOp and ProGrad against their official trainers' arithmetic, one training step at a time.

Each reference below is written in plain torch from the official file it names (KaiyangZhou/CoOp
``trainers/coop.py``, ``trainers/cocoop.py``; htyao89/KgCoOp ``KgCoOp/trainers/kgcoop.py``; BeierZhu/Prompt-align
``ProGrad.public/trainers/prograd.py`` and ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``; Dassl's SGD and
``ConstantWarmupScheduler``): the prompts assembled as their ``PromptLearner`` assembles them on the model's full
text context, their ``TextEncoder``, their logits and losses, their optimizer step. On the same tiny weights, batch
and initial tensors, two steps of our loop (``train.training_step`` with the method's recipe: the warm-up epoch at
1e-5, then 0.002 with SGD's momentum) give the same loss, the same gradients of every learned tensor and the same
updated tensors. Our differences are float summation order (the shortest exact context, a batched CoCoOp) and
fp32 where their configs run fp16 (docs/METHODS.md).
"""
import pytest
import torch
import torch.nn.functional as F
from open_clip import SimpleTokenizer

import lora_zoo as lz
from conftest import tiny_clip
from lora_zoo.config import TrainConfig
from lora_zoo.train import build_loop, lr_scheduler, training_step

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
TOKENIZER = SimpleTokenizer(context_length=32)
NAMES = ("dog", "red car", "blue jay", "cat")
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 2, 3])
DASSL_LR = (1e-5, 0.002)  # epochs 0 and 1 of Dassl's ConstantWarmupScheduler around CosineAnnealingLR


def class_set(dataset=None):
    return lz.ClassSet.of(NAMES, [f"a photo of a {name}." for name in NAMES], TOKENIZER, dataset)


# ---- the official arithmetic, plain torch ------------------------------------------------------------------
def text_encoder(model, prompts, tokenized):
    """coop.py ``TextEncoder.forward``: + positional embedding, the transformer with CLIP's causal mask (open_clip's
    is batch-first: no permute), ``ln_final``, the feature at the argmax token, ``@ text_projection``."""
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection


def frozen_prompt(model, prompt_prefix, n_ctx):
    """coop.py ``PromptLearner.__init__``: tokenised ``prompt_prefix + " " + name + "."``, SOS and suffix buffers."""
    names = [name.replace("_", " ") for name in NAMES]
    tokenized = torch.cat([TOKENIZER([f"{prompt_prefix} {name}."]) for name in names])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    return tokenized, embedding[:, :1], embedding[:, 1 + n_ctx:], [len(TOKENIZER.encode(n)) for n in names]


def coop_prompts(model, ctx, prompt_prefix, position="end"):
    """coop.py ``PromptLearner.forward`` (lines 118-182), its per-class loops for ``middle`` and ``front``."""
    n_ctx = ctx.shape[-2]
    tokenized, prefix, suffix, name_lens = frozen_prompt(model, prompt_prefix, n_ctx)
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(len(NAMES), -1, -1)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1), tokenized
    prompts = []
    for i, name_len in enumerate(name_lens):
        class_i, suffix_i = suffix[i:i + 1, :name_len], suffix[i:i + 1, name_len:]
        if position == "middle":
            half = n_ctx // 2
            parts = [prefix[i:i + 1], ctx[i:i + 1, :half], class_i, ctx[i:i + 1, half:], suffix_i]
        else:
            parts = [prefix[i:i + 1], class_i, ctx[i:i + 1], suffix_i]
        prompts.append(torch.cat(parts, dim=1))
    return torch.cat(prompts, dim=0), tokenized


def normalize(x):
    return x / x.norm(dim=-1, keepdim=True)


def coop_logits(model, ctx, prompt_prefix, position="end"):
    """coop.py ``CustomCLIP.forward``."""
    prompts, tokenized = coop_prompts(model, ctx, prompt_prefix, position)
    image_features, text_features = normalize(model.encode_image(IMAGES)), normalize(text_encoder(model, prompts,
                                                                                                  tokenized))
    return model.logit_scale.exp() * image_features @ text_features.t()


def sgd_step(tensors, grads, buffers, lr):
    """torch.optim.SGD as Dassl builds it: momentum 0.9, weight decay 5e-4 (coupled), no dampening, no nesterov."""
    updated = {}
    for name, tensor in tensors.items():
        d_p = grads[name] + 5e-4 * tensor
        buffers[name] = d_p.clone() if name not in buffers else 0.9 * buffers[name] + d_p
        updated[name] = tensor - lr * buffers[name]
    return updated


def reference_steps(initial, loss_fn, backward=None):
    """Two steps of their trainer from ``initial`` tensors: ``[(loss, grads, updated tensors)]``; ``loss_fn(tensors)``
    returns the loss (or ProGrad's losses for ``backward``)."""
    tensors, buffers, steps = {k: v.detach().clone() for k, v in initial.items()}, {}, []
    for lr in DASSL_LR:
        live = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
        loss, grads = backward(loss_fn(live), live) if backward else plain_backward(loss_fn(live), live)
        tensors = sgd_step({k: v.detach() for k, v in live.items()}, grads, buffers, lr)
        steps.append((float(loss.detach()), grads, tensors))
    return steps


def plain_backward(loss, live):
    grads = torch.autograd.grad(loss, list(live.values()))
    return loss, dict(zip(live, grads))


# ---- ours ----------------------------------------------------------------------------------------------------
def adapted(method, dataset=None, **options):
    model = tiny_clip()
    torch.manual_seed(0)
    lz.apply_method(model, method, classes=class_set(dataset), **options)
    return model, model.lora_zoo_learner


def our_steps(model, method, dataset=None, labels=LABELS):
    """Two steps of our loop with the method's recipe (200 one-batch epochs: epoch 1 at the full lr)."""
    spec = lz.get_method(method)
    config = TrainConfig().resolved(spec.recipe_settings(16, dataset or "dtd"), lr=spec.lr)
    loop = build_loop(model, config, iterations=200, device=CPU, seed=0, precision="fp32", per_epoch=1)
    learner, steps = model.lora_zoo_learner, []
    for step, lr in enumerate(DASSL_LR):
        assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        loss = training_step(model, IMAGES, labels, class_set(dataset), loop.optimizer, loop.hooks, step, CPU,
                             "fp32", loop.scaler)
        loop.scheduler.step()
        named = dict(learner.named_parameters())
        steps.append((float(loss), {n: p.grad.clone() for n, p in named.items()},
                      {n: p.detach().clone() for n, p in named.items()}))
    return steps


def close(ours, theirs, scale=0.0):
    """Equal up to float summation order: 1e-5 of the tensor's largest entry (or a few float32 steps of
    ``scale``: an update read as a difference of two tensors of that size), 1e-4 relative."""
    atol = max(1e-5 * float(theirs.abs().max()), 4 * torch.finfo(torch.float32).eps * scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=atol)


def assert_same_steps(ours, theirs, initial):
    for (loss, grads, tensors), (their_loss, their_grads, their_tensors) in zip(ours, theirs):
        assert loss == pytest.approx(their_loss, rel=1e-5)
        for name in their_grads:
            close(grads[name], their_grads[name])
            close(tensors[name] - initial[name], their_tensors[name] - initial[name],  # the update (first 1e-5 · g)
                  scale=float(initial[name].abs().max()))
        initial = their_tensors


def initial_tensors(learner):
    return {n: p.detach().clone() for n, p in learner.named_parameters()}


# ---- CoOp --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, options, prefix", [
    ("coop16", {}, " ".join(["X"] * 16)),
    ("coop4", {}, "a photo of a"),
    ("coop", dict(n_ctx=4, class_token_position="middle"), "X X X X"),
    ("coop", dict(n_ctx=3, csc=True, class_token_position="front"), "X X X"),
])
def test_coop_step_is_their_trainers(method, options, prefix):
    model, learner = adapted(method, **options)
    initial = initial_tensors(learner)
    ctx = initial["lora_context"]
    if prefix == "a photo of a":  # their ctx_init: the phrase's embeddings right after SOS
        with torch.no_grad():
            assert torch.equal(ctx, model.token_embedding(TOKENIZER(["a photo of a"]))[0, 1:5])
    else:  # their random init: N(0, 0.02²) drawn from the seeded generator
        torch.manual_seed(0)
        assert torch.equal(ctx, torch.nn.init.normal_(torch.empty(ctx.shape), std=0.02))
    position = options.get("class_token_position", "end")
    theirs = reference_steps(initial, lambda t: F.cross_entropy(coop_logits(model, t["lora_context"], prefix,
                                                                            position), LABELS))
    assert_same_steps(our_steps(model, method), theirs, initial)


# ---- CoCoOp ------------------------------------------------------------------------------------------------
def cocoop_logits(model, tensors, prefix="a photo of a"):
    """cocoop.py ``CustomCLIP.forward`` with ``PromptLearner.forward``: the meta-net on the normalised image
    feature, one shift per image added to every context token, the text encoder once per image."""
    image_features = normalize(model.encode_image(IMAGES))
    hidden = F.relu(F.linear(image_features, tensors["lora_meta_weight1"], tensors["lora_meta_bias1"]))
    bias = F.linear(hidden, tensors["lora_meta_weight2"], tensors["lora_meta_bias2"]).unsqueeze(1)
    ctx_shifted = tensors["lora_context"].unsqueeze(0) + bias
    logits = []
    for ctx_shifted_i, imf_i in zip(ctx_shifted, image_features):
        prompts, tokenized = coop_prompts(model, ctx_shifted_i, prefix)
        logits.append(model.logit_scale.exp() * imf_i @ normalize(text_encoder(model, prompts, tokenized)).t())
    return torch.stack(logits)


def test_cocoop_step_is_their_trainers():
    model, learner = adapted("cocoop")
    initial = initial_tensors(learner)
    with torch.no_grad():  # their ctxv1 init, then nn.Linear's draws for linear1 and linear2, in that order
        assert torch.equal(initial["lora_context"], model.token_embedding(TOKENIZER(["a photo of a"]))[0, 1:5])
    torch.manual_seed(0)
    first, second = torch.nn.Linear(32, 2), torch.nn.Linear(2, 64)
    for name, tensor in (("weight1", first.weight), ("bias1", first.bias), ("weight2", second.weight),
                         ("bias2", second.bias)):
        assert torch.equal(initial[f"lora_meta_{name}"], tensor.detach())
    theirs = reference_steps(initial, lambda t: F.cross_entropy(cocoop_logits(model, t), LABELS))
    assert_same_steps(our_steps(model, "cocoop"), theirs, initial)


def test_cocoop_batched_over_images_gives_the_per_image_loops_numbers():
    model, learner = adapted("cocoop")
    torch.manual_seed(3)
    with torch.no_grad():
        for tensor in learner.parameters():
            tensor.add_(0.05 * torch.randn(tensor.shape))
    state = learner.class_state(model, class_set())
    results = {}
    for per_pass in (1, None):  # their loop, one image per pass; all of the batch in one pass
        learner.images_per_pass = per_pass
        learner.zero_grad(set_to_none=True)
        logits = learner.logits(model, IMAGES, state)
        F.cross_entropy(logits, LABELS).backward()
        results[per_pass] = (logits.detach(), {n: p.grad.clone() for n, p in learner.named_parameters()})
    assert torch.equal(results[1][0], results[None][0])
    assert all(torch.equal(results[1][1][n], results[None][1][n]) for n in results[1][1])
    learner.images_per_pass = None
    with torch.no_grad():  # evaluation: chunks of images, the same numbers
        assert torch.equal(learner.logits(model, IMAGES, state), results[None][0])


# ---- KgCoOp ------------------------------------------------------------------------------------------------
def test_kgcoop_step_is_their_trainers():
    model, learner = adapted("kgcoop", dataset="dtd")
    initial = initial_tensors(learner)
    with torch.no_grad():  # their ori_embedding: the frozen model on "a photo of a {}, a type of texture."
        text_features_old = model.encode_text(TOKENIZER([f"a photo of a {n}, a type of texture." for n in NAMES]))

    def loss(tensors):  # kgcoop.py CustomCLIP.forward and forward_backward, W = 8
        prompts, tokenized = coop_prompts(model, tensors["lora_context"], "a photo of a")
        text_features = normalize(text_encoder(model, prompts, tokenized))
        logits = model.logit_scale.exp() * normalize(model.encode_image(IMAGES)) @ text_features.t()
        score = torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text_features, normalize(text_features_old))
        return F.cross_entropy(logits, LABELS) + 8.0 * (1.0 - torch.mean(score))

    theirs = reference_steps(initial, loss)
    assert loss(initial) - F.cross_entropy(coop_logits(model, initial["lora_context"], "a photo of a"), LABELS) > 1e-3
    assert_same_steps(our_steps(model, "kgcoop", "dtd"), theirs, initial)


# ---- ProGrad -----------------------------------------------------------------------------------------------
PETS = "a type of pet, a photo of a {}."


def prograd_backward(losses, live, lambda_=1.0):
    """Dassl.ProGrad ``prograd_backward_and_update``: the KL's gradient, then the CE's, projected where they
    conflict."""
    xe_loss, kl_loss = losses
    b_grads = torch.autograd.grad(kl_loss, list(live.values()), retain_graph=True)
    a_grads = torch.autograd.grad(xe_loss, list(live.values()))
    grads = {}
    for name, a_grad, b_grad in zip(live, a_grads, b_grads):
        b_grad_norm = b_grad / torch.linalg.norm(b_grad)
        a_grad_norm = a_grad / torch.linalg.norm(a_grad)
        grads[name] = a_grad
        if torch.dot(a_grad_norm.flatten(), b_grad_norm.flatten()) < 0:
            grads[name] = a_grad - lambda_ * torch.dot(a_grad.flatten(), b_grad_norm.flatten()) * b_grad_norm
            PROJECTED.append(name)
    return xe_loss, grads


PROJECTED = []


def test_prograd_step_is_their_trainers_with_their_context_init():
    model, learner = adapted("prograd", dataset="oxford_pets", prograd_lambda=0.8)
    initial = initial_tensors(learner)
    # their init: ctx_init = the template without " {}." (8 words: "pet," is one), zeros then its first 8 tokens
    ctx_init = PETS.replace(" {}.", "")
    with torch.no_grad():
        embedding = model.token_embedding(TOKENIZER([ctx_init]))
    assert torch.equal(initial["lora_context"][:8], torch.zeros(8, 64))
    assert torch.equal(initial["lora_context"][8:], embedding[0, 1:9])
    prompt_prefix = " ".join(["X"] * 8) + " " + ctx_init
    # the off-by-one: 9 tokens, 8 words; the template's last "a" stays a fixed token before the name
    prompts = learner.prompts(model, class_set("oxford_pets"))
    assert prompts.tokens[0, 17].item() == TOKENIZER.encode("a")[0] and prompts.tokens[0, 18].item() == \
        TOKENIZER.encode("dog")[0]
    with torch.no_grad():  # prograd.py CLIP: the zero-shot teacher with the same template
        teacher_text = normalize(model.encode_text(TOKENIZER([PETS.format(n) for n in NAMES])))
        teacher = model.logit_scale.exp() * normalize(model.encode_image(IMAGES)) @ teacher_text.t()
    labels = torch.zeros(4, dtype=torch.long)  # class 0, the teacher's choice for none: the gradients conflict

    def losses(tensors):  # prograd.py ProGradLoss with T = 1
        stu_logits = coop_logits(model, tensors["lora_context"], prompt_prefix)
        tea_prob = F.softmax(teacher / 1.0, dim=-1)
        kl_loss = (-tea_prob * F.log_softmax(stu_logits / 1.0, -1) * 1.0 * 1.0).sum(1).mean()
        return F.cross_entropy(stu_logits, labels), kl_loss

    PROJECTED.clear()
    theirs = reference_steps(initial, losses, lambda l, live: prograd_backward(l, live, 0.8))
    assert PROJECTED  # the conflicting component was removed at least once
    assert_same_steps(our_steps(model, "prograd", "oxford_pets", labels=labels), theirs, initial)


def test_prograd_projection_removes_only_a_conflicting_component():
    from lora_zoo.prograd import project
    g, kl = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 0.0])
    torch.testing.assert_close(project(g, kl, 1.0), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(project(g, kl, 0.8), torch.tensor([0.2, 1.0]))
    assert torch.equal(project(g, -kl, 1.0), g)  # no conflict: unchanged


# ---- recipes -----------------------------------------------------------------------------------------------
def test_dassl_schedule_of_cocoop_is_their_numbers():
    config = TrainConfig().resolved(lz.get_method("cocoop").recipe_settings(16, "dtd"), lr=0.002)
    assert (config.optimizer, config.batch_size, config.epochs,
            config.weight_decay, config.drop_last) == ("sgd", 1, 10, 5e-4, True)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    scheduler, lrs = lr_scheduler(optimizer, config, iterations=10, per_epoch=1), []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # the notes' run of Dassl's own lr_scheduler.py for T = 10
    assert lrs == pytest.approx([1e-05, 0.002, 0.001951057, 0.001809017, 0.001587785, 0.001309017, 0.001,
                                 0.000690983, 0.0004122147, 0.000190983], abs=1e-9)


@pytest.mark.parametrize("method, shots, dataset, epochs, batch", [
    ("coop", 1, "dtd", 50, 32), ("coop4", 2, "dtd", 100, 32), ("coop16", 4, "food101", 100, 32),
    ("coop", 8, "dtd", 200, 32), ("coop16", 16, "dtd", 200, 32), ("coop", 16, "imagenet", 50, 32),
    ("prograd", 1, "dtd", 50, 32), ("prograd", 16, "dtd", 200, 32), ("kgcoop", 4, "dtd", 100, 128),
    ("cocoop", 16, "imagenet", 10, 1),
])
def test_epochs_and_batch_by_shots(method, shots, dataset, epochs, batch):
    config = TrainConfig().resolved(lz.get_method(method).recipe_settings(shots, dataset))
    assert (config.epochs, config.batch_size, config.lr_schedule, config.warmup_epochs, config.warmup_lr) == \
        (epochs, batch, "epoch_cosine", 1, 1e-5)
    # Dassl's loader: floor(N / B) batches when N >= B, else one batch of all N
    assert config.iterations(shots, 47 * shots) == epochs * max(1, (47 * shots) // batch)


# ---- names, checkpoints ------------------------------------------------------------------------------------
def test_display_names_are_the_papers_row_names():
    rows = {line.split(",")[0] for line in (lz.models.WEIGHTS_DIR.parents[1] / "reported/nora_table2.csv")
            .read_text().splitlines() if line and not line.startswith("#")}
    for method, name in (("coop4", "CoOp (4)"), ("coop16", "CoOp (16)"), ("cocoop", "CoCoOp"), ("kgcoop", "KgCoOp"),
                         ("prograd", "ProGrad")):
        assert lz.get_method(method).display_name == name and name in rows
        recipe = lz.get_method(method).recipe_settings(16, "dtd")  # their SGD: the recipe's, not the method's
        assert (lz.get_method(method).kind, recipe["optimizer"], lz.get_method(method).optimizer) == \
            ("prompts", "sgd", "adamw")
        assert TrainConfig(recipe="clip_lora").resolved(recipe).optimizer is None  # CLIP-LoRA's loop: the AdamW


def test_a_checkpoint_of_another_n_ctx_is_refused_in_one_line(tmp_path):
    model, _ = adapted("coop", n_ctx=8)
    path = lz.save_adapters(model, tmp_path / "adapters.safetensors")
    other, _ = adapted("coop", n_ctx=16)
    with pytest.raises(ValueError) as error:
        lz.load_adapters(other, path)
    assert str(error.value) == (f"checkpoint {path} was saved with n_ctx=8, but the model's "
                                "adapters have n_ctx=16")
    fresh = tiny_clip()  # a plain model is rebuilt from the checkpoint: 8 tokens
    lz.load_adapters(fresh, path)
    assert fresh.lora_zoo_learner.lora_context.shape == (8, 64)


def test_their_template_tables_are_keyed_by_our_dataset_names():
    from datasets import list_datasets
    from lora_zoo import kgcoop, prograd
    theirs = set(list_datasets()) - {"imagefolder", "scenes_compose", "scenes_names"}  # theirs: "a photo of a {}."
    assert set(kgcoop.TEMPLATES) == set(prograd.TEMPLATES) == theirs and len(theirs) == 15
    assert (kgcoop.TEMPLATES["dtd"], prograd.TEMPLATES["dtd"]) == ("a photo of a {}, a type of texture.",
                                                                   "a texture of {}.")
    assert [prograd.template_words(d) for d in ("food101", "eurosat", "scenes_names")] == \
        ["a type of food, a photo of", "a centered satellite photo of", "a photo of a"]
