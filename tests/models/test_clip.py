"""CLIP text encoders vs transformers and open_clip, fp32, random weights at tiny sizes.

Tolerance everywhere: max|ours - ref| <= 1e-4 * max|ref| (fp32; XLA and torch order sums
differently, nothing more).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel
from sdxl_jax.weights import configs
from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.diffusers_io import load_component, save_component
from sdxl_jax.weights.mapping import CLIP_RULES, count_params, param_entries
from sdxl_jax.weights.single_file import load_single_file

TOL = 1e-4
VOCAB = 1000
OPENCLIP_PREFIX = "conditioner.embedders.1.model."


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_config(**kw) -> transformers.CLIPTextConfig:
    """Spelled out independently of configs.clip_to_reference, as SDXL's config.json files are."""
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=64, bos_token_id=0, pad_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.CLIPTextConfig(**{**base, **kw})


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter (biases and LayerNorms included, which init leaves at 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def ids_with_end(rng: np.random.Generator, batch: int, length: int, end_at: list) -> np.ndarray:
    """Rows [bos, words..., end (the highest id), pad 0 ...] with the end token at ``end_at``."""
    ids = rng.integers(3, VOCAB - 1, size=(batch, length))
    ids[:, 0] = 0
    for row, pos in enumerate(end_at):
        ids[row, pos] = VOCAB - 1
        ids[row, pos + 1 :] = 0
    return ids


def run_ours(model: CLIPTextModel, ids: np.ndarray):
    return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32))


# --- CLIP ViT-L flavour vs transformers CLIPTextModel ---------------------------------------


@pytest.mark.parametrize("eos_token_id", [2, 7], ids=["legacy_argmax", "first_eos"])
def test_clip_l_matches_transformers(tmp_path, eos_token_id):
    torch.manual_seed(0)
    ref = randomize(transformers.CLIPTextModel(hf_config(eos_token_id=eos_token_id)), 1)
    ref.save_pretrained(tmp_path / "text_encoder")  # transformers 5: keys without "text_model."
    ours = load_component(tmp_path, "text_encoder")
    assert ours.config.projection_dim is None and ours.config.eos_token_id == eos_token_id

    rng = np.random.default_rng(0)
    ends = [5, 20, 76, 1]
    ids = ids_with_end(rng, 4, 77, ends)
    if eos_token_id != 2:
        # The first eos wins; a second one and higher ids after it must not.
        ids = rng.integers(10, VOCAB, size=(4, 77))
        for row, pos in enumerate(ends):
            ids[row, pos] = eos_token_id
        ids[0, 30] = eos_token_id
        assert (ids.argmax(-1) != np.array(ends)).any()  # the rule matters for this batch
    with torch.no_grad():
        r = ref(torch.from_numpy(ids), output_hidden_states=True)
    o = run_ours(ours, ids)

    assert o.hidden_states.shape == (4, 4, 77, 64)
    assert rel_err(o.hidden_states[-2], r.hidden_states[-2]) <= TOL
    assert rel_err(o.penultimate, r.hidden_states[-2]) <= TOL
    assert rel_err(o.last_hidden_state, r.last_hidden_state) <= TOL
    assert rel_err(o.pooled, r.pooler_output) <= TOL
    assert o.text_embeds is None


def test_short_sequences_match_transformers(tmp_path):
    """T < 77 uses the first T position embeddings, as transformers does."""
    ref = randomize(transformers.CLIPTextModel(hf_config()), 2)
    ref.save_pretrained(tmp_path / "text_encoder")
    ours = load_component(tmp_path, "text_encoder")
    ids = ids_with_end(np.random.default_rng(1), 2, 12, [11, 4])
    with torch.no_grad():
        r = ref(torch.from_numpy(ids), output_hidden_states=True)
    o = run_ours(ours, ids)
    assert rel_err(o.hidden_states[-2], r.hidden_states[-2]) <= TOL
    assert rel_err(o.pooled, r.pooler_output) <= TOL
    with pytest.raises(ValueError, match="max_position_embeddings|T <= 77"):
        ours(jnp.zeros((1, 78), jnp.int32))


# --- OpenCLIP bigG flavour vs transformers CLIPTextModelWithProjection ----------------------


def bigg_hf_config() -> transformers.CLIPTextConfig:
    return hf_config(hidden_act="gelu", intermediate_size=256, projection_dim=48)


def test_bigg_matches_transformers(tmp_path):
    ref = randomize(transformers.CLIPTextModelWithProjection(bigg_hf_config()), 3)
    ref.save_pretrained(tmp_path / "text_encoder_2")
    ours = load_component(tmp_path, "text_encoder_2")
    assert ours.config == CLIPTextConfig.tiny_bigg()

    ids = ids_with_end(np.random.default_rng(2), 3, 77, [9, 76, 40])
    with torch.no_grad():
        r = ref(torch.from_numpy(ids), output_hidden_states=True)
    o = run_ours(ours, ids)
    assert rel_err(o.penultimate, r.hidden_states[-2]) <= TOL
    assert rel_err(o.last_hidden_state, r.last_hidden_state) <= TOL
    assert rel_err(o.text_embeds, r.text_embeds) <= TOL


# --- OpenCLIP bigG flavour vs open_clip's text tower, loaded from a single-file layout --------


def test_bigg_matches_open_clip(tmp_path):
    from open_clip.transformer import TextTransformer

    cfg = CLIPTextConfig.tiny_bigg()
    torch.manual_seed(4)
    tower = TextTransformer(
        context_length=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
        width=cfg.hidden_size, heads=cfg.num_heads, layers=cfg.num_layers,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size, output_dim=cfg.projection_dim,
        act_layer=torch.nn.GELU, pool_type="argmax",
    )  # fmt: skip
    randomize(tower, 5)
    # As in sd_xl_base_1.0.safetensors: open_clip names under the embedder's prefix, its
    # logit_scale, and the other components' tensors beside it.
    sd = {OPENCLIP_PREFIX + k: v.contiguous() for k, v in tower.state_dict().items()}
    sd[OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(4.6)
    sd["model.diffusion_model.out.0.weight"] = torch.ones(3)
    path = tmp_path / "sd_xl.safetensors"
    save_file(sd, path)
    ours = load_single_file(path, ["text_encoder_2"], configs={"text_encoder_2": cfg})
    ours = ours["text_encoder_2"]

    ids = ids_with_end(np.random.default_rng(3), 3, 77, [6, 76, 33])
    text = torch.from_numpy(ids)
    with torch.no_grad():
        # sgm's FrozenOpenCLIPEmbedder2: all resblocks but the last, no ln_final.
        x, attn_mask = tower._embeds(text)
        assert tower.transformer.batch_first  # [B, T, D] through the blocks in this version
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=attn_mask)
        pooled = tower(text)  # ln_final, argmax of ids, @ text_projection
    o = run_ours(ours, ids)
    assert rel_err(o.penultimate, x) <= TOL
    assert rel_err(o.text_embeds, pooled) <= TOL


# --- sizes and key sets of the full presets --------------------------------------------------


@pytest.mark.parametrize(
    "preset, ref_cls, params",
    [
        (CLIPTextConfig.clip_l, "CLIPTextModel", 123_060_480),
        (CLIPTextConfig.open_clip_bigg, "CLIPTextModelWithProjection", 694_659_840),
    ],
    ids=["clip_l", "bigg"],
)
def test_full_presets_param_counts_and_keys(preset, ref_cls, params):
    cfg = preset()
    abstract = COMPONENTS["text_encoder"].abstract(cfg)
    assert count_params(abstract) == params  # SPEC "Parameter counts"
    with torch.device("meta"):
        ref = getattr(transformers, ref_cls)(
            transformers.CLIPTextConfig(**configs.clip_to_reference(cfg))
        )
    assert sum(p.numel() for p in ref.parameters()) == params
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if "position_ids" not in k}
    if ref_cls == "CLIPTextModel":
        # transformers 5 dropped the "text_model." prefix from CLIPTextModel's state dict; every
        # checkpoint before it (the SDXL release included) has it, and we write it.
        ref_shapes = {"text_model." + k: s for k, s in ref_shapes.items()}
    ours = {k: e.ref_shape for e in param_entries(abstract, CLIP_RULES) for k in e.keys}
    assert ours == ref_shapes


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [CLIPTextConfig.tiny, CLIPTextConfig.tiny_bigg])
def test_save_load_round_trip_and_transformers_reads_export(tmp_path, preset):
    cfg = preset()
    model = CLIPTextModel(cfg, rngs=nnx.Rngs(7))
    # Non-trivial LayerNorms and biases, so a mix-up between them would show.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(8), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    state = jax.tree.unflatten(treedef, noisy)
    nnx.update(model, state)

    name = "text_encoder_2" if cfg.projection_dim else "text_encoder"
    save_component(model, tmp_path, name)
    loaded = load_component(tmp_path, name)
    assert loaded.config == cfg
    a = nnx.to_flat_state(nnx.state(model, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    for path, var in a:
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(b[path].get_value()))

    ref_cls = "CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"
    ref_cls = getattr(transformers, ref_cls)
    ref, info = ref_cls.from_pretrained(tmp_path / name, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = ids_with_end(np.random.default_rng(9), 2, 77, [10, 50])
    with torch.no_grad():
        r = ref.eval()(torch.from_numpy(ids), output_hidden_states=True)
    o = run_ours(model, ids)
    assert rel_err(o.penultimate, r.hidden_states[-2]) <= TOL
    assert rel_err(o.last_hidden_state, r.last_hidden_state) <= TOL
    if cfg.projection_dim:
        assert rel_err(o.text_embeds, r.text_embeds) <= TOL
    else:
        assert rel_err(o.pooled, r.pooler_output) <= TOL


@pytest.mark.parametrize(
    "preset",
    [CLIPTextConfig.clip_l, CLIPTextConfig.open_clip_bigg, CLIPTextConfig.tiny,
     CLIPTextConfig.tiny_bigg],
)  # fmt: skip
def test_config_reference_round_trip(preset):
    cfg = preset()
    d = configs.clip_to_reference(cfg)
    assert configs.clip_from_reference(json.loads(json.dumps(d))) == cfg
    # transformers accepts it as is.
    transformers.CLIPTextConfig(**d)


def test_sdxl_config_json_files():
    """The text encoder configs of stabilityai/stable-diffusion-xl-base-1.0, as published."""
    te = {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
        "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
        "projection_dim": 768, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0",
        "vocab_size": 49408,
    }  # fmt: skip
    te2 = {
        **te, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
        "num_hidden_layers": 32, "projection_dim": 1280,
    }  # fmt: skip
    assert configs.clip_from_reference(te) == CLIPTextConfig.clip_l()
    assert configs.clip_from_reference(te2) == CLIPTextConfig.open_clip_bigg()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["CLIPModel"]}, "architectures"),
        ({"architectures": None}, "architectures"),
        ({"model_type": "clip"}, "model_type"),
        ({"hidden_act": "gelu_new"}, "hidden_act"),
        ({"attention_dropout": 0.1}, "dropout"),
        ({"eos_token_id": [2, 3]}, "eos_token_id"),
        ({"num_attention_heads": 5}, "heads"),
    ],
)
def test_from_reference_rejects_unsupported(change, match):
    d = {**configs.clip_to_reference(CLIPTextConfig.tiny()), **change}
    with pytest.raises(ValueError, match=match):
        configs.clip_from_reference(d)


def test_remat_gives_same_values_and_gradients():
    cfg = CLIPTextConfig.tiny_bigg()
    ids = jnp.asarray(ids_with_end(np.random.default_rng(10), 2, 16, [8, 15]), jnp.int32)
    plain = CLIPTextModel(cfg, rngs=nnx.Rngs(11))
    remat = CLIPTextModel(dataclasses.replace(cfg, remat=True), rngs=nnx.Rngs(11))

    def loss(m):
        o = m(ids)
        return jnp.sum(o.penultimate**2) + jnp.sum(o.text_embeds**2)

    la, ga = nnx.jit(nnx.value_and_grad(loss))(plain)
    lb, gb = nnx.jit(nnx.value_and_grad(loss))(remat)
    assert rel_err(lb, la) <= TOL
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        assert rel_err(y, x) <= TOL
