"""One commonsense-reasoning run (``--task commonsense``), from a ``CommonsenseConfig`` to ``result.json``.

The NoRA paper's Table 1 protocol (LLM-Adapters; ``lm_config.py``) on any causal LM: read the data and the model
and check everything (a bad file, model, target pattern or option is one line and nothing is written), evaluate the
untuned model if asked, calibrate on training tokens for methods that need statistics (the first
``CALIBRATION_RECORDS`` training records, padding excluded; ``calibration: authors``: one micro-batch, padding
included), apply the method (``apply_adapters`` with module patterns), claim the run folder, train
(``lm_train.py``; resuming a killed run from its checkpoint), merge, evaluate (``lm_eval.py``), save the adapters,
export them for peft if asked, and write ``result.json`` last. It keeps the CLIP pipeline's promises: one owner per
run folder (``runlock.claim``), checkpoints and adapter files checked against their sha256, atomic writes, a
finished run not trained twice, the trained adapters kept in the checkpoint until the result is written.

Under ``torchrun`` every process runs this function (``lm_dist.Dist``): rank 0 alone claims, logs and writes;
the others follow its outcome at each step that can fail, and share the training and the evaluation.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from datasets.commonsense import read_commonsense, validation_split

from . import resume as resume_state
from .calibration import collect_token_stats
from .checkpoint import load_adapters, save_adapters
from .errors import RunClaimedError, RunFinishedError
from .files import remove_temporaries, sha256_file, write_json
from .host import available_cpus, cpus_busy_elsewhere
from .inject import apply_adapters, check_fits
from .kinds import kind_of
from .lm_config import TASK, CommonsenseConfig
from .lm_data import StepPlan, collate, tokenize_records
from .lm_dist import Dist
from .lm_eval import evaluate_commonsense
from .lm_models import default_dtype, load_causal_lm, resolve_base_model
from .lm_train import train_commonsense
from .naming import count_trainable
from .provenance import RunLog, environment, peak_memory
from .runlock import claim, claimed_by
from .runs import ADAPTER_FILE, EVAL_FILE, RESULT_FILE, STATE_FILE, read_result

logger = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.json"
EVAL_PREDICTIONS_FILE = "eval_predictions.json"  # --eval_only's, beside eval.json: the run's own stay
CALIBRATION_RECORDS = 128
VALIDATION_SEED = 42  # LLM-Adapters' train_test_split(seed=42)


def setting_dict(cfg: CommonsenseConfig) -> dict:
    import json

    return json.loads(json.dumps(dict(cfg.setting())))


def plan_request(cfg: CommonsenseConfig, out: Path, eval_only: bool, export_peft, overwrite: bool) -> bool:
    """True to train, False to reload the finished run's adapters (``--eval_only``, an export of a finished run)."""
    from .results import first_difference

    finished = read_result(out)
    if finished is not None and not overwrite:
        difference = first_difference(tuple(sorted((finished.get("setting") or {}).items())),
                                      tuple(sorted(setting_dict(cfg).items())))
        if difference and not eval_only:
            raise ValueError(f"{out / RESULT_FILE} is a finished run with other settings ({difference}); give "
                             "--run_name NAME to keep both, or --overwrite to replace it")
        if not eval_only and export_peft is None:
            raise RunFinishedError(f"run already finished: {out / RESULT_FILE} exists")
        return False
    if eval_only:
        raise ValueError(f"no finished run to evaluate at {out} (train it first)")
    return True


def _writable(path, what: str) -> None:
    import os

    existing = Path(path).expanduser().resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"{what} is not writable: {path}")


def prepare_threads(device: torch.device, threads: Optional[int]) -> int:
    import os

    if device.type == "cpu":
        torch.set_flush_denormal(True)
        if threads is None and "OMP_NUM_THREADS" not in os.environ:
            threads = max(1, round(available_cpus() - cpus_busy_elsewhere()))
        if threads is not None:
            torch.set_num_threads(threads)
    return torch.get_num_threads()


def calibrate(cfg: CommonsenseConfig, model, train: list[list[int]], pad_id: int):
    """Token statistics for methods that need them (None for the others)."""
    if not cfg.method_config.needs_calibration:
        return None
    authors = getattr(cfg.method_config, "calibration", "standard") == "authors"
    records = train[:cfg.micro_batch_size] if authors else train[:CALIBRATION_RECORDS]
    batches = [collate(records[i:i + cfg.micro_batch_size], pad_id)
               for i in range(0, len(records), cfg.micro_batch_size)]
    return collect_token_stats(model, batches, cfg.targets, include_padding=authors)


def claim_folder(out: Path, stack: contextlib.ExitStack, dist: Dist, log: RunLog, adapt: bool,
                 overwrite: bool) -> None:
    """Rank 0 creates and claims the run folder and attaches its log; every process learns the outcome."""
    failure = None
    if dist.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(claim(out))
            remove_temporaries(out)
            if adapt and overwrite:
                for stale in (out / STATE_FILE, out / RESULT_FILE):
                    stale.unlink(missing_ok=True)
            log.attach(out / ("train.log" if adapt else "eval.log"), append=(out / STATE_FILE).is_file())
        except (OSError, ValueError) as err:
            failure = (type(err).__name__, str(err))
    failure = dist.broadcast(failure)
    if failure is not None:
        kind, message = failure
        raise (RunClaimedError(message, None) if kind == "RunClaimedError" else ValueError(message))


def run_summary(cfg: CommonsenseConfig, record: dict, out: Path) -> str:
    tasks = " ".join(f"{task} {value:.1f}" for task, value in record["tasks"].items())
    return (f"{cfg.method} on {cfg.base_model} (commonsense, seed {cfg.seed}): average {record['accuracy']:.2f}% "
            f"[{tasks}]{' (first ' + str(cfg.eval_limit) + ' of each task)' if cfg.eval_limit else ''} -> {out}")


# long: the run reads top to bottom as its stages
def run_commonsense(cfg: CommonsenseConfig, *, eval_only: bool = False, export_peft=None, overwrite: bool = False,
                    dist: Optional[Dist] = None) -> dict[str, Any]:
    """Train (or reload a finished run) and evaluate one commonsense run; returns its record."""
    started = time.perf_counter()
    dist = dist or Dist.from_environment(cfg.device)
    if not dist.main:  # rank 0 speaks for the run
        logging.disable(logging.INFO)
    out = cfg.run_dir()
    adapt = plan_request(cfg, out, eval_only, export_peft, overwrite)
    holder = claimed_by(out) if adapt else None
    if holder is not None:
        raise RunClaimedError(f"{out} is being trained elsewhere ({holder.describe()})", holder)
    _writable(cfg.output_dir, "results dir")
    if export_peft is not None:
        if not cfg.method_config.mergeable:
            raise ValueError(f"cannot export a peft adapter: {cfg.method} with these options depends on the batch "
                             "and no fixed weight reproduces it")
        _writable(Path(export_peft).expanduser().resolve().parent, "export path")
    device = dist.device(cfg.device)
    precision = cfg.precision or ("fp16" if device.type == "cuda" else "fp32")
    threads = prepare_threads(device, cfg.threads)
    data = read_commonsense(cfg.root_path, cfg.tasks, cfg.eval_limit)
    model, tokenizer = load_causal_lm(cfg.base_model, device, default_dtype(precision, device), cfg.pad_token)
    if adapt:
        check_fits(model, cfg.method, targets=cfg.targets, **cfg.method_options)
    base_params = sum(p.numel() for p in model.parameters())
    train_records, val_records = validation_split(data.train, cfg.val_set_size, VALIDATION_SEED)
    train = tokenize_records(tokenizer, train_records, cfg.cutoff_len)
    validation = tokenize_records(tokenizer, val_records, cfg.cutoff_len)
    record: dict[str, Any] = {"task": TASK, "protocol": TASK, "method": cfg.method, "display_name": cfg.display_name,
                              "citation": cfg.method_spec.citation, "kind": cfg.method_spec.kind,
                              "base_model": cfg.base_model, "seed": cfg.seed, "run_name": cfg.run_name,
                              "eval_limit": cfg.eval_limit, "world_size": dist.world, "device": str(device),
                              "threads": threads, "precision": precision, "train_records": len(train),
                              "validation_records": len(validation)}
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(RunLog())
        if cfg.eval_untuned:
            untuned = evaluate_commonsense(model, tokenizer, data.tests, cfg, dist, device, precision)
            record.update(untuned_accuracy=untuned["accuracy"], untuned_tasks=untuned["tasks"])
        if adapt:
            stats = calibrate(cfg, model, train, tokenizer.pad_token_id)
            torch.manual_seed(cfg.seed)
            apply_adapters(model, cfg.method, targets=cfg.targets, stats=stats, **cfg.method_options)
        else:  # a finished run's adapters, checked before anything (eval.log) is written: refused, nothing is
            load_adapters(model, out / ADAPTER_FILE)
        claim_folder(out, stack, dist, log, adapt, overwrite)
        if adapt:
            record.update(_train(cfg, model, train, validation, out, dist, device, precision, tokenizer.pad_token_id))
        record["merged"] = kind_of(model).merge(model)
        evaluation = evaluate_commonsense(model, tokenizer, data.tests, cfg, dist, device, precision)
        predictions = evaluation.pop("predictions")
        record.update(evaluation, trainable_params=count_trainable(model), base_params=base_params,
                      **peak_memory(device))
        if dist.main:
            _write_outputs(cfg, model, out, record, predictions, adapt, export_peft, started)
    dist.barrier()
    return record


def _train(cfg, model, train, validation, out: Path, dist: Dist, device, precision: str, pad_id: int) -> dict:
    state = resume_state.load(out / STATE_FILE, cfg.setting())  # every process reads rank 0's checkpoint
    plan = StepPlan(len(train), cfg.batch_size, cfg.micro_batch_size, cfg.seed, cfg.epochs, cfg.n_iters)
    checkpoint = None
    if dist.main:
        def checkpoint(state):
            resume_state.save(out / STATE_FILE, {**state, "setting": cfg.setting()})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trained = train_commonsense(model, train, validation, cfg, plan, dist, device, precision, pad_id, state,
                                checkpoint)
    done = trained.steps - trained.resumed_from
    return dict(steps=trained.steps, resumed_from=trained.resumed_from, train_seconds=trained.seconds,
                seconds_per_step=trained.seconds / done if done else None,
                tokens_per_second=trained.tokens / trained.seconds if trained.seconds > 0 else None,
                final_loss=trained.final_loss, loss_history=trained.loss_history, validation=trained.validation,
                best_step=trained.best_step, skipped_steps=trained.skipped_steps, hooks_summary=trained.hooks_summary,
                lr=cfg.learning_rate, optimizer=cfg.optimizer_name, method_config=cfg.resolved_method_options)


def _write_outputs(cfg, model, out: Path, record: dict, predictions: dict, adapt: bool, export_peft,
                   started: float) -> None:
    """Rank 0: the adapters, the predictions, the peft export, then ``result.json`` last; an evaluation of a finished
    run (``--eval_only``) writes ``eval_predictions.json`` and ``eval.json`` beside the run's own files instead."""
    if adapt:
        save_adapters(model, out / ADAPTER_FILE)
        record["adapters_sha256"] = sha256_file(out / ADAPTER_FILE)
    write_json(out / (PREDICTIONS_FILE if adapt else EVAL_PREDICTIONS_FILE), predictions)
    if export_peft is not None:
        from .peft_export import export_peft as write_peft

        write_peft(model, export_peft, base_model_name_or_path=resolve_base_model(cfg.base_model))
        record["export_peft"] = str(export_peft)
    record.update(config=cfg.to_dict(), setting=setting_dict(cfg), wall_seconds=time.perf_counter() - started,
                  **environment())
    record["summary"] = run_summary(cfg, record, out)
    write_json(out / (RESULT_FILE if adapt else EVAL_FILE), record)
    if adapt:
        (out / STATE_FILE).unlink(missing_ok=True)
    logger.info(record["summary"])
