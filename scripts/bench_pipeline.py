"""Where a run's time goes besides the adapters: text context, image decoding, and a per-run projection.

Measured side by side in one process (variants interleaved in every repetition, median reported),
on the same model and inputs, by ``scripts/bench.py --part pipeline``:

- text tower forward + backward over a dataset's class prompts with LoRA on it: open_clip's full
  77-token context against the shortest exact context (``lora_zoo.text``), and the largest difference
  of the normalised features;
- one training step (both towers, batch ``--batch``, the dataset's prompt count): full against cut
  context, and the two losses from identical states;
- the training data stream: images/s of one process decoding every image against the decoded cache,
  on realistic JPEGs (500×375), with a check that both give identical tensors;
- seconds per 16-shot run: 500 × 16 steps at the measured step time plus one evaluation of the
  dataset's test split at the measured throughput (zero-shot is computed once per sweep, not per run);
- training a head (TaskRes's, the same steps in each) for ``epochs`` epochs on JPEGs: re-encoding every
  epoch's augmented batches with the image tower, against ``views`` views encoded once and written to
  the features cache (``features.cached_views``), and against a rerun that reads them from it; with a
  check that the cached view 0 is the first epoch's re-encoded batch (the same crops).
- the prompt learners (``--part prompts``): a CoOp training step, its text tower over every class prompt, on the
  shortest exact context against CoOp's full 77-token one, and CoCoOp's images of a batch in one text-tower
  pass against their per-image loop, each pair at equal logits (asserted).
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import lora_zoo as lz
import lora_zoo.scoring as scoring
import lora_zoo.train as train
from datasets.base import Datum
from datasets.cache import DecodedImages
from datasets.loader import TrainStream
from datasets.registry import BENCHMARK_SIZES
from datasets.transforms import build_train_transform
from lora_zoo.config import TrainConfig
from lora_zoo.text import short_context_length

ADAMW = {"weight_decay": TrainConfig().resolved().weight_decay, "betas": TrainConfig().betas}  # the protocol's AdamW settings

WORDS = ("red", "spotted", "garden", "lizard", "apple", "pie", "baby", "back", "ribs", "sea", "salt", "crab",
         "brown", "bread", "pudding", "golden", "eagle", "stone", "bridge", "mountain", "bike", "frozen", "yogurt")


#: options a method needs on the tiny backbones (``--quick``, ``--tiny``): tiny-vit's towers have 2 blocks, MaPLe's
#: default depth is 9 (ViT-B-16 has 12)
TINY_OPTIONS = ("maple.depth=2",)
#: options every benchmark gives a method (``--options`` overrides them): 2SFS's step is timed in its first stage
#: (LayerNorms trained through both towers, 60% of its run); its second trains a head on an image tower run without
#: gradients, and a bench of a few steps would otherwise time a mix of both
BENCH_OPTIONS = ("twostage.first_stage=1.0",)


def method_options(items) -> dict:
    """``{method: {option: value}}`` from ``METHOD.OPTION=VALUE`` items (values read as YAML); ValueError otherwise."""
    import yaml

    options: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        if not (method and name and value):
            raise ValueError(f"expected METHOD.OPTION=VALUE, got {item!r}")
        options.setdefault(method, {})[name] = yaml.safe_load(value)
    return options


def class_names(count: int) -> list[str]:
    """``count`` distinct names of one to three words, deterministic (a stand-in for a dataset's classes)."""
    rng = np.random.default_rng(0)
    names = set()
    while len(names) < count:
        names.add(" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)), replace=False)))
    return sorted(names)[:count]


def full_context_features(model, tokens, chunk_size=256):
    """What open_clip computes: the tower on all 77 positions."""
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


@contextmanager
def full_context():
    """The training loop with open_clip's full context (the reference the cut context is measured against)."""
    cut = scoring.text_features
    scoring.text_features = full_context_features
    try:
        yield
    finally:
        scoring.text_features = cut


def median_times(variants: dict, reps: int, sync) -> dict:
    """Median seconds of each callable, interleaved in every repetition after one warm-up each."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def text_context(model, tokenizer, prompts: int, reps: int, device) -> dict:
    tokens = tokenizer([f"a photo of a {name}." for name in class_names(prompts)]).to(device)
    adapted = copy.deepcopy(model)
    lz.apply_adapters(adapted, "lora", encoders=("text",))
    adapted.train()

    def run(features):
        def step():
            adapted.zero_grad(set_to_none=True)
            features(adapted, tokens).square().sum().backward()
        return step

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = median_times({"full": run(full_context_features), "cut": run(scoring.text_features)}, reps, sync)
    with torch.no_grad():
        difference = (full_context_features(adapted, tokens) - scoring.text_features(adapted, tokens)).abs().max()
    return {"prompts": prompts, "context_full": tokens.shape[1],
            "context_cut": short_context_length(adapted, tokens) or tokens.shape[1],
            "text_full_s": seconds["full"], "text_cut_s": seconds["cut"],
            "text_speedup": seconds["full"] / seconds["cut"], "max_feature_diff": float(difference)}


def step_context(model, tokenizer, prompts: int, batch: int, reps: int, device, amp: bool) -> dict:
    tokens = tokenizer([f"a photo of a {name}." for name in class_names(prompts)]).to(device)
    size = model.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(batch) % prompts).to(device)
    runs = {}
    for name in ("full", "cut"):
        adapted = copy.deepcopy(model)
        lz.apply_adapters(adapted, "lora", dropout=0.0)  # no dropout: both variants see the same numbers
        runs[name] = (adapted, lz.build_optimizer(adapted, lr=1e-4, **ADAMW), lz.training_hooks(adapted, 10))
    losses = {}

    def run(name):
        adapted, optimizer, hooks = runs[name]

        def step():
            adapted.train()
            with full_context() if name == "full" else nullcontext():
                losses.setdefault(name, float(train.training_step(adapted, images, labels, tokens, optimizer, hooks,
                                                                  0, device, "fp16" if amp else "fp32")))
        return step

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = median_times({name: run(name) for name in runs}, reps, sync)
    return {"step_prompts": prompts, "step_batch": batch, "step_full_s": seconds["full"], "step_cut_s": seconds["cut"],
            "step_speedup": seconds["full"] / seconds["cut"], "first_loss_diff": abs(losses["full"] - losses["cut"])}


def jpegs(folder, images: int, classes: int = 10) -> list:
    """``images`` random 500×375 JPEGs (a photo's size) in ``folder``, labelled round-robin over ``classes``."""
    rng, data = np.random.default_rng(0), []
    for index in range(images):
        path = Path(folder) / f"{index}.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        data.append(Datum(str(path), index % classes, f"class {index % classes}"))
    return data


def data_stream(model, images: int, batch: int, reps: int) -> dict:
    """Images/s of the training stream in this process: decoding every image against the decoded cache."""
    with tempfile.TemporaryDirectory() as folder:
        data = jpegs(folder, images)
        transform = build_train_transform(model)
        cache = DecodedImages(data, limit_mb=1024)
        streams = {"decode": TrainStream(data, transform, batch, seed=0, num_workers=0),
                   "cached": TrainStream(data, transform, batch, seed=0, num_workers=0, images=cache)}
        first = {name: next(iter(stream)) for name, stream in streams.items()}
        identical = all(torch.equal(a, b) for a, b in zip(first["decode"], first["cached"]))
        iterators = {name: iter(stream) for name, stream in streams.items()}
        steps = max(1, images // batch)
        seconds = median_times({name: (lambda it=it: [next(it) for _ in range(steps)])
                                for name, it in iterators.items()}, reps, lambda: None)
    per_second = {name: steps * batch / s for name, s in seconds.items()}
    return {"data_images": images, "decode_images_per_s": per_second["decode"],
            "cached_images_per_s": per_second["cached"],
            "data_speedup": per_second["cached"] / per_second["decode"], "data_identical": identical}


def head_training(model, tokenizer, images: int, epochs: int, views: int, batch: int, device) -> dict:
    """Seconds to train a TaskRes head for ``epochs`` epochs over ``images`` JPEGs (10 classes): re-encoding each
    epoch, encoding ``views`` views once into a fresh features cache, and a rerun reading that cache."""
    from lora_zoo.features import FeatureStream, cached_views

    names = [f"class {i}" for i in range(10)]
    classes = lz.ClassSet.of(names, [f"a photo of a {n}." for n in names], tokenizer).to(device)
    head = copy.deepcopy(model)
    lz.apply_method(head, "taskres", classes=classes)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as folder:
        data, transform = jpegs(folder, images), build_train_transform(model)
        decoded, steps = DecodedImages(data, limit_mb=1024), epochs * -(-images // batch)
        key = {"bench": "head_training", "images": images}

        def fit(stream, encode):  # the same head steps on each stream: returns the first batch's features
            head.lora_zoo_learner.lora_residual.data.zero_()
            optimizer = lz.build_optimizer(head, lr=2e-4, weight_decay=5e-4, betas=(0.9, 0.999), optimizer="adam")
            hooks, batches, first = lz.training_hooks(head, steps), iter(stream()), None
            for index in range(steps):
                inputs, labels = next(batches)
                with torch.no_grad():
                    inputs = F.normalize(head.encode_image(inputs.to(device)).float(), dim=-1) if encode else inputs
                first = inputs if first is None else first
                train.training_step(head, inputs, labels.to(device), classes, optimizer, hooks, index, device)
            return first

        def cached():
            support = cached_views(head, data, transform, views, 0, device, "fp32", batch, Path(folder) / "cache", key,
                                   images=decoded)
            return FeatureStream(support, batch, seed=0)
        firsts, seconds = {}, {}
        for name, stream, encode in (("reencode", lambda: TrainStream(data, transform, batch, seed=0, num_workers=0,
                                                                      images=decoded), True),
                                     ("cached", cached, False), ("rerun", cached, False)):
            sync()
            start = time.perf_counter()
            firsts[name] = fit(stream, encode)
            sync()
            seconds[name] = time.perf_counter() - start
    return {"head_images": images, "head_epochs": epochs, "head_views": views, "head_steps": steps,
            "head_reencode_s": seconds["reencode"], "head_cached_s": seconds["cached"], "head_rerun_s": seconds["rerun"],
            "head_cached_speedup": seconds["reencode"] / seconds["cached"],
            "head_rerun_speedup": seconds["reencode"] / seconds["rerun"],
            "head_feature_diff": float((firsts["reencode"] - firsts["cached"]).abs().max())}


def eval_throughput(model, batch: int, reps: int, device, amp: bool) -> float:
    """Images/s of the plain model's image tower in evaluation (the test split's cost per run)."""
    size = model.visual.image_size[0]
    images = torch.randn(batch, 3, size, size).to(device)

    def encode():
        with torch.no_grad(), scoring.autocast(device, "fp16" if amp else "fp32"):
            model.encode_image(images)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return batch / median_times({"eval": encode}, reps, sync)["eval"]


def projection(dataset: str, step_seconds: float, eval_images_per_s: float, shots: int = 16) -> dict:
    classes, test_images = BENCHMARK_SIZES[dataset]
    train_s = 500 * shots * step_seconds
    eval_s = test_images / eval_images_per_s
    return {"dataset": dataset, "classes": classes, "test_images": test_images, "shots": shots,
            "projected_train_s": train_s, "projected_eval_s": eval_s, "projected_run_s": train_s + eval_s}


def markdown(pipeline: dict) -> str:
    p = pipeline
    lines = [f"Pipeline ({p['model']}, {p['device']}, {p['threads']} threads, median of {p['reps']}):", "",
             "| measurement | full / decode | cut / cached | ratio | check |", "|---|---:|---:|---:|---|",
             f"| text tower fwd+bwd, {p['prompts']} prompts ({p['context_full']} → {p['context_cut']} tokens) "
             f"| {p['text_full_s']:.3f} s | {p['text_cut_s']:.3f} s | {p['text_speedup']:.2f}× "
             f"| max feature diff {p['max_feature_diff']:.1e} |",
             f"| training step, batch {p['step_batch']}, {p['step_prompts']} prompts | {p['step_full_s']:.3f} s "
             f"| {p['step_cut_s']:.3f} s | {p['step_speedup']:.2f}× | loss diff {p['first_loss_diff']:.1e} |",
             f"| train images/s, one process, {p['data_images']} JPEGs 500×375 | {p['decode_images_per_s']:.0f} "
             f"| {p['cached_images_per_s']:.0f} | {p['data_speedup']:.2f}× "
             f"| identical tensors: {p['data_identical']} |", head_row(p), "",
             f"Projected seconds per 16-shot run on {p['dataset']} ({p['classes']} classes, {p['test_images']} test "
             f"images): {p['projected_train_s']:.0f} s training (500 × 16 steps) + {p['projected_eval_s']:.0f} s "
             f"evaluation = {p['projected_run_s']:.0f} s ({p['projected_run_s'] / 3600:.2f} h)."]
    return "\n".join(lines)


def head_row(p: dict) -> str:
    """The table row of ``head_training``: re-encoding every epoch against the features encoded once."""
    return (f"| training a head, {p['head_epochs']} epochs × {p['head_images']} JPEGs ({p['head_steps']} steps; "
            f"re-encoding every epoch / {p['head_views']} views encoded once; a rerun reading them: "
            f"{p['head_rerun_s']:.3f} s, {p['head_rerun_speedup']:.2f}×) | {p['head_reencode_s']:.3f} s "
            f"| {p['head_cached_s']:.3f} s | {p['head_cached_speedup']:.2f}× "
            f"| first batch diff {p['head_feature_diff']:.1e} |")


def head_markdown(p: dict) -> str:
    return "\n".join([f"Training a head ({p['model']}, {p['device']}, {p['threads']} threads):", "",
                      "| measurement | re-encoding | cached | ratio | check |", "|---|---:|---:|---:|---|", head_row(p)])
