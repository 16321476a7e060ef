"""Where the CLIP text encoders' tensors live in an SDXL single file (sgm / A1111 / ComfyUI).

Two layouts, both relative to the embedder's prefix:
- CLIP ViT-L (``conditioner.embedders.0.transformer.``): transformers names, unchanged.
- OpenCLIP bigG (``conditioner.embedders.1.model.`` in base files, ``embedders.0.model.`` in the
  refiner): open_clip names; q, k, v stacked in ``attn.in_proj_weight`` / ``in_proj_bias``, and
  ``text_projection`` stored [width, proj] (used as ``x @ P``), the transpose of a Linear weight.
"""

from __future__ import annotations

import re

from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.weights.sgm_tensor import SgmTensor

_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_LAYER_PARAMS = frozenset(
    f"{m}.{leaf}"
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm1",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for leaf in ("weight", "bias")
)
_TOP_PARAMS = frozenset(
    (
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    )
)
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _check(ref_key: str, config: CLIPTextConfig) -> re.Match | None:
    """The layer match for a valid per-layer key, None for a valid top-level key; else KeyError."""
    if ref_key in _TOP_PARAMS:
        return None
    if ref_key == "text_projection.weight" and config.projection_dim is not None:
        return None
    m = _LAYER.fullmatch(ref_key)
    if m and int(m[1]) < config.num_layers and m[2] in _LAYER_PARAMS:
        return m
    raise KeyError(f"{ref_key!r} is not a parameter of this CLIP text encoder ({config})")


def sgm_name_hf(ref_key: str, config: CLIPTextConfig) -> SgmTensor:
    """CLIP ViT-L's layout: the single file keeps transformers' names."""
    _check(ref_key, config)
    return SgmTensor(ref_key)


def sgm_name_openclip(ref_key: str, config: CLIPTextConfig) -> SgmTensor:
    """OpenCLIP's layout (bigG): ``transformer.resblocks.{i}...``, fused q/k/v."""
    m = _check(ref_key, config)
    if m is None:
        if ref_key == "text_projection.weight":
            return SgmTensor("text_projection", transpose=True)
        return SgmTensor(_OPENCLIP_TOP[ref_key])
    block = f"transformer.resblocks.{m[1]}"
    module, leaf = m[2].rsplit(".", 1)
    if module.startswith("self_attn.") and module[len("self_attn.") :] in _QKV:
        part = _QKV[module[len("self_attn.") :]]
        return SgmTensor(f"{block}.attn.in_proj_{leaf}", part=part, parts=3)
    return SgmTensor(f"{block}.{_OPENCLIP_LAYER[module]}.{leaf}")


def sgm_name(ref_key: str, config: CLIPTextConfig, layout: str | None = None) -> SgmTensor:
    """``layout`` "hf" or "openclip"; by default the SDXL pairing: an encoder with a projection
    (bigG) is stored with open_clip names, one without (CLIP-L) with transformers names."""
    layout = layout or ("openclip" if config.projection_dim is not None else "hf")
    if layout == "hf":
        return sgm_name_hf(ref_key, config)
    if layout == "openclip":
        return sgm_name_openclip(ref_key, config)
    raise ValueError(f"CLIP single-file layout {layout!r}: use 'hf' or 'openclip'")
