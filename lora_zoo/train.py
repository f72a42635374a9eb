"""The one training loop and the evaluation every method shares (METHODS.md, "Experiment protocol").

CLIP few-shot adaptation as in CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024) and
the NoRA/AIRA papers (Li et al., ICCV 2025):

- logits = 100 · normalize(image features) @ normalize(class text features)ᵀ
  (the logit scale is fixed, not learned), cross-entropy on the labels;
- AdamW on the parameter groups of the run's optimizer builder (``optim.py``:
  the method's by default, e.g. LoRA+'s; with ``decay_to_init`` residual-initialised
  tensors decay toward θ₀ instead of 0), cosine schedule to ``eta_min`` stepped
  every iteration; the train loader is cycled until the requested number of
  iterations; every loop setting comes from one ``TrainConfig``;
- class text features are recomputed with gradients every step when the text
  tower is adapted, computed once under ``no_grad`` otherwise;
- autocast (fp16) + GradScaler on CUDA only, plain fp32 elsewhere;
- a method's schedule runs through ``lora_zoo.hooks`` (``before_forward``,
  ``regularizer``, ``after_backward`` on unscaled gradients, ``after_step``,
  ``finish``, ``summary``), seeded from the run's seed.

A non-finite loss stops training with ``NonFiniteError`` naming the iteration.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .errors import NonFiniteError
from .hooks import training_hooks
from .naming import count_trainable
from .optim import build_optimizer
from .registry import get_method
from .host import available_cpus, cpus_busy_elsewhere
from .text import encode_text

LOGIT_SCALE = 100.0
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

    @property
    def iterations_per_second(self) -> float:
        """Of this process: ``seconds`` counts only the iterations after ``resumed_from``."""
        done = self.iterations - self.resumed_from
        return done / self.seconds if self.seconds > 0 else float("nan")


def autocast(device: torch.device, amp: bool):
    """fp16 autocast on CUDA when ``amp``; a disabled context elsewhere (CPU runs in fp32)."""
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled)


def text_features(model: nn.Module, class_tokens: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """L2-normalised text features of the class prompts (one row per class): the one place they are computed.

    The tower runs on the shortest exact context (``text.encode_text``). Without gradients the prompts
    go through in chunks of ``chunk_size`` (ImageNet's 1,000 classes), each on its own shortest context.
    """
    if torch.is_grad_enabled() or class_tokens.shape[0] <= chunk_size:
        return F.normalize(encode_text(model, class_tokens).float(), dim=-1)
    return torch.cat([F.normalize(encode_text(model, chunk).float(), dim=-1)
                      for chunk in class_tokens.split(chunk_size)])


def clip_logits(model: nn.Module, images: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """``100 · normalize(encode_image(images)) @ class_featuresᵀ`` in fp32."""
    image_features = F.normalize(model.encode_image(images).float(), dim=-1)
    return LOGIT_SCALE * image_features @ class_features.t()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, class_tokens: torch.Tensor, device: torch.device,
             amp: bool = True) -> float:
    """Top-1 accuracy (%) of zero-shot-style CLIP classification over ``loader``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with autocast(device, amp):
            features = text_features(model, class_tokens.to(device))
            for images, labels in loader:
                logits = clip_logits(model, images.to(device, non_blocking=True), features)
                correct += (logits.argmax(dim=-1).cpu() == labels).sum().item()
                total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluation loader is empty")
    return 100.0 * correct / total


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


def training_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, class_tokens: torch.Tensor,
                  optimizer, hooks, step: int, device: torch.device, amp: bool, scaler=None,
                  fixed_features: torch.Tensor | None = None) -> float:
    """One optimizer step with the method's hooks; returns the loss. ``optimizer=None`` only runs
    backward (the frozen lower bound of ``scripts/bench.py``). A non-finite loss is returned before
    any backward, so the caller can stop with nothing changed by it."""
    hooks.before_forward(step)
    with autocast(device, amp):
        features = fixed_features if fixed_features is not None else text_features(model, class_tokens)
        loss = F.cross_entropy(clip_logits(model, images, features), labels) + hooks.regularizer()
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        return loss_value
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
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
    return loss_value


def train_adapters(model: nn.Module, loader: Iterable, class_tokens: torch.Tensor, config: TrainConfig | None = None,
                   *, iterations: int, device: torch.device, seed: int = 0, text_adapted: bool = True,
                   progress: bool = True, resume: dict | None = None,
                   checkpoint: Callable[[dict], Any] | None = None, on_log: Callable[..., Any] | None = None
                   ) -> TrainResult:
    """Train the adapters of ``model`` (from ``apply_adapters``) for ``iterations`` steps with ``config``.

    ``config.lr = None`` uses the method's registered learning rate. ``seed`` seeds the method's
    schedule (DyLoRA's rank sampler). ``loader`` yields training batches (an endless stream such as
    ``datasets.loader.TrainStream`` or any loader, cycled). ``resume``: a state from ``resume.capture``
    to continue from (``loader`` must then start at its step); ``checkpoint(state)`` is called every
    ``config.checkpoint_every`` iterations. ``on_log(step, loss, lr)`` is called every
    ``config.log_every`` iterations (default: about 20 entries per run) with the mean loss since the
    last call. Raises ``NonFiniteError`` at the first non-finite loss.
    """
    from tqdm.auto import tqdm

    from . import resume as resume_state

    config = config or TrainConfig()
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    lr = (config.lr if config.lr is not None else get_method(model.lora_zoo_setup.method).lr) * config.lr_scale
    optimizer = build_optimizer(model, lr, config.weight_decay, config.betas, config.optimizer,
                                decay_to_init=config.decay_to_init, **config.optimizer_options)
    trainable = count_trainable(model)
    groups = [{"name": g.get("name", "?"), "tensors": len(g["params"]), "parameters": sum(p.numel() for p in g["params"]),
               "lr": g["lr"]} for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=config.eta_min)
    amp = config.amp
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    hooks = training_hooks(model, iterations, seed)
    history: dict[str, list] = {"loss": [], "lr": []}  # per iteration
    start = 0
    if resume is not None:
        start = resume_state.restore(model, optimizer, scheduler, scaler, hooks, resume)
        history = {k: list(v) for k, v in resume["history"].items()}
        logger.info("resuming at iteration %d/%d", start, iterations)
    logger.info("%d trainable parameters, lr %.3g, %d iterations", trainable, lr, iterations)
    class_tokens = class_tokens.to(device)
    fixed_features = None
    if not text_adapted:
        with torch.no_grad(), autocast(device, amp):
            fixed_features = text_features(model, class_tokens)
    log_every = config.log_every or max(1, iterations // 20)
    batches = cycle(loader)
    model.train()
    bar = tqdm(range(start, iterations), desc="train", disable=not progress, dynamic_ncols=True, leave=False,
               initial=start, total=iterations)
    started = time.perf_counter()
    for step in bar:
        images, labels = next(batches)
        lr_now = optimizer.param_groups[0]["lr"]
        loss_value = training_step(model, images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                                   class_tokens, optimizer, hooks, step, device, amp, scaler, fixed_features)
        if not math.isfinite(loss_value):
            bar.close()
            raise NonFiniteError(f"training loss is {loss_value} at iteration {step + 1}/{iterations}; "
                                     "stopped, nothing saved as a result (try a lower lr)")
        scheduler.step()
        history["loss"].append(loss_value)
        history["lr"].append(lr_now)
        if progress:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}", refresh=False)
        if (step + 1) % log_every == 0 or step + 1 == iterations:
            window = history["loss"][-((step % log_every) + 1):]
            logger.debug("iteration %d/%d  loss %.4f  lr %.3e", step + 1, iterations, sum(window) / len(window), lr_now)
            if on_log is not None:
                on_log(step + 1, sum(window) / len(window), lr_now)
        if checkpoint is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                and step + 1 < iterations:
            checkpoint(resume_state.capture(model, optimizer, scheduler, scaler, hooks, step + 1, history))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    bar.close()
    hooks.finish()
    model.eval()
    losses = history["loss"]
    entries = [(k, sum(losses[max(0, k - log_every):k]) / len(losses[max(0, k - log_every):k]))
               for k in range(log_every, iterations + 1, log_every)]
    if iterations % log_every:
        entries.append((iterations, sum(losses[-(iterations % log_every):]) / (iterations % log_every)))
    return TrainResult(trainable, groups, iterations, seconds, losses[-1], entries, dict(hooks.summary()),
                       history, start)
