"""Where NoRA's trainable tensors sit: the inner structures of the authors' ablation code (part of ``nora``).

The authors' public code (lliai/LoRA-Zoo, ``nora/loralib/lora_lib.py``, layers
``NoRALinear_A/B/C``) tries several places for the trainable tensors around the
frozen outer factors of the activation-weighted SVD ``W diag(s) ≈ U_r Σ_r V_rᵀ``
(docs/METHODS.md, "NoRA: the authors' variant"). In the project's layout every
structure is ``ΔW = scale · up @ down`` built from

    P = U_r L        (d_out × r_out)     Q = R V_rᵀ diag(s)⁻¹   (r_out × d_in)

where ``(L, R)`` place Σ_r (``sigma_sides``). Trainable tensors (their numbers:
table C ``Wab_structure``, table B ``structure``, table A):

=============  ===========  ================================  =====  ======================
structure      theirs       up, down                          k      trainable per matrix
=============  ===========  ================================  =====  ======================
nested         C1, B2       P B',  A' Q                       r_in   2 r_in r_out
output         C2, B5       B_o,  (A_o P) Q                   r_in   2 r_in d_out
nested_full    B3           P M,  Q                           r_out  r_out²
output_full    B6           N P,  Q                           r_out  d_out²
down_parallel  B1           P,  Q + B' A'                     r_out  r_in (r_out + d_in)
up_parallel    B4           P + B' A',  Q                     r_out  r_in (d_out + r_out)
none           A            P, Q themselves trained           r_out  r_out (d_in + d_out)
=============  ===========  ================================  =====  ======================

``B'``/``B_o`` are output-side (``lora_inner_B``), ``A'``/``A_o`` input-side
(``lora_inner_A``), ``M``/``N`` one full matrix (``lora_inner_full``); table A's
trained outer factors are ``lora_outer_B = P`` and ``lora_outer_A = Q``. The
factor products are formed once per step, so a token costs a rank-k LoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .adapter import fan_uniform

Tensors = Mapping[str, torch.Tensor]
#: factors(P, Q, trainable tensors) -> (up, down) without the scale
Factors = Callable[[torch.Tensor, torch.Tensor, Tensors], tuple[torch.Tensor, torch.Tensor]]

INNER_B, INNER_A, INNER_FULL = "lora_inner_B", "lora_inner_A", "lora_inner_full"
OUTER_B, OUTER_A = "lora_outer_B", "lora_outer_A"


def sigma_sides(sigma: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` as vectors with ``L · R = Σ`` (ones for ``"none"``): where Σ sits in ``U L · … · R Vᵀ``."""
    ones = torch.ones_like(sigma)
    return {"input": (ones, sigma), "output": (sigma, ones), "split": (sigma.sqrt(), sigma.sqrt()),
            "none": (ones, ones)}[side]


@dataclass(frozen=True)
class Structure:
    name: str
    authors: str               # their table and number, for docs and errors
    uses_inner_rank: bool
    #: (d_out, d_in, r_out, k) -> {tensor name: (shape, side)}, side "up" | "down" | "full"
    shapes: Callable[[int, int, int, int], dict[str, tuple[tuple[int, int], str]]]
    factors: Factors


def _pair(up_shape, down_shape):
    return {INNER_B: (up_shape, "up"), INNER_A: (down_shape, "down")}


STRUCTURES = {s.name: s for s in (
    Structure("nested", "table C Wab_structure 1, table B structure 2", True,
              lambda d_out, d_in, r, k: _pair((r, k), (k, r)),
              lambda p, q, t: (p @ t[INNER_B], t[INNER_A] @ q)),
    Structure("output", "table C Wab_structure 2, table B structure 5", True,
              lambda d_out, d_in, r, k: _pair((d_out, k), (k, d_out)),
              lambda p, q, t: (t[INNER_B], (t[INNER_A] @ p) @ q)),
    Structure("nested_full", "table B structure 3", False,
              lambda d_out, d_in, r, k: {INNER_FULL: ((r, r), "full")},
              lambda p, q, t: (p @ t[INNER_FULL], q)),
    Structure("output_full", "table B structure 6", False,
              lambda d_out, d_in, r, k: {INNER_FULL: ((d_out, d_out), "full")},
              lambda p, q, t: (t[INNER_FULL] @ p, q)),
    Structure("down_parallel", "table B structure 1", True,
              lambda d_out, d_in, r, k: _pair((r, k), (k, d_in)),
              lambda p, q, t: (p, q + t[INNER_B] @ t[INNER_A])),
    Structure("up_parallel", "table B structure 4", True,
              lambda d_out, d_in, r, k: _pair((d_out, k), (k, r)),
              lambda p, q, t: (p + t[INNER_B] @ t[INNER_A], q)),
    Structure("none", "table A", False,
              lambda d_out, d_in, r, k: {OUTER_B: ((d_out, r), "up"), OUTER_A: ((r, d_in), "down")},
              lambda p, q, t: (t[OUTER_B], t[OUTER_A])),
)}


def split_sides(shapes: Mapping[str, tuple[tuple[int, int], str]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(output-side and full tensors, input-side tensors), for optimizer builders (LoRA+, LoRA-FA)."""
    return (tuple(n for n, (_, side) in shapes.items() if side != "down"),
            tuple(n for n, (_, side) in shapes.items() if side == "down"))


def authors_kaiming(shapes: Mapping[str, tuple[tuple[int, int], str]], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Table B's inner init: input-side and full tensors with their ``a=√5`` bound (1/√fan), output-side
    tensors with ``a=0`` (√(6/fan)); their ``kaiming_uniform_`` runs on the transposed (their) layout, so the
    fan is their second dimension, our rows."""
    return {name: fan_uniform(shape, shape[0], math.sqrt(6) if side == "up" else 1.0, device=like.device)
            for name, (shape, side) in shapes.items()}
