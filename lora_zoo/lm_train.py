"""The training loop of the commonsense task: LLM-Adapters' Trainer arithmetic in our own loop, on one or N processes.

One optimizer step (``StepPlan``): the step's global batch is cut into micro-batches; each process runs forward
and backward on its own (``Dist``: micro-batch k on process k mod N, DDP averaging the gradients at the last one), each
micro-batch's mean token loss scaled by N / (micro-batches in the step), so that the gradient is the mean of the
micro-batch losses on any number of processes, as the Trainer's ``loss / gradient_accumulation_steps`` under DDP
gives (transformers 4.36, which DoRA pins). Then the method's hooks see the gradients, the gradient norm is clipped
to ``max_grad_norm``, AdamW steps, and the learning rate follows transformers' linear schedule (0 at step 0, up to
the lr over ``warmup_steps``, down to 0 at the last step). Dropout draws from ``torch.manual_seed`` set from (seed,
step, micro-batch) before each micro-batch, so the random masks, like the batches, do not depend on the number of
processes or on a resume. Every ``eval_step`` steps the validation loss is measured (eval mode, batches of 8 as the
Trainer's default evaluation batch) and the adapters of the lowest one are kept and restored at the end
(``load_best_model_at_end``; the last step is evaluated only when it falls on ``eval_step``, as there).
Checkpoints (``resume.py``: adapters, optimizer, schedule, scaler, hooks, the best adapters) are written by rank 0
every ``checkpoint_every`` steps and at the end; every process restores the same one.

This loop replaces transformers' ``Trainer``, which does not run from this repository's root: our ``datasets/``
package shadows Hugging Face's, transformers' ``is_datasets_available()`` finds it, and the Trainer's data loader
then fails on ``datasets.Dataset`` (tests/test_lm_pipeline.py measures it).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import resume as resume_state
from .errors import NonFiniteError
from .hooks import training_hooks
from .lm_data import StepPlan, collate
from .lm_dist import Dist
from .naming import adapter_state_dict, count_trainable, named_trainable_parameters
from .optim import build_optimizer

logger = logging.getLogger(__name__)
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
EVAL_BATCH = 8  # transformers' per_device_eval_batch_size default, which LLM-Adapters leaves


def autocast(device: torch.device, precision: str):
    dtype = AUTOCAST.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """transformers' ``get_linear_schedule_with_warmup`` as a factor of the lr at each step."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


@dataclass
class LmTrainResult:
    steps: int
    seconds: float
    tokens: int                                   # non-padding tokens trained on by this run's processes
    final_loss: float
    loss_history: list[float] = field(default_factory=list)        # per step, mean over its micro-batches
    validation: list[tuple[int, float]] = field(default_factory=list)
    best_step: Optional[int] = None
    resumed_from: int = 0
    skipped_steps: int = 0
    hooks_summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class LmLoop:
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    hooks: Any


def build_lm_loop(model: nn.Module, cfg, steps: int, device: torch.device, precision: str) -> LmLoop:
    optimizer = build_optimizer(model, cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                optimizer=cfg.optimizer_name, **cfg.optimizer_options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg.warmup_steps, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return LmLoop(optimizer, scheduler, scaler, training_hooks(model, steps, cfg.seed))


def micro_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro) % (2 ** 63)


@torch.no_grad()
def validation_loss(model: nn.Module, sequences: list[list[int]], pad_id: int, dist: Dist, device: torch.device,
                    precision: str) -> float:
    """The mean loss over the validation records (each batch's mean weighted by its size), processes sharing
    batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, start in enumerate(range(0, len(sequences), EVAL_BATCH)):
        if index % dist.world != dist.rank:
            continue
        chunk = sequences[start:start + EVAL_BATCH]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        with autocast(device, precision):
            total += float(model(**batch).loss.detach()) * len(chunk)
        count += len(chunk)
    model.train(was_training)
    gathered = dist.gather((total, count))
    return sum(t for t, _ in gathered) / max(1, sum(c for _, c in gathered))


def _step(model, ddp, loop: LmLoop, plan: StepPlan, train: list[list[int]], step: int, cfg, dist: Dist,
          device, precision: str, pad_id: int) -> tuple[float, int]:
    """One optimizer step; returns (the step's loss, the tokens this process trained on)."""
    micro_batches = plan.micro_batches(step)
    mine = plan.share(step, dist.rank, dist.world)
    weight = 1.0
    if not mine:  # fewer micro-batches than processes: take part in DDP's reduction with a zero-weighted one
        mine, weight = [(0, micro_batches[0])], 0.0
    scale = dist.world / len(micro_batches) * weight
    loop.hooks.before_forward(step)
    loop.optimizer.zero_grad(set_to_none=True)
    local, tokens = 0.0, 0
    for position, (micro, indices) in enumerate(mine):
        torch.manual_seed(micro_seed(cfg.seed, step, micro))
        batch = {k: v.to(device) for k, v in collate([train[i] for i in indices], pad_id).items()}
        with dist.accumulating(ddp, last=position == len(mine) - 1):
            with autocast(device, precision):
                loss = ddp(**batch).loss
                regularizer = loop.hooks.regularizer()
                total = (loss + regularizer) * scale
            loop.scaler.scale(total).backward()
        local += float(loss.detach()) * weight
        tokens += int(batch["attention_mask"].sum()) if weight else 0
    if loop.scaler.is_enabled():
        loop.scaler.unscale_(loop.optimizer)
    torch.nn.utils.clip_grad_norm_(list(named_trainable_parameters(model).values()), cfg.max_grad_norm)
    loop.hooks.after_backward(step)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.hooks.after_step(step)
    loop.scheduler.step()
    step_loss = sum(dist.gather(local)) / len(micro_batches)
    if not math.isfinite(step_loss):
        raise NonFiniteError(f"training loss is {step_loss} at step {step + 1}/{plan.steps} (lr "
                             f"{cfg.learning_rate:.3g}); stopped, nothing saved as a result (try a lower lr)")
    return step_loss, tokens


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    named = model.state_dict(keep_vars=True)
    for name, tensor in tensors.items():
        named[name].copy_(tensor)


# long: the loop reads top to bottom as one run; a step is _step, the validation validation_loss
def train_commonsense(model: nn.Module, train: list[list[int]], validation: list[list[int]], cfg, plan: StepPlan,
                      dist: Dist, device: torch.device, precision: str, pad_id: int, resume: Optional[dict] = None,
                      checkpoint: Optional[Callable[[dict], Any]] = None) -> LmTrainResult:
    """Train the adapters of ``model`` for ``plan.steps`` steps (from ``resume``'s step when given) and restore the
    best validation loss's adapters; ``checkpoint(state)`` (rank 0) every ``cfg.checkpoint_every`` steps and last."""
    steps = plan.steps
    loop = build_lm_loop(model, cfg, steps, device, precision)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ddp = dist.wrap(model)
    history: dict[str, list] = {"loss": [], "lr": []}
    extra = {"validation": [], "best": None, "best_step": None, "best_loss": None}
    start = 0
    if resume is not None:
        start = resume_state.restore(model, loop.optimizer, loop.scheduler, loop.scaler, loop.hooks, resume)
        history = {k: list(v) for k, v in resume["history"].items()}
        extra = {k: resume["lm"][k] for k in extra}
        logger.info("resuming at step %d/%d", start, steps)
    logger.info("%d trainable parameters, lr %.3g, %d steps of %d records (micro-batches of %d, %d process%s), %s",
                count_trainable(model), cfg.learning_rate, steps, cfg.batch_size, cfg.micro_batch_size, dist.world,
                "" if dist.world == 1 else "es", precision)
    model.train()
    started, tokens = time.perf_counter(), 0
    for step in range(start, steps):
        history["lr"].append(loop.optimizer.param_groups[0]["lr"])
        loss, used = _step(model, ddp, loop, plan, train, step, cfg, dist, device, precision, pad_id)
        history["loss"].append(loss)
        tokens += used
        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == steps):
            logger.info("step %d/%d  loss %.4f  lr %.3e", done, steps, loss, history["lr"][-1])
        if validation and done % cfg.eval_step == 0:
            value = validation_loss(model, validation, pad_id, dist, device, precision)
            extra["validation"].append((done, value))
            logger.info("step %d/%d  validation loss %.4f", done, steps, value)
            if extra["best_loss"] is None or value < extra["best_loss"]:
                extra.update(best_loss=value, best_step=done,
                             best={k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()})
        if checkpoint is not None and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == steps):
            state = resume_state.capture(model, loop.optimizer, loop.scheduler, loop.scaler, loop.hooks, done, history)
            checkpoint({**state, "lm": extra})
    seconds = time.perf_counter() - started
    loop.hooks.finish()
    if extra["best"] is not None:
        load_adapter_tensors(model, extra["best"])
        logger.info("restored the adapters of step %d (validation loss %.4f)", extra["best_step"], extra["best_loss"])
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    skipped = (steps - start) - _optimizer_steps(loop.optimizer, start) if precision == "fp16" else 0
    return LmTrainResult(steps, seconds, sum(dist.gather(tokens)), history["loss"][-1] if history["loss"] else math.nan,
                         history["loss"], [tuple(v) for v in extra["validation"]], extra["best_step"], start,
                         skipped, dict(loop.hooks.summary()))


def _optimizer_steps(optimizer: torch.optim.Optimizer, start: int) -> int:
    counts = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    return max(counts, default=start) - start
