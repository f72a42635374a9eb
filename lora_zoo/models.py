"""Building open_clip backbones: the real ones by name, and tiny ones defined here for tests and the demo.

``build_clip("ViT-B-16", "openai")`` is what users run. ``pretrained`` is an
open_clip tag (``openai``), a local weights file, or a folder used as the
download cache (holding the default tag's weights); ``None`` gives random
weights (benchmarks). A tag is first looked up in the local cache with the hub
offline (instant); only when it is missing is the network tried, and when the
hub cannot be reached the build fails at once with one line naming what was
looked for and the ways out, instead of minutes of retries. OpenAI weights
loaded from a *file* need the ``-quickgelu`` model name (e.g.
``ViT-B-16-quickgelu``), as open_clip documents; the tag sets it by itself.

The ``tiny-*`` backbones are small open_clip CLIP configs built in code (random
init from ``seed``), so the test suite and the CPU demo exercise the real
open_clip classes with no download at all. ``tiny-clip`` has weights of its own,
shipped in ``lora_zoo/weights/`` (``pretrained: shipped``, its default): a plain
open_clip state dict (safetensors, fp16) from contrastive pretraining on
procedural scenes (``scripts/pretrain_tiny_clip.py``, ``datasets/scenes.py``).
Any tiny backbone also loads a local weights file through open_clip's
``load_checkpoint``; a ``<file>.sha256`` beside it (``sha256sum`` format) is
checked first, and the shipped file always has one.
"""
from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import open_clip
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
import torch
from torch import nn

from .files import sha256_file

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
    tokenizer: Callable        # list[str] -> LongTensor of token ids
    name: str
    pretrained: Optional[str]


def list_backbones() -> list[str]:
    return sorted(TINY_CONFIGS) + sorted(open_clip.list_models())


HUB_HOST = "huggingface.co"
SHIPPED = "shipped"  # the pretrained value naming a tiny backbone's own weights file (lora_zoo/weights/)


class WeightsNotFoundError(ValueError):
    """The requested pretrained weights are neither local nor downloadable; the message is one line."""


def resolve_pretrained(backbone: str, pretrained: Optional[str]) -> Optional[str]:
    """The weights a run of ``backbone`` loads, as recorded in its config: for a tiny backbone the default
    tag means its shipped weights (``"shipped"``; tiny-clip) or random init (None; the others)."""
    if pretrained == SHIPPED and backbone not in SHIPPED_WEIGHTS:
        raise WeightsNotFoundError(f"{backbone} has no shipped weights (only {', '.join(SHIPPED_WEIGHTS)} has); "
                                   "give a weights file or none")
    if backbone in TINY_CONFIGS and pretrained in (None, DEFAULT_TAG, SHIPPED):
        return SHIPPED if backbone in SHIPPED_WEIGHTS and pretrained is not None else None
    return pretrained


def weights_file(backbone: str, pretrained: Optional[str]) -> Optional[Path]:
    """The local file ``pretrained`` loads for ``backbone``, if it names one (a path, or the shipped weights)."""
    pretrained = resolve_pretrained(backbone, pretrained)
    if pretrained == SHIPPED:
        return SHIPPED_WEIGHTS[backbone]
    if pretrained is not None and Path(pretrained).expanduser().is_file():
        return Path(pretrained).expanduser()
    return None


def weights_identity(backbone: str, pretrained: Optional[str]) -> Any:
    """What a cache of the model's outputs is keyed on for its weights: a local file's resolved path, size and
    modification time (new weights under the same name: a new key), else the pretrained tag."""
    path = weights_file(backbone, pretrained)
    if path is not None:
        return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
    return pretrained


@contextmanager
def _quiet_logging():
    """open_clip reports download failures and random init on the root logger; we report them ourselves."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@contextmanager
def _hub_offline(offline: bool):
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip installs it
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline or before
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _tag_and_cache(backbone: str, pretrained: str) -> tuple[str, Optional[str]]:
    """``(tag, cache folder or None)`` that ``pretrained`` (a tag or a cache folder) names for an open_clip model;
    a one-line error for a missing weights file or a tag open_clip does not know."""
    path = Path(pretrained).expanduser()
    tag, cache_dir = (DEFAULT_TAG, str(path)) if path.is_dir() else (pretrained, None)
    if tag not in open_clip.list_pretrained_tags_by_model(backbone):
        if any(sep in pretrained for sep in "/\\") or path.suffix in (".pt", ".bin", ".safetensors", ".pth"):
            raise WeightsNotFoundError(f"pretrained weights file not found: {path}")
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(backbone)) or "none"
        raise WeightsNotFoundError(f"unknown pretrained tag {tag!r} for {backbone}; open_clip knows: {tags} "
                                   "(or give a weights file or cache folder)")
    return tag, cache_dir


def _offline_error(backbone: str, tag: str, cache_dir: Optional[str]) -> WeightsNotFoundError:
    where = cache_dir or "the default open_clip / Hugging Face cache (~/.cache/huggingface)"
    return WeightsNotFoundError(
        f"no {backbone} weights '{tag}' in {where}, and {HUB_HOST} cannot be reached: set pretrained to a local "
        f"weights file, or to a folder holding a populated cache, or use a tiny-* backbone (random init) for a dry run")


def check_weights(backbone: str, pretrained: Optional[str]) -> None:
    """Fail at once, before any data is read or model built, when ``pretrained`` names weights that are neither
    on disk nor downloadable (no cached copy of a tag and the hub unreachable); does nothing otherwise."""
    pretrained = resolve_pretrained(backbone, pretrained)
    if backbone not in open_clip.list_models() or pretrained is None or Path(pretrained).expanduser().is_file():
        return  # tiny backbones, random init and files are checked where they load
    tag, cache_dir = _tag_and_cache(backbone, pretrained)
    try:
        with _quiet_logging(), _hub_offline(True):
            if open_clip.pretrained.download_pretrained(open_clip.pretrained.get_pretrained_cfg(backbone, tag),
                                                        cache_dir=cache_dir):
                return
    except Exception:  # noqa: BLE001 - not cached: open_clip raises what the hub client raises
        pass
    if not _hub_reachable():
        raise _offline_error(backbone, tag, cache_dir)


def _open_clip(backbone: str, pretrained: Optional[str]):
    """The open_clip model for a model name and a tag, file, cache folder or None (its preprocessing config set:
    ``datasets.build_test_transform`` reads it)."""
    if pretrained is None:
        with _quiet_logging():
            return open_clip.create_model(backbone, pretrained=None)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return open_clip.create_model(backbone, pretrained=str(path))
    tag, cache_dir = _tag_and_cache(backbone, pretrained)
    for offline in (True, False):
        if not offline and not _hub_reachable():
            break
        try:
            with _quiet_logging(), _hub_offline(offline):
                return open_clip.create_model(backbone, pretrained=tag, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - open_clip wraps hub errors in RuntimeError/FileNotFoundError
            if not offline:
                raise WeightsNotFoundError(f"cannot download {backbone} weights '{tag}': "
                                           f"{' '.join(str(err).split())[:300]}") from None
    raise _offline_error(backbone, tag, cache_dir)


def checksum_file(weights: Union[str, Path]) -> Path:
    """Where the SHA-256 of ``weights`` is recorded: ``<weights>.sha256``, in ``sha256sum`` format."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".sha256")


def load_weights(model: nn.Module, path: Union[str, Path]) -> None:
    """Load an open_clip state dict file into ``model`` (strict), after checking its recorded SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"pretrained weights file not found: {path} (expected an open_clip state dict, "
                                   ".safetensors or .pt)")
    record = checksum_file(path)
    if path.resolve() in SHIPPED_WEIGHTS.values() and not record.is_file():
        raise ValueError(f"checksum file not found: {record} (it records the SHA-256 of the shipped {path.name})")
    if record.is_file():
        expected = record.read_text().split()[:1]
        if [sha256_file(path)] != expected:
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

    ``tiny-*`` backbones start from a random init (from ``seed``) and load their shipped weights by default
    (tiny-clip) or the weights file ``pretrained`` names.
    """
    pretrained = resolve_pretrained(backbone, pretrained)
    if backbone in TINY_CONFIGS:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CONFIGS[backbone])
        torch.random.set_rng_state(generator_state)
        if pretrained is not None:
            load_weights(model, weights_file(backbone, pretrained) or Path(pretrained).expanduser())
        size = TINY_CONFIGS[backbone]["vision_cfg"]["image_size"]
        preprocess_cfg = merge_preprocess_dict(asdict(PreprocessCfg()), {"size": (size, size)})
        set_model_preprocess_cfg(model, preprocess_cfg)  # as open_clip's factory does for named models
        context = TINY_CONFIGS[backbone]["text_cfg"]["context_length"]
        tokenizer = open_clip.SimpleTokenizer(context_length=context)
    elif backbone in open_clip.list_models():
        model = _open_clip(backbone, pretrained)
        tokenizer = open_clip.get_tokenizer(backbone)
    else:
        raise ValueError(f"unknown backbone {backbone!r}; expected an open_clip model name (e.g. ViT-B-16) "
                         f"or one of {', '.join(sorted(TINY_CONFIGS))}")
    return Backbone(model.to(device).eval(), tokenizer, backbone, pretrained)
