"""Speed, memory and parameter cost of every registered method, measured side by side in one process.

For each method (its registry defaults) on one open_clip model and one batch:
trainable parameters and adapter bytes on disk; the time of one training
step (forward of both towers, contrastive-logit cross-entropy, backward,
AdamW step, the method's hooks) as a ratio to the *frozen lower bound* (the
same split model with no adapters, backward through the activations only)
and to LoRA at NoRA's inner rank; the peak memory of a training step (CUDA
max allocated, or on CPU the peak RSS growth sampled during the step); the
adapter initialisation time including calibration and SVDs; and the merged
evaluation throughput (image encoder) as a ratio to the plain, unsplit
open_clip model. Methods are interleaved within every repetition and the
median is reported, so drift on a shared machine hits every row alike.

    python scripts/bench.py                       # ViT-B-16, random init, CPU
    python scripts/bench.py --device cuda --batch 32 --amp
    python scripts/bench.py --quick               # tiny model, seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora_zoo as lz  # noqa: E402
from lora_zoo.models import build_clip  # noqa: E402

FROZEN = "frozen"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory growth inside a ``with`` block: CUDA max allocated, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self._max, self._stop = _rss_bytes(), _rss_bytes(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self.base


class Variant:
    """One row: a method (or the frozen bound) with its model, optimizer and hooks."""

    def __init__(self, name, method, options, base_model, calibrate, steps):
        self.name, self.method, self.options = name, method, options
        self.model = copy.deepcopy(base_model)
        start = time.perf_counter()
        if method is None:  # frozen lower bound: grads reach every activation, no weight gets one
            self.model.visual.positional_embedding.requires_grad_(True)
            self.model.positional_embedding.requires_grad_(True)
            self.optimizer, self.hooks, self.trainable = None, lz.TrainingHooks(), 0
        else:
            stats = calibrate(self.model) if lz.build_config(method, **options).needs_calibration else None
            lz.apply_adapters(self.model, method, stats=stats, **options)
            self.trainable = lz.count_trainable(self.model)
            self.optimizer = torch.optim.AdamW(lz.param_groups(self.model, lr=1e-4, weight_decay=1e-2))
            self.hooks = lz.training_hooks(self.model, steps)
        self.init_seconds = time.perf_counter() - start
        self.step_index = 0

    def adapter_bytes(self) -> int:
        if self.method is None:
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            path = lz.save_adapters(self.model, Path(tmp) / "adapters.safetensors")
            return path.stat().st_size + path.with_suffix(".json").stat().st_size


def train_step(variant: Variant, images, tokens, labels, device, amp: bool) -> None:
    model, hooks, step = variant.model, variant.hooks, variant.step_index
    model.train()
    hooks.before_forward(step)
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
        loss = F.cross_entropy(100.0 * image_features @ text_features.t(), labels) + hooks.regularizer()
    if variant.optimizer is not None:
        variant.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    hooks.after_backward(step)
    if variant.optimizer is not None:
        variant.optimizer.step()
    hooks.after_step(step)
    variant.step_index += 1


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_benchmark(model_name="ViT-B-16", batch=4, classes=10, image_size=None, device="cpu", reps=5,
                  amp=False, methods=None, threads=None, log=print) -> dict:
    """Measure every method; returns ``{"setup": ..., "rows": [...]}`` (one row per variant)."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = build_clip(model_name, pretrained=None, device=device)
    plain = backbone.model
    size = image_size or plain.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch, device=device) % classes
    tokens = backbone.tokenizer([f"a photo of a class {i}." for i in range(classes)]).to(device)
    base = lz.split_attention(copy.deepcopy(plain))

    def calibrate(model):
        return lz.collect_activation_stats(model, image_batches=[images], text_batches=[tokens])

    nora_inner = lz.build_config("nora").inner_rank
    specs = [(FROZEN, None, {}), (f"lora r={nora_inner}", "lora", {"rank": nora_inner})]
    specs += [(m, m, {}) for m in (methods or lz.list_methods())]
    steps = 2 + reps + 1
    variants = []
    for name, method, options in specs:
        log(f"building {name} ...")
        variants.append(Variant(name, method, options, base, calibrate, steps))
    for variant in variants:  # warm-up (allocator, kernels)
        train_step(variant, images, tokens, labels, device, amp)
    step_times = {v.name: [] for v in variants}
    for rep in range(reps):
        for variant in variants:
            step_times[variant.name].append(timed(lambda: train_step(variant, images, tokens, labels, device, amp),
                                                  device))
        log(f"repetition {rep + 1}/{reps} done")
    memory = {}
    for variant in variants:
        with PeakMemory(device) as peak:
            train_step(variant, images, tokens, labels, device, amp)
        memory[variant.name] = peak.peak
    # merged evaluation throughput against the plain (fused-attention) open_clip model
    eval_times = {"plain open_clip": []}
    for variant in variants:
        variant.model.eval()
        if variant.method is not None:
            variant.hooks.finish()
            if all(a.mergeable for a in lz.adapter_modules(variant.model).values()):
                lz.merge_adapters(variant.model)
                eval_times[variant.name] = []
    contenders = [("plain open_clip", plain)] + [(v.name, v.model) for v in variants if v.name in eval_times]

    def encode(model):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            model.encode_image(images)

    for name, model in contenders:
        encode(model)  # warm-up
    for _ in range(reps):
        for name, model in contenders:
            eval_times[name].append(timed(lambda: encode(model), device))
    frozen_step = statistics.median(step_times[FROZEN])
    lora_step = statistics.median(step_times[specs[1][0]])
    plain_eval = statistics.median(eval_times["plain open_clip"])
    rows = []
    for variant in variants:
        step = statistics.median(step_times[variant.name])
        merged = statistics.median(eval_times[variant.name]) if variant.name in eval_times else None
        rows.append({
            "method": variant.name, "trainable": variant.trainable, "adapter_bytes": variant.adapter_bytes(),
            "step_s": step, "step_vs_frozen": step / frozen_step, "step_vs_lora_r_inner": step / lora_step,
            "peak_mem_bytes": memory[variant.name], "init_s": variant.init_seconds,
            "eval_images_per_s": batch / merged if merged else None,
            "eval_vs_plain": merged / plain_eval if merged else None,
        })
    setup = {"model": model_name, "batch": batch, "classes": classes, "image_size": size, "device": str(device),
             "amp": amp, "reps": reps, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "plain_eval_images_per_s": batch / plain_eval,
             "memory": "CUDA max allocated" if device.type == "cuda" else "peak RSS growth (sampled)"}
    return {"setup": setup, "rows": rows}


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"{s['model']} (random init), batch {s['batch']}, {s['classes']} prompts, {s['image_size']}px, "
             f"{s['device']}{' AMP' if s['amp'] else ''}, {s['threads']} threads, median of {s['reps']}; "
             f"memory = {s['memory']}; plain open_clip eval {s['plain_eval_images_per_s']:.1f} images/s", "",
             "| method | trainable | adapter file | step (s) | × frozen | × LoRA r_inner | peak mem (MiB) "
             "| init (s) | merged eval × plain | eval images/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ev = f"{r['eval_vs_plain']:.3f}" if r["eval_vs_plain"] else "—"
        ips = f"{r['eval_images_per_s']:.1f}" if r["eval_images_per_s"] else "—"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['adapter_bytes'] / 2**20:.2f} MiB | {r['step_s']:.3f} "
                     f"| {r['step_vs_frozen']:.2f} | {r['step_vs_lora_r_inner']:.2f} "
                     f"| {r['peak_mem_bytes'] / 2**20:.0f} | {r['init_s']:.2f} | {ev} | {ips} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=10, help="number of class prompts per step")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA)")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repetitions (seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.reps = "tiny-vit", 2
    unknown = sorted(set(args.methods or []) - set(lz.list_methods()))
    if unknown:
        parser.error(f"unknown method {unknown[0]}; expected some of {', '.join(lz.list_methods())}")
    result = run_benchmark(args.model, args.batch, args.classes, args.image_size, args.device, args.reps,
                           args.amp, args.methods, args.threads, log=lambda m: print(m, file=sys.stderr))
    print(markdown(result))
    if args.json:
        from lora_zoo.checkpoint import atomic_write
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return result


if __name__ == "__main__":
    main()
