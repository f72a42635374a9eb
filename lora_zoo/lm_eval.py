"""Evaluation of the commonsense task as LLM-Adapters' ``commonsense_evaluate.py`` scores it.

Each test record's prompt is their evaluation template with its instruction (``datasets.commonsense.eval_prompt``);
prompts are left-padded with the pad id and generated from with their settings: beam search with 4 beams and at most
32 new tokens, no sampling (they also pass temperature, top_p and top_k, which beam search without ``do_sample``
never reads); generation stops at the model's EOS. The attention mask is passed, so a batch of padded prompts
generates what each prompt alone would (their scripts run one prompt per batch). The decoded output (prompt
included, special tokens skipped) is split on the first "### Response:" and the task's answer pattern's first match
is the prediction (``extract_answer``; none: "", wrong). Accuracy is the share of exact matches with ``answer``, in
percent, per task; the average is the mean of the tasks' accuracies (their tables' "Avg."). Processes share the
records (record i on process i mod N) and rank 0 gathers the predictions.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from datasets.commonsense import eval_prompt, extract_answer, response_text

from .lm_dist import Dist

logger = logging.getLogger(__name__)


def generation_config(model: nn.Module, tokenizer, num_beams: int, max_new_tokens: int):
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    return GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], config, device: torch.device,
             precision: str) -> list[str]:
    """The decoded outputs (prompt included) of ``prompts``, one batch."""
    from .lm_train import autocast

    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    with autocast(device, precision):
        sequences = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   generation_config=config)
    return tokenizer.batch_decode(sequences, skip_special_tokens=True)


def evaluate_commonsense(model: nn.Module, tokenizer, tests: dict[str, list[dict]], cfg, dist: Dist,
                         device: torch.device, precision: str) -> dict[str, Any]:
    """Per-task accuracy (%), their average, test counts and (on rank 0) the predictions of ``tests``."""
    config = generation_config(model, tokenizer, cfg.num_beams, cfg.max_new_tokens)
    was_training, model = model.training, model.eval()
    scores, counts, predictions = {}, {}, {}
    for task, records in tests.items():
        mine = [i for i in range(len(records)) if i % dist.world == dist.rank]
        outputs = {}
        for start in range(0, len(mine), cfg.eval_batch_size):
            chunk = mine[start:start + cfg.eval_batch_size]
            decoded = generate(model, tokenizer, [eval_prompt(records[i]["instruction"]) for i in chunk], config,
                               device, precision)
            outputs.update(zip(chunk, decoded))
        gathered = {i: text for part in dist.gather(outputs) for i, text in part.items()}
        rows = []
        for index, record in enumerate(records):
            response = response_text(gathered[index])
            predicted = extract_answer(task, response)
            rows.append({"answer": record["answer"], "pred": predicted, "output": response,
                         "flag": predicted == record["answer"]})
        scores[task] = 100.0 * sum(row["flag"] for row in rows) / len(rows)
        counts[task] = len(rows)
        predictions[task] = rows
        logger.info("%s: %.2f%% of %d", task, scores[task], len(rows))
    model.train(was_training)
    return {"tasks": scores, "accuracy": sum(scores.values()) / len(scores), "test_records": counts,
            "predictions": predictions}
