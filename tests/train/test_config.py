"""Every stage config (full and tiny) validates; configs that cannot work fail clearly."""

import importlib

import pytest

from sdxl_jax.train import config as cfg_lib

STAGES = ["base_256", "base_512", "base_1024", "refiner", "finetune"]


def load(stage, arg=""):
    return importlib.import_module(f"experiments.{stage}").get_config(arg)


@pytest.mark.parametrize("arg", ["", "tiny"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_configs_validate(stage, arg):
    c = load(stage, arg)
    cfg_lib.validate(c, n_devices=8)
    cfg_lib.unet_config(c.model.preset)  # the preset resolves
    assert c.stage == stage


def test_paper_curriculum_values():
    assert load("base_256").data.bucket_set == "sdxl_256"
    assert load("base_256").data.global_batch_size == 2048
    assert load("base_256").optim.total_steps == 600_000
    assert load("base_512").optim.total_steps == 200_000
    assert load("base_512").init_from == "base_256"
    assert load("base_1024").step.offset_noise == 0.05
    assert load("refiner").step.t_max == 200


def test_latent_factor_matches_the_models():
    assert cfg_lib.latent_factor("sdxl_base") == 32  # VAE 8 x UNet 2^2
    assert cfg_lib.latent_factor("tiny") == 16  # tiny VAE 4 x 2^2


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mesh.data": 2, "mesh.fsdp": 8}, "needs 16 devices, 8 available"),
        ({"data.global_batch_size": 12}, "does not divide over the batch axes data x fsdp = 8"),
        ({"data.bucket_set": "tiny_32", "model.preset": "sdxl_base"}, "not divisible by 32"),
        ({"step.t_min": 500, "step.t_max": 200}, "need 0 <= t_min < t_max <= 1000"),
        ({"model.preset": "huge"}, "unknown model preset 'huge'"),
    ],
)
def test_configs_that_cannot_work_fail_before_compiling(change, message):
    c = load("base_256")
    for key, value in change.items():
        section, name = key.split(".")
        c[section][name] = value
    with pytest.raises(ValueError, match=message):
        cfg_lib.validate(c, n_devices=8)


def test_locked_configs_reject_misspelt_keys():
    c = load("base_256")
    c.lock()
    with pytest.raises(AttributeError):
        c.optim.learning_rate = 1e-4  # the key is optim.lr


def test_dreambooth_and_caption_options_name_their_fixes():
    cfg_lib.validate(load("dreambooth", "tiny"), n_devices=8)
    c = load("dreambooth")
    c.init_from = "/models/sdxl"
    with pytest.raises(ValueError) as e:
        cfg_lib.validate(c, n_devices=8)
    for field in ("instance_data is empty", "instance_prompt is empty", "class_prompt is empty"):
        assert f"dreambooth.{field}" in str(e.value)
    c.dreambooth.update(instance_data="/d", instance_prompt="a sks dog", prior_loss_weight=0.0)
    c.data.global_batch_size = 8  # (4 on one card)
    cfg_lib.validate(c, n_devices=8)  # no class prompt needed without prior preservation
    c.data.path = "/other"
    with pytest.raises(ValueError, match="leave data.path empty"):
        cfg_lib.validate(c, n_devices=8)
    c = load("lora", "tiny")  # cache "auto"
    c.data.update(caption_dropout=0.1, keep_tags=-1)
    with pytest.raises(ValueError) as e:
        cfg_lib.validate(c, n_devices=8)
    assert "data.keep_tags -1: need >= 0" in str(e.value)
    assert "set data.cache='' (online text)" in str(e.value)
