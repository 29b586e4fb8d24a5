"""One case at two git revisions, interleaved in time: the step-time A/B of a code change.

    python benchmarks/ab_revisions.py --case flow --base 663c126
    python benchmarks/ab_revisions.py --case flow512 --base HEAD~1 --head HEAD --rounds 5
    python benchmarks/ab_revisions.py --case flow --base . \
        --head_options '{"xla_cpu_enable_concurrency_optimized_scheduler": false}'

Why: on these shared 2-core VMs two runs of the same benchmark an hour apart differ by 10-15%,
more than most single changes move a step. Here each revision runs in its own process on its own
sources (``git archive`` of the revision into a temporary folder; ``--head`` defaults to the
working tree), builds the case exactly as ``vs_reference.py`` does (its ``Ours``: same models,
inputs, optimizer and ``xla.jit``), compiles once, and then the parent alternates them: one
warm-up and ``--steps`` timed iterations on the base, the same on the head, for ``--rounds``
rounds. Only one side runs at a time. Prints medians and minimums, and each side's memory
(``XLA MB``: XLA's live bytes of the largest compiled part, as ``vs_reference.py``'s column;
``RSS MB``: the side's peak resident set); writes JSON.

``--base_options`` / ``--head_options`` (JSON) add XLA compiler options to that side's compile, on
top of the ones ``xla.jit`` picks, so the same revision on both sides A/Bs a compiler flag.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def commit_of(rev: str) -> str:
    """The commit ``rev`` names (``'.'``: the working tree's HEAD, marked ``+tree``)."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short",
                           "HEAD" if rev == "." else rev],
                          check=True, capture_output=True, text=True).stdout.strip()
    return head + "+tree" if rev == "." else head


def export(rev: str, dest: Path) -> Path:
    """``git archive rev`` unpacked under ``dest``; the working tree itself for ``rev == '.'``."""
    if rev == ".":
        return REPO
    blob = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                          check=True, capture_output=True).stdout
    dest.mkdir(parents=True)
    tar = dest / "src.tar"
    tar.write_bytes(blob)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return dest


def compile_with(ours, options: dict) -> dict:
    """Compile every part of ``ours`` with ``options`` added to ``xla.jit``'s own:
    ``{compile_s, mem_bytes}`` as ``Ours.compile`` reports them."""
    import jax

    import _measure
    from fluxflow_jax import xla

    key, t0, mem = jax.random.key(0), time.perf_counter(), 0
    for i, fn in enumerate(ours.steps):
        lowered = fn.lower(ours.params, ours.opt_states[i], ours.extra, key)  # xla.jit chooses
        base = (xla.compiler_options() or {}) if fn.uses_xla_convolutions else {}
        ours.steps[i] = lowered.compile(compiler_options={**base, **options})
        mem = max(mem, _measure.compiled_stats(ours.steps[i])["mem_bytes"])
    return {"compile_s": time.perf_counter() - t0, "mem_bytes": mem}


def child(src: str, case: str, options: str) -> None:
    """Build and compile ``case`` from the sources in ``src``, then serve ``run N`` requests.
    ``case`` is JSON: the working tree's definition, used where ``src`` has no case of its
    name (a case added after the base revision)."""
    case_def = json.loads(case)
    sys.path[:0] = [src, str(Path(src) / "benchmarks")]
    import fluxflow_jax
    from _cases import CASES
    from vs_reference import Ours

    where = Path(fluxflow_jax.__file__).resolve()
    assert str(where).startswith(str(Path(src).resolve())), f"imported {where}, not {src}"
    ours = Ours(CASES.get(case_def["name"], case_def), "float32")
    ours.torch_weights = {}  # only the torch worker needs them; vs_reference drops them too
    opts = json.loads(options)
    stats = compile_with(ours, opts) if opts else ours.compile()
    print(json.dumps({"ready": True, "compile_s": stats["compile_s"],
                      "mem_bytes": stats["mem_bytes"]}), flush=True)
    for line in sys.stdin:
        n = int(line.split()[1]) if line.startswith("run") else 0
        if not n:
            import _measure
            print(json.dumps({"peak_rss": _measure.peak_rss()}), flush=True)
            break
        ours.run()  # warm-up after the other side ran
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            ours.run()
            times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", required=True, help="a vs_reference case name (benchmarks/_cases.py)")
    ap.add_argument("--base", default=None, help="git revision A (required)")
    ap.add_argument("--head", default=".", help="git revision B ('.' = the working tree)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed iterations per side and round")
    for side in ("base", "head"):
        ap.add_argument(f"--{side}_options", default="{}",
                        help=f"JSON XLA compiler options added to the {side} side's compile")
    ap.add_argument("--out", default=str(HERE / "results" / "ab_revisions.json"))
    ap.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        child(*args._child)
        return 0
    if not args.base:
        ap.error("--base REV is required (e.g. --base HEAD~1)")
    sys.path.insert(0, str(HERE))
    from _cases import CASES
    if args.case not in CASES:
        ap.error(f"--case {args.case}: unknown; choose from {', '.join(CASES)}")
    for side in ("base", "head"):
        try:
            assert isinstance(json.loads(getattr(args, f"{side}_options")), dict)
        except (ValueError, AssertionError):
            ap.error(f"--{side}_options must be a JSON object, e.g. '{{\"flag\": false}}'")
    with tempfile.TemporaryDirectory() as tmp:
        sides = {}
        for label, rev in (("base", args.base), ("head", args.head)):
            opts = getattr(args, f"{label}_options")
            src = export(rev, Path(tmp) / label)
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--case", args.case,
                 "--_child", str(src), json.dumps({**CASES[args.case], "name": args.case}),
                 opts],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)
            ready = json.loads(proc.stdout.readline() or "{}")
            if not ready.get("ready"):
                raise SystemExit(f"{label} ({rev}) did not start; see its stderr above")
            sides[label] = {"rev": rev, "commit": commit_of(rev), "options": json.loads(opts),
                            "proc": proc, "compile_s": ready["compile_s"],
                            "mem_bytes": ready["mem_bytes"], "times": []}
        for _ in range(args.rounds):
            for s in sides.values():
                s["proc"].stdin.write(f"run {args.steps}\n")
                s["proc"].stdin.flush()
                s["times"] += json.loads(s["proc"].stdout.readline())
        for s in sides.values():
            s["proc"].stdin.write("quit\n")
            s["proc"].stdin.close()
            s["peak_rss"] = json.loads(s["proc"].stdout.readline())["peak_rss"]
            s["proc"].wait()
    rows = {k: {"rev": s["rev"], "commit": s["commit"], "options": s["options"],
                "compile_s": round(s["compile_s"], 1),
                "median_ms": round(1e3 * float(np.median(s["times"])), 1),
                "min_ms": round(1e3 * min(s["times"]), 1), "n": len(s["times"]),
                "xla_mb": round(s["mem_bytes"] / 2 ** 20), "rss_mb": round(s["peak_rss"] / 2 ** 20)}
            for k, s in sides.items()}
    speedup = rows["base"]["median_ms"] / rows["head"]["median_ms"]
    for k, r in rows.items():
        print(f"{args.case:12s} {k} {r['rev']:10s} median {r['median_ms']:9.1f} ms  "
              f"min {r['min_ms']:9.1f} ms  ({r['n']} iterations)  XLA {r['xla_mb']} MB  "
              f"RSS {r['rss_mb']} MB {json.dumps(r['options'])}")
    print(f"{args.case:12s} base/head median: {speedup:.3f}")
    result = {"case": args.case, "rows": rows, "base_over_head": round(speedup, 3),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "argv": sys.argv[1:]}
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + [result], indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
