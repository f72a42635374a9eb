"""The text tower fed with token embeddings (``text.encode_embeddings``, what every prompt learner runs): on a
template's own token embeddings it gives ``encode_text`` of that template, on the shortest exact context."""
import pytest
import torch

from lora_zoo.models import build_clip
from lora_zoo.text import encode_embeddings, short_context_length

PROMPTS = ["a photo of a golden retriever.", "a centered satellite photo of Sea or Lake."]


@pytest.mark.parametrize("backbone, pretrained", [("tiny-clip", "shipped"), ("ViT-B-16", None)])
def test_a_templates_own_embeddings_give_its_encode_text(backbone, pretrained):
    built = build_clip(backbone, pretrained)  # ViT-B-16's config with random weights: built offline
    model, tokens = built.model, built.tokenizer(PROMPTS)
    with torch.no_grad():
        ours = encode_embeddings(model, model.token_embedding(tokens), tokens)
        theirs = model.encode_text(tokens)
    assert short_context_length(model, tokens) == int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]
    assert ours.shape == theirs.shape == (2, model.text_projection.shape[1])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
