"""``synthetic:N?min_side=..&max_side=..&max_aspect=..&square=..&edge=LO-HI``: the images follow
the options (sizes, aspects, where the shape sits), bad values are refused naming the option,
and the plain spec makes the same dataset as before."""

import numpy as np
import pytest

from sdxl_jax.data import images, sources, synthetic
from sdxl_jax.data.readers import SourceError

SPEC = "synthetic:200?min_side=16&max_side=256&max_aspect=2&square=0.2&edge=0.04-0.26"


def test_sizes_and_aspects_follow_the_options():
    src = sources.open_source(SPEC)
    sides = []
    for i in range(len(src)):
        h, w = images.decode_rgb(src.load(i).data).shape[:2]
        sides.append((min(h, w), max(h, w)))
    short = np.array([s for s, _ in sides])
    assert short.min() >= 16 and short.max() <= 256
    assert (short < 32).mean() > 0.15 and (short >= 128).mean() > 0.15  # log-uniform 16..256
    assert all(lo / hi >= 0.5 - 1e-9 for lo, hi in sides)
    assert 0.1 < np.mean([lo == hi for lo, hi in sides]) < 0.4


def test_edge_option_moves_shapes_to_the_borders():
    # The shape's outer edge: at 4..26% of the axis from its border instead of 22..26%.
    def outer_edges(spec):
        src = sources.open_source(spec)
        out = []
        for i in range(len(src)):
            img = images.decode_rgb(src.load(i).data)
            a = synthetic.analyse(img)
            x0, y0, w, h = a["box"]
            hh, ww = img.shape[:2]
            out.append(min(x0, ww - x0 - w) / ww)
        return np.array(out)

    near = outer_edges("synthetic:150?edge=0.04-0.26")
    default = outer_edges("synthetic:150")
    assert default.min() > 0.14 and near.min() < 0.07
    assert near.max() <= 0.3 and np.median(near) < np.median(default)


def test_the_plain_spec_is_unchanged_by_the_new_options():
    a = sources.open_source("synthetic:5?seed=3")
    assert a.fingerprint() == "5:3::"
    ex = list(synthetic.examples(5, seed=3))
    assert [a.load(i).data for i in range(5)] == [e["image"] for e in ex]
    b = sources.open_source("synthetic:5?seed=3&edge=0.04-0.26")
    assert b.fingerprint() != a.fingerprint() and "edge=0.04-0.26" in b.spec


@pytest.mark.parametrize(
    "query, words",
    [
        ("min_side=abc", "?min_side='abc'"),
        ("edge=0.1", "LO-HI"),
        ("edge=0.3-0.1", "0 <= lo <= hi"),
        ("square=1.5", "fraction"),
        ("min_side=4", "8 <= min_side"),
        ("max_aspect=3", "max_aspect"),
        ("blur=2", "not ['blur']"),
    ],
)
def test_bad_options_are_refused_naming_them(query, words):
    with pytest.raises(SourceError, match="synthetic") as e:
        sources.open_source(f"synthetic:10?{query}")
    assert words in str(e.value)
