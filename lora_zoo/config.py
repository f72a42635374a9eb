"""The configuration of a run: ``TrainConfig`` (the loop), ``ExperimentConfig`` (everything else), YAML.

Each setting has one home, its dataclass field (default and help text):

- ``TrainConfig``: what the training loop uses, passed whole to ``train.train_adapters`` (the optimizer builder and
  its options, the schedule, iterations, batch, precision); ``lr: null`` means the method's protocol learning rate;
- ``ExperimentConfig``: method and its options, data, backbone, targets, evaluation, outputs, and ``train``;
- a method's options: its layer config and schedule options (``registry.MethodSpec``);
- a method's defaults of the others: its recipe fills the ``TrainConfig`` fields made with ``recipe_option``
  and its ``run_defaults`` the ``ExperimentConfig`` fields made with ``method_default`` (targets, template:
  CLIP-SVD adapts every linear of a block), each only where the run left it null;
- an optimizer builder's options: its ``options_class`` (``optim.py``).

``load_config(yaml_paths, overrides)`` layers YAML files and overrides over the defaults. Keys are flat: the
name of an ``ExperimentConfig`` or ``TrainConfig`` field (``lr``, ``shots``), ``method_options.<name>`` and
``optimizer_options.<name>`` (or those two as mappings). An unknown key, or a value of the wrong type, is a
one-line error naming it and where it came from: ``collect_values`` remembers the file that set each key
(``ConfigValues``), and ``build_config`` adds it to an error about a value a file set.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional

import yaml

from .options import Options, field_names, option

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the adapters' dtype
RUN_NAME = re.compile(r"[A-Za-z0-9._=,+-]{1,120}")
#: keys that hold a mapping of options rather than one value
OPTION_GROUPS = ("method_options", "optimizer_options")
OVERRIDE_SOURCE = "override"  # where flags and --set pairs come from (the command line names them itself)


def recipe_option(fallback, help: str):
    """A loop setting a method's own recipe may set (``MethodSpec.recipe``): None until the run's config resolves
    it from the recipe, else ``fallback`` (CLIP-LoRA's protocol, the LoRA family's recipe)."""
    return dataclasses.field(default=None, metadata={"help": f"{help} (null: the method's recipe, else {fallback!r})",
                                                     "affects_result": True, "fallback": fallback})


def method_default(fallback, help: str):
    """A run setting a method may default (``MethodSpec.run_defaults``): None until the run's config resolves it
    from the method, else ``fallback``. Unlike a recipe's loop settings, ``recipe: clip_lora`` keeps them."""
    return dataclasses.field(default=None, metadata={"help": f"{help} (null: the method's default, else {fallback!r})",
                                                     "affects_result": True, "fallback": fallback,
                                                     "method_default": True})


def batches_per_epoch(size: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one pass over ``size`` images: all of them (the last one short), or with ``drop_last`` only full
    ones, as Dassl's loader forms them (one batch of every image when there are fewer than ``batch_size``)."""
    return size // batch_size if drop_last and size >= batch_size else -(-size // batch_size)


LR_SCHEDULES = ("cosine", "epoch_cosine", "constant")


@dataclass
class TrainConfig(Options):
    """Settings of the one training loop (METHODS.md, "Experiment protocol").

    A field made with ``recipe_option`` is left None until resolved (``resolved``): the method's own recipe sets
    it, else its fallback does (the CLIP-LoRA protocol); ``recipe: clip_lora`` ignores the method's recipe."""

    lr: Optional[float] = option(None, "learning rate (null: the method's registered protocol lr)")
    lr_scale: float = option(1.0, "multiplies the learning rate, registered or given: one knob for every method "
                                  "of a much shorter run than the protocol's (the demo's)")
    recipe: Literal["method", "clip_lora"] = option(
        "method", "whose defaults fill the loop settings left null: the method's own recipe (its official "
                  "trainer's optimizer, schedule, epochs, batch), or clip_lora (CLIP-LoRA's loop, for a like-for-like "
                  "comparison)")
    n_iters: Optional[int] = recipe_option(500, "iterations per shot: total = n_iters x shots (unless epochs is set)")
    epochs: Optional[int] = option(None, "passes over the few-shot training set (null: n_iters x shots iterations; a "
                                         "method's recipe may set it, e.g. CoOp's 50/100/200 by shots)")
    batch_size: Optional[int] = recipe_option(32, "training batch size")
    drop_last: Optional[bool] = recipe_option(False, "drop the short last batch of each pass (Dassl's loader: when "
                                                     "the set holds at least one batch)")
    weight_decay: Optional[float] = recipe_option(1e-2, "weight decay (AdamW's decoupled; SGD's and Adam's L2)")
    decay_to_init: bool = option(False, "AdamW decay pulls tensors with a theta_0 snapshot (residual-initialised: "
                                        "NoRA, PiSSA, AIRA) toward theta_0 instead of 0; without it NoRA drifts by "
                                        "0.02-0.1 ||W|| in 8000 steps at lr 1e-3 with no task gradient (optim.py)")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    lr_schedule: Optional[Literal["cosine", "epoch_cosine", "constant"]] = recipe_option(
        "cosine", "cosine: to eta_min over the iterations, stepped every iteration (CLIP-LoRA); epoch_cosine: "
                  "Dassl's, stepped every epoch after warmup_epochs at warmup_lr; constant")
    eta_min: Optional[float] = recipe_option(1e-6, "final learning rate of the cosine schedule")
    warmup_epochs: Optional[int] = recipe_option(0, "epochs at the constant warmup_lr before the schedule starts "
                                                    "(epoch_cosine)")
    warmup_lr: Optional[float] = recipe_option(1e-5, "learning rate of the warm-up epochs")
    schedule_cycles: Optional[int] = recipe_option(1, "consecutive equal parts of the run, each a training of its own: "
                                                      "the schedule (warm-up included) and the optimizer's state "
                                                      "start again at each (PLOT++'s two stages, two Dassl runs)")
    optimizer: Optional[str] = option(None, "optimizer builder: adamw, sgd, adam, loraplus, lorafa, ... (null: the "
                                            "method's)")
    optimizer_options: Optional[dict] = recipe_option({}, "options of the optimizer builder, e.g. lr_ratio for "
                                                          "loraplus, momentum for sgd")
    precision: Optional[Literal["fp32", "fp16", "bf16"]] = option(
        None, "fp32, or fp16 / bf16 autocast (fp16 with a GradScaler); null: fp16 on CUDA, fp32 elsewhere")
    log_every: int = option(0, "iterations between loss log entries (0: about 20 entries per run)",
                            affects_result=False)
    checkpoint_every: int = option(500, "iterations between checkpoints a killed run resumes from (0: none)",
                                   affects_result=False)

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_iters", "batch_size", "epochs", "schedule_cycles"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, ok, need in (("lr", self.lr is None or self.lr > 0, "> 0"), ("lr_scale", self.lr_scale > 0, "> 0"),
                               ("weight_decay", self.weight_decay is None or self.weight_decay >= 0, ">= 0"),
                               ("eta_min", self.eta_min is None or self.eta_min >= 0, ">= 0"),
                               ("warmup_epochs", self.warmup_epochs is None or self.warmup_epochs >= 0, ">= 0"),
                               ("warmup_lr", self.warmup_lr is None or self.warmup_lr > 0, "> 0"),
                               ("log_every", self.log_every >= 0, ">= 0"),
                               ("checkpoint_every", self.checkpoint_every >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"{name} must be {need}, got {getattr(self, name)}")
        if self.lr is not None and not self.lr * self.lr_scale / (1 - self.betas[0]) < FLOAT32_MAX:
            raise ValueError(f"lr must be small enough for AdamW's first step, lr x lr_scale / (1 - beta1), to be a "
                             f"finite float32 (< {FLOAT32_MAX:.3g}), got lr {self.lr} x {self.lr_scale}")

    def resolved(self, recipe: Optional[Mapping[str, Any]] = None, lr: Optional[float] = None) -> "TrainConfig":
        """A copy with every setting left null filled: from ``recipe`` (a method's, unless ``recipe: clip_lora``),
        else from the setting's fallback; a null ``lr`` becomes ``lr`` (the method's protocol lr)."""
        recipe = {**({"lr": lr} if lr is not None else {}), **(dict(recipe or {}) if self.recipe == "method" else {})}
        unknown = sorted(set(recipe) - set(field_names(TrainConfig)))
        if unknown:
            raise ValueError(f"a method's recipe sets unknown loop setting(s) {', '.join(unknown)}")
        filled = {}
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and (f.name in recipe or "fallback" in f.metadata):
                value = recipe.get(f.name, f.metadata.get("fallback"))
                filled[f.name] = dict(value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **filled) if filled else self

    def iterations(self, shots: int, train_size: int) -> int:
        """Training iterations of a run of ``shots`` over ``train_size`` images: ``epochs`` passes, else
        ``n_iters × shots``."""
        config = self.resolved()
        if config.epochs is None:
            return config.n_iters * shots
        return config.epochs * batches_per_epoch(train_size, config.batch_size, config.drop_last)


@dataclass
class ExperimentConfig(Options):
    """Everything that defines one run besides the loop (``train``)."""

    method: str = option("lora", "registered lora_zoo method")
    dataset: str = option("dtd", "registered few-shot dataset")
    root_path: str = option("data", "folder holding the datasets (see DATASET.md)", affects_result=False)
    shots: int = option(16, "images per class (1, 2, 4, 8, 16)")
    seed: int = option(1, "few-shot sampling and training seed (1, 2, 3)")
    run_name: Optional[str] = option(None, "name of this setting, joined to the run folder (<method>-<run_name>) "
                                           "so that runs of one method with other options do not collide")
    backbone: str = option("ViT-B-16", "open_clip model name, or a tiny-* backbone built in code")
    pretrained: Optional[str] = option("openai", "open_clip pretrained tag ('none': random init)")
    method_options: dict = option({}, "the method's options (layer and schedule)")
    encoders: tuple[str, ...] = option(("vision", "text"), "towers to adapt: vision,text")
    targets: Optional[tuple[str, ...]] = method_default(("q", "k", "v"), "linears to adapt in each block: "
                                                                          "q,k,v,o,fc1,fc2")
    layers: Optional[tuple[int, ...]] = option(None, "block indices to adapt (null or 'all': every block)")
    template: Optional[str] = method_default(None, "prompt template with one {} for the class name, 'dataset' (the "
                                                   "dataset's own CoOp template) or 'default' ('a photo of a {}.', "
                                                   "also what null comes to)")
    num_workers: Optional[int] = option(None, "data loader workers (null: 0 on CPU, else min(8, CPUs))",
                                        affects_result=False)
    threads: Optional[int] = option(None, "CPU intra-op threads (null: OMP_NUM_THREADS, else the cores other "
                                          "processes leave free, shared with the loader workers)", affects_result=False)
    train_cache_mb: int = option(2048, "memory for the decoded few-shot train images (0: decode at every use)",
                                 affects_result=False)
    test_cache_dir: Optional[str] = option(None, "folder for preprocessed test images (uint8 .npy, memory-mapped, "
                                                 "shared by the runs of a sweep); null: decode every evaluation",
                                          affects_result=False)
    log_to: tuple[Literal["tensorboard", "wandb"], ...] = option(
        (), "extra training-curve sinks: tensorboard, wandb (curves.csv is always written)", affects_result=False)
    eval_batch_size: int = option(128, "evaluation batch size")
    device: str = option("auto", "auto | cpu | cuda | cuda:N", affects_result=False)
    output_dir: str = option("outputs", "results root", affects_result=False)
    backbone_seed: int = option(0, "init seed of the random tiny-* backbones (the same for every run seed)")
    protocol: Literal["fewshot", "base2new"] = option(
        "fewshot", "fewshot: train and test on every class; base2new: train on the base half of the classes "
                   "(CoOp's rule), test on base and new (its own run folder, <dataset>/base2new/...)")
    augment_on: Optional[Literal["cpu", "device"]] = option(
        None, "where training images are cropped, flipped and normalised: cpu (PIL, loader workers) or device "
              "(uint8 tensors where the model runs: same crops, pixels within 2 levels); null: device on CUDA")
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the training loop's settings"})

    def __post_init__(self):
        # checked against the libraries they name, imported here: reading this module (results, make_table)
        # must not load torch, open_clip or the method registry
        from .catalog import get_method, get_optimizer
        from .inject import method_options
        from .models import list_backbones, resolve_pretrained
        from .targets import check_targets

        if self.layers in ("all", ""):
            self.layers = None
        if self.pretrained in ("", "none", "None"):
            self.pretrained = None
        super().__post_init__()
        self.pretrained = resolve_pretrained(self.backbone, self.pretrained)
        for name in ("shots", "eval_batch_size") + (("threads",) if self.threads is not None else ()):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_cache_mb < 0 or (self.num_workers is not None and self.num_workers < 0):
            raise ValueError(f"train_cache_mb and num_workers must be >= 0, got {self.train_cache_mb}, "
                             f"{self.num_workers}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.run_name is not None and not RUN_NAME.fullmatch(self.run_name):
            raise ValueError(f"run_name must be 1-120 characters of letters, digits and . _ = , + - "
                             f"(it becomes part of a folder name), got {self.run_name!r}")
        if self.backbone not in list_backbones():
            raise ValueError(f"unknown backbone {self.backbone!r}; expected an open_clip model name "
                             "(open_clip.list_models(), e.g. ViT-B-16) or a tiny-* backbone")
        # the checkout's datasets package, imported for a run's config only: the library (TrainConfig) needs none
        from datasets.base import check_template
        from datasets.registry import get_spec as dataset_spec

        dataset_spec(self.dataset)                             # unknown dataset → one line listing names
        # unknown method / bad option → one line; resolved once, carried here for every stage (with the defaults
        # the method takes from the run's shots and dataset: ProGrad's λ)
        run_options = get_method(self.method).run_options(self.shots, self.dataset)
        #: settings the method's recipe or run options gave this run for its shots and dataset (make_table does not
        #: split a method's rows by them: they follow from the table's axes)
        self.derived_settings = sorted(f"method_options.{k}" for k in run_options if k not in self.method_options)
        self.method_options = {**run_options, **self.method_options}
        self.method_spec, self.method_config, self.hooks_options = method_options(self.method, self.method_options)
        spec = self.method_spec
        self._resolve_method_defaults(spec.run_settings(self.shots, self.dataset))
        self.encoders, self.targets = check_targets(self.encoders, self.targets)
        if self.template is not None:
            check_template(self.template)
        recipe = spec.recipe_settings(self.shots, self.dataset) if self.train.recipe == "method" else {}
        self.derived_settings += sorted(k for k in recipe if getattr(self.train, k) is None)
        self.train = self.train.resolved(recipe, lr=spec.lr)
        if self.train.precision is None:  # resolved here: the setting a run records, compares and resumes
            self.train = dataclasses.replace(self.train, precision=default_precision(self.device))
        if self.augment_on is None:
            self.augment_on = "device" if default_precision(self.device) == "fp16" else "cpu"  # i.e. on CUDA
        get_optimizer(self.optimizer).options(self.train.optimizer_options)
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")

    def _resolve_method_defaults(self, defaults: Mapping[str, Any]) -> None:
        """Each ``method_default`` setting left null: the method's default, else the setting's fallback."""
        settable = {f.name: f for f in dataclasses.fields(self) if f.metadata.get("method_default")}
        unknown = sorted(set(defaults) - set(settable))
        if unknown:
            raise ValueError(f"method {self.method} defaults unknown run setting(s) {', '.join(unknown)}")
        for name, f in settable.items():
            if getattr(self, name) is None:
                setattr(self, name, defaults.get(name, f.metadata["fallback"]))

    @property
    def optimizer(self) -> str:
        """The optimizer builder this run uses (``train.optimizer``, else the method's)."""
        return self.train.optimizer or self.method_spec.optimizer

    def iterations(self, train_size: int) -> int:
        """Training iterations of this run over a few-shot set of ``train_size`` images."""
        return self.train.iterations(self.shots, train_size)

    @property
    def resolved_method_options(self) -> dict[str, Any]:
        """The method options as ``result.json`` records them: the module's, then its hooks', all resolved."""
        hooks = self.hooks_options.to_dict() if self.hooks_options is not None else {}
        return {**self.method_config.to_dict(), **hooks}

    def to_dict(self) -> dict[str, Any]:
        def plain(value):
            return (list(value) if isinstance(value, tuple) else {k: plain(v) for k, v in value.items()}
                    if isinstance(value, dict) else value)
        return plain(dataclasses.asdict(self))


def default_precision(device: str) -> str:
    """What ``precision: null`` means on ``device`` (a name: auto, cpu, cuda:1): fp16 on CUDA, fp32 elsewhere."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "fp16" if device.startswith("cuda") else "fp32"


EXPERIMENT_KEYS = [k for k in field_names(ExperimentConfig) if k not in ("train", "method_options")]
TRAIN_KEYS = [k for k in field_names(TrainConfig) if k != "optimizer_options"]


def bookkeeping_keys() -> list[str]:
    """Keys marked ``affects_result=False``: they change how a run goes, never its numbers."""
    return [f.name for cls in (ExperimentConfig, TrainConfig) for f in dataclasses.fields(cls)
            if not f.metadata.get("affects_result", True)]


def config_keys() -> list[str]:
    """Every key a YAML file or ``--set`` accepts (besides ``<group>.<option>``)."""
    return EXPERIMENT_KEYS + TRAIN_KEYS + list(OPTION_GROUPS)


def read_yaml(path) -> dict:
    """A YAML mapping from ``path``; one-line errors for unreadable or non-mapping files."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"cannot read config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping of keys to values")
    return data


class ConfigValues(dict):
    """Flat config values (as ``merge_values`` collects them) and ``sources``: ``{key: where it was set}``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources: dict[str, str] = {}


def _with_source(err: ValueError, sources: Mapping[str, str]) -> ValueError:
    """``err`` with the file(s) that set the value(s) it names: the key its message starts with, else every key
    it mentions before any ``;`` hint (``lr``, ``method_options.rank`` or ``rank``); unchanged when none came from
    a file."""
    words = re.findall(r"[A-Za-z_][\w.]*", str(err).partition(";")[0])
    named = {}
    for key, source in sources.items():
        hits = [i for i, word in enumerate(words) if word in (key, key.rpartition(".")[2])]
        if hits and source != OVERRIDE_SOURCE:
            named[key] = (min(hits), source)
    if not named:
        return err
    first = [key for key, (at, _) in named.items() if at == 0]
    keys = first or sorted(named, key=lambda k: named[k][0])
    message = f"{err} ({'; '.join(f'{key} set in {named[key][1]}' for key in keys)})"
    try:
        return type(err)(message)
    except TypeError:  # a ValueError subclass with another constructor
        return ValueError(message)


def merge_values(values: dict, new: Mapping[str, Any], source: str) -> None:
    """Layer ``new`` (flat keys) over ``values`` in place; unknown keys are a one-line error. A ``ConfigValues``
    also records ``source`` for each key set."""
    sources = getattr(values, "sources", {})
    for key, value in new.items():
        head, _, rest = str(key).partition(".")
        if head not in config_keys() or (rest and head not in OPTION_GROUPS):
            raise ValueError(f"unknown config key {key!r} ({source}); valid keys: {', '.join(config_keys())}, "
                             "method_options.<option>, optimizer_options.<option>")
        if head in OPTION_GROUPS:
            options = values.setdefault(head, {})
            if rest:
                options[rest] = value
                sources[f"{head}.{rest}"] = source
            elif isinstance(value, dict):
                options.update(value)
                sources.update({f"{head}.{name}": source for name in value})
            else:
                raise ValueError(f"{head} must be a mapping ({source}), got {value!r}")
        else:
            values[head] = value
            sources[head] = source


def build_config(values: Mapping[str, Any]) -> ExperimentConfig:
    """An ``ExperimentConfig`` from flat ``values`` (as ``merge_values`` collects them); an error about a value
    a YAML file set names the file (when ``values`` is a ``ConfigValues``)."""
    sources = getattr(values, "sources", {})
    values = dict(values)
    train = {k: values.pop(k) for k in list(values) if k in TRAIN_KEYS}
    if "optimizer_options" in values:
        train["optimizer_options"] = values.pop("optimizer_options")
    try:
        return ExperimentConfig(**values, train=TrainConfig(**train))
    except ValueError as err:
        raise _with_source(err, sources) from None


def collect_values(yaml_paths: Iterable = (), overrides: Optional[Mapping[str, Any]] = None) -> ConfigValues:
    """Each YAML file in order, then ``overrides``, as one flat mapping of the keys that were set (and where)."""
    values = ConfigValues()
    for path in yaml_paths:
        merge_values(values, read_yaml(path), str(path))
    merge_values(values, dict(overrides or {}), OVERRIDE_SOURCE)
    return values


def load_config(yaml_paths: Iterable = (), overrides: Optional[Mapping[str, Any]] = None) -> ExperimentConfig:
    """Defaults < each YAML file in order < ``overrides`` (``{"lr": 1e-3, "method_options.rank": 4}``)."""
    return build_config(collect_values(yaml_paths, overrides))
