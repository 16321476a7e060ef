"""The full-size SDXL train step run on one accelerator: compile time, step time, images/s, MFU
and device memory, for batch sizes x remat policies x attention implementations (issue 17).

    # GPU (H100/H200), SDXL base at 1024^2, then the largest batch that fits:
    python benchmarks/train_step_speed.py --batch 1 4 8 \\
        --remat none nothing_saveable dots_with_no_batch_dims_saveable --attention cudnn \\
        --fit --deadline-s 420 --json $OUT/train_step.json
    # the refiner; a LoRA step (rank 32 on the attention projections) over a frozen base:
    python benchmarks/train_step_speed.py --preset refiner --batch 8 --remat nothing_saveable
    python benchmarks/train_step_speed.py --lora 32 --batch 8 --remat none
    # CPU smoke run (the micro preset at 32 px in fp32; what the test runs):
    python benchmarks/train_step_speed.py --smoke --json /tmp/tss.json

The step is the trainer's own, built by ``sdxl_jax.train.lowering.lower_train_step``: jitted,
state donated, AdamW + EMA, bf16 compute over fp32 master weights, cached-latent inputs. The
state (random weights from the model's own initialisers, the optimizer state, the EMA) and a
random batch are made by jitted functions directly in device memory: no weight files, no host
copies. Configurations run in the order --lora x --batch x --remat x --attention. Preset micro
is tests/train/test_step.py's two-level UNet (tiny compiles about twice as slowly on a CPU);
with --smoke, base and refiner stand for micro and micro_refiner (the refiner's step: 5 ids).

Per configuration: lowering and compile time, XLA's memory analysis and cost-analysis FLOPs
(of the scanned program: a scan body counts once, cuDNN attention not at all), a first call,
--warmup calls, --steps timed calls (median of each blocked on its loss; mean over the loop
blocked on the final state). MFU = model FLOPs per sample (MODEL_FLOPS, else lowered now,
unrolled) x batch / median step, against --peak-tflops and the --matmul rate measured at start.
Peak memory: the device's peak_bytes_in_use after the configuration, a process-wide high-water
mark (``peak_rose``: this configuration raised it); memory_analysis.planned is XLA's plan.
Out-of-memory configurations are recorded ("oom") and the next runs; --deadline-s skips what
would not finish in time; the JSON is rewritten after each configuration, so a kill loses
nothing. XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.95 here (jax's 0.75 hides a quarter).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402 (after the path; no backend starts at import)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sdxl_jax import sharding as sh  # noqa: E402
from sdxl_jax.models import unet as unet_lib  # noqa: E402
from sdxl_jax.models.layers import REMAT_POLICIES  # noqa: E402
from sdxl_jax.models.lora import LoRAConfig, attach  # noqa: E402
from sdxl_jax.models.unet import UNetConfig  # noqa: E402
from sdxl_jax.train import lowering  # noqa: E402
from sdxl_jax.train.state import init_state, make_optimizer  # noqa: E402
from sdxl_jax.train.step import cast_floating, split_models  # noqa: E402
from sdxl_jax.weights.components import COMPONENTS  # noqa: E402

T0 = time.monotonic()
GIB = 2**30
# Our names -> sdxl_jax.models.unet.PRESETS (micro: the test-size UNet).
PRESETS = {"base": "sdxl_base", "refiner": "sdxl_refiner", "tiny": "tiny", "micro": "micro",
           "micro_refiner": "micro_refiner"}  # fmt: skip
REMATS = ("none", "true", *REMAT_POLICIES)
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Model FLOPs per sample (XLA's count of the train step lowered on one CPU device at batch 8,
# stacks unrolled, no remat, XLA attention, AdamW + EMA; lowering.flops_per_sample), keyed by
# (preset, image side, LoRA rank, LoRA groups). Lowered 2026-12 with jax 0.10.2: the base as in
# BENCHMARKS.md (20.23); the refiner (BENCHMARKS.md's plan notes: 21.77) and the LoRA steps
# (rank 32 = experiments/lora.py, rank 4 = diffusers' default) computed for this script.
MODEL_FLOPS = {
    ("base", 1024, 0, ""): 20.225315569664e12,
    ("refiner", 1024, 0, ""): 21.771350704128e12,
    ("base", 1024, 32, "attn"): 14.344617197568e12,
    ("base", 1024, 4, "attn"): 14.128538189824e12,
}


@dataclasses.dataclass(frozen=True)
class Config:
    lora: int  # rank; 0: full fine-tuning
    batch: int
    remat: str
    attention: str
    fit: bool = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--preset", choices=sorted(PRESETS), help="UNet (default base; smoke: micro)")
    add("--size", type=int, help="image side in pixels (default 1024; smoke: 32)")
    add("--batch", type=int, nargs="+", help="batch sizes (default 1 4 8; smoke: 2)")
    add("--remat", nargs="+", choices=REMATS, metavar="REMAT", help="none, true (= "
        f"nothing_saveable) or {', '.join(REMAT_POLICIES)}\n(default none "
        "nothing_saveable)")  # fmt: skip
    add("--attention", nargs="+", choices=("auto", "xla", "cudnn"), help="attention "
        "implementations (default auto: cuDNN on GPU; smoke: xla)")  # fmt: skip
    add("--lora", type=int, nargs="+", help="LoRA ranks, 0 = full fine-tuning (default 0)")
    add("--lora-groups", default="attn", help="LoRA layer groups (default attn)")
    add("--dtype", choices=("bfloat16", "float32"), help="compute dtype over fp32 master "
        "weights (default bfloat16; smoke: float32, faster to compile)")  # fmt: skip
    add("--steps", type=int, help="timed steps (default 10; smoke: 2)")
    add("--warmup", type=int, help="untimed steps after the first (default 2; smoke: 1)")
    add("--fit", action="store_true", help="then the largest batch predicted to fit, per "
        "(lora, remat, attention)")  # fmt: skip
    add("--fit-max", type=int, default=256, help="cap on the --fit batch (default 256)")
    add("--memory-gb", type=float, help="memory for --fit (default: the device's bytes_limit)")
    add("--peak-tflops", type=float, default=989.0, help="vendor dense bf16 peak (default 989: "
        "H100/H200 SXM)")  # fmt: skip
    add("--matmul", type=int, help="side of the bf16 matmul benchmark (default 8192; smoke: "
        "256; 0: none)")  # fmt: skip
    add("--deadline-s", type=float, help="skip configurations that would end later than this")
    add("--json", type=Path, help="results file, rewritten after each configuration")
    add("--smoke", action="store_true", help="a tiny model on the CPU (see above)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(
        preset="micro" if smoke else "base", size=32 if smoke else 1024,
        batch=[2] if smoke else [1, 4, 8], remat=["none", "nothing_saveable"],
        attention=["xla"] if smoke else ["auto"], lora=[0], steps=2 if smoke else 10,
        warmup=1 if smoke else 2, matmul=256 if smoke else 8192,
        dtype="float32" if smoke else "bfloat16",
    )  # fmt: skip
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if smoke:  # the same steps at a size a CPU compiles in seconds
        args.preset = {"base": "micro", "refiner": "micro_refiner"}.get(args.preset, args.preset)
    if args.size % 8 or min(args.batch) < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--size must be a multiple of 8; --batch and --steps >= 1, --warmup >= 0")
    return args


def remat_value(name: str) -> bool | str:
    return {"none": False, "true": True}.get(name, name)


def lora_config(rank: int, groups: str) -> LoRAConfig | None:
    return LoRAConfig(rank=rank, groups=tuple(groups.split(","))) if rank else None


def matmul_tflops(n: int, calls: int = 10, repeats: int = 5) -> float | None:
    """Median bf16 [n, n] @ [n, n] rate in TFLOP/s (``calls`` dispatched back to back, timed
    to the last one, ``repeats`` times): what the card's matmul units deliver in practice."""
    if n <= 0:
        return None
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in (k1, k2))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready([dot(a, b) for _ in range(calls)])
        times.append((time.perf_counter() - t) / calls)
    return 2 * n**3 / statistics.median(times) / 1e12


def device_memory() -> dict[str, int] | None:
    """The first device's allocator statistics (None where the backend keeps none, e.g. CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 (backends without statistics)
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats} if stats else None


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    keys = ("argument", "output", "alias", "temp", "generated_code")
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in keys}
    # What the executable needs at once: inputs, outputs not aliased to them, temporaries, code.
    out["planned"] = sum(out[k] for k in keys) - 2 * out["alias"]
    return out


def cost_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    return float(cost["flops"]) if isinstance(cost, dict) and "flops" in cost else None


def compile_init(unet: UNetConfig, lora: LoRAConfig | None, optimizer: Any, mesh: Any,
                 dtype: str) -> Any:  # fmt: skip
    """A compiled function () -> (TrainState, frozen) that builds the model with its own
    initialisers inside jit, so every array is born on the device in its sharding: the state as
    ``lower_train_step`` traces it (``init_state``), the LoRA base frozen in the compute dtype.
    The weights' random bits come from XLA's RngBitGenerator (half threefry's compile time)."""

    def build() -> tuple[Any, Any]:
        with jax.default_prng_impl("unsafe_rbg"):
            model = COMPONENTS["unet"].model_class(
                unet, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), param_dtype=jnp.float32
            )
            if lora is not None:
                attach(model, lora, nnx.Rngs(1))
        _, params, frozen = split_models(model)
        return init_state(params, optimizer, 0), cast_floating(frozen, jnp.dtype(dtype))

    shardings = sh.tree_shardings(jax.eval_shape(build), mesh)
    return jax.jit(build, out_shardings=shardings).lower().compile()


def compile_batch(unet: UNetConfig, hw: tuple[int, int], batch: int, size: int, mesh: Any,
                  refiner: bool) -> Any:  # fmt: skip
    """A compiled function () -> a random batch shaped as ``abstract_batch`` (the latent and
    text-embedding cache), made on the device: N(0, 1) latent means, embeddings and pooled text,
    log-variance -4, original and target size ``size``, crop (0, 0)."""
    shapes = lowering.abstract_batch(unet, hw, batch, refiner=refiner)
    fill = {"original_size": size, "target_size": size, "crop_coords_top_left": 0}
    fill["latent_logvar"] = -4.0

    def make() -> dict[str, jax.Array]:
        key = jax.random.key(1, impl="unsafe_rbg")  # compiles faster than threefry
        return {
            k: jnp.full(s.shape, fill[k], s.dtype) if k in fill
            else jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype)
            for i, (k, s) in enumerate(sorted(shapes.items()))
        }  # fmt: skip

    batch_sh = {k: NamedSharding(mesh, P(sh.BATCH_AXES)) for k in shapes}
    return jax.jit(make, out_shardings=batch_sh).lower().compile()


def time_steps(step: Any, state: Any, batch: Any, frozen: Any, warmup: int, steps: int) -> dict:
    """Run the compiled step: one first call, ``warmup`` more, ``steps`` timed."""
    t = time.perf_counter()
    state, m = step(state, batch, frozen)
    jax.block_until_ready(state)
    first = time.perf_counter() - t
    for _ in range(warmup):
        state, m = step(state, batch, frozen)
    jax.block_until_ready(state)
    times, skipped = [], []
    t_loop = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch, frozen)
        m["loss"].block_until_ready()  # one executable: its outputs complete together
        times.append(time.perf_counter() - t)
        skipped.append(m["skipped"])
    jax.block_until_ready(state)
    loop = time.perf_counter() - t_loop
    return {
        "first_step_s": first,
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "step_ms_mean": 1e3 * loop / steps,
        "loss": float(m["loss"]),
        "skipped_updates": sum(int(s) for s in skipped),  # > 0: non-finite, a cheaper step
    }


@dataclasses.dataclass
class Bench:
    """What every configuration shares: settings, mesh, optimizer, compiled inits, FLOPs."""

    args: argparse.Namespace
    mesh: Any
    optimizer: Any
    matmul: float | None
    inits: dict = dataclasses.field(default_factory=dict)
    flops: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unet = unet_lib.preset(PRESETS[self.args.preset])
        self.hw = (self.args.size // 8, self.args.size // 8)
        self.refiner = self.args.preset.endswith("refiner")

    def init(self, rank: int) -> Any:
        if rank not in self.inits:  # one compiled init per rank, kept across configurations
            lora = lora_config(rank, self.args.lora_groups)
            self.inits[rank] = compile_init(self.unet, lora, self.optimizer, self.mesh,
                                            self.args.dtype)  # fmt: skip
        return self.inits[rank]

    def model_flops(self, rank: int) -> tuple[float, str]:
        a = self.args
        key = (a.preset, a.size, rank, a.lora_groups if rank else "")
        if key in MODEL_FLOPS and a.dtype == "bfloat16":
            return MODEL_FLOPS[key], "table"
        if key not in self.flops:  # XLA attention: a cuDNN custom call counts no FLOPs
            self.flops[key] = lowering.flops_per_sample(
                self.unet.replace(attention_impl="xla"), self.hw, refiner=self.refiner,
                compute_dtype=a.dtype, optimizer=self.optimizer,
                lora=lora_config(rank, a.lora_groups),
            )  # fmt: skip
        return self.flops[key], "lowered now"


def measure(c: Config, b: Bench, row: dict) -> None:
    """Lower, compile, initialise and time one configuration, filling ``row`` as it goes (so a
    failure keeps what was measured before it)."""
    a = b.args
    unet = b.unet.replace(attention_impl=c.attention)
    t = time.perf_counter()
    lowered, _ = lowering.lower_train_step(
        unet, b.hw, c.batch, b.mesh, remat=remat_value(c.remat), refiner=b.refiner,
        compute_dtype=a.dtype, optimizer=b.optimizer, lora=lora_config(c.lora, a.lora_groups),
    )  # fmt: skip
    row["lower_s"] = time.perf_counter() - t
    t = time.perf_counter()
    step = lowered.compile()
    row["compile_s"] = time.perf_counter() - t
    row["memory_analysis"] = memory_analysis(step)
    row["xla_cost_flops_per_step"] = cost_flops(step)
    del lowered
    t = time.perf_counter()
    state, frozen = b.init(c.lora)()
    batch = compile_batch(unet, b.hw, c.batch, a.size, b.mesh, b.refiner)()
    jax.block_until_ready((state, batch))
    row["init_s"] = time.perf_counter() - t
    row["trained_params"] = sum(x.size for x in jax.tree.leaves(state.params))
    row.update(time_steps(step, state, batch, frozen, a.warmup, a.steps))
    flops, row["flops_source"] = b.model_flops(c.lora)
    seconds = row["step_ms_median"] / 1e3
    achieved = flops * c.batch / seconds
    row |= {"model_flops_per_sample": flops, "images_per_s": c.batch / seconds,
            "model_tflops_per_s": achieved / 1e12,
            "mfu_peak": achieved / (a.peak_tflops * 1e12),
            "mfu_matmul": achieved / (b.matmul * 1e12) if b.matmul else None}  # fmt: skip


def run_config(c: Config, b: Bench) -> dict:
    """One row: status ok, oom or error; device memory released afterwards."""
    row = base_row(c, b, "ok")
    before = device_memory()
    t = time.perf_counter()
    try:
        measure(c, b, row)
    except Exception as e:  # noqa: BLE001 (recorded; the next configuration runs)
        text = f"{type(e).__name__}: {e}"
        oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))
        row["status"] = "oom" if oom else "error"
        row["error"] = text.strip().splitlines()[0][:500]
    row["wall_s"] = time.perf_counter() - t
    after = device_memory()
    if after and "peak_bytes_in_use" in after:
        row["peak_bytes"] = after["peak_bytes_in_use"]
        row["peak_rose"] = after["peak_bytes_in_use"] > (before or {}).get("peak_bytes_in_use", 0)
        row["bytes_limit"] = after.get("bytes_limit")
    jax.clear_caches()  # the step's executable and traces; every array died with measure()
    gc.collect()
    return row


def base_row(c: Config, b: Bench, status: str, **kw: Any) -> dict[str, Any]:
    return {"preset": b.args.preset, "size": b.args.size, **dataclasses.asdict(c),
            "status": status, **kw}  # fmt: skip


def same_group(row: dict, c: Config) -> bool:
    """A measured (not --fit) row of the same (lora, remat, attention) as ``c``."""
    key = (row.get("lora"), row.get("remat"), row.get("attention"), row.get("fit"))
    return key == (c.lora, c.remat, c.attention, False)


def predict_fit(rows: list[dict], c: Config, limit: float, cap: int) -> int | None:
    """The largest batch whose planned bytes fit 95% of ``limit``: a line through the two
    largest measured batches of this (lora, remat, attention), or through zero with one; below
    the smallest batch that ran out of memory. None if not above the largest measured."""
    same = [r for r in rows if same_group(r, c)]
    pts = sorted((r["batch"], r["memory_analysis"]["planned"]) for r in same
                 if r["status"] == "ok" and r.get("memory_analysis"))  # fmt: skip
    if not pts:
        return None
    b1, m1 = pts[-2] if len(pts) > 1 else (0, 0)
    b2, m2 = pts[-1]
    slope = (m2 - m1) / (b2 - b1)
    if slope <= 0:
        return None
    batch = min(int((0.95 * limit - (m2 - slope * b2)) / slope), cap)
    batch = min([batch] + [r["batch"] - 1 for r in same if r["status"] == "oom"])
    return batch if batch > b2 else None


def summary(row: dict) -> str:
    def f(key: str, fmt: str, scale: float = 1.0) -> str:
        v = row.get(key)
        return "-" if v is None else format(v * scale, fmt)

    return (
        f"{row['preset']} {row['size']}px b={row['batch'] or '?'}{'(fit)' if row['fit'] else ''} "
        f"remat={row['remat']} attn={row['attention']} lora={row['lora'] or '-'} | compile "
        f"{f('compile_s', '.1f')} s | {f('step_ms_median', '.1f')} ms | "
        f"{f('images_per_s', '.2f')} img/s | MFU {f('mfu_peak', '.1%')} of peak, "
        f"{f('mfu_matmul', '.1%')} of matmul | peak {f('peak_bytes', '.1f', 1 / GIB)} GiB | "
        f"{row['status']} {row.get('error') or row.get('why') or ''}"
    ).rstrip()


def write_json(path: Path | None, doc: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)  # a kill mid-write leaves the previous complete file


def record(row: dict, b: Bench, doc: dict, replace: bool = False) -> dict:
    """Add (or replace the last) row, print it unless it is a "running" marker, rewrite JSON."""
    rows = doc["results"]
    if replace:
        rows[-1] = row
    else:
        rows.append(row)
    doc["elapsed_s"] = time.monotonic() - T0
    if row["status"] != "running":
        print(summary(row), flush=True)
    write_json(b.args.json, doc)
    return row


def run_and_record(c: Config, b: Bench, doc: dict) -> dict:
    """Run ``c`` unless the deadline is too close (1.5x the last configuration's time, its
    steps scaled to this batch); the JSON shows a "running" row meanwhile."""
    a = b.args
    done = [r for r in doc["results"] if "wall_s" in r]
    if a.deadline_s and done:
        last = done[-1]
        run = last.get("step_ms_mean", 0) / 1e3 * (a.steps + a.warmup + 1)
        estimate = 1.5 * (last["wall_s"] - run + run * c.batch / last["batch"])
        if time.monotonic() - T0 + estimate > a.deadline_s:
            return record(base_row(c, b, "skipped", why=f"deadline (~{estimate:.0f} s)"), b, doc)
    record(base_row(c, b, "running"), b, doc)
    return record(run_config(c, b), b, doc, replace=True)


def run_fits(configs: list[Config], b: Bench, doc: dict) -> None:
    """--fit: per (lora, remat, attention), the largest batch predicted to fit; if that runs
    out of memory, once more 15% smaller."""
    a, rows = b.args, doc["results"]
    for lora, remat, attention in dict.fromkeys((c.lora, c.remat, c.attention) for c in configs):
        limit = a.memory_gb * 1e9 if a.memory_gb else (device_memory() or {}).get("bytes_limit")
        c = Config(lora, 0, remat, attention, fit=True)
        batch = predict_fit(rows, c, limit, a.fit_max) if limit else None
        if batch is None:
            why = "fit: nothing larger" if limit else "fit: no memory limit (--memory-gb)"
            record(base_row(c, b, "skipped", why=why), b, doc)
            continue
        row = run_and_record(dataclasses.replace(c, batch=batch), b, doc)
        measured = max(r["batch"] for r in rows if same_group(r, c) and r["status"] == "ok")
        if row["status"] == "oom" and int(batch * 0.85) > measured:
            run_and_record(dataclasses.replace(c, batch=int(batch * 0.85)), b, doc)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        jax.config.update("jax_platforms", "cpu")
        # LLVM at -O0: a third less compile time on the CPU (read when the backend starts).
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + SMOKE_XLA_FLAGS
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # read at backend start
    device = jax.devices()[0]
    optimizer = make_optimizer(1e-4, 10_000, 600_000, schedule="constant")
    bench = Bench(args, sh.make_mesh({"fsdp": 1}, [device]), optimizer, matmul_tflops(args.matmul))
    settings = {**vars(args), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                "mem_fraction": os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]}  # fmt: skip
    doc = {"device": f"{device.device_kind} ({device.platform})", "jax": jax.__version__,
           "python": platform.python_version(), "matmul_tflops": bench.matmul,
           "peak_tflops": args.peak_tflops, "settings": settings, "results": []}  # fmt: skip
    rate = f"{bench.matmul:.1f} TFLOP/s" if bench.matmul else "not measured"
    print(f"{doc['device']}, jax {jax.__version__}: bf16 matmul {args.matmul}^3 {rate}; "
          f"peak {args.peak_tflops:.0f} TFLOP/s", flush=True)  # fmt: skip
    configs = [Config(r, n, m, at) for r in args.lora for n in args.batch for m in args.remat
               for at in args.attention]  # fmt: skip
    for c in configs:
        run_and_record(c, bench, doc)
    if args.fit:
        run_fits(configs, bench, doc)


if __name__ == "__main__":
    main()
