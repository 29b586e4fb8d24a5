"""Make ``tests/fixtures/vpred/``: the reference's own v-prediction sampling loop on a tiny model.

    /tmp/refvenv/bin/python benchmarks/make_vpred_fixture.py [--ref_src /tmp/refsrc]

Runs in the torch environment described in ``benchmarks/vs_reference.py`` plus ``diffusers``
(the reference's scheduler library). The model is the reference ``FluxFlowProcessor`` with the
weights of the parity fixture ``tests/fixtures/parity/flow_processor`` (not copied again). The
loop is the reference's ``generate_latent_images`` (``fluxflow.utils.visualization``: diffusers'
``DPMSolverMultistepScheduler``, dpmsolver++, order 2, v_prediction, lower_order_final, trailing
spacing) with classifier-free guidance from the reference's ``cfg_guided_prediction_batched``
(zero null embedding), and with the two fixes fluxflow_jax makes on purpose (REFERENCE.md 10):

* the model gets the float time its trainer gave it, ``(index + 0.5) / 999`` (the reference
  loop passes the integer index, which the model maps to embedding 999 for every step, item 2);
* the start is pure Gaussian noise with the size token held fixed (what ``generate_latent_images``
  does with the tokens it is handed; ``save_sample_images`` hands it a re-noised training image).

io.safetensors per case ``g{guidance}_n{steps}``: ``noise [B, T, d]``, ``hw_token [B, 1, d]``,
``text_embeddings [B, E]``, ``out [B, T+1, d]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _torch_worker import install_reference

CASES = ((1.0, 3), (2.5, 4))  # (guidance, steps)
BATCH, GRID = 2, (4, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref_src", default="/tmp/refsrc")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "vpred"))
    args = ap.parse_args()
    install_reference(args.ref_src)
    import diffusers  # before the torchvision stub below (diffusers probes for torchvision)
    # visualization.py imports torchvision for functions this fixture does not call.
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.utils = types.ModuleType("torchvision.utils")
    tv.utils.save_image = None
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms,
                        "torchvision.utils": tv.utils})
    from fluxflow.models.flow import FluxFlowProcessor
    from fluxflow.utils.visualization import generate_latent_images
    from fluxflow_training.training.cfg_utils import cfg_guided_prediction_batched

    case_dir = ROOT / "tests" / "fixtures" / "parity" / "flow_processor"
    kw = json.loads((case_dir / "config.json").read_text())["kwargs"]
    fp = FluxFlowProcessor(**kw).eval()
    sd = {k: torch.from_numpy(v) for k, v in load_file(str(case_dir / "weights.safetensors")).items()}
    fp.load_state_dict(sd, strict=True)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    d, e, t = kw["vae_dim"], kw["embedding_size"], GRID[0] * GRID[1]
    arrays = {}
    for guidance, steps in CASES:
        noise = rng.standard_normal((BATCH, t, d)).astype(np.float32)
        emb = rng.standard_normal((BATCH, e)).astype(np.float32)
        hw = np.zeros((BATCH, 1, d), np.float32)
        hw[:, 0, 0], hw[:, 0, 1] = GRID[0] / 1024, GRID[1] / 1024

        def flow(z, txt, t_index, g=guidance):
            model_t = (t_index.float() + 0.5) / 999.0
            return cfg_guided_prediction_batched(lambda a, b, c: fp(a, b, c), z, txt, model_t, g)

        diffuser = types.SimpleNamespace(flow_processor=flow)
        with torch.no_grad():
            out = generate_latent_images(torch.from_numpy(np.concatenate([noise, hw], 1)),
                                         torch.from_numpy(emb), diffuser, steps=steps)
        name = f"g{guidance}_n{steps}"
        arrays.update({f"{name}.noise": noise, f"{name}.hw_token": hw,
                       f"{name}.text_embeddings": emb, f"{name}.out": out.numpy()})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(out_dir / "io.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({
        "weights": "tests/fixtures/parity/flow_processor/weights.safetensors",
        "kwargs": kw, "cases": [{"name": f"g{g}_n{n}", "guidance": g, "steps": n} for g, n in CASES],
        "null": "zeros", "grid": list(GRID),
        "reference": f"fluxflow-core 0.3.1 generate_latent_images, diffusers {diffusers.__version__}, "
                     f"torch {torch.__version__}, fp32",
        "made_by": "benchmarks/make_vpred_fixture.py"}, indent=2) + "\n")
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
