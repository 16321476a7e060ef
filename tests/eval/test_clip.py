"""CLIPEmbedder vs transformers' CLIPProcessor + CLIPModel (the inputs torchmetrics' CLIPScore
builds), random weights, through the whole path: odd-sized uint8 images and prompts.

Tolerance on embeddings: max|ours - ref| <= 1e-4 * max|ref|; the preprocessing is bit-exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from sdxl_jax.eval.clip import CLIPEmbedder
from sdxl_jax.eval.clip_preprocess import CLIPImageProcessing, resize_uint8
from tests.eval.fixtures import make_clip_folder
from tests.models.test_clip_vision import features, rel_err

TOL = 1e-4
SIZES = [(57, 93), (93, 57), (40, 40), (31, 45), (200, 123), (7, 300), (41, 40)]
PROMPTS = ["a red circle in the top left", "a blue square", "", "cyan"]


def random_images(sizes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:  # smooth content plus noise: resizing has something to round
        yy, xx = np.mgrid[:h, :w]
        base = 127 + 100 * np.sin(yy / 5.0)[..., None] * np.cos(xx[..., None] / 3.0 + np.arange(3))
        out.append(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_clip_folder(tmp_path_factory.mktemp("clip"))


def test_preprocessing_is_clip_image_processor(tmp_path):
    """Bit-exact against CLIPImageProcessor (its torchvision backend), shrinking and enlarging,
    both orientations, a crop larger than the resized image (zero padding), defaults."""
    images = random_images(SIZES + [(300, 17), (2, 3)], seed=1)
    for settings in (
        dict(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}),
        dict(size={"shortest_edge": 33}, crop_size={"height": 36, "width": 30}),
        dict(size={"height": 24, "width": 50}, crop_size={"height": 20, "width": 20}),
        dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_center_crop=False),
        dict(),  # class defaults: 224
    ):
        transformers.CLIPImageProcessor(**settings).save_pretrained(tmp_path)
        ref_proc = transformers.AutoImageProcessor.from_pretrained(tmp_path)
        assert ref_proc.backend == "torchvision"  # what CLIPProcessor loads in transformers 5
        d = json.loads((tmp_path / "preprocessor_config.json").read_text())
        ours = CLIPImageProcessing.from_config(d)
        for im in images:
            ref = ref_proc(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            got = ours(im)
            assert got.shape == ref.shape == (*ours.output_size(*im.shape[:2]), 3)
            np.testing.assert_array_equal(got, ref, err_msg=f"{settings} {im.shape}")
    # A bare number is the shorter edge (size) or a square (crop_size), as transformers reads it.
    bare = CLIPImageProcessing.from_config({"size": 50, "crop_size": 48})
    assert (bare.shortest_edge, bare.crop_size) == (50, (48, 48))
    assert CLIPImageProcessing.from_config({}) == CLIPImageProcessing()
    with pytest.raises(ValueError, match="only bicubic"):
        CLIPImageProcessing.from_config({"resample": 2})


def test_resize_vs_torchvision_and_pil():
    """torch's uint8 kernel, not PIL's: equal to torchvision, PIL differs by one level."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as tvF

    im = random_images([(211, 150)], seed=2)[0]
    bicubic = tvF.InterpolationMode.BICUBIC
    chw = torch.from_numpy(im).permute(2, 0, 1)
    ref = tvF.resize(chw, [56, 40], interpolation=bicubic, antialias=True).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(resize_uint8(im, (56, 40)), ref)
    pil = np.asarray(Image.fromarray(im).resize((40, 56), Image.BICUBIC))
    assert 0 < np.abs(pil.astype(int) - ref).max() <= 1


def test_embeddings_match_clip_model(clip_folder):
    folder, model = clip_folder
    emb = CLIPEmbedder(folder, batch_size=8)
    images = random_images(SIZES)
    long = " ".join(["a red circle in the top left"] * 15)  # > 77 tokens: sliced, no end token
    prompts = PROMPTS + [long]
    proc = transformers.CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        px = proc(images=images, return_tensors="pt")["pixel_values"]
        r_img = features(model.get_image_features(pixel_values=px)).numpy()
        t = proc(text=prompts, return_tensors="pt", padding=True)  # as torchmetrics, then cut
        assert t["input_ids"].shape[1] > 77
        ids, mask = t["input_ids"][:, :77], t["attention_mask"][:, :77]
        r_txt = features(model.get_text_features(input_ids=ids, attention_mask=mask)).numpy()
    r_img /= np.linalg.norm(r_img, axis=-1, keepdims=True)
    r_txt /= np.linalg.norm(r_txt, axis=-1, keepdims=True)

    img = emb.image_embeds(images)  # a list of sizes, 7 images: one padded batch of 8
    assert img.dtype == np.float64 and img.shape == (7, 24)
    assert rel_err(img, r_img) <= TOL
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-12)
    txt = emb.text_embeds(prompts)
    assert txt.dtype == np.float64 and txt.shape == (5, 24)
    assert rel_err(txt, r_txt) <= TOL
    # The same images as one uint8 array, in two batches of 8 (padding the second).
    same = np.stack([images[2]] * 10)
    np.testing.assert_allclose(emb.image_embeds(same), np.repeat(img[2:3], 10, 0), atol=1e-6)
    # torchmetrics' CLIP score from these embeddings is its definition on the references.
    score = max(100 * float(np.mean(np.sum(img[:5] * txt, axis=-1))), 0.0)
    ref_score = max(100 * float(np.mean(np.sum(r_img[:5] * r_txt, axis=-1))), 0.0)
    assert abs(score - ref_score) <= 1e-3

    fp = emb.fingerprint
    assert json.loads(json.dumps(fp)) == fp
    assert fp["extractor"] == "clip" and fp["image_size"] == 40 and len(fp["weights_sha256"]) == 64


def test_embedder_errors(clip_folder, tmp_path):
    folder, _ = clip_folder
    with pytest.raises(FileNotFoundError, match="not a directory"):
        CLIPEmbedder(tmp_path / "absent")
    with pytest.raises(ValueError, match="must be at least 1"):
        CLIPEmbedder(folder, batch_size=0)
    assert CLIPEmbedder(folder, batch_size=12).batch_size == 16  # a multiple of the 8 devices
    emb = CLIPEmbedder(folder, batch_size=8)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        emb.image_embeds(np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="must be uint8"):
        emb.image_embeds([np.zeros((40, 40, 3), np.float32)])
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        CLIPEmbedder(tmp_path, batch_size=8)
    (tmp_path / "preprocessor_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        CLIPEmbedder(tmp_path, batch_size=8)
