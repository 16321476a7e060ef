"""decode_rgb / probe on a corpus written by the test: every mode and every kind of bad file.

Expected pixels come from the arrays the files were made from (with the EXIF spec's rotation,
compositing on white and 16-to-8-bit scaling done here in numpy), not from the decoder.
"""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from sdxl_jax.data import images as I

H, W = 48, 80
NH, NW = 120, 90  # the noise image that truncated files are cut from


def blocks(h=H, w=W):
    """Four flat coloured quadrants: survives JPEG well and shows any rotation or mirror."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (220, 30, 30)
    img[: h // 2, w // 2 :] = (30, 200, 40)
    img[h // 2 :, : w // 2] = (40, 40, 210)
    img[h // 2 :, w // 2 :] = (240, 240, 20)
    return img


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def interior_close(got, want, tol):
    """Max error away from the quadrant edges (JPEG rings there)."""
    h, w = want.shape[:2]
    mask = np.ones((h, w), bool)
    for y in (0, h // 2, h):
        mask[max(0, y - 4) : y + 4] = False
    for x in (0, w // 2, w):
        mask[:, max(0, x - 4) : x + 4] = False
    err = np.abs(got.astype(int) - want.astype(int))[mask]
    assert err.max() <= tol, err.max()


def decode_checked(data, shape):
    out = I.decode_rgb(data)
    assert out.dtype == np.uint8 and out.shape == (*shape, 3) and out.flags.c_contiguous
    assert I.probe(data) == shape
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> bytes, written to and read back from files as a dataset would hold them."""
    d = tmp_path_factory.mktemp("corpus")
    rgb = Image.fromarray(blocks())
    rng = np.random.default_rng(0)
    jpeg = encode(rgb, "JPEG", quality=95)
    noise = Image.fromarray(rng.integers(0, 256, (NH, NW, 3), np.uint8))  # big pixel data
    noisy = {fmt: encode(noise, fmt) for fmt in ("JPEG", "PNG", "WEBP")}
    rgba = np.dstack([blocks(), np.full((H, W), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # transparent strip
    rgba[:, 20:30, 3] = 128  # half transparent
    pal = Image.new("P", (W, H))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    pal_idx = (np.arange(W)[None, :] // 27 + np.zeros((H, 1), int)).astype(np.uint8)  # 0, 1, 2
    pal.putdata(pal_idx.ravel().tolist())
    u16 = (np.arange(H * W).reshape(H, W) * 17 % 65536).astype(np.uint16)
    cmyk = np.zeros((H, W, 4), np.uint8)
    cmyk[:, :20] = (255, 0, 0, 0)  # cyan
    cmyk[:, 20:40] = (0, 255, 0, 0)  # magenta
    cmyk[:, 40:60] = (0, 0, 0, 255)  # black
    cmyk[:, 60:] = (128, 0, 255, 0)  # half cyan + yellow
    files = {
        "jpeg": jpeg,
        "png": encode(rgb, "PNG"),
        "webp_lossless": encode(rgb, "WEBP", lossless=True),
        "webp": encode(rgb, "WEBP", quality=95),
        "gif": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "GIF"),
        "empty": b"",
        "random": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "text": b"a red circle in the top left\nnot an image at all\n" * 20,
        "jpeg_half": noisy["JPEG"][: len(noisy["JPEG"]) // 2],
        "jpeg_header_only": jpeg[:40],
        "png_half": noisy["PNG"][: len(noisy["PNG"]) // 2],
        "webp_half": noisy["WEBP"][: len(noisy["WEBP"]) // 2],
        "cmyk_jpeg": encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95),
        "gray_png": encode(Image.fromarray(blocks()[:, :, 0]), "PNG"),
        "gray_jpeg": encode(Image.fromarray(blocks()[:, :, 1]), "JPEG", quality=95),
        "palette_transparent": encode(pal, "PNG", transparency=0),
        "i16_png": encode(Image.fromarray(u16), "PNG"),
        "rgba_png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "la_png": encode(Image.fromarray(rgba[:, :, [0, 3]], "LA"), "PNG"),
        "float_tiff": encode(Image.fromarray(np.ones((H, W), np.float32)), "TIFF"),
    }
    for o in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = o
        files[f"exif{o}"] = encode(rgb, "JPEG", quality=95, exif=exif.tobytes())
    for name, data in files.items():
        (d / name).write_bytes(data)
    arrays = {"rgba": rgba, "pal_idx": pal_idx, "u16": u16}
    return {name: (d / name).read_bytes() for name in files}, arrays


# --- good files ------------------------------------------------------------------------------


def test_lossless_formats_exact(corpus):
    files, _ = corpus
    for name in ("png", "webp_lossless"):
        np.testing.assert_array_equal(decode_checked(files[name], (H, W)), blocks())


def test_lossy_formats_close(corpus):
    files, _ = corpus
    interior_close(decode_checked(files["jpeg"], (H, W)), blocks(), 6)
    interior_close(decode_checked(files["webp"], (H, W)), blocks(), 10)
    np.testing.assert_array_equal(decode_checked(files["gif"], (H, W)), blocks())  # 4 colours


@pytest.mark.parametrize(
    "orientation,rot90_k",
    # EXIF spec: 6 = stored rotated, display by turning 90 deg clockwise; 8 = counter-clockwise.
    [(3, 2), (6, -1), (8, 1)],
)
def test_exif_orientation(corpus, orientation, rot90_k):
    files, _ = corpus
    want = np.rot90(blocks(), k=rot90_k)
    shape = want.shape[:2]
    assert shape == ((H, W) if orientation == 3 else (W, H))
    assert I.probe(files[f"exif{orientation}"]) == shape
    interior_close(decode_checked(files[f"exif{orientation}"], shape), want, 6)


def test_cmyk_jpeg(corpus):
    files, _ = corpus
    out = decode_checked(files["cmyk_jpeg"], (H, W))
    # RGB = 255 * (1 - C) * (1 - K), per channel with its ink (M for G, Y for B).
    for cols, rgb in [
        (slice(4, 16), (0, 255, 255)),
        (slice(24, 36), (255, 0, 255)),
        (slice(44, 56), (0, 0, 0)),
        (slice(64, 76), (127, 255, 0)),
    ]:
        err = np.abs(out[4:-4, cols].astype(int) - np.array(rgb)).max()
        assert err <= 6, (rgb, err)


def test_grayscale(corpus):
    files, _ = corpus
    out = decode_checked(files["gray_png"], (H, W))
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], blocks()[:, :, 0])
    out = decode_checked(files["gray_jpeg"], (H, W))
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
    interior_close(out[:, :, :1], blocks()[:, :, 1:2], 6)


def test_palette_with_transparency_is_white(corpus):
    files, arrays = corpus
    out = decode_checked(files["palette_transparent"], (H, W))
    colours = np.array([[255, 255, 255], [0, 255, 0], [0, 0, 255]])  # index 0 transparent
    np.testing.assert_array_equal(out, colours[arrays["pal_idx"]])


def test_16_bit_grayscale_scaled(corpus):
    files, arrays = corpus
    assert Image.open(io.BytesIO(files["i16_png"])).mode.startswith("I")
    out = decode_checked(files["i16_png"], (H, W))
    want = np.rint(arrays["u16"] / 65535 * 255).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], want)


def composite_on_white(rgb, alpha):
    a = alpha[..., None] / 255.0
    return rgb * a + 255.0 * (1 - a)


def test_rgba_composited_on_white(corpus):
    files, arrays = corpus
    rgba = arrays["rgba"]
    out = decode_checked(files["rgba_png"], (H, W))
    assert (out[:, :20] == 255).all()  # transparent -> white
    np.testing.assert_array_equal(out[:, 30:], blocks()[:, 30:])  # opaque untouched
    want = composite_on_white(rgba[:, :, :3].astype(float), rgba[:, :, 3].astype(float))
    assert np.abs(out.astype(float) - want).max() <= 0.5 + 1e-9  # rounded to nearest
    out = decode_checked(files["la_png"], (H, W))
    want = composite_on_white(rgba[:, :, :1].astype(float), rgba[:, :, 3].astype(float))
    assert np.abs(out.astype(float) - want).max() <= 0.5 + 1e-9


# --- bad files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,reason,probe_ok",
    [
        ("empty", "empty_file", False),
        ("random", "not_an_image", False),
        ("text", "not_an_image", False),
        ("jpeg_half", "truncated", True),  # the header survives: only decoding finds out
        ("jpeg_header_only", "truncated", False),
        ("png_half", "truncated", True),
        ("webp_half", "truncated", False),
        ("float_tiff", "unsupported_mode", True),
    ],
)
def test_bad_files_raise_with_reason(corpus, name, reason, probe_ok):
    files, _ = corpus
    with pytest.raises(I.BadImage) as e:
        I.decode_rgb(files[name])
    assert e.value.reason == reason and reason in I.SKIP_REASONS
    assert isinstance(e.value, ValueError)
    if probe_ok:
        assert I.probe(files[name]) == ((NH, NW) if name.endswith("_half") else (H, W))
    else:
        with pytest.raises(I.BadImage) as e:
            I.probe(files[name])
        assert e.value.reason == reason


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a size, with no pixel data."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 100_000])  # above MAX_PIXELS; above PIL's own bomb limit
def test_too_large(side):
    data = png_header_only(side, side)
    for fn in (I.probe, I.decode_rgb):
        with pytest.raises(I.BadImage) as e:
            fn(data)
        assert e.value.reason == "too_large"


def test_max_pixels_argument(corpus):
    files, _ = corpus
    with pytest.raises(I.BadImage, match="too_large"):
        I.decode_rgb(files["png"], max_pixels=H * W - 1)
    assert I.decode_rgb(files["png"], max_pixels=H * W).shape == (H, W, 3)


def test_truncated_images_are_never_padded(corpus, monkeypatch):
    # The documented choice: LOAD_TRUNCATED_IMAGES stays False; importing us leaves it so.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    files, _ = corpus
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        I.decode_rgb(files["jpeg_half"])


def test_bad_image_pickles_for_worker_processes():
    e = pickle.loads(pickle.dumps(I.BadImage("truncated", "cut")))
    assert e.reason == "truncated" and str(e) == "truncated: cut"
    with pytest.raises(ValueError, match="unknown skip reason"):
        I.BadImage("corrupt", "x")


# --- reduced-scale JPEG decoding -------------------------------------------------------------


@pytest.mark.parametrize("orientation", [1, 6])
def test_min_size_decodes_jpeg_at_reduced_scale(orientation):
    big = np.kron(blocks(), np.ones((10, 10, 1), np.uint8))  # 480 x 800, flat quadrants
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(big), "JPEG", quality=95, exif=exif.tobytes())
    full = I.decode_rgb(data)
    upright = (480, 800) if orientation == 1 else (800, 480)
    assert full.shape[:2] == upright
    # Requests are (h, w) in the upright image; JPEG scales by 1/2, 1/4, 1/8 and never below.
    for request, scale in [((100, 150), 4), ((59, 99), 8), ((61, 99), 4), ((300, 100), 1)]:
        if orientation == 6:
            request = request[::-1]
        out = I.decode_rgb(data, min_size=request)
        assert out.shape[:2] == (upright[0] // scale, upright[1] // scale)
        assert out.shape[0] >= request[0] and out.shape[1] >= request[1]
        want = np.rot90(big, k=0 if orientation == 1 else -1)[::scale, ::scale]
        interior_close(out, want, 8)


def test_min_size_then_crop_matches_full_decode():
    from sdxl_jax.data import buckets

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (6, 8, 3), np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((1000, 700), Image.Resampling.BICUBIC))
    data = encode(Image.fromarray(smooth), "JPEG", quality=95)
    crop = buckets.plan_crop((700, 1000), (128, 192), rng=rng)
    fast = buckets.apply_crop(I.decode_rgb(data, min_size=crop.resized_size), crop)
    slow = buckets.apply_crop(I.decode_rgb(data), crop)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 1.5
    png = encode(Image.fromarray(smooth), "PNG")  # other formats ignore min_size
    assert I.decode_rgb(png, min_size=(10, 10)).shape == (700, 1000, 3)


def test_reduced_scale_decode_still_finds_truncation(corpus):
    files, _ = corpus  # so prepare may validate cheaply with a small min_size
    with pytest.raises(I.BadImage, match="truncated"):
        I.decode_rgb(files["jpeg_half"], min_size=(8, 8))
