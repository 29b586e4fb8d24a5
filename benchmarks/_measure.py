"""Measurements of ``benchmarks/vs_reference.py``: matmul peak, XLA cost/memory of a compiled
step, process peak RSS, and the results table (stdout and ``benchmarks/README.md``)."""
from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

README_BEGIN = "<!-- vs_reference:begin -->"
README_END = "<!-- vs_reference:end -->"


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
    """Best GFLOP/s of an ``n x n`` jitted ``jnp.dot`` in fp32 and bf16 (fp32 accumulation):
    the ceiling the '% of peak' columns divide by. Best of ``reps`` so load spikes don't lower
    it."""
    import jax
    import jax.numpy as jnp

    out = {}
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jnp.ones((n, n), dt)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        jax.block_until_ready(f(a, a))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a, a))
            best = min(best, time.perf_counter() - t0)
        out[name] = round(2 * n ** 3 / best / 1e9, 1)
    return out


def compiled_stats(compiled) -> dict:
    """FLOPs and memory XLA reports for one compiled executable. ``mem_bytes`` = temporaries +
    arguments + outputs - aliased (donated) bytes: what the step holds live at its peak."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    ma = compiled.memory_analysis()
    mem = 0
    if ma is not None:
        mem = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
               - ma.alias_size_in_bytes)
    return {"flops": flops, "mem_bytes": int(mem)}


# Dense tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity): fp32 rows run as
# TF32 on both sides (--device gpu), so TF32 is their peak. The MFU columns divide by these; the
# '% peak' columns by the matmul this run measured. Longest name first: 'H100 PCIe' is not SXM.
DATASHEET_TFLOPS = {"H100 PCIe": {"float32": 378.0, "bfloat16": 756.0},
                    "H100": {"float32": 494.7, "bfloat16": 989.4},
                    "H200": {"float32": 494.7, "bfloat16": 989.4},
                    "A100": {"float32": 156.0, "bfloat16": 312.0}}


def datasheet_tflops(device_kind: str, dtype: str) -> float | None:
    """The datasheet peak of the GPU named ``device_kind`` (``jax.Device.device_kind``) in
    ``dtype``, or None for a device not in :data:`DATASHEET_TFLOPS` (every CPU)."""
    for name in sorted(DATASHEET_TFLOPS, key=len, reverse=True):
        if name in device_kind:
            return DATASHEET_TFLOPS[name][dtype]
    return None


def peak_rss() -> int:
    """This process's peak resident set size in bytes: ``VmHWM`` of /proc/self/status, which
    starts afresh at exec (``ru_maxrss`` carries the forking parent's high-water mark over)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Restart this process's ``VmHWM`` from its current resident set (Linux ``clear_refs``
    5), so a later :func:`peak_rss` is the peak of what ran since: the steps, without the
    compiler's or the imports' transient high-water mark. False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def fmt_ms(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.2f} s" if v >= 1e3 else f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms"


def fmt_ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def shipped_cell(r: dict) -> str:
    if r.get("ref_shipped_ms") is not None:
        return fmt_ms(r["ref_shipped_ms"])
    return r.get("ref_shipped_note") or "= fixed"


def table_rows(rows: list[dict]) -> list[list[str]]:
    """One line per (case, dtype): times, ratio against the fixed reference, FLOPs and % of the
    matmul peak on both sides, memory (ours: XLA's live bytes and process peak RSS; reference:
    worker peak RSS) and our compile time."""
    out = []
    step_rss = any("ours_step_rss_mb" in x for x in rows)
    floor = any("floor_ms" in x for x in rows)
    dev = any("ours_dev_mb" in x for x in rows)
    mfu = any("ours_mfu" in x for x in rows)
    for r in rows:
        gf = r["flops"] / 1e9
        out.append([r["size"], r["dtype"].replace("float32", "fp32").replace("bfloat16", "bf16"),
                    fmt_ms(r["ours_ms"]), fmt_ms(r["ref_ms"]), shipped_cell(r),
                    fmt_ratio(r["ref_ms"], r["ours_ms"]),
                    fmt_ratio(r.get("ref_cpu_ms"), r.get("ours_cpu_ms")), f"{gf:.1f}",
                    f"{r['ours_pct_peak']:.0f}%", f"{r['ref_pct_peak']:.0f}%",
                    f"{r['ours_xla_mb']:.0f}", f"{r['ours_rss_mb']:.0f}", f"{r['ref_rss_mb']:.0f}",
                    fmt_ratio(r["ours_rss_mb"], r["ref_rss_mb"]), f"{r['ours_compile_s']:.1f}"])
        if step_rss:
            o, f = r.get("ours_step_rss_mb"), r.get("ref_step_rss_mb")
            out[-1].append(f"{o:.0f} / {f:.0f} ({fmt_ratio(o, f)})" if o and f else "-")
        if dev:
            o, f = r.get("ours_dev_mb"), r.get("ref_dev_mb")
            out[-1].append(f"{o:.0f} / {f:.0f} ({fmt_ratio(o, f)})" if o and f else "-")
        if mfu:
            out[-1].append(f"{r['ours_mfu']:.1f}% / {r['ref_mfu']:.1f}%" if "ours_mfu" in r
                           else "-")
        if floor:
            has = "floor_ms" in r
            out[-1] += [fmt_ms(r["floor_ms"]) if has else "-",
                        fmt_ratio(r["floor_ms"], r["ours_ms"]) if has else "-",
                        fmt_ratio(r["ref_ms"], r["floor_ms"]) if has else "-"]
    return out


HEADER = ["case", "dtype", "ours", "ref (fixed)", "ref (as shipped)", "ref/ours",
          "ref/ours CPU s", "GFLOP",
          "ours % peak", "ref % peak", "ours XLA MB", "ours RSS MB", "ref RSS MB",
          "RSS ours/ref", "compile s"]
# With --floor (benchmarks/_floor.py): the step's matmuls and convolutions alone, each timed by
# itself; the share of our step they are; and ref / floor, the most any arrangement of those
# kernels could reach against the reference.
FLOOR_HEADER = ["kernel floor", "floor/ours", "ref/floor"]


# Peak RSS over the timed iterations only (VmHWM restarted after compiling / the warm-up):
# ours MB / the reference's MB (ours/ref).
STEP_RSS_HEADER = ["RSS in steps MB ours / ref"]


# --device gpu: the device's allocated bytes at their peak (JAX's peak_bytes_in_use, torch's
# max_memory_allocated over the timed iterations), and MFU against the datasheet peak.
DEVICE_HEADER = ["device MB ours / ref"]
MFU_HEADER = ["MFU ours / ref"]


def header(rows: list[dict]) -> list[str]:
    has = lambda k: any(k in r for r in rows)
    return (HEADER + (STEP_RSS_HEADER if has("ours_step_rss_mb") else [])
            + (DEVICE_HEADER if has("ours_dev_mb") else []) + (MFU_HEADER if has("ours_mfu") else [])
            + (FLOOR_HEADER if has("floor_ms") else []))


def print_table(rows: list[dict]) -> None:
    body, head = table_rows(rows), header(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print("\n" + line(head) + "\n" + "-" * (sum(widths) + 2 * len(widths)))
    for b in body:
        print(line(b))


def markdown_table(rows: list[dict], meta: dict) -> str:
    info = (f"Date: {meta['date']} UTC; machine: {meta['machine_desc']}; {meta['threads']} "
            f"threads per side; matmul peak (best {meta['peak_n']}x{meta['peak_n']} dot) fp32 "
            f"{meta['peak']['float32']} / bf16 {meta['peak']['bfloat16']} GFLOP/s; load "
            f"average at start {meta['loadavg']}.")
    lines = [f"Command: `{meta['command']}`  ", info, "",
             "| " + " | ".join(header(rows)) + " |", "|" + "---|" * len(header(rows))]
    lines += ["| " + " | ".join(b) + " |" for b in table_rows(rows)]
    return "\n".join(lines) + "\n"


def write_readme(path: Path, rows: list[dict], meta: dict) -> None:
    """Replace the text between the vs_reference markers of ``path`` (appended if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{README_BEGIN}\n{markdown_table(rows, meta)}{README_END}"
    if README_BEGIN in text and README_END in text:
        a, b = text.index(README_BEGIN), text.index(README_END) + len(README_END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def write_partial(out: Path, rows: list[dict], failed: list[dict]) -> None:
    """The rows so far, to ``OUT.partial``: a run killed by a time limit (a lent GPU's) keeps
    the cases it finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".partial").write_text(json.dumps({"results": rows, "failed": failed}))


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name with its family/model and widest vector units (``/proc/cpuinfo``, or
    ``cpuinfo`` given as text), for the table's machine line: two VMs both named "AMD EPYC" can be
    a Zen 3 with AVX2 only and a Zen 4 with AVX-512, whose kernels and ratios differ."""
    from fluxflow_jax.conv_choice import cpu_fields  # what the library choice keys machines by

    fields = cpu_fields(cpuinfo)
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    units = []
    if "flags" in fields:  # x86
        flags = set(fields["flags"].split())
        units.append("AVX-512" if "avx512f" in flags else
                     "AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
        units += [u for u, f in (("AVX-512 BF16", "avx512_bf16"), ("AMX", "amx_tile"))
                  if f in flags]
    where = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields)
    extra = "; ".join(p for p in (where, ", ".join(units)) if p)
    return f"{name} ({extra})" if extra else name


