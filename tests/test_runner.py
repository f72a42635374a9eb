"""The experiment runner: entry points end to end, outputs, reproducibility, export, bad inputs, demo.

Everything runs on CPU with the tiny open_clip backbone and a synthetic 32-px dataset.
"""
import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

import lora_zoo
import lora_zoo as lz
from lora_zoo.config import load_config
from lora_zoo.experiment import run_experiment
from lora_zoo.runs import run_dir
from lora_zoo.export import fused_state_dict
from lora_zoo.models import build_clip

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--backbone", "tiny-vit", "--shots", "2", "--n_iters", "2", "--batch_size", "8", "--num_workers", "0",
         "--eval_batch_size", "16", "--quiet"]


# one intra-op thread: tiny models gain nothing from more, and OpenMP spinning collapses when cores are shared
ENV = dict(os.environ, OMP_NUM_THREADS="1")


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """The three entry points, trained once each; lora also exports merged weights."""
    out = tmp_path_factory.mktemp("out")
    merged = out / "merged_lora.pt"
    done = {}
    for method, script, extra in (("nora", "main_nora.py", []), ("aira", "main_aira.py", []),
                                  ("lora", "main.py", ["--method", "lora", "--export_merged", merged])):
        proc = cli(script, "--root_path", data_root, "--output_dir", out, *SMALL, *extra)
        assert proc.returncode == 0, proc.stderr
        folder = out / "tiny-vit" / "dtd" / "2shots" / "seed1" / method
        done[method] = (folder, json.loads((folder / "result.json").read_text()), proc)
    return out, merged, done


def fresh_adapted(folder):
    model = build_clip("tiny-vit", seed=0).model
    lora_zoo.load_adapters(model, folder / "adapters.safetensors")
    return model


@pytest.mark.parametrize("method", ["nora", "aira", "lora"])
def test_entry_points_write_a_complete_result(runs, method):
    _, _, done = runs
    folder, result, proc = done[method]
    for key in ("accuracy", "zero_shot_accuracy", "config", "trainable_params", "wall_seconds", "iterations_per_second",
                "peak_memory_mb", "versions", "git_commit", "final_loss", "method_config", "hooks_summary"):
        assert key in result, key
    assert 0.0 <= result["accuracy"] <= 100.0 and 0.0 <= result["zero_shot_accuracy"] <= 100.0
    assert result["iterations"] == 2 * 2  # n_iters × shots
    assert result["method"] == result["config"]["method"] == method
    assert result["merged"] is True
    assert {"torch", "open_clip", "lora_zoo"} <= set(result["versions"])
    assert (folder / "adapters.safetensors").is_file() and (folder / "adapters.json").is_file()
    assert (folder / "train.log").read_text().strip()
    # the trainable count is lora_zoo.count_trainable of the same setup, rebuilt from the checkpoint
    assert result["trainable_params"] == lora_zoo.count_trainable(fresh_adapted(folder)) > 0
    assert proc.stdout.strip().splitlines()[-1] == result["summary"]  # --quiet still prints the one-line summary


def test_trainable_params_match_a_direct_setup(runs):
    _, _, done = runs
    for method in ("nora", "lora"):
        folder, result, _ = done[method]
        model = build_clip("tiny-vit", seed=0).model
        lora_zoo.apply_adapters(model, method, **result["config"]["method_options"])
        assert result["trainable_params"] == lora_zoo.count_trainable(model)


def test_aira_writes_its_rank_allocation(runs):
    folder, result, _ = runs[2]["aira"]
    ranks = json.loads((folder / "ranks.json").read_text())
    assert ranks == lora_zoo.layer_ranks(fresh_adapted(folder))
    assert len(ranks) == 12 and all(2 <= r <= 32 for r in ranks.values())
    assert not (runs[2]["nora"][0] / "ranks.json").exists()


def test_eval_only_reproduces_the_test_accuracy(runs, data_root):
    out, _, done = runs
    proc = cli("main.py", "--method", "lora", "--root_path", data_root, "--output_dir", out, *SMALL, "--eval_only")
    assert proc.returncode == 0, proc.stderr
    folder, result, _ = done["lora"]
    evaluated = json.loads((folder / "eval.json").read_text())
    assert evaluated["accuracy"] == result["accuracy"]
    assert json.loads((folder / "result.json").read_text()) == result  # the finished result is untouched


def test_exported_merged_weights_load_into_plain_open_clip(runs, images, texts):
    _, merged, done = runs
    adapted = fresh_adapted(done["lora"][0])
    lora_zoo.merge_adapters(adapted)
    plain = build_clip("tiny-vit", seed=0).model
    plain.load_state_dict(torch.load(merged, weights_only=True), strict=True)
    assert not any("lora" in k or ".q." in k for k in torch.load(merged, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), adapted.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(plain.encode_text(texts), adapted.encode_text(texts), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone, options", [
    ("tiny-vit", dict(inner_rank=4)), ("tiny-vit-custom", dict(inner_rank=4)),
    ("tiny-vit", dict(variant="authors", act_weighted=False)),  # the authors' extra scale·b, unmerged
])
def test_fused_state_dict_round_trips_trained_adapters(backbone, options, images, texts):
    model = build_clip(backbone, seed=0).model
    with torch.no_grad():  # open_clip starts attention biases at zero; a bias that matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    lora_zoo.apply_adapters(model, "nora", targets=("q", "k", "v", "o"), **options)
    with torch.no_grad():
        for p in lora_zoo.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))  # as if trained
    plain = build_clip(backbone, seed=1).model  # other weights: everything must come from the export
    state = fused_state_dict(model, reference=plain)
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), model.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(plain.encode_text(texts), model.encode_text(texts), rtol=1e-4, atol=1e-5)


def small_config(data_root, out, **overrides):
    values = dict(method="lora", root_path=str(data_root), output_dir=str(out), backbone="tiny-vit", shots=2,
                  n_iters=3, batch_size=4, num_workers=0, eval_batch_size=16)
    values.update(overrides)
    return load_config([], values)


def test_same_seed_same_numbers_other_seed_other_subset(data_root, tmp_path):
    first = run_experiment(small_config(data_root, tmp_path / "a"), progress=False)
    again = run_experiment(small_config(data_root, tmp_path / "b"), progress=False)
    other = run_experiment(small_config(data_root, tmp_path / "c", seed=2), progress=False)
    for key in ("accuracy", "zero_shot_accuracy", "final_loss", "loss_history", "train_subset_sha1"):
        assert first[key] == again[key], key
    assert first["train_subset_sha1"] != other["train_subset_sha1"]
    assert first["final_loss"] != other["final_loss"]


def test_config_precedence_and_coercion(tmp_path):
    first, extra = tmp_path / "first.yaml", tmp_path / "extra.yaml"
    first.write_text("method: nora\nbatch_size: 8\nmethod_options: {inner_init: lora}\n")
    extra.write_text("lr: 1e-3\nn_iters: 7\nmethod_options: {inner_rank: 4}\n")
    cfg = load_config([first, extra], {"n_iters": 9, "method_options.outer_rank": 0.5})
    assert (cfg.train.lr, cfg.train.n_iters, cfg.shots * cfg.train.n_iters) == (1e-3, 9, cfg.iterations(train_size=100))
    assert cfg.train.batch_size == 8 and cfg.train.weight_decay == 1e-2  # a file's value; the dataclass default
    assert cfg.method_options == {"inner_init": "lora", "inner_rank": 4, "outer_rank": 0.5}
    assert run_dir(cfg) == Path("outputs/ViT-B-16/dtd/16shots/seed1/nora")
    # lr defaults to the method's registered protocol lr, whatever the method
    for method in lz.list_methods():
        assert load_config([], {"method": method}).train.lr == lz.get_method(method).lr


def one_line_error(capsys, argv, method=None):
    import main
    code = main.run(argv, method)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("bad, expect", [
    (["--method", "no_such_method"], "unknown adapter method"),
    (["--method", "lora", "--dataset", "no_such_dataset"], "unknown dataset"),
    (["--method", "lora", "--backbone", "ViT-Z-99"], "unknown backbone"),
    (["--method", "lora", "--config", "/no/such/config.yaml"], "cannot read config"),
    (["--method", "lora", "--set", "no_such_key=1"], "unknown config key"),
    (["--method", "nora", "--set", "method_options.inner_rank=0"], "inner_rank"),
    (["--method", "nora", "--inner_init", "bogus"], "inner_init"),
])
def test_bad_configuration_is_one_line(capsys, data_root, tmp_path, bad, expect):
    line = one_line_error(capsys, ["--root_path", str(data_root), "--output_dir", str(tmp_path)] + SMALL[:-1] + bad)
    assert expect in line


def test_invalid_yaml_is_one_line(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1, 2\n")
    assert "not valid YAML" in one_line_error(capsys, ["--method", "lora", "--config", str(broken)])


def test_unwritable_results_dir(capsys, data_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = one_line_error(capsys, ["--method", "lora", "--root_path", str(data_root), "--output_dir",
                                   str(blocker / "out")] + SMALL)
    assert "not writable" in line
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in one_line_error(capsys, ["--method", "lora", "--root_path", str(data_root),
                                                         "--output_dir", str(locked)] + SMALL)


def test_eval_only_without_adapters(capsys, data_root, tmp_path):
    line = one_line_error(capsys, ["--root_path", str(data_root), "--output_dir", str(tmp_path), "--eval_only"] + SMALL,
                          method="aira")
    assert "no finished run to evaluate" in line


def test_nan_loss_stops_and_saves_no_result(capsys, data_root, tmp_path):
    line = one_line_error(capsys, ["--method", "lora", "--root_path", str(data_root), "--output_dir", str(tmp_path),
                                   "--set", "lr=1e30"] + SMALL)
    assert "nan" in line.lower() and "at iteration" in line
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("adapters.safetensors"))


def test_finished_run_is_a_no_op(capsys, runs, data_root):
    import main
    out, _, done = runs
    before = (done["nora"][0] / "result.json").stat().st_mtime_ns
    assert main.run(["--root_path", str(data_root), "--output_dir", str(out)] + SMALL, "nora") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to do" in err[0] and "already finished" in err[0]
    assert (done["nora"][0] / "result.json").stat().st_mtime_ns == before


def test_process_exit_code_and_single_stderr_line(data_root, tmp_path):
    proc = cli("main.py", "--method", "nope", "--root_path", data_root, "--output_dir", tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown adapter method" in proc.stderr


def test_reduced_demo_shows_zero_shot_then_few_shot_on_both_tasks(tmp_path):
    """The demo with 4 shots and 8 iterations (the full demo is timed by hand: see the report)."""
    proc = cli("main_nora.py", "--demo", "--output_dir", tmp_path, "--quiet", "--shots", "4", "--n_iters", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("compose ", "names "))]
    assert [(r[0], r[2]) for r in rows] == [(t, m) for t in ("compose", "names") for m in ("lora", "nora", "aira")]
    record = json.loads((REPO / "lora_zoo/weights/tiny-clip.json").read_text())["zero_shot_accuracy"]
    for task, _, method, _, zero_shot, few_shot in rows:
        result = json.loads((tmp_path / f"runs/tiny-clip/scenes_{task}/4shots/seed1/{method}/result.json").read_text())
        assert zero_shot == f"{result['zero_shot_accuracy']:.1f}%" and few_shot == f"{result['accuracy']:.1f}%"
        assert abs(result["zero_shot_accuracy"] - record[task]) <= 0.34  # the shipped weights, one image either way
    assert "not a paper result" in proc.stdout


def test_zero_shot_is_computed_once_per_dataset_and_prompts(data_root, tmp_path):
    first = run_experiment(small_config(data_root, tmp_path, method="lora"), progress=False)
    second = run_experiment(small_config(data_root, tmp_path, method="nora", seed=2), progress=False)
    other_prompts = run_experiment(small_config(data_root, tmp_path, method="pissa", template="{} texture."),
                                   progress=False)
    assert (first["zero_shot_cached"], second["zero_shot_cached"], other_prompts["zero_shot_cached"]) == \
        (False, True, False)
    assert second["zero_shot_accuracy"] == first["zero_shot_accuracy"]
    cached = list((tmp_path / ".cache" / "zero_shot").glob("*.json"))
    assert len(cached) == 2
    for path in cached:  # a cache entry is only used for the key it was written for
        entry = json.loads(path.read_text())
        entry["key"]["prompts"] = "something else"
        path.write_text(json.dumps(entry))
    again = run_experiment(small_config(data_root, tmp_path, method="lora", seed=3), progress=False)
    assert again["zero_shot_cached"] is False and again["zero_shot_accuracy"] == first["zero_shot_accuracy"]


def test_export_of_a_finished_run_exports_its_adapters_without_training(runs, tmp_path, images):
    out, _, done = runs
    folder, result, _ = done["nora"]
    before = (folder / "result.json").read_bytes()
    proc = cli("main_nora.py", "--root_path", done["nora"][1]["config"]["root_path"], "--output_dir", out, *SMALL,
               "--export_merged", tmp_path / "nora.pt")
    assert proc.returncode == 0, proc.stderr
    assert (folder / "result.json").read_bytes() == before  # not trained again
    assert json.loads((folder / "eval.json").read_text())["accuracy"] == result["accuracy"]
    plain = build_clip("tiny-vit", seed=0).model
    plain.load_state_dict(torch.load(tmp_path / "nora.pt", weights_only=True), strict=True)
    adapted = fresh_adapted(folder)
    lora_zoo.merge_adapters(adapted)
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), adapted.encode_image(images), rtol=1e-4, atol=1e-5)


def test_terminated_run_says_how_to_resume(data_root, tmp_path):
    """SIGTERM (kill, a scheduler's time limit) stops a run as Ctrl-C does: one line, its checkpoint kept."""
    args = [*SMALL[:SMALL.index("--n_iters")], "--n_iters", "5000", "--checkpoint_every", "2",
            *SMALL[SMALL.index("--n_iters") + 2:]]
    proc = subprocess.Popen([sys.executable, "main_nora.py", "--root_path", str(data_root), "--output_dir",
                             str(tmp_path), *map(str, args)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "tiny-vit" / "dtd" / "2shots" / "seed1" / "nora" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted before the run finished (no result.json); "
                                                   "the same command resumes it")
    assert checkpoint.is_file() and not checkpoint.with_name("result.json").exists()
