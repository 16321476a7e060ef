"""Cached random crops (``build_cache(random_crops=K)``, ``data.cache_crops``): each record's K
windows are real crops (latents equal diffusers' VAE on the window cut independently with PIL),
their coordinates are recorded, and training draws among them per step; plus the other halves of
the conditioning study: the zeroed micro-conditioning of ``step.micro_conditioning=False``."""

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from experiments import microconditioning
from sdxl_jax import conditioning
from sdxl_jax.data import batching, cache, images
from sdxl_jax.data import buckets as buckets_lib
from sdxl_jax.data import pipeline as data_pipeline
from sdxl_jax.train import cache_builder
from sdxl_jax.train import config as config_lib
from sdxl_jax.train import step as step_lib
from tests.data.fixtures import prepared_dataset

K = 3


@pytest.fixture(scope="module")
def random_cache(tiny_sdxl, tmp_path_factory):
    base, _ = tiny_sdxl
    tmp = tmp_path_factory.mktemp("random_crops")
    data, _ = prepared_dataset(tmp / "data", n=12, bucket_sets=("tiny_32",))
    meta = cache_builder.build_cache(data, base, tmp / "cache", bucket_set="tiny_32",
                                     batch_size=5, dtype="float32", progress=False,
                                     random_crops=K, seed=7)  # fmt: skip
    return base, data, tmp / "cache", meta


def _window(img: np.ndarray, size: tuple[int, int], target: tuple[int, int], top_left):
    """PIL bicubic resize to ``size`` (h, w), then the target window at (top, left)."""
    resized = np.asarray(Image.fromarray(img).resize(size[::-1], Image.Resampling.BICUBIC))
    top, left = (int(v) for v in top_left)
    assert 0 <= top <= size[0] - target[0] and 0 <= left <= size[1] - target[1]
    return resized[top : top + target[0], left : left + target[1]]


def test_each_cached_crop_is_the_vae_of_its_window(random_cache):
    base, data, path, meta = random_cache
    assert meta["crop"] == "random" and meta["crops_per_record"] == K
    cached = cache.CachedSource(path)
    assert cached.crops_per_record == K
    index, source = batching.load_index(data), batching.open_source(data)
    pipe = StableDiffusionXLPipeline.from_pretrained(base).to(torch.float32)
    s = pipe.vae.config.scaling_factor
    moved = 0
    for i in range(len(cached)):
        h, w = int(index["height"][i]), int(index["width"][i])
        target = tuple(int(v) for v in cached.target_size[i])
        scale = max(target[0] / h, target[1] / w)  # resize to cover, round half up
        size = (max(target[0], int(h * scale + 0.5)), max(target[1], int(w * scale + 0.5)))
        img = images.decode_rgb(source[i]["image"])
        coords = {tuple(cached.get(i, k)["crop_coords_top_left"]) for k in range(K)}
        moved += len(coords) > 1
        for k in range(K):
            got = cached.get(i, k)
            pixels = _window(img, size, target, got["crop_coords_top_left"])
            x = torch.from_numpy(pixels.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1)
            with torch.no_grad():
                want = (pipe.vae.encode(x).latent_dist.mean * s).numpy()[0].transpose(1, 2, 0)
            np.testing.assert_allclose(got["latent_mean"], want, atol=2e-4)
            assert tuple(got["original_size"]) == (h, w)
    assert moved >= 3  # records with room to move get different windows
    with pytest.raises(IndexError, match="holds 3"):
        cached.get(0, K)


def test_a_rebuild_draws_the_same_windows_and_another_seed_others(random_cache, tmp_path):
    base, data, path, _ = random_cache
    cache_builder.build_cache(data, base, tmp_path / "again", bucket_set="tiny_32",
                              batch_size=8, progress=False, random_crops=K, seed=7)  # fmt: skip
    cache_builder.build_cache(data, base, tmp_path / "other", bucket_set="tiny_32",
                              batch_size=8, progress=False, random_crops=K, seed=8)  # fmt: skip
    a, b, c = (cache.CachedSource(p) for p in (path, tmp_path / "again", tmp_path / "other"))
    np.testing.assert_array_equal(a.crop_coords_top_left, b.crop_coords_top_left)
    assert (a.crop_coords_top_left != c.crop_coords_top_left).any()


def test_training_draws_among_a_records_cached_crops(random_cache):
    _, data, path, _ = random_cache
    cfg = data_pipeline.DataConfig(path=str(data), bucket_set="tiny_32", global_batch_size=4,
                                   seed=3, cache=str(path))  # fmt: skip
    it = data_pipeline.make_iterator(cfg, process_index=0, process_count=1, verbose=False)
    cached = cache.CachedSource(path)
    seen: dict[int, set] = {}
    for _ in range(30):
        batch = next(it)
        for row, i in enumerate(batch["index"]):
            i = int(i)
            crops = [tuple(cached.get(i, k)["crop_coords_top_left"]) for k in range(K)]
            got = tuple(batch["crop_coords_top_left"][row])
            k = crops.index(got)  # one of the record's own windows ...
            np.testing.assert_array_equal(
                batch["latent_mean"][row], cached.get(i, k)["latent_mean"]
            )
            seen.setdefault(i, set()).add(k)
    assert sum(len(v) > 1 for v in seen.values()) >= 3  # ... not always the same one


def test_zeroed_micro_conditioning_keeps_the_target_size():
    rng = np.random.default_rng(0)
    batch = {
        "original_size": rng.integers(16, 300, (5, 2)).astype(np.int32),
        "crop_coords_top_left": rng.integers(0, 64, (5, 2)).astype(np.int32),
        "target_size": np.full((5, 2), 64, np.int32),
    }
    off = step_lib.StepConfig(compute_dtype="float32", micro_conditioning=False)
    got = np.asarray(jax.jit(lambda b: step_lib.time_ids(b, off))(batch))
    np.testing.assert_array_equal(got, np.tile([0, 0, 0, 0, 64, 64], (5, 1)))
    on = step_lib.StepConfig(compute_dtype="float32")
    want = conditioning.base_time_ids(*batch.values())
    np.testing.assert_array_equal(step_lib.time_ids(batch, on), want)
    ref = step_lib.StepConfig.for_refiner(compute_dtype="float32", micro_conditioning=False)
    np.testing.assert_array_equal(step_lib.time_ids(batch, ref), np.tile([0, 0, 0, 0, 6.0], (5, 1)))


def test_study_configs_differ_only_where_table_2_says():
    a, b, c = (microconditioning.get_config(v) for v in ("discard", "nocond", "cond"))
    assert (a.data.drop_small, b.data.drop_small, c.data.drop_small) == (True, False, False)
    assert [x.step.micro_conditioning for x in (a, b, c)] == [True, False, True]
    for x in (a, b):
        x.data.drop_small, x.step.micro_conditioning = False, True
        x.stage = c.stage
    assert a.to_dict() == b.to_dict() == c.to_dict()
    assert c.data.cache == "auto" and c.data.cache_crops > 1
    with pytest.raises(ValueError, match="microconditioning.py:cond"):
        microconditioning.get_config("")


def test_cache_crops_need_an_auto_cache():
    c = microconditioning.get_config("cond")
    c.data.cache = ""
    with pytest.raises(ValueError, match="cache_crops 4 caches random crops when data.cache"):
        config_lib.validate(c, n_devices=8)
    c.data.cache, c.data.cache_crops = "auto", -1
    with pytest.raises(ValueError, match="cache_crops -1"):
        config_lib.validate(c, n_devices=8)


def test_bucket_crops_are_uniform_over_the_room():
    # 32x96 into 32x32: left uniform over 0..64 (a chi-square check over 4 bins).
    plans = cache_builder.bucket_crops(np.arange(400), np.full(400, 32), np.full(400, 96),
                                       (32, 32), 0, random_crops=5, seed=1)  # fmt: skip
    left = np.array([p.left for p in plans])
    assert len(plans) == 2000 and {p.top for p in plans} == {0} and left.max() <= 64
    counts = np.histogram(left, bins=[0, 16, 32, 48, 65])[0]
    expect = np.array([16, 16, 16, 17]) / 65 * 2000
    assert ((counts - expect) ** 2 / expect).sum() < 16.3  # chi2(3) p = 0.001
    centre = cache_builder.bucket_crops(np.arange(3), np.full(3, 32), np.full(3, 96), (32, 32), 0)
    assert [p.left for p in centre] == [32] * 3
    assert buckets_lib.plan_crop((32, 96), (32, 32)).left == 32
