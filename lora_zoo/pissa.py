"""PiSSA (Meng, Wang & Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models", NeurIPS 2024).

The top-r singular triplets of W become the trainable adapter and the rest is
frozen: with ``W = U Σ Vᵀ``, ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ`` and the
residual ``W_res = W − s·B A`` (``_make_residual``), so the model is unchanged at
init (METHODS.md, "Baselines"). The plain SVD is ``svd.weighted_svd`` with no
activation weighting. When the scale ``s = α/r`` is not 1, Σ_r is divided by s
before the square roots (as peft's ``pissa_init`` does), so ``s·B A`` is always
the best rank-r approximation of W. Defaults follow the paper: α = r (s = 1),
no dropout. Trainable parameters per matrix: ``r · (d_in + d_out)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .adapter import check_rank_fits, dropout_option
from .lora import LoraConfig, LoraLinear
from .options import option
from .registry import register_method
from .svd import weighted_svd


@dataclass
class PissaConfig(LoraConfig):
    alpha: Optional[float] = option(None, "scale s = alpha/r; null = r (s = 1, PiSSA's setting)")
    rslora: bool = option(False, "scale by alpha/sqrt(r) instead of alpha/r")
    dropout: float = dropout_option(0.0)


# lr 2e-4: PiSSA uses LoRA's learning rate of the setting it is compared in (here CLIP-LoRA's)
@register_method("pissa", display_name="PiSSA", citation="Meng, Wang & Zhang, NeurIPS 2024", lr=2e-4)
class PissaLinear(LoraLinear):
    config_class = PissaConfig

    def __init__(self, base_layer: nn.Linear, config: PissaConfig, stats=None):
        super().__init__(base_layer, config, stats)
        check_rank_fits("pissa", "rank", config.rank, self.in_features, self.out_features)
        u, sigma, vt = weighted_svd(base_layer.weight, config.rank, beta=0.0)
        root = (sigma / self.scale).sqrt()
        self.lora_A.data.copy_(root[:, None] * vt)
        self.lora_B.data.copy_(u * root[None, :])
        self._make_residual()
