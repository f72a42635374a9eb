"""The configuration of one commonsense-reasoning run (``--task commonsense``): the NoRA paper's Table 1 protocol,
which is LLM-Adapters' (Hu et al., EMNLP 2023) as DoRA's scripts run it (docs/METHODS.md, "Table 1's protocol").

``CommonsenseConfig`` holds every setting with LLM-Adapters' defaults: the Alpaca template with the loss on the
whole sequence (``train_on_inputs``), cutoff 256 tokens, 120 validation records held out of the training file,
batch 16 of micro-batches of 4, 3 epochs, 100 warm-up steps then a linear decay (transformers' default schedule),
AdamW (betas 0.9/0.999, eps 1e-8, no weight decay, gradient norm clipped at 1), the validation loss every 80 steps
and the adapters of the best one kept (``load_best_model_at_end``); evaluation by 4-beam generation of 32 new
tokens. A method's options default to what LLM-Adapters and DoRA's scripts give (``METHOD_DEFAULTS``: LoRA r 32,
alpha 64, dropout 0.05 on q, k, v, up and down projections), its learning rate to ``LEARNING_RATES`` (their 3e-4,
DoRA's 2e-4). Methods of kinds other than weights (prompts and heads of CLIP) are refused in one line.

The run folder is ``output_dir/<base model>/commonsense/seed<seed>/<method>[-<run_name>]``; ``setting()`` is what
decides its numbers (every field but the bookkeeping ones), compared when a run resumes or is asked again.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from .options import Options, option

TASK = "commonsense"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
#: LLM-Adapters' LoRA (dropout 0.05) at DoRA's scripts' r 32, alpha 64, with alpha / r (no rsLoRA)
LORA_LIKE = dict(rank=32, alpha=64.0, rslora=False, dropout=0.05)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": LORA_LIKE, "loraplus": LORA_LIKE, "lorafa": LORA_LIKE, "dora": LORA_LIKE, "dylora": LORA_LIKE,
    "pissa": dict(rank=32, dropout=0.05),
    "adalora": dict(init_rank=12, target_rank=8, dropout=0.05),  # peft's AdaLoraConfig defaults (init_r, target_r)
}
#: LLM-Adapters' 3e-4 for its adapters (finetune.py); DoRA's LLaMA-7B script 2e-4 (1e-4 for LLaMA-3-8B: --lr 1e-4);
#: VeRA's own rate for LLaMA instruction tuning (its paper), its frozen pair needing larger steps
LEARNING_RATES = {"dora": 2e-4, "vera": 4e-3}
DEFAULT_LR = 3e-4
#: the display names Table 1 uses where the registry's are CLIP's
DISPLAY_NAMES = {"lora": "LoRA"}
RUN_NAME = re.compile(r"[A-Za-z0-9._=,+-]{1,120}")  # as the CLIP runs' (config.RUN_NAME): part of a folder name


@dataclass
class CommonsenseConfig(Options):
    """Everything that defines one commonsense run."""

    method: str = option("lora", "registered lora_zoo method of kind weights")
    base_model: str = option("tiny-lm", "tiny-lm, a transformers model folder, or a Hugging Face model name")
    root_path: str = option("data", "folder with commonsense_170k.json and dataset/<task>/test.json (DATASET.md)",
                            affects_result=False)
    output_dir: str = option("outputs", "results root", affects_result=False)
    run_name: Optional[str] = option(None, "name of this setting, joined to the run folder (<method>-<run_name>)")
    seed: int = option(42, "training seed (data order, dropout, init); LLM-Adapters' Trainer seed is 42")
    method_options: dict = option({}, "the method's options (layer and schedule)")
    targets: tuple[str, ...] = option(DEFAULT_TARGETS, "module-name patterns of the adapted linears")
    tasks: tuple[str, ...] = option(("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy",
                                     "ARC-Challenge", "openbookqa"), "tasks evaluated (dataset/<task>/test.json)")
    cutoff_len: int = option(256, "tokens a training sequence is cut to")
    val_set_size: int = option(120, "training records held out for the validation loss (0: none)")
    batch_size: int = option(16, "global batch: records per optimizer step, over all processes")
    micro_batch_size: int = option(4, "records per forward pass (gradient accumulation: batch / micro / processes)")
    epochs: int = option(3, "passes over the training records")
    n_iters: Optional[int] = option(None, "optimizer steps (null: epochs x the steps of one pass)")
    warmup_steps: int = option(100, "linear warm-up steps, then a linear decay to 0")
    lr: Optional[float] = option(None, "learning rate (null: the method's, LEARNING_RATES: 3e-4, DoRA 2e-4)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient norm clipping (transformers' Trainer default)")
    eval_step: int = option(80, "optimizer steps between validation losses; the best one's adapters are kept")
    precision: Optional[Literal["fp32", "fp16", "bf16"]] = option(
        None, "fp32, or fp16 / bf16 autocast with the base weights in that dtype on CUDA (fp16 with a GradScaler); "
              "null: fp16 on CUDA (LLM-Adapters), fp32 elsewhere")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, slower)")
    pad_token: Literal["llm_adapters", "tokenizer"] = option(
        "llm_adapters", "llm_adapters: pad id 0 as LLM-Adapters sets it; tokenizer: the tokenizer's own pad token")
    eval_limit: Optional[int] = option(None, "score only the first N test records of each task (quick checks; "
                                             "recorded in result.json)")
    eval_batch_size: int = option(8, "prompts per generation batch", affects_result=False)
    num_beams: int = option(4, "beams of the generation (LLM-Adapters: 4)")
    max_new_tokens: int = option(32, "tokens generated per prompt (LLM-Adapters: 32)")
    eval_untuned: bool = option(False, "also evaluate the base model before adapting it (Table 1's untuned row)",
                                affects_result=False)
    optimizer: Optional[str] = option(None, "optimizer builder (null: the method's: adamw, loraplus, lorafa)")
    optimizer_options: dict = option({}, "options of the optimizer builder")
    device: str = option("auto", "auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)", affects_result=False)
    threads: Optional[int] = option(None, "CPU intra-op threads (null: OMP_NUM_THREADS, else the free cores)",
                                    affects_result=False)
    checkpoint_every: int = option(100, "optimizer steps between checkpoints a killed run resumes from (0: none)",
                                   affects_result=False)
    log_every: int = option(10, "optimizer steps between loss log lines", affects_result=False)
    task: Literal["commonsense"] = option(TASK, "the task (--task picks this configuration)")

    def __post_init__(self):
        from datasets.commonsense import check_task

        from .catalog import get_method, get_optimizer
        from .inject import method_options
        from .lm_models import PAD_TOKENS, resolve_base_model
        from .targets import check_patterns

        super().__post_init__()
        spec = get_method(self.method)
        if spec.kind != "weights":
            raise ValueError(f"{self.method} is a {spec.kind} method of CLIP (it learns from image features or class "
                             "prompts); --task commonsense takes weight adapters: "
                             + ", ".join(m for m in _weight_methods()))
        for name in ("cutoff_len", "batch_size", "micro_batch_size", "epochs", "eval_step", "eval_batch_size",
                     "num_beams", "max_new_tokens") + (("n_iters",) if self.n_iters is not None else ()) \
                + (("eval_limit",) if self.eval_limit is not None else ()):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_set_size", "warmup_steps", "weight_decay", "max_grad_norm", "checkpoint_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.run_name is not None and not RUN_NAME.fullmatch(self.run_name):
            raise ValueError(f"run_name must be 1-120 characters of letters, digits and . _ = , + -, got "
                             f"{self.run_name!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.targets = check_patterns(self.targets)
        self.tasks = tuple(check_task(task) for task in self.tasks)
        resolve_base_model(self.base_model)
        if self.pad_token not in PAD_TOKENS:
            raise ValueError(f"pad_token must be one of {', '.join(PAD_TOKENS)}")
        defaults = {k: v for k, v in METHOD_DEFAULTS.get(spec.layer, {}).items()
                    if any(k in c.__dataclass_fields__ for c in spec.option_classes())}
        self.method_options = {**defaults, **self.method_options}  # what apply_adapters is given
        self.method_spec, self.method_config, self.hooks_options = method_options(self.method, self.method_options)
        get_optimizer(self.optimizer or spec.optimizer).options(self.optimizer_options)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else LEARNING_RATES.get(self.method_spec.layer, DEFAULT_LR)

    @property
    def optimizer_name(self) -> str:
        return self.optimizer or self.method_spec.optimizer

    @property
    def resolved_method_options(self) -> dict[str, Any]:
        hooks = self.hooks_options.to_dict() if self.hooks_options is not None else {}
        return {**self.method_config.to_dict(), **hooks}

    @property
    def display_name(self) -> str:
        return DISPLAY_NAMES.get(self.method, self.method_spec.display_name)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def setting(self) -> tuple:
        """What decides the run's numbers: every field but bookkeeping, the method's resolved options, the lr."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("affects_result", True) and f.name not in ("method_options", "run_name")}
        flat.update({f"method_options.{k}": v for k, v in self.resolved_method_options.items()}, lr=self.learning_rate,
                    optimizer=self.optimizer_name)
        return tuple(sorted((k, _frozen(v)) for k, v in flat.items()))

    def run_dir(self) -> Path:
        from .lm_models import model_name

        leaf = self.method if self.run_name is None else f"{self.method}-{self.run_name}"
        return Path(self.output_dir, model_name(self.base_model), TASK, f"seed{self.seed}", leaf)


def _frozen(value):
    """A value as a hashable, comparable one (lists and mappings as tuples), as ``results.frozen``."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def _weight_methods() -> list[str]:
    from .catalog import get_method, list_methods

    return [m for m in list_methods() if get_method(m).kind == "weights"]


COMMONSENSE_KEYS = [f.name for f in dataclasses.fields(CommonsenseConfig) if f.name not in ("method_options",
                                                                                            "optimizer_options", "task")]


def lm_config_from(values) -> CommonsenseConfig:
    """A ``CommonsenseConfig`` from flat values (flags, YAML keys, ``--set`` pairs): field names, and
    ``method_options.<name>`` / ``optimizer_options.<name>`` (or those two as mappings); an unknown key is one line."""
    fields = {f.name for f in dataclasses.fields(CommonsenseConfig)}
    flat: dict[str, Any] = {}
    groups: dict[str, dict] = {"method_options": {}, "optimizer_options": {}}
    for key, value in values.items():
        head, _, rest = str(key).partition(".")
        if head in groups and rest:
            groups[head][rest] = value
        elif head in groups and isinstance(value, dict):
            groups[head].update(value)
        elif key in fields and key not in groups:
            flat[key] = value
        else:
            raise ValueError(f"unknown commonsense config key {key!r}; valid keys: {', '.join(COMMONSENSE_KEYS)}, "
                             "method_options.<option>, optimizer_options.<option>")
    return CommonsenseConfig(**flat, **groups)
