"""Contrastive pretraining of ``tiny-clip`` on procedural scenes; writes the weights ``lora_zoo`` ships.

CLIP's objective (Radford et al., ICML 2021) on image–caption pairs streamed from
``datasets/scenes.py``: symmetric cross-entropy between image and caption
embeddings. A short caption ("a red circle.") is true
of every red circle in the batch, so its target spreads evenly over all the images it
describes, and each image's target over all captions true of it (the plain CLIP
loss when captions are unique). AdamW with linear warm-up and cosine decay;
weight decay on matrices only, as open_clip's trainer does. The temperature is
fixed at the few-shot protocol's logit scale (100, the value CLIP's learned one
reaches), so the features are trained for the logits they will be used with.
Batch ``k`` is a function of ``(seed, k)`` and the init of ``seed``, so the same
command on the same machine (and thread count) gives the same file.

Outputs, next to ``--out``: the weights (open_clip state dict in fp16
safetensors: a few MB, loadable by ``open_clip.load_checkpoint``), ``.sha256``
(``sha256sum`` format), ``.json`` (command, timings, final loss, zero-shot
accuracy on the two downstream tasks, read back from the written file) and
``.loss.csv`` (+ ``.loss.png`` with matplotlib).

    python scripts/pretrain_tiny_clip.py        # the shipped file: about 9 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets import build_data_loader, build_dataset, build_test_transform  # noqa: E402
from datasets.scenes import TASKS, caption_matches, pretraining_batch, write_task  # noqa: E402
from lora_zoo.files import sha256_file  # noqa: E402
from lora_zoo.models import SHIPPED_WEIGHTS, TINY_CONFIGS, build_clip, checksum_file  # noqa: E402
from lora_zoo.evaluation import evaluate  # noqa: E402
from lora_zoo.scoring import LOGIT_SCALE  # noqa: E402
from lora_zoo.train import prepare_device  # noqa: E402

BACKBONE = "tiny-clip"
WEIGHT_ARGUMENTS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "seed", "threads")  # what decides them
# the downstream test splits the recorded zero-shot accuracies are measured on (tests/test_tiny_clip.py reuses them)
EVAL_TASKS = dict(train_per_class=16, val_per_class=4, test_per_class=30, seed=0)


def multi_positive_loss(image_features, text_features, logit_scale, matches: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy; ``matches[i, j]``: caption i is true of image j (the diagonal always is)."""
    logits = logit_scale * text_features @ image_features.t()          # [captions, images]
    caption_targets = matches / matches.sum(dim=1, keepdim=True)
    image_targets = (matches / matches.sum(dim=0, keepdim=True)).t()
    return (F.cross_entropy(logits, caption_targets) + F.cross_entropy(logits.t(), image_targets)) / 2


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def to_model_input(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] → the normalised float [B,3,H,W] the test transform gives for the same pixels."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std


def zero_shot(model, tokenizer, task_roots: dict) -> dict:
    """Top-1 (%) of "a photo of a {class}." prompts on each task's test split, read from disk as usual."""
    accuracies = {}
    for task, root in task_roots.items():
        dataset = build_dataset(f"scenes_{task}", root, shots=1, seed=1)
        loader = build_data_loader(dataset.test, build_test_transform(model), batch_size=300, num_workers=0)
        accuracies[task] = evaluate(model, loader, tokenizer(dataset.prompts()), torch.device("cpu"))
    return accuracies


def save_weights(model, path: Path, training: dict) -> str:
    """fp16 safetensors of the plain open_clip state dict + its ``.sha256``; returns the digest. The metadata
    holds only what decides the weights (``training``), so the same run gives the same bytes wherever it is written."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes several in no fixed order, which would change the bytes
    save_file(state, str(path), metadata={"lora_zoo": json.dumps({"backbone": BACKBONE, "training": training},
                                                                  sort_keys=True)})
    digest = sha256_file(path)
    checksum_file(path).write_text(f"{digest}  {path.name}\n")
    return digest


def save_curve(rows: list, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "lr", "zero_shot_compose", "zero_shot_names"])
        writer.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([row[0] for row in rows], [row[1] for row in rows])
    axis.set(xlabel="step", ylabel="contrastive loss", title=f"{BACKBONE} pretraining")
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="model init and the data stream")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the result depends on it)")
    parser.add_argument("--log_every", type=int, default=50, help="steps per loss-curve row")
    parser.add_argument("--eval_every", type=int, default=300, help="steps between zero-shot checks (0: only the final one)")
    parser.add_argument("--out", type=Path, default=SHIPPED_WEIGHTS[BACKBONE])
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.threads, args.log_every) < 1 or args.warmup < 0 or args.lr <= 0:
        parser.error("steps, batch_size, threads and log_every must be >= 1, warmup >= 0 and lr > 0")
    return args


def pretrain(model, tokenizer, args, task_roots: dict) -> list:
    """The training loop; returns the loss-curve rows (step, mean loss, lr, zero-shot checks)."""
    from tqdm.auto import tqdm

    model.train()
    model.logit_scale.requires_grad_(False).fill_(math.log(LOGIT_SCALE))
    mean, std = (torch.tensor(model.visual.preprocess_cfg[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    image_size = TINY_CONFIGS[BACKBONE]["vision_cfg"]["image_size"]
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trained if p.ndim >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}], lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args.warmup, args.steps))
    rows, window = [], []
    bar = tqdm(range(args.steps), desc="pretrain tiny-clip", dynamic_ncols=True)
    for step in bar:
        images, captions, codes, mentions = pretraining_batch(args.seed, step, args.batch_size, image_size)
        image_features, text_features, logit_scale = model(to_model_input(images, mean, std), tokenizer(captions))
        loss = multi_positive_loss(image_features, text_features, logit_scale,
                                   torch.from_numpy(caption_matches(codes, mentions)).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        bar.set_postfix(loss=f"{window[-1]:.3f}", refresh=False)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            checks = ["", ""]
            if args.eval_every and (step + 1) % args.eval_every == 0:
                checks = [f"{value:.2f}" for value in zero_shot(model, tokenizer, task_roots).values()]
                model.train()
                bar.write(f"step {step + 1}: loss {np.mean(window):.3f}, zero-shot compose {checks[0]}%, "
                          f"names {checks[1]}%")
            rows.append([step + 1, round(float(np.mean(window)), 4), f"{schedule.get_last_lr()[0]:.3e}", *checks])
            window = []
    bar.close()
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    command = " ".join(["python scripts/pretrain_tiny_clip.py"] + [
        shlex.quote(word) for word in (sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    prepare_device(torch.device("cpu"))
    backbone = build_clip(BACKBONE, pretrained=None, seed=args.seed)
    image_size = TINY_CONFIGS[BACKBONE]["vision_cfg"]["image_size"]
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tasks_") as workdir:
        task_roots = {task: Path(workdir) / task for task in TASKS}
        for task, root in task_roots.items():
            write_task(root, task, image_size=image_size, **EVAL_TASKS)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        rows = pretrain(backbone.model, backbone.tokenizer, args, task_roots)
        wall_seconds, cpu_seconds = time.perf_counter() - wall_start, time.process_time() - cpu_start
        training = {key: getattr(args, key) for key in WEIGHT_ARGUMENTS}
        digest = save_weights(backbone.model, args.out, training)
        shipped = build_clip(BACKBONE, pretrained=str(args.out))    # the file as users load it (fp16 → fp32)
        accuracies = zero_shot(shipped.model, shipped.tokenizer, task_roots)
    record = {"backbone": BACKBONE, "config": TINY_CONFIGS[BACKBONE], "command": command, "training": training,
              "wall_seconds": round(wall_seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
              "final_loss": rows[-1][1], "file_bytes": args.out.stat().st_size, "sha256": digest,
              "zero_shot_accuracy": accuracies, "chance": {t: 100 / len(TASKS[t].classes) for t in TASKS},
              "zero_shot_tasks": dict(EVAL_TASKS, image_size=image_size, dataset_layout="scenes_<task>",
                                      template="a photo of a {}."),
              "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__}}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    save_curve(rows, args.out.with_suffix(".loss.csv"))
    print(f"wrote {args.out} ({record['file_bytes'] / 2 ** 20:.1f} MiB, sha256 {digest})\n"
          f"{args.steps} steps in {wall_seconds:.0f}s wall, {cpu_seconds:.0f}s CPU, {args.threads} thread(s); "
          f"final loss {rows[-1][1]:.3f}\n"
          + "".join(f"zero-shot {task}: {acc:.2f}% (chance {record['chance'][task]:.1f}%)\n"
                    for task, acc in accuracies.items())
          + f"regenerate with: {command}")


if __name__ == "__main__":
    main()
