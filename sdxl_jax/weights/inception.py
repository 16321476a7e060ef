"""The FID Inception's weights from a .safetensors file (the model: ``models.inception``).

The file holds pytorch-fid's ``pt_inception-2015-12-05`` state dict, key for key
(``Conv2d_1a_3x3.conv.weight``, ``Conv2d_1a_3x3.bn.weight`` / ``.bias`` / ``.running_mean`` /
``.running_var``, ``Mixed_5b.branch1x1.conv.weight``, ..., ``fc.weight``, ``fc.bias``).
BatchNorm's ``num_batches_tracked`` counters, which torch writes beside the running statistics,
are ignored.

torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (``FeatureExtractorInceptionV3``)
has the same layout: its converter writes the TF graph's tensors under pytorch-fid's key names and
shapes (and no ``num_batches_tracked``), and its module tree has the same attribute names, so
one reader serves both. ``InceptionWeights.layout`` only records which of the two files it is,
from the file name (``weights-inception-...`` is torch-fidelity's); the sha256 identifies the
weights themselves.

Pickles are never loaded. Convert a .pth once, where torch is installed::

    python -c "import torch, safetensors.torch as st; sd = torch.load(
        'pt_inception-2015-12-05-6726825d.pth', map_location='cpu', weights_only=True);
        st.save_file({k: v.contiguous() for k, v in sd.items()},
        'pt_inception-2015-12-05.safetensors')"

(one line; ``.contiguous()`` because safetensors refuses strided tensors, which a torch.save can
hold).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sdxl_jax.models.inception import FIDInceptionV3
from sdxl_jax.weights.diffusers_io import PICKLE_SUFFIXES
from sdxl_jax.weights.loader import load_module
from sdxl_jax.weights.mapping import NameRules, param_entries
from sdxl_jax.weights.safetensors_io import TensorSource

INCEPTION_RULES = NameRules(
    ignore_suffixes=("num_batches_tracked",), variables=(nnx.Param, nnx.BatchStat)
)
LAYOUTS = ("pytorch-fid", "torch-fidelity")
PYTORCH_FID_PTH = "pt_inception-2015-12-05-6726825d.pth"
EXPECTED_NAME = "pt_inception-2015-12-05.safetensors"


@dataclasses.dataclass(frozen=True)
class InceptionWeights:
    """Where the weights came from: the file, the sha256 of its bytes, and whose file it is."""

    path: Path
    sha256: str
    layout: str  # "pytorch-fid" | "torch-fidelity"


def conversion_command(pth_name: str = PYTORCH_FID_PTH) -> str:
    """The one-line shell command that turns a torch-saved state dict into safetensors."""
    out = re.sub(r"-[0-9a-f]{8}$", "", Path(pth_name).stem) + ".safetensors"
    return (
        'python -c "import torch, safetensors.torch as st; '
        f"sd = torch.load('{pth_name}', map_location='cpu', weights_only=True); "
        f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')\""
    )


def _problem(path: Path, what: str, pth_name: str = PYTORCH_FID_PTH) -> str:
    return (
        f"{path}: {what}; expected pytorch-fid's FID Inception weights as safetensors "
        f"({EXPECTED_NAME}); convert its {pth_name} once with: {conversion_command(pth_name)}"
    )


def _open(path: Path) -> TensorSource:
    """The file as a tensor source; pickles, missing and unreadable files refused in one line."""
    if not path.exists():
        raise FileNotFoundError(_problem(path, "no such file"))
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            _problem(
                path, "a pickle file, which sdxl_jax never loads (unpickling runs code)", path.name
            )
        )
    try:
        return TensorSource.open(path)
    except (ValueError, OSError) as e:
        raise ValueError(_problem(path, f"not a readable safetensors file ({e})")) from None


def _check(source: TensorSource, abstract: FIDInceptionV3, path: Path) -> None:
    """The first missing, wrongly shaped or unexpected tensor, before anything is read."""
    expected = {e.keys[0]: e.ref_shape for e in param_entries(abstract, INCEPTION_RULES)}
    for key, shape in expected.items():
        if key not in source:
            n = sum(k not in source for k in expected)
            raise ValueError(
                _problem(
                    path,
                    f"no tensor {key!r} (expected shape {shape}); {n} of {len(expected)} FID "
                    "Inception tensors are missing",
                )
            )
        if tuple(source.shape(key)) != tuple(shape):
            raise ValueError(
                _problem(
                    path,
                    f"tensor {key!r} has shape {tuple(source.shape(key))}, the FID Inception "
                    f"expects {tuple(shape)}",
                )
            )
    extra = [
        k for k in source.keys() if k not in expected and not k.endswith("num_batches_tracked")
    ]
    if extra:
        raise ValueError(
            _problem(
                path,
                f"tensor {extra[0]!r} (shape {tuple(source.shape(extra[0]))}) has no place in "
                f"the FID Inception ({len(extra)} such tensors): a different network's weights?",
            )
        )


def load_inception(
    path: str | Path, *, dtype: Any = jnp.float32
) -> tuple[FIDInceptionV3, InceptionWeights]:
    """The FID InceptionV3 with the weights in ``path`` (fp32 parameters, computed in ``dtype``),
    on the default device, and what was loaded. Every key and shape is checked before reading."""
    path = Path(path)
    source = _open(path)
    abstract = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0), dtype=dtype))
    _check(source, abstract, path)
    model = load_module(abstract, source, INCEPTION_RULES, component="FID InceptionV3")
    with open(path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    layout = "torch-fidelity" if path.name.startswith("weights-inception") else "pytorch-fid"
    return model, InceptionWeights(path, sha256, layout)
