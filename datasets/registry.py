"""Registry of the few-shot benchmarks: where each lives on disk and how it is prompted.

Each dataset is one ``DatasetSpec`` entry. Two folder conventions are accepted:
CoOp's (``dtd/``, ``food-101/``, ``oxford_pets/``; Zhou et al., IJCV 2022) and
CLIP-LoRA's (``DTD/``, ``Food101/``, ``OxfordPets/``; Zanella & Ben Ayed,
CVPRW 2024). Either way the folder holds ``images/`` and the CoOp split file.
The dataset-specific templates are the single-prompt ones CoOp and CLIP-LoRA
use for these datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

from .base import (DEFAULT_TEMPLATE, DatasetError, FewShotDataset, check_files_exist, classnames_from_splits,
                   read_split, sample_dataset_splits)

IMAGE_FOLDER = "images"


@dataclass(frozen=True)
class DatasetSpec:
    """On-disk names and prompt templates of one benchmark."""

    name: str
    folders: Tuple[str, ...]  # accepted dataset folder names, in order of preference
    split_file: str
    coop_template: str

    @property
    def templates(self) -> Dict[str, str]:
        return {"default": DEFAULT_TEMPLATE, "coop": self.coop_template}


_REGISTRY: Dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    _REGISTRY[spec.name] = spec
    return spec


register(DatasetSpec("dtd", ("dtd", "DTD"), "split_zhou_DescribableTextures.json", "{} texture."))
register(DatasetSpec("food101", ("food-101", "Food101"), "split_zhou_Food101.json", "a photo of {}, a type of food."))
register(DatasetSpec("oxford_pets", ("oxford_pets", "OxfordPets"), "split_zhou_OxfordPets.json",
                     "a photo of a {}, a type of pet."))


def list_datasets() -> List[str]:
    """Names accepted by ``build_dataset``."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DatasetError(f"unknown dataset '{name}' (available: {', '.join(list_datasets())})") from None


def _expected(spec: DatasetSpec, root: Path) -> str:
    folders = " or ".join(str(root / folder) for folder in spec.folders)
    return f"expected {folders} containing {IMAGE_FOLDER}/ and {spec.split_file}"


def locate_dataset(name: str, root_path: Union[str, Path]) -> Tuple[Path, Path, Path]:
    """Return ``(dataset_dir, image_dir, split_path)`` or raise a one-line ``DatasetError``.

    The first existing folder among the spec's conventions is used.
    """
    spec = get_spec(name)
    root = Path(root_path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"root_path not found: {root} (expected a directory holding {' or '.join(spec.folders)}/)")
    candidates = [root / folder for folder in spec.folders]
    dataset_dir = next((path for path in candidates if path.is_dir()), None)
    if dataset_dir is None:
        raise DatasetError(f"dataset folder not found: {candidates[0]} ({_expected(spec, root)})")
    image_dir = dataset_dir / IMAGE_FOLDER
    split_path = dataset_dir / spec.split_file
    if not image_dir.is_dir():
        raise DatasetError(f"image folder not found: {image_dir} ({_expected(spec, root)})")
    if not split_path.is_file():
        raise DatasetError(f"split file not found: {split_path} (the CoOp split file; see DATASET.md)")
    return dataset_dir, image_dir, split_path


def build_dataset(name: str, root_path: Union[str, Path], shots: int, seed: int = 1) -> FewShotDataset:
    """Load ``name`` from ``root_path`` and draw the few-shot train/val subsets for ``seed``.

    Every sampled train/val image and every test image is checked to exist.
    """
    spec = get_spec(name)
    dataset_dir, image_dir, split_path = locate_dataset(name, root_path)
    splits = read_split(split_path, image_dir)
    for split in ("train", "test"):
        if not splits[split]:
            raise DatasetError(f"split file {split_path} has an empty '{split}' list")
    classnames = classnames_from_splits(splits, split_path)
    train_x, val = sample_dataset_splits(splits, shots, seed)
    check_files_exist(train_x + val, f"sampled train/val images listed in {split_path}")
    check_files_exist(splits["test"], f"test images listed in {split_path}")
    return FewShotDataset(
        name=name, dataset_dir=dataset_dir, classnames=classnames, train_x=train_x, val=val,
        test=splits["test"], shots=shots, seed=seed, template=DEFAULT_TEMPLATE, templates=spec.templates)
