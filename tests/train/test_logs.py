"""The logs read back by independent readers: TensorBoard's own event loader and accumulator
(CRCs included), ``json``, and hand-computed rates for the progress line."""

import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_accumulator import (
    EventAccumulator as PluginEventAccumulator,
)
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
from tensorboard.util import tensor_util

from sdxl_jax.train import logs

# --- TensorBoard events -----------------------------------------------------------------------


def read_events(path):
    return list(event_file_loader.LegacyEventFileLoader(str(path)).Load())


def accumulate(path):
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_file_name_and_header(tmp_path):
    w = logs.EventWriter(tmp_path / "tb")
    w2 = logs.EventWriter(tmp_path / "tb")  # same second, same process: its own file
    w.close(), w2.close()
    files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 2 and w.path in files and w2.path in files
    assert w.path.name.endswith(".sdxl_jax")
    (header,) = read_events(w.path)
    assert header.file_version == "brain.Event:2" and header.step == 0
    assert header.wall_time == pytest.approx(w.path.stat().st_mtime, abs=5)


def test_scalars_round_trip(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    values = [0.1234567, np.float64(1e-4), np.float32(2.5), jnp.asarray(-3.25), 7, 1e40]
    with logs.EventWriter(tmp_path) as w:
        for i, v in enumerate(values):
            w.scalar("train/loss", v, step=10 * i, wall_time=1000.0 + i)
        w.scalar("train/lr", float("nan"), step=2**40)  # big steps, non-finite values kept
        w.scalar("train/lr", float("-inf"), step=2**40 + 1)
        w.scalar("train/lr", 0.0, step=-1)  # protobuf encodes negative int64 in ten bytes
    acc = accumulate(w.path)
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "train/lr"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 10, 20, 30, 40, 50]
    assert [e.wall_time for e in loss] == [1000.0 + i for i in range(6)]
    expect = np.asarray([float(v) for v in values[:-1]] + [np.inf], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray([e.value for e in loss], np.float32), expect)
    lr = acc.Scalars("train/lr")
    assert [e.step for e in lr] == [2**40, 2**40 + 1, -1]
    assert math.isnan(lr[0].value) and lr[1].value == -math.inf


@pytest.mark.parametrize("shape", [(5, 7, 3), (5, 7), (5, 7, 1), (5, 7, 4)])
def test_image_round_trip(tmp_path, shape):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    w = logs.EventWriter(tmp_path)
    w.image("samples/grid", img, step=300)
    # Flushed at once: readable before close.
    (event,) = accumulate(w.path).Images("samples/grid")
    w.close()
    assert (event.step, event.height, event.width) == (300, 5, 7)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    np.testing.assert_array_equal(decoded, img.reshape(decoded.shape))
    assert decoded.size == img.size
    colorspace = read_events(w.path)[1].summary.value[0].image.colorspace
    assert colorspace == (shape[2] if len(shape) == 3 else 1)


def test_image_rejects_floats_and_bad_shapes(tmp_path):
    with logs.EventWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="astype"):
            w.image("x", np.zeros((4, 4, 3), np.float32), 0)
        with pytest.raises(ValueError, match="uint8"):
            w.image("x", np.zeros((4, 4, 2), np.uint8), 0)


def test_text_for_the_text_plugin(tmp_path):
    with logs.EventWriter(tmp_path) as w:
        w.text("config", "lr: **1e-4**, ünïcode", step=0)
    (event,) = accumulate(w.path).Tensors("config")
    assert tensor_util.make_ndarray(event.tensor_proto).item().decode() == "lr: **1e-4**, ünïcode"
    acc = PluginEventAccumulator(str(w.path))
    acc.Reload()
    assert acc.PluginTagToContent("text") == {"config": b""}
    assert acc.SummaryMetadata("config").data_class == 2  # DATA_CLASS_TENSOR


def test_scalars_flush_every_n(tmp_path):
    w = logs.EventWriter(tmp_path, flush_every=3, flush_secs=1e9)
    w.scalar("a", 1.0, 1)
    w.scalar("a", 2.0, 2)
    assert len(read_events(w.path)) == 1  # only the header so far
    w.scalar("a", 3.0, 3)
    assert len(read_events(w.path)) == 4
    w.scalar("a", 4.0, 4)
    w.close()
    assert [e.step for e in read_events(w.path)] == [0, 1, 2, 3, 4]


def test_reader_checks_our_crcs(tmp_path):
    with logs.EventWriter(tmp_path) as w:
        for step in range(3):
            w.scalar("loss", 0.5, step)
    good = w.path.read_bytes()
    records = [e.step for e in read_events(w.path)]
    assert records == [0, 0, 1, 2]
    for offset, what in [(-5, "event crc"), (-60, "crc")]:  # in the last record's data / earlier
        bad = bytearray(good)
        bad[offset] ^= 0x01
        w.path.write_bytes(bytes(bad))
        reader = pywrap_tensorflow.PyRecordReader_New(str(w.path))
        with pytest.raises(errors.DataLossError, match=what):
            for _ in range(len(records)):
                reader.GetNext()
        assert len(read_events(w.path)) < len(records)  # TensorBoard stops at the bad record


# --- JSONL ------------------------------------------------------------------------------------


def test_jsonl_values_nan_and_append(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    path = tmp_path / "run" / "metrics.jsonl"
    w = logs.JsonlWriter(path)
    w.write(1, {"loss": np.float32(0.25), "lr": jnp.asarray(1e-4), "skipped": np.int32(2)})
    w.write(2, {"loss": float("nan"), "grad_norm": np.float64(np.inf)})
    with pytest.raises(ValueError, match="reserved"):
        w.write(3, {"step": 3.0})
    w.close()
    w = logs.JsonlWriter(path)  # resume: appends
    w.write(3, {"loss": 0.5})
    w.close()
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict JSON: no NaN tokens
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (
        rows[0]["loss"] == 0.25 and rows[0]["skipped"] == 2 and isinstance(rows[0]["skipped"], int)
    )
    assert rows[0]["lr"] == pytest.approx(1e-4)
    assert rows[1] == {"step": 2, "time": rows[1]["time"], "loss": None, "grad_norm": None}
    assert all(abs(r["time"] - rows[0]["time"]) < 60 for r in rows)


def test_jsonl_resume_after_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "time": 0.0}\n{"step": 2, "ti')  # killed mid-write
    w = logs.JsonlWriter(path)
    w.write(2, {"loss": 1.0})
    w.close()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"step": 2, "ti'
    assert json.loads(lines[2])["loss"] == 1.0


# --- the progress line ------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def test_progress_rates_eta_and_compile(tmp_path):
    clock, out = FakeClock(), io.StringIO()
    p = logs.Progress(600_000, 1000, 32, stream=out, stage="base_256", clock=clock, window_s=30)
    clock.t += 42.0  # first step, with compilation
    line = p.update(1001, {"loss": 0.3}, bucket=(256, 384))
    assert line == "[base_256] step 1001/600000 (0.2%) | first step (compile) 42.0 s | " + (
        "bucket 256x384 | loss 0.3"
    )
    for step in range(1002, 1201):  # 4 step/s
        clock.t += 0.25
        line = p.update(step, {"loss": 0.123456, "lr": 1e-4, "grad_norm": np.float32(0.53)})
    # (600000 - 1200) / 4 = 149700 s = 1 d 17:35:00; 4 * 32 = 128 img/s
    assert line == (
        "[base_256] step 1200/600000 (0.2%) | 4 step/s 128 img/s | ETA 1d 17:35:00 | "
        "loss 0.1235 lr 1.0e-04 grad_norm 0.53"
    )
    assert out.getvalue().count("\n") == 200 and out.getvalue().endswith("grad_norm 0.53\n")
    # Slow down to 1 step/s: after a whole window the rate is the new one alone.
    for step in range(1201, 1231):
        clock.t += 1.0
        line = p.update(step, {"data_wait_s": 0.0123, "skipped": 2.0, "mem_gib": 61.74})
    assert line == (
        "[base_256] step 1230/600000 (0.2%) | 1 step/s 32 img/s | ETA 6d 22:19:30 | "
        "data_wait 0.0123 s skipped 2 mem 61.7 GiB"
    )  # 598770 s = 6 d 22:19:30
    s = p.summary()
    assert s["steps"] == 230 and s["wall_s"] == pytest.approx(42 + 199 * 0.25 + 30)
    assert s["compile_s"] == pytest.approx(42.0)
    assert s["steps_per_s"] == pytest.approx(229 / (199 * 0.25 + 30))
    assert s["images_per_s"] == pytest.approx(32 * s["steps_per_s"])


def test_progress_min_interval_and_last_step():
    clock, out = FakeClock(), io.StringIO()
    p = logs.Progress(10, 0, 8, stream=out, min_interval_s=1.0, clock=clock)
    printed = []
    for step in range(1, 11):
        clock.t += 0.4
        printed.append(bool(p.update(step, {"loss": float("nan")})))
    # The first always; then 1.2 s after the last print (steps 4, 7); the final step always.
    assert printed == [True, False, False, True, False, False, True, False, False, True]
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "nan" in lines[1] and lines[-1].startswith("step 10/10 (100.0%)")
    assert "ETA 0:00:00" in lines[-1] and "2.5 step/s 20 img/s" in lines[-1]


def test_progress_summary_before_two_updates():
    clock = FakeClock()
    p = logs.Progress(10, 0, 8, stream=None, clock=clock)
    assert p.summary()["steps"] == 0 and math.isnan(p.summary()["steps_per_s"])
    clock.t += 5
    line = p.update(1, {})
    assert line == "step 1/10 (10.0%) | first step (compile) 5.0 s"
    s = p.summary()
    assert (s["steps"], s["wall_s"], s["compile_s"]) == (1, 5.0, 5.0)
    assert math.isnan(s["images_per_s"])
