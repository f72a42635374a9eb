"""scripts/make_table.py on hand-written result.json files: statistics, layouts, keys, backbones, bad files."""
import csv
import json
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest

from lora_zoo.catalog import get_method
from lora_zoo.runs import method_fields
from scripts import make_table

REPO = Path(__file__).resolve().parents[1]


def write_result(root, method, dataset, shots, seed, accuracy, backbone="ViT-B-16", run_name=None, config=None,
                 method_config=None, zero_shot=None):
    leaf = method + (f"-{run_name}" if run_name else "")
    folder = root / backbone / dataset / f"{shots}shots" / f"seed{seed}" / leaf
    folder.mkdir(parents=True)
    result = {"backbone": backbone, "method": method, "dataset": dataset, "shots": shots, "seed": seed,
              "accuracy": accuracy, **method_fields(get_method(method))}  # the display name the tables show, as runs record it
    if config is not None:
        result["config"] = {"method": method, "run_name": run_name, "output_dir": str(root), **config}
    if method_config is not None:
        result["method_config"] = method_config
    if zero_shot is not None:
        result["zero_shot_accuracy"] = zero_shot
    (folder / "result.json").write_text(json.dumps(result))
    return folder / "result.json"


@pytest.fixture
def fixture_results(tmp_path):
    root = tmp_path / "results"
    for seed, acc in zip((1, 2, 3), (79.0, 80.0, 81.0)):
        write_result(root, "nora", "dtd", 4, seed, acc)        # 80.00 ± 1.00 (sample std)
    for seed, acc in zip((1, 2), (70.0, 72.0)):
        write_result(root, "nora", "food101", 4, seed, acc)    # 71.00 ± 1.41, 2 of 3 seeds; pets missing
    for seed, (food, pets, dtd) in zip((1, 2, 3), ((80, 90, 70), (82, 90, 71), (84, 90, 72))):
        for dataset, acc in (("food101", food), ("oxford_pets", pets), ("dtd", dtd)):
            write_result(root, "lora", dataset, 16, seed, float(acc))  # per-seed averages 80, 81, 82
    return root


def table(capsys, *args):
    code = make_table.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def csv_rows(block):
    rows = [row for row in csv.reader(StringIO(block)) if row]
    return rows[0], {row[0]: row[1:] for row in rows[1:]}


def test_mean_std_missing_runs_and_average_over_present_datasets(capsys, fixture_results):
    code, out, err = table(capsys, fixture_results, "--format", "csv", "--no_reported", "--datasets", "food101",
                           "oxford_pets", "dtd")
    assert code == 0, err
    notes, block = out.split("\n\n", 1)
    assert "seeds [1, 2, 3]" in notes and "Average: for each seed, the mean over the datasets the row has" in notes
    header, rows = csv_rows(block)
    assert header == ["Method", "Food 4-shot", "Pets 4-shot", "DTD 4-shot", "Average 4-shot",
                      "Food 16-shot", "Pets 16-shot", "DTD 16-shot", "Average 16-shot"]
    # Average 4-shot: Food and DTD (Pets has no run), seeds both have (1, 2): (70+79)/2 = 74.5, (72+80)/2 = 76
    assert rows["NoRA (ours, nora)"] == ["71.00 ± 1.41 (2/3)", "—", "80.00 ± 1.00",
                                         "75.25 ± 1.06 (2/3) [2/3 datasets]", "—", "—", "—", "—"]
    assert rows["CLIP-LoRA (ours, lora)"] == ["—", "—", "—", "—",
                                              "82.00 ± 2.00", "90.00 ± 0.00", "71.00 ± 1.00", "81.00 ± 1.00"]


def test_reported_rows_in_every_format(capsys, fixture_results, tmp_path):
    reported = tmp_path / "reported.csv"
    reported.write_text("# comment\nmethod,shots,food101,oxford_pets,dtd,average\nNoRA,4,87.1,93.1,65.2,81.8\n"
                        "NoRA,16,87.8,94.1,74.3,85.4\nCLIP-LoRA,16,84.2,92.4,72.0,82.9\n")
    code, out, err = table(capsys, fixture_results, "--reported", reported)
    assert code == 0, err
    notes, md, latex, table_csv = out.strip().split("\n\n")
    assert "paper rows: reported.csv; their Average is over Food, Pets, DTD" in notes
    assert "| NoRA (paper) | 87.1 | 93.1 | 65.2 | 81.8 | 87.8 | 94.1 | 74.3 | 85.4 |" in md
    assert "| CLIP-LoRA (paper) | — | — | — | — | 84.2 | 92.4 | 72.0 | 82.9 |" in md
    assert "| NoRA (ours, nora) | 71.00 ± 1.41 (2/3) | — | 80.00 ± 1.00 |" in md
    assert r"80.00 $\pm$ 1.00" in latex and r"\multicolumn{4}{c}{16-shot}" in latex and r"\end{tabular}" in latex
    _, rows = csv_rows(table_csv)
    assert rows["NoRA (paper)"][2] == "65.2" and rows["NoRA (ours, nora)"][2] == "80.00 ± 1.00"


def test_default_reported_file_and_plot_skip_message(capsys, fixture_results, tmp_path):
    code, out, err = table(capsys, fixture_results, "--format", "md", "--plot_dir", tmp_path / "plots")
    assert code == 0, err
    assert "| NoRA (paper) | 87.1 | 93.1 | 65.2 | 81.8 |" in out  # reported/nora_table2.csv, shipped
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in err
    else:
        for dataset in ("dtd", "food101", "oxford_pets"):
            png = (tmp_path / "plots" / f"shots_{dataset}_ViT-B-16.png").read_bytes()
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_zero_shot_row_once_per_shot_group(capsys, tmp_path):
    root = tmp_path / "results"
    for seed in (1, 2):
        for shots, acc in ((1, 50.0), (4, 60.0)):
            write_result(root, "nora", "dtd", shots, seed, acc + seed, zero_shot=44.125)
            write_result(root, "lora", "food101", shots, seed, acc, zero_shot=70.0)
            write_result(root, "lora", "eurosat", shots, seed, acc, zero_shot=30.0 + seed)  # two prompt sets
    write_result(root, "lora", "oxford_pets", 4, 1, 90.0)  # recorded no zero-shot
    code, out, err = table(capsys, root, "--format", "csv", "--no_reported", "--datasets", "dtd", "food101",
                           "eurosat", "oxford_pets")
    assert code == 0, err
    _, rows = csv_rows(out.split("\n\n", 1)[1])
    # average over the datasets with one known value: (44.125 + 70) / 2
    assert rows["Zero-shot (the pretrained model, no training)"] == ["44.12", "70.00", "varies", "—",
                                                                     "57.06 [2/4 datasets]"] * 2
    assert rows["NoRA (ours, nora)"][0] == "51.50 ± 0.71"
    runs = make_table.load_results(root)[0]
    assert make_table.zero_shot_of(runs, make_table.Layout(None, "dataset", None, [1], {1}, ["lora"]), "eurosat") == 31.0
    # what the accuracy-vs-shots plot of DTD draws: NoRA at 1 and 4 shots, mean and sample std over seeds 1, 2
    layout = make_table.Layout(None, "dataset", None, [1, 4, 16], {1, 2}, ["nora", "lora"])
    assert make_table.shot_curves(runs, layout, "dtd") == [
        ("NoRA (ours, nora)", [(1, 51.5, pytest.approx(0.7071, abs=1e-4)), (4, 61.5, pytest.approx(0.7071, abs=1e-4))])]


def test_several_backbones_one_table_each_paper_rows_only_beside_vit_b_16(capsys, fixture_results):
    write_result(fixture_results, "nora", "dtd", 4, 1, 30.0, backbone="tiny-vit")
    write_result(fixture_results, "nora", "dtd", 4, 2, 34.0, backbone="tiny-vit")
    code, out, err = table(capsys, fixture_results, "--format", "md")
    assert code == 0, err
    assert out.startswith("results of 2 backbones (ViT-B-16, tiny-vit): one table each")
    vit, tiny = out.split("Top-1 accuracy (%), ")[1:]
    assert vit.startswith("ViT-B-16;") and "| NoRA (paper) |" in vit and "| NoRA (ours, nora) |" in vit
    assert tiny.startswith("tiny-vit;") and "(paper)" not in tiny.split("\n\n", 1)[1]
    assert "paper rows (nora_table2.csv, ViT-B/16) left out: these results are tiny-vit" in tiny
    assert "| Method | DTD 4-shot | Average 4-shot |" in tiny and "| NoRA (ours, nora) | 32.00 ± 2.83 |" in tiny
    code, out, _ = table(capsys, fixture_results, "--format", "md", "--backbone", "tiny-vit")
    assert code == 0 and out.count("Top-1 accuracy") == 1 and "results of 2 backbones" not in out
    code, out, err = table(capsys, fixture_results, "--backbone", "ViT-L-14")
    assert code == 2 and out == ""
    assert err == f"error: no results for backbone ViT-L-14 under {fixture_results} (found: ViT-B-16, tiny-vit)\n"


def test_benchmark_columns_in_coop_order_with_missing_ones(capsys, fixture_results):
    code, out, err = table(capsys, fixture_results, "--format", "csv", "--no_reported", "--datasets", "benchmark",
                           "--shots", "16")
    assert code == 0, err
    header, rows = csv_rows(out.split("\n\n", 1)[1])
    assert header == ["Method", *(f"{name} 16-shot" for name in (
        "ImageNet", "Caltech", "Pets", "Cars", "Flowers", "Food", "Aircraft", "SUN", "DTD", "EuroSAT", "UCF",
        "Average"))]
    lora = rows["CLIP-LoRA (ours, lora)"]
    assert lora[2] == "90.00 ± 0.00" and lora[5] == "82.00 ± 2.00" and lora[8] == "71.00 ± 1.00"
    assert [lora[i] for i in (0, 1, 3, 4, 6, 7, 9, 10)] == ["—"] * 8
    assert lora[11] == "81.00 ± 1.00 [3/11 datasets]"  # per-seed means of the three present: 80, 81, 82
    assert rows["NoRA (ours, nora)"] == ["—"] * 12


def test_truncated_result_is_warned_and_counted(capsys, fixture_results):
    broken = write_result(fixture_results, "nora", "oxford_pets", 4, 1, 50.0)
    broken.write_text(broken.read_text()[:25])
    code, out, err = table(capsys, fixture_results, "--format", "csv", "--no_reported")
    assert code == 0
    assert err.count("warning: skipping unreadable") == 1 and str(broken) in err
    notes, block = out.split("\n\n", 1)
    assert "1 result.json skipped, unreadable or not a finite accuracy (see the warnings)" in notes
    header, rows = csv_rows(block)
    assert header[1:4] == ["Pets 4-shot", "Food 4-shot", "DTD 4-shot"]  # without the paper's rows: CoOp's order
    assert rows["NoRA (ours, nora)"][:3] == ["—", "71.00 ± 1.41 (2/3)", "80.00 ± 1.00"]


@pytest.fixture
def lr_grid(tmp_path):
    """lora at two learning rates (run names as the sweep writes them), 2 seeds, dtd and food101; nora once."""
    root = tmp_path / "grid"
    accuracies = {("dtd", 0.001): (60.0, 62.0), ("dtd", 0.01): (70.0, 66.0),        # means 61, 68
                  ("food101", 0.001): (80.0, 84.0), ("food101", 0.01): (75.0, 77.0)}  # means 82, 76
    for (dataset, lr), accs in accuracies.items():
        for seed, acc in zip((1, 2), accs):
            write_result(root, "lora", dataset, 4, seed, acc, backbone="tiny-vit", run_name=f"lr={lr}",
                         config={"train": {"lr": lr, "n_iters": 2}, "method_options": {}},
                         method_config={"rank": 2, "alpha": 1.0})
    for seed, acc in zip((1, 2), (50.0, 54.0)):
        write_result(root, "nora", "dtd", 4, seed, acc, backbone="tiny-vit",
                     config={"train": {"lr": 0.001, "n_iters": 2}, "method_options": {}},
                     method_config={"inner_rank": 16, "outer_rank": 0.8})
    return root


def test_rows_by_key_and_best_over_selected_on_test(capsys, lr_grid):
    code, out, err = table(capsys, lr_grid, "--format", "csv", "--rows", "config.train.lr", "--best_over", "lr")
    assert code == 2 and "need different keys" in err
    code, out, err = table(capsys, lr_grid, "--format", "csv", "--best_over", "lr", "--datasets", "dtd", "food101")
    assert code == 0, err
    notes, block = out.split("\n\n", 1)
    assert "selected on the test split" in notes and "optimistic" in notes
    header, rows = csv_rows(block)
    assert header == ["Method", "DTD 4-shot", "Food 4-shot", "Average 4-shot"]
    assert list(rows) == ["CLIP-LoRA (ours, lora): lr=0.001", "CLIP-LoRA (ours, lora): lr=0.01",
                          "best lr per cell, selected on the test split: CLIP-LoRA (ours, lora)",
                          "NoRA (ours, nora): lr=0.001",
                          "best lr per cell, selected on the test split: NoRA (ours, nora)"]
    assert rows["CLIP-LoRA (ours, lora): lr=0.001"] == ["61.00 ± 1.41", "82.00 ± 2.83", "71.50 ± 2.12"]
    assert rows["CLIP-LoRA (ours, lora): lr=0.01"] == ["68.00 ± 2.83", "76.00 ± 1.41", "72.00 ± 0.71"]
    # each dataset its own lr (0.01 on DTD, 0.001 on Food); Average per seed over those: (70+80)/2, (66+84)/2
    assert rows["best lr per cell, selected on the test split: CLIP-LoRA (ours, lora)"] == [
        "68.00 ± 2.83 (lr=0.01)", "82.00 ± 2.83 (lr=0.001)", "75.00 ± 0.00"]
    code, out, err = table(capsys, lr_grid, "--format", "csv", "--rows", "lr", "--cols", "method", "--datasets", "dtd")
    assert code == 0, err
    header, rows = csv_rows(out.split("\n\n", 1)[1])
    assert header == ["Method", "method=lora 4-shot", "method=nora 4-shot"]
    assert rows["CLIP-LoRA (ours, lora): lr=0.001"] == ["61.00 ± 1.41", "—"]
    assert rows["NoRA (ours, nora): lr=0.001"] == ["—", "52.00 ± 2.83"]


def test_option_keys_resolve_to_recorded_values_with_defaults(capsys, lr_grid):
    for key in ("method_options.inner_rank", "inner_rank", "config.method_options.inner_rank"):
        code, out, err = table(capsys, lr_grid, "--format", "csv", "--rows", key, "--datasets", "dtd")
        assert code == 0, err
        _, rows = csv_rows(out.split("\n\n", 1)[1])
        # nora's inner_rank is unset in config.method_options: its resolved default (method_config) is shown
        assert rows["NoRA (ours, nora): inner_rank=16"] == ["52.00 ± 2.83", "52.00 ± 2.83"]
        assert rows["CLIP-LoRA (ours, lora): inner_rank=n/a, lr=0.01"] == ["68.00 ± 2.83", "68.00 ± 2.83"]
    code, out, err = table(capsys, lr_grid, "--rows", "no_such_option")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: --rows no_such_option: expected method, run_name or a config key")


def test_script_runs_from_anywhere(tmp_path, fixture_results):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_table.py"), str(fixture_results),
                           "--format", "md", "--no_reported"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| NoRA (ours, nora) | — | 71.00 ± 1.41 (2/3) | 80.00 ± 1.00 |" in proc.stdout


def test_a_setting_the_methods_recipe_gives_per_shot_count_does_not_split_its_rows(tmp_path, capsys):
    """CoOp's recipe trains 100 epochs at 4 shots and 200 at 16: one row, one cell per shot count. The same epochs set
    on the command line (not derived) split the rows as any other setting does."""
    root = tmp_path / "results"
    for shots, epochs, acc in ((4, 100, 60.0), (16, 200, 70.0)):
        path = write_result(root, "coop4", "dtd", shots, 1, acc, config={"train": {"epochs": epochs}})
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "derived_settings": ["epochs"]}))
    code, out, _ = table(capsys, root, "--format", "csv", "--no_reported")
    head, rows = csv_rows(out.split("\n\n")[1])
    assert code == 0 and list(rows) == ["CoOp (4) (ours, coop4)"]
    assert rows["CoOp (4) (ours, coop4)"] == ["60.00", "60.00", "70.00", "70.00"]  # DTD and Average at 4 and 16 shots
    for shots, epochs, acc in ((4, 50, 61.0),):  # an explicit epochs: its own row
        write_result(root, "coop4", "dtd", shots, 2, acc, config={"train": {"epochs": epochs}})
    _, out, _ = table(capsys, root, "--format", "csv", "--no_reported")
    assert len(csv_rows(out.split("\n\n")[1])[1]) == 3  # epochs=50, 100, 200 (derived only where every run has it)
