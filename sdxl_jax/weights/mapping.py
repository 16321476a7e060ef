"""Our parameter paths <-> the reference implementations' state-dict keys.

Module attributes mirror the diffusers / transformers module trees, so a parameter's reference
key is its path with a handful of rules applied:
- leaf names: ``kernel``/``scale``/``embedding`` -> ``weight``;
- layouts: linear kernels [in, out] <-> [out, in]; conv kernels HWIO <-> OIHW;
- scanned stacks (logical axis ``layers`` first) expand to one key per layer, the index after
  the stack's attribute (``transformer_blocks.3.``, ``layers.11.``);
- per-model renames of whole dotted segments (``to_out`` <-> ``to_out.0``) and a key prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flax import nnx

STACK_NAMES = ("transformer_blocks", "layers")
# BatchNorm's running statistics (nnx.BatchStat) are named as torch's buffers.
_LEAVES = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


@dataclass(frozen=True)
class NameRules:
    """How one model's parameter paths become reference keys."""

    prefix: str = ""
    renames: tuple[tuple[str, str], ...] = ()
    # Reference keys that hold no parameters of ours (buffers such as position_ids).
    ignore_suffixes: tuple[str, ...] = ()
    # A leading key prefix some writers leave out (transformers 5 saves CLIPTextModel without
    # ``text_model.``): a source with no key carrying it is read as if every key did.
    optional_prefix: str = ""
    # Bare parameters (no ``weight`` leaf) whose reference key is their path as it stands.
    bare_leaves: tuple[str, ...] = ()
    # The variable types that come from the checkpoint: parameters, and for a network with
    # BatchNorm (the FID Inception) its running statistics too.
    variables: tuple[type[nnx.Variable], ...] = (nnx.Param,)


# diffusers' UNet2DConditionModel: ``to_out`` is a ModuleList (Linear, Dropout), the feed-forward
# a GEGLU projection, a Dropout and the output Linear.
UNET_RULES = NameRules(
    renames=(("to_out", "to_out.0"), ("ff.proj", "ff.net.0.proj"), ("ff.out", "ff.net.2")),
)
VAE_RULES = NameRules(renames=(("to_out", "to_out.0"),))
# transformers 5 saves CLIPTextModel without the ``text_model.`` prefix; older files have it, and
# some carry the ``position_ids`` buffer.
CLIP_RULES = NameRules(ignore_suffixes=("position_ids",), optional_prefix="text_model.")
# The two towers of a transformers ``CLIPModel`` file, each read from the keys under its prefixes
# (``logit_scale`` belongs to neither). ``class_embedding`` is a bare parameter.
CLIP_MODEL_TEXT_RULES = NameRules(ignore_suffixes=("position_ids",))
CLIP_MODEL_VISION_RULES = NameRules(
    ignore_suffixes=("position_ids",), bare_leaves=("class_embedding",)
)
CLIP_MODEL_TEXT_PREFIXES = ("text_model.", "text_projection.")
CLIP_MODEL_VISION_PREFIXES = ("vision_model.", "visual_projection.")


@dataclass(frozen=True)
class ParamEntry:
    """One of our parameters and the reference tensor(s) it corresponds to."""

    path: tuple
    keys: tuple[str, ...]  # one per stacked layer, or a single key
    stacked: bool
    shape: tuple[int, ...]  # our full shape (with the stack axis)
    ref_shape: tuple[int, ...]  # the shape of each reference tensor
    layout: str  # "linear" | "conv" | "plain"
    dtype: np.dtype = field(compare=False, default=None)

    def to_ours(self, arr: np.ndarray) -> np.ndarray:
        if self.layout == "linear":
            return transpose2d(arr)
        if self.layout == "conv":
            return arr.transpose(2, 3, 1, 0)
        return arr

    def to_ref(self, arr: np.ndarray) -> np.ndarray:
        if self.layout == "linear":
            return transpose2d(arr)
        if self.layout == "conv":
            return arr.transpose(3, 2, 0, 1)
        return arr


def transpose2d(a: np.ndarray, tile: int = 256) -> np.ndarray:
    """``a.T`` as a new C-contiguous array, copied tile by tile.

    numpy's strided copy of a large transposed matrix is cache-hostile (~0.2 GB/s here); tiles
    make it ~6x faster, and linear kernels are most of a checkpoint's bytes (BENCHMARKS.md).
    """
    n, m = a.shape
    out = np.empty((m, n), a.dtype)
    for i in range(0, n, tile):
        for j in range(0, m, tile):
            out[j : j + tile, i : i + tile] = a[i : i + tile, j : j + tile].T
    return out


def _rename(dotted: str, renames: tuple[tuple[str, str], ...], reverse: bool = False) -> str:
    s = f".{dotted}."
    for ours, ref in renames:
        a, b = (ref, ours) if reverse else (ours, ref)
        s = s.replace(f".{a}.", f".{b}.")
    return s[1:-1]


def param_entries(module: nnx.Module, rules: NameRules) -> list[ParamEntry]:
    """Every parameter of ``module`` (concrete or abstract) with its reference key(s); every
    variable of the types ``rules.variables`` names, in fact."""
    entries = []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Any(*rules.variables))):
        shape = tuple(var.shape)
        segs = [str(s) for s in path]
        leaf = segs[-1]
        if leaf not in _LEAVES and leaf not in rules.bare_leaves:
            raise ValueError(f"no reference name for parameter {'.'.join(segs)}")
        segs[-1] = _LEAVES.get(leaf, leaf)
        axes = var.get_metadata().get("logical_axes") or ()
        stacked = bool(axes) and axes[0] == "layers"
        layer_shape = shape[1:] if stacked else shape
        if leaf == "kernel" and len(layer_shape) == 2:
            layout, ref_shape = "linear", layer_shape[::-1]
        elif leaf == "kernel" and len(layer_shape) == 4:
            h, w, i, o = layer_shape
            layout, ref_shape = "conv", (o, i, h, w)
        else:
            layout, ref_shape = "plain", layer_shape
        if stacked:
            where = max(i for i, s in enumerate(segs) if s in STACK_NAMES)
            keys = tuple(
                rules.prefix
                + _rename(".".join(segs[: where + 1] + [str(k)] + segs[where + 1 :]), rules.renames)
                for k in range(shape[0])
            )
        else:
            keys = (rules.prefix + _rename(".".join(segs), rules.renames),)
        entries.append(
            ParamEntry(tuple(path), keys, stacked, shape, tuple(ref_shape), layout, var.dtype)
        )
    return entries


def count_params(module: nnx.Module) -> int:
    """Number of parameters (works on abstract modules from ``nnx.eval_shape``)."""
    return sum(
        int(np.prod(v.shape, dtype=np.int64))
        for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
    )
