"""Tokenised training data of the commonsense task, and which records each optimizer step and each process take.

``tokenize_record`` is LLM-Adapters' ``generate_and_tokenize_prompt`` with ``train_on_inputs`` (their default): the
training prompt (``datasets.commonsense.train_prompt``) tokenised with the tokenizer's BOS, cut to ``cutoff_len``
tokens, EOS appended only when the last token is not EOS and the sequence is shorter than ``cutoff_len``, and the
labels equal to the ids (the loss covers prompt and answer). ``collate`` pads a micro-batch as their
``DataCollatorForSeq2Seq(pad_to_multiple_of=8)`` does under ``padding_side="left"``: to the longest sequence rounded
up to a multiple of 8, on the left, ids with the pad id, attention mask 0, labels -100.

``StepPlan`` says which records form each optimizer step: one pass is a permutation of the records drawn from
``(seed, epoch)`` (transformers' Trainer reshuffles every epoch from its seed too), cut into global batches of
``batch_size`` (the last one short, as the Trainer's loader does not drop it); a batch is cut into micro-batches of
``micro_batch_size`` and micro-batch ``k`` goes to process ``k mod world_size``. The step of any index is a function
of the seed alone, so a resumed run and a run on more processes see the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from datasets.commonsense import train_prompt

LABEL_PAD = -100


def tokenize_record(tokenizer, record: dict, cutoff_len: int) -> list[int]:
    """The token ids of one training record (``labels`` are the same ids)."""
    ids = tokenizer(train_prompt(record), truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
    if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids = ids + [tokenizer.eos_token_id]
    return list(ids)


def tokenize_records(tokenizer, records: list[dict], cutoff_len: int) -> list[list[int]]:
    return [tokenize_record(tokenizer, record, cutoff_len) for record in records]


def collate(sequences: list[list[int]], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` of a left-padded micro-batch."""
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), LABEL_PAD, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(sequence)
        mask[row, width - len(sequence):] = 1
        labels[row, width - len(sequence):] = torch.tensor(sequence)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class StepPlan:
    """Which training records each optimizer step takes, and which of them each process takes."""

    records: int
    batch_size: int
    micro_batch_size: int
    seed: int
    epochs: int
    n_iters: Optional[int] = None

    @property
    def per_epoch(self) -> int:
        return -(-self.records // self.batch_size)

    @property
    def steps(self) -> int:
        return self.n_iters if self.n_iters is not None else self.epochs * self.per_epoch

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return torch.randperm(self.records, generator=generator).tolist()

    def batch(self, step: int) -> list[int]:
        """The record indices of optimizer step ``step`` (0-based; beyond the epochs it goes on with new passes)."""
        epoch, index = divmod(step, self.per_epoch)
        return self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]

    def micro_batches(self, step: int) -> list[list[int]]:
        indices = self.batch(step)
        return [indices[i:i + self.micro_batch_size] for i in range(0, len(indices), self.micro_batch_size)]

    def share(self, step: int, rank: int, world: int) -> list[tuple[int, list[int]]]:
        """``(micro-batch index in the step, record indices)`` of process ``rank`` of ``world`` at ``step``."""
        return [(k, micro) for k, micro in enumerate(self.micro_batches(step)) if k % world == rank]
