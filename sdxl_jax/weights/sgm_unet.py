"""diffusers UNet keys <-> the sgm / A1111 / ComfyUI single-file UNet (``model.diffusion_model.``).

sgm numbers the encoder's blocks ``input_blocks.N`` (N = 0 is conv_in; each level has
``layers_per_block`` ResNet(+transformer) blocks, then its downsampler), the middle
``middle_block.{0,1,2}`` and the decoder's ``output_blocks.N`` (``layers_per_block + 1`` per
level, deepest first, the upsampler inside the level's last block). Transformer internals keep
their names.
"""

from __future__ import annotations

import re

from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.weights.sgm_tensor import SgmTensor

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _resnet(rest: str, key: str) -> str:
    module, _, param = rest.partition(".")
    if module not in _RESNET:
        raise KeyError(f"no single-file name for UNet key {key!r}")
    return f"{_RESNET[module]}.{param}"


def sgm_name(ref_key: str, config: UNetConfig) -> SgmTensor:
    """Where the diffusers UNet tensor ``ref_key`` lives in a single file (without prefix)."""
    head, _, param = ref_key.rpartition(".")
    if head in _FIXED:
        return SgmTensor(f"{_FIXED[head]}.{param}")
    lpb = config.layers_per_block
    levels = len(lpb)
    if m := _MID.fullmatch(ref_key):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return SgmTensor(f"middle_block.1.{rest}")
        return SgmTensor(f"middle_block.{2 * j}.{_resnet(rest, ref_key)}")
    m = _BLOCK.fullmatch(ref_key)
    if not m:
        raise KeyError(f"no single-file name for UNet key {ref_key!r}")
    where, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if where == "down_blocks":
        first = 1 + sum(n + 1 for n in lpb[:i])  # conv_in, then each level's blocks + downsampler
        if kind == "downsamplers":
            return SgmTensor(f"input_blocks.{first + lpb[i]}.0.op.{rest.removeprefix('conv.')}")
        block = first + j
    else:
        level = levels - 1 - i
        first = sum(lpb[levels - 1 - k] + 1 for k in range(i))
        if kind == "upsamplers":
            slot = 2 if config.transformer_depth[level] else 1
            return SgmTensor(f"output_blocks.{first + lpb[level]}.{slot}.{rest}")
        block = first + j
    blocks = "input_blocks" if where == "down_blocks" else "output_blocks"
    if kind == "attentions":
        return SgmTensor(f"{blocks}.{block}.1.{rest}")
    return SgmTensor(f"{blocks}.{block}.0.{_resnet(rest, ref_key)}")
