"""Singular value decompositions used by NoRA, AIRA and PiSSA-style initialisation.

``weighted_svd`` decomposes ``W diag(s)^β`` (β = 0 gives the plain SVD of W) and
returns the right factor already un-weighted, ``V_rᵀ diag(s)^{-β}``, so that
``U_r diag(Σ_r) Vt_r`` is the best rank-r approximation of W in the
calibration-weighted norm ``||(W − Ŵ) diag(s)^β||_F`` (NoRA act-weighted outer
SVD; AIRA owSVD, METHODS.md). Signs are canonical (the largest-magnitude entry
of each left singular vector is positive), so the same W gives the same
factors on any machine up to floating-point noise; checkpoints rely on this.

With ``transposed=True`` it follows the authors' NoRA code instead (lliai/LoRA-Zoo,
``nora/loralib/lora_lib.py``): the SVD is taken of the transpose
``diag(s)^β Wᵀ = Û Σ Ĥ`` and read as ``U = Ĥᵀ``, ``V = Û``, keeping the signs
LAPACK returns. The subspaces are the same, but about half of the column
signs differ from the direct SVD; with random inner factors that changes ΔW,
so matching their layers bit for bit needs this convention. Those signs
depend on the LAPACK build, so a layer that uses them records
``sign_flips(U)`` (the per-column signs relative to the canonical ones).

On CPU the LAPACK call runs with one intra-op thread: right after other torch
work, OpenMP workers still spin and contend with LAPACK's own threads; on two
cores that made a 64×64 SVD 300× slower and a batched 3×768×768 one take 30 s
(measured with torch 2.15 + MKL), while single-threaded LAPACK loses little.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch


def sign_flips(u: torch.Tensor) -> torch.Tensor:
    """Per-column signs (±1, shape (..., 1, r)) that make ``u``'s largest-magnitude entry of each column positive."""
    idx = u.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(u, -2, idx))
    signs[signs == 0] = 1
    return signs


def _canonical_signs(u: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    signs = sign_flips(u)
    return u * signs, vt * signs.transpose(-1, -2)


@contextmanager
def _single_threaded(device: torch.device):
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def safe_scale(scale: torch.Tensor, beta: float) -> torch.Tensor:
    """``scale^β`` with tiny/zero channels lifted to 1e-6·max so the inverse exists."""
    scale = scale.detach().float()
    floor = scale.max().clamp_min(1e-12) * 1e-6
    return scale.clamp_min(floor) ** beta


def weighted_svd(weight: torch.Tensor, rank: int, col_scale: Optional[torch.Tensor] = None,
                 beta: float = 1.0, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` factors ``(U_r, S_r, Vt_r)`` of ``weight · diag(col_scale)^β``, right factor un-weighted.

    ``weight`` may be batched (..., d_out, d_in). Computed in float32 on ``weight``'s device.
    ``transposed``: the authors' NoRA convention (decompose the transpose, LAPACK's signs; module docstring).
    """
    w = weight.detach().float()
    scale = None
    if col_scale is not None and beta != 0:
        scale = safe_scale(col_scale.to(w.device), beta)
        w = w * scale
    with _single_threaded(w.device):
        if transposed:
            v, s, ut = torch.linalg.svd(w.transpose(-1, -2), full_matrices=False)
            u, vt = ut.transpose(-1, -2), v.transpose(-1, -2)
        else:
            u, s, vt = torch.linalg.svd(w, full_matrices=False)
    u, s, vt = u[..., :, :rank], s[..., :rank], vt[..., :rank, :]
    if not transposed:
        u, vt = _canonical_signs(u, vt)
    if scale is not None:
        vt = vt / scale
    return u.contiguous(), s.contiguous(), vt.contiguous()
