"""MetricsWriter (reference JSONL format, sessions, TensorBoard), ProgressBar and make_plots."""

from __future__ import annotations

import io
import json
import math
import struct
from datetime import datetime, timedelta

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from fluxflow_jax.metrics import MetricsWriter, ProgressBar, format_duration, read_jsonl
from fluxflow_jax.plots import make_plots


def read_tb_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    """Parse tensorboardX event files (TFRecord framing) without TensorFlow/tensorboard."""
    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {tb_dir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_jsonl_line_format_nan_to_null_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path, "vae_stage") as w:
        w.write(
            10,
            0,
            9,
            {
                "train/loss_recon": jnp.float32(0.5),
                "kl_loss": float("nan"),
                "d_loss": np.float64(np.inf),
                "n": 3,
            },
            {"vae": 1e-4},
            {"batch_time": 0.25},
        )
        w.write(20, 1, 0, {"train/loss_recon": 0.25}, {}, None)
        session_id = w.session_id
    path = tmp_path / "graph" / "training_metrics_vae_stage.jsonl"
    raw = path.read_text().splitlines()
    assert len(raw) == 2
    assert "NaN" not in raw[0] and "Infinity" not in raw[0]
    first, second = (json.loads(line) for line in raw)
    assert list(first) == [
        "timestamp",
        "session_id",
        "epoch",
        "batch",
        "global_step",
        "metrics",
        "learning_rates",
        "extras",
    ]
    datetime.fromisoformat(first["timestamp"])
    assert first["session_id"] == session_id
    assert (first["epoch"], first["batch"], first["global_step"]) == (0, 9, 10)
    assert first["metrics"] == {"train/loss_recon": 0.5, "kl_loss": None, "d_loss": None, "n": 3}
    assert first["learning_rates"] == {"vae": 1e-4}
    assert first["extras"] == {"batch_time": 0.25}
    # like the reference, empty learning_rates/extras are left out of the line
    assert list(second) == ["timestamp", "session_id", "epoch", "batch", "global_step", "metrics"]
    assert read_jsonl(path) == [first, second]

    scalars = read_tb_scalars(tmp_path / "tb" / "vae_stage")
    assert scalars["train/loss_recon"] == [(10, 0.5), (20, 0.25)]
    assert scalars["learning_rates/vae"] == [(10, pytest.approx(1e-4))]
    assert scalars["extras/batch_time"] == [(10, 0.25)]
    assert math.isnan(scalars["metrics/kl_loss"][0][1])  # TensorBoard keeps the NaN visible


def test_non_scalar_metric_is_rejected_with_its_name(tmp_path):
    with MetricsWriter(tmp_path, "s", tensorboard=False) as w:
        with pytest.raises(TypeError, match="metric 'metrics/bad' must be a scalar.*\\(2,\\)"):
            w.write(1, 0, 0, {"bad": np.ones(2)})


def test_session_file_and_resume_count(tmp_path):
    w = MetricsWriter(tmp_path, "flow", tensorboard=False)
    w.write(1, 0, 0, {"flow_loss": 1.0})
    w.close()
    session_file = tmp_path / "graph" / "session_flow.json"
    s0 = json.loads(session_file.read_text())
    assert set(s0) == {"session_id", "created_at", "resumed_count", "last_update"}
    assert s0["resumed_count"] == 0
    for expected in (1, 2):
        w = MetricsWriter(tmp_path, "flow", tensorboard=False)
        w.write(1 + expected, 0, expected, {"flow_loss": 0.5})
        w.close()
        s = json.loads(session_file.read_text())
        assert s["resumed_count"] == expected
        assert s["session_id"] == s0["session_id"] and s["created_at"] == s0["created_at"]
    lines = read_jsonl(tmp_path / "graph" / "training_metrics_flow.jsonl")
    assert [e["global_step"] for e in lines] == [1, 2, 3]  # appended, never truncated
    assert {e["session_id"] for e in lines} == {s0["session_id"]}
    # another stage has its own session
    MetricsWriter(tmp_path, "other", tensorboard=False).close()
    assert json.loads((tmp_path / "graph" / "session_other.json").read_text())["resumed_count"] == 0


def test_inactive_writer_writes_nothing(tmp_path):
    with MetricsWriter(tmp_path, "s", active=False) as w:
        entry = w.write(1, 0, 0, {"loss": 1.0})
    assert entry["metrics"] == {"loss": 1.0}
    assert not (tmp_path / "graph").exists() and not (tmp_path / "tb").exists()


def test_read_jsonl_skips_torn_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"global_step": 1}\n\n{"global_step": 2}\n{"global_st')
    assert read_jsonl(p) == [{"global_step": 1}, {"global_step": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_bar_non_tty_rate_eta_and_metrics():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressBar(100, "vae", stream=out, tty=False, log_every_s=9.5, clock=clock)
    for _ in range(20):
        clock.t += 0.5  # 2 steps/s
        bar.update(1, loss=jnp.float32(0.123456), lr=1e-5)
    lines = out.getvalue().splitlines()
    # printed on the first update and then after 9.5 s of the fake clock: t=0.5, 10.0
    assert len(lines) == 2
    last = bar.render()
    assert last.startswith("vae | 20/100 (20.0%) | 2.00 steps/s | elapsed 0:00:10 | ETA 0:00:40")
    assert "loss: 0.1235" in last and "lr: 1.000e-05" in last
    bar.close()
    assert out.getvalue().splitlines()[-1] == last
    assert "\r" not in out.getvalue()


def test_progress_bar_tty_redraws_and_unknown_total():
    clock, out = FakeClock(), io.StringIO()
    with ProgressBar(None, "flow", stream=out, tty=True, refresh_s=0.0, clock=clock) as bar:
        clock.t = 1.0
        bar.update(1, flow_loss=3.0)
        assert bar.rate is None  # one step: no steady-state rate yet
        clock.t = 2.0
        bar.update(5, flow_loss=2.0)
        assert bar.eta_seconds is None
        assert bar.render() == "flow | 6 | 5.00 steps/s | elapsed 0:00:02 | flow_loss: 2.0000"
    text = out.getvalue()
    assert text.count("\r\x1b[2K") >= 2 and text.endswith("\n")


def test_progress_bar_eta_ignores_the_compile_step():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressBar(30, "flow", stream=out, tty=False, clock=clock)
    clock.t = 20.0  # the first step compiles for 20 s
    bar.update(1)
    for _ in range(9):
        clock.t += 0.5  # then 2 steps/s
        bar.update(1)
    assert bar.rate == 2.0 and bar.eta_seconds == 10.0  # 20 steps left at 2/s, not at 10/29.5 s


def test_format_duration():
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(None) == "?" and format_duration(float("inf")) == "?"


def write_synthetic(path, n=40, *, plain=True, with_nulls=True):
    t0 = datetime(2025, 1, 1, 12, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            m = (
                {
                    "vae_loss": 1.0 / (i + 1),
                    "kl_loss": 10.0 / (i + 1),
                    "kl_beta": min(1.0, i / 20),
                    "generator_loss": -0.5 + 0.01 * i,
                }
                if plain
                else {
                    "train/loss_recon": 2.0 / (i + 1),
                    "train/loss_flow": 1.0 + 0.0 * i,
                    "learning/lr_flow": 1e-4,
                }
            )
            if with_nulls and i == 5:
                m = {k: None for k in m}
            entry = {
                "timestamp": (t0 + timedelta(seconds=10 * i)).isoformat(),
                "session_id": "20250101_120000",
                "epoch": 0,
                "batch": i,
                "global_step": i + 1,
                "metrics": m,
            }
            if plain:
                entry["learning_rates"] = {"vae_lr": 1e-4 * 0.99**i, "flow_lr": 5e-5}
                entry["extras"] = {"batch_time": 0.5 + 0.1 * (i % 3)}
            f.write(json.dumps(entry) + "\n")


def test_make_plots_reference_names(tmp_path):
    write_synthetic(tmp_path / "graph" / "training_metrics_stage1.jsonl")
    written = make_plots(tmp_path, "stage1")
    names = sorted(p.name for p in written)
    assert names == sorted(
        f"stage1_{n}"
        for n in (
            "training_losses.png",
            "kl_loss.png",
            "learning_rates.png",
            "batch_times.png",
            "training_overview.png",
            "training_summary.txt",
        )
    )
    for p in written:
        assert p.parent == tmp_path / "graph" and p.stat().st_size > 0
    with Image.open(tmp_path / "graph" / "stage1_training_losses.png") as im:
        assert im.size[0] > 1000  # 12 in at 150 dpi (trimmed by bbox_inches="tight")
    summary = (tmp_path / "graph" / "stage1_training_summary.txt").read_text()
    assert (
        "20250101_120000" in summary and "0:06:30" in summary
    )  # session and time span (39 x 10 s)
    vae_row = next(line for line in summary.splitlines() if line.startswith("vae_loss"))
    initial, final, vmin, vmax = (float(v) for v in vae_row.split()[1:5])
    assert (initial, final, vmin, vmax) == (1.0, pytest.approx(0.025), pytest.approx(0.025), 1.0)
    assert vae_row.split()[-1] == "-97.5%"
    assert "vae_lr: 1.000e-04 -> " in summary


def test_make_plots_namespaced_metrics_and_missing_data(tmp_path):
    write_synthetic(tmp_path / "graph" / "training_metrics_flow.jsonl", plain=False)
    names = sorted(p.name for p in make_plots(tmp_path, "flow"))
    # no KL, no batch times: those plots are skipped; the LR comes from a namespaced metric
    assert names == [
        "flow_learning_rates.png",
        "flow_training_losses.png",
        "flow_training_overview.png",
        "flow_training_summary.txt",
    ]
    assert make_plots(tmp_path, "absent") == []
    # an all-null metric file: only the summary
    p = tmp_path / "graph" / "training_metrics_nulls.jsonl"
    p.write_text(
        json.dumps(
            {
                "timestamp": "x",
                "session_id": "s",
                "epoch": 0,
                "batch": 0,
                "global_step": 1,
                "metrics": {"vae_loss": None},
            }
        )
        + "\n"
    )
    assert [q.name for q in make_plots(tmp_path, "nulls")] == ["nulls_training_summary.txt"]
