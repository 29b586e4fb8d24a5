"""fluxflow_jax vs the PyTorch reference: training-iteration time, FLOPs, % of peak and memory
of the same models on the same CPU or GPU, side by side.

    python benchmarks/vs_reference.py --suite small     # CI size: 25 min on the loaded 2-core VM
    python benchmarks/vs_reference.py --device gpu --suite gpu --dtypes float32,bfloat16 \
        --threads 8 --torch_python python3 --keep_going     # a GPU machine: gpu_session.sh
    python benchmarks/vs_reference.py --suite full --readme      # the issue's sizes (long)
    python benchmarks/vs_reference.py --cases disc,vae16 --dtypes float32,bfloat16
    python benchmarks/vs_reference.py --cases vae16 --dynamics 300   # + training dynamics

The reference runs in its own torch environment (``--torch_python``, default
/tmp/refvenv/bin/python) through ``benchmarks/_torch_worker.py``, which imports the model files
of the exported reference sources (``--ref_src``, default /tmp/refsrc). Neither is a dependency
of this package. Setting them up:

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch numpy safetensors einops \
        "transformers<5"                     # transformers: the reference's text encoder
    mkdir -p /tmp/refsrc/core /tmp/refsrc/training
    git -C <fluxflow-core clone> archive HEAD | tar -x -C /tmp/refsrc/core
    git -C <fluxflow-training clone> archive HEAD | tar -x -C /tmp/refsrc/training

Cases (``benchmarks/_cases.py``; ``--suite small|full`` or ``--cases``) cover the VAE,
discriminator, flow and text encoder steps and two whole stage iterations (VAE + GAN: D step +
G step; flow with the frozen text encoder in the step). For every case both sides train *the
same model from the same weights*: fluxflow_jax initialises it, the weights go to the worker in
the reference's state-dict layout (``fluxflow_jax.interop``, strict key check), both get the
same inputs, and each optimizer step is forward + loss + backward + Adam(lr 1e-4).

The reference runs twice: *fixed* (its expander's ``ConvTranspose2d`` input made contiguous,
``_torch_worker.layout_fix``: the fair baseline, timed in every round) and *as shipped* (only
for kinds with a transposed conv, one run of ``--ref_warmup_shipped`` + 1 iterations under a
wall-clock cap ``--ref_cap``: a cliff shows as ``>cap``, with the warm-up time if one finished).
``--dtypes`` adds bf16: ours with ``model.dtype='bfloat16'`` (fp32 parameters), the reference
under CPU autocast.

Each (case, dtype) runs in a fresh child process (so its peak RSS is that case's), ``--rounds``
alternations of (our ``--warmup`` + ``--steps`` iterations, a reference worker run), on the same
``--threads`` cores; medians over the pooled timed iterations. Ours is one jitted step per part
(donated state), compiled ahead (``compile s``: lower + XLA compile of every part). FLOPs per
iteration: XLA's ``cost_analysis`` of our compiled steps (the reference does the same
arithmetic); ``% peak``: FLOPs / time / the best ``jnp.dot`` GFLOP/s measured once per run in
the same dtype. Memory: ``ours XLA MB`` = temporaries + arguments + outputs - donated of the
largest part; ``RSS MB``: peak resident set of our child / of the torch worker (each includes
its runtime and imports; our child drops its host copy of the worker's weights once written and
measures its own matmul peak only after the case, so neither counts); ``RSS in steps``: the same
peaks over the timed iterations only (VmHWM restarted after our compile and first iteration, and
after the worker's warm-up), without the compiler's transient memory. ``ref/ours`` > 1 means
fluxflow_jax is faster. ``--floor`` adds the kernel floor (``_floor.py``): every matmul and
convolution of our step timed alone, summed - the share of our step they are, and
``ref/floor``, the most any arrangement of XLA:CPU's kernels could reach. A shared 2-core VM
varies by 15% or more between runs: read ratios, not absolute times, and read 0.85-1.15 as
parity. Results: a table on stdout,
``benchmarks/results/vs_reference.json`` and, with ``--readme``, the table in
``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORKER = HERE / "_torch_worker.py"

import _floor
import _measure
from _cases import CASES, HAS_CONV_T, SUITES, build_case, size_label


class Ours:
    """Our jitted iteration of one case: one jitted optimizer step per part, compiled ahead."""

    def __init__(self, case: dict, dtype: str):
        import jax
        import optax

        from fluxflow_jax import xla  # the compile options the training steps use

        self.host_runtime = xla.configure_cpu_host()  # as the entry points do, before any array
        params, extra, parts, self.inputs, self.torch_weights = build_case(case, dtype)
        tx = optax.adam(1e-4)
        self.steps, opt_states = [], []
        for names, loss_fn in parts:
            self.steps.append(xla.jit(self._make_step(names, loss_fn, tx),
                                      donate_argnums=(0, 1, 2), measure=True))
            opt_states.append(tx.init({n: params[n] for n in names}))
        self.params, self.extra, self.opt_states = params, extra, opt_states
        trained = {n for names, _ in parts for n in names}
        self.n_params = int(sum(np.prod(x.shape) for n in trained
                                for x in jax.tree.leaves(params[n])))
        self.key, self.i = jax.random.key(1), 0

    @staticmethod
    def _make_step(names, loss_fn, tx):
        import jax
        import optax

        def step(params, opt_state, extra, key):
            def f(sub):
                return loss_fn({**params, **sub}, extra, key)
            sub = {n: params[n] for n in names}
            (loss, extra), grads = jax.value_and_grad(f, has_aux=True)(sub)
            updates, opt_state = tx.update(grads, opt_state, sub)
            return {**params, **optax.apply_updates(sub, updates)}, opt_state, extra, loss
        return step

    def compile(self) -> dict:
        """Lower + compile every part (replacing the jitted callables by the executables):
        ``{compile_s, flops, mem_bytes}`` summed (FLOPs, time) or maxed (memory) over parts."""
        import jax

        key = jax.random.key(0)
        t0 = time.perf_counter()
        stats = []
        self.jitted = list(self.steps)
        for i, fn in enumerate(self.steps):
            compiled = fn.lower(self.params, self.opt_states[i], self.extra, key).compile()
            stats.append(_measure.compiled_stats(compiled))
            self.steps[i] = compiled
        return {"compile_s": time.perf_counter() - t0,
                "flops": sum(s["flops"] for s in stats),
                "mem_bytes": max(s["mem_bytes"] for s in stats)}

    def jaxprs(self) -> list:
        """Every part's step as a jaxpr, traced from the state's shapes (the arrays themselves
        may have been donated): what ``_floor.kernel_floor`` reads."""
        import jax

        spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
        return [fn.trace(spec(self.params), spec(self.opt_states[i]), spec(self.extra),
                         jax.random.key(0)).jaxpr.jaxpr for i, fn in enumerate(self.jitted)]

    def run(self) -> float:
        import jax

        key = jax.random.fold_in(self.key, self.i)
        self.i += 1
        loss = None
        for i, fn in enumerate(self.steps):
            self.params, self.opt_states[i], self.extra, loss = fn(
                self.params, self.opt_states[i], self.extra, key)
        return float(jax.block_until_ready(loss))

    def time(self, warmup: int, steps: int) -> tuple[list[float], list[float]]:
        """``(wall s, process CPU s)`` per timed iteration (CPU: all threads of this process)."""
        times, cpu = [], []
        for _ in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            self.run()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return times[warmup:], cpu[warmup:]


def save_worker_inputs(ours: Ours, tmp: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in ours.inputs.items()}, str(tmp / "inputs.st"))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32)
               for k, v in ours.torch_weights.items()}, str(tmp / "weights.st"))
    ours.torch_weights = {}  # a host copy only the worker needs: not part of our peak RSS


def time_reference(case: dict, args, tmp: Path, variant: str, dtype: str, warmup: int,
                   steps: int, cap: float) -> dict:
    """One worker run: ``{times_s, loss0, n_params, peak_rss, ...}``, or, past ``cap`` seconds,
    ``{capped: True, times_s: [whatever finished], peak_rss}`` (the worker is killed)."""
    spec = {"mode": "bench", "kind": case["kind"], "config": case["config"],
            "ref_src": args.ref_src, "threads": args.threads, "warmup": warmup, "steps": steps,
            "grad_ckpt": args.ref_grad_ckpt or bool(case["config"].get("remat")),
            "ref_variant": variant, "dtype": dtype,
            "device": "cuda" if args.device == "gpu" else "cpu",
            "tf32": args.device == "gpu" and dtype == "float32",
            "inputs": str(tmp / "inputs.st"), "weights": str(tmp / "weights.st")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    out = tmp / "out.json"
    partial = Path(str(out) + ".partial")
    for f in (out, partial):
        f.unlink(missing_ok=True)
    try:
        proc = subprocess.run([args.torch_python, str(WORKER), str(tmp / "spec.json"), str(out)],
                              check=False, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        got = json.loads(partial.read_text()) if partial.exists() else {"times_s": []}
        return {"capped": True, **got}
    if proc.returncode != 0:
        raise RuntimeError(f"torch worker failed ({args.torch_python} {WORKER}), rc "
                           f"{proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def shipped_result(res: dict, cap: float) -> tuple[float | None, str | None]:
    """``(ms, None)`` for a finished as-shipped run, else ``(None, '>cap s ...')``."""
    if not res.get("capped"):
        return 1e3 * float(np.median(res["times_s"])), None
    done = res.get("times_s", [])
    note = f">{cap:.0f} s"
    return None, note + (f" (warm-up {done[0]:.0f} s)" if done else " (no iteration)")


def run_case(name: str, dtype: str, args, tmp: Path) -> dict:
    """Compile ours, then ``--rounds`` alternations of (our iterations, a fixed-reference worker
    run), so slow drifts of a shared machine hit both sides alike; then, for kinds with a
    transposed conv and fp32, the reference as shipped under ``--ref_cap``."""
    from fluxflow_jax import xla

    case = CASES[name]
    ours = Ours(case, dtype)
    st = ours.compile()
    loss0 = ours.run()
    save_worker_inputs(ours, tmp)
    peak_all = _measure.peak_rss()  # imports + compile + the first iteration
    steps_only = _measure.reset_peak_rss()  # from here VmHWM covers the iterations only
    t_ours, t_ref, c_ours, c_ref, ref = [], [], [], [], {}
    for _ in range(args.rounds):
        wall, cpu = ours.time(args.warmup, args.steps)
        t_ours, c_ours = t_ours + wall, c_ours + cpu
        ref = time_reference(case, args, tmp, "fixed", dtype, args.warmup, args.steps,
                             args.worker_timeout)
        if ref.get("capped"):
            raise RuntimeError(f"case {name}: the fixed reference ran past --worker_timeout")
        t_ref += ref["times_s"]
        c_ref += ref["cpu_s"]
    if ref["n_params"] != ours.n_params:
        raise RuntimeError(f"case {name}: the reference trains {ref['n_params']} parameters, "
                           f"ours {ours.n_params}: not the same model")
    shipped_ms, shipped_note, shipped_rss = None, None, None
    if case["kind"] in HAS_CONV_T and dtype == "float32" and args.ref_cap > 0:
        res = time_reference(case, args, tmp, "shipped", dtype, args.ref_warmup_shipped, 1,
                             args.ref_cap)
        shipped_ms, shipped_note = shipped_result(res, args.ref_cap)
        shipped_rss = res.get("peak_rss")
    med_o, med_r = float(np.median(t_ours)), float(np.median(t_ref))
    row = {"case": name, "size": size_label(case), "kind": case["kind"], "dtype": dtype,
           "config": case["config"], "batch": case["batch"],
           "ours_ms": round(1e3 * med_o, 2), "ref_ms": round(1e3 * med_r, 2),
           "ratio_ref_over_ours": round(med_r / med_o, 3),
           # CPU seconds per iteration: less sensitive to other processes than wall time at
           # --threads 1 (at 2 threads torch's OpenMP spin-waits count as CPU time too).
           "ours_cpu_ms": round(1e3 * float(np.median(c_ours)), 2),
           "ref_cpu_ms": round(1e3 * float(np.median(c_ref)), 2),
           "ratio_cpu": round(float(np.median(c_ref)) / float(np.median(c_ours)), 3),
           "ours_min_ms": round(1e3 * float(np.min(t_ours)), 2),
           "ref_min_ms": round(1e3 * float(np.min(t_ref)), 2),
           "ref_shipped_ms": None if shipped_ms is None else round(shipped_ms, 1),
           "ref_shipped_note": shipped_note,
           "ref_shipped_rss_mb": None if shipped_rss is None else round(shipped_rss / 2**20),
           "flops": st["flops"],
           "ours_xla_mb": round(st["mem_bytes"] / 2**20, 1),
           "ours_rss_mb": round(max(peak_all, _measure.peak_rss()) / 2**20, 1),
           "ref_rss_mb": round(ref["peak_rss"] / 2**20, 1),
           "ours_step_rss_mb": round(_measure.peak_rss() / 2**20, 1) if steps_only else None,
           "ref_step_rss_mb": (round(ref["peak_rss_steps"] / 2**20, 1)
                               if ref.get("peak_rss_steps") else None),
           "ours_compile_s": round(st["compile_s"], 2),  # with measuring the conv library
           "ours_conv_library": [xla.convolution_choice(j) for j in ours.jitted],
           "ours_loss0": loss0, "ref_loss0": ref["loss0"],
           "params": ours.n_params, "ref_params": ref["n_params"],
           "torch": ref["torch"], "ref_threads": ref["threads"],
           "timed_iterations": len(t_ours)}
    if args.device == "gpu":  # allocated device bytes at their peak, both sides
        import jax
        stats = jax.devices()[0].memory_stats() or {}
        row.update(ours_dev_mb=round(stats.get("peak_bytes_in_use", 0) / 2**20, 1),
                   ref_dev_mb=round((ref.get("peak_device_bytes") or 0) / 2**20, 1),
                   device_kind=jax.devices()[0].device_kind)
    if args.floor:  # after the peak RSS is read, so the op timings are not part of it
        row.update(_floor.kernel_floor(ours.jaxprs()))
    return row


def run_child(args) -> int:
    """The body of one (case, dtype) child process: writes its row to ``--_row``."""
    with tempfile.TemporaryDirectory(prefix="vs_reference_") as d:
        row = run_case(args._child, args._dtype, args, Path(d))
    # The matmul peak again, here (on a shared machine the parent's figure may be a low one),
    # after the case: its operands (``peak_n``: 2048^2 on CPU, 8192^2 on a GPU) and executables
    # are not part of the case's peak RSS.
    local = _measure.matmul_peak(peak_n(args))
    peak = {k: max(v, local[k]) for k, v in json.loads(args._peak).items()}
    pk = peak[row["dtype"]] * 1e9
    row.update(ours_pct_peak=round(100 * row["flops"] / (row["ours_ms"] / 1e3) / pk, 1),
               ref_pct_peak=round(100 * row["flops"] / (row["ref_ms"] / 1e3) / pk, 1),
               peak_gflops=peak)
    if (sheet := _measure.datasheet_tflops(row.get("device_kind", ""), row["dtype"])):
        row.update(ours_mfu=round(100 * row["flops"] / (row["ours_ms"] / 1e3) / sheet / 1e12, 1),
                   ref_mfu=round(100 * row["flops"] / (row["ref_ms"] / 1e3) / sheet / 1e12, 1))
    Path(args._row).write_text(json.dumps(row))
    return 0


def spawn_case(name: str, dtype: str, argv: list[str], peak: dict, tmp: Path) -> dict:
    row_path = tmp / f"row_{name}_{dtype}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_child", name,
           "--_dtype", dtype, "--_row", str(row_path), "--_peak", json.dumps(peak)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0 or not row_path.exists():
        raise RuntimeError(f"case {name} ({dtype}) failed, rc {proc.returncode}:\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(row_path.read_text())


def peak_n(args) -> int:
    """Side of the square matmul that measures the peak: 2048 fills 2 CPU cores, a GPU needs
    8192."""
    return 8192 if args.device == "gpu" else 2048


def check_setup(args) -> None:
    if not shutil.which(args.torch_python):
        raise SystemExit(f"--torch_python {args.torch_python} does not exist: make a venv with "
                         "torch, numpy, safetensors and einops (see this file's docstring)")
    vae = Path(args.ref_src) / "core" / "src" / "fluxflow" / "models" / "vae.py"
    if not vae.is_file():
        raise SystemExit(f"--ref_src {args.ref_src}: {vae} not found; export the reference with "
                         "git archive into <ref_src>/core and <ref_src>/training")


def pin_threads(n: int) -> list[int]:
    """Pin this process (and the worker it starts) to ``n`` cores before jax starts: XLA:CPU
    sizes its thread pool by the cores the process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    if n > len(cpus):
        raise SystemExit(f"--threads {n} but only {len(cpus)} cores are available")
    os.sched_setaffinity(0, cpus[:n])
    return cpus[:n]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="small",
                    help="case list: small (CI size) or full (the issue's sizes)")
    ap.add_argument("--cases", default="", help=f"comma list instead of --suite: {','.join(CASES)}")
    ap.add_argument("--dtypes", default="float32",
                    help="comma list of float32, bfloat16 (bf16: ours model.dtype, torch autocast)")
    ap.add_argument("--ref_src", default="/tmp/refsrc",
                    help="exported reference sources (<dir>/core/src, <dir>/training/src)")
    ap.add_argument("--torch_python", default="/tmp/refvenv/bin/python",
                    help="python of an environment with torch, numpy, safetensors, einops, "
                         "transformers")
    ap.add_argument("--threads", type=int, default=2, help="cores for both sides")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="where both sides run: gpu = JAX's CUDA backend and torch on cuda, fp32 "
                         "as TF32 on both (XLA's default precision), device memory columns, MFU "
                         "against the datasheet peak of a known GPU")
    ap.add_argument("--keep_going", action="store_true",
                    help="a case that fails (out of memory, a missing module) is reported and the "
                         "run goes on with the next one")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed iterations per side and round")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternations of our iterations and a reference run per case")
    ap.add_argument("--ref_cap", type=float, default=120.0,
                    help="wall-clock cap (s) of the as-shipped reference run; 0 skips it")
    ap.add_argument("--ref_warmup_shipped", type=int, default=1,
                    help="warm-up iterations of the as-shipped run before its timed one")
    ap.add_argument("--ref_grad_ckpt", action="store_true",
                    help="the reference VAE with gradient checkpointing (its default)")
    ap.add_argument("--worker_timeout", type=int, default=1800)
    ap.add_argument("--floor", action="store_true",
                    help="also time every matmul and convolution of our step alone: the kernel "
                         "floor (benchmarks/_floor.py) and ref/floor, the most a target can reach")
    ap.add_argument("--readme", action="store_true",
                    help="write the table into benchmarks/README.md")
    ap.add_argument("--dynamics", type=int, default=0,
                    help="also train the demo VAE warm-up this many steps on both sides (0 = off)")
    ap.add_argument("--dynamics_seed", type=int, default=0)
    ap.add_argument("--dynamics_loss", default="{}",
                    help="JSON loss overrides for --dynamics (see _dynamics.REF_LOSS_KEYS)")
    ap.add_argument("--out", default=str(HERE / "results" / "vs_reference.json"))
    for hidden in ("--_child", "--_dtype", "--_row", "--_peak"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [s for s in args.cases.split(",") if s] or SUITES[args.suite]
    if bad := [s for s in names if s not in CASES]:
        ap.error(f"unknown case(s) {bad}; choose from {list(CASES)}")
    dtypes = [s for s in args.dtypes.split(",") if s]
    if bad := [s for s in dtypes if s not in ("float32", "bfloat16")]:
        ap.error(f"--dtypes: unknown {bad}; choose from float32, bfloat16")
    return args, names, dtypes


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, names, dtypes = parse_args(argv)
    # before jax starts (the children inherit it): --device decides, not what is installed
    os.environ["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"
    check_setup(args)
    cores = pin_threads(args.threads)
    if args._child:
        return run_child(args)
    parent_argv = [a for a in argv if a != "--readme"]

    import jax

    if args.device == "gpu":
        try:
            backend = jax.default_backend()
        except Exception as e:  # noqa: BLE001 - JAX_PLATFORMS=cuda without a CUDA jaxlib/GPU
            backend = f"no backend ({type(e).__name__}{': ' if str(e) else ''}{str(e)[:200]})"
        if backend != "gpu":
            raise SystemExit(f"--device gpu: JAX runs on {backend}; it needs a CUDA jaxlib "
                             "(pip install 'jax[cuda12]') and a visible GPU")
    peak = _measure.matmul_peak(peak_n(args))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, cores {cores}, matmul peak "
          f"GFLOP/s {peak}", flush=True)
    rows, failed, t_all = [], [], time.perf_counter()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vs_reference_") as d:
        for name in names:
            for dtype in dtypes:
                try:
                    r = spawn_case(name, dtype, parent_argv, peak, Path(d))
                except RuntimeError as e:
                    if not args.keep_going:
                        raise
                    failed.append({"case": name, "dtype": dtype, "error": str(e)[-2000:]})
                    _measure.write_partial(Path(args.out), rows, failed)
                    print(f"  {name:14s} {dtype:8s} FAILED: {str(e).splitlines()[0]}",
                          flush=True)
                    continue
                rows.append(r)
                _measure.write_partial(Path(args.out), rows, failed)
                print(f"  {name:14s} {dtype:8s} ours {_measure.fmt_ms(r['ours_ms']):>8s}  ref "
                      f"{_measure.fmt_ms(r['ref_ms']):>8s} (shipped "
                      f"{_measure.shipped_cell(r)})  ref/ours {r['ratio_ref_over_ours']:5.2f} (CPU "
                      f"{r['ratio_cpu']:5.2f})  "
                      f"compile {r['ours_compile_s']:5.1f} s  loss0 {r['ours_loss0']:.5f} / "
                      f"{r['ref_loss0']:.5f}  CPU convolutions: "
                      f"{', '.join(c or 'none' for c in r['ours_conv_library'])}", flush=True)
        dynamics = None
        if args.dynamics > 0:
            import _dynamics
            dynamics = _dynamics.run_dynamics(args, Path(d))
    peak = {k: max([v] + [r["peak_gflops"][k] for r in rows]) for k, v in peak.items()}
    if rows:
        _measure.print_table(rows)
    for f in failed:
        print(f"failed: {f['case']} ({f['dtype']}): {f['error'].strip().splitlines()[-1]}")
    if dynamics:
        _dynamics.print_dynamics(dynamics)
    total = time.perf_counter() - t_all
    print(f"total {total:.0f} s")
    meta = {"jax": jax.__version__, "torch": rows[0]["torch"] if rows else None,
            "threads": args.threads, "cores": cores, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor(),
            "machine_desc": f"{platform.machine()} {os.cpu_count()} cores visible, "
                            f"{_measure.cpu_name()}",
            "peak": peak, "peak_n": peak_n(args), "device": args.device,
            "failed": failed, "loadavg": " ".join(f"{x:.1f}" for x in load),
            "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
            "ref_cap": args.ref_cap, "ref_grad_ckpt": args.ref_grad_ckpt, "argv": argv,
            "command": "python benchmarks/vs_reference.py " + " ".join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "timing": "median wall time of a full training iteration, all parts",
            "total_s": round(total, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": rows}
    if dynamics:
        doc["dynamics"] = dynamics
    out.write_text(json.dumps(doc, indent=1) + "\n")
    Path(str(out) + ".partial").unlink(missing_ok=True)
    print(f"wrote {out}")
    if args.readme:
        _measure.write_readme(HERE / "README.md", rows, meta)
        print(f"wrote {HERE / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
