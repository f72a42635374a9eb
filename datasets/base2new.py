"""Base-to-new class splits, exactly as CoOp's ``subsample_classes`` makes them.

Base-to-new generalisation (CoCoOp; Zhou et al., CVPR 2022) trains on half of a
dataset's classes and tests on both halves. KaiyangZhou/CoOp
(``datasets/oxford_pets.py``, ``OxfordPets.subsample_classes``, used by every
dataset there) makes the halves this way, and so does this module:

- the few-shot subsets are drawn over all classes first (the draw of the
  few-shot protocol: a base run trains on the base-class images of the
  all-class draw, nothing is drawn again);
- the labels of the training subset are sorted, ``m = ceil(n / 2)``; the first
  ``m`` labels are the base classes and the other ``n - m`` the new classes
  (DTD 47 → 24/23, Pets 37 → 19/18, SUN397 397 → 199/198);
- the chosen half is relabelled ``0..k-1`` in label order, and train, val and
  test keep only its classes; class names follow the labels.

CoOp takes the labels from the training subset. Here every class must have a
training image for a base-to-new split (an error otherwise), so the labels
are all of the dataset's, ``0..C-1``, and the test-only view of a dataset
(``build_test_dataset``, no training subset) splits its classes identically.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import List, Sequence

from .base import ClassSplit, DatasetError, Datum, FewShotDataset, check_subsample


#: the classes each half needs: a half of one class scores 100% whatever the model does
MIN_CLASSES_PER_HALF = 2


def split_classes(name: str, classnames: Sequence[str]) -> ClassSplit:
    """CoOp's rule on labels ``0..C-1``: the first ``ceil(C / 2)`` are base, the rest new; each half needs
    ``MIN_CLASSES_PER_HALF`` classes (CoOp would split 2 classes 1/1 and report HM 100%)."""
    count = len(classnames)
    if count < 2 * MIN_CLASSES_PER_HALF:
        raise DatasetError(f"base-to-new needs at least {MIN_CLASSES_PER_HALF} classes in each half, "
                           f"{2 * MIN_CLASSES_PER_HALF} in all (a half of one class scores 100% whatever the model "
                           f"does); {name} has {count}")
    half = math.ceil(count / 2)
    return ClassSplit(tuple(classnames), tuple(range(half)), tuple(range(half, count)))


def keep_classes(items: Sequence[Datum], labels: Sequence[int]) -> List[Datum]:
    """The items of ``labels`` (original labels), relabelled by their position in ``labels``, order kept."""
    relabel = {label: position for position, label in enumerate(labels)}
    return [Datum(item.impath, relabel[item.label], item.classname) for item in items if item.label in relabel]


def check_every_class_trains(dataset: FewShotDataset) -> None:
    """CoOp splits the labels its training subset has; ours are all labels, so each class needs a shot."""
    present = {item.label for item in dataset.train_x}
    absent = [label for label in range(dataset.num_classes) if label not in present]
    if absent:
        raise DatasetError(f"class '{dataset.classnames[absent[0]]}' (label {absent[0]}) of {dataset.name} has no "
                           f"training image ({len(absent)} of {dataset.num_classes} classes have none); base-to-new "
                           "splits the classes of the training subset, so every class needs one")


def subsample_classes(dataset: FewShotDataset, subsample: str) -> FewShotDataset:
    """``dataset`` (drawn over all classes) restricted to its base or new half; ``"all"`` returns it unchanged.

    The result records the split in ``class_split`` and the kept half in ``subsample``.
    """
    check_subsample(subsample)
    if subsample == "all":
        return dataset
    if dataset.shots:
        check_every_class_trains(dataset)
    class_split = split_classes(dataset.name, dataset.classnames)
    labels = class_split.labels(subsample)
    return replace(dataset, classnames=[dataset.classnames[label] for label in labels],
                   train_x=keep_classes(dataset.train_x, labels), val=keep_classes(dataset.val, labels),
                   test=keep_classes(dataset.test, labels), subsample=subsample, class_split=class_split)
