"""Command line for few-shot CLIP adaptation with any registered lora_zoo method.

    python main.py --method lora --root_path DATA --dataset dtd --shots 4 --seed 1
    python main_nora.py --root_path DATA --dataset food101 --shots 16      # NoRA (Li et al., ICCV 2025)
    python main_aira.py --root_path DATA --dataset oxford_pets --shots 1   # AIRA (Li et al., ICCV 2025)
    python main_nora.py --demo                                             # no data, no weights, CPU

Configuration precedence: ``ExperimentConfig`` defaults < ``configs/<method>.yaml`` <
``--config FILE`` (repeatable, in order) < explicit flags (``--lr``, the method's option
flags such as ``--inner_rank``) < ``--set key=value`` (repeatable; YAML values; dotted keys
``method_options.<option>`` reach method options). Only this file parses arguments; the
experiment itself is ``lora_zoo.experiment.run_experiment``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
COMMON_FLAGS = {  # flag: (type, help)
    "root_path": (str, "folder holding the datasets (see DATASET.md)"),
    "dataset": (str, "dtd | food101 | oxford_pets"),
    "shots": (int, "images per class (1, 2, 4, 8, 16)"),
    "seed": (int, "few-shot sampling and training seed (1, 2, 3)"),
    "backbone": (str, "open_clip model name (default ViT-B-16) or tiny-vit / tiny-demo"),
    "pretrained": (str, "open_clip pretrained tag (default openai; 'none' for random init)"),
    "output_dir": (str, "results root (default outputs)"),
    "device": (str, "auto | cpu | cuda | cuda:N"),
    "lr": (float, "learning rate"),
    "n_iters": (int, "iterations per shot (total = n_iters x shots)"),
    "batch_size": (int, "training batch size"),
    "eval_batch_size": (int, "evaluation batch size"),
    "num_workers": (int, "data loader workers"),
    "encoders": (str, "comma list: vision,text"),
    "targets": (str, "comma list of q,k,v,o,fc1,fc2"),
    "layers": (str, "comma list of block indices, or 'all'"),
    "template": (str, "prompt template with {} for the class name"),
}


class UsageError(ValueError):
    pass


def yaml_value(text: str):
    """A command-line value parsed as YAML, with ``1e-3``-style numbers read as floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _method_config_class(method):
    import lora_zoo
    try:
        return lora_zoo.get_method(method).config_class
    except ValueError:
        return None


def build_parser(method=None, fixed_method=False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if not fixed_method:
        parser.add_argument("--method", default=argparse.SUPPRESS, help="registered lora_zoo method (lora, nora, aira, ...)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="extra YAML config (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override any config key, e.g. --set lr=1e-3 --set method_options.inner_rank=8")
    for name, (kind, text) in COMMON_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, help=text)
    parser.add_argument("--eval_only", action="store_true", help="reload the run's adapters and evaluate them")
    parser.add_argument("--export_merged", metavar="PATH", help="also save merged plain open_clip weights to PATH")
    parser.add_argument("--overwrite", action="store_true", help="train again a run that already has result.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only on the console")
    parser.add_argument("--demo", action="store_true", help="CPU pipeline demo on synthetic data: NoRA vs LoRA")
    config_class = _method_config_class(method) if method else None
    if config_class is not None:
        group = parser.add_argument_group(f"{method} options (method_options.<name>)")
        taken = {a.dest for a in parser._actions}
        for f in dataclasses.fields(config_class):
            if f.name not in taken:
                group.add_argument(f"--{f.name}", type=yaml_value, default=argparse.SUPPRESS,
                                   dest=f"method_options.{f.name}", metavar="VALUE", help=f"default {f.default!r}")
    return parser


def collect_overrides(args: argparse.Namespace) -> dict:
    """Explicit flags first, then ``--set`` pairs in the order given."""
    overrides = {key: value for key, value in vars(args).items()
                 if key in COMMON_FLAGS or key.startswith("method_options.")}
    for pair in args.overrides:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = yaml_value(value)
    return overrides


def config_files(method: str, extra) -> list[Path]:
    default = CONFIG_DIR / f"{method}.yaml"
    return ([default] if default.is_file() else []) + [Path(p) for p in extra]


DEMO = dict(backbone="tiny-demo", dataset="dtd", shots=4, seed=1, n_iters=50, batch_size=32, num_workers=0,
            eval_batch_size=256, device="cpu")
DEMO_DATA = dict(num_classes=12, train_per_class=16, val_per_class=4, test_per_class=20, image_size=64)
DEMO_LR = {"lora": 2e-3, "nora": 2e-3}


def run_demo(output_dir, overrides: dict, quiet: bool) -> int:
    """NoRA against LoRA on a synthetic texture dataset with a tiny random-init open_clip model (CPU)."""
    import tempfile

    from datasets import write_synthetic_dataset
    from lora_zoo.experiment import load_config, run_experiment

    start = time.perf_counter()
    root = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="lora_zoo_demo_"))
    print("PIPELINE DEMO - synthetic textures, tiny random-init open_clip model (tiny-demo), CPU.\n"
          "It checks that data, adapters, training, merging and evaluation run end to end; "
          "its numbers are NOT paper results.", flush=True)
    write_synthetic_dataset(root / "data", dataset="dtd", **DEMO_DATA)
    chance = 100.0 / DEMO_DATA["num_classes"]
    rows = []
    for method in ("lora", "nora"):
        values = dict(DEMO, root_path=str(root / "data"), output_dir=str(root / "runs"), lr=DEMO_LR[method])
        values.update({k: v for k, v in overrides.items() if k != "output_dir"})
        cfg = load_config(config_files(method, []), dict(values, method=method))
        result = run_experiment(cfg, overwrite=True, progress=not quiet and sys.stderr.isatty())
        rows.append((method, result))
    print(f"\n{DEMO_DATA['num_classes']} classes (chance {chance:.1f}%), {DEMO['shots']} shots, "
          f"{cfg.total_iterations} iterations, adapters on {','.join(cfg.targets)} of both towers; demo lr "
          f"{DEMO_LR['lora']:g} for both (a random-init model; configs/*.yaml hold the protocol's lrs)")
    print(f"{'method':8} {'params':>9} {'before':>8} {'after':>8}")
    for method, result in rows:
        print(f"{method:8} {result['trainable_params']:9,} {result['zero_shot_accuracy']:7.1f}% {result['accuracy']:7.1f}%")
    print(f"outputs in {root}  ({time.perf_counter() - start:.0f}s). Pipeline demo, not a paper result.")
    return 0


def setup_logging(quiet: bool) -> None:
    """Console messages at INFO (WARNING with --quiet); the run's log file gets DEBUG too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def run(argv=None, method=None) -> int:
    """Entry point; ``method`` fixes the method (main_nora.py / main_aira.py). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = build_parser(method, fixed_method=method is not None).parse_known_args(argv)
    chosen = method or getattr(pre, "method", None)
    args = build_parser(chosen, fixed_method=method is not None).parse_args(argv)
    setup_logging(args.quiet)
    try:
        if args.demo:
            return run_demo(args.output_dir if "output_dir" in args else None, collect_overrides(args), args.quiet)
        if chosen is None:
            raise UsageError("--method is required (one of: " + ", ".join(__import__("lora_zoo").list_methods()) + ")")
        from lora_zoo.experiment import load_config, run_experiment
        overrides = dict(collect_overrides(args), method=chosen)
        cfg = load_config(config_files(chosen, args.config), overrides)
        progress = not args.quiet and sys.stderr.isatty()
        result = run_experiment(cfg, eval_only=args.eval_only, export_path=args.export_merged,
                                overwrite=args.overwrite, progress=progress)
        if args.quiet:
            print(result["summary"])
        return 0
    except KeyboardInterrupt:
        print("error: interrupted; the run left no result.json", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every known failure becomes one line
        from lora_zoo.train import NonFiniteLossError
        if not isinstance(err, (ValueError, OSError, TypeError, NonFiniteLossError)):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1


def main(argv=None, method=None) -> None:
    start = time.perf_counter()
    code = run(argv, method)
    logging.getLogger(__name__).debug("finished in %.1fs", time.perf_counter() - start)
    sys.exit(code)


if __name__ == "__main__":
    main()
