"""One CLIP adaptation run, from an ``ExperimentConfig`` to ``result.json``: what a request does, then its stages.

Implements the protocols of docs/METHODS.md ("Experiment protocol"; CLIP-LoRA, Zanella &
Ben Ayed, CVPRW 2024; NoRA and AIRA, Li et al., ICCV 2025; base-to-new and cross-dataset
evaluation as CoOp/CoCoOp define them). ``run_experiment`` reads as its stages
(``stages.py``): prepare the data and the evaluation plan, build the model, zero-shot,
training stream, calibrate and adapt, claim the run folder, train, evaluate, save, export,
finish. A request either trains (and resumes a killed run from its checkpoint) or reloads a
finished run's adapters (``--eval_only``, an export, ``--eval_on`` targets not yet evaluated).

What it promises:
- bad input writes nothing: the data, the weights, the method's shapes, a learner's prompts of every
  class and the export paths are checked, and the zero-shot pass, decoding and calibration run, before the
  run folder exists;
- one run, one owner: the folder is claimed (``runlock.claim``) before its log or checkpoint is
  opened; a run claimed by a live process elsewhere is ``RunClaimedError`` before any data is
  read (the command line skips it), a claim left by a killed process is taken over;
- nothing wrong is recorded as finished: non-finite losses, adapters or logits stop the run
  (``NonFiniteError``), adapter files and checkpoints are checked against their sha256, an
  evaluation refuses adapters trained on other images, and ``result.json`` is written last;
- nothing trained is lost: the trained adapters stay in the checkpoint until ``result.json`` is
  written, and a failure to write (a full disk) says so.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import resume as resume_state
from . import stages
from .checkpoint import RECORD_DIGEST, config_path, load_adapters
from .config import ExperimentConfig
from .errors import RunClaimedError, RunFinishedError
from .files import FULL_DISK, WriteError, errno_of, remove_temporaries, write_error, write_json
from .kinds import kind_of
from .metrics import check_sinks
from .models import check_weights
from .provenance import RunLog, environment, peak_memory
from .runlock import claim, claimed_by
from .runs import (ADAPTER_FILE, EVAL_FILE, EVAL_ON_DIR, RESULT_FILE, STATE_FILE, dataset_name, is_finished,
                   method_record, read_result, run_dir, run_setting, saved_config, target_file)
from .train import prepare_device

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Request:
    """What one call does: ``adapt`` the model anew (train it, or resume a killed training; False: reload the finished
    run's saved method), ``evaluate`` the protocol's plan, evaluate other datasets (``targets``), export."""

    adapt: bool
    evaluate: bool
    targets: tuple[str, ...] = ()
    export_merged: Optional[str] = None
    export_peft: Optional[str] = None


def plan_request(cfg: ExperimentConfig, out: Path, eval_only: bool, overwrite: bool, export_merged=None,
                 export_peft=None, eval_on: Sequence[str] = ()) -> Request:
    """What to do for this command on the run folder ``out``; ``RunFinishedError`` when there is nothing to do."""
    if eval_on and cfg.protocol != "fewshot":  # its eval_on/ records would read as a few-shot source's transfer
        raise ValueError(f"--eval_on evaluates a few-shot run on other datasets; a {cfg.protocol} run is evaluated "
                         "by its protocol (base-to-new: on its new classes)")
    if cfg.dataset in eval_on:
        raise ValueError(f"--eval_on {cfg.dataset}: the run's own dataset (its test split is the run's evaluation)")
    if eval_only:
        return Request(adapt=False, evaluate=True, targets=tuple(eval_on), export_merged=export_merged,
                       export_peft=export_peft)
    if overwrite or not is_finished(out, cfg):
        return Request(adapt=True, evaluate=True, targets=tuple(eval_on), export_merged=export_merged,
                       export_peft=export_peft)
    pending = tuple(t for t in eval_on if not target_file(out, t).is_file())
    if export_merged is None and export_peft is None and not pending:
        raise RunFinishedError(f"run already finished: {out / RESULT_FILE} exists"
                               + (" and is evaluated on every --eval_on dataset" if eval_on else ""))
    # a finished run's saved adapters, exported (and evaluated, eval.json) or evaluated on the pending targets
    return Request(adapt=False, evaluate=export_merged is not None or export_peft is not None, targets=pending,
                   export_merged=export_merged, export_peft=export_peft)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def check_unclaimed(out: Path) -> None:
    """``RunClaimedError`` now for a run another process is training, so that a second sweep skips it before any
    data is read or the zero-shot pass and calibration run; the claim taken before training still decides."""
    holder = claimed_by(out)
    if holder is not None:
        raise RunClaimedError(f"{out} is being trained elsewhere ({holder.describe()})", holder)


def check_writable(path, what: str, named=None) -> None:
    """``path`` can be created or written (its first existing ancestor is a writable folder); nothing is created.
    The error names ``named`` (default ``path``): the file a caller asked for whose folder was checked."""
    existing = Path(path).expanduser().resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"{what} is not writable: {path if named is None else named}")


def check_inputs(cfg: ExperimentConfig, request: Request) -> None:
    """What can be checked before any data is read: the results folder, sinks, weights, export paths."""
    check_writable(cfg.output_dir, "results dir")
    check_sinks(cfg.log_to)
    check_weights(cfg.backbone, cfg.pretrained)  # missing weights offline: one line now, not after the data
    for path, what in ((request.export_merged, "merged weights"), (request.export_peft, "a peft adapter")):
        if path is None:
            continue
        if not kind_of(cfg.method).merges:
            raise ValueError(f"cannot export {what}: {kind_of(cfg.method).instead(cfg.method)}")
        if not cfg.method_config.mergeable:
            raise ValueError(f"cannot export {what}: {cfg.method} with these options depends on the batch and "
                             "cannot be folded into plain weights")
        check_writable(Path(path).expanduser().resolve().parent, "export path", named=path)
        if what.startswith("merged") and Path(path).is_dir():
            raise ValueError(f"export path is not writable: {path} (a folder)")


def open_run_folder(cfg: ExperimentConfig, out: Path, stack: contextlib.ExitStack, log: RunLog,
                    request: Request, overwrite: bool) -> Optional[dict]:
    """Create and claim the run folder, start train.log when training; returns the checkpoint to resume from.

    Claimed first, then checked again: a run another process finished meanwhile is not trained twice. The
    temporary files of writes that were killed (``kill -9`` inside a checkpoint write) are removed once claimed.
    ``overwrite`` removes what would make a killed retraining look finished."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if errno_of(err) in FULL_DISK:
            raise write_error(out, err) from None
        raise ValueError(f"results dir is not writable: {out} ({err.strerror or err})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"results dir is not writable: {out}")
    stack.enter_context(claim(out))
    for stale in remove_temporaries(out) + remove_temporaries(out / EVAL_ON_DIR):  # ours now: a killed write's
        logger.info("removed %s, left by a write that was killed", stale.name)
    if request.adapt and not overwrite and is_finished(out, cfg):
        raise RunFinishedError(f"run already finished: {out / RESULT_FILE} exists (finished by another process)")
    if request.adapt and overwrite:
        for stale in (out / STATE_FILE, out / RESULT_FILE, out / EVAL_FILE):
            stale.unlink(missing_ok=True)
    if request.adapt:  # other datasets' scores of adapters this training replaces: they would read as its own
        shutil.rmtree(out / EVAL_ON_DIR, ignore_errors=True)
    state = resume_state.load(out / STATE_FILE, run_setting(cfg)) if request.adapt else None
    if request.adapt:  # an evaluation's log is attached once its adapters are accepted (``reload_adapters``)
        log.attach(out / "train.log", append=state is not None)
    return state


def reload_adapters(model, out: Path, train_subset_sha1: str) -> None:
    """The finished run's adapters, refused when the file is not the one its result recorded or when the run was
    trained on other images than this run's few-shot set, ``train_subset_sha1`` (a re-drawn split, another folder)."""
    saved = read_result(out) or {}
    meta = load_adapters(model, out / ADAPTER_FILE)  # checks the tensors' bytes and the JSON against adapters.json
    for key, field, name in (("adapters_sha256", "sha256", ADAPTER_FILE),
                             ("adapters_record_sha256", RECORD_DIGEST, config_path(ADAPTER_FILE))):
        if saved.get(key) is not None and meta.get(field) != saved[key]:  # a file swapped, or its digest removed
            raise ValueError(f"{out / name} is not the adapter file {out / RESULT_FILE} recorded ({field} "
                             "differs): retrain the run (--overwrite)")
    current = train_subset_sha1
    if saved.get("train_subset_sha1") not in (None, current):
        raise ValueError(f"the adapters at {out} were trained on other images than this run's few-shot set "
                         f"(train_subset_sha1 {saved['train_subset_sha1'][:12]}, here {current[:12]}): refusing "
                         "to evaluate them on this data")


def kept(out: Path, err: OSError) -> OSError:
    """A failure to write after training, saying where the trained adapters are kept."""
    state = out / STATE_FILE
    if not state.is_file():
        return err
    fix = "free space" if errno_of(err) in FULL_DISK else "fix that"
    return OSError(f"{err.head if isinstance(err, WriteError) else err}; the trained adapters are kept in {state}: "
                   f"{fix} and run the same command again to finish from it without training")


def finish(out: Path, record: dict[str, Any], request: Request) -> None:
    """Write the record last (its presence means finished) and drop the checkpoint a finished run needs no more."""
    if request.adapt or request.evaluate:
        write_json(out / (RESULT_FILE if request.adapt else EVAL_FILE), record)
    if request.adapt:
        (out / STATE_FILE).unlink(missing_ok=True)
    logger.info(record["summary"])


# long: the run reads top to bottom as its stages; each is a function of stages.py
def run_experiment(cfg: ExperimentConfig, *, eval_only: bool = False, export_path=None, export_peft=None,
                   eval_on: Sequence[str] = (), overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or reload a finished run) and evaluate one run; returns the record (``result.json``'s content).

    A finished run is not trained again unless ``overwrite`` (``RunFinishedError``); exporting it, or evaluating it
    on ``eval_on`` datasets it has no ``eval_on/<dataset>.json`` for, reloads its saved adapters; a run that
    stopped early resumes from its last checkpoint.
    """
    started, out = time.perf_counter(), run_dir(cfg)
    request = plan_request(cfg, out, eval_only, overwrite, export_path, export_peft, eval_on)
    if request.adapt:
        check_unclaimed(out)
    config = cfg.to_dict() if request.adapt else saved_config(out, cfg)
    check_inputs(cfg, request)
    device = resolve_device(cfg.device)
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    threads = prepare_device(device, cfg.threads, workers)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(RunLog())
        stages.seed_everything(cfg.seed)
        data = stages.prepare_data(cfg, request.targets)
        backbone = stages.build_model(cfg, device, check_options=request.adapt)
        model, classes = backbone.model, data.classes(backbone.tokenizer)
        if request.adapt:
            stages.check_task(cfg, model, data.ds, device)
        scoring = stages.build_scoring(cfg, backbone, data.plan, workers)
        for checked in (classes, *scoring.classes):  # a learner's prompts of every class fit its text tower
            kind_of(cfg.method).check_classes(model, cfg.method, cfg.method_options, checked, classes)
        subset = stages.train_subset_record(data.ds)
        record: dict[str, Any] = {"method": cfg.method, **method_record(cfg), "dataset": dataset_name(cfg),
                                  "shots": cfg.shots,
                                  "seed": cfg.seed, "run_name": cfg.run_name, "backbone": cfg.backbone,
                                  "pretrained": cfg.pretrained, "device": str(device), "threads": threads,
                                  "num_workers": workers, "derived_settings": cfg.derived_settings}
        zero_shots, target_zero_shots = stages.zero_shot(cfg, model,
                                                         scoring.everything if request.adapt else scoring.targets,
                                                         device)
        record.update(zero_shots)
        if request.adapt:
            training = stages.training_stream(cfg, data.ds, model, workers, device)
            stages.adapt(cfg, model, data.ds, classes, training, workers)
            state = open_run_folder(cfg, out, stack, log, request, overwrite)
            logger.info("run %s | %s on %s (%d threads, %d loader workers)", out, cfg.method, device, threads, workers)
            record.update(stages.fit(cfg, model, classes, training, state, out, device, progress))
            record.update(stages.after_training(cfg, model, data.ds, classes, scoring, workers, device))
        else:
            open_run_folder(cfg, out, stack, log, request, overwrite)
            reload_adapters(model, out, subset["train_subset_sha1"])  # refused: no eval.log (bad input writes nothing)
            log.attach(out / "eval.log", append=True)
        try:
            record.update(stages.merge_for_evaluation(model))
            if request.evaluate:
                record.update(stages.evaluate_plan(cfg, model, scoring.protocol, device))
            record.update(subset)
            if request.adapt:
                record.update(stages.save_outputs(model, out))
            if request.targets:
                record["eval_on"] = stages.evaluate_targets(cfg, model, scoring.targets, target_zero_shots,
                                                            out, device)
            if request.export_merged is not None:
                record.update(stages.export_merged_weights(cfg, model, request.export_merged))
            if request.export_peft is not None:
                record.update(stages.export_peft_adapter(cfg, model, request.export_peft))
            record.update(peak_memory(device), wall_seconds=time.perf_counter() - started, config=config,
                          **environment())
            record["summary"] = stages.summary(cfg, record, data.plan, out)
            finish(out, record, request)
        except OSError as err:
            raise kept(out, err) from None
    return record


def default_workers(device: torch.device) -> int:
    from datasets.loader import default_num_workers

    return default_num_workers(device.type)
