"""The side-by-side benchmark harness's bookkeeping (no timing here: speed lives in benchmarks/)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _cases
import _measure
import vs_reference


def test_suites_name_known_cases_with_labels():
    for suite, names in _cases.SUITES.items():
        assert names, suite
        for n in names:
            assert n in _cases.CASES, (suite, n)
            assert _cases.size_label(_cases.CASES[n])


def test_full_suite_has_every_kind():
    kinds = {_cases.CASES[n]["kind"] for n in _cases.SUITES["full"]}
    assert kinds == {"vae", "flow", "disc", "text", "vae_gan", "flow_iter"}


def test_capped_shipped_run_reports_the_cliff():
    assert vs_reference.shipped_result({"capped": True, "times_s": []}, 120) == \
        (None, ">120 s (no iteration)")
    assert vs_reference.shipped_result({"capped": True, "times_s": [95.2]}, 120) == \
        (None, ">120 s (warm-up 95 s)")
    assert vs_reference.shipped_result({"times_s": [1.5, 2.5]}, 120) == (2000.0, None)


def test_readme_block_is_replaced_in_place(tmp_path):
    row = {"size": "disc", "dtype": "float32", "ours_ms": 100.0, "ref_ms": 150.0,
           "ref_shipped_ms": None, "ref_shipped_note": None, "flops": 2e9,
           "ours_pct_peak": 5.0, "ref_pct_peak": 3.3, "ours_xla_mb": 10.0, "ours_rss_mb": 900.0,
           "ref_rss_mb": 800.0, "ours_compile_s": 3.0}
    meta = {"command": "python benchmarks/vs_reference.py", "date": "2026-01-01 00:00",
            "machine_desc": "x", "threads": 2, "peak": {"float32": 1.0, "bfloat16": 2.0},
            "peak_n": 2048, "loadavg": "0.1"}
    readme = tmp_path / "README.md"
    readme.write_text("# B\n\nbefore\n")
    _measure.write_readme(readme, [row], meta)
    _measure.write_readme(readme, [dict(row, ref_ms=300.0)], meta)
    text = readme.read_text()
    assert text.count(_measure.README_BEGIN) == 1 and text.startswith("# B\n\nbefore\n")
    assert "| 3.00 |" in text and "| 1.50 |" not in text and "= fixed" in text


def test_bad_dtype_and_case_are_refused():
    with pytest.raises(SystemExit):
        vs_reference.parse_args(["--dtypes", "float16"])
    with pytest.raises(SystemExit):
        vs_reference.parse_args(["--cases", "nope"])
    _, names, dtypes = vs_reference.parse_args(["--suite", "full", "--dtypes",
                                                "float32,bfloat16"])
    assert names == _cases.SUITES["full"] and dtypes == ["float32", "bfloat16"]


def _mlp_grad_jaxpr(n: int = 32):
    import jax
    import jax.numpy as jnp

    def loss(w, x):
        h = jnp.tanh(x @ w["a"])
        h = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w["b"]), None), h, None, length=3)[0]
        return jnp.sum(h @ w["c"])

    w = {k: jnp.ones((n, n)) for k in "abc"}
    return jax.make_jaxpr(jax.grad(loss))(w, jnp.ones((n, n))).jaxpr


def test_kernel_floor_counts_every_matmul_of_a_training_step_and_times_it():
    import _floor

    n = 32
    found = _floor.collect(_mlp_grad_jaxpr(n))
    # Forward: x@a, 3 x (c@b) in the scan, h@c; backward: two dots per forward dot (the
    # weight and the input gradient) except x@a, whose input x is not differentiated.
    calls = sum(v["count"] for v in found.values())
    assert calls == 5 + 2 * 5 - 1
    assert all(_floor.op_flops(v["eqn"]) == 2 * n ** 3 for v in found.values())
    floor = _floor.kernel_floor([_mlp_grad_jaxpr(n)], reps=2)
    assert floor["floor_op_calls"] == calls and floor["floor_ops"] == len(found)
    assert floor["floor_gflop"] == round(calls * 2 * n ** 3 / 1e9, 2) and floor["floor_ms"] > 0


def test_kernel_floor_counts_convolution_work_and_refuses_loops_of_unknown_length():
    import jax
    import jax.numpy as jnp
    import _floor

    x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    (item,) = _floor.collect(jax.make_jaxpr(conv)(x, k).jaxpr).values()
    assert _floor.op_flops(item["eqn"]) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)

    def loop(x):
        return jax.lax.while_loop(lambda c: c[0, 0] < 5, lambda c: c @ c, x)
    with pytest.raises(ValueError, match="while"):
        _floor.collect(jax.make_jaxpr(loop)(jnp.ones((4, 4))).jaxpr)
    no_dot = jax.make_jaxpr(lambda x: jax.lax.while_loop(lambda c: c < 5, lambda c: c + 1, x))
    assert _floor.collect(no_dot(0).jaxpr) == {}


def test_floor_columns_join_the_table_only_when_measured():
    row = {"size": "disc", "dtype": "float32", "ours_ms": 100.0, "ref_ms": 150.0,
           "ref_shipped_ms": None, "ref_shipped_note": None, "flops": 2e9,
           "ours_pct_peak": 5.0, "ref_pct_peak": 3.3, "ours_xla_mb": 10.0, "ours_rss_mb": 900.0,
           "ref_rss_mb": 800.0, "ours_compile_s": 3.0}
    assert _measure.header([row]) == _measure.HEADER
    (cells,) = _measure.table_rows([dict(row, floor_ms=75.0)])
    assert _measure.header([dict(row, floor_ms=75.0)])[-3:] == _measure.FLOOR_HEADER
    assert cells[-3:] == ["75 ms", "0.75", "2.00"]
    assert vs_reference.parse_args(["--floor"])[0].floor
    assert not vs_reference.parse_args([])[0].floor


def test_machine_line_names_the_cpu_generation_and_its_vector_units():
    """Two VMs both called "AMD EPYC" (a Zen 3 with AVX2, a Zen 4 with AVX-512) rank the
    convolution libraries differently; the table's machine line tells them apart."""
    zen3 = "model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: fma avx2 bmi2\n"
    zen4 = zen3.replace(": 1\n", ": 17\n").replace("bmi2", "bmi2 avx512f avx512_bf16")
    xeon = "model name\t: Intel Xeon\nflags\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    assert _measure.cpu_name(zen3) == "AMD EPYC (cpu family 25, model 1; AVX2, no AVX-512)"
    assert _measure.cpu_name(zen4) == "AMD EPYC (cpu family 25, model 17; AVX-512, AVX-512 BF16)"
    assert _measure.cpu_name(xeon) == "Intel Xeon (AVX-512, AVX-512 BF16, AMX)"
    assert _measure.cpu_name("model name\t: Neoverse\nFeatures\t: neon\n") == "Neoverse"


def test_step_peak_rss_leaves_out_an_earlier_transient_high_water_mark():
    import mmap

    size = 300 * 2**20  # mapped, touched and unmapped: whatever the allocator's settings
    big = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        big[offset] = 1
    big.close()
    before = _measure.peak_rss()
    assert _measure.reset_peak_rss()
    after = _measure.peak_rss()
    assert before - after > 200 * 2**20
    row = {"size": "disc", "dtype": "float32", "ours_ms": 100.0, "ref_ms": 150.0,
           "ref_shipped_ms": None, "ref_shipped_note": None, "flops": 2e9,
           "ours_pct_peak": 5.0, "ref_pct_peak": 3.3, "ours_xla_mb": 10.0, "ours_rss_mb": 900.0,
           "ref_rss_mb": 800.0, "ours_compile_s": 3.0}
    (cells,) = _measure.table_rows([dict(row, ours_step_rss_mb=600.0, ref_step_rss_mb=800.0)])
    assert cells[-1] == "600 / 800 (0.75)"
    assert _measure.header([dict(row, ours_step_rss_mb=1.0)])[-1] == "RSS in steps MB ours / ref"


def test_ab_revisions_runs_two_revisions_and_records_both(tmp_path):
    """The A/B tool end to end on the smallest flow case: HEAD exported by git, the working tree
    with one XLA flag as the head; both sides build, compile and time, and the JSON names each
    side's revision and options."""
    import json

    import ab_revisions

    with pytest.raises(SystemExit):
        ab_revisions.main(["--case", "flow_s"])  # no --base
    with pytest.raises(SystemExit):
        ab_revisions.main(["--case", "flow_s", "--base", "HEAD", "--head_options", "[1]"])
    with pytest.raises(SystemExit):
        ab_revisions.main(["--case", "nope", "--base", "HEAD"])
    src = ab_revisions.export("HEAD", tmp_path / "rev")
    assert (src / "fluxflow_jax" / "models" / "flow.py").is_file()
    out = tmp_path / "ab.json"
    flag = {"xla_cpu_enable_concurrency_optimized_scheduler": False}
    assert ab_revisions.main(["--case", "flow_s", "--base", "HEAD", "--rounds", "1",
                              "--steps", "1", "--head_options", json.dumps(flag),
                              "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["case"] == "flow_s"
    assert {k: (r["rev"], r["options"]) for k, r in result["rows"].items()} == {
        "base": ("HEAD", {}), "head": (".", flag)}
    head = ab_revisions.commit_of("HEAD")
    assert result["rows"]["base"]["commit"] == head and result["rows"]["head"]["commit"] == (
        head + "+tree")
    assert all(r["n"] == 1 and r["median_ms"] > 0 for r in result["rows"].values())
    # Each side's memory: XLA's live bytes of its compiled step and its process's peak RSS,
    # which holds at least those bytes.
    assert all(0 < r["xla_mb"] < r["rss_mb"] for r in result["rows"].values())


def test_gpu_rows_carry_device_memory_and_mfu_columns():
    """``--device gpu`` rows: the device's peak allocated bytes of both sides and MFU against the
    datasheet peak of a GPU the harness knows (none for a CPU); the ``gpu`` suite's cases exist."""
    assert _measure.datasheet_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert _measure.datasheet_tflops("NVIDIA H100 PCIe", "float32") == 378.0
    assert _measure.datasheet_tflops("cpu", "float32") is None
    row = {"size": "flow", "dtype": "bfloat16", "ours_ms": 100.0, "ref_ms": 150.0,
           "ref_shipped_ms": None, "ref_shipped_note": None, "flops": 2e12,
           "ours_pct_peak": 30.0, "ref_pct_peak": 20.0, "ours_xla_mb": 10.0, "ours_rss_mb": 900.0,
           "ref_rss_mb": 800.0, "ours_compile_s": 3.0}
    gpu = dict(row, ours_dev_mb=600.0, ref_dev_mb=800.0, ours_mfu=41.2, ref_mfu=20.0)
    assert _measure.header([row]) == _measure.HEADER
    assert _measure.header([gpu]) == _measure.HEADER + _measure.DEVICE_HEADER + _measure.MFU_HEADER
    (cells,) = _measure.table_rows([gpu])
    assert cells[-2:] == ["600 / 800 (0.75)", "41.2% / 20.0%"]
    assert _cases.SUITES["gpu"] and set(_cases.SUITES["gpu"]) <= set(_cases.CASES)


def test_device_gpu_without_one_is_refused_and_keep_going_reports_a_failed_case(tmp_path):
    """The harness as a user runs it: ``--device gpu`` on a machine whose JAX has no GPU stops
    with one line; with ``--keep_going`` a case whose reference side fails (here: sources without
    the trainer module) is reported in the output and the JSON, and the run still ends cleanly."""
    import json
    import subprocess

    ref = tmp_path / "ref"
    (ref / "core" / "src" / "fluxflow" / "models").mkdir(parents=True)
    (ref / "core" / "src" / "fluxflow" / "models" / "vae.py").write_text("")
    cmd = [sys.executable, str(BENCH / "vs_reference.py"), "--torch_python", sys.executable,
           "--ref_src", str(ref)]
    p = subprocess.run(cmd + ["--device", "gpu", "--out", str(tmp_path / "g.json")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 1 and "--device gpu: JAX runs on " in p.stderr, p.stderr[-2000:]
    out = tmp_path / "k.json"
    p = subprocess.run(cmd + ["--cases", "disc", "--steps", "1", "--rounds", "1", "--warmup", "0",
                              "--keep_going", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["results"] == [] and [f["case"] for f in doc["meta"]["failed"]] == ["disc"]
    assert "torch worker failed" in doc["meta"]["failed"][0]["error"]
    assert "failed: disc (float32)" in p.stdout
    assert not (tmp_path / "k.json.partial").exists()
