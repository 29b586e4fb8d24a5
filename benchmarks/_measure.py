"""Measurements of ``benchmarks/vs_reference.py``: matmul peak, XLA cost/memory of a compiled
step, process peak RSS, and the results table (stdout and ``benchmarks/README.md``)."""
from __future__ import annotations

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


def header(rows: list[dict]) -> list[str]:
    return (HEADER + (STEP_RSS_HEADER if any("ours_step_rss_mb" in r for r in rows) else [])
            + (FLOOR_HEADER if any("floor_ms" in r for r in rows) else []))


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
