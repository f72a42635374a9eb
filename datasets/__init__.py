"""Few-shot image classification datasets for CLIP adaptation: the eleven of the CoOp benchmark and your own.

ImageNet, Caltech101, OxfordPets, StanfordCars, Flowers102, Food101,
FGVCAircraft, SUN397, DTD, EuroSAT and UCF101, read from the CoOp split files
(Zhou et al., IJCV 2022) in CoOp's or CLIP-LoRA's folder names, and
``imagefolder`` (one folder per class). K shots per class are drawn exactly as
CLIP-LoRA draws them (Zanella & Ben Ayed, CVPRW 2024); ``subsample="base"|"new"``
keeps CoOp's base-to-new half of the classes. ``build_test_dataset`` gives a
test split alone, the only view of the four test-only ImageNet variants
(``DOMAIN_DATASETS``). See DATASET.md for the expected folders and
``python -m datasets.check`` to verify them.

This package shadows Hugging Face ``datasets`` when run from the repository root.
Names needing torch, open_clip or numpy are imported on first use, so that
``python -m datasets.check`` and ``python -m datasets.synthetic`` start fast.
"""

import importlib

from .base import DEFAULT_TEMPLATE, SUBSAMPLES, ClassSplit, DatasetError, Datum, FewShotDataset
from .registry import (BENCHMARK_DATASETS, DOMAIN_DATASETS, DatasetSpec, build_dataset, build_test_dataset, get_spec,
                       list_datasets)

_LAZY = {
    "build_data_loader": "loader",
    "build_test_transform": "transforms",
    "build_train_transform": "transforms",
    "write_synthetic_dataset": "synthetic",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BENCHMARK_DATASETS", "DEFAULT_TEMPLATE", "DOMAIN_DATASETS", "SUBSAMPLES", "ClassSplit", "DatasetError",
    "DatasetSpec", "Datum", "FewShotDataset", "build_data_loader", "build_dataset", "build_test_dataset",
    "build_test_transform", "build_train_transform", "get_spec", "list_datasets", "write_synthetic_dataset",
]
