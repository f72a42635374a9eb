"""README's mini Table 1: the NoRA paper's Table 1 rows on tiny-lm over the generated commonsense tasks, on CPU.

Writes the eight generated tasks in LLM-Adapters' layout (``datasets/commonsense_world.py``: ``--train`` records
of each task in ``commonsense_170k.json``, ``--test`` in each ``dataset/<task>/test.json``; reused when the folder
has them, so two invocations on other ``--rows`` can share one output folder), then runs
``main.py --task commonsense`` for LoRA r16 (alpha 32), LoRA r32 (alpha 64), LoKr, AdaLoRA, NoRA and AIRA with
the protocol's settings (batch 16 of micro-batches of 4, 3 epochs, 100 warm-up steps, cutoff 256, 120 validation
records, 4-beam generation of 32 tokens) at ``--lr`` for every method; the first run also scores the untuned
model. Then prints ``make_table --task commonsense``.

    OMP_NUM_THREADS=1 python scripts/mini_table1.py --out /tmp/mini_table1 --lr 3e-3   # about 45 minutes, one core
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets.commonsense_world import write_commonsense  # noqa: E402
from lora_zoo import cli  # noqa: E402

ROWS = [  # (method, run name, extra flags): Table 1's rows, and AIRA
    ("lora", "r16", ["--rank", "16", "--alpha", "32"]),
    ("lora", "r32", ["--rank", "32", "--alpha", "64"]),
    ("lokr", None, []),
    ("adalora", None, []),
    ("nora", None, []),
    ("aira", None, []),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=600, help="training records per task")
    parser.add_argument("--test", type=int, default=50, help="test records per task")
    parser.add_argument("--lr", default=None, help="one learning rate for every row (default: each method's)")
    parser.add_argument("--rows", nargs="*", help="run only these run names / methods (e.g. r16 nora)")
    args, extra = parser.parse_known_args(argv)
    data = args.out / "data"
    if not (data / "commonsense_170k.json").is_file():  # a second invocation on other rows reuses it
        write_commonsense(data, args.train, args.test, seed=0)
    for index, (method, run_name, flags) in enumerate(ROWS):
        if args.rows and (run_name or method) not in args.rows:
            continue
        started = time.perf_counter()
        argv = ["--task", "commonsense", "--method", method, "--root_path", str(data), "--output_dir",
                str(args.out / "runs"), "--quiet", *flags, *(["--run_name", run_name] if run_name else []),
                *(["--lr", args.lr] if args.lr else []), *(["--eval_untuned", "true"] if index == 0 else []), *extra]
        code = cli.run(argv)
        print(f"{method} {run_name or ''}: exit {code}, {time.perf_counter() - started:.0f}s", file=sys.stderr,
              flush=True)
        if code:
            return code
    from scripts import make_table

    return make_table.main([str(args.out / "runs"), "--task", "commonsense", "--format", "md"])


if __name__ == "__main__":
    sys.exit(main())
