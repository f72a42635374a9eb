"""Procedural scenes with captions (to pretrain ``tiny-clip``) and two few-shot tasks built from them.

A scene is one object on a grey background, described by five attributes: a
shape, a colour, a fill texture, a position on a 3×3 grid and a size. Every
image is drawn from a seed, and its caption is composed from the attribute
words in one of several phrasings (colour and shape always; size, texture and
position each in about half the captions). Captions also say which attributes
they mention, so a contrastive loss can treat every scene they describe as a
match (the multi-positive form of CLIP's loss; Radford et al., ICML 2021).
Half the pretraining images are crop views like those of the few-shot
protocol's augmentation (RandomResizedCrop; CLIP-LoRA, Zanella & Ben Ayed,
CVPRW 2024), captioned without the position and size a crop changes.

Five colours never appear with five shapes in pretraining (``HELD_OUT_PAIRS``:
every word is seen, only in other pairs). The downstream tasks use ten of
those pairs, each colour and each shape in two classes, on lighter backgrounds
than pretraining ever shows (a domain shift, as few-shot benchmarks are for
CLIP: the target images differ from the pretraining ones), and are written in the
real on-disk layout of a benchmark (CoOp split JSON + ``images/<class>/``;
Zhou et al., IJCV 2022), so the ordinary readers load them: registered as
``scenes_compose`` and ``scenes_names`` (``build_dataset("scenes_compose",
root)``), or under any CoOp-JSON benchmark's names with ``--dataset`` (written
with ``--dataset dtd``, ``build_dataset("dtd", root)`` reads the task):

- ``compose``: the classes named by their words ("red star"): zero-shot works
  only as far as the model composes words it has seen in other pairs and
  carries them over to the new backgrounds;
- ``names``: the same images, the classes named by made-up words no caption
  contains ("blicket"): zero-shot is near chance (tiny-clip: 14.3%, chance 10%)
  and only adaptation can link the names to what the image tower already sees.

    python -m datasets.scenes --root /tmp/data --task compose
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .registry import get_spec, list_datasets
from .synthetic import write_class_images, write_json_split

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon", "ring", "heart", "crescent")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 35, 35), "green": (40, 185, 60), "blue": (45, 90, 235), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 135, 25), "pink": (245, 130, 190), "cyan": (40, 215, 225),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SIZES = ("small", "large")
ATTRIBUTES = ("shape", "colour", "texture", "position", "size")
VALUES: Dict[str, Sequence[str]] = dict(zip(ATTRIBUTES, (SHAPES, tuple(COLOURS), TEXTURES, POSITIONS, SIZES)))

POSITION_PHRASES = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
                    "left": "on the left", "center": "in the center", "right": "on the right",
                    "bottom left": "in the bottom left", "bottom": "at the bottom",
                    "bottom right": "in the bottom right"}
SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
RADIUS = {"small": 0.15, "large": 0.24}          # object radius as a fraction of the image side
GRID = (0.25, 0.5, 0.75)                        # position centres as fractions of the image side
PRETRAINING_BACKGROUND = (0.05, 0.3)            # lightness of the background: dark in pretraining,
TASK_BACKGROUND = (0.3, 0.5)                    # lighter in the downstream tasks (a domain shift)
CROP_VIEWS, CROP_AREA = 0.5, (0.08, 1.0)        # share of pretraining images seen as crop views; their area
# caption phrasings: {adjectives} are the mentioned size/texture/colour words in random order
PHRASINGS = ("a photo of a {adjectives} {shape}{where}.", "a {adjectives} {shape}{where}.",
             "there is a {adjectives} {shape}{where}.", "an image of a {adjectives} {shape}{where}.",
             "{adjectives} {shape}{where}")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    texture: str
    position: str
    size: str

    def codes(self) -> List[int]:
        """Index of each attribute value, in ``ATTRIBUTES`` order."""
        return [VALUES[name].index(getattr(self, name)) for name in ATTRIBUTES]


@dataclass(frozen=True)
class Task:
    """A few-shot classification task: class name → the attributes every image of the class has."""

    name: str
    classes: Tuple[Tuple[str, Dict[str, str]], ...]
    about: str

    @property
    def classnames(self) -> List[str]:
        return [classname for classname, _ in self.classes]


HELD_OUT_COLOURS = ("red", "green", "blue", "yellow", "purple")
HELD_OUT_SHAPES = ("star", "heart", "triangle", "ring", "square")
# pretraining never shows these colours with these shapes: each word is seen, but only in other pairs
HELD_OUT_PAIRS = tuple((colour, shape) for colour in HELD_OUT_COLOURS for shape in HELD_OUT_SHAPES)
# ten of them as classes: colour i with shapes i and i+1, so each colour and each shape is in two classes
TASK_PAIRS = tuple((colour, HELD_OUT_SHAPES[(index + step) % len(HELD_OUT_SHAPES)])
                   for index, colour in enumerate(HELD_OUT_COLOURS) for step in (0, 1))
MADE_UP_NAMES = ("blicket", "wug", "dax", "toma", "fep", "zorb", "kiki", "gazzer", "tufa", "mib")

TASKS = {
    "compose": Task("compose", tuple((f"{colour}_{shape}", {"colour": colour, "shape": shape})
                                     for colour, shape in TASK_PAIRS),
                    "colour+shape pairs held out of pretraining (new compositions of seen words)"),
    "names": Task("names", tuple((name, {"colour": colour, "shape": shape})
                                 for name, (colour, shape) in zip(MADE_UP_NAMES, TASK_PAIRS)),
                  "the same ten classes named by made-up words no caption contains"),
}


def sample_scene(rng: np.random.Generator, fixed: Optional[Dict[str, str]] = None,
                 exclude=HELD_OUT_PAIRS) -> Scene:
    """A scene with the ``fixed`` attributes and the others uniform; (colour, shape) never in ``exclude``."""
    fixed = fixed or {}
    while True:
        values = {name: fixed.get(name) or VALUES[name][rng.integers(len(VALUES[name]))] for name in ATTRIBUTES}
        if (values["colour"], values["shape"]) not in exclude:
            return Scene(**values)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test on coordinates in units of the object radius (v grows downwards)."""
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return r <= 1
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.82
    if shape == "triangle":
        return (v <= 0.65) & (v >= -1 + 1.75 * abs(u))
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.05
    if shape == "cross":
        return ((abs(u) <= 0.32) | (abs(v) <= 0.32)) & (np.maximum(abs(u), abs(v)) <= 1)
    if shape == "star":
        offset = np.abs((theta + np.pi / 2) % (2 * np.pi / 5) - np.pi / 5) / (np.pi / 5)
        return r <= 0.45 + 0.6 * offset ** 2
    if shape == "hexagon":
        return np.max([u * np.cos(k * np.pi / 3) + v * np.sin(k * np.pi / 3) for k in range(6)], axis=0) <= 0.9
    if shape == "ring":
        return (r <= 1) & (r >= 0.55)
    if shape == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.2
        return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0
    if shape == "crescent":
        return (r <= 1) & (np.hypot(u - 0.5, v + 0.15) >= 0.8)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _texture_mask(texture: str, x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Where the fill shows its darker second tone (pixel coordinates)."""
    period = size / 12 * rng.uniform(0.85, 1.15)
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 1, 2)
    if texture == "plain":
        return np.zeros_like(x, dtype=bool)
    if texture == "striped":
        return ((x * np.cos(angle) + y * np.sin(angle)) / period + phase[0]) % 1 < 0.5
    if texture == "dotted":
        return np.hypot((x / period + phase[0]) % 1 - 0.5, (y / period + phase[1]) % 1 - 0.5) < 0.3
    if texture == "checkered":
        return (np.floor(x / period * 1.5 + phase[0]) + np.floor(y / period * 1.5 + phase[1])) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}; expected one of {', '.join(TEXTURES)}")


def render_scene(scene: Scene, size: int, rng: np.random.Generator,
                 background: Tuple[float, float] = PRETRAINING_BACKGROUND) -> np.ndarray:
    """A ``size``×``size``×3 uint8 image of ``scene`` (position, size and colour jittered by ``rng``) on a grey
    background whose lightness is drawn from the ``background`` range."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    row, column = divmod(POSITIONS.index(scene.position), 3)
    centre = (np.array([GRID[column], GRID[row]]) + rng.uniform(-0.04, 0.04, 2)) * size
    radius = RADIUS[scene.size] * rng.uniform(0.9, 1.1) * size
    angle = rng.uniform(-0.3, 0.3)
    dx, dy = (x - centre[0]) / radius, (y - centre[1]) / radius
    inside = _shape_mask(scene.shape, np.cos(angle) * dx + np.sin(angle) * dy,
                         -np.sin(angle) * dx + np.cos(angle) * dy)
    colour = np.clip(np.array(COLOURS[scene.colour], np.float32) / 255 + rng.normal(0, 0.04, 3), 0, 1)
    fill = np.where(_texture_mask(scene.texture, x, y, size, rng)[..., None], 0.35 * colour, colour)
    background = np.full(3, rng.uniform(*background), np.float32) + rng.normal(0, 0.02, 3)
    image = np.where(inside[..., None], fill, background) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def crop_view(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A view as the few-shot protocol's training augmentation makes them (a crop of 8-100 % of the area,
    aspect 3/4-4/3, resized back with bicubic, mirrored half the time), redrawn until it holds the centre of
    the object's grid cell (the whole image after ten misses)."""
    size = image.shape[0]
    row, column = divmod(POSITIONS.index(scene.position), 3)
    centre_x, centre_y = GRID[column] * size, GRID[row] * size
    box = (0, 0, size, size)
    for _ in range(10):
        area, aspect = size * size * rng.uniform(*CROP_AREA), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        width, height = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < width <= size and 0 < height <= size:
            left, top = rng.integers(0, size - width + 1), rng.integers(0, size - height + 1)
            if left <= centre_x <= left + width and top <= centre_y <= top + height:
                box = (left, top, left + width, top + height)
                break
    view = Image.fromarray(image).resize((size, size), Image.BICUBIC, box=box)
    return np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view)


def describe(scene: Scene, rng: np.random.Generator, cropped: bool = False) -> Tuple[str, List[bool]]:
    """A caption of ``scene`` and which attributes (``ATTRIBUTES`` order) it mentions; a crop view's caption
    leaves out position and size, which cropping changes."""
    mentions = {"shape": True, "colour": True, **{name: bool(rng.random() < 0.5) for name in ATTRIBUTES[2:]}}
    if cropped:
        mentions.update(position=False, size=False)
    words = [scene.colour]
    if mentions["texture"]:
        words.append(scene.texture)
    if mentions["size"]:
        words.append(SIZE_WORDS[scene.size][rng.integers(2)])
    words = [words[i] for i in rng.permutation(len(words))]
    where = " " + POSITION_PHRASES[scene.position] if mentions["position"] else ""
    caption = PHRASINGS[rng.integers(len(PHRASINGS))].format(adjectives=" ".join(words), shape=scene.shape,
                                                             where=where)
    return caption, [mentions[name] for name in ATTRIBUTES]


def caption_vocabulary() -> List[str]:
    """Every word a caption can contain."""
    words = set(SHAPES) | set(COLOURS) | set(TEXTURES) | {w for pair in SIZE_WORDS.values() for w in pair}
    for text in list(POSITION_PHRASES.values()) + list(PHRASINGS):
        words |= set(text.replace("{adjectives}", "").replace("{shape}", "").replace("{where}", "")
                     .replace(".", "").split())
    return sorted(words)


def pretraining_batch(seed: int, step: int, batch_size: int, image_size: int):
    """Batch ``step`` of the pretraining stream: uint8 images [B,H,W,3], captions, attribute codes [B,5]
    and mention flags [B,5]. A function of (seed, step) only, so any step can be regenerated."""
    rng = np.random.default_rng([seed, step])
    scenes = [sample_scene(rng) for _ in range(batch_size)]
    images, captions, mentions = [], [], []
    for scene in scenes:
        image, cropped = render_scene(scene, image_size, rng), bool(rng.random() < CROP_VIEWS)
        images.append(crop_view(image, scene, rng) if cropped else image)
        caption, mentioned = describe(scene, rng, cropped)
        captions.append(caption)
        mentions.append(mentioned)
    images = np.stack(images)
    return images, captions, np.array([s.codes() for s in scenes]), np.array(mentions)


def caption_matches(codes: np.ndarray, mentions: np.ndarray) -> np.ndarray:
    """[captions, images] bool: caption i is true of image j (every attribute it mentions agrees)."""
    agree = codes[:, None, :] == codes[None, :, :]
    return np.all(agree | ~mentions[:, None, :], axis=-1)


def write_task(root: Union[str, Path], task: str = "compose", dataset: Optional[str] = None,
               train_per_class: int = 16, val_per_class: int = 4, test_per_class: int = 30, image_size: int = 48,
               seed: int = 0) -> Path:
    """Write ``task`` under ``root`` as dataset ``scenes_<task>`` (or ``dataset``'s folder and split-file names):
    ``images/<class>/*.png`` and the CoOp split JSON, so ``build_dataset(dataset, root)`` reads it; return the
    dataset folder. Deterministic in ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown scenes task {task!r}; expected one of {', '.join(TASKS)}")
    spec = get_spec(dataset or f"scenes_{task}")
    if spec.split_format != "json":
        raise ValueError(f"scenes tasks are written with a CoOp JSON split; {spec.name} has {spec.split_format}")
    dataset_dir = Path(root) / spec.folders[0]
    classes = TASKS[task].classes

    def render(label: int, rng: np.random.Generator) -> np.ndarray:
        scene = sample_scene(rng, classes[label][1], exclude=())
        return render_scene(scene, image_size, rng, TASK_BACKGROUND)

    names = [classname for classname, _ in classes]
    entries = write_class_images(
        dataset_dir / spec.image_folders[0], names,
        {"train": train_per_class, "val": val_per_class, "test": test_per_class}, seed,
        image_path=lambda label, index, serial, split: f"{names[label]}/{names[label]}_{index + 1:04d}.png",
        render=render)
    write_json_split(dataset_dir / spec.split_file, entries)
    return dataset_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder that will hold the dataset folder")
    parser.add_argument("--task", default="compose", choices=list(TASKS))
    parser.add_argument("--dataset", default=None, choices=list_datasets(),
                        help="on-disk layout to write (default: scenes_<task>)")
    parser.add_argument("--train_per_class", type=int, default=16)
    parser.add_argument("--val_per_class", type=int, default=4)
    parser.add_argument("--test_per_class", type=int, default=30)
    parser.add_argument("--image_size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_task(**vars(args))
    print(f"wrote scenes task {args.task!r} ({TASKS[args.task].about}) as {args.dataset or 'scenes_' + args.task} "
          f"to {path}")


if __name__ == "__main__":
    main()
