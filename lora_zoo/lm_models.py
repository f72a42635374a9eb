"""Causal language models for the commonsense task: ``tiny-lm`` (shipped) or any transformers model by name or folder.

``tiny-lm`` is a 4-layer Llama (``LlamaForCausalLM``: RoPE, RMSNorm, gated MLP, grouped-query attention; 128 wide,
about 0.9 M parameters) that this repository pretrains itself on the generated commonsense world
(``datasets/commonsense_world.py``, ``scripts/pretrain_tiny_lm.py``). Its folder ``lora_zoo/weights/tiny-lm/`` is an
ordinary transformers folder (``config.json``, ``model.safetensors`` in fp16, ``generation_config.json``, and a
byte-level BPE ``tokenizer.json`` of 1,024 tokens built in code with Hugging Face ``tokenizers``: it round-trips
any text exactly, pads and decodes through transformers' ``PreTrainedTokenizerFast`` as LLaMA's tokenizer does, and
adds a BOS token, with ids 0/1/2 = ``<unk>``/``<s>``/``</s>`` as LLaMA's), so
``AutoModelForCausalLM.from_pretrained`` reads it; ``tiny-lm.sha256`` beside it records the SHA-256 of the weights
and the tokenizer (``sha256sum`` format), checked before loading.

``resolve_base_model`` accepts ``tiny-lm``, an existing folder, or a Hugging Face hub id (``org/name``); anything
else (a path that does not exist, a bare word) is a one-line error before any work. The padding follows
LLM-Adapters: ``pad_token: llm_adapters`` sets pad id 0 (LLaMA's ``<unk>``, "different from the eos token",
their comment), refused when id 0 is the tokenizer's EOS; ``pad_token: tokenizer`` keeps the tokenizer's own pad
token, refused in one line when it has none. Padding is on the left, for training and generation alike.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

import torch

from .files import sha256_file

TINY_LM = "tiny-lm"
TINY_LM_DIR = Path(__file__).resolve().parent / "weights" / TINY_LM
TINY_LM_CHECKSUMS = TINY_LM_DIR.parent / f"{TINY_LM}.sha256"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PAD_TOKENS = ("llm_adapters", "tokenizer")


def resolve_base_model(name: str) -> str:
    """``tiny-lm``'s folder, an existing folder, or a hub id as given; a one-line error for anything else."""
    if name == TINY_LM:
        return str(TINY_LM_DIR)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--base_model {name} is a folder without config.json (expected a transformers model "
                             "folder, as save_pretrained writes)")
        return str(path.resolve())
    if HUB_ID.fullmatch(name) and not name.startswith((".", "/", "~")) and not path.exists():
        return name
    raise ValueError(f"--base_model {name!r} is neither {TINY_LM}, an existing model folder, nor a Hugging Face "
                     "model name (org/name)")


def check_tiny_lm() -> None:
    """The shipped files against ``tiny-lm.sha256`` (one line naming a changed or missing file)."""
    if not TINY_LM_CHECKSUMS.is_file():
        raise ValueError(f"checksum file not found: {TINY_LM_CHECKSUMS} (it records the SHA-256 of tiny-lm's files)")
    for line in TINY_LM_CHECKSUMS.read_text().splitlines():
        digest, name = line.split()
        path = TINY_LM_DIR / name
        if not path.is_file() or sha256_file(path) != digest:
            raise ValueError(f"checksum mismatch: {path} does not have the SHA-256 recorded in {TINY_LM_CHECKSUMS} "
                             "(a changed, missing or truncated file; regenerate it with scripts/pretrain_tiny_lm.py)")


def set_padding(tokenizer, pad_token: str = "llm_adapters"):
    """Left padding with LLM-Adapters' pad id 0, or the tokenizer's own pad token (``pad_token``)."""
    if pad_token not in PAD_TOKENS:
        raise ValueError(f"pad_token must be one of {', '.join(PAD_TOKENS)}, got {pad_token!r}")
    if pad_token == "llm_adapters":
        if tokenizer.eos_token_id == 0:
            raise ValueError("the tokenizer's id 0 is its EOS token, so LLM-Adapters' pad id 0 would end every "
                             "padded sequence: use --pad_token tokenizer with a tokenizer that has a pad token")
        tokenizer.pad_token_id = 0
    elif tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: give it one (tokenizer.pad_token = ...) and save it, or "
                         "use --pad_token llm_adapters (pad id 0, as LLM-Adapters sets)")
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
                   pad_token: str = "llm_adapters"):
    """``(model in eval mode on device, tokenizer)`` of ``name`` (``resolve_base_model``); one line when the model
    or its tokenizer cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_base_model(name)
    if name == TINY_LM:
        check_tiny_lm()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise ValueError(f"cannot load base model {name}: {' '.join(str(err).split())[:300]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.config.use_cache = False  # as LLM-Adapters trains; generation turns the cache on for itself
    return model.to(device).eval(), set_padding(tokenizer, pad_token)


def model_name(name: str) -> str:
    """The base model as run folders name it: ``tiny-lm``, a hub id with ``/`` as ``-``, or a folder's name and a
    digest of its full path (``llama-7b-1a2b3c4d``: two folders of one name never share a run)."""
    if name == TINY_LM or HUB_ID.fullmatch(name) and not Path(name).expanduser().is_dir():
        return name.replace("/", "-")
    folder = Path(name).expanduser().resolve()
    return f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"


def default_dtype(precision: Optional[str], device: torch.device) -> torch.dtype:
    """The base weights' dtype: fp16/bf16 on CUDA at those precisions (LLM-Adapters loads LLaMA in fp16), else fp32
    (CPU kernels, and the adapters' own tensors, are fp32)."""
    if device.type == "cuda" and precision in ("fp16", "bf16"):
        return torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.float32
