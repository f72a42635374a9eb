"""A tiny random ``LlamaForCausalLM`` (transformers, built in code) and token batches for it: the shapes of a
Llama (grouped-query attention, a gated MLP) at a size the CPU suite runs in milliseconds."""
import torch

#: the targets of the DoRA scripts' commonsense runs (LLM-Adapters' ``--target_modules``)
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def token_batch(lengths=(10, 7, 4), seed: int = 1) -> dict:
    """Left-padded ``input_ids`` (pad id 0) and ``attention_mask`` for sequences of ``lengths``, as LLM-Adapters
    pads."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, 64, (length,), generator=g)
        ids[row, width - length] = 1  # BOS
        mask[row, width - length:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits
