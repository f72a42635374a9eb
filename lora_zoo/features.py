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

``cached_views`` keeps them on disk, under ``<output_dir>/.cache/features/`` (``stages.training_stream``
builds the key): one safetensors file per run setting, named by a digest of its key and holding the
key itself, which is compared before any tensor is read. The key is what the features depend on: the
backbone and its weights (a local file's path, size and modification time, as the zero-shot cache
keys them), the training images' content identity (``datasets.identity.content_key``: paths, labels,
sizes and file times), the transform, the seed, the precision, the device type and the encoding
batch. Features of another backbone or other weights, or of changed images, are never read: their
key differs, and an entry whose stored key (or shape, or labels) does not match is encoded again and
replaced. The number of views is not part of the file name: view ``v`` is the same crops whatever the
number of views, so an entry of ``V`` views answers any request for up to ``V`` (Tip-Adapter's ten
serve LP++'s one) and a request for more encodes only the missing views and rewrites the entry. So a
rerun, a resumed run and the other heads of the same run setting read the features instead of
encoding them. Written atomically (``files.atomic_write``); a folder that cannot be written is skipped
with one warning (``files.without_cache``), a full disk stops the run in one line as every write does.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .files import atomic_write, without_cache
from .learner import Support
from .scoring import autocast

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1  # part of every key: a change of what an entry holds makes every older entry a miss


@torch.no_grad()
def encode_views(model: nn.Module, data: Sequence, transform, views: int, seed: int, device: torch.device,
                 precision: str = "fp32", batch_size: int = 128, images=None, first: int = 0) -> Support:
    """The frozen image features of augmented passes ``first, ..., views - 1`` over ``data`` (unnormalised, fp32,
    on ``device``)."""
    from datasets.loader import AugmentedImages

    samples = AugmentedImages(data, transform, seed, images)
    was_training = model.training
    model.eval()
    try:
        features = []
        for view in range(first, views):
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


def _stored_key(key: Mapping[str, Any]) -> str:
    """The key as the entry stores it (and its name digests): canonical JSON, with the format."""
    return json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True, default=str)


def cache_path(folder, key: Mapping[str, Any]) -> Path:
    """Where the entry of ``key`` lives in ``folder``: a digest of the key (without the number of views)."""
    return Path(folder) / f"views-{hashlib.sha1(_stored_key(key).encode()).hexdigest()[:24]}.safetensors"


def read_cached(path: Path, key: Mapping[str, Any], labels: torch.Tensor, width: Optional[int] = None,
                views: Optional[int] = None) -> Optional[torch.Tensor]:
    """The first ``views`` (None: all) stored views of the entry at ``path`` (CPU fp32), or None when there is
    none, it is unreadable, or its stored key, labels or width are not these: never another setting's
    features."""
    try:
        with safe_open(str(path), framework="pt") as entry:
            if (entry.metadata() or {}).get("key") != _stored_key(key):
                return None
            if not torch.equal(entry.get_tensor("labels"), labels.cpu()):
                return None
            stored = entry.get_slice("features")
            shape = stored.get_shape()
            if len(shape) != 3 or shape[1] != labels.numel() or (width is not None and shape[2] != width):
                return None
            return stored[:shape[0] if views is None else min(views, shape[0])].float()
    except Exception:  # noqa: BLE001 - a missing, truncated or foreign file is a miss, never an error
        return None


def cached_views(model: nn.Module, data: Sequence, transform, views: int, seed: int, device: torch.device,
                 precision: str, batch_size: int, folder, key: Mapping[str, Any], images=None) -> Support:
    """``encode_views``, read from (and written to) the cache entry of ``key`` in ``folder`` (module docstring):
    only the views the entry lacks are encoded."""
    path = cache_path(folder, key)
    labels = torch.tensor([d.label for d in data], dtype=torch.long)
    stored = read_cached(path, key, labels, views=views)
    have = 0 if stored is None else stored.shape[0]
    if have >= views:
        logger.info("image features of %d augmented views of %d train images read from %s", views, len(data), path)
        return Support(stored.to(device), labels.to(device))
    new = encode_views(model, data, transform, views, seed, device, precision, batch_size, images, first=have)
    features = new.features.cpu() if stored is None else torch.cat([stored, new.features.cpu()])
    logger.info("image features of %d augmented views of %d train images encoded once%s", views - have, len(data),
                f" (views {have}..{views - 1}; the first {have} read from the cache)" if have else "")
    try:
        atomic_write(path, lambda tmp: save_file({"features": features.contiguous(), "labels": labels}, tmp,
                                                 metadata={"key": _stored_key(key)}))
    except OSError as err:
        without_cache(f"the features cache {folder}", err)
    return Support(features.to(device), labels.to(device))


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
