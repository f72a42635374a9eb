"""Building open_clip backbones: the real ones by name, and tiny ones defined here for tests and the demo.

``build_clip("ViT-B-16", "openai")`` is what users run (open_clip downloads or
reads cached weights). ``pretrained=None`` gives the same architecture with
random weights (benchmarks, no network). The ``tiny-*`` backbones are small
open_clip CLIP configs built in code, so the test suite and the CPU demo
exercise the real open_clip classes with no download at all.

``tiny-clip`` has weights of its own, shipped in ``lora_zoo/weights/``: a
plain open_clip state dict (safetensors, fp16) from contrastive pretraining on
procedural scenes (``scripts/pretrain_tiny_clip.py``, ``datasets/scenes.py``).
Any tiny backbone also loads a local weights file (``pretrained=PATH``) through
open_clip's ``load_checkpoint``; a ``PATH.sha256`` file beside it
(``sha256sum`` format) is checked first, and the shipped file always has one.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

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
    # pretrained on procedural scenes (weights shipped): 48×48 images in 6×6 patches of 8 px, 4-block towers;
    # the text tower is 64 wide because its 49408-token embedding is most of the file
    "tiny-clip": dict(embed_dim=64,
                      vision_cfg=dict(image_size=48, layers=4, width=128, patch_size=8, head_width=32),
                      text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=4, layers=4)),
}
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_WEIGHTS = {"tiny-clip": WEIGHTS_DIR / "tiny-clip.safetensors"}
# the default tag of build_clip and of the experiment config: each backbone's standard weights
# (OpenAI's for open_clip names, the shipped file for tiny-clip, random init for the other tiny ones)
DEFAULT_TAG = "openai"


@dataclass
class Backbone:
    model: nn.Module
    preprocess: Callable       # open_clip's evaluation transform for this model
    tokenizer: Callable        # list[str] -> LongTensor of token ids
    name: str
    pretrained: Optional[str]


def list_backbones() -> list[str]:
    return sorted(TINY_CONFIGS) + sorted(open_clip.list_models())


def checksum_file(weights: Union[str, Path]) -> Path:
    """Where the SHA-256 of ``weights`` is recorded: ``<weights>.sha256``, in ``sha256sum`` format."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".sha256")


def sha256_of(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tiny_weights(backbone: str, pretrained: Optional[str]) -> Optional[Path]:
    """The weights file a tiny backbone loads: none (random init), its shipped file, or ``pretrained`` as a path."""
    if pretrained is None:
        return None
    if pretrained == DEFAULT_TAG:
        return SHIPPED_WEIGHTS.get(backbone)
    return Path(pretrained).expanduser()


def load_weights(model: nn.Module, path: Union[str, Path]) -> None:
    """Load an open_clip state dict file into ``model`` (strict), after checking its recorded SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path} (expected an open_clip state dict, .safetensors or .pt)")
    record = checksum_file(path)
    if path.resolve() in SHIPPED_WEIGHTS.values() and not record.is_file():
        raise ValueError(f"checksum file not found: {record} (it records the SHA-256 of the shipped {path.name})")
    if record.is_file():
        expected = record.read_text().split()[:1]
        if [sha256_of(path)] != expected:
            raise ValueError(f"checksum mismatch: {path} does not have the SHA-256 recorded in {record} "
                             "(a changed or truncated file; regenerate it with scripts/pretrain_tiny_clip.py)")
    try:
        open_clip.load_checkpoint(model, str(path))
    except Exception as err:  # noqa: BLE001 - safetensors, pickle and load_state_dict errors alike become one line
        problem = " ".join(str(err).split())
        raise ValueError(f"cannot load weights {path} into this model: {problem[:300]}") from None


def build_clip(backbone: str = "ViT-B-16", pretrained: Optional[str] = DEFAULT_TAG, device="cpu",
               seed: int = 0) -> Backbone:
    """An open_clip CLIP model in eval mode with its eval preprocessing and tokenizer.

    ``tiny-*`` backbones start from a random init (from ``seed``), then load ``tiny_weights(backbone,
    pretrained)``: with the default tag, ``tiny-clip``'s shipped file; any other string is a weights path.
    """
    loaded = None
    if backbone in TINY_CONFIGS:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CONFIGS[backbone])
        torch.random.set_rng_state(generator_state)
        loaded = tiny_weights(backbone, pretrained)
        if loaded is not None:
            load_weights(model, loaded)
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
    source = pretrained if backbone not in TINY_CONFIGS else (str(loaded) if loaded is not None else None)
    return Backbone(model.to(device).eval(), preprocess, tokenizer, backbone, source)
