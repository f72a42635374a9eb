"""Features once: a head's training set as the frozen model's image features of augmented views.

A method of the ``head`` kind (``learner.FeatureHead``: Tip-Adapter, CLIP-Adapter, TaskRes, LP++)
trains a function of frozen image features, so re-encoding the augmented images every epoch
repeats the same frozen forward pass. ``encode_views`` runs the image tower once over ``views``
augmented passes of the few-shot set (pass ``v`` draws exactly the crops and flips the image
stream draws in its epoch ``v``: ``datasets.loader.AugmentedImages``) and keeps the unnormalised
fp32 features, ``views × N × D`` (``learner.Support``: a head's initialisation reads them, e.g.
Tip-Adapter's cache keys). ``FeatureStream`` then serves training batches from them forever: epoch
``e`` reads view ``e mod views``, in the order the image stream would use (``EpochBatches`` of the
run's seed), normalised; a resumed run starts at its step and sees the same batches.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .learner import Support
from .scoring import autocast


@torch.no_grad()
def encode_views(model: nn.Module, data: Sequence, transform, views: int, seed: int, device: torch.device,
                 precision: str = "fp32", batch_size: int = 128, images=None) -> Support:
    """The frozen image features of ``views`` augmented passes over ``data`` (unnormalised, fp32, on ``device``)."""
    from datasets.loader import AugmentedImages

    samples = AugmentedImages(data, transform, seed, images)
    was_training = model.training
    model.eval()
    try:
        features = []
        for view in range(views):
            rows = []
            for start in range(0, len(data), batch_size):
                batch = torch.stack([samples[(view, i)][0] for i in range(start, min(start + batch_size, len(data)))])
                with autocast(device, precision):
                    rows.append(model.encode_image(batch.to(device)).float())
            features.append(torch.cat(rows))
    finally:
        model.train(was_training)
    labels = torch.tensor([d.label for d in data], dtype=torch.long, device=device)
    return Support(torch.stack(features), labels)


class FeatureStream:
    """Endless ``(normalised features, labels)`` batches of a ``Support``: epoch ``e`` reads view ``e mod views``."""

    def __init__(self, support: Support, batch_size: int, seed: int, start_step: int = 0, drop_last: bool = False):
        from datasets.loader import EpochBatches

        self.support = support
        self.sampler = EpochBatches(support.features.shape[1], batch_size, seed, start_step, drop_last=drop_last)

    def __iter__(self):
        views = self.support.features.shape[0]
        for batch in self.sampler:
            epoch = batch[0][0]
            index = torch.tensor([i for _, i in batch], device=self.support.labels.device)
            yield F.normalize(self.support.features[epoch % views, index], dim=-1), self.support.labels[index]


def support_views(head_class, config, epochs: Optional[int]) -> int:
    """How many augmented views a head encodes (``FeatureHead.views``; its epochs, else one)."""
    return head_class.views(config, epochs or 1)
