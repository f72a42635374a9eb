"""Which linear layers a target set names: short names in an open_clip model, module-name patterns in any other.

In an open_clip CLIP model (``is_open_clip``), targets are short names inside a residual block: ``q``, ``k``, ``v``, ``o``
(attention projections, after ``split_attention``) and ``fc1``, ``fc2``
(the MLP). Layers are block indices, applied to every chosen encoder
(negative indices count from the end). Names returned are the qualified
module names in the model, e.g. ``visual.transformer.resblocks.3.attn.v``.
``target_shapes`` reads the targets' shapes from a model whose attention may still
be fused, without changing it (the checks made before any work).

In any other ``nn.Module`` (a transformers ``LlamaForCausalLM``, a ``BertModel``), targets are module-name
patterns (``match_modules``): a plain name matches every module whose qualified name is it or ends with ``.`` and
it (``q_proj`` matches ``model.layers.3.self_attn.q_proj``; ``self_attn.q_proj`` works too, as peft's list form),
and a pattern holding ``*``, ``?`` or ``[`` is a shell glob over the whole qualified name
(``model.layers.1*.mlp.down_proj``). Regular expressions are not read. A pattern that matches no module, or matches
one that is not an ``nn.Linear``, is a one-line error naming it.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator, Optional

from torch import nn

from .attention import encoder_blocks

TARGET_PATHS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
ENCODERS = ("vision", "text")
GLOB_CHARACTERS = frozenset("*?[")


def is_open_clip(model: nn.Module) -> bool:
    """Whether ``model`` is an open_clip CLIP model (image and text towers): its targets are short names."""
    return hasattr(model, "encode_image") and hasattr(model, "encode_text") and hasattr(model, "visual")


def check_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    """Module-name patterns as a tuple (a comma-separated string is split); one line when there is none."""
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    patterns = tuple(dict.fromkeys(str(p).strip() for p in patterns if str(p).strip()))
    if not patterns:
        raise ValueError("need at least one target module pattern (e.g. q_proj,k_proj,v_proj)")
    return patterns


def pattern_matches(pattern: str, name: str) -> bool:
    """A glob over the whole qualified name, or a plain name matching it or its dotted ending."""
    if GLOB_CHARACTERS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def match_modules(model: nn.Module, patterns: Iterable[str]) -> dict[str, nn.Linear]:
    """``{qualified name: nn.Linear}`` of the modules ``patterns`` name, in the model's order; a pattern matching no
    module, or a module that is not an ``nn.Linear``, is a one-line ``ValueError``."""
    patterns = check_patterns(patterns)
    modules = [(name, module) for name, module in model.named_modules() if name]
    found = {}
    for pattern in patterns:
        hits = [(name, module) for name, module in modules if pattern_matches(pattern, name)]
        if not hits:
            raise ValueError(f"target pattern {pattern!r} matches no module of this {type(model).__name__} (a name "
                             "matches a module's qualified name or its dotted ending; *, ? and [ make a glob)")
        for name, module in hits:
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target pattern {pattern!r} matches {name}, a {type(module).__name__}: adapters "
                                 "replace nn.Linear layers only")
            found[name] = module
    order = {name: index for index, (name, _) in enumerate(modules)}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def module_shapes(model: nn.Module, patterns: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{qualified name: (d_out, d_in)}`` of the modules ``patterns`` name (``match_modules``)."""
    return {name: (m.out_features, m.in_features) for name, m in match_modules(model, patterns).items()}


def check_targets(encoders: Iterable[str], targets: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    encoders, targets = tuple(encoders), tuple(targets)
    for encoder in encoders:
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; expected some of {', '.join(ENCODERS)}")
    for target in targets:
        if target not in TARGET_PATHS:
            raise ValueError(f"unknown target {target!r}; expected some of {', '.join(TARGET_PATHS)}")
    if not encoders or not targets:
        raise ValueError("need at least one encoder and one target")
    return encoders, targets


def _block_indices(count: int, layers: Optional[Iterable[int]], encoder: str) -> list[int]:
    if layers is None:
        return list(range(count))
    chosen = []
    for index in layers:
        if not -count <= int(index) < count:
            raise ValueError(f"layer index {index} out of range for the {encoder} tower with {count} blocks")
        chosen.append(int(index) % count)
    return sorted(set(chosen))


def check_layers(model: nn.Module, encoders=ENCODERS, layers: Optional[Iterable[int]] = None) -> None:
    """A one-line ``ValueError`` for a block index a chosen tower does not have (before any work is spent)."""
    for encoder in encoders:
        _block_indices(len(encoder_blocks(model, encoder)[1]), layers, encoder)


def _target_shape(block: nn.Module, target: str, name: str) -> tuple[int, int]:
    """``(d_out, d_in)`` of one target in one block, split or fused (q/k/v: thirds of ``in_proj_weight``)."""
    try:
        module = block.get_submodule(TARGET_PATHS[target])
        return module.out_features, module.in_features  # nn.Linear, or an adapter wrapping one
    except AttributeError:
        pass
    attn = getattr(block, "attn", None)
    if target == "o" and isinstance(getattr(attn, "out_proj", None), nn.Linear):
        return attn.out_proj.out_features, attn.out_proj.in_features
    fused = getattr(attn, "in_proj_weight", None)
    if target in ("q", "k", "v") and fused is not None and fused.dim() == 2 and fused.shape[0] % 3 == 0:
        return fused.shape[0] // 3, fused.shape[1]
    raise TypeError(f"{name} not found: the block has no {target!r} layer (or attention that splits into one)")


def _chosen_targets(model: nn.Module, encoders, targets, layers) -> Iterator[tuple[nn.Module, int, str, str]]:
    """``(blocks, block index, target, qualified name)`` for every target of every chosen block."""
    encoders, targets = check_targets(encoders, targets)
    for encoder in encoders:
        prefix, blocks = encoder_blocks(model, encoder)
        for index in _block_indices(len(blocks), layers, encoder):
            for target in targets:
                yield blocks, index, target, f"{prefix}.{index}.{TARGET_PATHS[target]}"


def target_shapes(model: nn.Module, encoders=ENCODERS, targets=("q", "k", "v"),
                  layers: Optional[Iterable[int]] = None) -> dict[str, tuple[int, int]]:
    """``{qualified name: (d_out, d_in)}`` for every target of every chosen block, named as after
    ``split_attention``; the model is not changed (its attention may still be fused)."""
    return {name: _target_shape(blocks[index], target, name)
            for blocks, index, target, name in _chosen_targets(model, encoders, targets, layers)}


def find_target_linears(model: nn.Module, encoders=ENCODERS, targets=("q", "k", "v"),
                        layers: Optional[Iterable[int]] = None) -> dict[str, nn.Module]:
    """``{qualified name: module}`` for every target of every chosen block (attention must be split)."""
    found = {}
    for blocks, index, target, name in _chosen_targets(model, encoders, targets, layers):
        try:
            found[name] = blocks.get_submodule(f"{index}.{TARGET_PATHS[target]}")
        except AttributeError:
            raise TypeError(f"{name} not found: call split_attention(model) first, "
                            f"or the block has no {target!r} layer") from None
    return found
