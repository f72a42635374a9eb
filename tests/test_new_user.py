"""What a new user hit on a fresh clone (issue 26): each case failed before its fix.

Runs go through the command line (``lora_zoo.cli.run``, what ``main.py`` calls) on the tiny-vit backbone
(random init), the small synthetic DTD of ``conftest.data_root`` and two iterations. A full disk is a
writer that raises what a full disk raises where the bytes are written (``OSError`` ENOSPC from Python's
``open``, safetensors' ``SafetensorError`` "os error 28"), one write site at a time.
"""
import errno
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

import lora_zoo as lz
from conftest import cli, killed_at, one_line, synthetic_datasets
from lora_zoo.checkpoint import RECORD_DIGEST, config_path
from lora_zoo.cli import run
from lora_zoo.files import sha256_json
from lora_zoo.models import build_clip

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "tiny-vit", "--shots", "1", "--batch_size", "4", "--num_workers", "0", "--eval_batch_size", "16",
        "--n_iters", "2", "--quiet"]
pytestmark = pytest.mark.usefixtures("one_thread")


def run_folder(out, dataset="dtd", leaf="lora") -> Path:
    return Path(out, "tiny-vit", dataset, "1shots", "seed1", leaf)


def result(folder: Path, name="result.json") -> dict:
    return json.loads((folder / name).read_text())


# ---- 2: the whole adapter record is under the checksum ---------------------------------------------------------------
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


# ---- 3: a full disk is one line naming the file, and the same command resumes once space is freed --------------------
class FileOnAFullDisk:
    """A file opened on a full disk: opening works, writing raises ENOSPC (as Python's file objects do)."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fill_the_disk_for(monkeypatch, hit) -> None:
    """Every file opened for writing whose path ``hit(path)`` accepts is on a full disk: builtins' ``open`` and
    ``io.open`` (``Path.write_text``, ``csv``, ``torch_save``, ``numpy``'s memory map, ``logging``)."""
    real = open

    def full_open(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
        return FileOnAFullDisk(handle) if writing and hit(Path(file)) else handle
    monkeypatch.setattr("builtins.open", full_open)
    monkeypatch.setattr("io.open", full_open)


def named(name):
    """Writes of ``name``: the file itself, or ``atomic_write``'s temporary ``.<name>.<random>.tmp`` of it."""
    return lambda path: path.name == name or path.name.startswith(f".{name}.")


def fill_the_disk_at_safetensors(monkeypatch, module) -> None:
    """safetensors' writer on a full disk, in ``module``: its own error type, the errno only in the text."""
    from safetensors import SafetensorError

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(module, "save_file", no_space)


def fill_the_disk_at_the_claim(monkeypatch) -> None:
    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "pwrite", no_space)


FULL_DISK_SITES = {  # where: the extra arguments, how the disk fills, the file the line names (a pattern)
    "zero-shot cache": ([], lambda p: fill_the_disk_for(p, lambda path: path.parent.name == "zero_shot"),
                        r"{out}/\.cache/zero_shot/[0-9a-f]{40}\.json"),
    "test cache": (["--test_cache_dir", "{tmp}/test_cache"],
                   lambda p: fill_the_disk_for(p, lambda path: path.name.startswith(".images-")),
                   r"{tmp}/test_cache/images-[0-9a-f]{20}\.npy"),
    "features cache": (["--method", "tip_adapter"], lambda p: fill_the_disk_at_safetensors(p, lz.features),
                       r"{out}/\.cache/features/views-[0-9a-f]{24}\.safetensors"),
    "claim": ([], fill_the_disk_at_the_claim, r"{run}/\.claim"),
    "train.log": ([], lambda p: fill_the_disk_for(p, named("train.log")), r"{run}/train\.log"),
    "checkpoint.pt": ([], lambda p: fill_the_disk_for(p, named("checkpoint.pt")), r"{run}/checkpoint\.pt"),
    "curves.csv": ([], lambda p: fill_the_disk_for(p, named("curves.csv")), r"{run}/curves\.csv"),
    "adapters.safetensors": ([], lambda p: fill_the_disk_at_safetensors(p, lz.checkpoint),
                             r"{run}/adapters\.safetensors"),
    "adapters.json": ([], lambda p: fill_the_disk_for(p, named("adapters.json")), r"{run}/adapters\.json"),
    "ranks.json": (["--method", "aira"], lambda p: fill_the_disk_for(p, named("ranks.json")), r"{run}/ranks\.json"),
    "eval_on": (["--eval_on", "eurosat"], lambda p: fill_the_disk_for(p, named("eurosat.json")),
                r"{run}/eval_on/eurosat\.json"),
    "result.json": ([], lambda p: fill_the_disk_for(p, named("result.json")), r"{run}/result\.json"),
    "export_merged": (["--export_merged", "{tmp}/merged.pt"], lambda p: fill_the_disk_for(p, named("merged.pt")),
                      r"{tmp}/merged\.pt"),
    "export_peft": (["--export_peft", "{tmp}/peft"], lambda p: fill_the_disk_at_safetensors(p, lz.peft_export),
                    r"{tmp}/peft/adapter_model\.safetensors"),
    "export_peft base_model": (["--export_peft", "{tmp}/peft"],
                               lambda p: fill_the_disk_for(p, lambda path: path.parent.name == "base_model"),
                               r"{tmp}/peft/base_model"),
}
AFTER_TRAINING = {"adapters.safetensors", "adapters.json", "ranks.json", "eval_on", "result.json", "export_merged",
                  "export_peft", "export_peft base_model"}  # the line says where the trained adapters are kept
RESUMES = "free space and run the same command again to resume the run"
KEPT = "the trained adapters are kept in {run}/checkpoint.pt: free space and run the same command again to finish " \
       "from it without training"


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """DTD (4 classes) and EuroSAT (3 classes) under one root, small: a run on one evaluated on the other."""
    return synthetic_datasets(tmp_path_factory.mktemp("two_datasets"), {"dtd": 4, "eurosat": 3}, train_per_class=2,
                              val_per_class=1, test_per_class=2)


@pytest.mark.parametrize("site", sorted(FULL_DISK_SITES))
def test_a_full_disk_at_each_write_site_is_one_line_and_the_same_command_then_finishes(site, two_datasets, tmp_path,
                                                                                       capsys, monkeypatch):
    if site.startswith("export_peft"):
        pytest.importorskip("transformers")
    extra, fill, named_file = FULL_DISK_SITES[site]
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    out = tmp_path / "out"
    args = ["--method", "lora", *TINY, "--root_path", two_datasets, "--output_dir", out, *extra]
    folder = run_folder(out, leaf=extra[1] if extra[:1] == ["--method"] else "lora")
    with monkeypatch.context() as patch:
        fill(patch)
        code, err = cli(capsys, *args)
    line = one_line(err)
    path = named_file.replace("{run}", re.escape(str(folder))).replace("{out}", re.escape(str(out)))
    path = path.replace("{tmp}", re.escape(str(tmp_path)))
    trained = (folder / "checkpoint.pt").is_file()
    assert trained == (site in AFTER_TRAINING or site == "curves.csv")  # curves.csv: written after each checkpoint
    tail = re.escape(KEPT.format(run=folder) if site in AFTER_TRAINING else RESUMES)
    assert code == 1 and re.fullmatch(f"error: cannot write {path}: No space left on device; {tail}", line), line
    assert not (folder / "result.json").exists()
    assert [p for p in tmp_path.rglob("*.tmp")] == []  # no half-written file left anywhere
    assert cli(capsys, *args)[0] == 0  # space freed: the same command finishes the run
    assert result(folder)["resumed_from"] == (2 if trained else 0)


def test_a_full_disk_at_an_evaluation_of_a_finished_run_is_one_line_and_writes_nothing(data_root, tmp_path, capsys,
                                                                                        monkeypatch):
    args = ["--method", "lora", *TINY, "--root_path", data_root, "--output_dir", tmp_path / "out"]
    assert cli(capsys, *args)[0] == 0
    folder = run_folder(tmp_path / "out")
    with monkeypatch.context() as patch:
        fill_the_disk_for(patch, named("eval.json"))
        code, err = cli(capsys, *args, "--eval_only")
    expected = f"error: cannot write {folder / 'eval.json'}: No space left on device; {RESUMES}"
    assert code == 1 and one_line(err) == expected
    assert not (folder / "eval.json").exists() and [p for p in folder.rglob("*.tmp")] == []
    assert cli(capsys, *args, "--eval_only")[0] == 0
    assert result(folder, "eval.json")["accuracy"] == result(folder)["accuracy"]


def test_torch_save_on_a_full_disk_keeps_the_errno_that_torch_hides(tmp_path, monkeypatch):
    """torch's own file writer reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:672]
    ... unexpected pos``: through ``files.torch_save`` the errno survives, whichever way torch raises it."""
    from lora_zoo import resume
    from lora_zoo.files import WriteError

    with monkeypatch.context() as patch:
        fill_the_disk_for(patch, named("checkpoint.pt"))
        with pytest.raises(WriteError) as err:
            resume.save(tmp_path / "checkpoint.pt", {"step": 1, "adapters": {"a": torch.zeros(1000)}})
    assert err.value.errno == errno.ENOSPC and str(err.value) == (
        f"cannot write {tmp_path / 'checkpoint.pt'}: No space left on device; {RESUMES}")
    hidden = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")
    hidden.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # how torch raises it from a Python file
    assert lz.files.write_error(tmp_path / "x.pt", hidden).disk_full
    assert lz.files.write_error(tmp_path / "x.pt", RuntimeError("something else")) is None
    assert list(tmp_path.iterdir()) == []


# ---- 4: degenerate tasks are refused before any work -----------------------------------------------------------------
@pytest.mark.parametrize("classes, protocol, expect", [
    (1, "fewshot", "imagefolder at {folder} has 1 class: classification needs at least 2 (with one, every prediction "
                   "is right and top-1 is 100% whatever the model does)"),
    (2, "base2new", "base-to-new needs at least 2 classes in each half, 4 in all (a half of one class scores 100% "
                    "whatever the model does); imagefolder has 2"),
    (3, "base2new", "base-to-new needs at least 2 classes in each half, 4 in all (a half of one class scores 100% "
                    "whatever the model does); imagefolder has 3"),
])
def test_a_task_of_one_class_or_a_half_of_one_class_is_refused_before_any_work(classes, protocol, expect, tmp_path,
                                                                              capsys):
    """A one-class few-shot run recorded 100%, a 2-class base-to-new run (1 base, 1 new) HM 100%."""
    from datasets import build_dataset, write_synthetic_dataset

    folder = tmp_path / "birds"
    write_synthetic_dataset(folder, "imagefolder", num_classes=classes, train_per_class=4, val_per_class=1,
                            test_per_class=2, image_size=16)
    listing = sorted(p.name for p in folder.iterdir())
    code, err = cli(capsys, "--method", "lora", *TINY, "--dataset", "imagefolder", "--root_path", folder,
                    "--protocol", protocol, "--output_dir", tmp_path / "out")
    assert code == 1 and one_line(err) == "error: " + expect.format(folder=folder)
    assert not (tmp_path / "out").exists()  # no run folder, no zero-shot cache entry
    assert sorted(p.name for p in folder.iterdir()) == listing  # nor the folder's split file
    write_synthetic_dataset(folder, "imagefolder", num_classes=4, train_per_class=4, val_per_class=1,
                            test_per_class=2, image_size=16)
    assert build_dataset("imagefolder", folder, shots=1, subsample="new").num_classes == 2  # 4 classes: 2 per half



# ---- 5: no litter ----------------------------------------------------------------------------------------------------
def test_temporary_files_of_killed_writes_are_removed_when_the_run_is_claimed(data_root, tmp_path, capsys):
    """``kill -9`` inside a checkpoint write left ``.checkpoint.pt.*.tmp`` (up to 1 MB) in the finished run folder."""
    folder = run_folder(tmp_path / "out")
    (folder / "eval_on").mkdir(parents=True)
    litter = [folder / ".checkpoint.pt.k1ll3d9x.tmp", folder / ".curves.csv.a8f3k2lq.tmp",
              folder / "eval_on" / ".eurosat.json.q0w9e8r7.tmp"]
    for path in litter:
        path.write_bytes(b"\0" * (1 << 20))
    (folder / "notes.tmp").write_text("not ours: no leading dot")
    assert cli(capsys, "--method", "lora", *TINY, "--root_path", data_root, "--output_dir", tmp_path / "out")[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == [".claim", "adapters.json", "adapters.safetensors", "curves.csv",
                                                        "notes.tmp", "result.json", "train.log"]
    log = (folder / "train.log").read_text()
    assert all(f"removed {path.name}, left by a write that was killed" in log for path in litter[:2])


def test_the_demo_removes_its_temporary_folder_however_it_ends(tmp_path, capsys, monkeypatch):
    """Each demo left 9.9 MB in /tmp/lora_zoo_demo_*. Its runs here are stand-ins (the demo itself is run by
    test_runner.py): one that writes a file into the run's folder, then one that fails half-way."""
    import datasets.scenes
    import lora_zoo.experiment

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    monkeypatch.setattr(datasets.scenes, "write_task", lambda root, task: Path(root, task).mkdir(parents=True))
    seen = []

    def stand_in(cfg, **kwargs):
        seen.append(Path(cfg.output_dir))
        Path(cfg.output_dir).mkdir(exist_ok=True)
        (Path(cfg.output_dir) / f"{cfg.method}-{cfg.dataset}.json").write_text("{}")
        if fail and len(seen) == 2:
            raise ValueError("stopped half-way")
        return {"test_images": 300, "trainable_params": 1, "zero_shot_accuracy": 10.0, "accuracy": 20.0}
    monkeypatch.setattr(lora_zoo.experiment, "run_experiment", stand_in)
    for fail in (False, True):
        seen.clear()
        code = run(["--demo", "--quiet"], method="nora")
        output = capsys.readouterr()
        assert (code, len(seen)) == ((1, 2) if fail else (0, 6))
        assert seen[0].parent.parent == scratch and seen[0].parent.name.startswith("lora_zoo_demo_")
        assert list(scratch.iterdir()) == []
        assert fail or "Outputs removed with their temporary folder (--output_dir DIR keeps them)" in output.out
    fail, seen[:] = False, []
    assert run(["--demo", "--quiet", "--output_dir", str(tmp_path / "kept")], method="nora") == 0
    assert "Outputs in " + str(tmp_path / "kept") in capsys.readouterr().out
    assert len(list((tmp_path / "kept" / "runs").iterdir())) == 6


def test_the_suite_keeps_its_temporary_files_in_one_folder_it_removes(tmp_path):
    from conftest import SCRATCH

    folder = SCRATCH["folder"]
    assert folder.is_dir() and folder.name.startswith("lora_zoo_tests_")  # removed by conftest.pytest_unconfigure
    assert tmp_path.is_relative_to(folder) and Path(tempfile.gettempdir()) == folder / "tmp"
    assert os.environ["TMPDIR"] == str(folder / "tmp")  # subprocesses of tests too


def test_the_folders_readme_commands_write_are_ignored_by_git():
    """README's examples wrote scenes/, synth/, mini_b2n/ and transfer/ into the repository, unlisted."""
    readme = (REPO / "README.md").read_text()
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S))
    options = "root|output_dir|plot_dir|json|out|export_peft|export_merged|slurm"
    written = set(re.findall(rf"--(?:{options}) (\S+)", commands))
    tops = {name.split("/")[0] for name in written if not name.startswith(("/", "$", "DATA"))}
    assert {"scenes", "synth", "mini", "mini_b2n", "transfer", "augcmp"} <= tops
    ignored = {line.strip().strip("/") for line in (REPO / ".gitignore").read_text().splitlines()}
    assert sorted(tops - ignored - {"docs"}) == []  # docs/: the plots README shows, committed


# ---- 6: read-only caches: the run goes on without them and says so once ----------------------------------------------
def test_read_only_caches_are_skipped_with_one_warning_each_and_change_no_number(data_root, tmp_path, capsys,
                                                                                  monkeypatch):
    """An empty read-only --test_cache_dir failed with a raw "[Errno 30] Read-only file system", a read-only
    zero-shot cache (<output_dir>/.cache) aborted the run. Read-only here: no file can be created in them (EROFS,
    what a read-only mount gives root too), whatever the permission bits say."""
    out, test_cache = tmp_path / "out", tmp_path / "test_cache"
    read_only = [out / ".cache", test_cache]
    for folder in read_only:
        folder.mkdir(parents=True)
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and any(Path(dir).is_relative_to(folder) for folder in read_only):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    args = ["--method", "lora", *TINY, "--root_path", data_root, "--test_cache_dir", test_cache]
    code, err = cli(capsys, *args, "--output_dir", out)
    assert code == 0 and err.splitlines() == [
        f"--test_cache_dir {test_cache} is not writable (Read-only file system): running without that cache",
        f"the zero-shot cache {out / '.cache'} is not writable (Read-only file system): running without that cache"]
    assert [p for folder in read_only for p in folder.rglob("*") if p.is_file()] == []
    code, err = cli(capsys, *args, "--output_dir", out, "--seed", "2")  # said once per process
    assert code == 0 and err == ""
    monkeypatch.setattr(tempfile, "mkstemp", real)
    assert cli(capsys, "--method", "lora", *TINY, "--root_path", data_root, "--output_dir", tmp_path / "plain")[0] == 0
    skipped, plain = result(run_folder(out)), result(run_folder(tmp_path / "plain"))
    assert skipped["zero_shot_cached"] is False
    assert "Read-only file system" in (run_folder(out) / "train.log").read_text()
    for key in ("accuracy", "zero_shot_accuracy", "loss_history"):
        assert skipped[key] == plain[key], key


# ---- 7: the thread counts that trained a run -------------------------------------------------------------------------
def test_resuming_with_another_thread_count_warns_once_and_the_result_records_every_count(data_root, tmp_path, capsys,
                                                                                          monkeypatch):
    """Resumed at another --threads, a run gave 36.67% against 37.00%, and result.json named only the last count."""
    import lora_zoo.train as train

    for first, then, warning in ((2, 1, "resuming with 1 thread a run trained with 2 so far: the last bits of its "
                                        "numbers can differ from an uninterrupted run's (--threads 2 resumes it as "
                                        "it ran)"),
                                 (1, 1, None)):
        out = tmp_path / f"{first}-{then}"
        args = ["--method", "lora", *TINY, "--root_path", data_root, "--output_dir", out, "--n_iters", "5",
                "--checkpoint_every", "2"]
        with monkeypatch.context() as patch:
            patch.setattr(train, "training_step", killed_at(3))
            assert cli(capsys, *args, "--threads", first)[0] == 130
        folder = run_folder(out)
        assert torch.load(folder / "checkpoint.pt", weights_only=True)["threads"] == [first]
        code, err = cli(capsys, *args, "--threads", then)
        assert code == 0 and (one_line(err) == warning if warning else err == "")
        finished = result(folder)
        assert (finished["resumed_from"], finished["threads"], finished["threads_history"]) == (2, then, [first, then])
    assert cli(capsys, *args, "--threads", "1", "--output_dir", tmp_path / "whole")[0] == 0
    assert result(run_folder(tmp_path / "whole"))["threads_history"] == [1]


# ---- 8: the Library API from anywhere, without our datasets package --------------------------------------------------
LIBRARY_API = ("adapter", "attention", "calibration", "catalog", "checkpoint", "hooks", "inject", "kinds", "learner",
               "naming", "optim", "registry", "scoring", "peft_export", "hf_clip", "train")


def test_an_editable_install_maps_only_lora_zoo_and_the_library_api_runs_from_anywhere(tmp_path):
    """``pip install -e .`` is setuptools' editable hook (PEP 660) and a .pth file that ``site`` runs at start; both
    are done here offline: the hook builds the editable wheel of a copy of the checkout, and a fresh interpreter
    in another folder, isolated from the environment's paths (``-I``), adds the unpacked wheel as a site folder.
    ``import lora_zoo`` finds the copy; ``datasets`` is not ours (it would shadow Hugging Face's ``datasets``), and
    the Library API modules import none of it."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "checkout"
    for name in ("lora_zoo", "datasets"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", src)
    build = subprocess.run([sys.executable, "-c", "from setuptools import build_meta; "
                            f"print(build_meta.build_editable({str(tmp_path / 'dist')!r}))"],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    zipfile.ZipFile(tmp_path / "dist" / build.stdout.split()[-1]).extractall(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (f"import site, sys, json, importlib, importlib.util; site.addsitedir({str(tmp_path / 'site')!r})\n"
              f"import lora_zoo as lz, torch\n"
              f"for name in {LIBRARY_API!r}: importlib.import_module('lora_zoo.' + name)\n"
              "from lora_zoo.train import train_adapters\nfrom lora_zoo.scoring import text_features\n"
              "layer = lz.wrap_linear(torch.nn.Linear(8, 8), 'lora', rank=2)\n"
              "ours = importlib.util.find_spec('datasets')\n"
              "print(json.dumps({'file': lz.__file__, 'methods': lz.list_methods(), "
              "'shape': list(layer(torch.ones(3, 8)).shape), 'datasets': ours and ours.origin, "
              "'loaded': sorted(m for m in sys.modules if m.split('.')[0] == 'datasets')}))\n")
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=elsewhere, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    assert found["file"] == str(src / "lora_zoo" / "__init__.py") and found["shape"] == [3, 8]
    assert found["methods"] == lz.list_methods() and found["loaded"] == []
    assert found["datasets"] is None or not found["datasets"].startswith((str(src), str(REPO)))
    assert sorted(p.name for p in src.iterdir()) == ["datasets", "lora_zoo", "pyproject.toml"]  # nothing built here
