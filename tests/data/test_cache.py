"""Cache mode against diffusers: cached latents and embeddings equal the reference encoders'."""

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_jax.data import batching, buckets, cache, images
from sdxl_jax.data import pipeline as data_pipeline
from sdxl_jax.train import cache_builder
from tests.data.fixtures import prepared_dataset


def test_cache_matches_diffusers_encoders(tiny_sdxl, tmp_path):
    base, _ = tiny_sdxl
    data, _ = prepared_dataset(tmp_path / "data", n=12, bucket_sets=("tiny_32",))
    meta = cache_builder.build_cache(data, base, tmp_path / "cache", bucket_set="tiny_32",
                             batch_size=4, dtype="float32", progress=False)  # fmt: skip
    cached = cache.CachedSource(tmp_path / "cache")
    index = batching.load_index(data)
    source = batching.open_source(data)
    assert meta["records"] == int((index["bucket_tiny_32"] >= 0).sum()) == len(cached) > 0

    pipe = StableDiffusionXLPipeline.from_pretrained(base).to(torch.float32)
    bset = buckets.bucket_set("tiny_32")
    for i in range(len(cached)):
        got = cached[i]
        rec = source[i]
        b = int(index["bucket_tiny_32"][i])
        crop = buckets.plan_crop((int(index["height"][i]), int(index["width"][i])),
                                 bset.sizes[b], bucket=b, rng=None)  # fmt: skip
        pixels = buckets.apply_crop(images.decode_rgb(rec["image"]), crop)
        x = torch.from_numpy(pixels.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1)
        caption = rec["caption"].decode() if isinstance(rec["caption"], bytes) else rec["caption"]
        with torch.no_grad():
            dist = pipe.vae.encode(x).latent_dist
            ctx, _, pooled, _ = pipe.encode_prompt(caption, device="cpu",
                                                   do_classifier_free_guidance=False)  # fmt: skip
        s = pipe.vae.config.scaling_factor
        want_mean = (dist.mean * s).numpy()[0].transpose(1, 2, 0)
        want_logvar = (dist.logvar + 2 * np.log(s)).numpy()[0].transpose(1, 2, 0)
        np.testing.assert_allclose(got["latent_mean"], want_mean, atol=2e-4)
        np.testing.assert_allclose(got["latent_logvar"], want_logvar, atol=2e-3)
        np.testing.assert_allclose(got["context"], ctx.numpy()[0], atol=1e-4)
        np.testing.assert_allclose(got["pooled"], pooled.numpy()[0], atol=1e-4)
        assert tuple(got["target_size"]) == bset.sizes[b]
        assert tuple(got["crop_coords_top_left"]) == crop.crop_coords_top_left
        assert tuple(got["original_size"]) == (index["height"][i], index["width"][i])


def test_cache_resumes_finished_buckets(tiny_sdxl, tmp_path):
    base, _ = tiny_sdxl
    data, _ = prepared_dataset(tmp_path / "data", n=8, bucket_sets=("tiny_32",))
    out = tmp_path / "cache"
    cache_builder.build_cache(data, base, out, bucket_set="tiny_32", batch_size=8, progress=False)
    done = sorted(out.glob("bucket_*/DONE"))
    stamps = {p: p.parent.joinpath("context.npy").stat().st_mtime_ns for p in done}
    cache_builder.build_cache(data, base, out, bucket_set="tiny_32", batch_size=8, progress=False)
    assert {p: p.parent.joinpath("context.npy").stat().st_mtime_ns for p in done} == stamps


def test_pipeline_reads_the_cache(tiny_sdxl, tmp_path):
    base, _ = tiny_sdxl
    data, _ = prepared_dataset(tmp_path / "data", n=16, bucket_sets=("tiny_32",))
    cache_builder.build_cache(data, base, tmp_path / "cache", bucket_set="tiny_32", progress=False)
    cfg = dict(path=str(data), bucket_set="tiny_32", global_batch_size=4, seed=3)
    images_it = data_pipeline.make_iterator(
        data_pipeline.DataConfig(**cfg, random_crop=False),
        process_index=0,
        process_count=1,
        verbose=False,
    )
    cached_it = data_pipeline.make_iterator(
        data_pipeline.DataConfig(**cfg, cache=str(tmp_path / "cache")),
        process_index=0, process_count=1, verbose=False,
    )  # fmt: skip
    cached = cache.CachedSource(tmp_path / "cache")
    for _ in range(3):
        a, b = next(images_it), next(cached_it)
        np.testing.assert_array_equal(a["index"], b["index"])  # the same plan
        assert b["latent_mean"].shape[0] == 4 and "image" not in b
        for key in ("original_size", "crop_coords_top_left", "target_size", "bucket"):
            np.testing.assert_array_equal(a[key], b[key])  # centre crops in both
        for row, i in enumerate(b["index"]):
            np.testing.assert_array_equal(b["context"][row], cached[int(i)]["context"])


def test_loader_threads_never_parse_npy_headers(tmp_path, monkeypatch):
    # np.load parses .npy headers with ast; CPython 3.11 raises "SystemError: AST constructor
    # recursion depth mismatch" when threads parse at once (seen in a curriculum run). The
    # source maps every bucket when built or unpickled, so reads from threads load nothing.
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    buckets, per = 3, 4
    n = buckets * per
    np.savez(tmp_path / cache.INDEX, bucket=np.repeat(np.arange(buckets), per),
             row=np.tile(np.arange(per), buckets), original_size=np.zeros((n, 2)),
             crop_coords_top_left=np.zeros((n, 2)), target_size=np.zeros((n, 2)))  # fmt: skip
    (tmp_path / cache.META).write_text("{}")
    for b in range(buckets):
        (tmp_path / f"bucket_{b}").mkdir()
        for name in cache.ARRAYS:
            rows = np.arange(per, dtype=np.float32)[:, None] + 10 * b
            np.save(tmp_path / f"bucket_{b}" / f"{name}.npy", rows)
    sources = [cache.CachedSource(tmp_path)]
    sources.append(pickle.loads(pickle.dumps(sources[0])))  # as a grain worker gets it

    def no_load(*args, **kwargs):
        raise AssertionError("np.load called while reading records")

    monkeypatch.setattr(np, "load", no_load)
    for src in sources:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i, src=src: float(src[i]["context"][0]), range(n)))
        assert got == [10.0 * (i // per) + i % per for i in range(n)]
