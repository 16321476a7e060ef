"""Evaluation during training: ``config.eval`` every ``every_steps`` steps and at the end.

The stage's EMA weights sample a fixed prompt set (DDIM, as the previews: ``task.sample``),
the evaluators of ``sdxl_jax.eval`` score the images (FID / KID / IS against a reference, CLIP
score, or the synthetic scorer at toy size), and the numbers go to TensorBoard and
``metrics.jsonl`` as ``eval/<metric>``. Every process samples (one SPMD program); process 0
scores on its own devices and logs.
"""

from __future__ import annotations

import time
from typing import Any


def check(config: Any) -> tuple[Any, Any] | None:
    """``config.eval`` checked from the config alone (the weights files exist, the prompt set
    reads, a FID reference is given): (``EvalSpec``, prompt set), or None when it is off."""
    cfg = config.get("eval")
    if cfg is None or not int(cfg.every_steps):
        return None
    from sdxl_jax.eval import evaluators, folders, prompts, run

    if config.kind != "diffusion":
        raise ValueError(
            f"config.eval: stage {config.stage!r} ({config.kind}) does not sample images; set "
            "eval.every_steps=0"
        )
    try:
        spec = run.EvalSpec(
            evaluators.parse_metrics(cfg.metrics), inception=cfg.inception or None,
            clip=cfg.clip or None, ref=cfg.ref or None, dims=int(cfg.dims), mode=cfg.mode,
        )  # fmt: skip
        prompt_set = prompts.load(cfg.prompts).subset(int(cfg.count) or None, int(cfg.seed))
        spec.check(prompt_set)
    except (folders.EvalInputError, prompts.PromptSetError) as e:
        raise ValueError(f"config.eval: {e}") from e
    return spec, prompt_set


class Evaluations:
    """The ``config.eval`` policy: ``maybe(step, state)`` at each step boundary, ``final``."""

    def __init__(self, task: Any, config: Any, log: Any):
        cfg = config.get("eval")
        self.every = int(cfg.every_steps) if cfg is not None else 0
        self.task, self.log, self.cfg = task, log, cfg
        self.last: dict[str, Any] | None = None
        self._done_at = -1
        checked = check(config)
        if checked is None:
            return
        import jax

        from sdxl_jax.eval import run

        spec, self.prompts = checked
        self.scorers = None
        if jax.process_index() == 0:  # scores on this host's devices only
            from sdxl_jax.inference import runtime

            local = runtime.make_mesh(jax.local_devices())
            self.scorers = run.load_scorers(spec, self.prompts, mesh=local)

    def maybe(self, step: int, state: Any) -> None:
        if self.every and step % self.every == 0:
            self.run(step, state)

    def final(self, step: int, state: Any) -> None:
        if self.every and self._done_at != step:
            self.run(step, state)

    def run(self, step: int, state: Any) -> dict[str, Any] | None:
        """Sample the prompt set with the EMA weights, score, log ``eval/*``."""
        from sdxl_jax.eval import run

        cfg, t0 = self.cfg, time.perf_counter()
        texts = self.prompts.texts
        bs = max(1, min(int(cfg.batch_size), len(texts)))
        side = int(cfg.size) or None
        batches = []
        for start in range(0, len(texts), bs):
            chunk = texts[start : start + bs]
            padded = chunk + [chunk[-1]] * (bs - len(chunk))  # one compiled shape
            images = self.task.sample(
                state.ema,
                padded,
                size=(side, side) if side else self.task.default_size(),
                steps=int(cfg.steps),
                guidance=float(cfg.guidance),
                seed=int(cfg.seed) + start,
            )[: len(chunk)]
            batches.append((list(images), self.prompts.prompts[start : start + bs]))
        self._done_at = step
        if self.scorers is None:
            return None
        result = run.score_batches(self.scorers.fresh(), batches)
        scalars = {
            f"eval/{k}": float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }  # fmt: skip
        scalars["eval/seconds"] = time.perf_counter() - t0
        self.log.scalars(step, scalars)
        self.last = {"step": step, **result}
        return self.last
