"""MetricsWriter: exact JSON lines, TensorBoard scalars, console output, main process only."""
from __future__ import annotations

import glob
import io
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from mtower_jax.train.metrics import MetricsWriter, read_metrics, to_python_scalar


def read_event_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the TFRecord-framed event files under logdir: per record
    u64 length, u32 masked crc32c of the length, the Event proto, u32 masked crc32c of it."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked_crc32c(header)
            body = data[offset + 12:offset + 12 + length]
            (crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
            assert crc == masked_crc32c(body)
            offset += 16 + length
            event = event_pb2.Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as sys.stdout does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_jsonl_round_trips_floats_exactly(tmp_path):
    values = {"sum": 0.1 + 0.2, "tiny": 1e-300, "big": 1.7976931348623157e308, "neg": -0.0,
              "third": 1 / 3}
    with MetricsWriter(tmp_path, total_steps=10, stream=io.StringIO()) as writer:
        writer.write(1, values)
        writer.write(2, {"nan": float("nan"), "inf": float("inf")})
    first, second = read_metrics(tmp_path)
    assert first["step"] == 1 and isinstance(first["wall_time"], float)
    for key, value in values.items():
        assert first[key] == value and repr(first[key]) == repr(value)
    assert first["sum"] != 0.3  # the exact binary sum survives, not a rounded print
    assert np.isnan(second["nan"]) and second["inf"] == float("inf")


def test_numpy_and_jax_scalars_become_python_numbers(tmp_path):
    metrics = {"np_f32": np.float32(0.1), "np_f64": np.float64(0.1), "np_i64": np.int64(7),
               "jax_f32": jnp.float32(0.1), "jax_bf16": jnp.asarray(0.1, jnp.bfloat16),
               "jax_i32": jnp.int32(3), "flag": np.bool_(True), "one_element": np.ones((1,))}
    with MetricsWriter(tmp_path, total_steps=1, stream=io.StringIO()) as writer:
        writer.write(np.int64(1), metrics)
    (record,) = read_metrics(tmp_path)
    assert record["np_f32"] == record["jax_f32"] == float(np.float32(0.1)) == 0.10000000149011612
    assert record["np_f64"] == 0.1 and record["jax_bf16"] == float(jnp.bfloat16(0.1))
    assert record["np_i64"] == 7 and type(record["np_i64"]) is int
    assert record["jax_i32"] == 3 and record["flag"] is True and record["one_element"] == 1.0
    for bad in ("text", np.zeros(2), 1j):
        with pytest.raises(TypeError):
            to_python_scalar(bad)


def test_tensorboard_event_file_holds_every_tag(tmp_path):
    with MetricsWriter(tmp_path, total_steps=3, stream=io.StringIO()) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": 1.0 / step, "lr": 1e-4 * step, "examples_per_sec": 50.0})
    scalars = read_event_scalars(str(tmp_path / "tensorboard"))
    assert set(scalars) == {"loss", "lr", "examples_per_sec"}
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["lr"]], [1e-4, 2e-4, 3e-4], rtol=1e-6)


def test_plain_lines_when_not_a_terminal(tmp_path):
    ticks = iter([0.0, 100.0, 102.0])  # the first write starts the clock (compilation)
    out = io.StringIO()
    with MetricsWriter(tmp_path, total_steps=100, stream=out, clock=lambda: next(ticks)) as w:
        w.write(10, {"loss": 2.5, "lr": 1e-4})
        w.write(20, {"loss": 2.25, "lr": 2e-4})
        w.write(30, {"loss": 2.0, "lr": 3e-4, "mfu": 0.41})
    lines = out.getvalue().splitlines()
    assert lines == ["step 10/100 loss=2.5 lr=0.0001 eta=?",
                     "step 20/100 loss=2.25 lr=0.0002 eta=0:13:20",  # 80 steps x 10 s
                     # 0.8 x 10 s + 0.2 x 0.2 s = 8.04 s per step, x 70 steps
                     "step 30/100 loss=2 lr=0.0003 mfu=0.41 eta=0:09:23"]


def test_terminal_gets_one_updating_bar(tmp_path):
    ticks = iter([0.0, 5.0])
    out = Terminal()
    writer = MetricsWriter(tmp_path, total_steps=200, stream=out, clock=lambda: next(ticks))
    writer.write(50, {"loss": 3.0, "lr": 1e-3, "examples_per_sec": 120.0, "acc_itm": 0.5})
    writer.write(100, {"loss": 2.0, "lr": 1e-3, "examples_per_sec": 130.0, "acc_itm": 0.6})
    writer.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, ended by close()
    last = text.rstrip("\n").split("\r")[-1]
    assert last == ("[##########..........] 100/200 | loss 2 | lr 0.001 | examples_per_sec 130 "
                    "| eta 0:00:10\x1b[K")


def test_non_main_process_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    writer = MetricsWriter(workdir, total_steps=5, is_main_process=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not workdir.exists()
    assert capsys.readouterr() == ("", "")


def test_resume_appends_and_drops_a_cut_record(tmp_path):
    with MetricsWriter(tmp_path, total_steps=4, stream=io.StringIO()) as writer:
        writer.write(1, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # preempted mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    with MetricsWriter(tmp_path, total_steps=4, stream=io.StringIO()) as writer:
        writer.write(2, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5)]
    with open(tmp_path / "metrics.jsonl") as f:
        assert all(json.loads(line) for line in f)


def test_reserved_names_are_refused(tmp_path):
    with MetricsWriter(tmp_path, total_steps=1, stream=io.StringIO()) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 3})
