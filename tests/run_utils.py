"""Workdir helpers shared by the end-to-end tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def rewound_copy(src: Path, dst: Path, stage: str, step: int) -> Path:
    """A copy of a finished workdir as a preemption right after ``stage``'s checkpoint ``step``
    leaves it: later checkpoints, the stage's param file and exports gone, the stage unfinished
    (its JSONL keeps later rows; the resumed run drops and rewrites them)."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints" / stage).iterdir():
        if int(p.name) > step:
            shutil.rmtree(p)
    assert (dst / "checkpoints" / stage / str(step)).is_dir(), "no checkpoint at that step"
    shutil.rmtree(dst / "stages" / stage)
    shutil.rmtree(dst / "export" / stage)
    ps = json.loads((dst / "pipeline_state.json").read_text())
    ps["finished"] = [s for s in ps["finished"] if s != stage]
    ps["current"] = stage
    ps.get("results", {}).pop(stage, None)
    (dst / "pipeline_state.json").write_text(json.dumps(ps))
    return dst
