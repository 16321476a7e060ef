"""A folder of generated images: one PNG per image with its settings in a text chunk (A1111's
``parameters`` and ours as JSON), ``grid.png`` and ``manifest.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

GRID_SIDE = 256  # longest side of an image in grid.png


def png_info(params: dict[str, Any]) -> Any:
    """PNG text chunks: A1111's ``parameters`` line (read by most image viewers) and our JSON."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    text = (
        f"{params['prompt']}\nNegative prompt: {params['negative_prompt'] or ''}\n"
        f"Steps: {params['steps']}, Sampler: {params['sampler']}, CFG scale: {params['guidance']}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}"
    )
    info.add_text("parameters", text)
    info.add_text("sdxl_jax", json.dumps(params))
    return info


def thumbnail(img: np.ndarray, max_side: int = GRID_SIDE) -> np.ndarray:
    """``img`` shrunk (Lanczos) so that its longest side is at most ``max_side``."""
    from PIL import Image

    h, w = img.shape[:2]
    s = min(1.0, max_side / max(h, w))
    th, tw = max(1, int(h * s)), max(1, int(w * s))
    return np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.LANCZOS))


def contact_sheet(images: list[np.ndarray], max_side: int = GRID_SIDE) -> np.ndarray:
    """Images laid out on a near-square grid, each shrunk to at most ``max_side``."""
    return _sheet([thumbnail(img, max_side) for img in images])


def _sheet(tiles: list[np.ndarray]) -> np.ndarray:
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    th, tw = tiles[0].shape[:2]
    sheet = np.full((rows * th, cols * tw, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = tile
    return sheet


class ImageFolder:
    """Writes images as they come (a stopped run keeps what it wrote), then grid and manifest."""

    def __init__(self, out: str | Path, *, grid: bool = True, grid_max: int | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.grid = grid
        self.grid_max = grid_max  # the first this many images make the grid (None: all)
        self.records: list[dict[str, Any]] = []
        self._tiles: list[np.ndarray] = []  # grid thumbnails, not the full images

    def write(self, img: np.ndarray, params: dict[str, Any]) -> dict[str, Any]:
        """Save ``img`` (uint8 [H, W, 3]) as ``<index>.png`` with ``params``; its record."""
        from PIL import Image

        name = f"{params['index']:05d}.png"
        Image.fromarray(img).save(self.out / name, pnginfo=png_info(params))
        record = {**params, "file": name}
        self.records.append(record)
        if self.grid and (self.grid_max is None or len(self._tiles) < self.grid_max):
            self._tiles.append(thumbnail(img))
        return record

    def finish(self, **manifest: Any) -> dict[str, Any]:
        """Write grid.png and manifest.json (``images``: the records, then ``manifest``)."""
        from PIL import Image

        if self._tiles:
            Image.fromarray(_sheet(self._tiles)).save(self.out / "grid.png")
        full = dict(images=self.records, **manifest)
        (self.out / "manifest.json").write_text(json.dumps(full, indent=2))
        return full
