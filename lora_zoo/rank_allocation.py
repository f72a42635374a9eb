"""AIRA's outlier-driven rank allocation (METHODS.md, "AIRA" (b)).

Per layer i, the outlier score ``LOD_i`` is the fraction of weight entries
with ``|W_jk| · n_k > M · mean(|W| · n)`` (n: input channel L2 norms from
calibration). With cost per unit rank ``f_i = d_in + d_out``, integer ranks
``r_i ∈ [r_min, r_max]`` maximise ``Σ LOD_i log r_i`` subject to
``Σ f_i r_i ≤ budget``. The continuous optimum is water-filling,
``r_i = clip(LOD_i / (λ f_i), r_min, r_max)`` with λ found by bisection; the
integer ranks start from its floor and are raised greedily by marginal gain
per unit cost (ties to the earlier layer) while the budget allows.
Everything is deterministic.
"""
from __future__ import annotations

import heapq
import math
from typing import Sequence

import torch


def outlier_score(weight: torch.Tensor, input_l2: torch.Tensor, threshold: float = 5.0) -> float:
    """Fraction of entries of ``|W| · n`` (n broadcast over input columns) above ``threshold`` × its mean."""
    importance = weight.detach().float().abs() * input_l2.to(weight.device).float()
    return (importance > threshold * importance.mean()).float().mean().item()


def _continuous(scores, costs, lam, r_min, r_max):
    return [min(max(s / (lam * f), r_min), r_max) if s > 0 else r_min for s, f in zip(scores, costs)]


def allocate_ranks(scores: Sequence[float], costs: Sequence[int], budget: float, r_min: int, r_max: int,
                   uniform_rank: int | None = None) -> list[int]:
    """Integer ranks for layers with outlier ``scores`` and per-rank ``costs`` under ``budget``.

    If every score is zero there is nothing to prefer: ``uniform_rank`` (clipped to the bounds) is used.
    """
    if not 1 <= r_min <= r_max:
        raise ValueError(f"need 1 <= rank_min <= rank_max, got {r_min} and {r_max}")
    if len(scores) != len(costs) or not scores:
        raise ValueError("need one score and one cost per layer")
    floor_cost = sum(costs) * r_min
    if floor_cost > budget:
        raise ValueError(f"rank budget {budget:g} is below the minimum {floor_cost} (every layer at rank_min={r_min})")
    if all(s <= 0 for s in scores):
        rank = min(max(uniform_rank or r_min, r_min), r_max)
        while rank > r_min and sum(costs) * rank > budget:
            rank -= 1
        return [rank] * len(scores)
    if sum(costs) * r_max <= budget:
        return [r_max] * len(scores)
    # bisection on log λ: total cost decreases as λ grows
    low, high = -60.0, 60.0
    for _ in range(200):
        mid = (low + high) / 2
        total = sum(f * r for f, r in zip(costs, _continuous(scores, costs, math.exp(mid), r_min, r_max)))
        low, high = (mid, high) if total > budget else (low, mid)
    continuous = _continuous(scores, costs, math.exp(high), r_min, r_max)
    ranks = [max(r_min, min(r_max, math.floor(r + 1e-9))) for r in continuous]
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
