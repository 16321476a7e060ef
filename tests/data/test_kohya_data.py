"""kohya's data options: N_name concept folders (repeats, class-token captions), several sources
in one dataset with per-record loss weights, caption dropout and tag shuffling."""

from __future__ import annotations

import collections
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.data import batching, prepare
from sdxl_jax.data import pipeline as data_pipeline
from sdxl_jax.data.readers import SourceError
from tests.data.test_prepare import FAST, _read


def _png(path: Path, h: int, w: int, seed: int, caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> tuple[Path, Path]:
    """A kohya train folder (two concepts, a non-concept folder) and a regularisation folder."""
    root = tmp_path_factory.mktemp("kohya")
    train, reg = root / "train", root / "reg"
    _png(train / "3_sks dog" / "a.png", 32, 32, 0)  # no caption file: the class tokens
    _png(train / "3_sks dog" / "b.png", 32, 32, 1, "sks dog, sitting, grass")
    _png(train / "3_sks dog" / "deeper" / "x.png", 32, 32, 2, "not read")  # not kohya's
    _png(train / "1_blorp_thing" / "c.png", 32, 32, 3)  # tokens keep their underscores
    _png(train / "notes" / "d.png", 32, 32, 4, "not a concept folder")
    _png(train / "e.png", 32, 32, 5, "beside the concept folders")
    _png(reg / "1_dog" / "a.png", 32, 32, 6)  # the same name as a train image
    _png(reg / "1_dog" / "f.png", 32, 32, 7)
    return train, reg


def test_kohya_folders_and_a_regularisation_source_make_one_weighted_dataset(concept, tmp_path):
    train, reg = concept
    sources = [f"folder:{train}?layout=kohya", f"folder:{reg}?layout=kohya&loss_weight=0.25"]
    report = prepare.prepare(sources, tmp_path / "ds", bucket_sets=["tiny_32"], **FAST)
    records, index = _read(tmp_path / "ds")
    assert report["totals"]["written"] == 5
    assert [r["key"] for r in records] == [
        "0/1_blorp_thing/c.png",
        "0/3_sks dog/a.png",
        "0/3_sks dog/b.png",
        "1/1_dog/a.png",  # the source number keeps equal names apart
        "1/1_dog/f.png",
    ]
    assert [r["caption"] for r in records] == [
        "blorp_thing", "sks dog", "sks dog, sitting, grass", "dog", "dog",
    ]  # fmt: skip
    assert index["repeats"].tolist() == [1, 3, 3, 1, 1]
    np.testing.assert_array_equal(index["loss_weight"], np.float32([1, 1, 1, 0.25, 0.25]))

    # Batches: one epoch uses each record `repeats` times and carries its weight.
    cfg = data_pipeline.DataConfig(
        path=str(tmp_path / "ds"), bucket_set="tiny_32", global_batch_size=3, random_crop=False
    )
    it = data_pipeline.make_iterator(cfg, process_index=0, process_count=1, verbose=False)
    with it:
        assert it.steps_per_epoch == 3  # (1 + 3 + 3 + 1 + 1) uses / 3
        batches = [next(it) for _ in range(it.steps_per_epoch)]
    used = collections.Counter(i for b in batches for i in b["index"].tolist())
    assert used == {0: 1, 1: 3, 2: 3, 3: 1, 4: 1}
    for b in batches:
        np.testing.assert_array_equal(b["loss_weight"], index["loss_weight"][b["index"]])


def test_a_kohya_folder_without_concept_folders_names_the_form(tmp_path):
    _png(tmp_path / "photos" / "a.png", 32, 32, 0, "a")
    with pytest.raises(SourceError, match="N_tokens.*found: photos"):
        prepare.prepare(f"folder:{tmp_path}?layout=kohya", tmp_path / "ds", **FAST)
    for bad in ("loss_weight=-1", "loss_weight=heavy", "layout=nested"):
        with pytest.raises(SourceError, match="loss_weight|layout"):
            prepare.prepare(f"folder:{tmp_path}?{bad}", tmp_path / "ds", **FAST)


def test_every_source_takes_repeats_and_a_loss_weight():
    from sdxl_jax.data.sources import open_source

    plain = open_source("synthetic:3?seed=1")
    scaled = open_source("synthetic:3?seed=1&repeats=2&loss_weight=0.5")
    a, b = plain.load(2), scaled.load(2)
    assert (b.key, b.data, b.captions) == (a.key, a.data, a.captions)
    assert (a.repeats, a.loss_weight, b.repeats, b.loss_weight) == (1, 1.0, 2, 0.5)
    assert scaled.spec == "synthetic:3?seed=1&repeats=2&loss_weight=0.5"
    for bad in ("repeats=0", "repeats=1.5", "loss_weight=inf"):
        with pytest.raises(SourceError, match=bad.split("=")[0]):
            open_source(f"synthetic:3?{bad}")


@pytest.mark.parametrize("remainder", ["drop", "repeat"])
def test_repeats_use_each_record_that_often_per_epoch(remainder):
    rng = np.random.default_rng(0)
    buckets = rng.integers(-1, 3, 40)
    repeats = rng.integers(0, 5, 40)
    plain = batching.BatchSchedule(
        np.repeat(buckets, repeats), 4, seed=1, remainder=remainder
    )  # the closed form: the records written out `repeats` times
    schedule = batching.BatchSchedule(buckets, 4, seed=1, remainder=remainder, repeats=repeats)
    assert schedule.steps_per_epoch == plain.steps_per_epoch
    uses = collections.Counter()
    for step in range(schedule.steps_per_epoch):
        bucket, ix = schedule.at(step)
        assert (buckets[ix] == bucket).all()
        uses.update(ix.tolist())
    for i in range(40):
        n = 0 if buckets[i] < 0 else repeats[i]
        if remainder == "drop":  # at most a batch short per bucket
            assert uses[i] <= n
        else:
            assert uses[i] >= n
    if remainder == "drop":
        short = sum(r["dropped"] for r in schedule.summary["buckets"])
        assert sum(uses.values()) == sum(repeats[buckets >= 0]) - short


def test_tag_shuffle_keeps_the_first_tags_and_every_tag():
    cfg = data_pipeline.DataConfig(shuffle_tags=True, keep_tags=2)
    caption = " sks dog , photo,red collar,  grass ,sunset,bokeh"
    seen = set()
    for seed in range(200):
        out = data_pipeline.process_caption(caption, cfg, np.random.default_rng(seed))
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "photo"]
        assert sorted(tags[2:]) == sorted(["red collar", "grass", "sunset", "bokeh"])
        seen.add(out)
    assert len(seen) == 24  # all 4! orders of the free tags
    # keep_tags beyond the tag count keeps the caption (tags re-joined with ", ").
    cfg = data_pipeline.DataConfig(shuffle_tags=True, keep_tags=9, tag_separator="|")
    assert data_pipeline.process_caption("a|b |c", cfg, np.random.default_rng(0)) == "a, b, c"


def test_caption_dropout_rate_in_batches(concept, tmp_path):
    train, _ = concept
    prepare.prepare(f"folder:{train}?layout=kohya", tmp_path / "ds", bucket_sets=["tiny_32"],
                    **FAST)  # fmt: skip
    cfg = data_pipeline.DataConfig(
        path=str(tmp_path / "ds"), bucket_set="tiny_32", global_batch_size=7,
        caption_dropout=0.3, shuffle_tags=True, keep_tags=1, random_crop=False,
    )  # fmt: skip
    it = data_pipeline.make_iterator(cfg, process_index=0, process_count=1, verbose=False)
    with it:
        captions = [c for _ in range(60) for c in next(it)["caption"].tolist()]
    empty = sum(c == "" for c in captions) / len(captions)
    # 420 draws of p = 0.3: the rate within 4.5 standard deviations (0.022).
    assert abs(empty - 0.3) < 0.1, empty
    kept = {c for c in captions if c}
    assert kept == {"blorp_thing", "sks dog", "sks dog, sitting, grass", "sks dog, grass, sitting"}
    with pytest.raises(ValueError, match="data.cache=''"):
        data_pipeline.DataConfig(cache="/some/cache", caption_dropout=0.1)
