"""Registry of the eleven few-shot CLIP benchmarks and ``imagefolder``: where each lives, how it is read and prompted.

Each dataset is one ``DatasetSpec``. Folder names follow two conventions:
CoOp's (Zhou et al., IJCV 2022; e.g. ``caltech-101/``, ``oxford_flowers/``) and
CLIP-LoRA's (Zanella & Ben Ayed, CVPRW 2024; e.g. ``Caltech101/``,
``Flower102/``); ``eurosat`` and ``fgvc_aircraft`` use one name in both, and
ImageNet keeps ``imagenet/`` but moves ``train/``/``val/`` out of ``images/``.
Split formats: ``json`` (CoOp split file), ``variant_lists`` (FGVC-Aircraft's
text files), ``class_folders`` (ImageNet, ``imagenet.py``), ``imagefolder``
(a split written once next to a researcher's class folders, ``imagefolder.py``)
and the test-only ImageNet variants' ``numbered_folders`` and ``wnid_folders``
(``imagenet_variants.py``; ``DOMAIN_DATASETS``, read with ``build_test_dataset``).
``template`` is the dataset's prompt in CoOp's zero-shot CLIP
(``CUSTOM_TEMPLATES``); CLIP-LoRA prompts every dataset with "a photo of a {}.",
our default. ``BENCHMARK_DATASETS`` is the eleven in CoOp's table order and
``display_name`` their column titles. ``build_dataset(..., subsample="base"|"new")``
keeps one half of the classes (``base2new.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

from .base import (DEFAULT_TEMPLATE, DatasetError, FewShotDataset, check_classes, check_files_exist, check_shots,
                   check_subsample, sample_dataset_splits)
from .base2new import subsample_classes
from .imagefolder import prepare_split
from .imagenet import TRAIN_FOLDER, imagenet_test, read_class_folders, sample_imagenet
from .imagenet_variants import VARIANT_FORMATS, read_variant
from .splits import (Splits, classnames_from_splits, parse_split, read_split, read_variant_lists,
                     variant_list_file)

CONVENTIONS = ("coop", "clip_lora")
SPLIT_FORMATS = ("json", "variant_lists", "class_folders", "imagefolder", *VARIANT_FORMATS)


@dataclass(frozen=True)
class DatasetSpec:
    """On-disk layout, split format and prompt of one dataset."""

    name: str
    display_name: str            # column title in result tables
    folders: Tuple[str, str]     # dataset folder under root_path: (CoOp, CLIP-LoRA); "" is root_path itself
    image_folders: Tuple[str, str]  # image root inside the dataset folder, per convention; "" is the folder itself
    split_file: str              # in the dataset folder: JSON split, variants.txt, classnames.txt, ...
    split_format: str            # one of SPLIT_FORMATS
    template: str                # the dataset's own prompt template, "{}" for the class name

    def __post_init__(self):
        if self.split_format not in SPLIT_FORMATS or "{}" not in self.template:
            raise ValueError(f"bad DatasetSpec {self.name}: format {self.split_format!r}, template {self.template!r}")

    @property
    def templates(self) -> Dict[str, str]:
        return {"default": DEFAULT_TEMPLATE, "dataset": self.template}

    @property
    def test_only(self) -> bool:
        """A set that is only evaluated on (no training images): the ImageNet variants."""
        return self.split_format in VARIANT_FORMATS


@dataclass(frozen=True)
class Location:
    """Where a dataset was found: its folder, image root, split file and the convention(s) it matches."""

    dataset_dir: Path
    image_dir: Path
    split_path: Path
    convention: str


_REGISTRY: Dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _register(name, display_name, coop_folder, clip_lora_folder, image_folder, split_file, template,
              split_format="json", clip_lora_image_folder=None):
    image_folders = (image_folder, image_folder if clip_lora_image_folder is None else clip_lora_image_folder)
    register(DatasetSpec(name, display_name, (coop_folder, clip_lora_folder), image_folders, split_file,
                         split_format, template))


PHOTO = DEFAULT_TEMPLATE
_register("imagenet", "ImageNet", "imagenet", "imagenet", "images", "classnames.txt", PHOTO, "class_folders",
          clip_lora_image_folder="")
_register("caltech101", "Caltech", "caltech-101", "Caltech101", "101_ObjectCategories", "split_zhou_Caltech101.json",
          PHOTO)
_register("oxford_pets", "Pets", "oxford_pets", "OxfordPets", "images", "split_zhou_OxfordPets.json",
          "a photo of a {}, a type of pet.")
_register("stanford_cars", "Cars", "stanford_cars", "StanfordCars", "", "split_zhou_StanfordCars.json", PHOTO)
_register("oxford_flowers", "Flowers", "oxford_flowers", "Flower102", "jpg", "split_zhou_OxfordFlowers.json",
          "a photo of a {}, a type of flower.")
_register("food101", "Food", "food-101", "Food101", "images", "split_zhou_Food101.json",
          "a photo of {}, a type of food.")
_register("fgvc_aircraft", "Aircraft", "fgvc_aircraft", "fgvc_aircraft", "images", "variants.txt",
          "a photo of a {}, a type of aircraft.", "variant_lists")
_register("sun397", "SUN", "sun397", "SUN397", "SUN397", "split_zhou_SUN397.json", PHOTO)
_register("dtd", "DTD", "dtd", "DTD", "images", "split_zhou_DescribableTextures.json", "{} texture.")
_register("eurosat", "EuroSAT", "eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json",
          "a centered satellite photo of {}.")
_register("ucf101", "UCF", "ucf101", "UCF101", "UCF-101-midframes", "split_zhou_UCF101.json",
          "a photo of a person doing {}.")
_register("imagefolder", "Own data", "", "", "", "split_imagefolder.json", PHOTO, "imagefolder")
# the two few-shot tasks on procedural scenes that tiny-clip (lora_zoo/models.py) was not trained on
# (datasets/scenes.py writes them): new compositions of words it saw, and names it never saw
_register("scenes_compose", "Compose", "scenes_compose", "scenes_compose", "images", "split_scenes_compose.json", PHOTO)
_register("scenes_names", "Names", "scenes_names", "scenes_names", "images", "split_scenes_names.json", PHOTO)
# the four test-only ImageNet variants of domain generalisation, in CoOp's folders, prompted as ImageNet
_register("imagenetv2", "ImageNet-V2", "imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
          "classnames.txt", PHOTO, "numbered_folders")
_register("imagenet_sketch", "ImageNet-Sketch", "imagenet-sketch", "imagenet-sketch", "images", "classnames.txt",
          PHOTO, "wnid_folders")
_register("imagenet_a", "ImageNet-A", "imagenet-adversarial", "imagenet-adversarial", "imagenet-a", "classnames.txt",
          PHOTO, "wnid_folders")
_register("imagenet_r", "ImageNet-R", "imagenet-rendition", "imagenet-rendition", "imagenet-r", "classnames.txt",
          PHOTO, "wnid_folders")

#: (classes, test images) of each benchmark's CoOp split: what a run's text tower and evaluation must handle
#: (scripts/bench.py projects run times from them)
BENCHMARK_SIZES = {"imagenet": (1000, 50000), "caltech101": (100, 2465), "oxford_pets": (37, 3669),
                   "stanford_cars": (196, 8041), "oxford_flowers": (102, 2463), "food101": (101, 30300),
                   "fgvc_aircraft": (100, 3333), "sun397": (397, 19850), "dtd": (47, 1692), "eurosat": (10, 8100),
                   "ucf101": (101, 3783)}
BENCHMARK_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                      "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
#: the targets of domain generalisation (ImageNet → each), in the papers' column order
DOMAIN_DATASETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def list_datasets() -> List[str]:
    """Registered names, sorted: the eleven benchmarks, ``imagefolder``, the two procedural tasks
    ``scenes_compose`` and ``scenes_names`` (all for ``build_dataset``) and the four test-only
    ``DOMAIN_DATASETS`` (for ``build_test_dataset``)."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DatasetError(f"unknown dataset '{name}' (available: {', '.join(list_datasets())})") from None


def _layouts(spec: DatasetSpec, root: Path) -> List[Tuple[str, Path, Path]]:
    """``(convention, dataset folder, image root)`` per distinct layout, CoOp's first."""
    layouts: Dict[Tuple[Path, Path], List[str]] = {}
    for convention, folder, image_folder in zip(CONVENTIONS, spec.folders, spec.image_folders):
        layouts.setdefault((root / folder, root / folder / image_folder), []).append(convention)
    return [(" and ".join(conventions), dataset_dir, image_dir)
            for (dataset_dir, image_dir), conventions in layouts.items()]


def _marker(spec: DatasetSpec, image_dir: Path) -> Path:
    """The folder whose presence identifies a layout."""
    return image_dir / TRAIN_FOLDER if spec.split_format == "class_folders" else image_dir


def _expected(spec: DatasetSpec, root: Path) -> str:
    options = []
    for _, dataset_dir, image_dir in _layouts(spec, root):
        marker = _marker(spec, image_dir).relative_to(dataset_dir).as_posix()
        options.append(f"{dataset_dir}/ holding " + (f"{marker}/ and " if marker != "." else "") + spec.split_file)
    return "expected " + " or ".join(options)


def locate_dataset(name: str, root_path: Union[str, Path]) -> Location:
    """Find ``name`` under ``root_path`` (the first layout present, CoOp's first) or raise a one-line error."""
    spec = get_spec(name)
    root = Path(root_path).expanduser()
    if not root.is_dir():
        holding = ("one folder of images per class" if spec.split_format == "imagefolder"
                   else " or ".join(dict.fromkeys(folder + "/" for folder in spec.folders)))
        raise DatasetError(f"root_path not found: {root} (expected a directory holding {holding})")
    layouts = _layouts(spec, root)
    found = next((layout for layout in layouts if _marker(spec, layout[2]).is_dir()), None)
    if found is None:
        present = next((layout for layout in layouts if layout[1].is_dir()), None)
        if present is None:
            raise DatasetError(f"dataset folder not found: {layouts[0][1]} ({_expected(spec, root)})")
        raise DatasetError(f"image folder not found: {_marker(spec, present[2])} ({_expected(spec, root)})")
    convention, dataset_dir, image_dir = found
    split_path = dataset_dir / spec.split_file
    if spec.split_format == "imagefolder":
        convention = "imagefolder"
    elif not split_path.is_file():
        what = "class-name file" if spec.split_format in ("class_folders", *VARIANT_FORMATS) else "split file"
        raise DatasetError(f"{what} not found: {split_path} ({_expected(spec, root)}; see DATASET.md)")
    return Location(dataset_dir, image_dir, split_path, convention)


def listing_file(spec: DatasetSpec, location: Location, split: str) -> Path:
    """The file that lists ``split``'s images: FGVC-Aircraft's ``images_variant_<split>.txt``, else the
    dataset's split file."""
    if spec.split_format == "variant_lists":
        return location.dataset_dir / variant_list_file(split)
    return location.split_path


def read_splits(spec: DatasetSpec, location: Location, write_split: bool = True) -> Tuple[Splits, List[str]]:
    """All train/val/test items and the class names of a dataset with listed splits (not ImageNet).

    ``write_split=False`` keeps ``imagefolder`` from writing its split file.
    """
    if spec.split_format == "variant_lists":
        return read_variant_lists(location.dataset_dir, location.image_dir)
    if spec.split_format == "imagefolder":
        split_path, content = prepare_split(location.image_dir, write=write_split)
        splits = parse_split(content, split_path, location.image_dir)
    else:
        splits = read_split(location.split_path, location.image_dir)
    return splits, classnames_from_splits(splits, location.split_path)


def _read_listed(spec: DatasetSpec, location: Location, splits_needed=("train", "test")):
    """``(splits, classnames)`` of a dataset with listed splits; a needed split that is empty is an error.

    ``imagefolder``'s split file is not written here but by ``_finish`` once the dataset was built.
    """
    splits, classnames = read_splits(spec, location, write_split=False)
    for split in splits_needed:
        if not splits[split]:
            raise DatasetError(f"split file {listing_file(spec, location, split)} has an empty '{split}' list")
    return splits, classnames


def _finish(spec: DatasetSpec, location: Location, dataset: FewShotDataset, subsample: str) -> FewShotDataset:
    """The ``subsample`` half of ``dataset``, refused with fewer than 2 classes; then, nothing having failed,
    ``imagefolder``'s split file is written."""
    dataset = subsample_classes(dataset, subsample)
    check_classes(dataset)
    if spec.split_format == "imagefolder" and not location.split_path.exists():
        prepare_split(location.image_dir, write=True)
    return dataset


def build_dataset(name: str, root_path: Union[str, Path], shots: int, seed: int = 1,
                  subsample: str = "all") -> FewShotDataset:
    """Load ``name`` from ``root_path`` and draw the few-shot train/val subsets for ``seed``.

    For ``imagefolder``, ``root_path`` is the folder of class folders. Every
    sampled train/val image and every test image is checked to exist.
    ``subsample="base"`` or ``"new"`` then keeps one half of the classes, CoOp's
    base-to-new split of this all-class draw (``base2new.py``).
    """
    spec = get_spec(name)
    if spec.test_only:
        raise DatasetError(f"{name} is a test-only dataset (it has no training images): evaluate on it with "
                           f"build_test_dataset('{name}', root) (--eval_on {name}), not with shots={shots!r}")
    check_shots(shots)
    check_subsample(subsample)
    location = locate_dataset(name, root_path)
    if spec.split_format == "class_folders":
        wnids, classnames = read_class_folders(location.image_dir, location.split_path)
        train_x, val = sample_imagenet(location.image_dir, wnids, classnames, shots, seed)
        test = imagenet_test(location.image_dir, wnids, classnames)
    else:
        splits, classnames = _read_listed(spec, location)
        train_x, val = sample_dataset_splits(splits, shots, seed)
        test = splits["test"]
        check_files_exist(train_x, f"sampled train images listed in {listing_file(spec, location, 'train')}")
        check_files_exist(val, f"sampled val images listed in {listing_file(spec, location, 'val')}")
        check_files_exist(test, f"test images listed in {listing_file(spec, location, 'test')}")
    dataset = FewShotDataset(
        name=name, dataset_dir=location.dataset_dir, classnames=classnames, train_x=train_x, val=val, test=test,
        shots=shots, seed=seed, template=DEFAULT_TEMPLATE, templates=spec.templates)
    return _finish(spec, location, dataset, subsample)


def build_test_dataset(name: str, root_path: Union[str, Path], subsample: str = "all") -> FewShotDataset:
    """The whole test split of any registered dataset, with its class names and templates; nothing is drawn.

    ``train_x`` and ``val`` are empty and ``shots`` is 0. This is what a trained model is evaluated on in
    cross-dataset transfer and domain generalisation, and the only view of the test-only ImageNet variants.
    ``subsample`` keeps the base or new half of the classes (the halves of ``build_dataset``).
    """
    spec = get_spec(name)
    check_subsample(subsample)
    location = locate_dataset(name, root_path)
    if spec.test_only:
        test, classnames = read_variant(spec.split_format, location.image_dir, location.split_path)
    elif spec.split_format == "class_folders":
        wnids, classnames = read_class_folders(location.image_dir, location.split_path)
        test = imagenet_test(location.image_dir, wnids, classnames)
    else:
        splits, classnames = _read_listed(spec, location, ("test",))
        test = splits["test"]
        check_files_exist(test, f"test images listed in {listing_file(spec, location, 'test')}")
    dataset = FewShotDataset(name=name, dataset_dir=location.dataset_dir, classnames=classnames, train_x=[], val=[],
                             test=test, shots=0, seed=0, template=DEFAULT_TEMPLATE, templates=spec.templates)
    return _finish(spec, location, dataset, subsample)
