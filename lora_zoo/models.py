"""Building open_clip backbones: the real ones by name, and tiny ones defined here for tests and the demo.

``build_clip("ViT-B-16", "openai")`` is what users run (open_clip downloads or
reads cached weights). ``pretrained=None`` gives the same architecture with
random weights (benchmarks, no network). The ``tiny-*`` backbones are small
open_clip CLIP configs built in code, so the test suite and the CPU demo
exercise the real open_clip classes with no download at all.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import open_clip
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
import torch
from torch import nn

TINY_CONFIGS = {
    # vision 32×32 images, 4×4 patches; text context 32 tokens; both towers 2 blocks of width 64
    "tiny-vit": dict(embed_dim=32,
                     vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                     text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2)),
    # the same with open_clip's custom attention blocks (open_clip.transformer.Attention)
    "tiny-vit-custom": dict(embed_dim=32,
                            vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32,
                                            block_type="custom"),
                            text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2,
                                          block_type="custom")),
    # the demo's model: a little wider and deeper, 64×64 images
    "tiny-demo": dict(embed_dim=64,
                      vision_cfg=dict(image_size=64, layers=4, width=128, patch_size=8, head_width=32),
                      text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=4)),
}


@dataclass
class Backbone:
    model: nn.Module
    preprocess: Callable       # open_clip's evaluation transform for this model
    tokenizer: Callable        # list[str] -> LongTensor of token ids
    name: str
    pretrained: Optional[str]


def list_backbones() -> list[str]:
    return sorted(TINY_CONFIGS) + sorted(open_clip.list_models())


def build_clip(backbone: str = "ViT-B-16", pretrained: Optional[str] = "openai", device="cpu",
               seed: int = 0) -> Backbone:
    """An open_clip CLIP model in eval mode with its eval preprocessing and tokenizer.

    ``tiny-*`` backbones are random-init (from ``seed``); ``pretrained`` is ignored for them.
    """
    if backbone in TINY_CONFIGS:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CONFIGS[backbone])
        torch.random.set_rng_state(generator_state)
        size = TINY_CONFIGS[backbone]["vision_cfg"]["image_size"]
        preprocess_cfg = merge_preprocess_dict(asdict(PreprocessCfg()), {"size": (size, size)})
        set_model_preprocess_cfg(model, preprocess_cfg)  # as open_clip's factory does for named models
        preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
        context = TINY_CONFIGS[backbone]["text_cfg"]["context_length"]
        tokenizer = open_clip.SimpleTokenizer(context_length=context)
    elif backbone in open_clip.list_models():
        model, _, preprocess = open_clip.create_model_and_transforms(backbone, pretrained=pretrained or None)
        tokenizer = open_clip.get_tokenizer(backbone)
    else:
        raise ValueError(f"unknown backbone {backbone!r}; expected an open_clip model name (e.g. ViT-B-16) "
                         f"or one of {', '.join(sorted(TINY_CONFIGS))}")
    return Backbone(model.to(device).eval(), preprocess, tokenizer, backbone, pretrained)
