"""Pretrain ``tiny-lm`` on text generated from the commonsense world; writes the folder ``lora_zoo`` ships.

The generator is ``datasets/commonsense_world.py``: documents of facts in several phrasings and free-form questions
answered in the Alpaca template (``pretraining_text``); none is in the eight tasks' formats. The tokenizer is a
byte-level BPE of 1,024 tokens trained on that text with Hugging Face ``tokenizers`` (ids 0/1/2 = ``<unk>``, ``<s>``,
``</s>``; BOS added to every encoding; no pad token, as LLaMA's: the pipeline sets LLM-Adapters' pad id 0; a run of
whitespace is always a token of its own, so the evaluation prompt's trailing "\n" and 16 spaces tokenise as they do
in the training sequences, where the answer follows them: with GPT-2's pre-tokenisation the last space would join
the answer's first word in training only, and a prompt ending in spaces would be out of distribution); its
merges are also fitted to 64 records of each task in their training prompts (segmentation only, so prompts are not
spelled byte by byte; the model never trains on them). The model
is a ``LlamaForCausalLM`` (4 layers, width 128, 4 heads with 2 key/value heads, MLP 384, tied embeddings). Training
is next-token prediction on the documents, each ``<s> text </s>``, concatenated and cut into blocks of
``--block`` tokens; AdamW with linear warm-up and cosine decay, weight decay on matrices only. Block order and init
are functions of ``--seed``, so the same command on the same machine and thread count gives the same files.

Outputs: ``lora_zoo/weights/tiny-lm/`` (``save_pretrained`` of the model in fp16 and of the tokenizer),
``lora_zoo/weights/tiny-lm.sha256`` (``sha256sum`` format: the weights and ``tokenizer.json``),
``lora_zoo/weights/tiny-lm.json`` (command, timings, losses) and ``tiny-lm.loss.csv``.

    OMP_NUM_THREADS=1 python scripts/pretrain_tiny_lm.py      # the shipped files: 16 minutes on one shared core
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets.commonsense import TASKS, train_prompt  # noqa: E402
from datasets.commonsense_world import pretraining_text, task_records  # noqa: E402
from lora_zoo.files import sha256_file  # noqa: E402
from lora_zoo.lm_models import TINY_LM_CHECKSUMS, TINY_LM_DIR  # noqa: E402

SPECIAL = ("<unk>", "<s>", "</s>")
MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2)


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, as transformers' ``PreTrainedTokenizerFast`` (BOS added)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # whitespace runs are tokens of their own, never glued to the next word: the evaluation prompt ends with
    # "\n" + 16 spaces where training continues "\n" + 16 spaces + "the", and both must tokenise that run alike
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, clean_up_tokenization_spaces=False)


def blocks(tokenizer, texts: list[str], size: int, seed: int) -> torch.Tensor:
    """``<s> text </s>`` of every text, concatenated, cut into rows of ``size`` tokens, rows shuffled."""
    stream = []
    for ids in tokenizer(texts)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    rows = torch.tensor(stream[:len(stream) // size * size]).view(-1, size)
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]


def lr_factor(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model, data: torch.Tensor, args) -> list[tuple[int, float]]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps))
    losses, window = [], []
    model.train()
    for step in range(args.steps):
        start = step * args.batch_size % (len(data) - args.batch_size + 1)
        batch = data[start:start + args.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            losses.append((step + 1, sum(window) / len(window)))
            print(f"step {step + 1}/{args.steps} loss {losses[-1][1]:.4f}", flush=True)
            window = []
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(TINY_LM_DIR))
    args = parser.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_flush_denormal(True)
    started = time.perf_counter()
    texts = list(pretraining_text(args.documents, args.seed))
    formats = [train_prompt(r) for task in TASKS for r in task_records(task, 64, seed=args.seed + 500)]
    tokenizer = build_tokenizer(texts + formats, args.vocab)
    data = blocks(tokenizer, texts, args.block, args.seed)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **MODEL))
    print(f"{len(texts)} documents, {data.numel()} tokens in {len(data)} blocks, vocabulary {len(tokenizer)}, "
          f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
    losses = train(model, data, args)
    out = Path(args.out)
    model.generation_config.pad_token_id = 0
    model.half().save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = out.parent / f"{out.name}.sha256"
    files = ("model.safetensors", "tokenizer.json")
    record.write_text("".join(f"{sha256_file(out / name)}  {name}\n" for name in files))
    (out.parent / f"{out.name}.json").write_text(json.dumps({
        "command": "python scripts/pretrain_tiny_lm.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        **vars(args),
        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started),
        "tokens": data.numel(), "final_loss": losses[-1][1], "model": MODEL}, indent=2) + "\n")
    with open(out.parent / f"{out.name}.loss.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("step", "loss"), *losses])
    assert record == TINY_LM_CHECKSUMS or out != TINY_LM_DIR
    print(f"wrote {out} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
