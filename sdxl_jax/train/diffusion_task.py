"""The diffusion stages' task (base stages, refiner, fine-tuning): the UNet that trains, the
frozen VAE and text encoders that feed it, previews by sampling, and the export.

Where things come from (all resolved before anything compiles):

- UNet: ``model.preset`` initialised at random, or ``init_from``: a previous stage of this
  workdir (its final EMA weights) or a pretrained checkpoint (diffusers folder or single file;
  its UNet config then wins over the preset).
- Frozen parts: ``model.checkpoint``, an SDXL diffusers folder or single file with the text
  encoders and tokenizers (and the VAE unless ``model.vae`` names another folder or a finished
  autoencoder stage of this workdir). They run inside the step ("online"); with
  ``data.cache`` the batches carry their outputs instead.

The export (``<stage>/export``) is a complete diffusers folder (the EMA UNet, the frozen parts,
the scheduler), which ``python -m sdxl_jax.sample`` and diffusers open.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import conditioning, distributed, sharding
from sdxl_jax import workdir as workdir_lib
from sdxl_jax.diffusion.schedule import SDXL_SCHEDULER_CONFIG, NoiseSchedule, sampler_steps
from sdxl_jax.inference import checkpoints, runtime
from sdxl_jax.models import lora as lora_lib
from sdxl_jax.models.unet import UNet2DConditionModel, UNetConfig
from sdxl_jax.train import config as config_lib
from sdxl_jax.train import state as state_lib
from sdxl_jax.train import step as step_lib
from sdxl_jax.train import warm_start
from sdxl_jax.train.tiny_frozen import TINY_FROZEN, build_tiny_frozen
from sdxl_jax.weights import config_checks, configs, diffusers_io, formats
from sdxl_jax.weights.components import COMPONENTS

ARRAY_KEYS = ("original_size", "crop_coords_top_left", "target_size")
CACHE_KEYS = ("latent_mean", "latent_logvar", "context", "pooled")


def resolve(path: str, workdir: Path) -> Path:
    """A config path: absolute, relative to the current directory, a name in the workdir, or a
    bucket URL (``gs://...``: fetched to this host's disk first, see ``workdir.fetch``)."""
    if workdir_lib.is_remote(path):
        return workdir_lib.fetch(path)
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(workdir) / p


def stage_export(name: str, workdir: Path) -> Path | None:
    """The export folder of stage ``name`` of this workdir, if the name is a stage's."""
    if not name or "/" in name or Path(name).suffix:
        return None
    folder = Path(workdir) / name
    return folder / "export" if folder.is_dir() or not Path(name).exists() else None


def frozen_sources(config: Any, workdir: Path) -> tuple[Path, Path]:
    """(checkpoint with text encoders + tokenizers, folder or file with the VAE); checked."""
    source = config.model.checkpoint
    if not source and config.init_from and stage_export(config.init_from, workdir) is None:
        source = config.init_from  # fine-tuning: the pretrained checkpoint has them all
    if not source:
        raise ValueError(
            "model.checkpoint is empty: set --config.model.checkpoint=PATH to an SDXL diffusers "
            "folder or single file; the frozen text encoders (and VAE) come from it"
        )
    ckpt = resolve(source, workdir)
    if source == TINY_FROZEN:
        distributed.lead_first(f"frozen {ckpt}", ckpt.exists, lambda: build_tiny_frozen(ckpt))
    if not ckpt.exists():
        raise FileNotFoundError(f"model.checkpoint {ckpt} does not exist")
    vae = ckpt
    if config.model.vae:
        exported = stage_export(config.model.vae, workdir)
        vae = exported if exported is not None else resolve(config.model.vae, workdir)
        if not vae.exists():
            raise FileNotFoundError(
                f"model.vae {config.model.vae!r}: {vae} does not exist. If it names an "
                f"autoencoder stage, finish it first: python -m sdxl_jax.train --config "
                f"experiments/autoencoder.py[:tiny] --workdir {workdir}"
            )
    checkpoints.check_vae(vae)
    return ckpt, vae


def is_refiner(config: Any) -> bool:
    return config.model.preset.endswith("refiner")


def pretrained_init(config: Any, workdir: Path) -> Path | None:
    """The pretrained checkpoint ``init_from`` names; None when it is empty or names a stage
    of this workdir."""
    if config.init_from and stage_export(config.init_from, workdir) is None:
        return resolve(config.init_from, workdir)
    return None


def step_config(config: Any) -> step_lib.StepConfig:
    """The train step's settings from a stage config's ``step`` and ``model`` groups."""
    s = config.step
    return step_lib.StepConfig(
        t_min=s.t_min,
        t_max=s.t_max,
        offset_noise=s.offset_noise,
        prediction_type=s.prediction_type,
        min_snr_gamma=s.min_snr_gamma or None,
        cond_dropout=s.cond_dropout,
        ema_decay=s.ema_decay,
        ema_warmup=s.get("ema_warmup", True),
        compute_dtype=config.model.compute_dtype,
        refiner=is_refiner(config),
        micro_conditioning=s.get("micro_conditioning", True),
        schedule=NoiseSchedule(prediction_type=s.prediction_type),
    )


class DiffusionTask:
    """See the module docstring; the contract is :class:`sdxl_jax.train.task.Task`."""

    def __init__(self, config: Any, mesh: jax.sharding.Mesh, workdir: str | Path):
        self.config, self.mesh, self.workdir = config, mesh, Path(workdir)
        self.refiner = is_refiner(config)
        self.cached = bool(config.data.cache)  # a folder, or "auto" (the loop builds it)
        self.init_checkpoint = pretrained_init(config, self.workdir)
        self.lora = config_lib.lora_config(config)
        self.unet_config = self._unet_config()
        vae, clip_l, clip_g = self._load_frozen()
        online = {} if self.cached else {"vae": vae, "text_encoders": (clip_l, clip_g)}
        abstract = nnx.eval_shape(lambda: self._make(nnx.Rngs(0)))
        self.graphs, self._abstract_params, self.frozen = step_lib.split_models(abstract, **online)
        if self.lora is not None:
            self.frozen.update(self._frozen_base())
        self.step_config = step_config(config)
        self.optimizer = state_lib.optimizer_from_config(config.optim)
        self._abstract_state = jax.eval_shape(
            lambda p: state_lib.init_state(p, self.optimizer, 0), self._abstract_params
        )
        self.state_shardings = sharding.tree_shardings(self._abstract_state, mesh)
        self.batch_keys = self._batch_keys()
        self._step = self._jit_step()
        self._preview_fn = None

    def _unet_config(self) -> UNetConfig:
        """``model.preset``'s UNet, or the config of the pretrained checkpoint ``init_from``
        names (a previous stage of this workdir has the preset's architecture)."""
        if self.init_checkpoint is not None:
            ucfg = checkpoints.check_stage(self.init_checkpoint, need_vae=False).configs["unet"]
        else:
            ucfg = config_lib.unet_config(self.config.model.preset)
        return dataclasses.replace(ucfg, remat=_remat(self.config.model.remat))

    def _make(self, rngs: nnx.Rngs, adapters: bool = True) -> UNet2DConditionModel:
        """The UNet (fp32 parameters), with this stage's LoRA adapters when it trains some."""
        compute = jnp.dtype(self.config.model.compute_dtype)
        unet = UNet2DConditionModel(
            self.unet_config, rngs=rngs, dtype=compute, param_dtype=jnp.float32
        )
        if adapters and self.lora is not None:
            lora_lib.attach(unet, self.lora, nnx.Rngs(self.config.seed + 1))
        return unet

    def _frozen_base(self) -> dict[str, Any]:
        """A LoRA stage's frozen UNet: ``init_from``'s weights in the compute dtype, sharded by
        the usual rules, and the adapters' (dropout) state."""
        abstract = nnx.eval_shape(lambda: self._make(nnx.Rngs(0), adapters=False))
        base_abstract = nnx.split(abstract, nnx.Param, ...)[1]
        compute = jnp.dtype(self.config.model.compute_dtype)
        base = self._initial_params(base_abstract)
        shardings = sharding.tree_shardings(base_abstract, self.mesh)
        base = jax.jit(
            lambda p: jax.tree.map(lambda a: a.astype(compute), p), out_shardings=shardings
        )(base)
        rest = jax.tree.map(
            lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), NamedSharding(self.mesh, P())),
            self.frozen["unet_rest"],
        )
        return {"unet": base, "unet_rest": rest}

    def _load_frozen(self) -> tuple[Any, Any, Any]:
        """The frozen VAE and text encoders (CLIP-L None for a refiner), sharded, with the
        tokenizers; previews use them even in cache mode. Returns (vae, clip_l, clip_g)."""
        self.ckpt, self.vae_path = frozen_sources(self.config, self.workdir)
        want = ["text_encoder_2"] + ([] if self.refiner else ["text_encoder"])
        shard_fn = sharding.loader_sharding(self.mesh)
        compute = jnp.dtype(self.config.model.compute_dtype)
        frozen_models = formats.load(self.ckpt, want, dtype=compute, sharding=shard_fn)
        vae = formats.load(self.vae_path, ["vae"], sharding=shard_fn)["vae"]
        self.vae_config = vae.config
        clip_l = frozen_models.get("text_encoder")
        clip_g = frozen_models["text_encoder_2"]
        self.text_lora = config_lib.lora_config(self.config, text=True)
        if self.text_lora is not None:  # fresh adapters on both encoders (trained, not frozen)
            for i, clip in enumerate((clip_l, clip_g)):
                if clip is not None:
                    lora_lib.attach(clip, self.text_lora, nnx.Rngs(self.config.seed + 2 + i))
            self._fresh_text = nnx.state((clip_l, clip_g), nnx.LoRAParam)
        self.text = conditioning.TextEncoders(
            clip_l=clip_l,
            clip_g=clip_g,
            tokenizer_l=None
            if self.refiner
            else conditioning.load_tokenizer(self.ckpt / "tokenizer"),
            tokenizer_g=conditioning.load_tokenizer(self.ckpt / "tokenizer_2"),
        )
        self._vae_graph, self._vae_state = nnx.split(vae)
        self._text_graph, self._text_state = nnx.split((clip_l, clip_g))
        return vae, clip_l, clip_g

    def _jit_step(self) -> Any:
        """The train step jitted with explicit shardings, the state donated."""
        mesh = self.mesh
        replicated = NamedSharding(mesh, P())
        batch_shardings = {k: NamedSharding(mesh, P(sharding.BATCH_AXES)) for k in self.batch_keys}
        frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
        fn = functools.partial(
            step_lib.train_step,
            graphs=self.graphs,
            cfg=self.step_config,
            optimizer=self.optimizer,
        )
        return jax.jit(
            fn,
            in_shardings=(self.state_shardings, batch_shardings, frozen_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )

    # -- the contract ----------------------------------------------------------------------

    def _batch_keys(self) -> tuple[str, ...]:
        sizes = ARRAY_KEYS if not self.refiner else ARRAY_KEYS[:2]
        if self.cached:
            return (*CACHE_KEYS, *sizes, "loss_weight")
        ids = ("ids_g",) if self.refiner else ("ids_l", "ids_g")
        return ("image", *ids, *sizes, "loss_weight")

    def host_arrays(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The arrays the step reads from a host batch (captions tokenized here)."""
        out = {k: batch[k] for k in self.batch_keys if k in batch}
        if "loss_weight" not in out:  # a source without weights: all 1
            out["loss_weight"] = np.ones(len(batch[self.batch_keys[0]]), np.float32)
        if not self.cached:
            out.update(self.text.tokenize(list(batch["caption"])))
        missing = [k for k in self.batch_keys if k not in out]
        if missing:
            raise ValueError(f"the data pipeline's batches lack {missing}")
        return out

    def abstract_state(self) -> Any:
        return ckpt_lib.abstract_like(self._abstract_state, self.state_shardings)

    def init_state(self) -> Any:
        if self.lora is not None:  # fresh adapters (the base's initialisation is dead code)
            shardings = sharding.tree_shardings(self._abstract_params, self.mesh)
            make = lambda: nnx.state(self._make(nnx.Rngs(self.config.seed)), nnx.LoRAParam)  # noqa: E731
            if self.text_lora is not None:
                fresh = self._fresh_text
                params = jax.jit(lambda: {"unet": make(), "text": fresh}, out_shardings=shardings)()
            else:
                params = jax.jit(make, out_shardings=shardings)()
        else:
            params = self._initial_params(self._abstract_params)
        init = jax.jit(
            lambda p: state_lib.init_state(p, self.optimizer, self.config.seed),
            out_shardings=self.state_shardings,
        )
        return init(params)

    def _initial_params(self, abstract_params: Any) -> Any:
        """The UNet's ``init_from`` weights (a stage's final EMA, a pretrained checkpoint) or a
        random initialisation, as ``abstract_params`` (the UNet's nnx.Param state)."""
        param_shardings = sharding.tree_shardings(abstract_params, self.mesh)
        exported = stage_export(self.config.init_from, self.workdir)
        if exported is not None:
            stage_dir = exported.parent
            source = self._stage_unet_config(exported) if self.refiner else None
            if source is not None and source.projection_class_embeddings_input_dim != (
                self.unet_config.projection_class_embeddings_input_dim
            ):  # a refiner starting from a base stage (the tiny curriculum's refiner)
                base_abstract = nnx.split(
                    nnx.eval_shape(lambda: UNet2DConditionModel(source, rngs=nnx.Rngs(0))),
                    nnx.Param,
                    ...,
                )[1]
                base_shardings = sharding.tree_shardings(base_abstract, self.mesh)
                base = ckpt_lib.load_final_ema(
                    stage_dir, ckpt_lib.abstract_like(base_abstract, base_shardings)
                )
                params = warm_start.refiner_from_base(
                    base, source, abstract_params, self.unet_config
                )
                return jax.device_put(params, param_shardings)
            abstract = ckpt_lib.abstract_like(abstract_params, param_shardings)
            return ckpt_lib.load_final_ema(stage_dir, abstract)
        if self.init_checkpoint is not None:
            unet = formats.load(
                self.init_checkpoint,
                ["unet"],
                dtype=jnp.dtype(self.config.model.compute_dtype),
                sharding=sharding.loader_sharding(self.mesh),
            )["unet"]
            return nnx.split(unet, nnx.Param, ...)[1]
        _, state = sharding.init_sharded(
            lambda rngs: self._make(rngs, adapters=False), self.mesh, seed=self.config.seed
        )
        return state

    @staticmethod
    def _stage_unet_config(export: Path) -> UNetConfig | None:
        """The UNet config of a previous stage's export (diffusers config.json), if exported."""
        path = export / "unet" / "config.json"
        if not path.exists():
            return None
        return configs.unet_from_reference(config_checks.read_json_object(path), where=str(path))

    def step(self, state: Any, batch: Mapping[str, jax.Array]) -> tuple[Any, dict]:
        with jax.set_mesh(self.mesh):  # activations stay batch-split (layers.constrain_batch)
            return self._step(state, dict(batch), self.frozen)

    def compile_step(self, state: Any, batch: Mapping[str, jax.Array]) -> None:
        with jax.set_mesh(self.mesh):
            self._step.lower(state, dict(batch), self.frozen).compile()

    # -- previews and export ---------------------------------------------------------------

    def sample(
        self,
        params: Any,
        prompts: Sequence[str],
        *,
        size: tuple[int, int],
        steps: int = 20,
        guidance: float = 4.0,
        seed: int = 0,
        crop: tuple[int, int] = (0, 0),
        original_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """uint8 images [N, H, W, 3] of ``prompts`` with DDIM from the UNet weights ``params``
        (no refiner), micro-conditioned on ``original_size`` (default: ``size``) and ``crop``."""
        if self._preview_fn is None:
            self._preview_fn = jax.jit(  # images replicated: every process can read them
                self._sample_fn,
                static_argnames=("steps",),
                out_shardings=NamedSharding(self.mesh, P()),
            )
        h, w = size
        f = self.vae_config.downscale
        n = len(prompts)
        ids = {k: jnp.asarray(v) for k, v in self.text.tokenize(list(prompts)).items()}
        orig = original_size or size
        if self.refiner:
            size = np.broadcast_to(np.float32(orig), (n, 2))
            tids = conditioning.refiner_time_ids(size, crop, conditioning.AESTHETIC_SCORE)
        else:
            tids = np.broadcast_to(conditioning.base_time_ids(orig, crop, size), (n, 6))
        noise = runtime.initial_noise(seed, range(n), (h // f, w // f, 4))
        return np.asarray(
            self._preview_fn(
                params, self._unet_frozen(), self._text_state, self._vae_state, ids,
                jnp.asarray(tids, jnp.float32), jnp.asarray(noise), jnp.float32(guidance),
                steps=steps,
            )
        )  # fmt: skip

    def _unet_frozen(self) -> dict[str, Any]:
        """What the trained parameters need beside them to make the UNet and, with text
        adapters, the text encoders (LoRA: the frozen bases)."""
        keys = ("unet", "unet_rest") + (("text", "text_rest") if self.graphs.text_lora else ())
        return {k: self.frozen[k] for k in keys if k in self.frozen}

    def _sample_fn(
        self, params, unet_frozen, text_state, vae_state, ids, tids, noise, guidance, *, steps
    ):
        """DDIM (trailing steps) with classifier-free guidance against a zeroed text context,
        then the fp32 VAE decode: the sampling runtime's own functions."""
        p = sampler_steps(self.step_config.schedule, "ddim", steps, spacing="trailing")
        dtype = jnp.dtype(self.config.model.compute_dtype)
        if self.graphs.text_lora:
            clip_l, clip_g = step_lib.text_from(params, unet_frozen, self.graphs, dtype)
        else:
            clip_l, clip_g = nnx.merge(self._text_graph, text_state)
        context, pooled = conditioning.encode_text(clip_l, clip_g, ids)
        if self.refiner:
            context = context[..., -self.unet_config.cross_attention_dim :]
        cast = step_lib.cast_floating(params, dtype)  # once, not in every step
        frozen = step_lib.cast_floating(unet_frozen, dtype)
        unet = lambda: step_lib.unet_from(cast, frozen, self.graphs, dtype)  # noqa: E731
        pos = (context, pooled, tids)
        neg = (jnp.zeros_like(context), jnp.zeros_like(pooled), tids)
        arrays = {k: jnp.asarray(v) for k, v in p.arrays().items()}
        x = runtime.denoise_latents(
            unet, noise * p.init_scale, arrays, pos, neg, guidance, None,
            sampler="ddim", prediction=self.step_config.prediction_type,
        )  # fmt: skip
        return runtime.decode_uint8(nnx.merge(self._vae_graph, vae_state), x)

    def preview(self, state: Any) -> np.ndarray | None:
        prompts = list(self.config.log.get("sample_prompts", []) or [])
        if not prompts:
            return None
        images = self.sample(state.ema, prompts, size=self.default_size())
        return grid(images)

    def default_size(self) -> tuple[int, int]:
        """Previews' and evaluations' image size: ``log.sample_size``, else the model's."""
        side = int(
            self.config.log.get("sample_size", 0)
            or self.unet_config.sample_size * self.vae_config.downscale
        )
        return side, side

    def export(self, state: Any, out: Path) -> Path:
        """A complete diffusers folder: the EMA UNet, the frozen parts, the scheduler. Every
        process calls it (gathering the weights is collective); process 0 writes."""
        out = Path(out)
        params = sharding.gather(state.ema, self.mesh)
        if jax.process_index() != 0:
            return out
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if self.lora is not None:
            return self._export_lora(params, out)
        unet = nnx.merge(nnx.split(nnx.eval_shape(lambda: self._make(nnx.Rngs(0))))[0], params)
        diffusers_io.save_component(unet, out, "unet")
        parts = ["text_encoder_2", "tokenizer_2"] + (
            [] if self.refiner else ["text_encoder", "tokenizer"]
        )
        for part in parts:
            _link_tree(self.ckpt / part, out / part)
        _link_tree(self.vae_path / "vae", out / "vae")
        schedule = {
            **SDXL_SCHEDULER_CONFIG,
            "prediction_type": self.step_config.prediction_type,
        }
        (out / "scheduler").mkdir()
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule, indent=2))
        (out / "model_index.json").write_text(json.dumps(model_index(self.refiner), indent=2))
        return out

    def _export_lora(self, params: Any, out: Path) -> Path:
        """The EMA adapters as LoRA files: kohya's (``lora.safetensors``: ComfyUI, A1111,
        diffusers) and diffusers/PEFT's (``pytorch_lora_weights.safetensors``), never mixed."""
        from sdxl_jax.weights import lora_files

        unet_params = params["unet"] if self.graphs.text_lora else params
        abstract = nnx.eval_shape(lambda: self._make(nnx.Rngs(0)))
        graph, _, base, rest = nnx.split(abstract, nnx.LoRAParam, nnx.Param, ...)
        adapters = {"unet": lora_lib.adapters_of(nnx.merge(graph, unet_params, base, rest))}
        models = {"unet": nnx.eval_shape(lambda: self._make(nnx.Rngs(0), adapters=False))}
        if self.graphs.text_lora:
            encoders = nnx.merge(
                self.graphs.text, params["text"], self.frozen["text"], self.frozen["text_rest"]
            )
            for name, clip in zip(("te1", "te2"), encoders, strict=True):
                if clip is not None:
                    adapters[name] = lora_lib.adapters_of(clip)
                    models[name] = COMPONENTS["text_encoder"].abstract(clip.config)
        c = self.config.lora
        meta = {
            "ss_network_dim": str(self.lora.rank),
            "ss_network_alpha": str(self.lora.rank * self.lora.scale),
            "sdxl_jax_stage": self.config.stage,
            "sdxl_jax_init_from": str(self.config.init_from),
        }
        files = {"kohya": out / "lora.safetensors", "peft": out}
        for fmt in [f.strip() for f in str(c.get("export", "kohya,peft")).split(",") if f]:
            lora_files.save(
                files[fmt], adapters, models, format=fmt,
                dtype=c.get("export_dtype", "fp16"), metadata=meta,
            )  # fmt: skip
        return out


def _remat(value: Any) -> bool | str:
    """``model.remat``: true / false, or a remat policy's name (layers.REMAT_POLICIES)."""
    return value if isinstance(value, str) else bool(value)


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where the filesystem allows (weights are large)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if not src.is_dir():
        raise FileNotFoundError(f"{src} is missing: the export needs it")
    shutil.copytree(src, dst, copy_function=link)


def model_index(refiner: bool) -> dict[str, Any]:
    """diffusers' model_index.json of an SDXL (refiner) pipeline folder."""
    pipe = "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline"
    index: dict[str, Any] = {
        "_class_name": pipe,
        "_diffusers_version": configs.DIFFUSERS_VERSION,
        "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if refiner:
        index.update(
            requires_aesthetics_score=True, text_encoder=[None, None], tokenizer=[None, None]
        )
    else:
        index.update(
            text_encoder=["transformers", "CLIPTextModel"],
            tokenizer=["transformers", "CLIPTokenizer"],
        )
    return index


def grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one [rows * H, columns * W, 3] sheet (blank cells black)."""
    n, h, w, c = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    sheet = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        sheet[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return sheet
