"""VAE key mapping: diffusers ``AutoencoderKL`` keys -> the sgm / LDM single-file layout.

Keys are relative to ``first_stage_model.``. The sgm names: ``down.{i}.block.{j}``,
``down.{i}.downsample``, ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``, ``norm_out``,
``nin_shortcut``; the decoder's ``up.{k}`` counts from the lowest resolution *up* the other way
round (diffusers ``up_blocks.{i}`` is sgm ``up.{levels - 1 - i}``); the mid-block attention keeps
its q/k/v/proj_out as 1x1 convs [C, C, 1, 1] and its GroupNorm as ``norm``.
"""

from __future__ import annotations

import re

from sdxl_jax.models.vae import VAEConfig
from sdxl_jax.weights.sgm_tensor import SgmTensor

_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_TOP = {
    "conv_in": "conv_in",
    "conv_norm_out": "norm_out",
    "conv_out": "conv_out",
}
_PARAM = r"(weight|bias)"


def _mid(rest: str, where: str, key: str) -> str:
    if m := re.fullmatch(rf"resnets\.([01])\.(\w+)\.{_PARAM}", rest):
        part = _RESNET_PARTS.get(m[2])
        if part is not None:
            return f"{where}.mid.block_{int(m[1]) + 1}.{part}.{m[3]}"
    if m := re.fullmatch(rf"attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.{_PARAM}", rest):
        return f"{where}.mid.attn_1.{_ATTN_PARTS[m[1]]}.{m[2]}"
    raise KeyError(f"no sgm name for VAE key {key!r}")


def _sgm_key(ref_key: str, config: VAEConfig) -> str:
    levels = len(config.block_out_channels)
    if m := re.fullmatch(rf"(post_quant_conv|quant_conv)\.{_PARAM}", ref_key):
        return ref_key
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", ref_key)
    if m is None:
        raise KeyError(f"no sgm name for VAE key {ref_key!r}")
    where, rest = m[1], m[2]
    if m := re.fullmatch(rf"(conv_in|conv_norm_out|conv_out)\.{_PARAM}", rest):
        return f"{where}.{_TOP[m[1]]}.{m[2]}"
    if rest.startswith("mid_block."):
        return _mid(rest[len("mid_block.") :], where, ref_key)
    blocks, sampler, sgm_level, sgm_sampler = (
        ("down_blocks", "downsamplers", "down", "downsample")
        if where == "encoder"
        else ("up_blocks", "upsamplers", "up", "upsample")
    )
    depth = config.layers_per_block + (where == "decoder")
    if m := re.fullmatch(rf"{blocks}\.(\d+)\.(.+)", rest):
        i, inner = int(m[1]), m[2]
        if i < levels:
            level = i if where == "encoder" else levels - 1 - i
            if (r := re.fullmatch(rf"resnets\.(\d+)\.(\w+)\.{_PARAM}", inner)) and int(
                r[1]
            ) < depth:
                part = _RESNET_PARTS.get(r[2])
                if part is not None:
                    return f"{where}.{sgm_level}.{level}.block.{int(r[1])}.{part}.{r[3]}"
            if (r := re.fullmatch(rf"{sampler}\.0\.conv\.{_PARAM}", inner)) and i < levels - 1:
                return f"{where}.{sgm_level}.{level}.{sgm_sampler}.conv.{r[1]}"
    raise KeyError(f"no sgm name for VAE key {ref_key!r}")


def sgm_name(ref_key: str, config: VAEConfig) -> SgmTensor:
    """Where the diffusers VAE tensor ``ref_key`` lives in a single file (after
    ``first_stage_model.``); raises KeyError for keys the VAE of ``config`` does not have."""
    key = _sgm_key(ref_key, config)
    squeeze = ".mid.attn_1." in key and key.endswith(".weight") and ".norm." not in key
    return SgmTensor(key, squeeze=squeeze)
