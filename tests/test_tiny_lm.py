"""tiny-lm (``lora_zoo/weights/tiny-lm``) and the generated commonsense world it is pretrained on.

The shipped files match their recorded SHA-256 (a changed one is a one-line error); the tokenizer round-trips the
protocol's prompts exactly through transformers' API, adds BOS, has no pad token of its own and pads on the left
with LLM-Adapters' id 0; a left-padded batch generates with 4 beams what each prompt generates alone; the generated
tasks are in LLM-Adapters' instruction formats and fields, and the pretraining text never shows their answer labels.
"""
import re
import shutil

import pytest
import torch

from datasets.commonsense import ANSWER_PATTERNS, TASKS, eval_prompt, train_prompt
from datasets.commonsense_world import pretraining_text, task_records
from lora_zoo import lm_models
from lora_zoo.lm_models import TINY_LM_CHECKSUMS, TINY_LM_DIR, check_tiny_lm, load_causal_lm

pytest.importorskip("transformers")

#: LLM-Adapters' instruction formats of each task (notes: the records of their test.json files)
FORMATS = {
    "boolq": r"Please answer the following question with true or false, question: [^\n]+\?\n\nAnswer format: "
             r"true/false",
    "piqa": r"Please choose the correct solution to the question: [^\n]+\n\nSolution1: [^\n]+\n\nSolution2: [^\n]+"
            r"\n\nAnswer format: solution1/solution2",
    "social_i_qa": r"Please choose the correct answer to the question: [^\n]+\n\nAnswer1: .+ Answer2: .+ Answer3: "
                   r"[^\n]+\n\nAnswer format: answer1/answer2/answer3",
    "hellaswag": r"Please choose the correct ending to complete the given sentence: [^\n:]+: [^\n]+\n\nEnding1: .+ "
                 r"Ending2: .+ Ending3: .+ Ending4: [^\n]+\n\nAnswer format: ending1/ending2/ending3/ending4",
    "winogrande": r"Please choose the correct answer to fill in the blank to complete the given sentence: [^\n]*_"
                  r"[^\n]*\n\nOption1: .+ Option2: [^\n]+ Answer format: option1/option2",
    "ARC-Easy": r"Please choose the correct answer to the question: [^\n]+\n\nAnswer1: .+ Answer4: [^\n]+\n\nAnswer "
                r"format: answer1/answer2/answer3/answer4",
}
FORMATS["ARC-Challenge"] = FORMATS["openbookqa"] = FORMATS["ARC-Easy"]


def test_the_shipped_files_match_their_checksums_and_a_changed_one_is_one_line(tmp_path, monkeypatch):
    check_tiny_lm()
    assert {line.split()[1] for line in TINY_LM_CHECKSUMS.read_text().splitlines()} == {"model.safetensors",
                                                                                        "tokenizer.json"}
    assert (TINY_LM_DIR / "model.safetensors").stat().st_size < 3 * 2 ** 20  # a few MB
    copy = tmp_path / "tiny-lm"
    shutil.copytree(TINY_LM_DIR, copy)
    data = bytearray((copy / "tokenizer.json").read_bytes())
    data[100] ^= 1
    (copy / "tokenizer.json").write_bytes(bytes(data))
    monkeypatch.setattr(lm_models, "TINY_LM_DIR", copy)
    with pytest.raises(ValueError, match=r"^checksum mismatch: .*tokenizer.json does not have the SHA-256"):
        load_causal_lm("tiny-lm", torch.device("cpu"))


def test_the_tokenizer_round_trips_pads_left_with_id_0_and_beams_see_through_padding(one_thread):
    model, tokenizer = load_causal_lm("tiny-lm", torch.device("cpu"))
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tokenizer.pad_token_id == 0 and tokenizer.padding_side == "left" and tokenizer.eos_token_id == 2
    for task in TASKS:
        record = task_records(task, 1, seed=7)[0]
        for text in (train_prompt(record), eval_prompt(record["instruction"])):
            ids = tokenizer(text)["input_ids"]
            assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == text
    prompts = [eval_prompt(r["instruction"]) for r in task_records("boolq", 2, seed=3)] + [eval_prompt("What?")]

    def generate(texts):
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, num_beams=4, max_new_tokens=12, do_sample=False, pad_token_id=0)
        return tokenizer.batch_decode(out, skip_special_tokens=True)
    together = generate(prompts)
    assert together == [generate([p])[0] for p in prompts] and all(t.startswith(p) for t, p in zip(together, prompts))


@pytest.mark.parametrize("task", TASKS)
def test_the_generated_tasks_are_in_llm_adapters_formats(task):
    records = task_records(task, 60, seed=0)
    assert task_records(task, 60, seed=0) == records and task_records(task, 60, seed=1) != records
    for record in records:
        assert set(record) == {"instruction", "input", "output", "answer"} and record["input"] == ""
        assert record["output"] == "the correct answer is " + record["answer"]
        assert re.fullmatch(FORMATS[task], record["instruction"]), record["instruction"]
        assert ANSWER_PATTERNS[task].fullmatch(record["answer"])
    answers = [r["answer"] for r in records]
    assert max(answers.count(a) for a in set(answers)) < 0.75 * len(answers) and len(set(answers)) >= 2


def test_the_pretraining_text_states_facts_and_never_shows_a_task_label():
    text = "\n".join(pretraining_text(400, seed=0))
    assert "a frog lives in the pond." in text or "the frog makes its home in the pond." in text
    assert "### Response:" in text and "the correct answer is" in text
    assert not re.search(r"answer[1-5]|solution[12]|option[12]|ending[1-4]|\btrue\b|\bfalse\b", text)
