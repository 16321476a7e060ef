"""The train state (a pytree) and the optimizer: AdamW with warm-up and a schedule, global-norm
clipping, gradient accumulation; the EMA of the weights.

Everything here is pure and jittable, so the state can be created already sharded
(``jax.jit(init_state, out_shardings=...)``) and carried through a donated train step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

SCHEDULES = ("cosine", "constant")


@struct.dataclass
class TrainState:
    """What a run carries from step to step (and checkpoints).

    ``step`` counts train-step calls, i.e. batches consumed, skipped ones included; the optimizer
    counts its applied updates itself (in ``opt_state``). ``rng`` is the run's base key: step
    ``s`` draws from ``fold_in(rng, s)``, so the randomness of a step depends on (seed, step)
    alone. ``skipped`` counts steps whose loss or gradient was not finite (no update made),
    ``bad_streak`` how many of those came in a row, up to now.
    """

    step: jax.Array  # [] int32
    params: Any  # nnx.State of the UNet's nnx.Param, fp32 master weights
    opt_state: optax.OptState
    ema: Any  # same structure as params
    rng: jax.Array  # raw uint32 key data (jax.random.PRNGKey), [2] for the default impl
    skipped: jax.Array  # [] int32
    bad_streak: jax.Array  # [] int32


def lr_schedule(
    lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine"
) -> optax.Schedule:
    """Linear warm-up, ``lr * (n + 1) / warmup_steps`` at update ``n`` (so the first update
    already moves), then constant or a cosine decay to 0 at ``total_steps``; counted in optimizer
    updates."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use one of {SCHEDULES}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule == "cosine" and total_steps <= warmup_steps:
        raise ValueError(
            f"a cosine schedule needs total_steps ({total_steps}) > warmup_steps "
            f"({warmup_steps}); raise total_steps or use schedule='constant'"
        )
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(lr, total_steps - warmup_steps)
    if warmup_steps == 0:
        return main

    def warm(count: jax.Array) -> jax.Array:
        return lr * jnp.minimum(1.0, (count + 1) / warmup_steps)

    return optax.join_schedules([warm, main], [warmup_steps])


def make_optimizer(
    lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    b1: float = 0.9,
    b2: float = 0.999,
    weight_decay: float = 1e-2,
    clip_norm: float | None = 1.0,
    accumulate: int = 1,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW on global-norm-clipped gradients, the learning rate from :func:`lr_schedule`.

    ``accumulate > 1`` averages the gradients of that many consecutive calls
    (``optax.MultiSteps``) and updates once, clipping the average; the calls in between return
    zero updates. The learning rate used lives in the state (``optax.inject_hyperparams``):
    :func:`learning_rate` reads it. Weight decay applies to every parameter, as diffusers'
    SDXL training scripts do.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0 (or None for no clipping), got {clip_norm}")

    def adamw(learning_rate: Any) -> optax.GradientTransformation:
        adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        if clip_norm is None:
            return adam
        return optax.chain(optax.clip_by_global_norm(clip_norm), adam)

    tx = optax.inject_hyperparams(adamw)(
        learning_rate=lr_schedule(lr, warmup_steps, total_steps, schedule)
    )
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate).gradient_transformation()
    return tx


def optimizer_from_config(optim: Any, **overrides: Any) -> optax.GradientTransformation:
    """:func:`make_optimizer` from a stage config's ``optim`` group (``clip_norm`` 0: off);
    ``overrides`` replace fields (e.g. a discriminator's own ``lr``)."""
    kw = dict(
        lr=optim.lr,
        warmup_steps=optim.warmup_steps,
        total_steps=optim.total_steps,
        schedule=optim.schedule,
        b1=optim.b1,
        b2=optim.b2,
        weight_decay=optim.weight_decay,
        clip_norm=optim.clip_norm or None,
        accumulate=optim.accumulate,
    )
    return make_optimizer(**{**kw, **overrides})


def _inner(opt_state: optax.OptState) -> optax.OptState:
    return opt_state.inner_opt_state if isinstance(opt_state, optax.MultiStepsState) else opt_state


def learning_rate(opt_state: optax.OptState) -> jax.Array:
    """The learning rate of the last applied update (of update 0 before any) from the state of
    a :func:`make_optimizer` optimizer."""
    inner = _inner(opt_state)
    hyperparams = getattr(inner, "hyperparams", None)  # optax.inject_hyperparams' state
    if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
        raise TypeError(
            f"optimizer state {type(inner).__name__} carries no learning rate: build the "
            f"optimizer with make_optimizer"
        )
    return jnp.asarray(hyperparams["learning_rate"], jnp.float32)


def applies_update(old: optax.OptState, new: optax.OptState) -> jax.Array:
    """Whether the optimizer call that turned ``old`` into ``new`` changed the parameters
    (always, except between the accumulation steps of ``optax.MultiSteps``)."""
    if isinstance(new, optax.MultiStepsState):
        return new.gradient_step > old.gradient_step
    return jnp.asarray(True)


def init_state(params: Any, optimizer: optax.GradientTransformation, rng: Any) -> TrainState:
    """A fresh state: optimizer state for ``params``, the EMA starting at ``params``.

    ``rng``: an int seed or a jax PRNG key (typed or raw). Jittable (with ``optimizer`` closed
    over) so that sharded parameters give a sharded state.
    """
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    elif jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema=params,
        rng=jnp.asarray(rng),
        skipped=jnp.zeros((), jnp.int32),
        bad_streak=jnp.zeros((), jnp.int32),
    )
    return _unaliased(state)


def _unaliased(tree: Any) -> Any:
    # The train step donates the whole state: no two leaves may share a buffer (the EMA starts
    # as the params; an optimizer may hand out one zeros array twice).
    seen: set[int] = set()

    def own(x: Any) -> Any:
        if id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree.map(own, tree)


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """``decay * ema + (1 - decay) * params``, leaf by leaf, in the EMA's dtype."""
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params
    )


def ema_decay_at(n: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """The EMA decay at update ``n``: ``min(decay, (1 + n) / (10 + n))`` with warm-up (LDM's
    ``LitEma``, diffusers' ``EMAModel`` default), so that a short run's EMA is not mostly its
    random initialisation (0.9999 ** 1000 is still 0.9)."""
    n = jnp.asarray(n, jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if warmup else jnp.asarray(decay)


def update_if_finite(
    state: Any, ok: jax.Array, update: Callable[[], dict[str, Any]], fields: tuple[str, ...]
) -> tuple[Any, jax.Array]:
    """The state after one train step: ``update()``'s new values of ``fields`` where ``ok`` (the
    step's losses and gradient norms are finite), the old ones otherwise; ``step`` advanced and
    the counters ``skipped`` / ``bad_streak`` updated. Returns it with ``bad`` ([] int32, 1 if
    the update was dropped). A cond rather than a select: nothing is computed for a skipped
    update, and it compiles faster than a select over every leaf."""
    keep = lambda _: {f: getattr(state, f) for f in fields}
    new = jax.lax.cond(ok, lambda _: update(), keep, None)
    bad = (~ok).astype(jnp.int32)
    state = state.replace(
        step=state.step + 1,
        skipped=state.skipped + bad,
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1).astype(jnp.int32),
        **new,
    )
    return state, bad
