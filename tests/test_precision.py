"""Mixed precision under test: every method trains under CPU autocast, the skipped fp16 step, the run's record.

torch 2.14's CPU autocast casts matmul, addmm, convolution and scaled-dot-product attention to fp16 as it
does to bf16 (layer norm, softmax and the loss stay fp32), and ``torch.amp.GradScaler("cpu")`` skips steps
with inf gradients as on CUDA, so the fp16 path of a GPU run (autocast + GradScaler, CLIP-LoRA's loop) runs
here on CPU; each adapter layer is checked to compute in the autocast dtype.

- every registered method (one ``CASES`` row each) and both authors' variants (their ``configs/*_authors.yaml``
  method options) train through ``train_adapters`` under bf16 and under fp16 with the GradScaler: finite
  losses, every trainable tensor moves, save/load gives identical outputs, merged equals unmerged within the
  dtype's tolerance (``TOLERANCE``);
- a step whose gradients are forced to inf under fp16 (``InfGradient``) is skipped as train.py's docstring
  and docs/METHODS.md ("Experiment protocol") promise, checked against the same run without it, and against
  what peft's AdaLoRA allocator does with such a step;
- the precision is part of a run's record and settings (``run_experiment``).
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lora_zoo as lz
import lora_zoo.train as train_module
from conftest import tiny_clip
from method_cases import CLASSES, apply_case, cases_with, column, method_of, missing_rows
from lora_zoo.adalora import budget_schedule
from lora_zoo.config import TrainConfig, load_config
from lora_zoo.experiment import run_experiment
from lora_zoo.inject import method_options
from lora_zoo.naming import adapter_state_dict
from lora_zoo.runs import RESULT_FILE, is_finished, run_dir, run_setting
from lora_zoo.results import first_difference
from lora_zoo.scoring import autocast
from lora_zoo.train import train_adapters

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch warns once when the first scheduler step comes before any optimizer step: under fp16 the
    # GradScaler skips the first steps on purpose (below), and the schedule is stepped every iteration
    pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before:UserWarning"),
]

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LR = 1e-2  # a row's "lr" replaces it where 3 steps at 1e-2 move the output too little to test the merge
# The GradScaler starts at 2**16: on this random tiny model (logit scale 100) the scaled fp16 backward
# overflows for the first 6-7 steps, each skipped while the scale halves to 2**10 or 2**9 (the skip test
# pins this trajectory). 11 fp16 iterations leave at least 2 real steps (asserted): zero-initialised factors
# get no gradient into their partners on the first.
ITERATIONS = {"bf16": 3, "fp16": 11}
# Merged and unmerged outputs differ by rounding: under autocast, W + ΔW is rounded to the dtype once where
# the unmerged layer rounds W, the adapter's factors and their sum separately. Measured on the unit-norm
# features of every case: at most 1.1 eps (bf16) and 0.9 eps (fp16), the size of the autocast output's own
# distance from fp32 (0.9 eps). 2 eps leaves room and stays below the adapters' trained effect (asserted).
TOLERANCE = {name: 2 * torch.finfo(dtype).eps for name, dtype in DTYPES.items()}  # 1.6e-2 bf16, 2.0e-3 fp16


#: the rows of tests/method_cases.py that train under autocast (every method, both authors' presets)
CASES = {case: column(case, "precision") for case in cases_with("precision")}


def inputs():
    """One batch of 8 random 32-px images with labels of 4 classes, and the 4 classes' prompt tokens."""
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    tokens = torch.zeros(4, 32, dtype=torch.long)
    for row, length in enumerate((5, 9, 14, 20)):
        tokens[row, 0], tokens[row, length - 1] = 49406, 49407
        tokens[row, 1:length - 1] = torch.randint(1, 49000, (length - 2,), generator=g)
    return images, labels, tokens


IMAGES, LABELS, TOKENS = inputs()


def adapted(case, **extra_options):
    """The tiny model with the case's method (calibrated on the batch where the method needs it), seeded."""
    options = {**CASES[case]["options"], **extra_options}
    model = tiny_clip()
    layer_config = method_options(method_of(case), options)[1]
    apply_case(model, case, IMAGES, TOKENS, options,
               include_padding=getattr(layer_config, "calibration", "") == "authors")
    return model


def classes(model):
    """What the method is trained and scored over: the batch's prompt tokens, a learner's ``CLASSES``."""
    return TOKENS if lz.kind_of(model).name == "weights" else CLASSES


def features(model, precision):
    """Unit-norm image and text features of the batch under ``precision``'s autocast, and the classifier's logits
    / 100 (the logit scale), stacked (fp32)."""
    scorer = lz.scorer_of(model)
    with torch.no_grad(), autocast(CPU, precision):
        logits = scorer.logits(model, scorer.inputs(model, IMAGES), scorer.class_state(model, lz.ClassSet.from_tokens(
            TOKENS) if classes(model) is TOKENS else CLASSES))
        return torch.cat([F.normalize(model.encode_image(IMAGES).float(), dim=-1).flatten(),
                          F.normalize(model.encode_text(TOKENS).float(), dim=-1).flatten(),
                          logits.float().flatten() / 100])


def batches(model):
    """The training batch as the method takes it: images, or a head's features of them."""
    scorer = lz.scorer_of(model)
    with torch.no_grad():
        return [(scorer.inputs(model, IMAGES) if scorer.takes_features else IMAGES, LABELS)]


TRAINED = {}


def trained(case, precision):
    """(model, TrainResult, its fp32 features and trainable tensors at init, the adapter output dtypes seen in
    training), trained once per case and precision."""
    if (case, precision) not in TRAINED:
        model = adapted(case)
        initial = features(model, "fp32")
        before = {n: p.detach().clone() for n, p in lz.named_trainable_parameters(model).items()}
        dtypes = set()
        handles = [a.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
                   for a in lz.adapter_modules(model).values()]
        config = TrainConfig(lr=CASES[case].get("lr", LR), precision=precision)
        result = train_adapters(model, batches(model), classes(model), config, iterations=ITERATIONS[precision],
                                device=CPU, progress=False)
        for handle in handles:
            handle.remove()
        TRAINED[case, precision] = (model, result, initial, before, dtypes)
    return TRAINED[case, precision]


MATRIX = [(case, precision) for case in CASES for precision in DTYPES]


def test_every_method_has_a_precision_case():
    assert not missing_rows(), f"add a row to tests/method_cases.py for {missing_rows()}"
    assert set(lz.list_methods()) <= {method_of(case) for case in CASES}, "add a precision column to its row"
    for case in ("nora_authors", "aira_authors"):
        assert method_options(method_of(case), CASES[case]["options"])[1].variant == "authors"


@pytest.mark.parametrize("case, precision", MATRIX)
def test_trains_under_cpu_autocast(case, precision):
    model, result, _, before, dtypes = trained(case, precision)
    if lz.kind_of(model).name == "weights":
        assert dtypes == {DTYPES[precision]}  # every adapter layer computed in the autocast dtype
    assert len(result.curves["loss"]) == ITERATIONS[precision]
    assert all(math.isfinite(loss) for loss in result.curves["loss"])
    if precision == "fp16":
        assert result.skipped_steps <= ITERATIONS[precision] - 2  # at least two real steps
    else:
        assert result.skipped_steps == 0  # no scaler: every step is taken
    after = lz.named_trainable_parameters(model)  # LoRA-FA's builder froze A: trainable tensors only
    assert after and after.keys() <= before.keys()
    unmoved = [n for n in after if torch.equal(after[n], before[n])]
    assert not unmoved, f"{len(unmoved)} trainable tensors did not move, e.g. {unmoved[0]}"


@pytest.mark.parametrize("case, precision", MATRIX)
def test_save_load_round_trips_under_autocast(case, precision, tmp_path):
    model = trained(case, precision)[0]
    lz.save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = tiny_clip()
    lz.load_adapters(fresh, tmp_path / "adapters.safetensors")
    saved, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)
    assert torch.equal(features(fresh, precision), features(model, precision))


@pytest.mark.parametrize("case, precision", MATRIX)
def test_merged_equals_unmerged_within_the_dtype_tolerance(case, precision):
    model, _, initial, _, _ = trained(case, precision)
    model = copy.deepcopy(model)
    if not lz.kind_of(model).merges:
        assert lz.kind_of(model).merge(model) is False  # a learner: nothing to merge
        return
    if not all(a.mergeable for a in lz.adapter_modules(model).values()):
        assert case == "aira_authors"  # act_scale batch: no fixed weight reproduces it (README)
        with pytest.raises(RuntimeError, match="not mergeable"):
            lz.merge_adapters(model)
        return
    # training moved the output by more than twice the tolerance: a merge that lost the update would fail
    assert (features(model, "fp32") - initial).abs().max() > 2 * TOLERANCE[precision]
    unmerged = features(model, precision)
    lz.merge_adapters(model)
    torch.testing.assert_close(features(model, precision), unmerged, atol=TOLERANCE[precision], rtol=0)


class InfGradient(torch.autograd.Function):
    """A loss term of value 0 (the loss stays finite) whose gradient is +inf in every entry of ``tensor``: an
    fp16 overflow in the backward, at a step of the test's choosing."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.shape, ctx.dtype = tensor.shape, tensor.dtype
        return tensor.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, math.inf, dtype=ctx.dtype)


class OverflowAt:
    """The method's own training hooks, with an ``InfGradient`` term on one adapter tensor at step ``step``."""

    def __init__(self, hooks, tensor, step):
        self.hooks, self.tensor, self.step, self.current = hooks, tensor, step, None

    def __getattr__(self, name):
        return getattr(self.hooks, name)

    def before_forward(self, step):
        self.current = step
        self.hooks.before_forward(step)

    def regularizer(self):
        term = self.hooks.regularizer()
        return term + InfGradient.apply(self.tensor) if self.current == self.step else term


SKIP_RUN, FORCED = 12, 9  # iterations of the skip runs; the step whose gradients are forced to inf
SKIP_CASES = {  # AdaLoRA decides every step between t_init (step 1) and its final decision (step 10)
    "adalora": dict(init_rank=6, target_rank=4, delta_t=1, t_final=0.2),
    "dylora": dict(),
    "lora": dict(),
}


def fp16_run(case, overflow_at=None, resume=None):
    """(TrainResult, the checkpoint state after each step, the last too, the method's hooks, the model) of an fp16
    run of ``SKIP_RUN`` iterations, with step ``overflow_at``'s gradients forced to inf."""
    model, states, made = adapted(case, **SKIP_CASES[case]), [], []

    def hooks_with_overflow(model, total_steps, seed=0):
        first = next(iter(lz.named_trainable_parameters(model).values()))
        made.append(OverflowAt(lz.training_hooks(model, total_steps, seed), first, overflow_at))
        return made[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "training_hooks", hooks_with_overflow)
        result = train_adapters(model, [(IMAGES, LABELS)], TOKENS, TrainConfig(lr=1e-2, precision="fp16",
                                                                                checkpoint_every=1),
                                iterations=SKIP_RUN, device=CPU, progress=False, resume=copy.deepcopy(resume),
                                checkpoint=lambda state: states.append(copy.deepcopy(state)))  # shares AdamW's
    return result, states, made[0].hooks, model                                          # live tensors: copied


def equal_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adamw_steps(state):
    return [int(s["step"]) for s in state["optimizer"]["state"].values()]


@pytest.mark.parametrize("case", sorted(SKIP_CASES))
def test_a_step_with_inf_gradients_is_skipped_and_still_an_iteration(case):
    reference, ref_states, ref_hooks, _ = fp16_run(case)
    forced, states, hooks, model = fp16_run(case, overflow_at=FORCED)
    # the GradScaler starts at 2**16 and halves at each overflow: the reference overflows on its first steps
    # only (the tiny model's scaled backward), then trains; the forced step halves the scale once more
    natural = reference.skipped_steps
    assert 0 < natural <= FORCED - 2  # steps FORCED - 1 and FORCED are real steps in the reference
    scales = [2.0 ** 16 / 2 ** min(step + 1, natural) for step in range(SKIP_RUN)]
    assert [s["scaler"]["scale"] for s in ref_states] == scales
    assert [s["scaler"]["scale"] for s in states] == [s / 2 if step >= FORCED else s for step, s in enumerate(scales)]
    assert forced.skipped_steps == natural + 1
    assert all(math.isfinite(loss) for loss in forced.curves["loss"])
    # identical up to the forced step; the optimizer does not touch the adapters there (AdamW's counts stay)
    assert equal_tensors(states[FORCED - 1]["adapters"], ref_states[FORCED - 1]["adapters"])
    before, after = states[FORCED - 1]["adapters"], states[FORCED]["adapters"]
    assert adamw_steps(states[FORCED]) == adamw_steps(states[FORCED - 1])
    assert adamw_steps(ref_states[FORCED]) == [n + 1 for n in adamw_steps(ref_states[FORCED - 1])]
    assert not equal_tensors(ref_states[FORCED]["adapters"], before)  # the reference's step did change them
    if case == "adalora":  # ... except that the step's allocation still zeroes the λ of the triplets it prunes
        pruned = {k: v for k, v in before.items() if k.endswith("lora_lambda")}
        before = {**before, **{k: v * after[k.replace("lora_lambda", "lora_rank_mask")] for k, v in pruned.items()}}
        before.update({k: after[k] for k in before if k.endswith("lora_rank_mask")})
    assert equal_tensors(after, before)
    # the cosine schedule and the iteration count advance as in the uninterrupted run (CLIP-LoRA's loop)
    lr0, eta_min = 1e-2, TrainConfig().resolved().eta_min
    cosine = [eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * t / SKIP_RUN)) / 2 for t in range(SKIP_RUN)]
    assert forced.curves["lr"] == reference.curves["lr"] == pytest.approx(cosine, rel=1e-9)
    assert states[FORCED]["step"] == FORCED + 1 and states[FORCED]["scheduler"]["last_epoch"] == FORCED + 1
    assert len(states[FORCED]["history"]["loss"]) == len(states[FORCED]["history"]["lr"]) == FORCED + 1
    # a checkpoint taken after the skipped step resumes to the same tensors and the same record
    resumed, _, resumed_hooks, resumed_model = fp16_run(case, resume=states[FORCED])
    assert resumed.resumed_from == FORCED + 1 and resumed.skipped_steps == forced.skipped_steps
    assert resumed.curves == forced.curves
    assert equal_tensors(adapter_state_dict(resumed_model), adapter_state_dict(model))
    if case == "dylora":  # the sampler draws at every iteration, skipped or not
        assert hooks.sampled == ref_hooks.sampled == resumed_hooks.sampled and len(hooks.sampled) == SKIP_RUN
    if case == "adalora":
        check_adalora_skip(hooks, ref_hooks, states, ref_states, forced)


def check_adalora_skip(hooks, ref_hooks, states, ref_states, forced):
    """The importance averages take nothing from the skipped step, which is counted; the budget follows the
    step number (the decisions of the run without the skipped step, at eq. 8's budgets)."""
    for average in ("smoothed", "uncertainty"):
        assert equal_tensors(states[FORCED]["hooks"][average], states[FORCED - 1]["hooks"][average])
        assert not equal_tensors(ref_states[FORCED]["hooks"][average], ref_states[FORCED - 1]["hooks"][average])
    summary = hooks.summary()
    assert summary["adalora_skipped_importance_steps"] == forced.skipped_steps
    assert ref_hooks.summary()["adalora_skipped_importance_steps"] == forced.skipped_steps - 1
    initial, target = 6 * 12, 4 * 12  # init_rank and target_rank times the 12 adapted layers
    expected = [(t, budget_schedule(t, SKIP_RUN, initial, target, 0.1, 0.2)) for t in range(2, 10)] + [(10, target)]
    assert hooks.decisions == ref_hooks.decisions == expected
    assert len(hooks.rank_history) == SKIP_RUN


def test_adalora_skipped_step_against_peft():
    """peft's allocator takes whatever gradients it is given: called on a skipped step (inf gradients), its
    averages become non-finite for the rest of the schedule. Ours leaves them as they were, which is peft's
    loop with ``update_and_allocate`` not called on that step: the same decisions at every step."""
    pytest.importorskip("peft")
    from test_references import adalora_pair, adalora_tensors, kept

    total, skipped = 20, 7  # decisions at steps 3, 6, 9, 12 (delta_t 3 after t_init 2), the final one at 15
    runs = {name: adalora_pair(total, t_init=2, t_final=5, delta_t=3) for name in ("called", "not called")}
    _, ours, allocator = runs["called"]
    g = torch.Generator().manual_seed(8)
    for t in range(total):
        grads = [torch.randn(a.shape, generator=g) * 0.1 for a, _ in adalora_tensors(runs["called"][0], ours)]
        if t == skipped:
            grads[0][0, 0] = math.inf
        for theirs, our_model, _ in runs.values():
            for (a, b), grad in zip(adalora_tensors(theirs, our_model), grads):
                a.grad, b.grad = grad.clone(), grad.view(b.shape).clone()
        allocator.after_step(t)
        runs["called"][0].base_model.update_and_allocate(t)
        if t != skipped:
            runs["not called"][0].base_model.update_and_allocate(t)
        if t == skipped:
            averages = runs["called"][0].base_model.rankallocator.exp_avg_ipt.values()
            assert not all(bool(v.isfinite().all()) for v in averages)
        assert kept(runs["not called"][0], ours)[0] == kept(runs["not called"][0], ours)[1], f"step {t}"
    theirs_kept, ours_kept = kept(runs["called"][0], ours)
    assert theirs_kept != ours_kept  # peft, called on the skipped step, ends with another pattern (NaN scores)
    assert allocator.summary()["adalora_skipped_importance_steps"] == 1
    assert allocator.decisions == [(3, 5), (6, 4), (9, 4), (12, 4), (15, 4)]


def small_config(data_root, out, **overrides):
    values = dict(method="lora", root_path=str(data_root), output_dir=str(out), backbone="tiny-vit", shots=2,
                  n_iters=3, batch_size=4, num_workers=0, eval_batch_size=16, device="cpu")
    return load_config([], {**values, **overrides})


def test_precision_null_resolves_by_device_before_anything_compares_it():
    resolved = [load_config([], {"device": device}).train.precision for device in ("cpu", "cuda", "cuda:1")]
    assert resolved == ["fp32", "fp16", "fp16"]
    assert load_config([], {"device": "cuda", "precision": "bf16"}).train.precision == "bf16"
    assert run_setting(load_config([], {"device": "cpu"})) == run_setting(load_config([], {"precision": "fp32",
                                                                                          "device": "cpu"}))


def test_precision_and_skipped_steps_are_recorded_and_part_of_the_run_setting(data_root, tmp_path):
    bf16 = small_config(data_root, tmp_path, precision="bf16")
    run_experiment(bf16, progress=False)
    result_file = run_dir(bf16) / RESULT_FILE
    saved = json.loads(result_file.read_text())
    assert saved["precision"] == saved["config"]["train"]["precision"] == "bf16"
    assert saved["skipped_steps"] == 0 and saved["iterations"] == 6
    fp32 = small_config(data_root, tmp_path)  # precision null on CPU: fp32, the same run folder
    assert fp32.train.precision == "fp32" and run_dir(fp32) == run_dir(bf16)
    assert first_difference(run_setting(bf16), run_setting(fp32)) == "precision: bf16 there, fp32 now"
    assert is_finished(run_dir(bf16), bf16)
    with pytest.raises(ValueError, match="other settings \\(precision: bf16 there, fp32 now\\)"):
        is_finished(run_dir(bf16), fp32)
    written = result_file.read_bytes()
    with pytest.raises(ValueError, match="precision: bf16 there, fp32 now"):
        run_experiment(fp32, progress=False)
    assert result_file.read_bytes() == written
    # fp16: the GradScaler's skips on the tiny model (its first steps overflow) are recorded
    fp16 = small_config(data_root, tmp_path / "fp16", precision="fp16")
    recorded = run_experiment(fp16, progress=False)
    assert recorded["precision"] == "fp16" and 0 < recorded["skipped_steps"] <= recorded["iterations"]
