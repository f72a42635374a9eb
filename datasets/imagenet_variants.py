"""The four test-only ImageNet variants of domain generalisation, read in CoOp's layout.

ImageNet-V2 (Recht et al., ICML 2019), ImageNet-Sketch (Wang et al., NeurIPS
2019), ImageNet-A (Hendrycks et al., CVPR 2021) and ImageNet-R (Hendrycks et
al., ICCV 2021), laid out as KaiyangZhou/CoOp's DATASETS.md asks and read as its
``datasets/imagenetv2.py``, ``imagenet_sketch.py``, ``imagenet_a.py`` and
``imagenet_r.py`` read them. Each dataset folder holds a copy of ImageNet's
``classnames.txt`` (``<wnid> <class name>`` lines, names cleaned as ImageNet's):

- ``imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/``: folder
  ``i`` holds ImageNet class ``i``; the classes are those of ``classnames.txt``
  in ImageNet's label order (sorted wnids: the order of CoOp's file, whose line
  order CoOp's reader uses);
- ``imagenet-sketch/images/<wnid>/`` (1,000 classes),
  ``imagenet-adversarial/imagenet-a/<wnid>/`` and
  ``imagenet-rendition/imagenet-r/<wnid>/`` (200 classes each): the classes are
  the wnid folders, sorted; other files there (A's and R's ``README.txt``) are
  not classes.

Labels are the positions of the classes above, so A and R are 200-way: they
are scored over their own 200 classes' prompts. Images are a class folder's
image files, sorted (``folders.py``; CoOp lists them in file-system order).
There is no training split: these sets are only evaluated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from .base import DatasetError, Datum
from .folders import list_class_folders, list_image_files
from .imagenet import read_classname_file, read_classnames

NUMBERED_FOLDERS = "numbered_folders"   # ImageNet-V2: folder i is ImageNet class i
WNID_FOLDERS = "wnid_folders"           # Sketch, A, R: one folder per wnid
VARIANT_FORMATS = (NUMBERED_FOLDERS, WNID_FOLDERS)


def numbered_classes(image_dir: Path, classnames_path: Path) -> Tuple[List[str], List[str]]:
    """ImageNet-V2's ``(folder names "0".."C-1", class names)``: C classes of ``classnames.txt``, wnids sorted."""
    name_of = read_classname_file(classnames_path)
    if not name_of:
        raise DatasetError(f"class-name file {classnames_path} lists no classes (one '<wnid> <class name>' line "
                           "per ImageNet class)")
    expected = [str(label) for label in range(len(name_of))]
    present = set(list_class_folders(image_dir))
    missing = [folder for folder in expected if folder not in present]
    if missing:
        raise DatasetError(f"class folder not found: {image_dir / missing[0]} ({len(missing)} of {len(expected)} "
                           f"missing; ImageNet-V2 needs one folder per line of {classnames_path}, "
                           f"0..{len(expected) - 1})")
    extra = sorted(present - set(expected))
    if extra:
        raise DatasetError(f"unexpected class folder {image_dir / extra[0]}: ImageNet-V2's folders are the class "
                           f"numbers 0..{len(expected) - 1} of the {len(expected)} classes in {classnames_path}")
    return expected, [name_of[wnid] for wnid in sorted(name_of)]


def variant_classes(split_format: str, image_dir: Path, classnames_path: Path) -> Tuple[List[str], List[str]]:
    """``(class folders, class names)`` in label order."""
    if split_format == NUMBERED_FOLDERS:
        return numbered_classes(image_dir, classnames_path)
    wnids = list_class_folders(image_dir)
    return wnids, read_classnames(classnames_path, wnids)


def read_variant(split_format: str, image_dir: Path, classnames_path: Path) -> Tuple[List[Datum], List[str]]:
    """Every image of a variant, class by class in label order, and the class names."""
    folders, classnames = variant_classes(split_format, image_dir, classnames_path)
    items = [Datum(str(image_dir / folder / name), label, classnames[label])
             for label, folder in enumerate(folders) for name in list_image_files(image_dir / folder)]
    return items, classnames
