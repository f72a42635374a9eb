"""LLM-Adapters' commonsense data (``datasets/commonsense.py``): the prompt templates byte for byte, the answer
extraction against their rules, the reader's one-line errors and the validation split.

The template bytes below are those of LLM-Adapters' ``finetune.py`` ``generate_prompt`` and
``commonsense_evaluate.py`` ``generate_prompt``, whose f-strings keep their source indentation (16 spaces), written
out here as the strings those functions return. The extraction rules are theirs (``extract_answer``): strip, the
task's alternation pattern, case-sensitive, the left-most match, "" when nothing matches; the text searched is what
follows the first "### Response:" of the decoded output, stripped.
"""
import json
import random
import re

import numpy as np
import pytest

from datasets import DatasetError
from datasets.commonsense import (EVAL_NO_INPUT, EVAL_WITH_INPUT, TASKS, TRAIN_NO_INPUT, TRAIN_WITH_INPUT,
                                  eval_prompt, extract_answer, read_commonsense, response_text, train_prompt,
                                  validation_split)

PAD = " " * 16


def test_the_templates_are_llm_adapters_bytes():
    assert TRAIN_NO_INPUT == ("Below is an instruction that describes a task. Write a response that appropriately "
                              "completes the request.  \n\n" + PAD + "### Instruction:\n" + PAD + "{instruction}\n"
                              + PAD + "\n" + PAD + "### Response:\n" + PAD + "{output}")
    assert TRAIN_WITH_INPUT == ("Below is an instruction that describes a task, paired with an input that provides "
                                "further context. Write a response that appropriately completes the request. \n\n"
                                + PAD + "### Instruction:\n" + PAD + "{instruction}\n" + PAD + "\n" + PAD
                                + "### Input:\n" + PAD + "{input}\n" + PAD + "\n" + PAD + "### Response:\n" + PAD
                                + "{output}")
    assert EVAL_NO_INPUT == ("Below is an instruction that describes a task. Write a response that appropriately "
                             "completes the request. \n\n" + PAD + "### Instruction:\n" + PAD + "{instruction}\n\n"
                             + PAD + "### Response:\n" + PAD)
    assert EVAL_WITH_INPUT == ("Below is an instruction that describes a task, paired with an input that provides "
                               "further context. Write a response that appropriately completes the request.\n\n"
                               + PAD + "### Instruction:\n" + PAD + "{instruction}\n\n" + PAD + "### Input:\n" + PAD
                               + "{input}\n\n" + PAD + "### Response:\n" + PAD)
    record = {"instruction": "Is ice cold?", "input": "", "output": "the correct answer is true", "answer": "true"}
    assert train_prompt(record).endswith("### Response:\n" + PAD + "the correct answer is true")
    assert "### Input:" in train_prompt({**record, "input": "context"})
    assert eval_prompt("Is ice cold?") == EVAL_NO_INPUT.format(instruction="Is ice cold?")
    assert not train_prompt(record).startswith(eval_prompt("Is ice cold?"))  # the eval prompt is not a prefix


# ---- answer extraction: their rules, re-implemented here, on a table of generated outputs ---------------------------
RULES = {"boolq": ["true", "false"], "piqa": ["solution1", "solution2"],
         "social_i_qa": [f"answer{i}" for i in range(1, 6)], "ARC-Challenge": [f"answer{i}" for i in range(1, 6)],
         "ARC-Easy": [f"answer{i}" for i in range(1, 6)], "openbookqa": [f"answer{i}" for i in range(1, 6)],
         "hellaswag": [f"ending{i}" for i in range(1, 5)], "winogrande": ["option1", "option2"]}


def their_answer(task: str, decoded: str) -> str:
    """LLM-Adapters' extraction: the text after the first marker, stripped; the left-most alternative found."""
    text = decoded.split("### Response:")[1].strip() if "### Response:" in decoded else decoded.strip()
    hits = [(text.find(word), word) for word in RULES[task] if word in text]
    return min(hits)[1] if hits else ""


WORDS = ["the", "correct", "answer", "is", "true", "false", "True", "solution1", "solution2", "Solution1", "answer1",
         "answer2", "answer3", "answer4", "answer5", "answer6", "ending1", "ending4", "ending5", "option1", "option2",
         "Option2", "untrue", "answer10", "###", "Response:", "\n", PAD, ".", "ending"]


def generated_outputs(count=400, seed=0):
    rng = random.Random(seed)
    for _ in range(count):
        task = rng.choice(TASKS)
        prompt = eval_prompt(f"question about {task}? Answer format: " + "/".join(RULES[task]))
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8)))
        yield task, prompt + reply


@pytest.mark.parametrize("task, reply, expected", [
    ("boolq", "the correct answer is true", "true"), ("boolq", "the correct answer is True", ""),
    ("boolq", "untrue, false", "true"), ("boolq", "", ""), ("piqa", "solution2 then solution1", "solution2"),
    ("piqa", "Solution1", ""), ("social_i_qa", "the correct answer is answer5", "answer5"),
    ("ARC-Challenge", "answer10", "answer1"), ("hellaswag", "ending5 or ending3", "ending3"),
    ("winogrande", "Option1 option2", "option2"), ("openbookqa", "answer4 ### Response: answer2", "answer4"),
])
def test_extraction_takes_the_first_match_after_the_first_response_marker(task, reply, expected):
    decoded = eval_prompt("Answer format: true/false solution1 answer1 ending1 option1") + reply
    assert extract_answer(task, response_text(decoded)) == expected == their_answer(task, decoded)


def test_extraction_matches_their_rules_on_a_table_of_generated_outputs():
    table = list(generated_outputs())
    found = [(task, extract_answer(task, response_text(decoded)), their_answer(task, decoded))
             for task, decoded in table]
    assert all(ours == theirs for _, ours, theirs in found)
    assert 40 < sum(ours == "" for _, ours, _ in found) < 300 and len({ours for _, ours, _ in found}) >= 12
    with pytest.raises(DatasetError, match="unknown commonsense task 'mmlu'; expected some of boolq, piqa"):
        extract_answer("mmlu", "answer1")


# ---- reading the layout -------------------------------------------------------------------------------------------
def record(answer="true", **changes):
    return {"instruction": "Is it?", "input": "", "output": f"the correct answer is {answer}", "answer": answer,
            **changes}


def write_layout(root, train, tests):
    root.mkdir(parents=True, exist_ok=True)
    (root / "commonsense_170k.json").write_text(json.dumps(train))
    for task, records in tests.items():
        (root / "dataset" / task).mkdir(parents=True)
        (root / "dataset" / task / "test.json").write_text(json.dumps(records))


def test_reading_the_layout_limits_each_task(tmp_path):
    write_layout(tmp_path, [record()] * 5, {"boolq": [record()] * 7, "piqa": [record("solution1")] * 3,
                                           "gsm8k": [{"other": 1}]})  # another folder of their dataset/: left alone
    data = read_commonsense(tmp_path, ["boolq", "piqa"], eval_limit=4)
    assert len(data.train) == 5 and {t: len(r) for t, r in data.tests.items()} == {"boolq": 4, "piqa": 3}
    assert data.eval_limit == 4


@pytest.mark.parametrize("train, tests, tasks, message", [
    ([record(), {"instruction": "x", "input": ""}], {"boolq": [record()]}, ["boolq"],
     r"commonsense_170k.json: record 1 has no 'output' field"),
    ([record()], {"boolq": [record(), {"instruction": "x", "input": "", "output": "y"}]}, ["boolq"],
     r"boolq/test.json: record 1 has no 'answer' field"),
    ([record(instruction=3)], {"boolq": [record()]}, ["boolq"], r"record 0 field 'instruction' is not a string"),
    ([record()], {"boolq": [record()]}, ["boolq", "mmlu"], r"unknown commonsense task 'mmlu'"),
    ([record()], {"boolq": [record()]}, ["piqa"], r"commonsense file not found: .*piqa/test.json"),
    ({"a": 1}, {"boolq": [record()]}, ["boolq"], r"must hold a non-empty JSON list"),
])
def test_bad_files_are_one_line(tmp_path, train, tests, tasks, message):
    write_layout(tmp_path, train, tests)
    with pytest.raises(DatasetError, match=message) as error:
        read_commonsense(tmp_path, tasks)
    assert "\n" not in str(error.value)


def test_the_validation_split_is_a_permutation_from_numpy_s_default_rng():
    records = list(range(1000))
    train, validation = validation_split(records, 120, seed=42)
    order = np.random.default_rng(42).permutation(1000)
    assert validation == list(order[:120]) and train == list(order[120:])
    assert sorted(train + validation) == records and validation_split(records, 0) == (records, [])
    with pytest.raises(DatasetError, match="val_set_size 1000 leaves no training record"):
        validation_split(records, 1000)


def test_the_pattern_of_each_task_is_an_alternation_of_its_labels():
    from datasets.commonsense import ANSWER_PATTERNS
    for task, labels in RULES.items():
        assert ANSWER_PATTERNS[task].pattern == "|".join(labels)
        assert all(re.fullmatch(ANSWER_PATTERNS[task], label) for label in labels)
