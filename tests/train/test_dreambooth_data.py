"""DreamBooth regularisation images given as a prepare source (kohya's reg images): used as they
are, nothing generated, balanced against the instance images."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import dreambooth
from sdxl_jax.data import batching, synthetic
from sdxl_jax.train import config as cfg_lib
from sdxl_jax.train import dreambooth as dreambooth_lib


def config(class_data: str):
    c = dreambooth.get_config("tiny")
    c.dreambooth.update(
        instance_data="synthetic:6?seed=5&colour=purple&word=z",
        class_data=class_data,
        class_prompt="",
        prior_loss_weight=0.5,
        num_class_images=100,  # ignored with a source: its own count balances
    )
    return c


def test_class_data_as_a_source_needs_no_prompt_and_generates_nothing(tmp_path):
    c = config("synthetic:12?seed=11")
    assert dreambooth_lib.problems(c) == []
    layout = dreambooth_lib.plan(c, tmp_path / c.stage)
    assert layout["sources"] == [
        "synthetic:6?seed=5&colour=purple&word=z&repeats=2",  # round(12 / 6) uses per epoch
        "synthetic:12?seed=11&loss_weight=0.5",
    ]
    # No model: generating class images would fail on the missing checkpoint.
    out = dreambooth_lib.prepare_data(c, tmp_path, tmp_path / "no_model", say=lambda *a: None)
    index = batching.load_index(out)
    instance = [synthetic.example(i, 5, colours=("purple",), word="z")["key"] for i in range(6)]
    reg = [synthetic.example(i, 11)["key"] for i in range(12)]
    assert [k.split("/", 1)[1] for k in index["key"]] == instance + reg
    np.testing.assert_array_equal(index["repeats"], [2] * 6 + [1] * 12)
    np.testing.assert_array_equal(index["loss_weight"], np.float32([1] * 6 + [0.5] * 12))
    assert not (tmp_path / c.stage / dreambooth_lib.CLASS_FOLDER).exists()


def test_a_folder_or_nothing_still_means_generated_class_images(tmp_path):
    c = config("")
    assert any("class_prompt is empty" in p for p in dreambooth_lib.problems(c))
    assert dreambooth_lib.class_spec(c.dreambooth) is None
    c.dreambooth.class_data = str(tmp_path / "reg")
    assert dreambooth_lib.class_spec(c.dreambooth) is None
    assert dreambooth_lib.class_folder(c.dreambooth, tmp_path) == tmp_path / "reg"


def test_an_empty_class_source_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    c = config(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match=r"dreambooth.class_data 'folder:.*' holds no"):
        dreambooth_lib.plan(c, tmp_path)
    cfg_lib.validate(config("synthetic:12"), n_devices=1)
