"""The ``folder:DIR`` source: images with same-named caption files, or kohya's DreamBooth
layout of ``N_tokens`` concept folders (repeats per epoch, class-token captions)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdxl_jax.data.readers import (
    IMAGE_EXTENSIONS,
    RawRecord,
    RecordError,
    Source,
    SourceError,
    _caption_text,
    _digest,
    _read_file,
    why_unusable,
)

KOHYA_FOLDER = re.compile(r"(\d+)_(.*)")


class FolderSource(Source):
    """Images under DIR, recursively, with same-named caption files.

    ``?layout=kohya`` reads kohya's DreamBooth layout instead: the images directly inside
    DIR's subfolders named ``N_class tokens`` (``10_sks dog``), each used N times per epoch,
    captioned by its caption file or else by the folder's class tokens; other subfolders are
    left out. ``?caption=TEXT`` captions images that have no caption file.
    """

    def __init__(self, kind: str, location: str, options: dict[str, str]):
        super().__init__(kind, location, options)
        self.root = Path(location).expanduser()
        if not self.root.is_dir():
            why = why_unusable(self.root, "directory")
            raise SourceError(f"folder source {location!r} {why}")
        self.caption_ext = options.get("caption_ext", ".txt")
        self.caption = options.get("caption")
        layout = options.get("layout", "flat")
        if layout not in ("flat", "kohya"):
            raise SourceError(f"folder ?layout={layout!r}: use flat (default) or kohya")
        self.files: list[str] = []
        self.folders: dict[str, tuple[int, str]] = {}  # kohya: folder -> (repeats, tokens)
        if layout == "kohya":
            self._list_kohya()
            return
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self.root)
            for name in sorted(filenames):
                if _is_image(name):
                    self.files.append((rel / name).as_posix())

    def _list_kohya(self) -> None:
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and p.name[:1] != ".")
        for folder in subdirs:
            match = KOHYA_FOLDER.fullmatch(folder.name)
            if not match or int(match[1]) < 1:
                continue
            self.folders[folder.name] = (int(match[1]), match[2])
            names = sorted(p.name for p in folder.iterdir() if p.is_file() and _is_image(p.name))
            self.files += [f"{folder.name}/{name}" for name in names]
        if not self.folders:
            found = ", ".join(p.name for p in subdirs[:3]) or "none"
            raise SourceError(
                f"folder {self.location!r} with ?layout=kohya holds no subfolder named "
                f"N_tokens (e.g. '10_sks dog': 10 repeats, caption 'sks dog'); found: {found}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        return _digest(self.files)

    def load(self, i: int) -> RawRecord:
        rel = self.files[i]
        data = _read_file(self.root / rel)
        caption_path = (self.root / rel).with_suffix(self.caption_ext)
        repeats, tokens = self.folders.get(rel.partition("/")[0], (1, self.caption))
        try:
            captions = [_caption_text(caption_path.read_bytes(), str(caption_path))]
        except FileNotFoundError:
            captions = None if tokens is None else [tokens]
        except OSError as e:
            raise RecordError("read_error", f"{caption_path}: {e}") from None
        return RawRecord(rel, data, captions, repeats)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")
