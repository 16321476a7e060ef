"""The single-file names of the CLIP text encoders, checked against diffusers and open_clip."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import transformers
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.weights import configs
from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.mapping import CLIP_RULES, param_entries
from sdxl_jax.weights.sgm_clip import sgm_name, sgm_name_hf, sgm_name_openclip

PREFIX = "conditioner.embedders.1.model."


def ref_keys(cfg: CLIPTextConfig) -> list[str]:
    abstract = COMPONENTS["text_encoder_2"].abstract(cfg)
    return [k for e in param_entries(abstract, CLIP_RULES) for k in e.keys]


def to_sgm(state: dict[str, torch.Tensor], cfg: CLIPTextConfig, prefix: str) -> dict:
    """Invert sgm_name_openclip: fuse q/k/v, transpose the projection, rename."""
    parts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    out = {}
    for key, value in state.items():
        t = sgm_name_openclip(key, cfg)
        if t.part >= 0:
            parts[t.key][t.part] = value
        else:
            out[prefix + t.key] = value.T.contiguous() if t.transpose else value
    for key, chunks in parts.items():
        assert sorted(chunks) == [0, 1, 2]
        out[prefix + key] = torch.cat([chunks[i] for i in range(3)])
    return out


def test_openclip_names_match_diffusers_converter():
    """diffusers' own OpenCLIP -> transformers conversion undoes our mapping exactly."""
    cfg = CLIPTextConfig.tiny_bigg()
    torch.manual_seed(0)
    hf = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**configs.clip_to_reference(cfg))
    )
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert sorted(state) == sorted(ref_keys(cfg))

    converted = convert_open_clip_checkpoint(hf, to_sgm(state, cfg, PREFIX), prefix=PREFIX)
    assert sorted(converted) == sorted(state)
    for k, v in state.items():
        assert torch.equal(converted[k], v), k


def test_openclip_names_cover_open_clip_state_dict_at_full_size():
    """Injective over the full bigG key set, and onto open_clip's own text tower keys/shapes."""
    from open_clip.transformer import TextTransformer

    cfg = CLIPTextConfig.open_clip_bigg()
    with torch.device("meta"):
        tower = TextTransformer(
            context_length=77, vocab_size=49408, width=1280, heads=20, layers=32,
            mlp_ratio=4.0, output_dim=1280,
        )  # fmt: skip
    theirs = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    abstract = COMPONENTS["text_encoder_2"].abstract(cfg)

    seen: dict[tuple[str, int], str] = {}
    ours: dict[str, tuple[int, ...]] = {}
    for e in param_entries(abstract, CLIP_RULES):
        for k in e.keys:
            t = sgm_name_openclip(k, cfg)
            assert (t.key, t.part) not in seen, (k, seen.get((t.key, t.part)))
            seen[(t.key, t.part)] = k
            shape = list(e.ref_shape[::-1] if t.transpose else e.ref_shape)
            shape[0] *= t.parts
            assert ours.setdefault(t.key, tuple(shape)) == tuple(shape)
    assert len(seen) == 32 * 16 + 5
    assert ours == theirs


def test_hf_names_are_transformers_names():
    cfg = CLIPTextConfig.clip_l()
    abstract = COMPONENTS["text_encoder"].abstract(cfg)
    keys = [k for e in param_entries(abstract, CLIP_RULES) for k in e.keys]
    assert len(keys) == 12 * 16 + 4
    for k in keys:
        t = sgm_name_hf(k, cfg)
        assert (t.key, t.part, t.transpose) == (k, -1, False)
        assert sgm_name(k, cfg) == t  # no projection: the CLIP-L layout by default
    assert sgm_name("text_projection.weight", CLIPTextConfig.open_clip_bigg()).transpose


@pytest.mark.parametrize(
    "key",
    [
        "text_model.embeddings.position_ids",
        "text_model.encoder.layers.12.mlp.fc1.weight",  # CLIP-L has layers 0..11
        "text_model.encoder.layers.0.self_attn.qkv.weight",
        "text_projection.weight",  # CLIP-L has no projection
        "logit_scale",
    ],
)
def test_unmappable_keys_raise(key):
    cfg = CLIPTextConfig.clip_l()
    with pytest.raises(KeyError):
        sgm_name_hf(key, cfg)
    with pytest.raises(KeyError):
        sgm_name_openclip(key, cfg)
    with pytest.raises(ValueError, match="layout"):
        sgm_name("text_model.final_layer_norm.weight", cfg, layout="comfy")
