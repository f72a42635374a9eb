"""The commonsense-reasoning data of LLM-Adapters (Hu et al., EMNLP 2023), reused unchanged by DoRA (Liu et al.,
ICML 2024) and by the NoRA paper's Table 1: its files, prompt templates and answer extraction.

Layout under ``root`` (LLM-Adapters' and DoRA's ``commonsense_reasoning/`` README)::

    commonsense_170k.json          training records (the eight tasks' training sets together)
    dataset/<task>/test.json       test records of each task, e.g. dataset/boolq/test.json

A record is a JSON object ``{"instruction", "input", "output", "answer"}`` of strings: ``output`` is
``"the correct answer is " + answer``, ``input`` is empty in every commonsense record. Training reads
``instruction``, ``input`` and ``output``; the evaluation reads ``instruction`` and ``answer``: a record
missing one of those, or holding a non-string there, is a one-line ``DatasetError`` naming the file and
the record. Other folders under ``dataset/`` (LLM-Adapters' arithmetic sets) are left alone; asking for a
task that is not one of the eight is a one-line error (its answers have no pattern to be extracted by).

The prompt templates are LLM-Adapters' Alpaca templates, byte for byte (their f-strings keep the source
indentation: 16 spaces begin every line after the first; the training and evaluation templates differ in
trailing spaces and in the whitespace-only lines between sections; ``tests/test_commonsense_data.py`` spells
the bytes out). ``extract_answer`` takes the first match of the task's pattern (case-sensitive) in the text
after the first ``### Response:`` of the decoded output; no match is ``""``, which counts as wrong.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .base import DatasetError

TRAIN_FILE = "commonsense_170k.json"
TEST_FOLDER = "dataset"
#: the eight tasks in Table 1's column order: (folder name, column title, answer pattern)
TASK_TABLE = (
    ("boolq", "BoolQ", r"true|false"),
    ("piqa", "PIQA", r"solution1|solution2"),
    ("social_i_qa", "SIQA", r"answer1|answer2|answer3|answer4|answer5"),
    ("hellaswag", "HellaSwag", r"ending1|ending2|ending3|ending4"),
    ("winogrande", "WinoGrande", r"option1|option2"),
    ("ARC-Easy", "ARC-e", r"answer1|answer2|answer3|answer4|answer5"),
    ("ARC-Challenge", "ARC-c", r"answer1|answer2|answer3|answer4|answer5"),
    ("openbookqa", "OBQA", r"answer1|answer2|answer3|answer4|answer5"),
)
TASKS = tuple(name for name, _, _ in TASK_TABLE)
TASK_TITLES = {name: title for name, title, _ in TASK_TABLE}
ANSWER_PATTERNS = {name: re.compile(pattern) for name, _, pattern in TASK_TABLE}
RESPONSE_MARKER = "### Response:"

_INDENT = "\n" + " " * 16
#: finetune.py's templates (training); ``{output}`` ends the sequence (the EOS token is appended by tokenisation)
TRAIN_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request. \n" + _INDENT.join(
                        ["", "### Instruction:", "{instruction}", "", "### Input:", "{input}", "",
                         "### Response:", "{output}"]))
TRAIN_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.  \n" + _INDENT.join(["", "### Instruction:", "{instruction}", "", "### Response:",
                                                 "{output}"]))
#: commonsense_evaluate.py's templates (evaluation): generation starts after the last 16 spaces
EVAL_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   + " " * 16 + "### Instruction:" + _INDENT + "{instruction}\n\n" + " " * 16 + "### Input:"
                   + _INDENT + "{input}\n\n" + " " * 16 + "### Response:" + _INDENT)
EVAL_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request. \n\n" + " " * 16 + "### Instruction:" + _INDENT + "{instruction}\n\n" + " " * 16
                 + "### Response:" + _INDENT)


def train_prompt(record: dict) -> str:
    """The training sequence of a record (finetune.py's template; the input section only when ``input`` is
    non-empty)."""
    template = TRAIN_WITH_INPUT if record["input"] else TRAIN_NO_INPUT
    return template.format(instruction=record["instruction"], input=record["input"], output=record["output"])


def eval_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The evaluation prompt (commonsense_evaluate.py's template; its loop never passes ``input``)."""
    if input:
        return EVAL_WITH_INPUT.format(instruction=instruction, input=input)
    return EVAL_NO_INPUT.format(instruction=instruction)


def response_text(decoded: str) -> str:
    """The text after the first ``### Response:`` of a decoded output (prompt included), stripped; the whole text
    stripped when there is no marker."""
    parts = decoded.split(RESPONSE_MARKER)
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


def extract_answer(task: str, text: str) -> str:
    """The first match of ``task``'s answer pattern in ``text`` (stripped), or ``""`` when none matches."""
    found = ANSWER_PATTERNS[check_task(task)].findall(text.strip())
    return found[0] if found else ""


def check_task(task: str) -> str:
    if task not in ANSWER_PATTERNS:
        raise DatasetError(f"unknown commonsense task {task!r}; expected some of {', '.join(TASKS)}")
    return task


TRAIN_FIELDS = ("instruction", "input", "output")
TEST_FIELDS = ("instruction", "answer")


def read_records(path: Path, fields: Sequence[str]) -> list[dict]:
    """The records of a JSON list file, each checked to hold ``fields`` as strings (one line naming the first bad
    one)."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"commonsense file not found: {path} (DATASET.md, 'Commonsense reasoning')") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    if not isinstance(records, list) or not records:
        raise DatasetError(f"{path} must hold a non-empty JSON list of records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: record {index} is not a JSON object")
        for field in fields:
            if field not in record:
                raise DatasetError(f"{path}: record {index} has no {field!r} field (records hold "
                                   "instruction, input, output, answer)")
            if not isinstance(record[field], str):
                raise DatasetError(f"{path}: record {index} field {field!r} is not a string")
    return records


@dataclass
class CommonsenseData:
    """The training records and each evaluated task's test records (the first ``eval_limit`` of each)."""

    train: list[dict]
    tests: dict[str, list[dict]]
    eval_limit: Optional[int] = None


def read_commonsense(root, tasks: Sequence[str] = TASKS, eval_limit: Optional[int] = None,
                     train_file: str = TRAIN_FILE) -> CommonsenseData:
    """Every file a run reads, checked now: a bad file is a one-line error before any work."""
    root = Path(root)
    tasks = [check_task(task) for task in tasks]
    if not tasks:
        raise DatasetError("no commonsense task to evaluate")
    if eval_limit is not None and eval_limit < 1:
        raise DatasetError(f"eval_limit must be >= 1, got {eval_limit}")
    train = read_records(root / train_file, TRAIN_FIELDS)
    tests = {task: read_records(root / TEST_FOLDER / task / "test.json", TEST_FIELDS)[:eval_limit] for task in tasks}
    return CommonsenseData(train, tests, eval_limit)


def validation_split(records: list, size: int, seed: int = 42) -> tuple[list, list]:
    """``(train, validation)``: ``size`` records held out as LLM-Adapters holds them out (the ``train_test_split`` of
    Hugging Face ``datasets`` with ``seed``: a permutation from ``numpy.random.default_rng(seed)``, its first
    ``size`` indices for validation, the rest, in that order, for training)."""
    import numpy as np

    if size <= 0:
        return list(records), []
    if size >= len(records):
        raise DatasetError(f"val_set_size {size} leaves no training record of {len(records)}")
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order[size:]], [records[i] for i in order[:size]]
