"""make_table.py --protocol base2new|cross_dataset|domain on planted records, and the few-shot table beside them.

The records are the ones the pipeline writes: a base-to-new run's result.json
(``"protocol": "base2new"``, in ``<backbone>/<dataset>/base2new/<K>shots/seed<S>/<leaf>/``) and, in a finished
few-shot run folder, one ``eval_on/<target>.json`` per target; each names its method as the tables show it
(``runs.method_record``). Expected cells are computed by hand below.
"""
import csv
import json
import subprocess
import sys
import textwrap
from io import StringIO
from pathlib import Path

import pytest

from lora_zoo.results import harmonic_mean, load_base2new, load_results, load_transfers
from lora_zoo.catalog import get_method
from lora_zoo.runs import method_fields
from scripts import make_table

ZERO_SHOT = "Zero-shot (the pretrained model, no training)"


def write_json(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def run_folder(root, method, dataset, shots, seed, backbone="ViT-B-16", run_name=None, protocol=None):
    leaf = method + (f"-{run_name}" if run_name else "")
    middle = [protocol] if protocol else []
    return Path(root, backbone, dataset, *middle, f"{shots}shots", f"seed{seed}", leaf)


def write_fewshot(root, method, dataset, shots, seed, accuracy, zero_shot=None, **kw):
    record = {"method": method, "dataset": dataset, "shots": shots, "seed": seed,
              "backbone": kw.get("backbone", "ViT-B-16"), "run_name": kw.get("run_name"), "accuracy": accuracy,
              "config": {"method": method, "run_name": kw.get("run_name")}, "zero_shot_accuracy": zero_shot,
              **method_fields(get_method(method))}
    return write_json(run_folder(root, method, dataset, shots, seed, **kw) / "result.json", record).parent


def write_base2new(root, method, dataset, seed, base, new, zero_shot=(None, None), shots=16, run_name=None):
    record = {"method": method, "dataset": dataset, "shots": shots, "seed": seed, "backbone": "ViT-B-16",
              "run_name": run_name, "config": {"method": method, "run_name": run_name}, "method_config": {},
              "optimizer": "adamw", "accuracy": base, "protocol": "base2new", "base_accuracy": base,
              "new_accuracy": new, "harmonic_mean": harmonic_mean(base, new), "zero_shot_base_accuracy": zero_shot[0],
              "zero_shot_new_accuracy": zero_shot[1], "base_classes": ["a", "b"], "new_classes": ["c"],
              **method_fields(get_method(method))}
    folder = run_folder(root, method, dataset, shots, seed, run_name=run_name, protocol="base2new")
    return write_json(folder / "result.json", record)


def write_eval_on(run_dir, target, accuracy, zero_shot=None):
    source = json.loads((run_dir / "result.json").read_text())
    record = {"target": target, "accuracy": accuracy, "test_images": 30, "classes": 10,
              "source_dataset": source["dataset"], "zero_shot_accuracy": zero_shot,
              **{k: source[k] for k in ("method", "display_name", "shots", "seed", "backbone", "run_name")}}
    return write_json(run_dir / "eval_on" / f"{target}.json", record)


def table(capsys, *args):
    code = make_table.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def csv_table(out):
    """Header and rows of the one CSV table printed."""
    notes, block = out.split("\n\n", 1)
    rows = [row for row in csv.reader(StringIO(block.strip())) if row]
    return notes, rows[0], rows[1:]


@pytest.fixture
def base2new_root(tmp_path):
    root = tmp_path / "outputs"
    for seed, (dtd, eurosat) in zip((1, 2), (((80.0, 60.0), (90.0, 50.0)), ((82.0, 64.0), (92.0, 54.0)))):
        write_base2new(root, "nora", "dtd", seed, *dtd, zero_shot=(70.0, 50.0))
        write_base2new(root, "nora", "eurosat", seed, *eurosat, zero_shot=(60.0, 30.0))
    write_base2new(root, "lora", "dtd", 1, 70.0, 70.0, zero_shot=(70.0, 50.0))
    write_fewshot(root, "nora", "dtd", 16, 1, 99.0)  # a few-shot run: not in the base-to-new table
    return root


def test_base2new_per_dataset_and_average_harmonic_means(capsys, base2new_root):
    code, out, err = table(capsys, base2new_root, "--protocol", "base2new", "--format", "csv")
    assert code == 0, err
    notes, header, rows = csv_table(out)
    assert "ViT-B-16, 16 shots per base class" in notes and "harmonic mean of the Base and New shown" in notes
    assert header == ["Dataset", "Method", "Base", "New", "HM"]
    average = "Average over 2 datasets"
    assert [row[:2] for row in rows] == [[average, ZERO_SHOT], [average, "CLIP-LoRA (ours, lora)"],
                                         [average, "NoRA (ours, nora)"], ["DTD", ZERO_SHOT],
                                         ["DTD", "CLIP-LoRA (ours, lora)"], ["DTD", "NoRA (ours, nora)"],
                                         ["EuroSAT", ZERO_SHOT], ["EuroSAT", "CLIP-LoRA (ours, lora)"],
                                         ["EuroSAT", "NoRA (ours, nora)"]]
    cells = {tuple(row[:2]): row[2:] for row in rows}
    # DTD: Base 80, 82; New 60, 64; HM(81, 62) = 2·81·62/143 = 70.24; per-seed HM 68.571, 71.890 → std 2.35
    assert cells["DTD", "NoRA (ours, nora)"] == ["81.00 ± 1.41", "62.00 ± 2.83", "70.24 ± 2.35"]
    # EuroSAT: HM(91, 52) = 66.18; per-seed HM 64.286, 68.055 → std 2.67
    assert cells["EuroSAT", "NoRA (ours, nora)"] == ["91.00 ± 1.41", "52.00 ± 2.83", "66.18 ± 2.67"]
    # Average: per seed Base (85, 87), New (55, 59) → 86, 57; HM(86, 57) = 68.56, not the mean of the
    # datasets' HMs (68.21); per-seed HM(85, 55) = 66.786, HM(87, 59) = 70.315 → std 2.50
    assert cells[average, "NoRA (ours, nora)"] == ["86.00 ± 1.41", "57.00 ± 2.83", "68.56 ± 2.50"]
    assert cells["DTD", "CLIP-LoRA (ours, lora)"] == ["70.00 (1/2)", "70.00 (1/2)", "70.00 (1/2)"]
    assert cells["EuroSAT", "CLIP-LoRA (ours, lora)"] == ["—", "—", "—"]
    assert cells[average, "CLIP-LoRA (ours, lora)"] == ["70.00 (1/2) [1/2 datasets]"] * 3
    # zero-shot: DTD HM(70, 50) = 58.33, EuroSAT HM(60, 30) = 40.00; Average HM(65, 40) = 49.52 (not 49.17)
    assert cells["DTD", ZERO_SHOT] == ["70.00", "50.00", "58.33"]
    assert cells["EuroSAT", ZERO_SHOT] == ["60.00", "30.00", "40.00"]
    assert cells[average, ZERO_SHOT] == ["65.00", "40.00", "49.52"]


def test_base2new_options_formats_and_errors(capsys, base2new_root, tmp_path):
    code, out, err = table(capsys, base2new_root, "--protocol", "base2new", "--format", "md", "--datasets",
                           "benchmark", "--methods", "nora", "--seeds", "1")
    assert code == 0, err
    assert "| Dataset | Method | Base | New | HM |" in out and "| Average over 11 datasets | NoRA (ours, nora) | " \
        "85.00 [2/11 datasets] | 55.00 [2/11 datasets] | 66.79 [2/11 datasets] |" in out
    assert "| ImageNet | NoRA (ours, nora) | — | — | — |" in out and "CLIP-LoRA" not in out
    code, out, err = table(capsys, base2new_root, "--protocol", "base2new", "--format", "latex")
    assert code == 0 and r"\begin{tabular}{lcccc}" in out and r"81.00 $\pm$ 1.41" in out
    (tmp_path / "empty").mkdir()
    code, out, err = table(capsys, tmp_path / "empty", "--protocol", "base2new")
    assert code == 2 and out == "" and err == ('error: no base-to-new results (result.json with "protocol": '
                                               f'"base2new") under {tmp_path / "empty"}\n')
    code, out, err = table(capsys, base2new_root, "--protocol", "base2new", "--rows", "lr")
    assert code == 2 and err == "error: --rows lays out the few-shot table only; the base2new table has a fixed " \
                                "layout\n"
    code, out, err = table(capsys, base2new_root, "--protocol", "base2new", "--backbone", "RN50")
    assert code == 2 and err == f"error: no base2new results for backbone RN50 under {base2new_root} " \
                                "(found: ViT-B-16)\n"


def test_fewshot_table_unchanged_by_other_protocols(capsys, tmp_path):
    root = tmp_path / "outputs"
    for seed, acc in ((1, 70.0), (2, 74.0)):
        write_fewshot(root, "nora", "dtd", 16, seed, acc, zero_shot=40.0)
        write_fewshot(root, "nora", "eurosat", 16, seed, acc + 10, zero_shot=30.0)
    before = table(capsys, root, "--format", "csv", "--no_reported")
    assert before[0] == 0 and "\"NoRA (ours, nora)\",72.00 ± 2.83,82.00 ± 2.83,77.00 ± 2.83" in before[1]
    for seed in (1, 2, 3):
        write_base2new(root, "nora", "dtd", seed, 10.0, 5.0, zero_shot=(1.0, 2.0))
        write_base2new(root, "lora", "ucf101", seed, 10.0, 5.0)
    write_eval_on(run_folder(root, "nora", "dtd", 16, 1), "caltech101", 12.0, zero_shot=3.0)
    after = table(capsys, root, "--format", "csv", "--no_reported")
    assert after == before
    assert [(r.dataset, r.seed) for r in load_results(root)[0]] == [("dtd", 1), ("dtd", 2), ("eurosat", 1),
                                                                    ("eurosat", 2)]
    assert len(load_base2new(root)[0]) == 6 and len(load_transfers(root)[0]) == 1


@pytest.fixture
def transfer_root(tmp_path):
    """nora trained on ImageNet (16 shots, seeds 1, 2), evaluated on two benchmarks and two ImageNet variants."""
    root = tmp_path / "outputs"
    targets = {"caltech101": ((90.0, 92.0), 85.0), "oxford_pets": ((80.0, 84.0), None),
               "imagenetv2": ((60.0, 62.0), 58.0), "imagenet_a": ((30.0, 34.0), 25.0)}
    for index, seed in enumerate((1, 2)):
        run_dir = write_fewshot(root, "nora", "imagenet", 16, seed, 70.0 + 2 * index, zero_shot=66.7)
        for target, (accuracies, zero_shot) in targets.items():
            write_eval_on(run_dir, target, accuracies[index], zero_shot)
    write_eval_on(write_fewshot(root, "lora", "dtd", 16, 1, 55.0), "caltech101", 44.0)  # another source
    return root


def test_cross_dataset_papers_layout(capsys, transfer_root):
    code, out, err = table(capsys, transfer_root, "--protocol", "cross_dataset", "--format", "csv")
    assert code == 0, err
    notes, header, rows = csv_table(out)
    assert "Cross-dataset transfer, ViT-B-16" in notes and "16-shot runs trained on ImageNet" in notes
    assert header == ["Method", "ImageNet (source)", "Caltech", "Pets", "Cars", "Flowers", "Food", "Aircraft", "SUN",
                      "DTD", "EuroSAT", "UCF", "Average"]
    rows = {row[0]: row[1:] for row in rows}
    assert list(rows) == [ZERO_SHOT, "NoRA (ours, nora)"]
    # Average: per seed (90 + 80) / 2 = 85 and (92 + 84) / 2 = 88
    assert rows["NoRA (ours, nora)"] == ["71.00 ± 1.41", "91.00 ± 1.41", "82.00 ± 2.83", *["—"] * 8,
                                         "86.50 ± 2.12 [2/10 datasets]"]
    assert rows[ZERO_SHOT] == ["66.70", "85.00", *["—"] * 9, "85.00 [1/10 datasets]"]
    code, out, err = table(capsys, transfer_root, "--protocol", "cross_dataset", "--format", "csv", "--source", "dtd")
    assert code == 0, err
    _, header, rows = csv_table(out)
    assert header[1:3] == ["DTD (source)", "ImageNet"] and "DTD" not in header[2:]
    assert rows == [["CLIP-LoRA (ours, lora)", "55.00", "—", "44.00", *["—"] * 8, "44.00 [1/10 datasets]"]]


def test_domain_generalisation_layout(capsys, transfer_root):
    code, out, err = table(capsys, transfer_root, "--protocol", "domain", "--format", "csv")
    assert code == 0, err
    notes, header, rows = csv_table(out)
    assert "Domain generalisation, ViT-B-16" in notes and "the mean over the 4 targets" in notes
    assert header == ["Method", "ImageNet (source)", "ImageNet-V2", "ImageNet-Sketch", "ImageNet-A", "ImageNet-R",
                      "Average"]
    rows = {row[0]: row[1:] for row in rows}
    # Average: per seed (60 + 30) / 2 = 45 and (62 + 34) / 2 = 48
    assert rows["NoRA (ours, nora)"] == ["71.00 ± 1.41", "61.00 ± 1.41", "—", "32.00 ± 2.83", "—",
                                         "46.50 ± 2.12 [2/4 datasets]"]
    assert rows[ZERO_SHOT] == ["66.70", "58.00", "—", "25.00", "—", "41.50 [2/4 datasets]"]
    code, out, err = table(capsys, transfer_root, "--protocol", "domain", "--source", "dtd")
    assert code == 2 and out == "" and err == ("error: no domain-generalisation results (eval_on/<target>.json) of "
                                               "runs trained on dtd (other sources found: imagenet; --source) under "
                                               f"{transfer_root}\n")


def test_unreadable_records_are_counted(capsys, transfer_root):
    broken = write_eval_on(run_folder(transfer_root, "nora", "imagenet", 16, 1), "imagenet_r", 10.0)
    broken.write_text("{")
    code, out, err = table(capsys, transfer_root, "--protocol", "domain", "--format", "csv")
    assert code == 0 and f"warning: skipping unreadable {broken}" in err
    assert "1 unreadable record(s) skipped" in out.split("\n\n", 1)[0]
    assert csv_table(out)[2][1][5] == "—"


JSON_ONLY = textwrap.dedent("""
    import sys

    class Unimportable:  # torch, open_clip, numpy and the method registry: a table must need none of them
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "open_clip", "numpy") or name == "lora_zoo.registry":
                raise ModuleNotFoundError(f"{name} is made unimportable here")

    sys.meta_path.insert(0, Unimportable())
    from scripts import make_table
    for protocol in ("fewshot", "base2new", "cross_dataset", "domain"):
        print(f"=== {protocol}")
        assert make_table.main([sys.argv[1], "--protocol", protocol, "--format", "csv", "--no_reported"]) == 0
""")


def test_every_table_is_made_from_the_json_records_alone(tmp_path):
    """Few-shot, base-to-new, cross-dataset and domain tables in a process where torch, open_clip, numpy and the
    method registry cannot be imported: rows named by the display names the records carry (a method whose
    records have none, written before runs recorded it, by its own name), cells from the recorded numbers."""
    root = tmp_path / "outputs"
    for seed, (acc, base, new, dtd, v2) in enumerate(((60.0, 80.0, 60.0, 40.0, 64.0),
                                                      (62.0, 82.0, 62.0, 44.0, 66.0)), start=1):
        write_fewshot(root, "nora", "dtd", 4, seed, acc)
        write_base2new(root, "nora", "dtd", seed, base, new)
        source = write_fewshot(root, "nora", "imagenet", 16, seed, acc + 10)
        write_eval_on(source, "dtd", dtd)
        write_eval_on(source, "imagenetv2", v2)
    write_eval_on(source, "imagenet_sketch", 50.0)  # seed 2 only
    for older in (run_folder(root, "nora", "dtd", 4, 2) / "result.json",  # nora's other records name it
                  write_fewshot(root, "lora", "dtd", 4, 1, 55.0) / "result.json"):  # lora's none
        record = json.loads(older.read_text())
        del record["display_name"]
        older.write_text(json.dumps(record))
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", JSON_ONLY, str(root)], cwd=repo, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "unimportable" not in proc.stderr, proc.stderr
    blocks = [block.split("\n\n") for block in proc.stdout.split("=== ")[1:]]  # protocol, notes, CSV table
    tables = {block[0].split("\n")[0]: [row for row in csv.reader(StringIO(block[1])) if row] for block in blocks}
    assert tables["fewshot"] == [
        ["Method", *(f"{d} {k}-shot" for k in (4, 16) for d in ("ImageNet", "DTD", "Average"))],
        ["lora (ours, lora)", "—", "55.00 (1/2)", "55.00 (1/2) [1/2 datasets]", "—", "—", "—"],
        ["NoRA (ours, nora)", "—", "61.00 ± 1.41", "61.00 ± 1.41 [1/2 datasets]", "71.00 ± 1.41", "—",
         "71.00 ± 1.41 [1/2 datasets]"]]
    # HM of the mean Base and New: HM(81, 61) = 69.59; per seed HM(80, 60) = 68.571, HM(82, 62) = 70.611 → ± 1.44
    assert tables["base2new"][1:] == [["Average over 1 datasets", "NoRA (ours, nora)", "81.00 ± 1.41",
                                       "61.00 ± 1.41", "69.59 ± 1.44"],
                                      ["DTD", "NoRA (ours, nora)", "81.00 ± 1.41", "61.00 ± 1.41", "69.59 ± 1.44"]]
    assert tables["cross_dataset"][1] == ["NoRA (ours, nora)", "71.00 ± 1.41", *["—"] * 7, "42.00 ± 2.83", "—",
                                          "—", "42.00 ± 2.83 [1/10 datasets]"]  # DTD: the 8th of the 10 targets
    # Average: the seeds every present target has (seed 2: V2 66, Sketch 50) → 58.00
    assert tables["domain"][1] == ["NoRA (ours, nora)", "71.00 ± 1.41", "65.00 ± 1.41", "50.00 (1/2)", "—", "—",
                                   "58.00 (1/2) [2/4 datasets]"]


def test_no_table_reads_a_non_finite_base_new_or_target_score(tmp_path, capsys):
    """Every loader reads scores through one check (``results.finite_score``): NaN or infinity is skipped by name."""
    good = write_base2new(tmp_path, "lora", "dtd", 1, 80.0, 60.0)
    bad = write_base2new(tmp_path, "lora", "dtd", 2, 80.0, float("nan"))
    source = write_fewshot(tmp_path, "lora", "imagenet", 16, 1, 70.0)
    kept, diverged = write_eval_on(source, "dtd", 40.0), write_eval_on(source, "eurosat", float("inf"))
    runs, skipped = load_base2new(tmp_path)
    assert [(r.seed, r.new) for r in runs] == [(1, 60.0)] and skipped == 1
    transfers, skipped_transfers = load_transfers(tmp_path)
    assert [(t.target, t.accuracy) for t in transfers] == [("dtd", 40.0)] and skipped_transfers == 1
    err = capsys.readouterr().err
    assert f"warning: skipping {bad}: its new accuracy is nan (not a finite number)" in err
    assert f"warning: skipping {diverged}: its accuracy is inf (not a finite number)" in err
    assert str(good) not in err and str(kept) not in err
