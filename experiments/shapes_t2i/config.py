"""The demo's pipeline trained longer: the shapes_t2i experiment (issue 10, item 6).

  python -m fluxflow_jax.main --config=experiments/shapes_t2i/config.py --workdir=runs/shapes_t2i
  python -m fluxflow_jax.evaluate --workdir runs/shapes_t2i --num 256
  python experiments/shapes_t2i/measure.py runs/shapes_t2i

Same models, data, losses and optimizers as ``configs/demo.py``; the stages are the demo's test
size's three (VAE + SPADE -> short GAN stage -> flow + text encoder from cached latents): only the
GAN stage, the stage lengths and the evaluation cadence differ from the demo, sized to finish in under 30 minutes on 2 CPU cores. Measured numbers: README.md here.
"""
from configs import demo


def get_config(arg: str = ""):
    c = demo.get_config(arg)
    if arg in ("test", "runlocal"):
        return c  # the demo's test size: used by the tests to check this file builds a run
    c.stage_order = ("vae_warmup", "vae_gan", "flow")  # the demo's full size skips the GAN stage
    c.stages.vae_warmup.steps = 3000
    c.stages.flow.steps = 12000
    c.eval.interval_steps = 500
    c.eval.num_images = 64
    return c
