"""End-to-end part of ``scripts/gpu_check.py``: a short run with our pipeline against CLIP-LoRA's, and the train
augmentation on the device against the PIL path.

- ``write_dataset``: Food-101's on-disk layout (CoOp split file) with ``classes`` classes of synthetic
  JPEGs (procedural textures, ``datasets.textures``; multi-word class names), written in threads;
- ``ours``: ``lora_zoo.experiment.run_experiment`` with an ``ExperimentConfig`` (LoRA, random init), timed
  from the call to its return: a first run (zero-shot and the preprocessed test images computed) and the
  next run of a sweep in the same output folder (another seed: both read from the caches);
- ``reference``: the loop of CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024; MaxZanella/CLIP-LoRA ``main.py``
  and ``lora.py`` ``run_lora``), re-implemented from its facts on the same open_clip model and LoRA
  layers: loaders with ``num_workers`` workers that read and decode every image at every use (train:
  shuffled, batch 32, RandomResizedCrop + flip; val and test: batch 256); class text features
  prompt by prompt on the full context; val and test features pre-loaded and zero-shot accuracy computed
  every run; then per step the prompts tokenised and the text tower run on the full (77-token) context,
  fp16 autocast, training accuracy and ``loss.item()`` read, ``GradScaler`` step, cosine schedule per
  step; finally the test split decoded again for the adapted model's accuracy;
- ``augmentation``: images/s of ``loader.TrainStream`` (the PIL path, decoded cache, the loader's workers)
  and of ``device_augment.DeviceTrainStream`` on the device, and the largest pixel difference.
"""
from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import lora_zoo as lz
from bench_pipeline import class_names
from datasets import build_dataset, build_test_transform, build_train_transform
from datasets.cache import DecodedImages
from datasets.device_augment import DeviceTrainStream
from datasets.loader import ImageList, TrainStream
from datasets.registry import get_spec
from datasets.synthetic import write_json_split
from datasets.textures import class_list, render_texture
from lora_zoo.config import ExperimentConfig, TrainConfig
from lora_zoo.experiment import run_experiment
from lora_zoo.models import build_clip
from lora_zoo.host import available_cpus

METHOD = "lora"
LOGIT_SCALE = 100.0


def write_dataset(root: Path, classes: int, shots: int, test_per_class: int, size: int, seed: int = 0) -> Path:
    """Food-101's layout under ``root``: per class ``shots`` train, min(shots, 4) val and ``test_per_class`` test
    JPEGs of ``size`` px (each a shifted, re-lit copy of the class's texture). Returns the dataset folder."""
    spec = get_spec("food101")
    folder = Path(root) / spec.folders[0]
    image_dir = folder / spec.image_folders[0]
    names = class_names(classes)
    counts = {"train": shots, "val": min(shots, 4), "test": test_per_class}

    def write_class(label: int) -> dict:
        rng = np.random.default_rng([seed, label])
        texture = render_texture(*class_list(48)[label % 48], size, rng)
        entries = {split: [] for split in counts}
        (image_dir / f"class_{label:03d}").mkdir(parents=True, exist_ok=True)
        index = 0
        for split, count in counts.items():
            for _ in range(count):
                shifted = np.roll(texture, tuple(rng.integers(0, size, 2)), axis=(0, 1))
                pixels = np.clip(shifted * rng.uniform(0.7, 1.2), 0, 255).astype(np.uint8)
                relative = f"class_{label:03d}/{index:05d}.jpg"
                Image.fromarray(pixels).save(image_dir / relative, quality=90)
                entries[split].append([relative, label, names[label]])
                index += 1
        return entries

    with ThreadPoolExecutor(max_workers=min(16, available_cpus())) as pool:
        per_class = list(pool.map(write_class, range(classes)))
    write_json_split(folder / spec.split_file, {split: [e for c in per_class for e in c[split]] for split in counts})
    return folder


def ours(root: Path, out: Path, backbone: str, shots: int, iterations: int, device: str, workers: int,
         seed: int) -> dict:
    """One ``run_experiment`` (timed from the call); ``n_iters`` rounds ``iterations / shots`` up."""
    cfg = ExperimentConfig(method=METHOD, dataset="food101", root_path=str(root), shots=shots, seed=seed,
                           backbone=backbone, pretrained="none", output_dir=str(out / "outputs"), device=device,
                           num_workers=workers, test_cache_dir=str(out / "test_cache"),
                           train=TrainConfig(n_iters=math.ceil(iterations / shots), checkpoint_every=0))
    started = time.perf_counter()
    result = run_experiment(cfg, progress=False)
    return {"seconds": time.perf_counter() - started, "train_seconds": result["train_seconds"],
            "iterations": result["iterations"], "accuracy": result["accuracy"], "test_images": result["test_images"],
            "zero_shot_cached": result["zero_shot_cached"]}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """CLIP-LoRA's ``cls_acc``: top-1 in %, read back to the host."""
    return float((logits.argmax(dim=-1) == labels).float().sum().cpu()) * 100 / labels.shape[0]


def _features(model, loader, device, amp: bool):
    """CLIP-LoRA's ``pre_load_features``: normalised image features and labels of every batch."""
    features, labels = [], []
    with torch.no_grad(), torch.autocast(device.type, torch.float16, enabled=amp):
        for images, target in loader:
            feature = model.encode_image(images.to(device))
            features.append((feature / feature.norm(dim=-1, keepdim=True)).float().cpu())
            labels.append(target)
    return torch.cat(features), torch.cat(labels)


def reference(root: Path, backbone: str, shots: int, iterations: int, device: str, workers: int,
              seed: int) -> dict:
    """CLIP-LoRA's pipeline (module docstring) on our model and LoRA layers, timed from the start."""
    started = time.perf_counter()
    device = torch.device(device)
    amp = device.type == "cuda"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dataset = build_dataset("food101", str(root), shots=shots, seed=seed)
    clip = build_clip(backbone, None, device)
    model, tokenizer = clip.model, clip.tokenizer
    prompts = dataset.prompts()

    def loader(data, transform, batch, shuffle):
        return DataLoader(ImageList(data, transform), batch_size=batch, shuffle=shuffle, num_workers=workers,
                          pin_memory=amp)

    test_transform = build_test_transform(model)
    with torch.no_grad(), torch.autocast(device.type, torch.float16, enabled=amp):  # clip_classifier: one by one
        text = torch.stack([F.normalize(model.encode_text(tokenizer([p]).to(device)).float(), dim=-1)[0]
                            for p in prompts])
    _features(model, loader(dataset.val, test_transform, 256, False), device, amp)  # pre-loaded, unused
    test_features, test_labels = _features(model, loader(dataset.test, test_transform, 256, False), device, amp)
    zero_shot = _accuracy(LOGIT_SCALE * test_features.to(device) @ text.t(), test_labels.to(device))
    lz.apply_adapters(model, METHOD)
    optimizer = lz.build_optimizer(model, lr=lz.get_method(METHOD).lr, weight_decay=1e-2, betas=(0.9, 0.999))  # CLIP-LoRA
    total = math.ceil(iterations / shots) * shots
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    train = loader(dataset.train_x, build_train_transform(model), 32, True)
    step, train_started = 0, time.perf_counter()
    while step < total:
        model.train()
        for images, labels in train:  # a new pass (worker processes started again) every epoch
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, torch.float16, enabled=amp):
                class_text = model.encode_text(tokenizer(prompts).to(device))
                image = model.encode_image(images)
            logits = LOGIT_SCALE * F.normalize(image, dim=-1) @ F.normalize(class_text, dim=-1).t()
            loss = F.cross_entropy(logits.float(), labels)
            _accuracy(logits, labels), loss.item()  # read every step, as CLIP-LoRA's loop does
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            if step == total:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - train_started
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, torch.float16, enabled=amp):  # evaluate_lora
        text = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
    features, labels = _features(model, loader(dataset.test, test_transform, 256, False), device, amp)
    accuracy = _accuracy(features.to(device) @ text.t(), labels.to(device))
    return {"seconds": time.perf_counter() - started, "train_seconds": train_seconds, "iterations": step,
            "accuracy": accuracy, "zero_shot_accuracy": zero_shot, "test_images": len(dataset.test)}


def augmentation(root: Path, shots: int, device: str, workers: int, batches: int, batch: int = 32,
                 seed: int = 1) -> dict:
    """Images/s of the PIL path (the loader's ``workers``) and of the device path over ``batches`` batches of the
    few-shot train images, and the largest difference of their first batches after normalisation."""
    device = torch.device(device)
    data = build_dataset("food101", str(root), shots=shots, seed=seed).train_x
    transform = build_train_transform({"size": 224})
    decoded = DecodedImages(data, 1 << 20)
    streams = {"pil": TrainStream(data, transform, batch, seed, num_workers=workers, images=decoded),
               "device": DeviceTrainStream(data, transform, batch, seed, device, decoded=decoded)}
    result, first = {}, {}
    for name, stream in streams.items():
        iterator = iter(stream)
        first[name] = [tensor.to(device) for tensor in next(iterator)]  # workers started, kernels warm
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            images, labels = next(iterator)
            images.to(device).sum().item()  # the batch is ready where the model runs
        result[f"{name}_images_per_s"] = batches * batch / (time.perf_counter() - started)
        del iterator
    result["labels_identical"] = torch.equal(first["pil"][1], first["device"][1])
    result["max_abs_diff"] = float((first["pil"][0] - first["device"][0]).abs().max())
    result["images"], result["batch"] = len(data), batch
    return result
