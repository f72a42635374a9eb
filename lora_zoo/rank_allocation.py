"""AIRA's outlier-driven rank allocation (METHODS.md, "AIRA" (b)).

Per layer i, an importance ``θ_i`` (the outlier score ``LOD_i``: the fraction of
weight entries with ``|W_jk| · n_k > M · mean(|W| · n)``, n the input channel L2
norms from calibration; or, as the authors' code can, the first-token output
norm) and a cost per unit rank ``f_i = d_in + d_out``. Ranks
``r_i ∈ [r_min, r_max]`` maximise ``Σ θ_i log r_i`` subject to
``Σ f_i r_i ≤ budget``. The continuous optimum is water-filling (the KKT
conditions of this concave problem), ``r_i = clip(θ_i / (λ f_i), r_min, r_max)``
with λ found by bisection (``continuous_ranks``). Integers (``allocate_ranks``):

- ``rounding="greedy"`` (METHODS.md): start from the floor and raise ranks by
  marginal gain per unit cost (ties to the earlier layer) while the budget allows;
- ``rounding="floor"``: just the floor, as the authors' CLIP code does with the
  SLSQP solution of the same continuous problem (lliai/LoRA-Zoo,
  ``aira/lora.py`` ``optim_layers_rank`` then ``int()`` in ``aira/main_awlora.py``).

Everything is deterministic. Scaling every θ by the same factor (the authors
multiply LOD by 1000) does not change the allocation.
"""
from __future__ import annotations

import heapq
import math
from typing import Literal, Sequence

import torch


def outlier_score(weight: torch.Tensor, input_l2: torch.Tensor, threshold: float = 5.0) -> float:
    """Fraction of entries of ``|W| · n`` (n broadcast over input columns) above ``threshold`` × its mean."""
    importance = weight.detach().float().abs() * input_l2.to(weight.device).float()
    return (importance > threshold * importance.mean()).float().mean().item()


def _clipped(scores, costs, lam, r_min, r_max):
    return [min(max(s / (lam * f), r_min), r_max) if s > 0 else r_min for s, f in zip(scores, costs)]


def _check(scores, costs, budget, r_min, r_max):
    if not 1 <= r_min <= r_max:
        raise ValueError(f"need 1 <= rank_min <= rank_max, got {r_min} and {r_max}")
    if len(scores) != len(costs) or not scores:
        raise ValueError("need one score and one cost per layer")
    floor_cost = sum(costs) * r_min
    if floor_cost > budget:
        raise ValueError(f"rank budget {budget:g} is below the minimum {floor_cost} (every layer at rank_min={r_min})")


def continuous_ranks(scores: Sequence[float], costs: Sequence[int], budget: float, r_min: float,
                     r_max: float) -> list[float]:
    """The real-valued ranks maximising ``Σ score_i log r_i`` under ``Σ cost_i r_i <= budget`` and the bounds.

    Layers with a zero score get ``r_min``; if every score is zero, every layer gets ``r_min``.
    """
    _check(scores, costs, budget, r_min, r_max)
    if sum(costs) * r_max <= budget:
        return [float(r_max)] * len(scores)
    if all(s <= 0 for s in scores):
        return [float(r_min)] * len(scores)
    # bisection on log λ: total cost decreases as λ grows
    low, high = -60.0, 60.0
    for _ in range(200):
        mid = (low + high) / 2
        total = sum(f * r for f, r in zip(costs, _clipped(scores, costs, math.exp(mid), r_min, r_max)))
        low, high = (mid, high) if total > budget else (low, mid)
    return _clipped(scores, costs, math.exp(high), r_min, r_max)


def allocate_ranks(scores: Sequence[float], costs: Sequence[int], budget: float, r_min: int, r_max: int,
                   uniform_rank: int | None = None, rounding: Literal["greedy", "floor"] = "greedy") -> list[int]:
    """Integer ranks for layers with importance ``scores`` and per-rank ``costs`` under ``budget``.

    If every score is zero there is nothing to prefer: ``uniform_rank`` (clipped to the bounds) is used.
    """
    if rounding not in ("greedy", "floor"):
        raise ValueError(f"rank rounding must be 'greedy' or 'floor', got {rounding!r}")
    _check(scores, costs, budget, r_min, r_max)
    if all(s <= 0 for s in scores):
        rank = min(max(uniform_rank or r_min, r_min), r_max)
        while rank > r_min and sum(costs) * rank > budget:
            rank -= 1
        return [rank] * len(scores)
    ranks = [max(r_min, min(r_max, math.floor(r + 1e-9)))
             for r in continuous_ranks(scores, costs, budget, r_min, r_max)]
    if rounding == "floor":
        return ranks
    remaining = budget - sum(f * r for f, r in zip(costs, ranks))

    def gain(i):
        return scores[i] * (math.log(ranks[i] + 1) - math.log(ranks[i])) / costs[i]

    heap = [(-gain(i), i) for i in range(len(ranks)) if ranks[i] < r_max and scores[i] > 0]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if costs[i] > remaining:
            continue  # this layer no longer fits; cheaper ones may
        ranks[i] += 1
        remaining -= costs[i]
        if ranks[i] < r_max:
            heapq.heappush(heap, (-gain(i), i))
    return ranks
