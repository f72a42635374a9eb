"""Run options end to end through the command line: where augmentation runs (--augment_on), the precision, and a
finished run exported as a peft adapter (--export_peft) that stock transformers + peft load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_zoo import files as lz_files
from lora_zoo.cli import run

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--method", "lora", "--backbone", "tiny-vit", "--shots", "2", "--n_iters", "2", "--batch_size", "8",
         "--num_workers", "0", "--eval_batch_size", "16", "--quiet", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def result_of(out: Path, leaf: str = "lora") -> dict:
    return json.loads((out / "tiny-vit" / "dtd" / "2shots" / "seed1" / leaf / "result.json").read_text())


def test_augmentation_on_the_device_trains_and_is_part_of_the_setting(data_root, tmp_path, capsys):
    base = SMALL + ["--root_path", str(data_root), "--output_dir", str(tmp_path)]
    assert run(base + ["--augment_on", "device", "--precision", "bf16"]) == 0
    result = result_of(tmp_path)
    assert result["config"]["augment_on"] == "device" and result["precision"] == "bf16"
    assert 0 <= result["accuracy"] <= 100 and result["iterations"] == 4
    capsys.readouterr()
    assert run(base + ["--augment_on", "cpu", "--precision", "bf16"]) == 1  # another setting, the same folder
    assert "augment_on: device there, cpu now" in capsys.readouterr().err
    assert run(base + ["--augment_on", "cpu", "--precision", "bf16", "--run_name", "cpu"]) == 0
    assert result_of(tmp_path, "lora-cpu")["config"]["augment_on"] == "cpu"


def test_augment_on_defaults_to_the_device_only_on_cuda():
    from lora_zoo.config import load_config

    assert load_config([], {"device": "cpu"}).augment_on == "cpu"
    assert load_config([], {"device": "cuda:1"}).augment_on == "device"
    assert load_config([], {"device": "cuda:1", "augment_on": "cpu"}).augment_on == "cpu"


def test_a_finished_run_exports_a_peft_adapter_stock_transformers_loads(data_root, tmp_path, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    base = SMALL + ["--root_path", str(data_root), "--output_dir", str(tmp_path / "out")]
    assert run(base) == 0
    trained = (tmp_path / "out" / "tiny-vit" / "dtd" / "2shots" / "seed1" / "lora" / "result.json").stat().st_mtime_ns
    assert run(base + ["--export_peft", str(tmp_path / "peft")]) == 0  # no training again: the saved adapters
    assert result_of(tmp_path / "out")["iterations"] == 4 and (
        tmp_path / "out" / "tiny-vit" / "dtd" / "2shots" / "seed1" / "lora" / "result.json").stat().st_mtime_ns == trained
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (tmp_path / "peft" / "base_model" / "config.json").is_file()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "peft").rglob("*") if p.is_file()}
    assert set(modes) == {"adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors"}
    assert set(modes.values()) == {0o666 & ~lz_files._UMASK}, modes  # transformers wrote model.safetensors 0600
    # ours: the saved adapters on the tiny backbone, merged, as evaluated
    import lora_zoo as lz
    from lora_zoo.models import build_clip

    model = build_clip("tiny-vit", seed=0).model
    lz.load_adapters(model, tmp_path / "out" / "tiny-vit" / "dtd" / "2shots" / "seed1" / "lora" / "adapters.safetensors")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.encode_image(images)
    torch.save(images, tmp_path / "images.pt")
    script = (f"import torch; from transformers import CLIPModel; from peft import PeftModel\n"
              f"base = CLIPModel.from_pretrained({str(tmp_path / 'peft' / 'base_model')!r})\n"
              f"model = PeftModel.from_pretrained(base, {str(tmp_path / 'peft')!r}).eval()\n"
              f"with torch.no_grad():\n"
              f"    out = model.get_image_features(pixel_values=torch.load({str(tmp_path / 'images.pt')!r}))\n"
              f"torch.save(getattr(out, 'pooler_output', out), {str(tmp_path / 'theirs.pt')!r})\n")
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "theirs.pt"), expected, atol=1e-4, rtol=1e-4)


def test_export_peft_of_a_batch_dependent_method_is_refused_before_work(data_root, tmp_path, capsys):
    code = run(["--method", "aira", "--config", str(REPO / "configs" / "aira_authors.yaml"), "--backbone", "tiny-vit",
                "--root_path", str(data_root), "--output_dir", str(tmp_path / "out"), "--export_peft",
                str(tmp_path / "peft"), "--quiet"])
    assert code == 1 and "cannot export a peft adapter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "peft").exists()
