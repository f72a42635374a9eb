"""The shape of the codebase: one home per setting, one file per method, no import cycles, small files.

The end-to-end check copies the repository's code to a temporary folder, adds one
file defining a throwaway method there and nothing else, and asks every tool
(registry, ``main.py --help``, the sweep, the table, the benchmark) about it.
"""
import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lora_zoo as lz
from conftest import tiny_clip
from lora_zoo.config import TRAIN_KEYS, ExperimentConfig, TrainConfig, merge_values, read_yaml

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["lora_zoo", "datasets", "scripts", "configs", "main.py", "main_nora.py", "main_aira.py", "pyproject.toml"]


# ---- layers as import contracts (pyproject.toml [tool.importlinter]), no large file or function -----------
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # import-linter: tests/requirements.txt
PLANTED = {  # where, what is appended, the contract that must break
    "upward import (the adapter base imports the loop)":
        ("lora_zoo/adapter.py", "\n\ndef _planted():\n    from .train import evaluate\n", "lora_zoo is layered"),
    "a module placed in no layer": ("lora_zoo/planted.py", "from .files import write_json\n", "lora_zoo is layered"),
    "a cycle through the package root (__init__)":
        ("lora_zoo/provenance.py", "\n\ndef _planted():\n    from lora_zoo import load_adapters\n", "the lora_zoo package root"),
    "datasets importing the adapter library":
        ("datasets/splits.py", "\n\ndef _planted():\n    from lora_zoo.adapter import AdapterLinear\n",
         "datasets reads data"),
    "an import cycle inside datasets": ("datasets/folders.py", "\nfrom .registry import get_spec\n", "no import cycle"),
    "a dynamic import climbing a layer (the registry imports the loop through importlib)":
        ("lora_zoo/registry.py", "\n\ndef _planted():\n    import importlib\n    importlib.import_module('lora_zoo.train')\n",
         "modules import each other by plain imports"),
}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in proc.stdout


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_import_contracts_catch_a_planted_violation(case, tmp_path):
    """Function-level imports and imports of the package root count: each plant breaks its contract."""
    for name in ("lora_zoo", "datasets", "pyproject.toml"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    where, code, contract = PLANTED[case]
    with open(tmp_path / where, "a") as handle:
        handle.write(code)
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert contract in proc.stdout.split("Broken contracts")[1], proc.stdout[-2000:]  # (an upward import is a cycle too)


def imported_after(code: str, cwd: Path = REPO) -> set[str]:
    """The top-level packages and lora_zoo modules a fresh interpreter has imported after running ``code``."""
    script = code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = json.loads(proc.stdout.splitlines()[-1])
    return {m.split(".")[0] for m in modules} | {m for m in modules if m.startswith("lora_zoo.")}


def test_reading_a_dataset_imports_neither_torch_open_clip_nor_the_adapter_library(data_root):
    loaded = imported_after(f"import datasets; ds = datasets.build_dataset('dtd', {str(data_root)!r}, shots=2, seed=1)"
                            f"\nfrom datasets.check import main; main(['--root_path', {str(data_root)!r}])")
    assert not loaded & {"torch", "open_clip", "torchvision"}
    assert {m for m in loaded if m.startswith("lora_zoo.")} <= {"lora_zoo.files", "lora_zoo.host"}


def test_a_method_lookup_imports_methods_not_the_pipeline():
    loaded = imported_after("from lora_zoo.catalog import get_method; assert get_method('nora').lr > 0")
    assert "lora_zoo.nora" in loaded and "torch" in loaded  # the methods, which need torch
    assert not loaded & {"open_clip", "torchvision", "lora_zoo.experiment", "lora_zoo.train", "lora_zoo.cli",
                         "lora_zoo.config", "lora_zoo.inject"}


def test_reading_results_imports_no_torch():
    assert not imported_after("import lora_zoo.results, lora_zoo.runs") & {"torch", "open_clip", "numpy"}


def test_no_function_over_60_lines_without_a_reason():
    """A function longer than 60 lines says why on the line above it (``# long: ...``)."""
    long = []
    for path in [p for d in ("lora_zoo", "datasets") for p in (REPO / d).glob("*.py")]:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if not lines[first - 2].strip().startswith("# long:"):
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long, long


def test_no_file_over_400_lines():
    files = [p for d in ("lora_zoo", "datasets", "scripts") for p in (REPO / d).glob("*.py")]
    files += [REPO / "main.py"]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


# ---- one home for every setting ----------------------------------------------------------------
def field_defaults(cls) -> dict:
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.metadata.get("fallback", f.default if f.default is not dataclasses.MISSING
                                   else f.default_factory()) for f in dataclasses.fields(cls)}


def test_no_config_file_restates_a_default():
    """Each YAML in configs/ holds only what differs from the dataclass defaults it overrides
    (for ``lr``: from the method's registered protocol lr)."""
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    experiment, train = field_defaults(ExperimentConfig), field_defaults(TrainConfig)
    for path in files:
        values = {}
        merge_values(values, read_yaml(path), str(path))
        spec = lz.get_method(values.get("method", experiment["method"]))
        for key, value in values.items():
            if key == "method_options":
                for name, option in value.items():  # the default it overrides, resolved with the file's other options
                    others = {k: v for k, v in value.items() if k != name}
                    try:
                        resolved = {**lz.build_config(spec.name, **others).to_dict(),
                                    **field_defaults(spec.hooks_options_class or type(None))}
                    except ValueError:
                        continue  # the file needs it
                    assert option != resolved.get(name), f"{path.name}: method_options.{name} is the default"
            elif key == "lr":
                assert float(value) != spec.lr, f"{path.name}: lr is {spec.name}'s registered lr"
            elif key in TRAIN_KEYS:
                assert value != train[key], f"{path.name}: {key} is the default"
            elif key != "method":
                assert value != experiment[key], f"{path.name}: {key} is the default"


def test_every_method_has_its_metadata_and_its_options_as_flags():
    import main

    for method in lz.list_methods():
        spec = lz.get_method(method)
        assert spec.display_name and spec.citation and spec.lr > 0 and spec.optimizer in lz.list_optimizers()
        flags = {a.dest for a in main.build_parser(method)._actions}
        for options_class in spec.option_classes():
            for f in dataclasses.fields(options_class):
                assert f"method_options.{f.name}" in flags, (method, f.name)


# ---- what is saved is what rebuilds the layer ---------------------------------------------------
def train_steps(model, images, texts, steps=3, **optimizer):
    opt = lz.build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), **optimizer)
    hooks = lz.training_hooks(model, steps)
    model.train()
    for step in range(steps):
        hooks.before_forward(step)
        loss = (model.encode_image(images) @ model.encode_text(texts).t()).pow(2).mean() + hooks.regularizer()
        opt.zero_grad()
        loss.backward()
        hooks.after_backward(step)
        opt.step()
        hooks.after_step(step)
    hooks.finish()
    return model.eval()


@pytest.mark.parametrize("trained, loaded", [
    (("loraplus", {}, {"lr_ratio": 16.0}), ("loraplus", {})),   # evaluated under another lr_ratio: same layer
    (("loraplus", {}, {"lr_ratio": 16.0}), ("lora", {})),
    (("adalora", {"target_rank": 2, "delta_t": 1, "t_init": 0.0}, {}), ("adalora", {"target_rank": 1})),
    (("pissa", {"rank": 2}, {"optimizer": "lorafa"}), ("pissa", {"rank": 2})),
])
def test_checkpoint_loads_whatever_optimizer_or_schedule_trained_it(trained, loaded, images, texts, tmp_path):
    method, options, optimizer = trained
    model = tiny_clip()
    lz.apply_adapters(model, method, **options)
    with torch.no_grad():
        untrained = model.encode_image(images)
    train_steps(model, images, texts, **optimizer)
    lz.save_adapters(model, tmp_path / "a.safetensors")
    assert "lr_ratio" not in json.loads((tmp_path / "a.json").read_text())["config"]
    with torch.no_grad():
        expected = model.encode_image(images)
    assert (expected - untrained).abs().max() > 1e-4  # trained: the comparison below is not of two inits
    other = tiny_clip()
    lz.apply_adapters(other, loaded[0], **{**{k: v for k, v in options.items() if k == "rank"}, **loaded[1]})
    lz.load_adapters(other, tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(other.encode_image(images), expected)


def test_loraplus_optimizer_with_pissa_from_the_command_line(data_root, tmp_path, capsys):
    import main

    code = main.run(["--method", "pissa", "--optimizer", "loraplus", "--lr_ratio", "4", "--root_path", str(data_root),
                     "--shots", "1", "--backbone", "tiny-vit", "--n_iters", "2", "--batch_size", "4",
                     "--num_workers", "0", "--eval_batch_size", "16", "--output_dir", str(tmp_path), "--quiet"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "tiny-vit/dtd/1shots/seed1/pissa/result.json").read_text())
    assert result["optimizer"] == "loraplus" and result["config"]["train"]["optimizer_options"] == {"lr_ratio": 4}
    lr = lz.get_method("pissa").lr
    groups = {g["name"]: g for g in result["optimizer_groups"]}
    assert groups["up (B)"]["lr"] == pytest.approx(4 * lr) and groups["down (A)"]["lr"] == pytest.approx(lr)
    assert groups["up (B)"]["parameters"] == 12 * 64 * 2 and groups["down (A)"]["parameters"] == 12 * 2 * 64


# ---- a method is one file (of any kind), one catalogue line, one test row ---------------------------------
TOY_METHOD = '''
"""A throwaway method written by tests/test_architecture.py: LoRA whose update is scaled by ``gain``."""
from dataclasses import dataclass

from .lora import LoraConfig, LoraLinear
from .options import option
from .registry import register_method


@dataclass
class ToyConfig(LoraConfig):
    toy_gain: float = option(2.0, "a throwaway option")


@register_method("toy", display_name="ToyLoRA", citation="nobody, 2026", lr=3e-3)
class ToyLinear(LoraLinear):
    config_class = ToyConfig

    def factors(self, tensors):
        up, down = super().factors(tensors)
        return self.config.toy_gain * up, down
'''

TOY_PROMPT = '''
"""A throwaway prompt method written by tests/test_architecture.py: learned context tokens before each class name."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .learner import LearnerConfig, PromptLearner
from .options import option
from .registry import register_method
from .text import encode_embeddings


@dataclass
class ToyPromptConfig(LearnerConfig):
    toy_tokens: int = option(2, "learned context tokens")


# its own recipe: SGD, a constant warm-up epoch, then Dassl's per-epoch cosine, 3 epochs of batch 4
@register_method("toy_prompt", display_name="ToyPrompt", citation="nobody, 2026", lr=2e-3,
                 recipe={"optimizer": "sgd", "lr_schedule": "epoch_cosine", "warmup_epochs": 1,
                         "epochs": lambda shots, dataset: 3, "batch_size": 4, "weight_decay": 5e-4, "eta_min": 0.0})
class ToyPrompt(PromptLearner):
    config_class = ToyPromptConfig

    def __init__(self, model, config, classes, support=None):
        super().__init__(model, config, classes, support)
        width = model.token_embedding.weight.shape[1]
        self.lora_context = nn.Parameter(0.02 * torch.randn(config.toy_tokens, width))

    def class_state(self, model, classes):
        placeholder = " ".join(["X"] * self.config.toy_tokens)
        tokens = classes.tokenizer([f"{placeholder} {name}." for name in classes.names]).to(self.lora_context.device)
        embeddings = model.token_embedding(tokens)
        context = self.lora_context.to(embeddings.dtype).expand(len(tokens), -1, -1)
        embeddings = torch.cat([embeddings[:, :1], context, embeddings[:, 1 + self.config.toy_tokens:]], dim=1)
        return F.normalize(encode_embeddings(model, embeddings, tokens).float(), dim=-1)
'''

TOY_HEAD = '''
"""A throwaway head method written by tests/test_architecture.py: the text classifier plus a learned residual."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .learner import FeatureHead, LearnerConfig
from .options import option
from .registry import register_method
from .scoring import text_features


@dataclass
class ToyHeadConfig(LearnerConfig):
    toy_alpha: float = option(0.5, "scale of the learned residual")


@register_method("toy_head", display_name="ToyHead", citation="nobody, 2026", lr=1e-2,
                 recipe={"optimizer": "adam", "epochs": lambda shots, dataset: 4, "batch_size": 8,
                         "weight_decay": 0.0})
class ToyHead(FeatureHead):
    config_class = ToyHeadConfig

    @classmethod
    def views(cls, config, epochs):
        return 2

    def __init__(self, model, config, classes, support=None):
        super().__init__(model, config, classes, support)
        width = model.text_projection.shape[1]
        self.lora_residual = nn.Parameter(torch.zeros(len(self.class_names), width))

    def class_state(self, model, classes):
        with torch.no_grad():
            base = text_features(model, classes.tokens)
        if tuple(classes.names) != self.class_names:  # other classes: the text classifier alone
            return base
        return F.normalize(base + self.config.toy_alpha * self.lora_residual, dim=-1)

    def logits(self, model, features, state):
        return 100.0 * features @ state.t()
'''

#: each planted method: its file, its row in tests/method_cases.py
PLANTS = {
    "toy": (TOY_METHOD, 'dict(WEIGHTS, options=dict(rank=4, alpha=8), preserves=True, count=per_adapter(lora_count), '
                        'export=dict(form="lora", ranks={4}), precision={})'),
    "toy_prompt": (TOY_PROMPT, 'dict(kind="prompts", options=dict(toy_tokens=2), preserves=False, mergeable=False, '
                               'rank=None, count=lambda model: 2 * 64, export=dict(refused="no weight update"), '
                               'precision={})'),
    "toy_head": (TOY_HEAD, 'dict(kind="head", options=dict(), preserves=True, mergeable=False, rank=None, '
                           'count=lambda model: 4 * 32, export=dict(refused="no weight update"), precision={})'),
}


def plant(copy: Path, name: str) -> None:
    """What adding a method takes: its file, its import in the catalogue, its layer, its test row."""
    code, row = PLANTS[name]
    (copy / "lora_zoo" / f"{name}.py").write_text(code.lstrip())
    catalog = copy / "lora_zoo" / "catalog.py"
    catalog.write_text(catalog.read_text().replace("# noqa: F401\n", f"# noqa: F401\nfrom . import {name}  # noqa: F401\n", 1))
    project = copy / "pyproject.toml"
    project.write_text(project.read_text().replace('"adalora : ', f'"adalora : {name} : ', 1))  # the methods layer
    cases = copy / "tests" / "method_cases.py"
    marker = "    # (a new method's row goes above this line)\n"
    cases.write_text(cases.read_text().replace(marker, f"    {name!r}: {row},\n{marker}"))


# long: one copy of the repository, three planted methods, every tool asked about each
def test_a_new_method_of_any_kind_is_one_file_one_catalogue_line_and_one_test_row(tmp_path, data_root):
    copy = tmp_path / "repo"
    for name in SOURCES + ["tests"]:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, copy / name)
    for name in PLANTS:
        plant(copy, name)

    def run(*args):
        proc = subprocess.run([*args], cwd=copy, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    py = sys.executable
    assert lint_imports(copy).returncode == 0  # placed in the methods layer, its imports keep every contract
    listed = run(py, "-c", "import lora_zoo; print(lora_zoo.list_methods())")
    assert all(f"'{name}'" in listed for name in PLANTS)
    for name, flag, display in (("toy", "--toy_gain", "ToyLoRA"), ("toy_prompt", "--toy_tokens", "ToyPrompt"),
                                ("toy_head", "--toy_alpha", "ToyHead")):
        help_text = run(py, "main.py", "--method", name, "--help")
        assert flag in help_text and display in help_text
    # the tests of every method read the row: train, save/load, merge (refused for a learner), count, precision
    tests = run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_methods.py",
                "tests/test_precision.py", "-k", "toy")
    assert re.search(r"(\d+) passed", tests) and int(re.search(r"(\d+) passed", tests).group(1)) >= 3 * 7
    out = tmp_path / "runs"
    run("bash", "scripts/sweep.sh", "--root_path", str(data_root), "--methods", *PLANTS, "--shots", "1", "--seeds",
        "1", "--backbone", "tiny-vit", "--output_dir", str(out), "--python", py, "--",
        "--batch_size", "4", "--num_workers", "0", "--eval_batch_size", "16", "--n_iters", "2")
    results = {name: json.loads((out / f"tiny-vit/dtd/1shots/seed1/{name}/result.json").read_text()) for name in PLANTS}
    assert results["toy"]["config"]["train"]["lr"] == 3e-3 and results["toy"]["method_config"]["toy_gain"] == 2.0
    prompt = results["toy_prompt"]  # its own recipe: SGD, one warm-up epoch at 1e-5, 3 epochs of one batch
    assert (prompt["kind"], prompt["optimizer"], prompt["iterations"]) == ("prompts", "sgd", 3)
    # what the recipe gave the run, recorded for the tables (not passed on the command line: --batch_size was)
    assert {"optimizer", "epochs", "lr_schedule", "warmup_epochs"} <= set(prompt["derived_settings"])
    assert "batch_size" not in prompt["derived_settings"] and results["toy"]["derived_settings"] == []
    curves = (out / "tiny-vit/dtd/1shots/seed1/toy_prompt/curves.csv").read_text().splitlines()[1:]
    assert [float(line.split(",")[2]) for line in curves] == pytest.approx([1e-5, 2e-3, 2e-3 * (1 + 0.5) / 2])  # cos(pi/3)
    assert (results["toy_head"]["kind"], results["toy_head"]["optimizer"], results["toy_head"]["iterations"]) == \
        ("head", "adam", 4)
    for name in PLANTS:  # saved, loaded and evaluated again: the same accuracy
        evaluated = run(py, "main.py", "--method", name, "--root_path", str(data_root), "--shots", "1",
                        "--backbone", "tiny-vit", "--num_workers", "0", "--eval_batch_size", "16",
                        "--output_dir", str(out), "--eval_only", "--quiet", "--batch_size", "4", "--n_iters", "2")
        assert f"top-1 {results[name]['accuracy']:.2f}%" in evaluated
    table = run(py, "scripts/make_table.py", str(out), "--shots", "1", "--seeds", "1", "--no_reported", "--format", "md")
    for display, name in (("ToyLoRA", "toy"), ("ToyPrompt", "toy_prompt"), ("ToyHead", "toy_head")):
        assert f"| {display} (ours, {name}) |" in table
    run(py, "scripts/bench.py", "--quick", "--part", "methods", "--methods", *PLANTS, "--json",
        str(tmp_path / "bench.json"))
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["frozen", "lora r=16", *PLANTS] and all(r["trainable"] > 0 for r in rows[2:])


def test_checkpoint_from_before_an_option_existed_still_loads(images, texts, tmp_path):
    """A saved config lacking options added later resolves them to what built it (NoRA's variant options)."""
    model = tiny_clip()
    lz.apply_adapters(model, "nora", inner_rank=4, outer_rank=0.5)
    train_steps(model, images, texts, steps=2)
    lz.save_adapters(model, tmp_path / "a.safetensors")
    meta = json.loads((tmp_path / "a.json").read_text())
    for added in ("variant", "sigma_side", "inner_structure", "outer_init", "double_bias", "calibration"):
        meta["config"].pop(added)
    del meta["record_sha256"]  # written before the options were added, it was written before the digest too
    (tmp_path / "a.json").write_text(json.dumps(meta))
    with torch.no_grad():
        expected = model.encode_image(images)
    plain, adapted = tiny_clip(), tiny_clip()
    lz.apply_adapters(adapted, "nora", inner_rank=4, outer_rank=0.5)
    for target in (plain, adapted):
        lz.load_adapters(target, tmp_path / "a.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(target.encode_image(images), expected)


# ---- one function writes base weights (adapter.apply_delta) ---------------------------------------------------
IN_PLACE = {"copy_", "add_", "sub_", "mul_", "div_", "zero_", "fill_", "lerp_", "clamp_", "normal_", "uniform_",
            "addmm_", "addcmul_", "addcdiv_", "mul", "set_"} - {"mul"}
WEIGHT_NAMES = {"weight", "bias", "in_proj_weight", "in_proj_bias", "base_layer"}
#: (file, function) allowed to write a layer's weights: the one place, the q/k/v split (a new layer's copy of the
#: fused weights) and the conversion to transformers (a new model of another library, filled once)
ALLOWED_WRITES = {("lora_zoo/adapter.py", "apply_delta"), ("lora_zoo/attention.py", "_linear"),
                  ("lora_zoo/hf_clip.py", "to_hf_clip")}


def _names_in(node: ast.AST) -> set[str]:
    """Names along an expression (``a.base_layer.weight.data`` → a, base_layer, weight, data)."""
    return {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(node)
            if isinstance(n, (ast.Attribute, ast.Name))}


def base_weight_writes(path: Path, text: str = None) -> list[str]:
    """``function:line`` of every write into a layer's weight or bias in ``path``: an in-place tensor method on an
    expression naming weight/bias/base_layer, an assignment to such an attribute or to its ``.data``, and
    ``load_state_dict`` into a model."""
    tree = ast.parse(text if text is not None else path.read_text())
    found = []
    for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for node in ast.walk(function):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in IN_PLACE and _names_in(node.func.value) & WEIGHT_NAMES:
                    target = node
                elif node.func.attr == "load_state_dict" and not (_names_in(node.func.value) &
                                                                  {"optimizer", "scheduler", "scaler", "hooks"}):
                    target = node
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Attribute) and (t.attr in WEIGHT_NAMES - {"base_layer"} or t.attr == "data")
                       and (_names_in(t) & WEIGHT_NAMES) for t in targets):
                    target = node
            if target is not None:
                found.append(f"{function.name}:{node.lineno}")
    return sorted(set(found))


def test_only_apply_delta_writes_base_weights():
    """peft writes base weights in a dozen places; here every change of a layer's weight goes through
    ``adapter.apply_delta`` (merge, unmerge, residual init, DoRA, export, checkpoint load), and the q/k/v split of
    ``attention.py`` copies the fused weights into new layers once. A new direct write anywhere else fails here."""
    writes = []
    for path in sorted((REPO / "lora_zoo").glob("*.py")):
        relative = str(path.relative_to(REPO))
        writes += [f"{relative}:{w}" for w in base_weight_writes(path)
                   if (relative, w.split(":")[0]) not in ALLOWED_WRITES]
    assert not writes, writes
    assert base_weight_writes(REPO / "lora_zoo" / "attention.py") == ["_linear:31", "_linear:33"]  # it sees writes


@pytest.mark.parametrize("planted", [
    "def merge_by_hand(layer, delta):\n    layer.weight.add_(delta)\n",
    "def merge_by_hand(adapter, delta):\n    adapter.base_layer.weight.data += delta\n",
    "def swap(adapter, w):\n    adapter.base_layer.weight = w\n",
    "def restore(model, state):\n    model.load_state_dict(state)\n",
])
def test_a_planted_direct_write_is_found(planted):
    assert base_weight_writes(Path("planted.py"), planted) != []
