"""The prompt learners' part of the benchmark (``scripts/bench.py --part prompts``): CoOp's training step with its text
tower over every class prompt, on the shortest exact context against CoOp's full 77-token one, and CoCoOp's images of
a batch in one text-tower pass against their per-image loop, each pair at equal logits (asserted)."""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

import lora_zoo as lz
import lora_zoo.prompting as prompting
import lora_zoo.train as train
from bench_pipeline import class_names, median_times
from lora_zoo.text import short_context_length


# ---- prompt learners: CoOp's text tower every step, CoCoOp's per-image prompts --------------------------------
def reference_text_encoder(model, embeddings, tokens):
    """CoOp's ``TextEncoder`` (trainers/coop.py): every prompt on the full context (77 tokens for ViT-B-16)."""
    x = embeddings + model.positional_embedding.to(embeddings.dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


@contextmanager
def full_prompt_context():
    """The prompt learners' text tower on the full context (the reference the cut one is measured against)."""
    cut = prompting.encode_embeddings
    prompting.encode_embeddings = reference_text_encoder
    try:
        yield
    finally:
        prompting.encode_embeddings = cut


def prompt_inputs(model, tokenizer, prompts: int, batch: int, device):
    names = class_names(prompts)
    classes = lz.ClassSet.of(names, [f"a photo of a {name}." for name in names], tokenizer).to(device)
    size = model.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return classes, images, (torch.arange(batch) % prompts).to(device)


def with_method(model, method: str, classes):
    adapted = copy.deepcopy(model)
    torch.manual_seed(0)
    lz.apply_method(adapted, method, classes=classes)
    return adapted.train()


def coop_step(model, tokenizer, prompts: int, batch: int, reps: int, device, amp: bool) -> dict:
    """CoOp (16 tokens) training steps, its text tower over every class each step: on the shortest exact context
    against the full one; the logits of both from identical states must agree."""
    classes, images, labels = prompt_inputs(model, tokenizer, prompts, batch, device)
    runs = {}
    for name in ("full", "cut"):
        adapted = with_method(model, "coop16", classes)
        runs[name] = (adapted, lz.build_optimizer(adapted, lr=0.002, weight_decay=5e-4, betas=(0.9, 0.999),
                                                  optimizer="sgd"),  # Dassl's, CoOp's recipe
                      lz.training_hooks(adapted, 10))
    logits = {}
    for name, (adapted, _, _) in runs.items():
        with torch.no_grad(), full_prompt_context() if name == "full" else nullcontext():
            scorer = adapted.lora_zoo_learner
            logits[name] = scorer.logits(adapted, images, scorer.class_state(adapted, classes))
    difference = float((logits["full"] - logits["cut"]).abs().max())
    assert difference <= 1e-4 * float(logits["full"].abs().max()), f"CoOp logits differ by {difference}"

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = median_times({name: step_in_context(runs[name], name, images, labels, classes, device, amp)
                            for name in runs}, reps, sync)
    learner = runs["cut"][0].lora_zoo_learner
    tokens = learner.prompts(runs["cut"][0], classes).tokens
    return {"coop_prompts": prompts, "coop_batch": batch, "coop_context_full": tokens.shape[1],
            "coop_context_cut": short_context_length(runs["cut"][0], tokens), "coop_step_full_s": seconds["full"],
            "coop_step_cut_s": seconds["cut"], "coop_speedup": seconds["full"] / seconds["cut"],
            "coop_logit_diff": difference}


def step_in_context(run, name, images, labels, classes, device, amp):
    adapted, optimizer, hooks = run

    def step():
        with full_prompt_context() if name == "full" else nullcontext():
            train.training_step(adapted, images, labels, classes, optimizer, hooks, 0, device,
                                "fp16" if amp else "fp32")
    return step


def cocoop_step(model, tokenizer, prompts: int, batch: int, reps: int, device) -> dict:
    """A CoCoOp forward + backward over a batch of images, each with its own class prompts: their per-image loop
    (one pass of the text tower per image) against one pass for the batch; the logits must be identical."""
    classes, images, labels = prompt_inputs(model, tokenizer, prompts, batch, device)
    adapted = with_method(model, "cocoop", classes)
    learner = adapted.lora_zoo_learner
    state = learner.class_state(adapted, classes)

    def step(per_pass):
        def run():
            learner.images_per_pass = per_pass
            learner.zero_grad(set_to_none=True)
            logits = learner.logits(adapted, images, state)
            F.cross_entropy(logits, labels).backward()
            return logits.detach()
        return run

    loop, batched = step(1)(), step(None)()
    difference = float((loop - batched).abs().max())
    assert difference <= 1e-4 * float(loop.abs().max()), f"batched CoCoOp logits differ by {difference}"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = median_times({"loop": step(1), "batched": step(None)}, reps, sync)
    return {"cocoop_prompts": prompts, "cocoop_batch": batch, "cocoop_loop_s": seconds["loop"],
            "cocoop_batched_s": seconds["batched"], "cocoop_speedup": seconds["loop"] / seconds["batched"],
            "cocoop_logit_diff": difference, "cocoop_identical": bool(torch.equal(loop, batched))}


def prompts_markdown(p: dict) -> str:
    return "\n".join([
        f"Prompt learners ({p['model']}, {p['device']}, {p['threads']} threads, median of {p['reps']}):", "",
        "| measurement | reference | ours | ratio | check |", "|---|---:|---:|---:|---|",
        f"| CoOp (16) training step, batch {p['coop_batch']}, {p['coop_prompts']} prompts: full context vs cut "
        f"({p['coop_context_full']} → {p['coop_context_cut']} tokens) | {p['coop_step_full_s']:.3f} s "
        f"| {p['coop_step_cut_s']:.3f} s | {p['coop_speedup']:.2f}× | max logit diff {p['coop_logit_diff']:.1e} |",
        f"| CoCoOp forward+backward, {p['cocoop_batch']} images × {p['cocoop_prompts']} prompts: per-image loop vs "
        f"one pass | {p['cocoop_loop_s']:.3f} s | {p['cocoop_batched_s']:.3f} s | {p['cocoop_speedup']:.2f}× "
        f"| identical logits: {p['cocoop_identical']} (max diff {p['cocoop_logit_diff']:.1e}) |"])
