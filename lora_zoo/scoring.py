"""How an adapted CLIP model classifies: the classes it scores (``ClassSet``) and the ``Scorer`` the loop and the
evaluation call, whatever the kind of method (``kinds.py``).

The default ``Scorer`` is CLIP's zero-shot classifier as CLIP-LoRA trains it (METHODS.md,
"Experiment protocol"): ``logits = 100 · normalize(encode_image(x)) @ normalize(t_c)ᵀ`` with
``t_c`` the text features of each class prompt (``text_features``, on the shortest exact
context), cross-entropy on the labels. Weight adapters use it as it is; a ``Learner``
(``learner.py``: prompts, heads) is a ``Scorer`` of its own. What the loop calls:

- ``class_state(model, classes)``: the class side (text features, learned prompts' features),
  once per training step with gradients, once per evaluation without; ``fixed_classes``: it has
  nothing to train (computed once under ``no_grad`` for the whole run);
- ``inputs(model, images)``: what ``logits`` takes, from images (a head takes frozen features);
- ``losses(model, inputs, labels, state)``: named loss terms (``{"loss": cross-entropy}``);
- ``backward(losses, scale)``: gradients of the terms (their sum; ProGrad projects one on another);
- ``trains``: False for a method with nothing to train (training-free Tip-Adapter): the loop is skipped;
- ``after_training(model, selection)``: once, after the loop and before any evaluation (``stages.after_training``
  calls it for every method; a no-op by default): what a method selects after training on the validation split
  (Tip-Adapter's search of α and β), given as a ``Selection``, with the protocol's test evaluations only when the
  method asks for them (``selection_splits``: a method reproducing its authors' selection on test). Its
  returned mapping goes into ``result.json`` (``"selected_on"``: the split it selected on).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .text import encode_text

LOGIT_SCALE = 100.0
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    """Autocast to fp16 or bf16 for ``precision`` on ``device``; a disabled context for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def text_features(model: nn.Module, class_tokens: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """L2-normalised text features of the class prompts (one row per class): the one place they are computed.

    The tower runs on the shortest exact context (``text.encode_text``). Without gradients the prompts
    go through in chunks of ``chunk_size`` (ImageNet's 1,000 classes), each on its own shortest context.
    """
    if torch.is_grad_enabled() or class_tokens.shape[0] <= chunk_size:
        return F.normalize(encode_text(model, class_tokens).float(), dim=-1)
    return torch.cat([F.normalize(encode_text(model, chunk).float(), dim=-1)
                      for chunk in class_tokens.split(chunk_size)])


def clip_logits(model: nn.Module, images: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """``100 · normalize(encode_image(images)) @ class_featuresᵀ`` in fp32."""
    image_features = F.normalize(model.encode_image(images).float(), dim=-1)
    return LOGIT_SCALE * image_features @ class_features.t()


@dataclass(frozen=True, eq=False)
class ClassSet:
    """The classes a model scores, in label order: their names, the run's prompts (template applied), the prompts'
    token ids, the tokenizer (learners tokenise prompts of their own) and the dataset they come from."""

    names: tuple[str, ...]
    prompts: tuple[str, ...] = ()
    tokens: Optional[torch.Tensor] = None
    tokenizer: Optional[Callable] = None
    dataset: Optional[str] = None

    @classmethod
    def of(cls, names: Sequence[str], prompts: Sequence[str], tokenizer: Callable,
           dataset: Optional[str] = None) -> "ClassSet":
        """The class set of ``names`` prompted by ``prompts``, tokenised by ``tokenizer``."""
        return cls(tuple(names), tuple(prompts), tokenizer(list(prompts)), tokenizer, dataset)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor) -> "ClassSet":
        """Classes known only by their prompts' token ids (weight adapters need nothing else)."""
        names = tuple(str(i) for i in range(tokens.shape[0]))
        return cls(names, (), tokens)

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device) -> "ClassSet":
        return self if self.tokens is None else dataclasses.replace(self, tokens=self.tokens.to(device))


def as_classes(classes) -> ClassSet:
    """A ``ClassSet``, or token ids (the library's older calls: ``train_adapters(model, loader, tokens)``) as one."""
    return classes if isinstance(classes, ClassSet) else ClassSet.from_tokens(classes)


@dataclass
class Selection:
    """What a method selects on after training (``Scorer.after_training``): the validation split's batches
    ``(images, labels)`` over the training ``classes`` (test transform; None when the split is empty) and, only
    for a method whose ``selection_splits`` has "test", the protocol's test evaluations ``(name, classes,
    batches)`` (few-shot: test; base-to-new: base and new); where and in which precision to compute."""

    classes: ClassSet
    val: Optional[Iterable]
    test: list
    device: torch.device
    precision: str = "fp32"


class Scorer:
    """CLIP's classifier over the class prompts' text features (what weight adapters train and are scored with).

    ``fixed_classes``: the class side has no trainable tensor (the text tower is not adapted), so the loop
    computes it once, without gradients, for the whole run."""

    takes_features = False
    trains = True  # False: nothing to train, the loop is skipped (a training-free method)

    def __init__(self, fixed_classes: bool = False):
        self.fixed_classes = fixed_classes

    def inputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return images

    def class_state(self, model: nn.Module, classes: ClassSet) -> Any:
        return text_features(model, classes.tokens)

    def logits(self, model: nn.Module, inputs: torch.Tensor, state: Any) -> torch.Tensor:
        return clip_logits(model, inputs, state)

    def losses(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, state: Any) -> dict:
        return {"loss": F.cross_entropy(self.logits(model, inputs, state), labels)}

    def backward(self, losses: dict, scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Gradients of the sum of ``losses`` (``scale``: the GradScaler's, or the identity); returns the sum."""
        total = sum(losses.values())
        scale(total).backward()
        return total

    def selection_splits(self) -> tuple[str, ...]:
        """The splits ``after_training`` reads: "val", and "test" only for a selection on the test split."""
        return ()

    def after_training(self, model: nn.Module, selection: Selection) -> dict[str, Any]:
        """What the method selects once training is over (nothing by default); returns what ``result.json``
        records of it."""
        return {}
