"""The base of every method that is not a weight update: a learned module attached to a CLIP model.

A ``Learner`` is an ``nn.Module`` and a ``Scorer`` (``scoring.py``): it holds the method's tensors
(named with the ``lora_`` prefix, so the one naming rule of ``naming.py`` decides what trains, is
saved and counted) and says how the adapted model classifies. Its kind (``kinds.py``) says how it is
fed and kept:

- ``PromptLearner`` (kind ``prompts``): tokens fed to a tower (CoOp's context, MaPLe's deep prompts);
  it sees images;
- ``FeatureHead`` (kind ``head``): a function of frozen image features (Tip-Adapter, TaskRes); its
  training inputs are features of augmented views computed once (``features.py``), its evaluation
  inputs the frozen model's normalised image features;
- ``TensorLearner`` (kind ``tensors``): other tensors of the backbone (LayerNorms); it sees images.

A subclass says, in one file: its config (``config_class``, an ``Options`` dataclass), its tensors
(built in ``__init__(model, config, classes, support)`` from the model, the training classes and, for a
head, the ``support`` features), ``class_state`` / ``logits`` (and ``losses`` for extra terms), and what
rebuilds it besides its config (``record``, a JSON mapping; ``rebuild``). None of them has a weight
update to merge or export.

Before any work a run checks the method against its task (``check_task``, given a ``Task``: the
dataset, its classes, its training and validation images, the epochs): a method that selects on
the validation split after training (``splits``, read by ``Scorer.after_training``) refuses a task
without one, and a head refuses a task whose features do not fit the device's free memory, in one
line with its estimate (``FeatureHead.memory_bytes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .options import Options
from .scoring import ClassSet, Scorer


@dataclass
class LearnerConfig(Options):
    """Options every learner has (none yet); subclasses add theirs with ``option(default, help)``."""

    @property
    def needs_calibration(self) -> bool:
        return False

    @property
    def mergeable(self) -> bool:
        return False


@dataclass(frozen=True)
class Task:
    """What a run trains on, as a method checks it before any work (``Learner.check_task``)."""

    dataset: str
    classes: int
    train_images: int
    val_images: int
    epochs: int             # passes over the training images the loop makes
    width: int              # the image features' width (the backbone's embedding)
    device: torch.device


@dataclass
class Support:
    """A head's training set as frozen features: ``features[view, image]`` (normalised, fp32) and ``labels``."""

    features: torch.Tensor   # views × N × D
    labels: torch.Tensor     # N


class Learner(nn.Module, Scorer):
    """A method's learned module (attached to the model as ``model.lora_zoo_learner`` by its kind)."""

    kind = "prompts"
    config_class = LearnerConfig
    method_name: str = "?"   # set by @register_method
    #: tensors the LoRA+ builder treats as output-side / input-side (none: one group)
    up_tensors: tuple[str, ...] = ()
    down_tensors: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, config: LearnerConfig, classes: ClassSet, support: Optional[Support] = None):
        nn.Module.__init__(self)
        Scorer.__init__(self, fixed_classes=False)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.class_names = tuple(classes.names)

    @property
    def mergeable(self) -> bool:
        return False

    def record(self) -> dict[str, Any]:
        """What rebuilds this learner besides its config (JSON): the training classes' names by default."""
        return {"classes": list(self.class_names)}

    @classmethod
    def rebuild(cls, model: nn.Module, config: LearnerConfig, record: Mapping[str, Any]) -> "Learner":
        """A learner of the shapes ``record`` describes (its tensors are loaded afterwards)."""
        return cls(model, config, ClassSet(tuple(record["classes"])))

    @classmethod
    def check_fits(cls, model: nn.Module, config: LearnerConfig) -> None:
        """A one-line error when ``config`` asks ``model`` for more than it has (before any work)."""

    @classmethod
    def splits(cls, config: LearnerConfig) -> tuple[str, ...]:
        """The splits its ``after_training`` selects on ("val"; "test" only to reproduce a selection on test)."""
        return ()

    @classmethod
    def check_task(cls, model: nn.Module, config: LearnerConfig, task: Task) -> None:
        """A one-line error when the task cannot be trained as ``config`` asks (before any work): here, a
        selection on a validation split the dataset does not have."""
        if "val" in cls.splits(config) and task.val_images == 0:
            raise ValueError(f"{cls.method_name} selects on the validation split after training, and {task.dataset} "
                             "has no validation images: give the dataset a val split")

    def selection_splits(self) -> tuple[str, ...]:
        return type(self).splits(self.config)

    @classmethod
    def check_classes(cls, model: nn.Module, config: LearnerConfig, classes: ClassSet, training: ClassSet) -> None:
        """A one-line error when the learner, trained on ``training``, cannot score ``classes`` on ``model`` (its
        prompts of their names longer than the text context; a context per training class asked to score other
        classes), before any work: a run checks its training classes and every class set it evaluates."""

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class PromptLearner(Learner):
    """Learned tokens fed to a tower (kind ``prompts``)."""

    kind = "prompts"


class TensorLearner(Learner):
    """Learned copies of other tensors of the backbone (kind ``tensors``)."""

    kind = "tensors"


class FeatureHead(Learner):
    """A function of the frozen model's normalised image features (kind ``head``): trains on cached features.

    ``views``: how many augmented views of each training image its support and training stream hold
    (``features.py``); a subclass sets it from its config (Tip-Adapter averages 10 for its cache keys)."""

    kind = "head"
    takes_features = True

    @classmethod
    def views(cls, config: LearnerConfig, epochs: int) -> int:
        """Augmented views per training image to encode once: by default one per epoch of training."""
        return max(1, epochs)

    def inputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.encode_image(images).float(), dim=-1)

    @classmethod
    def memory_bytes(cls, config: LearnerConfig, task: Task) -> int:
        """Memory its training takes on the device, estimated: the support's fp32 features (views × N × width);
        a head holding more (Tip-Adapter's N × classes values) adds its own."""
        return 4 * cls.views(config, task.epochs) * task.train_images * task.width

    @classmethod
    def check_task(cls, model: nn.Module, config: LearnerConfig, task: Task) -> None:
        super().check_task(model, config, task)
        need, free = cls.memory_bytes(config, task), free_memory(task.device)
        if free is not None and need > free:
            raise ValueError(f"{cls.method_name} needs about {need / 2 ** 30:.1f} GiB for {task.train_images} "
                             f"training images of {task.classes} classes ({cls.views(config, task.epochs)} "
                             f"augmented views of {task.width}-d features); {task.device.type} has "
                             f"{free / 2 ** 30:.1f} GiB free: use fewer shots or classes")


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on ``device`` now (CUDA: the driver's count; CPU: the kernel's MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def attached_learner(model: nn.Module) -> Optional[Learner]:
    """The learner a kind attached to ``model`` (None for weight adapters)."""
    learner = getattr(model, "lora_zoo_learner", None)
    return learner if isinstance(learner, Learner) else None
