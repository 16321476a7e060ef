"""The CLIP vision tower and a CLIPModel folder's loading vs transformers, fp32, random weights.

Tolerance: max|ours - ref| <= 1e-4 * max|ref| (fp32; XLA and torch order sums differently).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sdxl_jax.models.clip import CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel
from sdxl_jax.weights import configs
from sdxl_jax.weights.clip_model import load_clip_model
from sdxl_jax.weights.mapping import count_params

TOL = 1e-4

# Each tower's own widths, and a projection width different from both (catches transposes).
QUICK_GELU = dict(
    text_config=dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=4, bos_token_id=298, eos_token_id=299, pad_token_id=299),
    vision_config=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                       num_attention_heads=5, image_size=40, patch_size=8),
    projection_dim=24,
)  # fmt: skip
GELU = dict(
    text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, hidden_act="gelu", eos_token_id=2, layer_norm_eps=1e-6),
    vision_config=dict(hidden_size=36, intermediate_size=60, num_hidden_layers=3,
                       num_attention_heads=3, image_size=30, patch_size=7, hidden_act="gelu",
                       layer_norm_eps=1e-6),
    projection_dim=20,
)  # fmt: skip

# The published CLIPModel vision towers, spelled out as their config.json files give them.
PRESETS = {
    "vit_b_32": (dict(), 512, 87_849_216),
    "vit_l_14": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, patch_size=14), 768, 303_966_208,
    ),
    "vit_h_14": (
        dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=16, patch_size=14, hidden_act="gelu"), 1024, 632_076_800,
    ),
    "vit_bigg_14": (
        dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
             num_attention_heads=16, patch_size=14, hidden_act="gelu"), 1280, 1_844_907_264,
    ),
}  # fmt: skip


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_clip_model(kw: dict, seed: int) -> transformers.CLIPModel:
    """A CLIPModel with every parameter perturbed (LayerNorms and biases too)."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(**kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def features(out) -> torch.Tensor:
    """transformers 5's get_*_features return a ModelOutput whose pooler_output is projected."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("kw", [QUICK_GELU, GELU], ids=["quick_gelu", "gelu"])
def test_towers_match_transformers(tmp_path, kw):
    ref = random_clip_model(kw, 0)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded: the index is followed
    assert (tmp_path / "model.safetensors.index.json").exists()
    text, vision = load_clip_model(tmp_path)
    assert vision.config.projection_dim == text.config.projection_dim == kw["projection_dim"]

    s = kw["vision_config"]["image_size"]
    pixels = np.random.default_rng(0).normal(size=(3, s, s, 3)).astype(np.float32)
    ids = np.random.default_rng(1).integers(3, 290, size=(3, 77))
    ids[:, 0] = 1
    ends = [5, 76, 30]
    for row, pos in enumerate(ends):  # the end token (also the highest id, for the argmax rule)
        ids[row, pos], ids[row, pos + 1 :] = 299, 299
    with torch.no_grad():
        px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        r_vis = ref.vision_model(px)
        r_img = features(ref.get_image_features(pixel_values=px))
        r_txt = features(ref.get_text_features(input_ids=torch.from_numpy(ids)))
    o = nnx.jit(lambda m, x: m(x))(vision, jnp.asarray(pixels))
    assert rel_err(o.last_hidden_state, r_vis.last_hidden_state) <= TOL
    assert rel_err(o.pooled, r_vis.pooler_output) <= TOL
    assert rel_err(o.image_embeds, r_img) <= TOL
    t = nnx.jit(lambda m, x: m(x))(text, jnp.asarray(ids, jnp.int32))
    assert rel_err(t.text_embeds, r_txt) <= TOL


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_published_configs_and_transformers_counts(name):
    vision_kw, proj, count = PRESETS[name]
    preset = getattr(CLIPVisionConfig, name)()
    assert configs.clip_vision_from_reference(vision_kw, proj) == preset
    with torch.device("meta"):  # shapes only, nothing allocated
        ref = transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**vision_kw, projection_dim=proj)
        )
    assert sum(p.numel() for p in ref.parameters()) == count
    ours = nnx.eval_shape(lambda: CLIPVisionModel(preset, rngs=nnx.Rngs(0)))
    assert count_params(ours) == count


def test_absent_keys_take_transformers_defaults():
    text, vision = configs.clip_model_from_reference({"model_type": "clip"})
    ref = transformers.CLIPConfig()
    assert vision == CLIPVisionConfig.vit_b_32()
    assert text.projection_dim == vision.projection_dim == ref.projection_dim == 512
    want = ref.text_config
    assert (text.vocab_size, text.hidden_size, text.num_layers, text.num_heads) == (
        want.vocab_size, want.hidden_size, want.num_hidden_layers, want.num_attention_heads
    )  # fmt: skip
    assert (text.eos_token_id, text.hidden_act) == (want.eos_token_id, want.hidden_act)
    # The legacy text_config_dict wins over text_config, completed with the class defaults.
    d = {"text_config": {"hidden_size": 64, "num_attention_heads": 4},
         "text_config_dict": {"num_attention_heads": 2}}  # fmt: skip
    text, _ = configs.clip_model_from_reference(d)
    ref = transformers.CLIPConfig(**d).text_config
    assert (text.hidden_size, text.num_heads) == (ref.hidden_size, ref.num_attention_heads)


def test_config_errors():
    with pytest.raises(ValueError, match="model_type='siglip'"):
        configs.clip_model_from_reference({"model_type": "siglip"})
    with pytest.raises(ValueError, match="dropout"):
        configs.clip_model_from_reference({"vision_config": {"attention_dropout": 0.1}})
    with pytest.raises(ValueError, match="square"):
        configs.clip_vision_from_reference({"image_size": [224, 160]})
    with pytest.raises(ValueError, match="heads"):
        configs.clip_vision_from_reference({"hidden_size": 100, "num_attention_heads": 12})
    with pytest.raises(ValueError, match=r"pixel_values \[B, 40, 40, 3\]"):
        model = nnx.eval_shape(lambda: CLIPVisionModel(CLIPVisionConfig.tiny(), rngs=nnx.Rngs(0)))
        model(jnp.zeros((1, 3, 40, 40)))  # checked before any weight is touched
    assert CLIPTextConfig().projection_dim is None  # the text default stays SDXL's CLIP-L


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory.*CLIPModel folder"):
        load_clip_model(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip_model(tmp_path)
    cfg = transformers.CLIPConfig(**QUICK_GELU).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no weights found.*model.safetensors"):
        load_clip_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickle"):
        load_clip_model(tmp_path)
