"""Bad input refused before any work: ranks a layer cannot hold, config values named with the file they came
from, and tables that never rank a run whose accuracy is not a number.
"""
import csv
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_zoo as lz
from lora_zoo.config import load_config
from lora_zoo.runs import method_fields
from method_cases import CASES
from lora_zoo.inject import check_fits
from lora_zoo.models import build_clip
from lora_zoo.results import load_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_table  # noqa: E402

RANKED = [m for m in lz.list_methods() if CASES[m]["rank"] is not None]  # tests/method_cases.py: the rank option


@pytest.mark.parametrize("method", RANKED)
def test_a_rank_above_the_layer_width_is_refused_from_the_shapes_alone(method):
    model = build_clip("tiny-vit", seed=0).model  # 64-wide q/k/v in both towers
    attention = type(model.visual.transformer.resblocks[0].attn)
    # VeRA's r is the width of its shared random pair, not bounded by a layer (the paper trains r = 1024 on
    # 768-wide RoBERTa-base; the README's mini table r = 256 on 64-wide layers)
    unbounded = CASES[method]["rank"] == "unbounded"
    option = "rank" if unbounded else CASES[method]["rank"]
    assert option in lz.get_method(method).config_class.__dataclass_fields__, f"{method}'s rank option is {option}?"
    if unbounded:
        check_fits(model, method, **{option: 1000})
    else:
        with pytest.raises(ValueError) as err:
            check_fits(model, method, **{option: 1000})
        assert re.fullmatch(rf"\w+ {option} 1000 exceeds min\(d_in, d_out\) = 64 of a 64×64 \(d_out×d_in\) layer "
                            r"\(visual\.transformer\.resblocks\.0\.attn\.q\)", str(err.value)), str(err.value)
        check_fits(model, method, **{option: 64})  # the largest that fits
        with pytest.raises(ValueError, match=f"{option} 1000 exceeds"):  # apply_adapters checks before any change
            lz.apply_adapters(model, method, **{option: 1000})
    assert type(model.visual.transformer.resblocks[0].attn) is attention and not lz.adapter_modules(model)


def test_check_fits_reads_each_layer_and_every_constructor_checks_its_own():
    layers = {"wide": nn.Linear(50, 40), "narrow": (20, 10)}  # (d_out, d_in) as a tuple, or a linear
    check_fits(layers, "lora", rank=10)
    with pytest.raises(ValueError, match=r"^lora rank 11 exceeds min\(d_in, d_out\) = 10 of a 20×10 \(d_out×d_in\) "
                                         r"layer \(narrow\)$"):
        check_fits(layers, "lora", rank=11)
    with pytest.raises(ValueError, match=r"nora inner_rank 9 exceeds outer_rank 8 of a 40×50"):
        check_fits(layers, "nora", outer_rank=0.2, inner_rank=9)  # r_out = floor(0.2 · 40) = 8
    with pytest.raises(ValueError, match=r"vera shared matrices \(40×32\) are smaller than a 40×50"):
        check_fits(layers, "vera", max_in_features=32)
    check_fits(layers, "vera", rank=1000)
    for method, options in (("lora", dict(rank=11)), ("dora", dict(rank=11)), ("dylora", dict(rank=11)),
                            ("aira", dict(rank=11, init="lora", act_scale=False, rank_alloc=False))):
        with pytest.raises(ValueError, match="rank 11 exceeds min"):
            lz.wrap_linear(nn.Linear(10, 20), method, **options)
    assert lz.wrap_linear(nn.Linear(10, 20), "lora", rank=10).lora_A.shape == (10, 10)


def test_aira_uniform_rank_is_checked_before_its_planned_ranks_are_clipped():
    model = build_clip("tiny-vit", seed=0).model
    with pytest.raises(ValueError, match=r"aira rank 100 exceeds min\(d_in, d_out\) = 64"):
        check_fits(model, "aira", rank=100)
    check_fits(model, "aira", rank=8, rank_max=1000)  # per-layer ranks are clipped to the layer by the plan


def test_check_fits_covers_only_the_chosen_towers_targets_and_blocks():
    model = build_clip("tiny-clip", seed=0).model  # vision 128 wide, text 64 wide
    check_fits(model, "lora", rank=100, encoders=("vision",))
    with pytest.raises(ValueError, match=r"= 64 of a 64×64 .*\(transformer\.resblocks\.0\.attn\.q\)"):
        check_fits(model, "lora", rank=100)
    with pytest.raises(ValueError, match=r"\(transformer\.resblocks\.3\.mlp\.c_proj\)"):
        check_fits(model, "lora", rank=100, encoders=("text",), targets=("fc2",), layers=(-1,))
    with pytest.raises(ValueError, match="layer index 7 out of range for the vision tower with 4 blocks"):
        check_fits(model, "lora", rank=2, layers=(7,))


# ---- config files named in their errors -------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("lr: abc\n", "lr must be a number or null, got 'abc' (lr set in {path})"),
    ("method: lora\nmethod_options: {rank: 2.5}\n", "rank must be an integer, got 2.5 (method_options.rank set in "
                                                    "{path})"),
    ("shots: 0\n", "shots must be >= 1, got 0 (shots set in {path})"),
])
def test_a_bad_value_in_a_config_file_names_the_file(content, message, tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("n_iters: 3\n")
    bad.write_text(content)
    with pytest.raises(ValueError) as err:
        load_config([good, bad], {"method": "lora"})
    assert str(err.value) == message.format(path=bad)
    with pytest.raises(ValueError) as err:  # the same value from the command line: no file to name
        load_config([good], {"method": "lora", "lr": "abc"})
    assert str(err.value) == "lr must be a number or null, got 'abc'"


def test_main_names_the_config_file_of_a_bad_value(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import main

    config = tmp_path / "bad.yaml"
    config.write_text("method_options: {dropout: 1.5}\n")
    assert main.run(["--method", "lora", "--config", str(config), "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: dropout must be in [0, 1), got 1.5 (method_options.dropout set in {config})\n"
    assert not (tmp_path / "out").exists()


# ---- tables never rank a non-finite run ------------------------------------------------------------------------
def write_run(root, lr, accuracy, seed=1):
    folder = root / "tiny-vit" / "dtd" / "4shots" / f"seed{seed}" / f"lora-lr={lr}"
    folder.mkdir(parents=True)
    result = {"backbone": "tiny-vit", "method": "lora", "dataset": "dtd", "shots": 4, "seed": seed,
              "accuracy": accuracy, "config": {"method": "lora", "run_name": f"lr={lr}", "train": {"lr": lr}},
              "method_config": {"rank": 2}, **method_fields(lz.get_method("lora"))}
    (folder / "result.json").write_text(json.dumps(result))  # NaN is written as NaN, as json.dumps does
    return folder / "result.json"


def test_load_results_skips_a_non_finite_accuracy_with_a_warning(tmp_path, capsys):
    finite = write_run(tmp_path, 0.001, 61.5)
    diverged = write_run(tmp_path, 1000000.0, math.nan)
    infinite = write_run(tmp_path, 10.0, math.inf)
    assert "NaN" in diverged.read_text()
    runs, skipped = load_results(tmp_path)
    assert [(r.accuracy, dict(r.setting)["lr"]) for r in runs] == [(61.5, 0.001)] and skipped == 2
    err = capsys.readouterr().err
    assert f"warning: skipping {diverged}: its accuracy is nan (not a finite number)" in err
    assert f"warning: skipping {infinite}: its accuracy is inf" in err and str(finite) not in err


def test_best_over_lr_picks_the_finite_run(tmp_path, capsys):
    for seed, (low, high) in enumerate(((61.0, math.nan), (63.0, math.nan)), start=1):
        write_run(tmp_path, 0.001, low, seed)
        write_run(tmp_path, 1000000.0, high, seed)
    assert make_table.main([str(tmp_path), "--format", "csv", "--best_over", "lr"]) == 0
    out = capsys.readouterr().out
    rows = {row[0]: row[1:] for row in csv.reader(out.split("\n\n", 1)[1].splitlines()) if row}
    assert rows == {"Method": ["DTD 4-shot", "Average 4-shot"], "CLIP-LoRA (ours, lora): lr=0.001": ["62.00 ± 1.41", "62.00 ± 1.41"],
                    "best lr per cell, selected on the test split: CLIP-LoRA (ours, lora)": [
                        "62.00 ± 1.41 (lr=0.001)", "62.00 ± 1.41"]}
    assert "nan" not in out.lower() and "1000000" not in out and "2 result.json skipped, unreadable or not a finite accuracy" in out
