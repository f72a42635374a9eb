"""Core few-shot dataset types: the image record, few-shot sampling, the dataset object.

Few-shot sampling follows the protocol used by CLIP-LoRA (Zanella & Ben Ayed,
"Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW 2024), which
inherits CoOp's ``generate_fewshot_dataset``: items are grouped by label in
order of first appearance; each group gives ``rng.sample(items, K)`` or, when
the class is short, ``rng.choices(items, k=K)`` (with replacement). One
``random.Random(seed)`` draws the validation subset (min(K, 4) per class)
first and the training subset (K per class) second; the test split is kept
whole. This reproduces ``random.seed(seed)`` followed by CLIP-LoRA's calls.
(ImageNet draws differently; ``imagenet.py`` holds its sampler.)

Images: ``load_image`` decodes every image the runs and ``datasets.check`` read, as
8-bit RGB; 16-bit grey (PNG, TIFF, PGM) is scaled to 8 bits over its full range,
float and 32-bit samples are refused by name (``to_rgb``).

Prompts: ``"a photo of a {}."`` by default, as CLIP-LoRA prompts every dataset;
``prompts("dataset")`` uses the dataset's own CoOp template ("a photo of a {},
a type of pet." ...). ``ClassSplit`` holds the base and new halves of a
dataset's classes (made by ``base2new.py``).
"""

from __future__ import annotations

import logging
import os
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."
MAX_VAL_SHOTS = 4
SUBSAMPLES = ("all", "base", "new")  # which classes a dataset keeps: all, or one base-to-new half
#: Pillow's modes of 16-bit unsigned grey samples (``load_image`` scales them to 8 bits)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class DatasetError(ValueError):
    """A dataset could not be located, read or sampled; the message is one line."""


@dataclass(frozen=True)
class Datum:
    """One image: absolute path, integer label, cleaned class name."""

    impath: str
    label: int
    classname: str


def group_by_label(items: Sequence[Datum]) -> Dict[int, List[Datum]]:
    """Items per label, labels in order of first appearance (dict insertion order)."""
    groups: Dict[int, List[Datum]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return groups


def sample_few_shot(items: Sequence[Datum], shots: int, rng: random.Random, split: str = "train") -> List[Datum]:
    """``shots`` items per class; with replacement (and a warning) when a class is short."""
    sampled: List[Datum] = []
    for label, group in group_by_label(items).items():
        if len(group) >= shots:
            sampled.extend(rng.sample(group, shots))
        else:
            logger.warning("class '%s' (label %d) has %d %s images, fewer than the %d %s: sampling with replacement",
                           group[0].classname, label, len(group), split, shots,
                           "shots" if split == "train" else "validation images drawn (min(shots, 4))")
            sampled.extend(rng.choices(group, k=shots))
    return sampled


def sample_range(image: Image.Image) -> Optional[int]:
    """The largest value a sample of a high-bit-depth image can hold (65535 for 16 bits), None for the 8-bit
    modes ``convert("RGB")`` reads right; a ``DatasetError`` for samples with no defined range (float, 32-bit).

    Pillow opens 16-bit RGB(A) and grey+alpha PNGs as 8-bit modes already (high byte), 16-bit grey PNGs and
    TIFFs as ``I;16``/``I;16B``, and 16-bit PGMs as ``I`` scaled to 0..65535; ``convert("RGB")`` clips those
    at 255 (almost white) instead of scaling them.
    """
    mode, fmt = image.mode, image.format
    if mode in SIXTEEN_BIT_MODES:
        return 65535
    if mode == "I":
        bits = image.tag_v2.get(258, (0,))[0] if fmt == "TIFF" else 16 if fmt in ("PNG", "PPM") else 0
        if bits == 16:
            return 65535
        raise DatasetError(f"mode I ({bits or 32}-bit integer samples, {fmt}) has no defined 8-bit range; save it "
                           "with 8 or 16 bits per sample")
    if mode == "F" or mode.startswith(("I;", "F;")):
        raise DatasetError(f"mode {mode} ({'floating-point' if mode[0] == 'F' else 'integer'} samples, {fmt}) has "
                           "no defined 8-bit range; save it with 8 or 16 bits per sample")
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits a sample; high-bit-depth grey scaled to 0..255 (``round(v * 255 / max)``), full range kept."""
    top = sample_range(image)
    if top is None:
        return image.convert("RGB")
    import numpy as np  # only for high-bit-depth images: datasets.check must start without it

    values = np.clip(np.asarray(image).astype(np.int64), 0, top)
    return Image.fromarray(((values * 255 + top // 2) // top).astype(np.uint8)).convert("RGB")


def load_image(path: str) -> Image.Image:
    """Decode an image as RGB (``to_rgb``); any failure, or samples with no 8-bit range, becomes a one-line error
    naming the file."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except DatasetError as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DatasetError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None


def check_files_exist(items: Sequence[Datum], what: str) -> None:
    """Raise one line naming the first missing image and how many are missing."""
    missing = [item.impath for item in items if not os.path.exists(item.impath)]
    if missing:
        unique = list(dict.fromkeys(missing))
        total = len(set(item.impath for item in items))
        raise DatasetError(
            f"image file not found: {unique[0]} ({len(unique)} of {total} {what} are missing; "
            f"`python -m datasets.check` lists them)")


def check_classes(dataset: FewShotDataset) -> None:
    """Classification needs two classes: with one, every prediction is right (100%) whatever the model does."""
    if dataset.num_classes < 2:
        raise DatasetError(f"{dataset.name} at {dataset.dataset_dir} has {dataset.num_classes} class"
                           f"{'' if dataset.num_classes == 1 else 'es'}: classification needs at least 2 (with one, "
                           "every prediction is right and top-1 is 100% whatever the model does)")


def check_subsample(subsample) -> None:
    if subsample not in SUBSAMPLES:
        raise DatasetError(f"subsample must be one of {', '.join(SUBSAMPLES)}, got {subsample!r}")


@dataclass(frozen=True)
class ClassSplit:
    """The base and new halves of a dataset's classes (``base2new.py``), as original labels of ``classnames``."""

    classnames: Tuple[str, ...]   # every class of the dataset, by original label
    base_labels: Tuple[int, ...]
    new_labels: Tuple[int, ...]

    def labels(self, subsample: str) -> Tuple[int, ...]:
        """The original labels kept by ``subsample``; position = new label."""
        check_subsample(subsample)
        return {"all": tuple(range(len(self.classnames))), "base": self.base_labels,
                "new": self.new_labels}[subsample]

    @property
    def base_classes(self) -> List[str]:
        return [self.classnames[label] for label in self.base_labels]

    @property
    def new_classes(self) -> List[str]:
        return [self.classnames[label] for label in self.new_labels]

    def as_record(self) -> Dict[str, list]:
        """What a run records: the original labels and class names of both halves."""
        return {"base_labels": list(self.base_labels), "new_labels": list(self.new_labels),
                "base_classes": self.base_classes, "new_classes": self.new_classes}


@dataclass
class FewShotDataset:
    """A dataset after few-shot sampling: ``train_x`` (K/class), ``val`` (min(K,4)/class), full ``test``.

    ``templates`` maps "default" and "dataset" to prompt templates. ``shots`` is 0 for a test split alone
    (``build_test_dataset``: ``train_x`` and ``val`` empty). ``subsample`` is "all", or "base"/"new" for one half
    of the classes, relabelled 0..k-1; ``class_split`` (``ClassSplit``) then gives both halves as
    original labels and names.
    """

    name: str
    dataset_dir: Path
    classnames: List[str]
    train_x: List[Datum]
    val: List[Datum]
    test: List[Datum]
    shots: int
    seed: int
    template: str = DEFAULT_TEMPLATE
    templates: Dict[str, str] = field(
        default_factory=lambda: {"default": DEFAULT_TEMPLATE, "dataset": DEFAULT_TEMPLATE})
    subsample: str = "all"
    class_split: Optional[ClassSplit] = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, template: Optional[str] = None) -> List[str]:
        """One prompt per class, in label order.

        ``template`` is None (``self.template``), a key of ``templates`` ("default", "dataset")
        or a format string with one ``{}``.
        """
        chosen = self.templates.get(template, template) if template else self.template
        check_template(chosen, tuple(self.templates))
        return [chosen.format(name) for name in self.classnames]

    def __repr__(self) -> str:
        return (f"FewShotDataset({self.name!r}, classes={self.num_classes}, shots={self.shots}, seed={self.seed}, "
                f"train={len(self.train_x)}, val={len(self.val)}, test={len(self.test)}, "
                + (f"subsample={self.subsample!r}, " if self.subsample != "all" else "") +
                f"dir={str(self.dataset_dir)!r})")


def check_template(template: str, names=("default", "dataset")) -> None:
    """A one-line error unless ``template`` is a template name or a format string with exactly one ``{}``."""
    if template in names:
        return
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError:
        fields = None
    if fields != [""]:
        raise DatasetError(f"prompt template must contain exactly one '{{}}' for the class name (and no other "
                           f"{{...}} fields), or be one of {', '.join(names)}; got {template!r}")


def check_shots(shots) -> None:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DatasetError(f"shots must be an integer >= 1, got {shots!r}")


def sample_dataset_splits(splits: Dict[str, List[Datum]], shots: int, seed: int):
    """CLIP-LoRA order with one RNG: validation (min(K,4)/class) first, then train (K/class)."""
    check_shots(shots)
    rng = random.Random(seed)
    val = sample_few_shot(splits["val"], min(shots, MAX_VAL_SHOTS), rng, split="val")
    train = sample_few_shot(splits["train"], shots, rng, split="train")
    return train, val
