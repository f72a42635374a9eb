"""One prepared GPU check: every method's step at real shapes, a short run end to end, an ImageNet-size step.

Run by ``scripts/gpu_check.sh`` (at most ~6 minutes on one GPU), printing markdown tables (``--out FILE``
writes them to a file too):

1. per registered method: the training step at real shapes (open_clip ViT-B-16, random init, batch 32,
   224 px, Food-101's 101 prompts tokenised by the model's tokenizer; fp16 autocast + GradScaler through
   the library's ``training_step`` with ``amp``): ms per step (``--timed`` steps after ``--warmup``),
   × the frozen model's step (the same split model, no adapters and no optimizer step: backward through
   the activations only, as ``scripts/bench.py``), images/s, peak memory during its steps (CUDA max
   allocated: weights, gradients, optimizer state and activations; on the CPU the process's peak RSS so
   far), and how many of its ``--skip_steps`` steps (the timed ones included) the GradScaler skipped;
2. end to end (``gpu_check_e2e.py``): ``--e2e_shots`` × ``--e2e_classes`` synthetic 512-px JPEGs, about
   ``--e2e_iterations`` iterations, ``--e2e_test`` test images: ``run_experiment`` (a first run, and the
   next run of a sweep) against CLIP-LoRA's loop, with the ratio of their wall times;
3. ``--prompts`` (1,000: ImageNet) class prompts with adapters on both towers: step ms and peak memory;
4. the train augmentation on the device against the PIL path (images/s, largest pixel difference).

    scripts/gpu_check.sh --out gpu_check.md         # on a GPU
    scripts/gpu_check.sh --tiny --device cpu        # tiny backbone, a few steps and images (the test suite)
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_check_e2e as e2e  # noqa: E402
import lora_zoo as lz  # noqa: E402
from bench_pipeline import BENCH_OPTIONS, TINY_OPTIONS, class_names, method_options  # noqa: E402
from lora_zoo.config import TrainConfig  # noqa: E402
from lora_zoo.files import atomic_write  # noqa: E402
from lora_zoo.models import TINY_CONFIGS, build_clip  # noqa: E402
from lora_zoo.host import available_cpus  # noqa: E402
from lora_zoo.kinds import apply_method_on_batch  # noqa: E402
from lora_zoo.train import prepare_device, training_step  # noqa: E402

FROZEN = "frozen (no optimizer step)"
SECTIONS = ("methods", "e2e", "prompts", "augment")
TINY = dict(backbone="tiny-vit", batch=4, warmup=1, timed=2, skip_steps=4, classes=6, prompts=100,
            e2e_shots=2, e2e_classes=4, e2e_iterations=4, e2e_test=12, e2e_size=48, augment_batches=2)


def image_size(backbone: str) -> int:
    config = TINY_CONFIGS.get(backbone) or open_clip.get_model_config(backbone)
    size = config["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (list, tuple)) else size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


ADAMW = TrainConfig().resolved()  # weight_decay and betas: the protocol's AdamW settings


class Variant:
    """One row: a copy of the split base model on the device with a method's adapters (or frozen)."""

    def __init__(self, method, base, device, images, labels, classes, steps: int, amp: bool, options=None):
        self.model = copy.deepcopy(base).to(device)
        self.inputs = images
        if method is None:  # the frozen bound: gradients reach every activation, no weight gets one
            self.model.requires_grad_(False)
            self.model.visual.positional_embedding.requires_grad_(True)
            self.model.positional_embedding.requires_grad_(True)
            self.optimizer, self.hooks = None, lz.TrainingHooks()
        else:
            stats = (lz.collect_activation_stats(self.model, image_batches=[images], text_batches=[classes.tokens])
                     if lz.build_config(method).needs_calibration else None)
            self.inputs = apply_method_on_batch(self.model, method, classes, images, labels, stats, **(options or {}))
            self.optimizer = lz.build_optimizer(self.model, lr=lz.get_method(method).lr, weight_decay=ADAMW.weight_decay,
                                                betas=ADAMW.betas)  # the method's builder, the protocol's AdamW
            self.hooks = lz.training_hooks(self.model, steps)
            self.optimizer.register_step_post_hook(self._stepped)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp)
        self.steps = self.optimizer_steps = 0
        self.model.train()

    def _stepped(self, *_):
        self.optimizer_steps += 1

    def step(self, images, labels, classes, device, amp: bool) -> None:
        training_step(self.model, self.inputs, labels, classes, self.optimizer, self.hooks, self.steps, device,
                      "fp16" if amp else "fp32", self.scaler)
        self.steps += 1

    @property
    def skipped(self) -> int:
        """Steps the GradScaler skipped (it calls ``optimizer.step`` only for finite gradients)."""
        return self.steps - self.optimizer_steps


def measure(variant: Variant, inputs, device, amp: bool, warmup: int, timed: int, total: int) -> dict:
    """ms per step over ``timed`` steps after ``warmup``, peak memory over them, then steps up to ``total``."""
    for _ in range(warmup):
        variant.step(*inputs, device, amp)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(timed):
        variant.step(*inputs, device, amp)
    sync(device)
    seconds = (time.perf_counter() - started) / timed
    peak = peak_mib(device)
    while variant.steps < total:
        variant.step(*inputs, device, amp)
    return {"step_ms": 1000 * seconds, "peak_mib": peak, "steps": variant.steps, "skipped": variant.skipped}


def inputs_for(backbone, batch: int, prompts: int, device) -> tuple:
    size = backbone.model.visual.image_size[0]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, prompts, (batch,), generator=generator).to(device)
    names = class_names(prompts)
    classes = lz.ClassSet.of(names, [f"a photo of a {name}." for name in names], backbone.tokenizer).to(device)
    return images, labels, classes


def methods_section(args, device, amp: bool, log) -> list[dict]:
    backbone = build_clip(args.backbone, None, "cpu")
    base = lz.split_attention(backbone.model)
    images, labels, classes = inputs_for(backbone, args.batch, args.classes, device)
    rows = []
    for name, method in [(FROZEN, None)] + [(m, m) for m in lz.list_methods()]:
        fresh_memory(device)
        log(f"methods: {name}")
        variant = Variant(method, base, device, images, labels, classes, args.skip_steps, amp,
                          args.method_options.get(method))
        row = measure(variant, (images, labels, classes), device, amp, args.warmup, args.timed, args.skip_steps)
        rows.append({"method": name, **row, "images_per_s": 1000 * args.batch / row["step_ms"]})
        del variant
    frozen = rows[0]["step_ms"]
    for row in rows:
        row["vs_frozen"] = row["step_ms"] / frozen
    return rows


def prompts_section(args, device, amp: bool, log) -> list[dict]:
    backbone = build_clip(args.backbone, None, "cpu")
    base = lz.split_attention(backbone.model)
    images, labels, classes = inputs_for(backbone, args.batch, args.prompts, device)
    rows = []
    for method in args.prompt_methods:
        fresh_memory(device)
        log(f"prompts: {method} with {args.prompts} prompts")
        variant = Variant(method, base, device, images, labels, classes, args.warmup + args.timed, amp)
        row = measure(variant, (images, labels, classes), device, amp, args.warmup, args.timed,
                      args.warmup + args.timed)
        rows.append({"method": method, "prompts": args.prompts, **row})
        del variant
    return rows


def e2e_section(args, device, data_root: Path, work: Path, log) -> dict:
    test_per_class = math.ceil(args.e2e_test / args.e2e_classes)
    log(f"e2e: writing {args.e2e_classes} classes x ({args.e2e_shots} train + val + {test_per_class} test) JPEGs")
    started = time.perf_counter()
    e2e.write_dataset(data_root, args.e2e_classes, args.e2e_shots, test_per_class, args.e2e_size)
    written = time.perf_counter() - started
    common = dict(backbone=args.backbone, shots=args.e2e_shots, iterations=args.e2e_iterations,
                  device=str(device), workers=args.workers)
    rows = {}
    for name, run in (("ours_first", lambda: e2e.ours(data_root, work, seed=1, **common)),
                      ("ours_next", lambda: e2e.ours(data_root, work, seed=2, **common)),
                      ("reference", lambda: e2e.reference(data_root, seed=1, **common))):
        fresh_memory(device)
        log(f"e2e: {name}")
        rows[name] = run()
    return {"rows": rows, "dataset_seconds": written}


def fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"# GPU check: {s['device_name']}", "",
             f"torch {s['torch']}, open_clip {s['open_clip']}, {s['precision']}, {s['backbone']} random init, batch "
             f"{s['batch']}, {s['image_size']} px, {s['cpus']} CPUs, {s['workers']} loader workers; total "
             f"{s['seconds']:.0f} s", ""]
    if "methods" in result:
        lines += [f"Training step per method ({s['classes']} prompts; ms over {s['timed']} steps after {s['warmup']}; "
                  f"peak: {s['peak_kind']}; skipped: GradScaler skips in the method's first {s['skip_steps']} "
                  "steps, timed ones included):", "",
                  "| method | step ms | × frozen | images/s | peak MiB | skipped steps |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in result["methods"]:
            skipped = "—" if r["method"] == FROZEN else f"{r['skipped']}/{r['steps']}"
            lines.append(f"| {r['method']} | {fmt(r['step_ms'])} | {r['vs_frozen']:.2f} | {fmt(r['images_per_s'])} "
                         f"| {fmt(r['peak_mib'], 0)} | {skipped} |")
        lines.append("")
    if "e2e" in result:
        e = result["e2e"]["rows"]
        ours_first = e["ours_first"]["seconds"]
        lines += [f"End to end, LoRA, {s['e2e_shots']} shots × {s['e2e_classes']} classes of synthetic "
                  f"{s['e2e_size']}-px JPEGs (written in {result['e2e']['dataset_seconds']:.0f} s):", "",
                  "| pipeline | wall s | train s | iterations | test images | top-1 % | × ours (first run) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        names = {"ours_first": "ours: run_experiment, first run",
                 "ours_next": "ours: next run of a sweep (zero-shot and test images cached)",
                 "reference": "reference: CLIP-LoRA's loop (77 tokens, PIL every step, zero-shot every run)"}
        for key, name in names.items():
            r = e[key]
            lines.append(f"| {name} | {fmt(r['seconds'], 2)} | {fmt(r['train_seconds'], 2)} | {r['iterations']} "
                         f"| {r['test_images']} | {fmt(r['accuracy'], 2)} | {r['seconds'] / ours_first:.2f} |")
        lines += ["", f"Reference / ours: {e['reference']['seconds'] / ours_first:.2f}× (first run), "
                  f"{e['reference']['seconds'] / e['ours_next']['seconds']:.2f}× (next run of a sweep).", ""]
    if "prompts" in result:
        lines += [f"ImageNet-size step ({s['prompts']} prompts, adapters on both towers, batch {s['batch']}):", "",
                  "| method | prompts | step ms | peak MiB |", "|---|---:|---:|---:|"]
        for r in result["prompts"]:
            lines.append(f"| {r['method']} | {r['prompts']} | {fmt(r['step_ms'])} | {fmt(r['peak_mib'], 0)} |")
        lines.append("")
    if "augment" in result:
        a = result["augment"]
        lines += [f"Train augmentation, {a['images']} few-shot images to 224 px, batches of {a['batch']}:", "",
                  "| path | images/s | max abs diff vs PIL (normalised) |", "|---|---:|---:|",
                  f"| PIL path: decoded cache, {s['workers']} loader workers | {fmt(a['pil_images_per_s'], 0)} | 0 |",
                  f"| device path on {s['device']} | {fmt(a['device_images_per_s'], 0)} | {a['max_abs_diff']:.4f} |",
                  "", f"Labels identical: {a['labels_identical']}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny-vit and a few steps and images (seconds on a CPU)")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=101, help="prompts of the per-method step (Food-101's)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timed", type=int, default=20)
    parser.add_argument("--skip_steps", type=int, default=200, help="steps per method counted for GradScaler skips")
    parser.add_argument("--prompts", type=int, default=1000, help="prompts of the ImageNet-size step")
    parser.add_argument("--prompt_methods", nargs="+", default=["lora", "nora", "aira"])
    parser.add_argument("--e2e_shots", type=int, default=16)
    parser.add_argument("--e2e_classes", type=int, default=101)
    parser.add_argument("--e2e_iterations", type=int, default=200, help="rounded up to a multiple of the shots")
    parser.add_argument("--e2e_test", type=int, default=3000, help="test images (rounded up to whole classes)")
    parser.add_argument("--e2e_size", type=int, default=512, help="side of the synthetic JPEGs")
    parser.add_argument("--augment_batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: min(8, CPUs) on CUDA, "
                                                                  "0 on CPU, as the library chooses)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--data", type=Path, default=None, help="folder for the synthetic dataset (default: temporary)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--options", nargs="*", default=[], metavar="METHOD.OPTION=VALUE",
                        help="a method's option instead of its default (always: bench_pipeline.BENCH_OPTIONS; --tiny: "
                             "those the tiny model needs, TINY_OPTIONS)")
    args = parser.parse_args(argv)
    if args.tiny:
        explicit = {a.split("=")[0].lstrip("-") for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in TINY.items():
            if key not in explicit:
                setattr(args, key, value)
    for key in ("batch", "classes", "warmup", "timed", "prompts", "e2e_shots", "e2e_classes", "e2e_iterations",
                "e2e_test", "e2e_size", "augment_batches"):
        minimum = 0 if key == "warmup" else 1
        if getattr(args, key) < minimum:
            parser.error(f"--{key} must be >= {minimum}, got {getattr(args, key)}")
    if args.skip_steps < args.warmup + args.timed:
        parser.error(f"--skip_steps must be >= --warmup + --timed ({args.warmup + args.timed}), got {args.skip_steps}")
    unknown = sorted(set(args.prompt_methods) - set(lz.list_methods()))
    if unknown:
        parser.error(f"unknown method {unknown[0]}; expected some of {', '.join(lz.list_methods())}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available (use --device cpu)")
    if args.out is not None and (args.out.is_dir() or not args.out.parent.is_dir()):
        parser.error(f"--out {args.out}: expected a file in an existing folder")
    try:
        args.method_options = method_options([*BENCH_OPTIONS, *(TINY_OPTIONS if args.tiny else ()), *args.options])
    except ValueError as err:
        parser.error(f"--options: {err}")
    if args.workers is None:
        args.workers = min(8, available_cpus()) if args.device.startswith("cuda") else 0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    prepare_device(device)
    amp = device.type == "cuda"  # fp16 autocast + GradScaler on CUDA (the runs' default there), fp32 on CPU
    log = lambda m: print(f"[{time.perf_counter() - started:6.1f} s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data or Path(tmp) / "data"
        if "methods" in args.sections:
            result["methods"] = methods_section(args, device, amp, log)
        if "prompts" in args.sections:
            result["prompts"] = prompts_section(args, device, amp, log)
        if "e2e" in args.sections:
            result["e2e"] = e2e_section(args, device, data_root, Path(tmp), log)
        if "augment" in args.sections:
            if "e2e" not in args.sections:
                e2e.write_dataset(data_root, args.e2e_classes, args.e2e_shots, 1, args.e2e_size)
            fresh_memory(device)
            log("augment")
            result["augment"] = e2e.augmentation(data_root, args.e2e_shots, str(device), args.workers,
                                                 args.augment_batches, batch=args.batch)
    result["setup"] = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if amp else f"CPU ({device})",
        "torch": torch.__version__, "open_clip": open_clip.__version__, "backbone": args.backbone,
        "precision": "fp16 autocast + GradScaler" if amp else "fp32 (the CPU default)",
        "batch": args.batch, "image_size": image_size(args.backbone),
        "cpus": available_cpus(), "workers": args.workers, "classes": args.classes, "warmup": args.warmup,
        "timed": args.timed, "skip_steps": args.skip_steps, "prompts": args.prompts, "e2e_shots": args.e2e_shots,
        "e2e_classes": args.e2e_classes, "e2e_size": args.e2e_size, "seconds": time.perf_counter() - started,
        "peak_kind": "CUDA max allocated" if amp else "process peak RSS"}
    table = markdown(result)
    print(table)
    if args.out is not None:
        atomic_write(args.out, lambda path: Path(path).write_text(table))
    return result


if __name__ == "__main__":
    main()
