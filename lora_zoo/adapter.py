"""The one base adapter every method builds on.

``AdapterLinear`` wraps an ``nn.Linear`` (kept as ``base_layer``, frozen) and owns
what all methods share: input dropout on the adapter branch, the ``merged``
flag, ``merge()``/``unmerge()``, the residual trick (``W_frozen = W - ΔW(θ₀)``)
and parameter counting (METHODS.md, "Notation"). A method subclass says only how
its update is parameterised and initialised, once:

- ``factors(tensors)``: ``(up, down)`` with ``ΔW = up @ down`` (``d_out × r`` and
  ``r × d_in``; the scale and any diagonal folded into ``up``), computed from a
  mapping of its trainable tensors by name (the current ones, or the θ₀ snapshot).
  The base class derives ΔW, the unmerged forward ``(x downᵀ) upᵀ`` (never a
  ``d_out × d_in`` matrix per token) and merging from it. A method whose update
  is not a product (DoRA) overrides ``_delta`` and ``adapter_output`` instead.
- ``up_tensors`` / ``down_tensors``: the names of its output-side (B-like) and
  input-side (A-like) trainable tensors, for optimizer builders such as LoRA+ and
  LoRA-FA that treat the two sides differently.

Weights change in one place, ``apply_delta``: merging and unmerging, the residual
init, DoRA, NoRA's double bias, the export of merged weights and checkpoint loading
all add or remove an adapter's ``delta()`` — its ``(ΔW, Δb)`` — through it.

What trains, is saved and is counted follows the ``lora_`` naming rule (``naming.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .errors import NonFiniteError
from .naming import is_adapter_tensor
from .options import Options, option


def dropout_option(default: float):
    """The ``dropout`` option with a method's default (the help text lives here once)."""
    return option(default, "dropout probability on the adapter input")


@dataclass
class AdapterConfig(Options):
    """Options every method has. Subclasses add their own fields with defaults (``option(default, help)``)."""

    dropout: float = dropout_option(0.0)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def needs_calibration(self) -> bool:
        """Whether building the adapter needs ``collect_activation_stats`` output."""
        return False

    @property
    def mergeable(self) -> bool:
        """``False`` for variants whose update depends on the batch (cannot be folded into W)."""
        return True


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def fan_uniform(shape: tuple[int, ...], fan: int, scale: float = 1.0, device=None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A float32 tensor drawn from ``U(−scale/√fan, scale/√fan)``: Kaiming-uniform written by its bound.

    ``scale=1`` is ``nn.Linear``'s init (``kaiming_uniform_(a=√5)`` over ``fan``), ``scale=√6`` is
    ``kaiming_uniform_(a=0)`` (gain √2, as peft's VeRA and the authors' NoRA up-side factors draw).
    Drawn with ``uniform_`` from ``generator`` (torch's default one when None), as ``nn.init`` draws,
    so the numbers equal ``kaiming_uniform_``'s for the same generator state.
    """
    bound = scale / math.sqrt(fan)
    return torch.empty(shape, device=device, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def apply_delta(weight: torch.Tensor, bias: Optional[torch.Tensor], weight_delta: Optional[torch.Tensor],
                bias_delta: Optional[torch.Tensor] = None, sign: int = 1) -> None:
    """The one place an adapter's update reaches a weight: ``W += sign·ΔW`` and ``b += sign·Δb``, in place.

    Each delta is cast to its target's dtype and device; None adds nothing. ``sign=-1`` removes the update
    again (to within the rounding of one addition: merge then unmerge restores W to about 1 ulp). Safe, as
    peft's ``safe_merge``: the sums are computed into new tensors and checked, and only when every value is
    finite are they written into the weights; otherwise ``NonFiniteError`` and the weights are unchanged.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1, got {sign}")
    updates = []
    for target, delta in ((weight, weight_delta), (bias, bias_delta)):
        if delta is None:
            continue
        if target is None:
            raise ValueError("the adapter has a bias update but its base layer has no bias")
        updates.append((target, torch.add(target, delta.to(device=target.device, dtype=target.dtype), alpha=sign)))
    if updates and not bool(torch.stack([updated.isfinite().all() for _, updated in updates]).all()):
        raise NonFiniteError(f"a weight update would make a {tuple(updates[0][0].shape)} weight non-finite (an "
                             "overflow, or non-finite adapter tensors); the weights are left unchanged")
    for target, updated in updates:
        target.copy_(updated)


def check_rank_fits(method: str, what: str, rank: int, in_features: int, out_features: int) -> None:
    """One-line error when ``rank`` exceeds ``min(d_in, d_out)`` (a decomposition has no more directions)."""
    if rank > min(in_features, out_features):
        raise ValueError(f"{method} {what} {rank} exceeds min(d_in, d_out) = {min(in_features, out_features)} "
                         f"of a {out_features}×{in_features} (d_out×d_in) layer")


class AdapterLinear(nn.Module):
    """Base class: ``y = base_layer(x) + adapter_output(dropout(x))`` unless merged."""

    kind = "weights"        # kinds.py: an update of a linear layer's weight
    config_class = AdapterConfig
    method_name: str = "?"  # set by @register_method
    #: trainable tensors on the output side (B-like) and input side (A-like), for optimizer builders
    up_tensors: tuple[str, ...] = ()
    down_tensors: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, stats=None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"adapters wrap nn.Linear layers, got {type(base_layer).__name__}")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.config = config
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        type(self).check_fits(config, self.out_features, self.in_features)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        #: calibration statistics this layer was built with (kept so a checkpoint can rebuild it)
        self.stats = stats

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for code that reads a linear's ``weight`` (open_clip's text tower reads
        ``mlp.c_fc.weight`` for its cast dtype, so adapting fc1 needs it)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    # ---- what a method provides -------------------------------------------------------
    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` with ``ΔW = up @ down`` for ``tensors`` (trainable tensors by name)."""
        raise NotImplementedError

    @classmethod
    def check_fits(cls, config: AdapterConfig, out_features: int, in_features: int) -> None:
        """A one-line error when ``config`` asks a ``out_features × in_features`` layer for more than its shape
        allows, from the shape alone: ``inject.check_fits`` runs it on every target before any work, the
        constructor on its own layer. Default: a ``rank`` option must not exceed min(d_in, d_out)."""
        rank = getattr(config, "rank", None)
        if isinstance(rank, int) and not isinstance(rank, bool):
            check_rank_fits(cls.method_name, "rank", rank, in_features, out_features)

    @classmethod
    def plan_layers(cls, linears: Mapping[str, nn.Linear], stats, config) -> dict[str, dict[str, Any]]:
        """Per-layer config overrides decided from a global view (e.g. rank allocation)."""
        return {}

    # ---- derived from the factors (override both for a non-product update) ----------------
    def _delta(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """ΔW (d_out × d_in) computed from ``tensors``."""
        up, down = self.factors(tensors)
        return up @ down

    def adapter_output(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """The adapter's additive term for input ``x`` (already through dropout): ``ΔW x + Δb``."""
        up, down = self.factors(self.trainable_tensors())
        out = (x @ down.t().to(x.dtype)) @ up.t().to(x.dtype)
        extra = self.extra_bias()
        return out if extra is None else out + extra.to(out.dtype)

    # ---- shared machinery ---------------------------------------------------------------
    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's own ``lora_`` parameters (trainable or frozen by an optimizer builder), by name."""
        return {n: p for n, p in self.named_parameters(recurse=False) if is_adapter_tensor(n)}

    def extra_bias(self) -> Optional[torch.Tensor]:
        """Δb: a bias term the forward adds besides ``ΔW x`` (``adapter_output`` adds it unmerged, ``merge``
        folds it into the bias); None for most methods (the authors' NoRA adds ``scale · b`` again)."""
        return None

    def delta(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(ΔW, Δb)``: what this adapter adds to its base layer's weight and bias (``apply_delta``). Merged, it
        is the update that was merged (the same tensors, for a method whose ΔW depends on W: DoRA)."""
        return self.delta_weight(), self.extra_bias()

    def delta_weight(self) -> torch.Tensor:
        """ΔW(θ) for the current trainable tensors."""
        return self._delta(self.trainable_tensors())

    def initial_delta_weight(self) -> torch.Tensor:
        """ΔW(θ₀), from the snapshot taken by ``_make_residual``."""
        return self._delta({n: getattr(self, n + "_init") for n in self.trainable_tensors()})

    @property
    def has_residual(self) -> bool:
        return any(n.endswith("_init") for n, _ in self.named_buffers(recurse=False))

    @torch.no_grad()
    def _make_residual(self) -> None:
        """Snapshot θ₀ as persistent buffers and set ``W ← W − ΔW(θ₀)`` (function-preserving init)."""
        for name, tensor in self.trainable_tensors().items():
            self.register_buffer(name + "_init", tensor.detach().clone())
        apply_delta(self.base_layer.weight, None, self.initial_delta_weight(), sign=-1)

    def original_weight(self) -> torch.Tensor:
        """The weight this adapter was built on (W, before the residual was subtracted)."""
        weight = self.base_layer.weight.detach().float()
        if self.merged:
            weight = weight - self.delta_weight().float()
        if self.has_residual:
            weight = weight + self.initial_delta_weight().float()
        return weight

    @property
    def mergeable(self) -> bool:
        return self.config.mergeable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.adapter_output(self.dropout(x), out).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW (and Δb) into the base layer. Idempotent: merging a merged adapter does nothing."""
        if self.merged:
            return
        if not self.mergeable:
            raise RuntimeError(f"{self.method_name} with this config is not mergeable (its update depends on the batch)")
        apply_delta(self.base_layer.weight, self.base_layer.bias, *self.delta())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW (and Δb) back out of the base layer. Does nothing on an unmerged adapter."""
        if not self.merged:
            return
        apply_delta(self.base_layer.weight, self.base_layer.bias, *self.delta(), sign=-1)
        self.merged = False

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_tensors().values() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"method={self.method_name}, in={self.in_features}, out={self.out_features}, merged={self.merged}"


def adapter_setup(model: nn.Module):
    """What ``apply_adapters`` recorded on ``model`` (``inject.AdapterSetup``); one line when it has no adapters."""
    setup = getattr(model, "lora_zoo_setup", None)
    if setup is None or not adapter_modules(model):
        raise ValueError("model has no adapters from apply_adapters")
    return setup


def adapter_modules(model: nn.Module) -> dict[str, AdapterLinear]:
    """``{qualified name: adapter}`` of every adapter inside ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}
