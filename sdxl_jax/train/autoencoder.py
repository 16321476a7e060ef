"""The autoencoder stage's task for the train loop (:mod:`sdxl_jax.train.task`): the SDXL VAE
(paper 2.4) with its PatchGAN discriminator and, when given weights, LPIPS; sharded init or
``init_from``, the jitted step of :mod:`sdxl_jax.train.autoencoder_step`, reconstructions as
previews, and the EMA VAE exported as a diffusers ``vae/`` folder with a measured
``scaling_factor``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdxl_jax import checkpoint, sharding
from sdxl_jax import workdir as workdir_lib
from sdxl_jax.data import buckets, images
from sdxl_jax.models.discriminator import GAN_LOSSES, DiscriminatorConfig, NLayerDiscriminator
from sdxl_jax.models.vae import AutoencoderKL, VAEConfig
from sdxl_jax.train.autoencoder_step import AEGraphs, AEState, AEStepConfig, train_step
from sdxl_jax.train.state import optimizer_from_config
from sdxl_jax.weights.perceptual import load_perceptual

VAE_PRESETS = {
    "sdxl": VAEConfig.sdxl,
    "tiny": VAEConfig.tiny,
    # CPU stage: 4x down (64 px -> 16x16x4 latents), a quarter of tiny's channel products.
    "tiny_fast": lambda: VAEConfig(
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64
    ),
}
DISC_PRESETS = {"patchgan": DiscriminatorConfig.patchgan, "tiny": DiscriminatorConfig.tiny}
ARCH_FIELDS = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)


def vae_preset(name: str) -> VAEConfig:
    if name not in VAE_PRESETS:
        raise ValueError(f"autoencoder model.preset {name!r}: use one of {sorted(VAE_PRESETS)}")
    return VAE_PRESETS[name]()


def validate(config: Any, n_devices: int) -> None:
    """Raise ValueError listing every problem of an autoencoder stage config, before compiling:
    mesh and batch, presets, loss names, image sides and crop vs the VAE's downscale."""
    problems, ae = [], config.ae
    try:
        sizes = sharding.mesh_shape(dict(config.mesh), n_devices)
        if config.data.global_batch_size % (sizes["data"] * sizes["fsdp"]):
            problems.append(
                f"data.global_batch_size {config.data.global_batch_size} does not divide over "
                f"the batch axes data x fsdp = {sizes['data'] * sizes['fsdp']}"
            )
    except ValueError as e:
        problems.append(str(e))
    for key, value, known in (
        ("model.preset", config.model.preset, VAE_PRESETS),
        ("ae.disc_preset", ae.disc_preset, DISC_PRESETS),
        ("ae.disc_loss", ae.disc_loss, GAN_LOSSES),
        ("model.compute_dtype", config.model.compute_dtype, ("bfloat16", "float32")),
    ):
        if value not in known:
            problems.append(f"{key} {value!r}: use one of {sorted(known)}")
    if config.model.preset in VAE_PRESETS:
        f = vae_preset(config.model.preset).downscale
        try:
            bset = buckets.bucket_set(config.data.bucket_set)
            bad = [s for s in bset.sizes if s[0] % f or s[1] % f]
            if bad:
                problems.append(
                    f"bucket set {bset.name} has sides not divisible by the VAE's "
                    f"downscale {f}: {bad[:4]}"
                )
            if ae.crop and (ae.crop % f or ae.crop > min(min(s) for s in bset.sizes)):
                problems.append(
                    f"ae.crop {ae.crop} must divide by {f} and fit every bucket of {bset.name}"
                )
        except ValueError as e:
            problems.append(str(e))
    if ae.perceptual_path and not Path(ae.perceptual_path).exists():
        problems.append(
            f"ae.perceptual_path {ae.perceptual_path} does not exist (set it to '' "
            f"to train without the perceptual term)"
        )
    if config.optim.warmup_steps > config.optim.total_steps:
        problems.append("optim.warmup_steps exceeds optim.total_steps")
    if problems:
        raise ValueError(
            f"config for stage {config.stage!r} cannot run:\n- " + "\n- ".join(problems)
        )


def dataset_images(path: str, bucket_set: str, n: int) -> np.ndarray:
    """The first ``n`` images of a prepared dataset (or of ``synthetic:N[?options]``, rendered),
    centre-cropped to the bucket set's most square bucket: float32 [n, h, w, 3] in [-1, 1], the
    same on every host."""
    if path.startswith("synthetic:"):  # rendered, with the spec's options
        from sdxl_jax.data import sources

        synth = sources.open_source(path)
        encoded = [synth.load(i).data for i in range(min(n, len(synth)))]
    else:
        from sdxl_jax.data.batching import open_source

        source = open_source(path)
        encoded = [source[i]["image"] for i in range(min(n, len(source)))]
    bset = buckets.bucket_set(bucket_set)
    size = bset.sizes[bset.nearest(1, 1)]
    out = []
    for data in encoded:
        image = images.decode_rgb(data)
        out.append(buckets.apply_crop(image, buckets.plan_crop(image.shape[:2], size)))
    return np.stack(out).astype(np.float32) / 127.5 - 1.0


class AutoencoderTask:
    """The autoencoder stage for the train loop (:mod:`sdxl_jax.train.task`).

    Reads ``config.model`` (preset, compute_dtype), ``config.ae`` (loss, discriminator,
    perceptual weights, crop, preview and scale images), ``config.optim`` (the VAE's AdamW),
    ``config.step.ema_decay``, ``config.data`` (path, bucket_set, batch) and ``init_from``.
    """

    batch_keys = ("image",)

    def __init__(self, config: Any, mesh: jax.sharding.Mesh):
        validate(config, mesh.size)
        self.config, self.mesh = config, mesh
        self.init_kind, self.init_path = _init_source(config.init_from)
        self.vae_config = self._vae_config()
        self.cfg = self._step_config()
        params, disc = self._models()
        self.optimizer = optimizer_from_config(config.optim)
        self.disc_optimizer = optimizer_from_config(
            config.optim, lr=config.ae.disc_lr, weight_decay=0.0
        )
        self._abstract = jax.eval_shape(self._fresh, params, disc)
        self.shardings = sharding.tree_shardings(self._abstract, mesh)
        self._jit()
        self._images: dict[str, np.ndarray | None] = {}

    def _vae_config(self) -> VAEConfig:
        """``model.preset``'s VAE, or the architecture of the checkpoint ``init_from`` names."""
        preset = vae_preset(self.config.model.preset)
        if self.init_kind not in ("diffusers", "file"):
            return preset
        from sdxl_jax.inference.checkpoints import check_vae

        found, arch = check_vae(self.init_path), lambda c: [getattr(c, f) for f in ARCH_FIELDS]
        if arch(found) != arch(preset):
            print(
                f"autoencoder: init_from's VAE is not model.preset "
                f"{self.config.model.preset!r}'s architecture; using the checkpoint's: {found}"
            )
        return found

    def _step_config(self) -> AEStepConfig:
        config, ae = self.config, self.config.ae
        cfg = AEStepConfig(
            l1_weight=ae.l1_weight,
            kl_weight=ae.kl_weight,
            perceptual_weight=ae.perceptual_weight if ae.perceptual_path else 0.0,
            disc_weight=ae.disc_weight,
            disc_start=ae.disc_start,
            disc_loss=ae.disc_loss,
            sample_posterior=ae.sample_posterior,
            crop=ae.crop,
            ema_decay=config.step.ema_decay,
            ema_warmup=ae.ema_warmup,
            compute_dtype=config.model.compute_dtype,
        )
        if ae.perceptual_weight > 0 and not ae.perceptual_path:
            print(
                "autoencoder: ae.perceptual_path is empty: training WITHOUT the LPIPS term "
                "(perceptual_weight treated as 0)"
            )
        return cfg

    def _models(self) -> tuple[nnx.State, nnx.State]:
        """The graphs (VAE in the compute dtype and fp32, discriminator, LPIPS when used) and
        the abstract VAE parameters and discriminator state."""
        dtype = jnp.dtype(self.config.model.compute_dtype)
        self.disc_config = DISC_PRESETS[self.config.ae.disc_preset]()
        self.make_vae = lambda rngs, dt=dtype: AutoencoderKL(self.vae_config, rngs=rngs, dtype=dt)
        self.make_disc = lambda rngs: NLayerDiscriminator(self.disc_config, rngs=rngs, dtype=dtype)
        vae_graph, params = _split(nnx.eval_shape(lambda: self.make_vae(nnx.Rngs(0))))
        disc_graph, disc = _split(nnx.eval_shape(lambda: self.make_disc(nnx.Rngs(0))))
        self.graph_fp32 = _split(nnx.eval_shape(lambda: self.make_vae(nnx.Rngs(0), jnp.float32)))[0]
        self.lpips, lpips_graph = None, None
        if self.cfg.perceptual_weight > 0:
            path = self.config.ae.perceptual_path
            replicated = NamedSharding(self.mesh, P())
            lpips_graph, self.lpips = nnx.split(
                load_perceptual(path, dtype=dtype, sharding=replicated)
            )
            print(f"autoencoder: LPIPS weights from {path}")
        self.graphs = AEGraphs(vae_graph, disc_graph, lpips_graph)
        return params, disc

    def _jit(self) -> None:
        """The jitted programs: sharded init (random or from weights), the step, previews."""
        config, mesh = self.config, self.mesh
        # One jitted init creates everything in its shards (one compile: seconds on a CPU).
        disc_init = lambda: _split(self.make_disc(nnx.Rngs(config.seed + 1)))[1]
        vae_init = lambda: shift_logvar(
            _split(self.make_vae(nnx.Rngs(config.seed), jnp.float32))[1],
            self.vae_config.latent_channels,
            config.ae.logvar_init,
        )
        self._create_random = jax.jit(
            lambda: self._fresh(vae_init(), disc_init()), out_shardings=self.shardings
        )
        self._create_from = jax.jit(
            lambda params: self._fresh(params, disc_init()), out_shardings=self.shardings
        )
        step = functools.partial(
            train_step,
            graphs=self.graphs,
            cfg=self.cfg,
            optimizer=self.optimizer,
            disc_optimizer=self.disc_optimizer,
        )
        batch_sh = {"image": sharding.batch_sharding(mesh, 4)}
        lpips_sh = None if self.lpips is None else sharding.tree_shardings(self.lpips, mesh)
        self._step = jax.jit(
            step,
            in_shardings=(self.shardings, batch_sh, lpips_sh),
            out_shardings=(self.shardings, None),
            donate_argnums=0,
        )
        rep = NamedSharding(mesh, P())
        vae = lambda ema: nnx.merge(self.graph_fp32, ema)
        self._recon = jax.jit(lambda e, x: vae(e).decode(vae(e).encode(x)[0]), out_shardings=rep)
        self._means = jax.jit(lambda e, x: vae(e).encode(x)[0], out_shardings=rep)

    def _fresh(self, params: Any, disc: Any) -> AEState:
        copy = lambda t: jax.tree.map(jnp.copy, t)  # no two leaves share a buffer (donation)
        return AEState(
            step=jnp.zeros((), jnp.int32),
            params=copy(params),
            opt_state=self.optimizer.init(params),
            ema=copy(params),
            disc=copy(disc),
            disc_opt_state=self.disc_optimizer.init(disc),
            rng=jax.random.key_data(jax.random.key(self.config.seed)),
            skipped=jnp.zeros((), jnp.int32),
            bad_streak=jnp.zeros((), jnp.int32),
        )

    # -- the contract ----------------------------------------------------------------------

    def abstract_state(self) -> AEState:
        return checkpoint.abstract_like(self._abstract, self.shardings)

    def init_state(self) -> AEState:
        if self.init_kind == "random":
            return self._create_random()
        return self._create_from(self._initial_params())

    def step(self, state: AEState, batch: Any) -> tuple[AEState, dict[str, jax.Array]]:
        return self._step(state, {k: batch[k] for k in self.batch_keys}, self.lpips)

    def compile_step(self, state: AEState, batch: Any) -> None:
        self._step.lower(state, {k: batch[k] for k in self.batch_keys}, self.lpips).compile()

    def preview(self, state: AEState) -> np.ndarray | None:
        """Originals (top row) above the EMA's reconstructions (bottom row), uint8."""
        x = self._fixed_images("preview", self.config.ae.preview_images)
        if x is None:
            return None
        rec = np.asarray(self._recon(state.ema, self._replicated(x)))
        rows = [np.concatenate(list(r), axis=1) for r in (x, np.clip(rec, -1.0, 1.0))]
        return np.rint((np.concatenate(rows, axis=0) + 1.0) * 127.5).astype(np.uint8)

    def export(self, state: AEState, out: Path) -> Path:
        """The EMA VAE as ``<out>/vae`` (diffusers), ``scaling_factor`` = 1 / std of the EMA
        encoder's posterior means over ``ae.scale_images`` dataset images (as SD measured it)."""
        ema = jax.jit(lambda t: t, out_shardings=NamedSharding(self.mesh, P()))(state.ema)
        config = self.vae_config
        x = self._fixed_images("scale", self.config.ae.scale_images)
        if x is None:
            print(
                f"autoencoder: no images to measure the latent scale; scaling_factor stays "
                f"{config.scaling_factor}"
            )
        else:
            z = np.concatenate(
                [
                    np.asarray(self._means(ema, self._replicated(x[i : i + 8])))
                    for i in range(0, len(x), 8)
                ]
            )
            std = float(np.std(z.astype(np.float64)))
            config = dataclasses.replace(config, scaling_factor=1.0 / std)
            print(
                f"autoencoder: latent std {std:.4f} over {len(x)} images -> scaling_factor "
                f"{config.scaling_factor:.5f}"
            )
        module = nnx.merge(self.graph_fp32, ema)
        module.config = config
        if jax.process_index() == 0:
            from sdxl_jax.weights.diffusers_io import save_component

            save_component(module, out, "vae")
        return Path(out) / "vae"

    # -- helpers ---------------------------------------------------------------------------

    def _initial_params(self) -> nnx.State:
        kind, path = self.init_kind, self.init_path
        if kind == "stage":
            abstract = checkpoint.abstract_like(self._abstract.params, self.shardings.params)
            return checkpoint.load_final_ema(path, abstract)
        from sdxl_jax.weights import formats

        loaded = formats.load(path, ["vae"], sharding=sharding.loader_sharding(self.mesh))["vae"]
        print(f"autoencoder: VAE weights from {path}")
        return _split(loaded)[1]

    def _fixed_images(self, what: str, n: int) -> np.ndarray | None:
        if what not in self._images:
            path = self.config.data.path
            if not path or n <= 0:
                print(f"autoencoder: data.path is empty: no {what} images")
                self._images[what] = None
            else:
                self._images[what] = dataset_images(path, self.config.data.bucket_set, n)
        return self._images[what]

    def _replicated(self, x: np.ndarray) -> jax.Array:
        sh = NamedSharding(self.mesh, P())
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def shift_logvar(params: nnx.State, latent: int, amount: float) -> nnx.State:
    """Add ``amount`` to the bias of the encoder's log-variance outputs (the last ``latent``
    channels of quant_conv, or of encoder.conv_out without one).

    At the usual init the posterior's std is about 1: latent channels drown in sampling noise,
    so the decoder ignores them and the encoder has no reason to shrink their variance, a slow
    start (and a chroma axis lost on the way, seen in 500-step CPU runs) that long runs absorb.
    A negative shift (ae.logvar_init, e.g. -6: std 0.05) starts the posterior nearly sharp."""
    if amount:
        conv = params["quant_conv"] if "quant_conv" in params else params["encoder"]["conv_out"]
        conv["bias"].set_value(conv["bias"][...].at[latent:].add(amount))
    return params


def _split(module: nnx.Module) -> tuple[Any, nnx.State]:
    graph, params, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(module).__name__} holds state other than nnx.Param")
    return graph, params


def _init_source(init_from: str) -> tuple[str, Path | None]:
    """("random" | "stage" | "diffusers" | "file", path) for ``config.init_from``."""
    if not init_from:
        return "random", None
    path = workdir_lib.fetch(init_from)  # a local path, or a bucket URL fetched to this host
    if (path / checkpoint.FINAL_EMA).exists() or (path / workdir_lib.CHECKPOINTS).is_dir():
        return "stage", path  # (final_ema/ lost: load_final_ema takes the last checkpoint's)
    if path.name == "vae" and (path / "config.json").exists():
        path = path.parent  # the vae/ folder of a diffusers checkpoint
    from sdxl_jax.weights import formats

    return ("diffusers" if formats.detect(path) == "diffusers" else "file"), path
