"""Weights for the evaluation tests, built at random by the reference libraries: a transformers
CLIPModel folder (tokenizer and image processor beside it, as on the hub)."""

from __future__ import annotations

from pathlib import Path

import transformers

from sdxl_jax.data.tokenizer import EOS_TOKEN, synthetic_words, write_clip_tokenizer
from tests.models.test_clip_vision import random_clip_model


def make_clip_folder(folder: Path):
    """A random CLIPModel (quick_gelu text, first-eos pooling) with a tokenizer for the synthetic
    captions and an image processor saved beside it: (folder, the torch model)."""
    write_clip_tokenizer(folder, synthetic_words(), pad_token=EOS_TOKEN)
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    kw = dict(
        text_config=dict(vocab_size=eos + 1, hidden_size=48, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=4, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                           num_attention_heads=5, image_size=40, patch_size=8),
        projection_dim=24,
    )  # fmt: skip
    model = random_clip_model(kw, 3)
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}
    ).save_pretrained(folder)
    return folder, model
