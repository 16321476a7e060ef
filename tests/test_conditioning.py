"""Text and micro-conditioning against diffusers' SDXL pipelines (encode_prompt, time ids)."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from sdxl_jax import conditioning
from sdxl_jax.inference import checkpoints, runtime

PROMPTS = ["a red circle in the top left", "two cats! on a sofa, photo"]
TOL = 1e-5


def runner(path):
    return runtime.StageRunner(
        runtime.load_stage(checkpoints.check_stage(path)), runtime.make_mesh()
    )


def close(got, want):
    got, want = np.asarray(got), want.numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("negative", [None, ["blurry", ""]])
def test_base_conditioning_matches_encode_prompt(negative, tiny_sdxl):
    base, _ = tiny_sdxl
    pipe = StableDiffusionXLPipeline.from_pretrained(base).to(torch.float32)
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", negative_prompt=negative
        )
        ids = pipe._get_add_time_ids((64, 48), (0, 0), (64, 48), torch.float32, 48)
    n = len(PROMPTS) * 4  # padded to the 8 simulated devices
    cond = runner(base).conditioning(
        PROMPTS + [PROMPTS[0]] * (n - 2),
        None if negative is None else negative + [""] * (n - 2),
        64,
        48,
        use_cfg=True,
    )
    assert np.asarray(cond.context).shape[-1] == 32 + 64  # CLIP-L + bigG penultimate states
    close(cond.context[:2], ctx)
    close(cond.pooled[:2], pooled)
    close(cond.neg_context[:2], neg_ctx)
    close(cond.neg_pooled[:2], neg_pooled)
    if negative is None:  # force_zeros_for_empty_prompt: zeros, not the encoding of ""
        assert not np.asarray(cond.neg_context).any() and not np.asarray(cond.neg_pooled).any()
    close(cond.time_ids[:1], ids)
    close(cond.neg_time_ids[:1], ids)


def test_refiner_conditioning_matches_encode_prompt(tiny_sdxl):
    _, refiner = tiny_sdxl
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner).to(torch.float32)
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
        ids, neg_ids = pipe._get_add_time_ids(
            (64, 64), (0, 0), (64, 64), 6.0, 2.5, (64, 64), (0, 0), (64, 64), torch.float32, 48
        )
    cond = runner(refiner).conditioning(PROMPTS * 4, None, 64, 64, use_cfg=True)
    assert np.asarray(cond.context).shape[-1] == 64  # bigG only
    close(cond.context[:2], ctx)
    close(cond.pooled[:2], pooled)
    close(cond.neg_context[:2], neg_ctx)  # the refiner encodes "" (no forced zeros)
    assert np.abs(np.asarray(cond.neg_context)).max() > 0.1
    close(cond.neg_pooled[:2], neg_pooled)
    close(cond.time_ids[:1], ids)
    close(cond.neg_time_ids[:1], neg_ids)


def test_tokenizers_pad_differently_and_truncate_at_77(tiny_sdxl):
    import open_clip

    base, _ = tiny_sdxl
    stage = runtime.load_stage(checkpoints.check_stage(base))
    long_prompt = " ".join(["cat"] * 100)
    with pytest.warns(UserWarning, match="1 prompt\\(s\\) are longer than 77 tokens"):
        ids = stage.text.tokenize(["a photo of a cat", long_prompt])
    want = open_clip.tokenize(["a photo of a cat", long_prompt]).numpy()  # pads with 0 ("!")
    np.testing.assert_array_equal(ids["ids_g"], want)
    n = int((want[0] != 0).sum())
    np.testing.assert_array_equal(ids["ids_l"][0, :n], want[0, :n])
    assert (ids["ids_l"][0, n:] == 49407).all()  # CLIP-L pads with the end token
    assert ids["ids_l"].shape == (2, 77) and ids["ids_l"][1, -1] == 49407  # truncated, then EOS


def test_micro_conditioning_vectors():
    got = conditioning.base_time_ids([[512, 384], [1024, 1024]], [[0, 64], [0, 0]], (768, 1344))
    np.testing.assert_array_equal(
        got, [[512, 384, 0, 64, 768, 1344], [1024, 1024, 0, 0, 768, 1344]]
    )
    got = conditioning.refiner_time_ids([[1024, 768]], (0, 0), 6.0)
    np.testing.assert_array_equal(got, [[1024, 768, 0, 0, 6.0]])


def test_drop_text_zeroes_only_the_dropped_rows():
    ctx = np.ones((3, 77, 8), np.float32)
    pooled = np.ones((3, 4), np.float32)
    c, p = conditioning.drop_text(ctx, pooled, np.array([False, True, False]))
    assert np.asarray(c)[1].sum() == 0 and np.asarray(p)[1].sum() == 0
    assert np.asarray(c)[[0, 2]].min() == 1 and np.asarray(p)[[0, 2]].min() == 1
