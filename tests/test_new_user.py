"""What a new user hit on a fresh clone (issue 26): each case failed before its fix.

Runs go through the command line (``lora_zoo.cli.run``, what ``main.py`` calls) on the tiny-vit backbone
(random init), the small synthetic DTD of ``conftest.data_root`` and two iterations. A full disk is a
writer that raises what a full disk raises where the bytes are written (``OSError`` ENOSPC from Python's
``open``, safetensors' ``SafetensorError`` "os error 28"), one write site at a time.
"""
import errno
import json
import os
from pathlib import Path

import pytest
import torch

import lora_zoo as lz
from lora_zoo.checkpoint import RECORD_DIGEST, config_path
from lora_zoo.cli import run
from lora_zoo.files import sha256_json
from lora_zoo.models import build_clip

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "tiny-vit", "--shots", "1", "--batch_size", "4", "--num_workers", "0", "--eval_batch_size", "16",
        "--n_iters", "2", "--quiet"]
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *args) -> tuple[int, str]:
    """``main.py ARGS`` in this process: (exit code, what it printed on stderr)."""
    capsys.readouterr()
    code = run([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err[:-1]


def run_folder(out, dataset="dtd", leaf="lora") -> Path:
    return Path(out, "tiny-vit", dataset, "1shots", "seed1", leaf)


def result(folder: Path, name="result.json") -> dict:
    return json.loads((folder / name).read_text())


# ---- 2: the whole adapter record is under the checksum -------------------------------------------------------------
def test_eval_only_refuses_an_edited_adapters_json_in_one_line(data_root, tmp_path, capsys):
    args = ["--method", "lora", *TINY, "--root_path", data_root, "--output_dir", tmp_path / "out"]
    assert cli(capsys, *args)[0] == 0
    folder = run_folder(tmp_path / "out")
    config, saved = folder / "adapters.json", (folder / "adapters.json").read_text()
    assert saved.count('"alpha": 1.0') == 1
    config.write_text(saved.replace('"alpha": 1.0', '"alpha": 9.0'))  # the hand edit that moved top-1 by 9 points
    code, err = cli(capsys, *args, "--eval_only")
    assert code == 1 and one_line(err) == (
        f"error: adapter config {config} does not match the record_sha256 recorded in it (edited or damaged since it "
        "was saved; it rebuilds the layers, so every score would change); restore it or train the run again")
    assert not (folder / "eval.json").exists() and not (folder / "eval.log").exists()
    edited = json.loads(config.read_text())
    del edited[RECORD_DIGEST]  # the digest removed too: result.json recorded it
    config.write_text(json.dumps(edited))
    code, err = cli(capsys, *args, "--eval_only")
    assert code == 1 and one_line(err) == (f"error: {config} is not the adapter file {folder / 'result.json'} "
                                           "recorded (record_sha256 differs): retrain the run (--overwrite)")
    assert not (folder / "eval.json").exists()
    config.write_text(saved)
    assert cli(capsys, *args, "--eval_only")[0] == 0
    assert result(folder, "eval.json")["accuracy"] == result(folder)["accuracy"]
    assert result(folder)["adapters_record_sha256"] == json.loads(saved)[RECORD_DIGEST]


def test_the_record_digest_covers_every_key_and_files_saved_before_it_load(tmp_path):
    model = build_clip("tiny-vit", seed=0).model
    torch.manual_seed(0)
    lz.apply_adapters(model, "lora", rank=2)
    path = lz.save_adapters(model, tmp_path / "adapters.safetensors")
    saved = json.loads(config_path(path).read_text())
    assert saved[RECORD_DIGEST] == sha256_json(saved, RECORD_DIGEST) and "sha256" in saved
    for key, value in (("config", {**saved["config"], "alpha": 9.0}), ("targets", ["q", "k"]),
                       ("sha256", "0" * 64), ("layer_overrides", {"visual.transformer.resblocks.0.attn.q": {}})):
        config_path(path).write_text(json.dumps({**saved, key: value}, indent=2))
        with pytest.raises(ValueError, match=r"^adapter config .* does not match the record_sha256 recorded in it"):
            lz.load_adapters(build_clip("tiny-vit", seed=0).model, path)
    before = {k: v for k, v in saved.items() if k not in ("sha256", RECORD_DIGEST)}  # as written before checksums
    config_path(path).write_text(json.dumps(before))
    assert lz.load_adapters(build_clip("tiny-vit", seed=0).model, path)["config"]["alpha"] == 1.0
    config_path(path).write_text(json.dumps({k: v for k, v in saved.items() if k != RECORD_DIGEST}))  # 1e4b56c's
    assert lz.load_adapters(build_clip("tiny-vit", seed=0).model, path)["sha256"] == saved["sha256"]
