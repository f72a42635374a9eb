"""The one training loop every method shares (METHODS.md, "Experiment protocol").

CLIP few-shot adaptation as in CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024) and
the NoRA/AIRA papers (Li et al., ICCV 2025), for every kind of method:

- the method's scorer (``kinds.scorer_of``; ``scoring.Scorer`` for weight adapters:
  logits = 100 · normalize(image features) @ normalize(class text features)ᵀ, the logit
  scale fixed) gives the loss terms (cross-entropy on the labels, and a method's own terms)
  and their gradients (``Scorer.backward``; ProGrad projects one on the other);
- the optimizer of the run's builder (``optim.py``: the method's by default, e.g. LoRA+'s
  AdamW groups or the prompt learners' SGD; with ``decay_to_init`` residual-initialised
  tensors decay toward θ₀ instead of 0; fused on CUDA) and the learning-rate schedule
  (``lr_schedule``: cosine to ``eta_min`` stepped every iteration, or Dassl's per-epoch
  cosine after a constant warm-up), both stepped every iteration; the train loader is
  cycled until the requested number of iterations; every loop setting comes from one
  ``TrainConfig``, resolved from the method's recipe;
- the class side (text features) is recomputed with gradients every step when it trains
  (an adapted text tower, learned prompts), computed once under ``no_grad`` otherwise;
- ``precision``: fp32, or fp16 / bf16 autocast (fp16 with a GradScaler), on any device;
  the default is fp16 on CUDA (as CLIP-LoRA and the authors run) and fp32 elsewhere;
- a method's schedule runs through ``lora_zoo.hooks`` (``before_forward``,
  ``regularizer``, ``after_backward`` on unscaled gradients, ``after_step``,
  ``finish``, ``summary``), seeded from the run's seed.

A step the GradScaler skips (inf/NaN gradients under fp16) is still an iteration, as in
CLIP-LoRA's loop: the cosine schedule and the step count advance and DyLoRA's sampler
draws as usual; the adapters do not change and AdaLoRA's importance takes nothing from
it (it counts the step in ``adalora_skipped_importance_steps``). The host waits for the
device only every ``log_every`` iterations (and at checkpoints): the losses of the steps
in between are checked then, so a non-finite loss stops training with ``NonFiniteError``
naming its iteration within ``log_every`` steps, before anything is saved from it; the
adapters are checked before each checkpoint and at the end.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .attached import method_setup
from .catalog import protocol_lr
from .config import TrainConfig, default_precision
from .errors import NonFiniteError
from .hooks import training_hooks
from .host import available_cpus, cpus_busy_elsewhere
from .kinds import scorer_of
from .naming import count_trainable, named_trainable_parameters
from .optim import build_optimizer
from .scoring import Scorer, as_classes, autocast

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    trainable_params: int  # counted after the optimizer builder ran (LoRA-FA freezes A)
    optimizer_groups: list[dict[str, Any]]  # name, tensors, parameters and initial lr of each group
    iterations: int
    seconds: float
    final_loss: float
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (iteration, mean loss since last entry)
    hooks_summary: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)  # per-iteration "loss" and "lr"
    resumed_from: int = 0                                   # iterations done before this process (resume)
    skipped_steps: int = 0                                  # steps the GradScaler skipped (fp16), whole run

    @property
    def iterations_per_second(self) -> float:
        """Of this process: ``seconds`` counts only the iterations after ``resumed_from``."""
        done = self.iterations - self.resumed_from
        return done / self.seconds if self.seconds > 0 else float("nan")


def cycle(loader: Iterable) -> Iterator:
    """Batches of ``loader`` forever (a new pass, reshuffled, each time it runs out)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("training loader is empty")


def prepare_device(device: torch.device, threads: int | None = None, workers: int = 0) -> int:
    """Process-wide settings for running on ``device``; returns the intra-op thread count.

    On CPU: flush subnormal floats to zero (tiny LoRA updates from B = 0 and Adam moments made CPU
    kernels ~100× slower), and never oversubscribe the cores: ``threads`` if given, else the
    ``OMP_NUM_THREADS`` the process was started with, else the cores that other processes leave free
    (measured over 0.3 s at start) divided among the main process and its ``workers`` loader processes
    (each worker runs one thread), at least 1. OpenMP threads that share a core with another process
    wait on each other at every parallel region: measured on 2 cores beside a one-thread process, the
    demo took 2.8× its idle time with 2 threads and 1.3× with 1.
    """
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        if threads is None and "OMP_NUM_THREADS" not in os.environ:
            free = round(available_cpus() - cpus_busy_elsewhere())
            threads = max(1, free // (1 + workers))
        if threads is not None:
            torch.set_num_threads(threads)
    return torch.get_num_threads()


def training_step(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, classes, optimizer, hooks,
                  step: int, device: torch.device, precision: str = "fp32", scaler=None, fixed_state: Any = None,
                  scorer: Scorer | None = None) -> torch.Tensor:
    """One optimizer step with the method's hooks; returns the loss (a detached tensor: reading it waits for the
    device). ``inputs`` are what the method's scorer takes (images, or a head's cached features); ``classes`` a
    ``ClassSet`` or class prompts' token ids; ``fixed_state`` the class side computed once (``Scorer.fixed_classes``).
    ``optimizer=None`` only runs backward (the frozen lower bound of ``scripts/bench.py``). With a ``scaler``
    (fp16), the hooks see unscaled gradients and a step with inf/NaN gradients is skipped."""
    scorer = scorer or scorer_of(model)
    hooks.before_forward(step)
    with autocast(device, precision):
        state = fixed_state if fixed_state is not None else scorer.class_state(model, as_classes(classes))
        losses = scorer.losses(model, inputs, labels, state)
        regularizer = hooks.regularizer()
        if not (isinstance(regularizer, float) and regularizer == 0.0):
            losses["regularizer"] = regularizer
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss = scorer.backward(losses, scaler.scale if scaler is not None else (lambda total: total))
    if scaler is not None and optimizer is not None:
        scaler.unscale_(optimizer)  # hooks see true gradients
    hooks.after_backward(step)
    if optimizer is not None:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    hooks.after_step(step)
    return loss.detach()


@dataclass
class Loop:
    """What the loop steps: the optimizer and its schedule, the GradScaler, the method's hooks."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    hooks: Any
    lr: float
    groups: list[dict[str, Any]]
    restarts: tuple[int, ...] = ()   # iterations at which the optimizer's state starts again (``part_starts``)


def epoch_cosine(config: TrainConfig, per_epoch: int, epochs: int, base_lr: float) -> Callable[[int], float]:
    """Dassl's schedule as a factor of ``base_lr`` at each iteration: the whole of each of the first
    ``warmup_epochs`` epochs at the constant ``warmup_lr``, then ``eta_min + (base - eta_min)·(1 + cos(π·(e −
    warmup_epochs)/epochs))/2`` for epoch ``e`` (0-based), stepped once per epoch (so the last epoch does not
    reach ``eta_min``; docs/METHODS.md, "Kinds of methods and their recipes")."""
    def factor(step: int) -> float:
        epoch = step // per_epoch
        if epoch < config.warmup_epochs:
            return config.warmup_lr / base_lr
        cosine = (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / epochs)) / 2
        return (config.eta_min + (base_lr - config.eta_min) * cosine) / base_lr
    return factor


def cycle_starts(iterations: int, cycles: int) -> list[int]:
    """The first iteration of each of ``cycles`` equal consecutive parts of a run (the last one takes the rest)."""
    return [cycle * (iterations // cycles) for cycle in range(max(1, min(cycles, iterations)))]


def part_starts(iterations: int, cycles: int, restarts: tuple[int, ...] = ()) -> list[int]:
    """The first iteration of each part of a run: its ``cycles`` equal parts (``schedule_cycles``), each also cut at
    the steps the method's hooks name (``TrainingHooks.restarts``: 2SFS's second stage)."""
    return sorted(set(cycle_starts(iterations, cycles)) | {step for step in restarts if 0 < step < iterations})


def cycle_factor(config: TrainConfig, per_epoch: int, length: int, base_lr: float) -> Callable[[int], float]:
    """The schedule's factor of ``base_lr`` at each iteration of a part of ``length`` iterations."""
    if config.lr_schedule == "constant":
        return lambda step: 1.0
    if config.lr_schedule == "cosine":  # CosineAnnealingLR's closed form
        return lambda step: (config.eta_min + (base_lr - config.eta_min) * (1 + math.cos(math.pi * step / length)) / 2
                             ) / base_lr
    return epoch_cosine(config, per_epoch, max(1, -(-length // per_epoch)), base_lr)


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, iterations: int, per_epoch: int,
                 restarts: tuple[int, ...] = ()):
    """The run's learning-rate schedule, stepped once per iteration (``TrainConfig.lr_schedule``), started again at
    each of ``schedule_cycles`` parts of the run and at each step of ``restarts`` (the method's hooks')."""
    starts = part_starts(iterations, config.schedule_cycles or 1, restarts)
    if len(starts) == 1 and config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=config.eta_min)
    ends = starts[1:] + [iterations]

    def cyclic(base_lr: float) -> Callable[[int], float]:
        parts = [(start, cycle_factor(config, per_epoch, end - start, base_lr)) for start, end in zip(starts, ends)]
        return lambda step: next((f(step - start) for start, f in reversed(parts) if step >= start), 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [cyclic(group["lr"]) for group in optimizer.param_groups])


def build_loop(model: nn.Module, config: TrainConfig, iterations: int, device: torch.device, seed: int,
               precision: str, per_epoch: int | None = None) -> Loop:
    """The optimizer of the run's builder at its lr (``config.lr = None``: the method's registered one), the
    schedule over ``iterations`` (epochs of ``per_epoch`` iterations for a per-epoch schedule), a GradScaler
    (enabled for fp16) and the method's training hooks."""
    config = config.resolved()
    lr = protocol_lr(config.lr, method_setup(model).method) * config.lr_scale
    optimizer = build_optimizer(model, lr, weight_decay=config.weight_decay, betas=config.betas,
                                optimizer=config.optimizer, decay_to_init=config.decay_to_init,
                                **config.optimizer_options)
    groups = [{"name": g.get("name", "?"), "tensors": len(g["params"]), "parameters": sum(p.numel() for p in g["params"]),
               "lr": g["lr"]} for g in optimizer.param_groups]
    hooks = training_hooks(model, iterations, seed)
    scheduler = lr_scheduler(optimizer, config, iterations, per_epoch or iterations, hooks.restarts())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    count_steps(optimizer)
    hooks.per_epoch = per_epoch or iterations  # where epochs end, for a hook acting there (Tip-Adapter-F, authors)
    return Loop(optimizer, scheduler, scaler, hooks, lr, groups,
                tuple(part_starts(iterations, config.schedule_cycles or 1, hooks.restarts())[1:]))


def check_finite_adapters(model: nn.Module, when: str) -> None:
    """``NonFiniteError`` naming ``when`` if any trainable adapter tensor holds a NaN or an infinity."""
    tensors = named_trainable_parameters(model)
    if tensors and not bool(torch.stack([t.isfinite().all() for t in tensors.values()]).all()):
        bad = next(name for name, t in tensors.items() if not bool(t.isfinite().all()))
        raise NonFiniteError(f"adapter tensor {bad} is not finite {when}; stopped, nothing saved as a result "
                             "(try a lower lr)")


def record_losses(pending: list[torch.Tensor], history: dict[str, list], first_step: int, iterations: int,
                  lr: float) -> None:
    """Move the losses of steps ``first_step``, ... into ``history`` (one wait for the device); a non-finite one
    stops the run with ``NonFiniteError`` naming its iteration."""
    if not pending:
        return
    values = torch.stack(pending).float().tolist()
    pending.clear()
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise NonFiniteError(f"training loss is {value} at iteration {first_step + offset + 1}/{iterations} "
                                 f"(lr {lr:.3g}); stopped, nothing saved as a result (try a lower lr)")
    history["loss"].extend(values)


STEPS_TAKEN = "steps_taken"  # the optimizer's first param group counts its steps: its state_dict keeps the count


def count_steps(optimizer: torch.optim.Optimizer) -> None:
    """Count the steps ``optimizer`` takes (a step the GradScaler skips is not one), whatever its algorithm, in its
    first param group, which a resumed run loads with the optimizer: not in its per-tensor state, which a new part
    of the run (``schedule_cycles``) clears, and which SGD does not keep."""
    optimizer.param_groups[0][STEPS_TAKEN] = 0

    def counted(opt, args, kwargs):
        group = opt.param_groups[0]
        if STEPS_TAKEN in group:  # a checkpoint from before the count has none
            found_inf = getattr(opt, "found_inf", None)  # a fused optimizer is always stepped and skips by itself
            group[STEPS_TAKEN] = group[STEPS_TAKEN] + (1 if found_inf is None else (found_inf == 0).to(torch.int64))
    optimizer.register_step_post_hook(counted)


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps the optimizer took (a step the GradScaler skips is not one): its count (``count_steps``), else (a
    checkpoint from before it) Adam's per-tensor count."""
    if STEPS_TAKEN in optimizer.param_groups[0]:
        return int(optimizer.param_groups[0][STEPS_TAKEN])
    counts = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    return max(counts, default=0)


def loss_entries(losses: list[float], log_every: int, iterations: int) -> list[tuple[int, float]]:
    """``(iteration, mean loss since the last entry)`` every ``log_every`` iterations and at the end."""
    entries = [(k, sum(losses[max(0, k - log_every):k]) / len(losses[max(0, k - log_every):k]))
               for k in range(log_every, iterations + 1, log_every)]
    if iterations % log_every:
        entries.append((iterations, sum(losses[-(iterations % log_every):]) / (iterations % log_every)))
    return entries


# long: the loop reads top to bottom as one iteration; each part of it is a function above
def train_adapters(model: nn.Module, loader: Iterable, classes, config: TrainConfig | None = None,
                   *, iterations: int, device: torch.device, seed: int = 0, per_epoch: int | None = None,
                   progress: bool = True, resume: dict | None = None,
                   checkpoint: Callable[[dict], Any] | None = None, on_log: Callable[..., Any] | None = None
                   ) -> TrainResult:
    """Train the method applied to ``model`` (``apply_adapters``, ``apply_method``) for ``iterations`` steps.

    ``classes``: the training classes (a ``ClassSet``, or their prompts' token ids for weight adapters).
    ``seed`` seeds the method's hooks (DyLoRA's rank sampler). ``loader`` yields training batches of what the
    method's scorer takes (images; a head's cached features): an endless stream such as
    ``datasets.loader.TrainStream`` or any loader, cycled; ``per_epoch``: its batches per pass (a per-epoch
    learning-rate schedule counts epochs in them). ``resume``: a state from
    ``resume.capture`` to continue from (``loader`` must then start at its step); ``checkpoint(state)`` is
    called every ``config.checkpoint_every`` iterations. ``on_log(step, loss, lr)`` is called every
    ``config.log_every`` iterations (default: about 20 entries per run) with the mean loss since the last
    call, and at the last iteration (the trained state, kept until the caller has saved the result). Raises
    ``NonFiniteError`` for a non-finite loss (within ``log_every`` steps) or adapter tensor.
    """
    from tqdm.auto import tqdm

    from . import resume as resume_state

    config = (config or TrainConfig()).resolved()
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    precision = config.precision or default_precision(device.type)
    loop = build_loop(model, config, iterations, device, seed, precision, per_epoch)
    history: dict[str, list] = {"loss": [], "lr": []}  # per iteration
    start = 0
    if resume is not None:
        start = resume_state.restore(model, loop.optimizer, loop.scheduler, loop.scaler, loop.hooks, resume)
        history = {k: list(v) for k, v in resume["history"].items()}
        logger.info("resuming at iteration %d/%d", start, iterations)
    trainable = count_trainable(model)
    logger.info("%d trainable parameters, lr %.3g, %d iterations, %s", trainable, loop.lr, iterations, precision)
    classes, scorer = as_classes(classes).to(device), scorer_of(model)
    fixed_state = None
    if scorer.fixed_classes:  # nothing of the class side trains: computed once
        with torch.no_grad(), autocast(device, precision):
            fixed_state = scorer.class_state(model, classes)
    log_every = config.log_every or max(1, iterations // 20)
    batches, pending = cycle(loader), []
    model.train()
    bar = tqdm(range(start, iterations), desc="train", disable=not progress, dynamic_ncols=True, leave=False,
               initial=start, total=iterations)
    started = time.perf_counter()
    for step in bar:
        inputs, labels = next(batches)
        if step in loop.restarts:  # a new part of the run: a fresh optimizer, as a new Dassl run builds one
            loop.optimizer.state.clear()
        lr_now = loop.optimizer.param_groups[0]["lr"]
        pending.append(training_step(model, inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                                     classes, loop.optimizer, loop.hooks, step, device, precision, loop.scaler,
                                     fixed_state, scorer))
        loop.scheduler.step()
        history["lr"].append(lr_now)
        done = step + 1
        saving = checkpoint is not None and config.checkpoint_every and (done % config.checkpoint_every == 0
                                                                          or done == iterations)
        if done % log_every == 0 or done == iterations or saving:
            record_losses(pending, history, len(history["loss"]), iterations, loop.lr)
            window = history["loss"][-((step % log_every) + 1):]
            if progress:
                bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", lr=f"{lr_now:.2e}", refresh=False)
            if done % log_every == 0 or done == iterations:
                logger.debug("iteration %d/%d  loss %.4f  lr %.3e", done, iterations, sum(window) / len(window), lr_now)
                if on_log is not None:
                    on_log(done, sum(window) / len(window), lr_now)
        if saving:  # the last one keeps the trained adapters until the run's result is written
            check_finite_adapters(model, f"after iteration {done}/{iterations} (lr {loop.lr:.3g})")
            checkpoint(resume_state.capture(model, loop.optimizer, loop.scheduler, loop.scaler, loop.hooks, done,
                                            history))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    bar.close()
    check_finite_adapters(model, f"after the last iteration ({iterations}, lr {loop.lr:.3g})")
    skipped = iterations - optimizer_steps(loop.optimizer)  # AdamW's counts resume: a resumed run counts them all
    loop.hooks.finish()
    model.eval()
    return TrainResult(trainable, loop.groups, iterations, seconds, history["loss"][-1],
                       loss_entries(history["loss"], log_every, iterations), dict(loop.hooks.summary()), history,
                       start, skipped if precision == "fp16" else 0)
