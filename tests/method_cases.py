"""The one table of per-method test cases: every per-method test reads its rows (peft's ``TEST_CASES``).

A registered method needs one row whose id is its name (``test_every_method_has_a_row``); further rows test
variants of it (the authors' presets, other options). A row holds:

- ``method``: the registered method (default: the row's id); ``kind``: its kind, checked against the registry;
- ``options``: small options for the tiny model (tests/test_methods.py and the others, unless a column says);
- ``preserves``: the adapted model's output equals the pretrained one's at initialisation;
- ``count``: the trainable-parameter formula, ``count(model)`` over the adapted model;
- ``mergeable``: its update folds into the weights (False: merging is refused);
- ``rank``: the option that sets its rank, checked against the layer widths before any work (None: it has
  none; ``unbounded``: VeRA's shared pair is not bounded by a layer);
- ``export``: the peft export (``form``, per-layer ``ranks``, ``options``/``targets``/``layers`` overrides),
  or ``refused``: the one-line message of a refused export (tests/test_peft_export.py); absent: not tested;
- ``precision``: trains under CPU bf16/fp16 autocast (``lr``, ``options`` overrides; tests/test_precision.py).
- ``later_stage``: trainable tensors only a later stage of the method's schedule trains (2SFS's head): a few
  steps without the method's hooks (tests/test_methods.py) leave them as they were.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from open_clip import SimpleTokenizer

import lora_zoo as lz
from lora_zoo.learner import Support

REPO = Path(__file__).resolve().parents[1]


def preset(path: str) -> dict:
    """The method and options of an authors' preset (configs/*.yaml)."""
    values = yaml.safe_load((REPO / path).read_text())
    return dict(method=values["method"], options=values["method_options"])


NORA_AUTHORS = preset("configs/nora_authors.yaml")
AIRA_AUTHORS = preset("configs/aira_authors.yaml")


def per_adapter(formula):
    """``count(model)`` from a formula of each adapter layer."""
    return lambda model: sum(formula(a) for a in lz.adapter_modules(model).values())


def lora_count(adapter):
    return adapter.config.rank * (adapter.in_features + adapter.out_features)


def nora_count(adapter):  # per inner_structure (docs/METHODS.md); the paper's NoRA is "nested" (eq. 4)
    d_out, d_in, r, k = adapter.out_features, adapter.in_features, adapter.outer_rank, adapter.inner_rank
    counts = {"nested": lambda: 2 * k * r, "output": lambda: 2 * k * d_out, "nested_full": lambda: r * r,
              "output_full": lambda: d_out * d_out, "down_parallel": lambda: k * (r + d_in),
              "up_parallel": lambda: k * (d_out + r), "none": lambda: r * (d_in + d_out)}
    return counts[adapter.config.inner_structure]()


def lorafa_count(adapter):  # A frozen: only B (d_out × r) trains
    return adapter.config.rank * adapter.out_features


def vera_count(adapter):  # d ∈ R^r, b ∈ R^{d_out}
    return adapter.config.rank + adapter.out_features


def adalora_count(adapter):  # P, Q and λ at the initial rank
    return adapter.config.init_rank * (adapter.in_features + adapter.out_features + 1)


def dora_count(adapter):  # LoRA plus the magnitude vector
    return lora_count(adapter) + adapter.out_features


def widths(model):
    """(text width, vision width) of the towers prompt learners put tokens into."""
    return model.token_embedding.weight.shape[1], model.visual.transformer.width


def maple_count(depth, n_ctx):  # per depth: a text prompt and its coupling Linear (text → vision)
    return lambda model: depth * (n_ctx * widths(model)[0] + (widths(model)[0] + 1) * widths(model)[1])


def plot_count(n_text, n_ctx, n_visual, visual_tokens):  # N text contexts of the template's n words, M visual sets
    return lambda model: n_text * n_ctx * widths(model)[0] + n_visual * visual_tokens * widths(model)[1]


def svd_count(adapter):  # CLIP-SVD: one singular value per direction
    return min(adapter.in_features, adapter.out_features)
def lokr_count(adapter):  # peft's LoKr: each side split into its divisor pair nearest the square root
    def pair(side):
        small = max(m for m in range(1, int(side ** 0.5) + 1) if side % m == 0)
        return small, side // small
    (out_l, out_k), (in_m, in_n), r = pair(adapter.out_features), pair(adapter.in_features), adapter.config.rank
    small = out_l * in_m if not (adapter.config.decompose_both and r < max(out_l, in_m) / 2) else r * (out_l + in_m)
    large = out_k * in_n if r >= max(out_k, in_n) / 2 else r * (out_k + in_n)
    return small + large


WEIGHTS = dict(kind="weights", mergeable=True, rank="rank")
HEAD = dict(kind="head", mergeable=False, rank=None, export=dict(refused="no weight update"))
PROMPTS = dict(kind="prompts", mergeable=False, rank=None, preserves=False, export=dict(refused="no weight update"),
               precision={})
PROMPT_VARIANT = {k: v for k, v in PROMPTS.items() if k not in ("export", "precision")}  # a method's other options

CASES = {
    "lora": dict(WEIGHTS, options=dict(rank=4, alpha=8), preserves=True, count=per_adapter(lora_count),
                 export=dict(form="lora", ranks={4}), precision={}),
    "lora_all_targets": dict(WEIGHTS, method="lora", options=dict(rank=4, alpha=8), preserves=True,
                             count=per_adapter(lora_count),
                             export=dict(targets=("q", "k", "v", "o", "fc1", "fc2"), layers=(1,), form="lora",
                                         ranks={4})),
    "nora": dict(WEIGHTS, options=dict(outer_rank=0.5, inner_rank=4), preserves=True, count=per_adapter(nora_count),
                 rank="outer_rank", export=dict(form="lora", ranks={8}), precision={}),  # residual: 2 r_in
    "nora_act": dict(WEIGHTS, method="nora", options=dict(outer_rank=40, inner_rank=4, act_weighted=True),
                     preserves=True, count=per_adapter(nora_count)),
    "nora_plain": dict(WEIGHTS, method="nora", options=dict(outer_rank=0.5, inner_rank=4, inner_init="lora",
                                                            residual=False),
                       preserves=True, count=per_adapter(nora_count), export=dict(form="lora", ranks={4})),
    # the authors' variant: every choice of their tables C, B and A (docs/METHODS.md); their model moves at init
    "nora_authors": dict(WEIGHTS, method="nora", options=dict(variant="authors"), preserves=False,
                         count=per_adapter(nora_count),
                         export=dict(options=NORA_AUTHORS["options"], form="lora_bias", ranks={16}),
                         precision=dict(options=NORA_AUTHORS["options"])),
    "nora_authors_output": dict(WEIGHTS, method="nora", options=dict(variant="authors", inner_structure="output",
                                                                     sigma_side="split"),
                                preserves=False, count=per_adapter(nora_count)),
    "nora_authors_nested_full": dict(WEIGHTS, method="nora", options=dict(
        variant="authors", inner_structure="nested_full", sigma_side="output", outer_rank=16,
        inner_init="kaiming_authors"), preserves=False, count=per_adapter(nora_count)),
    "nora_authors_output_full": dict(WEIGHTS, method="nora", options=dict(
        variant="authors", inner_structure="output_full", sigma_side="none", outer_rank=16,
        inner_init="kaiming_authors"), preserves=False, count=per_adapter(nora_count)),
    "nora_authors_down_parallel": dict(WEIGHTS, method="nora", options=dict(
        variant="authors", inner_structure="down_parallel", outer_rank=16, inner_init="kaiming_authors"),
        preserves=False, count=per_adapter(nora_count)),
    "nora_authors_up_parallel_kaiming_outer": dict(WEIGHTS, method="nora", options=dict(
        variant="authors", inner_structure="up_parallel", outer_init="kaiming_authors", outer_rank=16,
        inner_init="kaiming_authors"), preserves=False, count=per_adapter(nora_count)),
    "nora_authors_table_a": dict(WEIGHTS, method="nora", options=dict(variant="authors", inner_structure="none",
                                                                      sigma_side="output", outer_rank=16),
                                 preserves=False, count=per_adapter(nora_count),
                                 export=dict(options=dict(NORA_AUTHORS["options"], inner_structure="none",
                                                          outer_rank=8, sigma_side="output"),
                                             form="lora_bias", ranks={8})),
    "nora_authors_table_a_kaiming_outer": dict(WEIGHTS, method="nora", options=dict(
        variant="authors", inner_structure="none", outer_init="kaiming_authors", outer_rank=16),
        preserves=False, count=per_adapter(nora_count)),
    "aira": dict(WEIGHTS, options=dict(rank=4, rank_min=1, rank_max=16), preserves=True, count=per_adapter(lora_count),
                 export=dict(form="lora + rank_pattern", ranks=None), precision={}),
    "aira_noalloc": dict(WEIGHTS, method="aira", options=dict(rank=4, rank_alloc=False), preserves=True,
                         count=per_adapter(lora_count)),
    # the authors' code: no residual, per-batch output scaling (not mergeable); a budget the tiny model can spend
    "aira_authors": dict(WEIGHTS, method="aira", options=dict(variant="authors", rank_budget=8000.0), preserves=False,
                         mergeable=False, count=per_adapter(lora_count),
                         export=dict(options=dict(AIRA_AUTHORS["options"], rank_budget=8000.0),
                                     targets=("q", "k", "v"), refused="depends on the batch"),
                         precision=dict(options=AIRA_AUTHORS["options"])),
    "loraplus": dict(WEIGHTS, options=dict(rank=4, alpha=8), preserves=True, count=per_adapter(lora_count),
                     export=dict(form="lora", ranks={4}), precision={}),
    "lorafa": dict(WEIGHTS, options=dict(rank=4, alpha=8), preserves=True, count=per_adapter(lorafa_count),
                   export=dict(form="lora", ranks={4}), precision={}),
    # VeRA's r is the width of its shared pair, not bounded by a layer (the paper: r = 1024 on 768-wide layers)
    "vera": dict(WEIGHTS, options=dict(rank=16), preserves=True, count=per_adapter(vera_count), rank="unbounded",
                 export=dict(form="lora", ranks={16}), precision=dict(lr=1e-1)),  # trains two scaling vectors
    "adalora": dict(WEIGHTS, options=dict(init_rank=6, target_rank=4), preserves=True, count=per_adapter(adalora_count),
                    rank="init_rank", export=dict(options=dict(init_rank=6, target_rank=3), form="lora + rank_pattern",
                                                  ranks=None),
                    # no allocation in these few steps (the skip test runs it): a pruned λ is zeroed back to its
                    # init, unmoved; λ starts at 0
                    precision=dict(options=dict(init_rank=6, target_rank=4, t_final=0.0, delta_t=100), lr=1e-1)),
    "dylora": dict(WEIGHTS, options=dict(rank=4, alpha=4), preserves=True, count=per_adapter(lora_count),
                   export=dict(options=dict(rank=4, alpha=4, eval_rank=3), form="lora", ranks={3}), precision={}),
    "dora": dict(WEIGHTS, options=dict(rank=4, alpha=8), preserves=True, count=per_adapter(dora_count),
                 export=dict(form="dora", ranks={4}), precision={}),
    "pissa": dict(WEIGHTS, options=dict(rank=4), preserves=True, count=per_adapter(lora_count),
                  export=dict(form="lora", ranks={8}), precision={}),  # residual: 2r
    # the feature heads (kind "head"): trained on the frozen image features of CASES' support (3 images, 32-d)
    "taskres": dict(HEAD, options=dict(), preserves=True, count=lambda model: 4 * 32, precision={}),  # zero residual
    "clip_adapter": dict(HEAD, options=dict(), preserves=False, count=lambda model: 2 * 32 * (32 // 4),
                         precision={}),  # down and up of the 32 → 8 → 32 bottleneck
    # α steps every iteration here: the precision test trains 3 (bf16) or 11 (fp16) iterations, their period is 10
    "lp_pp": dict(HEAD, options=dict(), preserves=False, count=lambda model: 4 * 32 + 4 + 4,
                  precision=dict(options=dict(alpha_every=1))),  # W, b and α of 4 classes
    "tip_adapter": dict(HEAD, options=dict(), preserves=False, count=lambda model: 3 * 32, precision={}),  # N × d keys
    # tiny-vit's towers have 2 blocks: prompts at the input and in block 1
    "maple": dict(PROMPTS, options=dict(depth=2), count=maple_count(2, 2), precision={}),
    # CLASSES name no dataset: their generic templates, 4 words each
    "plot": dict(PROMPTS, options=dict(n_visual=2), count=plot_count(4, 4, 2, 2), precision={}),
    # prompt learners (tiny-vit: text width 64, image features 32): the context, CoCoOp's meta-net too
    "coop": dict(PROMPTS, options=dict(), count=lambda model: 16 * 64),
    "coop4": dict(PROMPTS, options=dict(), count=lambda model: 4 * 64),
    "coop16": dict(PROMPTS, options=dict(), count=lambda model: 16 * 64),
    "coop_csc_front": dict(PROMPT_VARIANT, method="coop", options=dict(n_ctx=3, csc=True, class_token_position="front"),
                           count=lambda model: len(CLASSES) * 3 * 64),
    "coop_middle": dict(PROMPT_VARIANT, method="coop", options=dict(n_ctx=5, class_token_position="middle"),
                        count=lambda model: 5 * 64),
    "cocoop": dict(PROMPTS, options=dict(), count=lambda model: 4 * 64 + (32 * 2 + 2) + (2 * 64 + 64)),
    "kgcoop": dict(PROMPTS, options=dict(), count=lambda model: 4 * 64),
    "prograd": dict(PROMPTS, options=dict(), count=lambda model: 16 * 64),
    # every singular value of each layer trains: min(d_in, d_out) per layer, and the export carries a full-rank update
    "clip_svd": dict(WEIGHTS, options=dict(), preserves=True, count=per_adapter(svd_count), rank=None,
                     export=dict(form="lora", ranks={64}), precision={}),
    "clip_svd_b2n": dict(WEIGHTS, options=dict(), preserves=True, count=per_adapter(svd_count), rank=None,
                         export=dict(form="lora", ranks={64}), precision={}),
    # ln_1/ln_2 of 2 blocks × 2 towers (64 wide), then a 4-class head of the 32-dim embedding; its logits are
    # logit_scale.exp() (tiny-vit's 14.3) · cos, so not the pretrained 100 · cos; its head trains in stage 2 only
    "twostage": dict(kind="tensors", options=dict(), preserves=False, mergeable=False, rank=None,
                     count=lambda model: 2 * 2 * 2 * 2 * 64 + 4 * 32, later_stage=("lora_head",),
                     export=dict(refused="no weight update"), precision={}),
    # 64-wide layers split 8 × 8: at rank 2 the large factor is a rank-2 pair, the small one full (and zero)
    "lokr": dict(WEIGHTS, options=dict(rank=2, alpha=4), preserves=True, count=per_adapter(lokr_count),
                 export=dict(form="lokr", ranks={2}), precision={}),
    "lokr_decompose_both": dict(WEIGHTS, method="lokr", options=dict(rank=2, alpha=4, decompose_both=True,
                                                                     init="lycoris"),
                                preserves=True, count=per_adapter(lokr_count), export=dict(form="lokr", ranks={2})),
    # (a new method's row goes above this line)
}


NAMES = ("dog", "red car", "blue jay", "cat")
#: the classes a case's learner is built for and every case's classifier scores (tiny-vit's tokenizer)
CLASSES = lz.ClassSet.of(NAMES, [f"a photo of a {name}." for name in NAMES], SimpleTokenizer(context_length=32))
LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


def apply_case(model, case: str, images, texts, options=None, targets=("q", "k", "v"), layers=None,
               include_padding: bool = False) -> None:
    """Apply a row's method to ``model`` as a run applies it: calibrated on ``images`` and ``texts`` where it needs
    statistics, a learner given ``CLASSES`` and, a head, ``images``' features as its support; seeded."""
    method, options = method_of(case), CASES[case]["options"] if options is None else options
    stats = support = None
    if lz.build_config(method, **options).needs_calibration:
        stats = lz.collect_activation_stats(model, [images], [texts], targets=targets, layers=layers,
                                            include_padding=include_padding)
    if lz.kind_of(method).caches_features:
        with torch.no_grad():
            support = Support(model.encode_image(images).float()[None], LABELS[:len(images)])
    torch.manual_seed(0)
    lz.apply_method(model, method, classes=CLASSES, support=support, stats=stats, targets=targets, layers=layers,
                    **options)


def method_of(case: str) -> str:
    return CASES[case].get("method", case)


def cases_with(column: str) -> list[str]:
    """The rows that have ``column`` (e.g. ``export``, ``precision``), sorted."""
    return sorted(c for c in CASES if column in CASES[c])


def column(case: str, name: str) -> dict:
    """A row's ``export`` or ``precision`` column, its ``options`` defaulting to the row's."""
    return {"options": CASES[case]["options"], **CASES[case][name]}


def missing_rows() -> set[str]:
    """Registered methods without a row of their own."""
    return set(lz.list_methods()) - set(CASES)
