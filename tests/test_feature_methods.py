"""The feature heads against their official arithmetic, re-implemented here from the official files (never copied):
Tip-Adapter's cache logits, its α/β grid and Tip-Adapter-F's step; CLIP-Adapter's step on raw features; TaskRes's
residual step; LP++'s step sizes, initialisation and iterations (its accumulated α gradient). Then what each head
does with classes it was not trained on (base-to-new's new classes, another dataset's).

Official files (commits in /work/notes/feature_methods.md): gaopengcuhk/Tip-Adapter main.py (run_tip_adapter_F),
utils.py (build_cache_model, search_hp, cls_acc); gaopengcuhk/CLIP-Adapter clip_adapter.py (Adapter, CustomCLIP);
geekyutao/TaskRes trainers/taskres.py (TaskResLearner, CustomCLIP) on Dassl's Adam; FereshteShakeri/
FewShot-CLIP-Strong-Baseline methods/linear_probe_p2.py, methods/utils.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_zoo as lz
from conftest import tiny_clip
from lora_zoo.learner import Support
from lora_zoo.scoring import Selection
from lora_zoo.tip_adapter import grid
from lora_zoo.train import training_step
from method_cases import CLASSES

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def head(method, support, classes=CLASSES, **options):
    model = tiny_clip()
    torch.manual_seed(0)
    lz.apply_method(model, method, classes=classes, support=support, **options)
    return model, model.lora_zoo_learner


def step(model, features, labels, steps=1, **optimizer):
    """``steps`` of the one loop's training step (the method's scorer and backward) with the given optimizer."""
    opt = lz.build_optimizer(model, **optimizer)
    hooks, scorer = lz.training_hooks(model, steps), lz.scorer_of(model)
    model.train()
    for index in range(steps):
        training_step(model, features, labels, CLASSES, opt, hooks, index, CPU, scorer=scorer)
    return model


def their_text(model, classes=CLASSES):
    """The normalised text classifier as their code builds it (open_clip's full 77-token context here)."""
    with torch.no_grad():
        return F.normalize(model.encode_text(classes.tokens).float(), dim=-1)


def their_tip_logits(features, keys, values, text, alpha, beta):
    """run_tip_adapter_F's logits: clip_logits + cache_logits * alpha, the exponent written as theirs."""
    affinity = features @ keys.t()
    return 100.0 * features @ text.t() + ((-1) * (beta - beta * affinity)).exp() @ values * alpha


def batch(model, images):
    with torch.no_grad():
        raw = model.encode_image(images).float()
    return raw, F.normalize(raw, dim=-1)


# ---- Tip-Adapter ----------------------------------------------------------------------------------------------------
def test_tip_adapter_cache_logits_and_one_step_of_tip_adapter_f_are_theirs(images):
    g = torch.Generator().manual_seed(0)
    views = torch.randn(10, 6, 32, generator=g)                    # 10 augmented passes of 6 images, unnormalised
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    model, tip = head("tip_adapter", Support(views, labels))
    keys = F.normalize(views.mean(0), dim=-1)                      # build_cache_model: mean, then normalised
    assert torch.equal(tip.lora_keys, keys) and (float(tip.lora_alpha), float(tip.lora_beta)) == pytest.approx((1.17, 1))
    _, features = batch(model, images)
    text, values = their_text(model), F.one_hot(labels).float()
    adapter = nn.Parameter(keys.clone())                           # their nn.Linear weight = cache_keys.t()
    theirs = their_tip_logits(features, adapter, values, text, 1.17, 1.0)
    ours = tip.logits(model, features, tip.class_state(model, CLASSES))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    optimizer = torch.optim.AdamW([adapter], lr=1e-3, eps=1e-4)    # weight decay: PyTorch's default 0.01
    F.cross_entropy(theirs, torch.tensor([0, 1, 2])).backward()
    optimizer.step()
    step(model, features, torch.tensor([0, 1, 2]), lr=1e-3, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-4)
    torch.testing.assert_close(tip.lora_keys, adapter.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(tip.lora_keys, keys)


def their_search(scale, steps, keys, values, features, labels, text):
    """search_hp: β outer, α inner, cls_acc percentages, strict > from 0."""
    beta_list = [i * (scale[0] - 0.1) / steps[0] + 0.1 for i in range(steps[0])]
    alpha_list = [i * (scale[1] - 0.1) / steps[1] + 0.1 for i in range(steps[1])]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            tip_logits = their_tip_logits(features, keys, values, text, alpha, beta)
            pred = tip_logits.topk(1, 1, True, True)[1].t()
            acc = 100 * float(pred.eq(labels.view(1, -1)).float().sum()) / labels.shape[0]
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha, best_acc


def test_tip_adapter_searches_their_grid_on_validation_only(images):
    g = torch.Generator().manual_seed(3)
    views, labels = torch.randn(10, 8, 32, generator=g), torch.tensor([0, 1, 2, 3] * 2)
    model, tip = head("tip_adapter", Support(views, labels), search_scale=(50.0, 50.0), search_steps=(40, 10))
    text = their_text(model)
    val = F.normalize(tip.lora_keys.detach()[[0, 1, 2, 3, 4, 5, 6, 7] * 2] + 0.3 * torch.randn(16, 32, generator=g),
                      dim=-1)
    val_labels = torch.tensor([0, 1, 2, 3] * 4)
    beta, alpha, accuracy = their_search((50.0, 50.0), (40, 10), tip.lora_keys.detach(), F.one_hot(labels).float(),
                                         val, val_labels, text)
    assert grid(7.0, 40)[:2] == pytest.approx([0.1, 0.1 + 6.9 / 40]) and 7.0 not in grid(7.0, 40)
    model.eval()
    selection = Selection(CLASSES, [(torch.zeros(16), val_labels)], [], CPU)  # batches of "images" → features below
    tip.inputs = lambda model, images, features=val: features                 # the validation features themselves
    record = tip.after_training(model, selection)
    assert (record["tip_beta"], record["tip_alpha"]) == pytest.approx((beta, alpha))
    assert record["tip_search_val_accuracy"] == pytest.approx(accuracy) and record["selected_on"] == "val"
    assert (beta, alpha) != (0.1, 0.1)  # the grid moved off its first point on this data
    assert tip.selection_splits() == ("val",)  # the default never sees the test split


def test_tip_adapter_authors_keeps_the_best_test_epoch_and_the_larger_test_number(images):
    g = torch.Generator().manual_seed(4)
    views, labels = torch.randn(10, 4, 32, generator=g), torch.tensor([0, 1, 2, 3])
    model, tip = head("tip_adapter", Support(views, labels), variant="authors", search=False)
    assert tip.selection_splits() == ("test",)
    test = F.normalize(torch.randn(12, 32, generator=g), dim=-1)
    test_labels = torch.randint(0, 4, (12,), generator=g)
    epochs = [F.normalize(tip.lora_keys.detach() + s * torch.randn(4, 32, generator=g), dim=-1) for s in (1, 2, 3)]
    text, values = their_text(model), F.one_hot(labels, 4).float()
    accuracies = [float((their_tip_logits(test, k, values, text, 1.17, 1.0).argmax(-1) == test_labels).float().mean())
                  for k in epochs]
    best = max(range(3), key=lambda i: (accuracies[i], -i))   # the first epoch reaching the best (strict >)
    tip.epoch_keys = [k.clone() for k in epochs]
    tip.inputs = lambda model, images, features=test: features
    model.eval()
    record = tip.after_training(model, Selection(CLASSES, None, [("test", CLASSES, [(torch.zeros(12), test_labels)])],
                                                 CPU))
    assert record["selected_on"] == "test" and record["tip_test_selected_epoch"] == best + 1
    assert torch.equal(tip.lora_keys, epochs[best])
    assert record["tip_test_selected_accuracy"] == pytest.approx(100 * accuracies[best])


def test_training_free_tip_adapter_has_nothing_to_train(images):
    model, tip = head("tip_adapter", Support(torch.randn(10, 4, 32), torch.tensor([0, 1, 2, 3])), finetune=False)
    assert not tip.trains and lz.count_trainable(model) == 0 and "lora_keys" in dict(tip.named_buffers())


# ---- CLIP-Adapter ---------------------------------------------------------------------------------------------------
def test_clip_adapter_step_on_normalised_features_is_theirs_on_raw_ones(images):
    model, adapter = head("clip_adapter", None)
    raw, features = batch(model, images)
    theirs = nn.Sequential(nn.Linear(32, 8, bias=False), nn.ReLU(), nn.Linear(8, 32, bias=False), nn.ReLU())
    with torch.no_grad():
        theirs[0].weight.copy_(adapter.lora_down), theirs[2].weight.copy_(adapter.lora_up)
    text, labels = their_text(model), torch.tensor([0, 1, 2])
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        mixed = 0.2 * theirs(raw) + 0.8 * raw                     # on the raw feature, then normalised
        logits = 100.0 * F.normalize(mixed, dim=-1) @ text.t()
        optimizer.zero_grad()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
    step(model, features, labels, steps=2, lr=0.01, weight_decay=5e-4, betas=(0.9, 0.999), optimizer="sgd")
    torch.testing.assert_close(adapter.lora_down, theirs[0].weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.lora_up, theirs[2].weight.detach(), rtol=1e-5, atol=1e-6)
    assert adapter.lora_down.shape == (32 // 4, 32)  # sized to the embedding width, reduction 4


# ---- TaskRes --------------------------------------------------------------------------------------------------------
def test_taskres_residual_steps_are_theirs(images):
    model, taskres = head("taskres", None)
    assert taskres.residual_scale == 0.5 and torch.equal(taskres.lora_residual, torch.zeros(4, 32))
    _, features = batch(model, images)
    with torch.no_grad():
        base = model.encode_text(CLASSES.tokens).float()        # raw: no normalisation before the residual
    residual, labels = nn.Parameter(torch.zeros(4, 32)), torch.tensor([0, 1, 2])
    optimizer = torch.optim.Adam([residual], lr=2e-4, weight_decay=5e-4, betas=(0.9, 0.999))  # Dassl's adam: L2
    for _ in range(2):
        logits = 100.0 * features @ F.normalize(base + 0.5 * residual, dim=-1).t()
        optimizer.zero_grad()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
    step(model, features, labels, steps=2, lr=2e-4, weight_decay=5e-4, betas=(0.9, 0.999), optimizer="adam")
    torch.testing.assert_close(taskres.lora_residual, residual.detach(), rtol=1e-4, atol=1e-7)
    assert taskres.lora_residual.abs().min() > 0
    _, flowers = head("taskres", None, lz.ClassSet.of(CLASSES.names, CLASSES.prompts, CLASSES.tokenizer,
                                                      "oxford_flowers"))
    assert flowers.residual_scale == 1.0 and flowers.record()["residual_scale"] == 1.0


# ---- LP++ -----------------------------------------------------------------------------------------------------------
def test_lp_pp_step_sizes_init_and_iterations_are_theirs():
    g = torch.Generator().manual_seed(5)
    shots, labels = 3, torch.arange(4).repeat_interleave(3)
    raw = torch.randn(1, 12, 32, generator=g)
    model, lp = head("lp_pp", Support(raw, labels))
    features, text = F.normalize(raw[0], dim=-1), their_text(model)
    gram = (features.t() @ features).numpy()
    lr_w = 4 * features.shape[0] / max(np.linalg.eigh(gram)[0])                        # calculate_lr_w
    lr_alpha = features.shape[0] / (torch.sum((features @ text.t()) ** 2, dim=0).max() * 4)  # calculate_lr_alpha
    one_hot = F.one_hot(labels).float()
    alpha_tilde = ((one_hot * (features @ text.t()) / one_hot.sum(0, keepdim=True)).sum(0)).double() * shots
    init_alpha = torch.mean(250 / shots * alpha_tilde)                                  # calculate_init_alpha
    assert lp.weight_step == pytest.approx(lr_w, rel=1e-4) and lp.blend_step == pytest.approx(float(lr_alpha), rel=1e-5)
    torch.testing.assert_close(lp.lora_blend, torch.full((4,), float(init_alpha)), rtol=1e-5, atol=0)
    torch.testing.assert_close(lp.lora_weight, one_hot.t() @ features)                 # class sums, not means
    weight, bias = nn.Parameter(lp.lora_weight.detach().clone()), nn.Parameter(lp.lora_bias.detach().clone())
    alpha = lp.lora_blend.detach().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([weight, bias], lr_w, momentum=0.9)
    for epoch in range(20):                                        # their loop: α's grad is never zeroed
        logits = features @ weight.t() + bias + torch.ones(12, 1) @ alpha[None] * (features @ text.t())
        optimizer.zero_grad()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha.data -= float(lr_alpha) * alpha.grad.data
    step(model, features, labels, steps=20, lr=1.0, weight_decay=0.0, betas=(0.9, 0.999))
    torch.testing.assert_close(lp.lora_weight, weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp.lora_bias, bias.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp.lora_blend, alpha.detach(), rtol=1e-4, atol=1e-5)
    assert int(lp.lora_steps) == 20 and not torch.equal(alpha.detach(), torch.full((4,), float(init_alpha)))


# ---- classes a head was not trained on ------------------------------------------------------------------------------
NEW = lz.ClassSet.of(("apple", "boat"), ("a photo of a apple.", "a photo of a boat."), CLASSES.tokenizer)


@pytest.mark.parametrize("method, zero_shot", [("tip_adapter", True), ("taskres", True), ("lp_pp", True),
                                               ("clip_adapter", False)])
def test_new_classes_get_clips_zero_shot_logits_or_the_adapted_image_feature(method, zero_shot, images):
    support = Support(torch.randn(10, 4, 32, generator=torch.Generator().manual_seed(6)), torch.tensor([0, 1, 2, 3]))
    model, learner = head(method, support)
    with torch.no_grad():
        for p in lz.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        _, features = batch(model, images)
        plain = 100.0 * features @ their_text(model, NEW).t()
        logits = learner.logits(model, features, learner.class_state(model, NEW))
        trained = learner.logits(model, features, learner.class_state(model, CLASSES))
        clip = 100.0 * features @ their_text(model).t()
    assert not torch.allclose(trained, clip, atol=1e-3)  # the trained classes: the head is at work
    if zero_shot:  # no cache entries, residual rows or probe rows for them: the text classifier alone
        torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-4)
    else:          # the adapter is on the image side: new classes are scored through it
        assert not torch.allclose(logits, plain, atol=1e-3)
        mixed = 0.2 * F.relu(F.relu(features @ learner.lora_down.t()) @ learner.lora_up.t()) + 0.8 * features
        torch.testing.assert_close(logits, 100.0 * F.normalize(mixed, dim=-1) @ their_text(model, NEW).t(),
                                   rtol=1e-5, atol=1e-4)
