"""DreamBooth data: the subject's images plus class images for prior preservation, as one
prepared dataset (``config.dreambooth``; see ``experiments/dreambooth.py``).

Before the stage trains, ``prepare_data``:
1. generates the class images the class folder lacks (``class_prompt`` sampled by the model
   the stage starts from, ``generate()``), a chunk at a time, each saved as it finishes: an
   interrupted run resumes, a finished folder is reused (diffusers' ``class_data_dir``);
2. prepares ``<stage>/dreambooth_data`` from two sources: the instance images (caption files,
   else ``instance_prompt``; each used ``instance_repeats`` times per epoch, by default as
   many times as balances the class images) and the class images, whose loss is weighted by
   ``prior_loss_weight`` (kohya's reg images and loss weights; diffusers' prior-preservation
   loss). It is rebuilt when its inputs change.

``class_data`` may instead be a prepare source spec (``folder:DIR``, ``tfds:...``,
``synthetic:N``): regularisation images of real data used as they are, nothing generated
(kohya's reg images). At toy scale they keep what the model knew where its own samples do not
(BENCHMARKS.md, "LoRA / DreamBooth").
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sdxl_jax import distributed
from sdxl_jax.data import sources
from sdxl_jax.data.readers import IMAGE_EXTENSIONS

CLASS_FOLDER, DATA_FOLDER = "class_images", "dreambooth_data"
SETTINGS = DATA_FOLDER + ".json"  # beside the dataset: what it was prepared from
CHUNK = 16  # class images generated (and saved) per call


def problems(config: Any) -> list[str]:
    """What is wrong with ``config.dreambooth`` (empty: nothing)."""
    db = config.get("dreambooth")
    if db is None:
        return []
    out = []
    if not db.instance_data:
        out.append(
            "dreambooth.instance_data is empty: give the folder of the subject's images "
            "(--config.dreambooth.instance_data=DIR)"
        )
    if not db.instance_prompt:
        out.append(
            "dreambooth.instance_prompt is empty: give the caption of images without a caption "
            "file, with the rare token (e.g. 'a photo of sks dog')"
        )
    if db.prior_loss_weight < 0 or db.num_class_images < 0 or db.instance_repeats < 0:
        out.append("dreambooth.prior_loss_weight, num_class_images, instance_repeats: need >= 0")
    if db.prior_loss_weight > 0 and not db.class_prompt and class_spec(db) is None:
        out.append(
            "dreambooth.class_prompt is empty: give the class's prompt (e.g. 'a photo of a "
            "dog'), or set dreambooth.prior_loss_weight=0 to train without prior preservation"
        )
    if config.data.path:
        out.append(
            f"data.path={config.data.path!r} and dreambooth.instance_data both name the data: "
            "a DreamBooth stage prepares its own from instance_data; leave data.path empty"
        )
    return out


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def instance_spec(db: Any) -> str:
    """The instance images' source: a folder path, or a full ``KIND:LOCATION`` spec."""
    data = str(db.instance_data)
    if sources.is_spec(data):
        return data
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"dreambooth.instance_data {data!r} is not a folder")
    return f"folder:{folder}?" + urlencode({"caption": db.instance_prompt})


def class_prompts(db: Any) -> list[str]:
    """``class_prompt``: one prompt, or a prompt file / ``synthetic`` (``sdxl_jax.eval.prompts``),
    used in turn."""
    from sdxl_jax.eval import prompts

    spec = str(db.class_prompt)
    if spec != prompts.SYNTHETIC and Path(spec).expanduser().is_file():
        spec = str(Path(spec).expanduser())
    elif spec != prompts.SYNTHETIC:
        return [spec]
    return prompts.load(spec).texts


def generate_class_images(db: Any, checkpoint: Path, folder: Path, say=print) -> int:
    """Fill ``folder`` up to ``num_class_images`` images of the class prompts (PNG + .txt;
    image i of prompt i mod the prompt count); returns how many were generated now."""
    import jax
    from PIL import Image

    from sdxl_jax.inference import generate as gen
    from sdxl_jax.inference import runtime

    folder.mkdir(parents=True, exist_ok=True)
    have, want = len(_images(folder)), int(db.num_class_images)
    if have >= want:
        return 0
    texts = class_prompts(db)
    models = gen.check_models(checkpoint)
    # This process's devices only: in a multi-host job the lead generates while the rest wait.
    mesh = runtime.make_mesh(jax.local_devices())
    generator = gen.Generator(models, mesh=mesh, batch_size=min(CHUNK, want - have))
    size = int(db.class_resolution) or None
    t0 = time.perf_counter()
    for start in range(have, want, CHUNK):
        n = min(CHUNK, want - start)
        chunk = [texts[i % len(texts)] for i in range(start, start + n)]
        request = gen.make_request(
            models, chunk, height=size, width=size, steps=int(db.class_steps),
            guidance=float(db.class_guidance), seed=int(db.class_seed) + start,
        )  # fmt: skip
        for k, image in enumerate(generator(request).images):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            path = folder / f"class_{start + k:05d}.png"
            path.with_suffix(".txt").write_text(chunk[k])
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(buf.getvalue())
            tmp.replace(path)  # an image exists only once complete
        done = start + n - have
        left = (time.perf_counter() - t0) / done * (want - start - n)
        say(f"dreambooth: class images {start + n}/{want} (ETA {left:.0f} s)")
    return want - have


def class_spec(db: Any) -> str | None:
    """``class_data`` as a prepare source spec (``KIND:LOCATION``: regularisation images used as
    they are, kohya's reg images; none generated), or None where it names a folder or is empty
    (class images generated into it where missing)."""
    data = str(db.class_data)
    return data if sources.is_spec(data) else None


def class_folder(db: Any, stage_dir: Path) -> Path:
    return Path(db.class_data).expanduser() if db.class_data else stage_dir / CLASS_FOLDER


def plan(config: Any, stage_dir: Path) -> dict[str, Any]:
    """The sources of the DreamBooth dataset and what they depend on."""
    db = config.dreambooth
    spec = instance_spec(db)
    n = len(sources.open_source(spec))
    if n == 0:
        raise FileNotFoundError(f"dreambooth.instance_data {db.instance_data!r} holds no images")
    specs, repeats = [spec], int(db.instance_repeats)
    if db.prior_loss_weight > 0:
        given = class_spec(db)
        weight = repr(float(db.prior_loss_weight))
        if given is None:
            folder = class_folder(db, stage_dir)  # (a "?" in the path is no query)
            specs.append(f"folder:{folder}?" + urlencode({"loss_weight": weight}))
            n_class = int(db.num_class_images)
        else:
            specs.append(sources.with_options(given, loss_weight=weight))
            n_class = len(sources.open_source(given))
            if n_class == 0:
                raise FileNotFoundError(f"dreambooth.class_data {given!r} holds no images")
        if not repeats and "layout=kohya" not in spec:  # kohya's folders name their own
            # As many uses of the subject's images as of class images per epoch (diffusers
            # pairs them one to one; kohya balances reg images to the train images).
            repeats = max(1, round(n_class / n))
    if repeats > 1:
        specs[0] = sources.with_options(specs[0], repeats=repeats)
    return {"sources": specs, "instances": n, "instance_repeats": max(repeats, 1)}


def prepare_data(config: Any, workdir: Path, checkpoint: Path, say=print) -> str:
    """The prepared DreamBooth dataset of this stage (class images generated first)."""
    from sdxl_jax.data import prepare

    db, stage_dir = config.dreambooth, Path(workdir) / config.stage
    out, settings = stage_dir / DATA_FOLDER, stage_dir / SETTINGS
    layout = plan(config, stage_dir)
    folder = class_folder(db, stage_dir)

    def classes_done() -> bool:
        if db.prior_loss_weight <= 0 or class_spec(db) is not None:
            return True
        return len(_images(folder)) >= db.num_class_images

    def make_classes() -> None:
        n = max(0, int(db.num_class_images) - len(_images(folder)))
        say(f"dreambooth: generating {n} class images of {db.class_prompt!r} into {folder}")
        generate_class_images(db, checkpoint, folder, say)

    distributed.lead_first(f"dreambooth classes {folder}", classes_done, make_classes)
    want = {**layout, "listing": [sources.open_sources(s).fingerprint() for s in layout["sources"]]}

    def current() -> bool:
        return settings.exists() and json.loads(settings.read_text()) == want

    def build() -> None:
        classes = f" + class images ({layout['sources'][1]})" if len(layout["sources"]) > 1 else ""
        say(f"dreambooth: preparing {layout['instances']} instance images (x "
            f"{layout['instance_repeats']} per epoch){classes} into {out}")  # fmt: skip
        prepare.prepare(
            layout["sources"], out, bucket_sets=[config.data.bucket_set], workers=1,
            on_aspect="crop", on_empty_caption="keep", overwrite=True, progress=False,
        )  # fmt: skip
        settings.write_text(json.dumps(want, indent=1))

    distributed.lead_first(f"dreambooth data {out}", current, build)
    return str(out)
