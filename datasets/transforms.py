"""Image transforms derived from an open_clip model's own preprocessing configuration.

Test images get exactly open_clip's validation preprocessing (resize, centre
crop, normalise). Training images get the augmentation of the CLIP-LoRA
protocol (Zanella & Ben Ayed, CVPRW 2024): RandomResizedCrop with scale
0.08-1 and bicubic interpolation, a horizontal flip, then the model's
normalisation. Mean, std and size are always read from open_clip, never re-typed.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Union

import torch
from open_clip import get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torchvision import transforms as T

TRAIN_CROP_SCALE = (0.08, 1.0)


def resolve_preprocess_cfg(source: Any) -> PreprocessCfg:
    """A ``PreprocessCfg`` from an open_clip model, a ``PreprocessCfg`` or a dict of its fields.

    Fields the source does not set keep open_clip's defaults (OpenAI mean/std, bicubic).
    """
    if isinstance(source, PreprocessCfg):
        return source
    if isinstance(source, Mapping):
        overlay = dict(source)
    elif isinstance(source, torch.nn.Module):
        overlay = dict(get_model_preprocess_cfg(source))
    else:
        raise TypeError(
            f"expected an open_clip model, a PreprocessCfg or a dict of its fields, got {type(source).__name__}")
    cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), overlay))
    if isinstance(cfg.size, (list, tuple)):
        cfg.size = tuple(int(value) for value in cfg.size)
    return cfg


def _crop_size(size: Union[int, Tuple[int, ...]]) -> Union[int, Tuple[int, int]]:
    if isinstance(size, (list, tuple)):
        return (int(size[0]), int(size[1])) if size[0] != size[1] else int(size[0])
    return int(size)


def build_train_transform(preprocess_cfg_or_model: Any, size: Optional[int] = None) -> T.Compose:
    """RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip + ToTensor + the model's Normalize."""
    cfg = resolve_preprocess_cfg(preprocess_cfg_or_model)
    crop = _crop_size(size if size is not None else cfg.size)
    return T.Compose([
        T.RandomResizedCrop(crop, scale=TRAIN_CROP_SCALE, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        T.Normalize(mean=cfg.mean, std=cfg.std),
    ])


def build_test_transform(model_or_preprocess: Any):
    """open_clip's validation preprocessing for a model or config.

    An already built transform (e.g. ``preprocess_val`` returned by
    ``open_clip.create_model_and_transforms``) is returned unchanged.
    """
    if callable(model_or_preprocess) and not isinstance(model_or_preprocess, torch.nn.Module):
        return model_or_preprocess
    cfg = resolve_preprocess_cfg(model_or_preprocess)
    return image_transform_v2(cfg, is_train=False)
