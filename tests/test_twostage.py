"""2SFS (``lora_zoo/twostage.py``) against the official arithmetic (FarinaMatteo/rethinking_fewshot_vlms), re-implemented
here: which LayerNorms their selection code leaves trainable (``fs/utils/model_utils.py``), their two stages
(``fs/twostage.py`` ``run_twostage``: AdamW and a cosine per stage, the head initialised from the tuned text
encoder) and their inference on classes the head has no row for (``SingleStreamClassifier.infer``).
"""
import json

import pytest
import torch
import torch.nn.functional as F

import lora_zoo as lz
import lora_zoo.train as train
from conftest import cli, killed_at, one_line, synthetic_datasets, tiny_clip
from lora_zoo.config import TrainConfig
from lora_zoo.scoring import ClassSet, text_features
from lora_zoo.twostage import block_norms
from method_cases import CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = torch.tensor([0, 1, 3])


def their_trainable_norms(model):
    """Their ``trainable_norm_params(model, 'both', 0, 0)``: modules in ``named_modules`` order, each with a block
    index (−1 outside the residual blocks; ln_post and ln_final also at the tower's depth, ln_pre at 0, so those
    are visited twice); a LayerNorm at index ≥ 0 is set trainable, any other module frozen, recursively."""
    depth = {"vision": len(model.visual.transformer.resblocks), "text": len(model.transformer.resblocks)}
    for name, module in model.named_modules():
        visits = [depth["vision"]] if "ln_post" in name else [depth["text"]] if "ln_final" in name else []
        visits += [0] if "ln_pre" in name else []
        parts = name.split("resblocks.")
        visits.append(-1 if len(parts) == 1 else int(parts[-1].split(".")[0]))
        for index in visits:
            module.requires_grad_(isinstance(module, torch.nn.LayerNorm) and index >= 0)
    return {name.rpartition(".")[0] for name, p in model.named_parameters() if p.requires_grad}


def test_the_layer_norms_that_train_are_the_ones_their_selection_code_leaves_trainable(images, texts):
    theirs = their_trainable_norms(tiny_clip())
    model = tiny_clip()
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(texts)
    lz.apply_method(model, "twostage", classes=CLASSES)
    assert {name for _, _, name in block_norms(model)} == theirs and len(theirs) == 8  # ln_1, ln_2 × 2 blocks × 2
    assert not any("ln_pre" in n or "ln_post" in n or "ln_final" in n for n in theirs)
    with torch.no_grad():  # the wrapped LayerNorms compute what they computed
        assert all(torch.equal(a, b) for a, b in zip((model.encode_image(images), model.encode_text(texts)), before))


def their_two_stages(model, images, tokens, iterations, lr, weight_decay):
    """Their ``run_twostage`` on one batch in fp32: stage 1 trains ln_1/ln_2 (AdamW, cosine over int(0.6 · total)),
    then the head is the tuned encoder's normalised text features, trained with the image tower frozen (a new
    AdamW, cosine over the rest); returns (losses, lrs, head at the switch, head, the model)."""
    switch = int(iterations * 0.6)
    params = [p for n, p in model.named_parameters() if ".ln_1." in n or ".ln_2." in n]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, switch, eta_min=1e-6)
    losses, lrs = [], []

    def step(loss):  # one of their iterations, recording the learning rate it ran at and the loss
        lrs.append(optimizer.param_groups[0]["lr"])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    for _ in range(switch):
        text = F.normalize(model.encode_text(tokens), dim=-1)
        image = F.normalize(model.encode_image(images), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * image @ text.t(), LABELS)
        step(loss)
    with torch.no_grad():
        head = torch.nn.Parameter(F.normalize(model.encode_text(tokens), dim=-1))
    initial = head.detach().clone()
    optimizer = torch.optim.AdamW([head], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations - switch, eta_min=1e-6)
    for _ in range(iterations - switch):
        with torch.no_grad():
            image = F.normalize(model.encode_image(images), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * image @ F.normalize(head, dim=-1).t(), LABELS)
        step(loss)
    return losses, lrs, initial, head.detach(), model


@pytest.fixture(scope="module")
def trained():
    """Ours through the one loop and theirs, 5 iterations (3 + 2) on the same batch and weights."""
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = tiny_clip()
    lz.apply_method(ours, "twostage", classes=CLASSES)
    learner, heads = lz.scorer_of(ours), []
    start = learner.start_second_stage
    learner.start_second_stage = lambda model: (start(model), heads.append(learner.lora_head.detach().clone()))
    config = TrainConfig(lr=1e-2, weight_decay=1e-2, precision="fp32")
    result = train.train_adapters(ours, [(images, LABELS)], CLASSES, config, iterations=5, device=torch.device("cpu"),
                                  progress=False)
    theirs = their_two_stages(tiny_clip().train(), images, CLASSES.tokens, 5, 1e-2, 1e-2)
    return ours, result, heads, theirs, images


def test_the_stage_switch_head_init_and_both_stages_equal_theirs(trained):
    ours, result, heads, (losses, lrs, initial, head, theirs), _ = trained
    assert result.hooks_summary == {"twostage_head_from_iteration": 3}
    assert result.curves["lr"] == pytest.approx(lrs, rel=1e-6)  # the cosine restarts at the switch
    assert lrs[3] == pytest.approx(1e-2) and lrs[2] < 3e-3
    assert result.curves["loss"] == pytest.approx(losses, rel=1e-5)
    assert len(heads) == 1  # once, at iteration 3, from the text encoder as stage 1 left it
    torch.testing.assert_close(heads[0], initial, atol=1e-6, rtol=0)
    learner = lz.scorer_of(ours)
    torch.testing.assert_close(learner.lora_head.detach(), head, atol=1e-6, rtol=0)
    assert (head - initial).abs().max() > 1e-3 and int(learner.lora_stage) == 2
    tuned = dict(zip((name for _, _, name in block_norms(ours)), learner.norms))
    for name, copy_ in tuned.items():  # stage 1 only: stage 2 left them as theirs left them
        torch.testing.assert_close(copy_.lora_weight.detach(), theirs.get_submodule(name).weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(copy_.lora_bias.detach(), theirs.get_submodule(name).bias, atol=1e-5, rtol=0)
        assert torch.equal(ours.get_submodule(name).base_layer.weight, tiny_clip().get_submodule(name).weight)


def test_new_classes_get_fresh_text_features_of_the_tuned_encoder_as_their_inference_does(trained):
    ours, _, _, (_, _, _, head, theirs), images = trained
    names = ("cat", "a new class", "dog", "another")
    evaluated = ClassSet.of(names, [f"a photo of a {n}." for n in names], CLASSES.tokenizer)
    learner = lz.scorer_of(ours)
    with torch.no_grad():
        state = learner.class_state(ours, evaluated)
        logits = learner.logits(ours, images, state)
        rows = {n: i for i, n in enumerate(CLASSES.names)}  # theirs: trained rows by name, the rest encoded
        fresh = theirs.encode_text(evaluated.tokens)
        classifier = F.normalize(torch.stack([head[rows[n]] if n in rows else fresh[i] for i, n in enumerate(names)]),
                                 dim=-1)
        expected = theirs.logit_scale.exp() * F.normalize(theirs.encode_image(images), dim=-1) @ classifier.t()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert state.second_stage and not torch.allclose(state.rows[1], text_features(tiny_clip(), evaluated.tokens)[1])


def test_a_saved_second_stage_loads_as_the_second_stage(trained, tmp_path):
    ours, _, _, _, images = trained
    lz.save_adapters(ours, tmp_path / "a.safetensors")
    fresh = tiny_clip()
    lz.load_adapters(fresh, tmp_path / "a.safetensors")
    logits = []
    with torch.no_grad():
        for model in (ours, fresh):
            scorer = lz.scorer_of(model)
            logits.append(scorer.logits(model, images, scorer.class_state(model, CLASSES)))
    assert torch.equal(logits[0], logits[1]) and int(lz.scorer_of(fresh).lora_stage) == 2


def test_steps_of_tensors_that_train_in_turns_all_count():
    """skipped_steps = iterations − the optimizer's steps: per-tensor AdamW counts would see 3 of these 5."""
    model = tiny_clip()
    lz.apply_method(model, "twostage", classes=CLASSES)
    optimizer = lz.build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999))
    train.count_steps(optimizer)  # as the loop counts them
    learner = lz.scorer_of(model)
    for step in range(5):
        stage = list(learner.norms.parameters()) if step < 3 else [learner.lora_head]
        optimizer.zero_grad(set_to_none=True)
        for param in stage:
            param.grad = torch.ones_like(param)
        optimizer.step()
    assert max(int(s["step"]) for s in optimizer.state.values()) == 3 and train.optimizer_steps(optimizer) == 5


ARGS = ["--method", "twostage", "--backbone", "tiny-clip", "--shots", "2", "--n_iters", "6", "--batch_size", "4",
        "--num_workers", "0", "--eval_batch_size", "16", "--quiet", "--checkpoint_every", "4"]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """The synthetic DTD of conftest and a synthetic EuroSAT to evaluate on (--eval_on)."""
    return synthetic_datasets(tmp_path_factory.mktemp("two"), {"dtd": 4, "eurosat": 4})


def test_killed_after_the_switch_it_resumes_to_the_same_result_and_evaluates_again(two_datasets, tmp_path, capsys,
                                                                                   monkeypatch):
    args = ARGS + ["--root_path", two_datasets]
    assert cli(capsys, *args, "--output_dir", tmp_path / "whole")[0] == 0
    original = train.training_step
    monkeypatch.setattr(train, "training_step", killed_at(10))
    assert cli(capsys, *args, "--output_dir", tmp_path / "killed")[0] == 130  # checkpoints at 4 and 8; switch at 7
    monkeypatch.setattr(train, "training_step", original)
    assert cli(capsys, *args, "--output_dir", tmp_path / "killed")[0] == 0
    folder = "tiny-clip/dtd/2shots/seed1/twostage"
    whole, resumed = (json.loads((tmp_path / where / folder / "result.json").read_text()) for where in ("whole", "killed"))
    assert resumed["resumed_from"] == 8 and whole["hooks_summary"] == {"twostage_head_from_iteration": 7}
    for key in ("accuracy", "final_loss", "loss_history", "hooks_summary", "trainable_params"):
        assert whole[key] == resumed[key], key
    assert whole["kind"] == "tensors" and whole["merged"] is False and whole["iterations"] == 12
    assert whole["trainable_params"] == 4 * 2 * 2 * 128 + 4 * 2 * 2 * 64 + 4 * 64  # LayerNorms, then a 4 × 64 head
    code, err = cli(capsys, *args, "--output_dir", tmp_path / "whole", "--eval_only")
    assert code == 0 and json.loads((tmp_path / "whole" / folder / "eval.json").read_text())["accuracy"] == \
        whole["accuracy"], err  # its saved stage 2, reloaded
    # another dataset's classes: no head rows, so the tuned encoder's text features (the run is not trained again)
    assert cli(capsys, *args, "--output_dir", tmp_path / "whole", "--eval_on", "eurosat")[0] == 0
    target = json.loads((tmp_path / "whole" / folder / "eval_on/eurosat.json").read_text())
    assert target["classes"] == 4 and 0 <= target["accuracy"] <= 100
    assert json.loads((tmp_path / "whole" / folder / "result.json").read_text())["final_loss"] == whole["final_loss"]


def test_base_to_new_run_records_both_halves(data_root, tmp_path, capsys):
    code, err = cli(capsys, *ARGS, "--root_path", data_root, "--output_dir", tmp_path, "--protocol", "base2new")
    assert code == 0, err
    result = json.loads((tmp_path / "tiny-clip/dtd/base2new/2shots/seed1/twostage/result.json").read_text())
    assert result["protocol"] == "base2new" and result["method_config"]["first_stage"] == 0.6
    assert (result["base_test_images"], result["new_test_images"], result["iterations"]) == (8, 8, 12)
    assert all(0 <= result[key] <= 100 for key in ("base_accuracy", "new_accuracy", "harmonic_mean"))


@pytest.mark.parametrize("argv, message", [
    (["--first_stage", "1.5"], "first_stage must be in [0, 1], got 1.5"),
    (["--set", "method_options.rank=2"], "unknown option(s) rank for method twostage"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, data_root, tmp_path, capsys):
    code, err = cli(capsys, *ARGS, "--root_path", data_root, "--output_dir", tmp_path, *argv)
    assert code == 1 and message in one_line(err)
    assert not any(tmp_path.iterdir())
