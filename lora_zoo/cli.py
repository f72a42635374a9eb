"""The command line of ``main.py``, ``main_nora.py`` and ``main_aira.py``: flags built from the settings' dataclasses.

The top layer of the package (``[tool.importlinter]`` in ``pyproject.toml``): the only module that parses
arguments and turns the library's one-line errors into exit codes; nothing in the library imports it, the
entry points and ``scripts/sweep.py`` (which plans runs with ``parse_config``) do.

    python main.py --method lora --root_path DATA --dataset dtd --shots 4 --seed 1
    python main_nora.py --root_path DATA --dataset food101 --shots 16      # NoRA (Li et al., ICCV 2025)
    python main_aira.py --root_path DATA --dataset oxford_pets --shots 1   # AIRA (Li et al., ICCV 2025)
    python main.py --method pissa --optimizer loraplus --lr_ratio 16 ...   # any method with the LoRA+ optimizer
    python main_nora.py --demo                                             # no data, no weights, CPU

Every flag is built from a dataclass field (``lora_zoo.config.ExperimentConfig``,
``TrainConfig``, the method's options, the optimizer's options), so ``--help``
shows each setting with its default. Precedence: the dataclass defaults (and the
method's registered learning rate) < ``--config FILE`` (repeatable, in order) <
explicit flags < ``--set key=value`` (repeatable; YAML values; ``method_options.<name>``
and ``optimizer_options.<name>`` reach option groups).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path

from .errors import NonFiniteError, RunClaimedError, RunFinishedError
from .files import FULL_DISK, WriteError, errno_of, write_error
from .options import yaml_value

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ACTIONS = ("config", "overrides", "eval_only", "export_merged", "export_peft", "eval_on", "overwrite", "quiet", "demo",
           "method", "task")
TASKS = ("classification", "commonsense")  # few-shot CLIP classification; LLM-Adapters' commonsense reasoning


class UsageError(ValueError):
    pass


def dataset_list(text: str) -> tuple[str, ...]:
    """``--eval_on``'s value: dataset names, comma-separated (the run checks each, before any work)."""
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def text_or_null(text: str):
    """A text option's flag value: the text as typed (``--run_name 1e-3`` stays "1e-3"), or None for null."""
    return None if yaml_value(text) is None else text


def _add_fields(group, fields, dest_prefix: str, taken: set, helps=None) -> None:
    for f in fields:
        if f.name in taken:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = ((helps or {}).get(f.name) or f.metadata.get("help", "")).replace("%", "%%")
        parse = {"str": str, "Optional[str]": text_or_null}.get(f.type if isinstance(f.type, str) else "", yaml_value)
        group.add_argument(f"--{f.name}", type=parse, default=argparse.SUPPRESS, metavar="VALUE",
                           dest=dest_prefix + f.name, help=f"{text} (default {default!r})".strip())
        taken.add(f.name)


def _add_actions(parser: argparse.ArgumentParser) -> None:
    """The flags both tasks share."""
    parser.add_argument("--task", choices=TASKS, default=argparse.SUPPRESS,
                        help="classification: few-shot CLIP (default); commonsense: the NoRA paper's Table 1 protocol "
                             "on a causal LM (--base_model; main.py --task commonsense --help)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config, e.g. configs/nora_authors.yaml (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override any config key, e.g. --set lr=1e-3 --set method_options.inner_rank=8")
    parser.add_argument("--eval_only", action="store_true", help="reload the run's adapters and evaluate them")


def _add_method_groups(parser, method, optimizer, taken: set) -> None:
    """The method's options and its optimizer's, as flags."""
    from .catalog import get_method, get_optimizer

    if method is not None:
        spec = get_method(method)
        group = parser.add_argument_group(f"{method} options ({spec.display_name}, {spec.citation}; "
                                          f"protocol lr {spec.lr:g}; method_options.<name>)")
        for options_class in spec.option_classes():
            _add_fields(group, dataclasses.fields(options_class), "method_options.", taken)
        optimizer = optimizer or spec.optimizer
    if optimizer is not None:
        options_class = get_optimizer(optimizer).options_class
        if options_class is not None:
            group = parser.add_argument_group(f"optimizer {optimizer} options (optimizer_options.<name>)")
            _add_fields(group, dataclasses.fields(options_class), "optimizer_options.", taken)


def build_lm_parser(method=None, optimizer=None, fixed_method=False) -> argparse.ArgumentParser:
    """The parser of ``--task commonsense`` (``lm_config.CommonsenseConfig``'s fields as flags)."""
    from .catalog import list_methods
    from .lm_config import COMMONSENSE_KEYS, CommonsenseConfig

    parser = argparse.ArgumentParser(description="Commonsense reasoning (the NoRA paper's Table 1, LLM-Adapters' "
                                                 "protocol) with any weight method of lora_zoo on a causal LM.")
    if not fixed_method:
        parser.add_argument("--method", default=argparse.SUPPRESS, help="registered method: " + ", ".join(list_methods()))
    _add_actions(parser)
    parser.add_argument("--export_peft", metavar="DIR", help="also save the adapters as a peft adapter of the base "
                        "model in DIR (PeftModel.from_pretrained)")
    parser.add_argument("--overwrite", action="store_true", help="train again a run that already has result.json")
    parser.add_argument("--quiet", action="store_true", help="warnings only on the console")
    taken = set(ACTIONS)
    _add_fields(parser.add_argument_group("commonsense run"),
                [f for f in dataclasses.fields(CommonsenseConfig) if f.name in COMMONSENSE_KEYS], "", taken)
    _add_method_groups(parser, method, optimizer, taken)
    return parser


def build_parser(method=None, optimizer=None, fixed_method=False) -> argparse.ArgumentParser:
    """The parser; with ``method``/``optimizer`` known, their options become flags too."""
    from datasets import list_datasets

    from .config import EXPERIMENT_KEYS, TRAIN_KEYS, ExperimentConfig, TrainConfig
    from .catalog import list_methods

    parser = argparse.ArgumentParser(description="Few-shot CLIP adaptation with any registered lora_zoo method: train and evaluate one run.")
    if not fixed_method:
        parser.add_argument("--method", default=argparse.SUPPRESS,
                            help="registered method: " + ", ".join(list_methods()))
    _add_actions(parser)
    parser.add_argument("--export_merged", metavar="PATH", help="also save merged plain open_clip weights to PATH")
    parser.add_argument("--export_peft", metavar="DIR", help="also save the adapters as a peft LoRA adapter for "
                        "transformers' CLIPModel in DIR (needs peft; README: Using an adapter in transformers)")
    parser.add_argument("--eval_on", metavar="D1,D2", type=dataset_list, default=(),
                        help="also evaluate the run's adapters on these datasets' whole test sets (cross-dataset "
                             "transfer, domain generalisation), one eval_on/<dataset>.json each; a finished run "
                             "is not trained again")
    parser.add_argument("--overwrite", action="store_true", help="train again a run that already has result.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only on the console")
    parser.add_argument("--demo", action="store_true",
                        help="CPU demo: LoRA, NoRA and AIRA few-shot on tiny-clip, pretrained by this project")
    taken = set(ACTIONS)
    experiment_fields = [f for f in dataclasses.fields(ExperimentConfig) if f.name in EXPERIMENT_KEYS]
    _add_fields(parser.add_argument_group("experiment"), experiment_fields, "", taken,
                helps={"dataset": "registered dataset: " + ", ".join(list_datasets())})
    _add_fields(parser.add_argument_group("training loop"),
                [f for f in dataclasses.fields(TrainConfig) if f.name in TRAIN_KEYS], "", taken)
    _add_method_groups(parser, method, optimizer, taken)
    return parser


def collect_overrides(args: argparse.Namespace) -> dict:
    """Explicit flags first, then ``--set`` pairs in the order given."""
    overrides = {key: value for key, value in vars(args).items() if key not in ACTIONS}
    for pair in args.overrides:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = yaml_value(value)
    return overrides


def _choices(argv, fixed_method):
    """(method, optimizer) named by flags, ``--set`` or the ``--config`` files, before the full parse."""
    from .config import read_yaml
    from .catalog import list_methods

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--optimizer", type=yaml_value)
    pre.add_argument("--config", action="append", default=[])
    pre.add_argument("--set", action="append", default=[], dest="overrides")
    known, _ = pre.parse_known_args(argv)
    values = {}
    for path in known.config:
        try:
            values.update(read_yaml(path))
        except ValueError:
            pass  # reported by the full run
    for pair in known.overrides:
        key, _, value = pair.partition("=")
        values[key.strip()] = yaml_value(value)
    named = known.method or values.get("method")
    if fixed_method is not None and named not in (None, fixed_method):
        raise UsageError(f"this entry point runs {fixed_method}; method {named!r} was asked for "
                         f"(use main.py --method {named})")
    method = fixed_method or named
    if method is not None and method not in list_methods():
        method = None  # the full run reports the unknown name
    return method, known.optimizer or values.get("optimizer")


DEMO_METHODS = ("lora", "nora", "aira")


def run_demo(output_dir, overrides: dict, quiet: bool) -> int:
    """LoRA, NoRA and AIRA few-shot on tiny-clip, a small CLIP pretrained by this project (CPU, no download); its
    data and runs go to ``output_dir``, or to a temporary folder removed however the demo ends."""
    import tempfile

    if output_dir:
        return _demo(Path(output_dir), overrides, quiet, kept=True)
    with tempfile.TemporaryDirectory(prefix="lora_zoo_demo_") as scratch:
        return _demo(Path(scratch), overrides, quiet, kept=False)


def _demo(root: Path, overrides: dict, quiet: bool, kept: bool) -> int:
    from datasets.scenes import TASKS, write_task

    from .config import load_config
    from .experiment import run_experiment

    start = time.perf_counter()
    print("DEMO - tiny-clip, a small CLIP pretrained by this project on procedural scenes and captions "
          "(lora_zoo/weights/), adapted to two few-shot tasks it was not trained on, on CPU. The scale is "
          "a sanity check of the methods, not a paper result.", flush=True)
    rows = []
    for task in TASKS:
        write_task(root / "data", task)
        for method in DEMO_METHODS:
            values = dict(root_path=str(root / "data"), output_dir=str(root / "runs"), method=method,
                          dataset=f"scenes_{task}")
            values.update({k: v for k, v in overrides.items() if k != "output_dir"})
            cfg = load_config([CONFIG_DIR / "demo.yaml"], values)
            rows.append((task, method, run_experiment(cfg, overwrite=True, progress=not quiet and sys.stderr.isatty())))
    print(f"\n{cfg.shots} shots per class, {cfg.iterations(cfg.shots * len(TASKS[task].classes))} iterations of batch {cfg.train.batch_size}, "
          f"adapters on {','.join(cfg.targets)} of both towers, each method at {cfg.train.lr_scale:g}x its "
          f"registered lr ({cfg.train.n_iters} iterations per shot where the protocol runs 500); top-1 on "
          f"{rows[-1][2]['test_images']} test images:")
    print(f"{'task':9} {'classes':>7} {'method':6} {'params':>9} {'zero-shot':>10} {'few-shot':>9}")
    for task, method, result in rows:
        classes = len(TASKS[task].classes)
        print(f"{task:9} {classes:7d} {method:6} {result['trainable_params']:9,} {result['zero_shot_accuracy']:9.1f}% "
              f"{result['accuracy']:8.1f}%")
    print(f"compose: colour+shape pairs never captioned together in pretraining (zero-shot works partly); names: "
          f"the same images under made-up names (zero-shot near chance, {100 / classes:.0f}%). "
          + (f"Outputs in {root}" if kept else "Outputs removed with their temporary folder (--output_dir DIR keeps "
             "them)") + f" ({time.perf_counter() - start:.0f}s).")
    return 0


def setup_logging(quiet: bool) -> None:
    """Console messages at INFO (WARNING with --quiet); the run's log file gets DEBUG too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def hint(err: Exception) -> str:
    """The library's one-line message (command-line hints are added where the error is handled); a full disk that
    a writer reported without our ``WriteError`` still names its file and says how to go on."""
    if isinstance(err, OSError) and not isinstance(err, WriteError) and err.filename and errno_of(err) in FULL_DISK:
        err = write_error(err.filename, err)
    return " ".join(str(err).split()) or type(err).__name__


def task_of(argv) -> str:
    """The task a command line asks for (``--task``, ``--set task=...`` or a ``--config`` file's ``task``)."""
    from .config import read_yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task")
    pre.add_argument("--config", action="append", default=[])
    pre.add_argument("--set", action="append", default=[], dest="overrides")
    known, _ = pre.parse_known_args(argv)
    task = None
    for path in known.config:
        with contextlib.suppress(ValueError):
            task = read_yaml(path).get("task", task)
    for pair in known.overrides:
        key, _, value = pair.partition("=")
        task = value.strip() if key.strip() == "task" else task
    task = known.task or task or TASKS[0]
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def parse_args(argv, method=None, on_error=None) -> argparse.Namespace:
    """The command line parsed with the flags of its task and of the method and optimizer it names (``on_error``
    replaces argparse's print-usage-and-exit, e.g. to raise)."""
    task = task_of(argv)
    chosen, optimizer = _choices(argv, method)
    build = build_lm_parser if task == "commonsense" else build_parser
    parser = build(chosen, optimizer, fixed_method=method is not None)
    if on_error is not None:
        parser.error = on_error
    args = parser.parse_args(argv)
    args.task = task
    return args


def config_from_args(args: argparse.Namespace, method=None):
    """The ``ExperimentConfig`` a parsed command line asks for (``--config`` files, flags, ``--set``)."""
    from .config import build_config, collect_values
    from .catalog import list_methods

    overrides = collect_overrides(args)
    if method is not None or "method" in args:
        overrides["method"] = method or args.method
    values = collect_values(args.config, overrides)
    if "method" not in values:
        raise UsageError("--method is required (one of: " + ", ".join(list_methods()) + ")")
    return build_config(values)


def parse_config(argv, method=None, on_error=None):
    """The ``ExperimentConfig`` that ``run(argv, method)`` would run (the sweep plans with it)."""
    return config_from_args(parse_args(list(argv), method, on_error), method)


def run(argv=None, method=None) -> int:
    """Entry point; ``method`` fixes the method (main_nora.py / main_aira.py). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv, method)
        setup_logging(args.quiet)
        if args.task == "commonsense":
            return run_commonsense_task(args, method)
        if args.demo:
            return run_demo(getattr(args, "output_dir", None), collect_overrides(args), args.quiet)
        from .experiment import run_experiment
        cfg = config_from_args(args, method)
        progress = not args.quiet and sys.stderr.isatty()
        try:
            result = run_experiment(cfg, eval_only=args.eval_only, export_path=args.export_merged,
                                    export_peft=args.export_peft, eval_on=args.eval_on,
                                    overwrite=args.overwrite, progress=progress)
        except RunClaimedError as elsewhere:  # a second sweep, a resubmitted array task: skip it, not an error
            print(f"skipped, running elsewhere: {hint(elsewhere)}", file=sys.stderr)
            return 0
        except RunFinishedError as done:  # the same command again: nothing to do
            print(f"nothing to do, {hint(done)} (--overwrite trains it again)", file=sys.stderr)
            return 0
        if args.quiet:
            print(result["summary"])
        return 0
    except KeyboardInterrupt:
        print("error: interrupted before the run finished (no result.json); the same command resumes it from its "
              "last checkpoint", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError, NonFiniteError) as err:  # every known failure becomes one line
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the run, from rank 0
            print(f"error: {hint(err)}", file=sys.stderr)
        return 1


def run_commonsense_task(args: argparse.Namespace, method=None) -> int:
    """``--task commonsense``: one run of ``lm_experiment.run_commonsense`` (under torchrun: this process's part)."""
    from .config import read_yaml
    from .lm_config import lm_config_from
    from .lm_experiment import run_commonsense

    values: dict = {}
    for path in args.config:
        values.update(read_yaml(path))
    values.update(collect_overrides(args))
    values.pop("task", None)
    if method is not None or "method" in args:
        values["method"] = method or args.method
    cfg = lm_config_from(values)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the run
    try:
        record = run_commonsense(cfg, eval_only=args.eval_only, export_peft=args.export_peft,
                                 overwrite=args.overwrite)
    except (RunClaimedError, RunFinishedError) as skipped:
        what = "skipped, running elsewhere: " if isinstance(skipped, RunClaimedError) else "nothing to do, "
        if main_rank:
            print(what + hint(skipped) + ("" if what.startswith("skipped") else " (--overwrite trains it again)"),
                  file=sys.stderr)
        return 0
    if args.quiet and main_rank:
        print(record["summary"])
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM (kill, a scheduler's time limit) stops the process as Ctrl-C does: the runner's and
    the sweep's ``KeyboardInterrupt`` handling (checkpoint kept, one line) applies to both."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None, method=None) -> None:
    """``main.py``'s entry point (``main_nora.py``/``main_aira.py`` fix ``method``): run, then exit with its code."""
    start = time.perf_counter()
    with sigterm_as_interrupt():
        code = run(argv, method)
    logging.getLogger(__name__).debug("finished in %.1fs", time.perf_counter() - start)
    sys.exit(code)
