"""Evaluation during training (``config.eval``): every K steps and at the end the EMA weights
sample the prompt set, the evaluators score it, ``eval/*`` reaches metrics.jsonl, TensorBoard
and summary.json; the final scores are those of the same images made by ``generate()`` from
the stage's export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import autoencoder, base_256
from sdxl_jax.data import synthetic
from sdxl_jax.eval import prompts
from sdxl_jax.train import loop
from tests.train.runs import config_with


@pytest.mark.slow(seconds=60)
def test_eval_every_k_steps_logs_the_scores_of_the_exported_model(parts, tmp_path):
    from sdxl_jax.inference import generate

    c = config_with(base_256, parts, **{
        "optim.total_steps": 5, "eval.every_steps": 2, "eval.count": 4, "eval.steps": 3,
        "eval.batch_size": 4, "eval.seed": 7, "eval.size": 32,
    })  # fmt: skip
    result = loop.run_stage(c, tmp_path)
    assert result.status == "finished"
    rows = [
        json.loads(x) for x in (tmp_path / "base_256" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = {r["step"]: r for r in rows if "eval/synthetic_all" in r}
    assert sorted(evals) == [2, 4, 5]  # every 2 steps, and the end
    summary = json.loads((tmp_path / "base_256" / "summary.json").read_text())
    assert summary["eval"]["step"] == 5 and summary["eval"]["synthetic_images"] == 4
    # The same prompts, seeds and sampler through generate() on the export: the same scores.
    texts = prompts.load("synthetic").subset(4, 7).texts
    images = list(generate.generate(
        texts, result.export, sampler="ddim", spacing="trailing", steps=3, guidance=4.0,
        height=32, width=32, seed=7,
    ).images)  # fmt: skip
    want = synthetic.accuracy(images, texts)
    assert {k: evals[5][f"eval/synthetic_{k}"] for k in want} == want
    assert np.std(images) > 5  # not blank pictures
    events = list((tmp_path / "base_256" / "tb").glob("events.out.tfevents.*"))
    assert events and b"eval/synthetic_all" in events[0].read_bytes()


def test_eval_config_errors_come_before_training(parts, tmp_path):
    c = config_with(base_256, parts, **{"eval.every_steps": 2, "eval.metrics": "fid"})
    with pytest.raises(ValueError, match="config.eval: --eval fid needs --inception"):
        loop.run_stage(c, tmp_path)
    c = config_with(base_256, parts, **{"eval.every_steps": 2, "eval.prompts": "nope.tsv"})
    with pytest.raises(ValueError, match="config.eval: prompt set nope.tsv does not exist"):
        loop.run_stage(c, tmp_path)
    assert not list(tmp_path.glob("base_256/checkpoints/*"))
    c = autoencoder.get_config("tiny")
    c.eval.every_steps = 2
    with pytest.raises(ValueError, match="'autoencoder' .autoencoder. does not sample images"):
        loop.run_stage(c, tmp_path)
