"""Speed, memory and parameter cost of every registered method, measured side by side in one process.

For each method (its registry defaults) on one open_clip model and one batch:
trainable parameters and adapter bytes on disk; the time of one training
step (forward of both towers, contrastive-logit cross-entropy, backward,
AdamW step, the method's hooks) as a ratio to the *frozen lower bound* (the
same split model with no adapters, backward through the activations only)
and to LoRA at NoRA's inner rank (and dropout); the memory of a training step (the bytes
autograd saves for backward, on every device, and CUDA max allocated on GPU); the
adapter initialisation time including calibration and SVDs; and the merged
evaluation throughput (image encoder) as a ratio to the plain, unsplit
open_clip model. Methods are interleaved within every repetition and the
median is reported, so drift on a shared machine hits every row alike.

With ``--part pipeline`` (or ``all``, the default) it also measures the text context, the data
stream and a per-run projection (``bench_pipeline.py``); ``--dataset`` sets the prompt count (the
dataset's real class count, e.g. 101 for food101, 1,000 for imagenet) and the projected run. With
``--part prompts`` (or ``all``) it measures the prompt learners' text tower: a CoOp step on the shortest
exact context against the full one, and CoCoOp's batch in one pass against its per-image loop.

    python scripts/bench.py                       # ViT-B-16, random init, CPU
    python scripts/bench.py --device cuda --batch 32 --amp
    python scripts/bench.py --quick               # tiny model, seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_pipeline as pipeline  # noqa: E402
import bench_prompts  # noqa: E402
import lora_zoo as lz  # noqa: E402
from datasets.registry import BENCHMARK_SIZES  # noqa: E402
from lora_zoo.files import write_json  # noqa: E402
from lora_zoo.kinds import apply_method_on_batch  # noqa: E402
from lora_zoo.models import build_clip  # noqa: E402
from lora_zoo.scoring import autocast  # noqa: E402
from lora_zoo.train import prepare_device, training_step  # noqa: E402

FROZEN = "frozen"


class SavedActivations:
    """Bytes autograd saves for backward during a ``with`` block, excluding the model's own weights.

    Counted once per storage, so views and tensors saved twice count once. This is the memory a
    method adds per token (LoRA keeps its rank-r hidden state; a method that stored a per-token
    d_out × d_in product or extra full-width activations would show here), and it is exact and
    device-independent, unlike a CPU RSS reading.
    """

    def __init__(self, model: torch.nn.Module):
        self.weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self.storages: dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def cuda_peak_step(step, device) -> int:
    """CUDA max-allocated growth during one call of ``step``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class Variant:
    """One row: a method (or the frozen bound) with its model, optimizer and hooks."""

    def __init__(self, name, method, options, base_model, calibrate, steps, classes, images, labels, amp=False):
        self.name, self.method, self.options = name, method, options
        self.model = copy.deepcopy(base_model)
        self.inputs = images
        start = time.perf_counter()
        if method is None:  # frozen lower bound: grads reach every activation, no weight gets one
            self.model.requires_grad_(False)
            self.model.visual.positional_embedding.requires_grad_(True)
            self.model.positional_embedding.requires_grad_(True)
            self.optimizer, self.hooks, self.trainable = None, lz.TrainingHooks(), 0
        else:
            stats = calibrate(self.model) if lz.build_config(method, **options).needs_calibration else None
            # a head trains on features encoded once (lora_zoo/features.py): its step is timed on them
            self.inputs = apply_method_on_batch(self.model, method, classes, images, labels, stats, **options)
            self.optimizer = lz.build_optimizer(self.model, lr=1e-4, **pipeline.ADAMW)  # the method's builder
            self.trainable = lz.count_trainable(self.model)  # after the builder (LoRA-FA freezes A)
            self.hooks = lz.training_hooks(self.model, steps)
        self.init_seconds = time.perf_counter() - start
        self.step_index = 0
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)  # amp is only ever on with CUDA

    def adapter_bytes(self) -> int:
        if self.method is None:
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            path = lz.save_adapters(self.model, Path(tmp) / "adapters.safetensors")
            return path.stat().st_size + path.with_suffix(".json").stat().st_size


def train_step(variant: Variant, images, classes, labels, device, amp: bool) -> None:
    """One step of the runner's own ``training_step`` (same loss, hooks and optimizer handling) on what the
    method trains on (the images, or a head's features of them)."""
    variant.model.train()
    training_step(variant.model, variant.inputs, labels, classes, variant.optimizer, variant.hooks,
                  variant.step_index, device, "fp16" if amp else "fp32", variant.scaler)
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
                  amp=False, methods=None, threads=None, log=print, dropout=None, options=None) -> dict:
    """Measure every method; returns ``{"setup": ..., "rows": [...]}`` (one row per variant). ``dropout``: the
    adapter-input dropout of every method that has one, instead of its default (what dropout costs);
    ``options``: ``{method: {option: value}}`` instead of its defaults (MaPLe's depth on a 2-block model)."""
    device = torch.device(device)
    prepare_device(device)  # as the runner does (flushes CPU denormals)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = build_clip(model_name, pretrained=None, device=device)
    plain = backbone.model
    size = image_size or plain.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch, device=device) % classes
    names = [f"class {i}" for i in range(classes)]
    class_set = lz.ClassSet.of(names, [f"a photo of a {name}." for name in names], backbone.tokenizer).to(device)
    tokens = class_set.tokens
    base = lz.split_attention(copy.deepcopy(plain))

    def calibrate(model):
        return lz.collect_activation_stats(model, image_batches=[images], text_batches=[tokens])

    nora = lz.build_config("nora")  # the like-for-like LoRA: NoRA's inner rank and dropout
    specs = [(FROZEN, None, {}), (f"lora r={nora.inner_rank}", "lora", {"rank": nora.inner_rank, "dropout": nora.dropout})]
    specs += [(m, m, dict((options or {}).get(m, {}))) for m in (methods or lz.list_methods())]
    if dropout is not None:
        specs = [(name, m, {**o, "dropout": dropout} if m and hasattr(lz.build_config(m), "dropout") else o)
                 for name, m, o in specs]
    steps = 2 + reps + 1
    variants = []
    for name, method, options in specs:
        log(f"building {name} ...")
        variants.append(Variant(name, method, options, base, calibrate, steps, class_set, images, labels,
                                amp and device.type == "cuda"))
    for variant in variants:  # warm-up (allocator, kernels)
        train_step(variant, images, class_set, labels, device, amp)
    step_times = {v.name: [] for v in variants}
    for rep in range(reps):
        for variant in variants:
            step_times[variant.name].append(timed(lambda: train_step(variant, images, class_set, labels, device, amp),
                                                  device))
        log(f"repetition {rep + 1}/{reps} done")
    saved, peak = {}, {}
    for variant in variants:
        with SavedActivations(variant.model) as activations:
            train_step(variant, images, class_set, labels, device, amp)
        saved[variant.name] = activations.bytes
        if device.type == "cuda":
            peak[variant.name] = cuda_peak_step(lambda: train_step(variant, images, class_set, labels, device, amp),
                                                device)
    # merged evaluation throughput against the plain (fused-attention) open_clip model
    eval_times = {"plain open_clip": []}
    for variant in variants:
        variant.model.eval()
        if variant.method is not None:
            variant.hooks.finish()
            if lz.kind_of(variant.model).merge(variant.model):
                eval_times[variant.name] = []
    contenders = [("plain open_clip", plain)] + [(v.name, v.model) for v in variants if v.name in eval_times]

    def encode(model):
        with torch.no_grad(), autocast(device, "fp16" if amp else "fp32"):
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
            "saved_activation_bytes": saved[variant.name], "cuda_peak_bytes": peak.get(variant.name),
            "init_s": variant.init_seconds,
            "eval_images_per_s": batch / merged if merged else None,
            "eval_vs_plain": merged / plain_eval if merged else None,
        })
    setup = {"model": model_name, "batch": batch, "classes": classes, "image_size": size, "device": str(device),
             "dropout": "each method's" if dropout is None else dropout,
             "amp": amp, "reps": reps, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "plain_eval_images_per_s": batch / plain_eval}
    return {"setup": setup, "rows": rows}


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"{s['model']} (random init), batch {s['batch']}, {s['classes']} prompts, {s['image_size']}px, "
             f"{s['device']}{' AMP' if s['amp'] else ''}, {s['threads']} threads, median of {s['reps']}"
             + (f", adapter dropout {s['dropout']}" if s.get("dropout", "each method's") != "each method's" else "")
             + "; "
             f"plain open_clip eval {s['plain_eval_images_per_s']:.1f} images/s", "",
             "| method | trainable | adapter file | step (s) | × frozen | × LoRA r_inner | saved for backward (MiB) "
             "| CUDA peak (MiB) | init (s) | merged eval × plain | eval images/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ev = f"{r['eval_vs_plain']:.3f}" if r["eval_vs_plain"] else "—"
        ips = f"{r['eval_images_per_s']:.1f}" if r["eval_images_per_s"] else "—"
        cuda = f"{r['cuda_peak_bytes'] / 2**20:.0f}" if r["cuda_peak_bytes"] is not None else "—"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['adapter_bytes'] / 2**20:.2f} MiB | {r['step_s']:.3f} "
                     f"| {r['step_vs_frozen']:.2f} | {r['step_vs_lora_r_inner']:.2f} "
                     f"| {r['saved_activation_bytes'] / 2**20:.1f} | {cuda} | {r['init_s']:.2f} | {ev} | {ips} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 4); commonsense: sequences "
                                                                "of the 7B-width model (default 1)")
    parser.add_argument("--dataset", default="food101", choices=sorted(BENCHMARK_SIZES),
                        help="its class count is the prompt count; the run projected (default food101: 101)")
    parser.add_argument("--classes", type=int, default=None, help="prompt count (default: the dataset's classes)")
    parser.add_argument("--part", choices=["methods", "pipeline", "heads", "prompts", "all"], default="all",
                        help="heads: only the pipeline's head training, cached features against re-encoding")
    parser.add_argument("--head_images", type=int, default=16, help="JPEGs a head trains on (pipeline part)")
    parser.add_argument("--head_epochs", type=int, default=50, help="its epochs (pipeline part)")
    parser.add_argument("--head_views", type=int, default=5, help="views encoded once (pipeline part; the heads' "
                                                                   "epochs / views: CLIP-Adapter's and TaskRes's 200/20)")
    parser.add_argument("--step_batch", type=int, default=32, help="batch of the full-vs-cut step (pipeline part)")
    parser.add_argument("--cocoop_batch", type=int, default=4, help="images of the CoCoOp step (prompts part)")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA)")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=None,
                        help="adapter-input dropout of every method that has one (default: each method's own)")
    parser.add_argument("--options", nargs="*", default=[], metavar="METHOD.OPTION=VALUE",
                        help="a method's option instead of its default, e.g. maple.depth=6 (always: "
                             "bench_pipeline.BENCH_OPTIONS; --quick: those the tiny model needs, TINY_OPTIONS)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repetitions (seconds)")
    parser.add_argument("--task", choices=["classification", "commonsense"], default="classification",
                        help="commonsense: weight methods on tiny-lm and a Llama at 7B width (bench_commonsense.py)")
    parser.add_argument("--layers", type=int, default=2, help="commonsense: blocks of the 7B-width Llama")
    parser.add_argument("--seq", type=int, default=64, help="commonsense: tokens per sequence of the 7B-width model")
    args = parser.parse_args(argv)
    if args.task == "commonsense":
        return commonsense(args, parser)
    if args.quick:
        args.model, args.reps, args.step_batch, args.cocoop_batch = "tiny-vit", 2, 8, 4
        args.head_images, args.head_epochs, args.head_views = 8, 4, 2
    classes = args.classes or BENCHMARK_SIZES[args.dataset][0]
    unknown = sorted(set(args.methods or []) - set(lz.list_methods()))
    if unknown:
        parser.error(f"unknown method {unknown[0]}; expected some of {', '.join(lz.list_methods())}")
    try:
        options = pipeline.method_options([*pipeline.BENCH_OPTIONS, *(pipeline.TINY_OPTIONS if args.quick else ()),
                                           *args.options])
    except ValueError as err:
        parser.error(f"--options: {err}")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    result = {}
    if args.part in ("methods", "all"):
        result = run_benchmark(args.model, args.batch or 4, classes, args.image_size, args.device, args.reps,
                               args.amp, args.methods, args.threads, log=log, dropout=args.dropout,
                               options=options)
        print(markdown(result))
    if args.part in ("pipeline", "all"):
        result["pipeline"] = run_pipeline(args, classes, log)
        print("\n" + pipeline.markdown(result["pipeline"]))
    if args.part == "heads":
        result["heads"] = run_heads(args, log)
        print("\n" + pipeline.head_markdown(result["heads"]))
    if args.part in ("prompts", "all"):
        result["prompts"] = run_prompts(args, classes, log)
        print("\n" + bench_prompts.prompts_markdown(result["prompts"]))
    if args.json:
        write_json(args.json, result)
    return result


def commonsense(args, parser) -> dict:
    """``--task commonsense``: ``bench_commonsense.py`` (``--batch`` is the 7B-width model's, default 1)."""
    import bench_commonsense

    args.batch = args.batch or 1
    args.reps = 2 if args.quick else args.reps
    weights = [m for m in lz.list_methods() if lz.get_method(m).kind == "weights"]
    unknown = sorted(set(args.methods or []) - set(weights))
    if unknown:
        parser.error(f"unknown weight method {unknown[0]}; expected some of {', '.join(weights)}")
    result = bench_commonsense.run_commonsense_bench(args, lambda m: print(m, file=sys.stderr))
    for model in result["models"]:
        print(bench_commonsense.markdown(model) + "\n")
    if args.json:
        write_json(args.json, result)
    return result


def run_pipeline(args, classes: int, log) -> dict:
    """Text context, training step and data stream side by side, and the projected 16-shot run."""
    device = torch.device(args.device)
    prepare_device(device, args.threads)
    torch.manual_seed(0)
    backbone = build_clip(args.model, pretrained=None, device=device)
    model = lz.split_attention(backbone.model)
    log("pipeline: text context ...")
    measured = pipeline.text_context(model, backbone.tokenizer, classes, args.reps, device)
    log("pipeline: training step, full vs cut context ...")
    measured.update(pipeline.step_context(model, backbone.tokenizer, classes, args.step_batch, args.reps, device,
                                          args.amp and device.type == "cuda"))
    log("pipeline: data stream ...")
    measured.update(pipeline.data_stream(model, images=64 if not args.quick else 16, batch=8, reps=args.reps))
    log("pipeline: training a head, cached features against re-encoding ...")
    measured.update(pipeline.head_training(model, backbone.tokenizer, args.head_images, args.head_epochs,
                                           args.head_views, 8, device))
    eval_rate = pipeline.eval_throughput(backbone.model, args.step_batch, args.reps, device,
                                         args.amp and device.type == "cuda")
    measured.update(pipeline.projection(args.dataset, measured["step_cut_s"], eval_rate))
    measured.update(model=args.model, device=str(device), threads=torch.get_num_threads(), reps=args.reps,
                    eval_images_per_s=eval_rate)
    return measured


def run_heads(args, log) -> dict:
    """Only the head training of the pipeline part: cached features against re-encoding every epoch."""
    device = torch.device(args.device)
    prepare_device(device, args.threads)
    torch.manual_seed(0)
    backbone = build_clip(args.model, pretrained=None, device=device)
    log("training a head, cached features against re-encoding ...")
    measured = pipeline.head_training(backbone.model, backbone.tokenizer, args.head_images, args.head_epochs,
                                      args.head_views, 8, device)
    return {**measured, "model": args.model, "device": str(device), "threads": torch.get_num_threads()}


def run_prompts(args, classes: int, log) -> dict:
    """The prompt learners' text tower: CoOp's step full vs cut context, CoCoOp batched vs per image."""
    device = torch.device(args.device)
    prepare_device(device, args.threads)
    backbone = build_clip(args.model, pretrained=None, device=device)
    log("prompts: CoOp step, full vs cut context ...")
    measured = bench_prompts.coop_step(backbone.model, backbone.tokenizer, classes, args.step_batch, args.reps, device,
                                  args.amp and device.type == "cuda")
    log("prompts: CoCoOp step, per-image loop vs batched ...")
    measured.update(bench_prompts.cocoop_step(backbone.model, backbone.tokenizer, classes, args.cocoop_batch, args.reps,
                                         device))
    measured.update(model=args.model, device=str(device), threads=torch.get_num_threads(), reps=args.reps)
    return measured


if __name__ == "__main__":
    main()
