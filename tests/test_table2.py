"""The NoRA paper's Table 2 whole: its rows as data (``lora_zoo/paper_table.py``), planned by ``sweep.sh --table 2``
and laid out by ``make_table.py --paper table2`` (ours beside each reported value), on hand-written result.json
records and on real tiny runs."""
import csv
import dataclasses
import json
from io import StringIO

import pytest

from lora_zoo import paper_table
from lora_zoo.catalog import list_methods
from lora_zoo.paper_table import TABLE2, PaperRow
from scripts import make_table, sweep

RUN_ARGS = ["--n_iters", "1", "--batch_size", "4", "--num_workers", "0", "--eval_batch_size", "16"]
DISPLAY = {"lora": "CLIP-LoRA", "clip_svd": "CLIP-SVD", "tip_adapter": "Tip-Adapter-F", "twostage": "2SFS"}


def record(root, method, dataset, shots, seed, accuracy, backbone="ViT-B-16", run_name=None, **extra):
    folder = root / backbone / dataset / f"{shots}shots" / f"seed{seed}" / (method + (f"-{run_name}" if run_name else ""))
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({
        "backbone": backbone, "method": method, "dataset": dataset, "shots": shots, "seed": seed, "accuracy": accuracy,
        "display_name": DISPLAY.get(method), "zero_shot_accuracy": {"dtd": 44.0}.get(dataset, 80.0),
        "config": {"run_name": run_name}, **extra}))


def paper_csv(capsys, *args):
    code = make_table.main([str(a) for a in args] + ["--paper", "table2", "--format", "csv"])
    out, err = capsys.readouterr()
    assert code == 0, err
    blocks = out.strip().split("\n\n")
    rows = [row for row in csv.reader(StringIO(blocks[1])) if row]
    return blocks[0], rows[0], {row[0]: row[1:] for row in rows[1:]}


def test_rows_in_the_papers_order_each_cell_ours_beside_the_reported_value(capsys, tmp_path):
    root = tmp_path / "results"
    for seed, (food, pets, dtd) in zip((1, 2, 3), ((80, 90, 60), (82, 91, 62), (84, 92, 64))):
        for dataset, accuracy in (("food101", food), ("oxford_pets", pets), ("dtd", dtd)):
            record(root, "lora", dataset, 4, seed, float(accuracy))
    record(root, "clip_svd", "dtd", 16, 1, 70.0)
    record(root, "clip_svd", "dtd", 16, 2, 72.0)
    record(root, "tip_adapter", "dtd", 16, 1, 71.0, selected_on="test")  # the authors' test-selected variant
    record(root, "lora", "dtd", 4, 1, 10.0, run_name="other")  # another setting: not the row's runs
    record(root, "lora", "dtd", 1, 1, 10.0)  # shots the table does not have
    record(root, "lora", "dtd", 4, 1, 33.0, backbone="tiny-vit")  # another backbone: its own table
    notes, header, rows = paper_csv(capsys, root, "--backbone", "ViT-B-16")
    assert header == ["Method", "Food 4-shot", "Pets 4-shot", "DTD 4-shot", "Average 4-shot",
                      "Food 16-shot", "Pets 16-shot", "DTD 16-shot", "Average 16-shot"]
    labels = list(rows)
    assert labels[0] == "Zero-shot (no training)" and rows[labels[0]] == ["80.00", "80.00", "44.00", "68.00"] * 2
    tip = "TIP-Adapter-F (ours, tip_adapter) †"
    assert labels[1:] == [f"{row.name} (ours, {row.method})" if row.method != "tip_adapter" else tip
                          for row in TABLE2.rows if row.reported] + ["AIRA (ours, aira)", "CLIP-SVD (ours, clip_svd)",
                                                                     "2SFS (ours, twostage)", "LP++ (ours, lp_pp)"]
    # per seed averages 76.67, 78.33, 80: mean 78.33, sample std 1.67; the paper's 4-shot CLIP-LoRA row beside
    assert rows["CLIP-LoRA (ours, lora)"][:4] == ["82.00 ± 2.00 (paper 82.7)", "91.00 ± 1.00 (paper 91.0)",
                                                  "62.00 ± 2.00 (paper 63.8)", "78.33 ± 1.67 (paper 79.2)"]
    assert rows["CLIP-LoRA (ours, lora)"][4:] == ["— (paper 84.2)", "— (paper 92.4)", "— (paper 72.0)",
                                                  "— (paper 82.9)"]
    assert rows["CoOp (4) (ours, coop4)"][2] == "— (paper 58.5)"  # a row nobody has run yet
    assert rows["CLIP-SVD (ours, clip_svd)"][4:] == ["—", "—", "71.00 ± 1.41 (2/3)", "71.00 ± 1.41 (2/3) [1/3 datasets]"]
    assert rows[tip][6] == "71.00 (1/3) (paper 70.8)"
    assert "† = some of the row's runs chose a setting on the test split" in notes
    assert "paper's value in parentheses (nora_table2.csv, ViT-B-16)" in notes and "not comparable" not in notes
    notes, _, rows = paper_csv(capsys, root, "--backbone", "tiny-vit")
    assert rows["CLIP-LoRA (ours, lora)"][2] == "33.00 (1/3) (paper 63.8)" and "these results are tiny-vit" in notes


@pytest.mark.parametrize("args, message", [
    (["--paper", "table9"], "error: --paper table9: no paper table 'table9'; expected one of table2"),
    (["--paper", "table2", "--backbone", "ViT-L-14"], "error: --paper table2: no results for backbone ViT-L-14"),
])
def test_bad_paper_requests_are_one_line(capsys, tmp_path, args, message):
    record(tmp_path, "lora", "dtd", 4, 1, 50.0)
    assert make_table.main([str(tmp_path), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().startswith(message) and len(err.strip().splitlines()) == 1


def test_the_sweep_plans_the_registered_rows_and_warns_once_about_the_others(capsys, data_root, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "o"
    args = ["--root_path", str(data_root), "--output_dir", str(out), "--table", "2", "--datasets", "dtd", "--seeds", "1",
            "--dry_run"]
    assert sweep.main(args) == 0
    captured = capsys.readouterr()
    registered = [row.method for row in TABLE2.rows if row.method in list_methods()]
    skipped = [row.method for row in TABLE2.rows if row.method not in list_methods()]
    assert {"lora", "nora", "aira", "clip_svd", "twostage"} <= set(registered)
    assert [line for line in captured.err.splitlines() if "warning" in line] == (
        [f"sweep: warning: --table 2: not registered in this checkout, skipped: {', '.join(skipped)}"] if skipped else [])
    planned = [line.split() for line in captured.out.splitlines()]
    assert [(a[a.index("--method") + 1], a[a.index("--shots") + 1]) for a in planned] == \
        [(m, k) for k in ("4", "16") for m in registered]  # in the table's order and shots; datasets narrowed to dtd
    # a row whose method is not registered here: one warning line, the others planned
    monkeypatch.setattr(paper_table, "PAPER_TABLES", {"table2": dataclasses.replace(TABLE2, rows=(
        PaperRow("CoOp (4)", "no_such_method"), PaperRow("CLIP-LoRA", "lora")))})
    assert sweep.main(args) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if "warning" in line] == [
        "sweep: warning: --table 2: not registered in this checkout, skipped: no_such_method"]
    assert len(captured.out.splitlines()) == 2 and "--method lora" in captured.out
    # a row with options gets them, and its own run name
    row = PaperRow("CLIP-LoRA", "lora", options=(("rank", 4), ("targets_note", "x")), run_name="r4")
    monkeypatch.setattr(paper_table, "PAPER_TABLES", {"table2": dataclasses.replace(TABLE2, rows=(row,))})
    assert sweep.main(args[:-1] + ["--shots", "4", "--dry_run"]) == 2  # its option is checked like any other
    assert "unknown option(s) targets_note for method lora" in capsys.readouterr().err
    monkeypatch.setattr(paper_table, "PAPER_TABLES", {"table2": dataclasses.replace(TABLE2, rows=(
        dataclasses.replace(row, options=(("rank", 4),)),))})
    assert sweep.main(args[:-1] + ["--shots", "4", "--dry_run"]) == 0
    assert "--set method_options.rank=4 --run_name r4" in capsys.readouterr().out and not out.exists()


@pytest.mark.parametrize("options, message", [
    (["--methods", "lora no_such_method"], "--methods no_such_method: not a registered row of --table 2"),
    (["--protocol", "base2new"], "--table 2 plans few-shot runs; leave out --protocol base2new"),
    (["--datasets", "food101"], "--datasets food101: dataset folder not found"),
])
def test_bad_table_requests_are_one_line_and_run_nothing(capsys, data_root, tmp_path, options, message):
    assert sweep.main(["--root_path", str(data_root), "--output_dir", str(tmp_path / "o"), "--table", "2",
                       *options]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert len(err) == 1 and err[0].startswith("sweep: error: ") and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_real_tiny_runs_of_registered_rows_fill_their_cells(capsys, data_root, tmp_path):
    out = tmp_path / "runs"
    assert sweep.main(["--root_path", str(data_root), "--output_dir", str(out), "--backbone", "tiny-vit", "--table", "2",
                       "--methods", "lora clip_svd twostage", "--datasets", "dtd", "--shots", "4", "--seeds", "1",
                       "--", *RUN_ARGS]) == 0
    capsys.readouterr()
    accuracy = {m: json.loads((out / f"tiny-vit/dtd/4shots/seed1/{m}/result.json").read_text())["accuracy"]
                for m in ("lora", "clip_svd", "twostage")}
    notes, _, rows = paper_csv(capsys, out)
    assert rows["CLIP-LoRA (ours, lora)"][2] == f"{accuracy['lora']:.2f} (1/3) (paper 63.8)"
    assert rows["CLIP-SVD (ours, clip_svd)"][2] == f"{accuracy['clip_svd']:.2f} (1/3)"
    assert rows["2SFS (ours, twostage)"][2] == f"{accuracy['twostage']:.2f} (1/3)"
    assert rows["NoRA (ours, nora)"][2] == "— (paper 65.2)" and "these results are tiny-vit" in notes
