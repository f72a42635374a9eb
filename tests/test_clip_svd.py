"""CLIP-SVD (``lora_zoo/clip_svd.py``) against the official arithmetic (HealthX-Lab/CLIP-SVD), re-implemented here.

The official layer (``svf_utils/svf_torch.py``: ``d_nsvd`` and ``SVD_Linear``) is ``torch.svd(W)``'s factors with
the singular values between them, ``y = U ((Vᵀ x) ⊙ s) + b``, s trained, on every linear of both towers; their
training step (``train.py`` ``run_training``) is CE on ``100 · cos(image, text)`` and AdamW (lr 5e-4, weight
decay 0.01). The shared behaviour (merge, save/load, counts, export) is in the per-method tables.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_zoo as lz
from conftest import cli, one_line, synthetic_datasets, tiny_clip
from lora_zoo.clip_svd import ALL_TARGETS
from lora_zoo.config import load_config
from lora_zoo.targets import find_target_linears
from lora_zoo.train import training_step

pytestmark = pytest.mark.usefixtures("one_thread")


class OfficialSvdLinear(nn.Module):
    """Their ``SVD_Linear``: ``fc_U(fc_V(x) * vector_S)`` from ``torch.svd`` of the weight, full rank."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        u, s, v = torch.svd(linear.weight.detach())
        self.U, self.V, self.bias = u, v.t(), linear.bias.detach()
        self.vector_S = nn.Parameter(s[None, :].clone())

    @property
    def weight(self):  # open_clip's text tower reads its first fc1's weight for the dtype it casts to
        return self.U

    def forward(self, x):
        return F.linear(F.linear(x, self.V) * self.vector_S, self.U, self.bias)


def official(base):
    """A copy of the split model with every targeted linear replaced by theirs."""
    model = copy.deepcopy(base)
    for name, linear in find_target_linears(model, targets=ALL_TARGETS).items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, OfficialSvdLinear(linear))
    return model


def adapted(backbone="tiny-clip"):
    base = tiny_clip(backbone)
    lz.split_attention(base)
    model = copy.deepcopy(base)
    lz.apply_adapters(model, "clip_svd", targets=ALL_TARGETS)
    return base, model


def test_the_update_is_exactly_zero_at_init_where_their_factors_rebuild_w_to_rounding(images):
    base, model = adapted("tiny-vit")
    adapters = lz.adapter_modules(model)
    assert len(adapters) == 2 * 2 * 6  # both towers, both blocks, q k v o fc1 fc2
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    for name, adapter in adapters.items():
        weight = adapter.base_layer.weight
        u, s, v = torch.svd(weight)
        torch.testing.assert_close(adapter.lora_s_init, s, atol=1e-5, rtol=1e-5)  # their singular values
        reconstruction = (u * s) @ v.t()  # what their layer computes with: W only to float rounding
        assert 0 < (reconstruction - weight).abs().max() < 1e-5 * weight.abs().max()
        assert torch.equal(adapter.delta_weight(), torch.zeros_like(weight))  # ours: exactly W at s = s₀
        inputs = x[:, :adapter.in_features]
        assert torch.equal(adapter(inputs), adapter.base_layer(inputs))
        torch.testing.assert_close(adapter(inputs), OfficialSvdLinear(adapter.base_layer)(inputs), atol=1e-5, rtol=0)
        before = weight.clone()
        adapter.merge()
        assert torch.equal(adapter.base_layer.weight, before)  # merge gives W back, bit for bit
        adapter.unmerge()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), base.encode_image(images))


def test_one_training_step_equals_theirs(images, texts):
    base, ours = adapted("tiny-vit")
    theirs = official(base)
    labels = torch.tensor([0, 2, 3])
    optimizer = lz.build_optimizer(ours, lr=5e-4, weight_decay=0.01, betas=(0.9, 0.999))
    loss = training_step(ours, images, labels, texts, optimizer, lz.training_hooks(ours, 1), 0, torch.device("cpu"))
    # their step: text features of every class with gradients, 100 · cos, CE, AdamW over every parameter
    official_optimizer = torch.optim.AdamW(theirs.parameters(), lr=5e-4, weight_decay=0.01, betas=(0.9, 0.999))
    text = F.normalize(theirs.encode_text(texts), dim=-1)
    image = F.normalize(theirs.encode_image(images), dim=-1)
    their_loss = F.cross_entropy(100 * image @ text.t(), labels)
    their_loss.backward()
    official_optimizer.step()
    assert loss.item() == pytest.approx(their_loss.item(), rel=1e-5)
    moved = 0
    for name, adapter in lz.adapter_modules(ours).items():
        layer = theirs.get_submodule(name)
        torch.testing.assert_close(adapter.lora_s.grad, layer.vector_S.grad[0], atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(adapter.lora_s.detach(), layer.vector_S.detach()[0], atol=1e-6, rtol=0)
        moved += int((adapter.lora_s - adapter.lora_s_init).abs().max() > 1e-4)  # lr 5e-4: a step of about lr
    assert moved == 24


def test_recipe_targets_and_template_are_the_official_ones_unless_given():
    cfg = load_config(overrides={"method": "clip_svd", "backbone": "tiny-vit", "shots": 4})
    assert cfg.targets == ALL_TARGETS and cfg.template == "dataset" and cfg.train.lr == 5e-4
    assert (cfg.train.n_iters, cfg.iterations(40), cfg.train.batch_size, cfg.train.weight_decay, cfg.train.eta_min,
            cfg.train.lr_schedule) == (200, 800, 32, 0.01, 1e-6, "cosine")
    clip_lora = load_config(overrides={"method": "clip_svd", "backbone": "tiny-vit", "recipe": "clip_lora"})
    assert clip_lora.train.n_iters == 500 and clip_lora.targets == ALL_TARGETS  # run defaults are not the loop's
    given = load_config(overrides={"method": "clip_svd", "backbone": "tiny-vit", "targets": "q,v",
                                   "template": "default"})
    assert given.targets == ("q", "v") and given.template == "default"
    lora = load_config(overrides={"method": "lora", "backbone": "tiny-vit"})
    assert lora.targets == ("q", "k", "v") and lora.template is None  # methods without run defaults: as before
    for dataset, epochs, template in (("dtd", 20, "default"), ("food101", 10, "dataset")):
        b2n = load_config(overrides={"method": "clip_svd_b2n", "backbone": "tiny-vit", "dataset": dataset,
                                     "protocol": "base2new"})
        assert (b2n.train.lr, b2n.train.epochs, b2n.template, b2n.targets) == (4e-4, epochs, template, ALL_TARGETS)
        assert b2n.iterations(24 * 16) == epochs * 12  # epochs of ceil(384 / 32) batches


RUN = ["--backbone", "tiny-clip", "--shots", "2", "--batch_size", "4", "--num_workers", "0", "--eval_batch_size", "16",
       "--quiet"]


def test_few_shot_run_evaluated_on_another_dataset_and_a_base_to_new_run(tmp_path, capsys):
    root = synthetic_datasets(tmp_path / "data", {"dtd": 4, "eurosat": 4})
    out = tmp_path / "out"
    code, err = cli(capsys, "--method", "clip_svd", "--root_path", root, "--output_dir", out, *RUN, "--n_iters", "2",
                    "--eval_on", "eurosat")
    assert code == 0, err
    folder = out / "tiny-clip/dtd/2shots/seed1/clip_svd"
    result = json.loads((folder / "result.json").read_text())
    assert result["config"]["targets"] == list(ALL_TARGETS) and result["config"]["template"] == "dataset"
    assert result["trainable_params"] == 4 * 6 * 128 + 4 * 6 * 64  # tiny-clip: 4 blocks, 128 / 64 wide
    assert result["iterations"] == 4 and result["merged"] is True and result["display_name"] == "CLIP-SVD"
    target = json.loads((folder / "eval_on/eurosat.json").read_text())
    assert 0 <= target["accuracy"] <= 100 and target["classes"] == 4
    code, err = cli(capsys, "--method", "clip_svd_b2n", "--root_path", root, "--output_dir", out, *RUN,
                    "--protocol", "base2new")
    assert code == 0, err
    b2n = json.loads((out / "tiny-clip/dtd/base2new/2shots/seed1/clip_svd_b2n/result.json").read_text())
    assert (b2n["config"]["train"]["lr"], b2n["iterations"], b2n["config"]["template"]) == (4e-4, 20, "default")
    assert {"base_accuracy", "new_accuracy", "harmonic_mean"} <= set(b2n)  # 2 base classes × 2 shots: 1 batch × 20


@pytest.mark.parametrize("argv, message", [
    (["--targets", "q,x"], "unknown target 'x'"),
    (["--dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
    (["--set", "method_options.rank=4"], "unknown option(s) rank for method clip_svd"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, data_root, tmp_path, capsys):
    code, err = cli(capsys, "--method", "clip_svd", "--root_path", data_root, "--output_dir", tmp_path, *RUN, *argv)
    assert code == 1 and message in one_line(err)
    assert not any(tmp_path.iterdir())
