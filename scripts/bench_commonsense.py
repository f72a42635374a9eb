"""``scripts/bench.py --task commonsense``: every weight method's training step on a causal LM, side by side with
the frozen model and with peft's LoRA on the same model, in one process.

Models: ``tiny-lm`` (shipped) and a Llama of LLaMA-7B's width (hidden 4096, MLP 11008, 32 heads; random init) with
``--layers`` blocks (2 by default, so that it fits and runs on a CPU) and a 1,024-token vocabulary (LLaMA's 32,000
would make the head most of the cost). Targets: q, k, v, up and down projections, each method at its
``--task commonsense`` defaults (``lm_config.METHOD_DEFAULTS``). A step is what ``lm_train`` does for one
micro-batch: forward with labels, backward, the method's hooks, AdamW. Columns: trainable parameters, step time,
its ratio to the frozen model (backward through the activations only, no weight gradient: the lower bound) and to
peft's LoRA at the method's rank (NoRA: its inner rank; AIRA: its rank), tokens per second, and the bytes autograd
saves for backward (exact and device-independent; on CUDA also max-allocated growth). Methods are interleaved in
every repetition and the median is reported, so drift on a shared machine hits every row alike.

    python scripts/bench.py --task commonsense                    # tiny-lm and 2 layers at 7B width, CPU
    python scripts/bench.py --task commonsense --device cuda --layers 4 --batch 4 --seq 256
    python scripts/bench.py --task commonsense --quick            # tiny-lm only, seconds (the tests)
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

import lora_zoo as lz
from lora_zoo.lm_config import METHOD_DEFAULTS, DEFAULT_TARGETS
from lora_zoo.lm_models import load_causal_lm

WIDE = dict(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def method_rank(method: str, options: dict):
    """The rank a method is compared at with peft's LoRA: NoRA's inner rank, AdaLoRA's initial one, else ``rank``;
    None for VeRA (its r is the width of a shared frozen pair, not a rank of each update's trainable factors)."""
    if lz.get_method(method).layer == "vera":
        return None
    config = lz.build_config(method, **options)
    for name in ("inner_rank", "init_rank", "rank"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 16


class Row:
    def __init__(self, name: str, model, optimizer, hooks, trainable: int, rank):
        self.name, self.model, self.optimizer, self.hooks = name, model, optimizer, hooks
        self.trainable, self.rank, self.times, self.saved, self.peak, self.index = trainable, rank, [], 0, 0, 0


def build_rows(base, batch, methods, log) -> list[Row]:
    from peft import LoraConfig, get_peft_model

    rows = []
    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.enable_input_require_grads()  # gradients reach the activations, no weight gets one
    rows.append(Row("frozen", frozen, None, lz.TrainingHooks(), 0, None))
    ranks = sorted({method_rank(m, METHOD_DEFAULTS.get(lz.get_method(m).layer, {})) for m in methods} - {None} | {16})
    for rank in ranks:
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                                               target_modules=list(DEFAULT_TARGETS)))
        params = [p for p in model.parameters() if p.requires_grad]
        rows.append(Row(f"peft lora r={rank}", model, torch.optim.AdamW(params, lr=1e-5), lz.TrainingHooks(),
                        sum(p.numel() for p in params), rank))
    for method in methods:
        options = {k: v for k, v in METHOD_DEFAULTS.get(lz.get_method(method).layer, {}).items()
                   if any(k in c.__dataclass_fields__ for c in lz.get_method(method).option_classes())}
        model = copy.deepcopy(base)
        started = time.perf_counter()
        stats = None
        if lz.build_config(method, **options).needs_calibration:
            stats = lz.collect_token_stats(model, [batch], DEFAULT_TARGETS)
        torch.manual_seed(0)
        lz.apply_adapters(model, method, targets=DEFAULT_TARGETS, stats=stats, **options)
        optimizer = lz.build_optimizer(model, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999))
        log(f"  {method}: built in {time.perf_counter() - started:.1f}s")
        rows.append(Row(method, model, optimizer, lz.training_hooks(model, 100), lz.count_trainable(model),
                        method_rank(method, options)))
    return rows


def step(row: Row, batch, device, saved=None) -> None:
    from bench import SavedActivations

    row.model.train()
    row.hooks.before_forward(row.index)
    recorder = SavedActivations(row.model) if saved else None
    with recorder or torch.enable_grad():
        loss = row.model(**batch).loss + row.hooks.regularizer()
    loss.backward()
    row.hooks.after_backward(row.index)
    if row.optimizer is not None:
        row.optimizer.step()
        row.optimizer.zero_grad(set_to_none=True)
    row.hooks.after_step(row.index)
    row.index += 1
    if recorder is not None:
        row.saved = recorder.bytes


def measure(rows: list[Row], batch, device, reps: int) -> None:
    from bench import cuda_peak_step, timed

    for row in rows:  # warm-up, then the saved bytes
        step(row, batch, device)
        step(row, batch, device, saved=True)
        if device.type == "cuda":
            row.peak = cuda_peak_step(lambda: step(row, batch, device), device)
    for _ in range(reps):
        for row in rows:
            row.times.append(timed(lambda: step(row, batch, device), device))


def report(name: str, rows: list[Row], tokens: int) -> dict:
    medians = {row.name: statistics.median(row.times) for row in rows}
    out = []
    for row in rows:
        peft = medians.get(f"peft lora r={row.rank}") if row.rank is not None else None
        out.append(dict(method=row.name, trainable=row.trainable, rank=row.rank, step_s=medians[row.name],
                        step_vs_frozen=medians[row.name] / medians["frozen"],
                        step_vs_peft_lora=medians[row.name] / peft if peft else None,
                        tokens_per_s=tokens / medians[row.name], saved_activation_bytes=row.saved,
                        cuda_peak_bytes=row.peak or None))
    return {"model": name, "tokens_per_step": tokens, "rows": out}


def markdown(result: dict) -> str:
    lines = [f"{result['model']}: one micro-batch of {result['tokens_per_step']} tokens per step",
             "| method | trainable | step (ms) | × frozen | × peft LoRA (same rank) | tokens/s | saved for backward |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        versus = f"{r['step_vs_peft_lora']:.2f} (r={r['rank']})" if r["step_vs_peft_lora"] else "—"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {1000 * r['step_s']:.1f} | {r['step_vs_frozen']:.2f} | "
                     f"{versus} | {r['tokens_per_s']:,.0f} | {r['saved_activation_bytes'] / 2 ** 20:.1f} MiB |")
    return "\n".join(lines)


def bench_model(name: str, base, batch, device, methods, reps: int, log) -> dict:
    log(f"{name}: building the variants ...")
    rows = build_rows(base, batch, methods, log)
    log(f"{name}: {reps} interleaved repetitions ...")
    measure(rows, batch, device, reps)
    return report(name, rows, int(batch["attention_mask"].sum()))


def run_commonsense_bench(args, log) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    methods = args.methods or [m for m in lz.list_methods() if lz.get_method(m).kind == "weights"]
    results = []
    base, _ = load_causal_lm("tiny-lm", device)
    generator = torch.Generator().manual_seed(0)

    def batch_of(size: int, length: int, vocab: int) -> dict:
        ids = torch.randint(3, vocab, (size, length), generator=generator).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    results.append(bench_model("tiny-lm", base, batch_of(4, 128, base.config.vocab_size), device, methods, args.reps,
                               log))
    if not args.quick:
        torch.manual_seed(0)
        wide = LlamaForCausalLM(LlamaConfig(num_hidden_layers=args.layers, **WIDE)).to(device)
        results.append(bench_model(f"Llama at LLaMA-7B width, {args.layers} layers", wide,
                                   batch_of(args.batch, args.seq, WIDE["vocab_size"]), device, methods, args.reps,
                                   log))
    return {"device": str(device), "threads": torch.get_num_threads(), "reps": args.reps, "models": results}
