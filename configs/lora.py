"""LoRA fine-tuning of a trained flow model on a small folder of images with trigger captions.

Launch (offline; the base is any export or param file of a model of this config's size):
  python -m fluxflow_jax.main --config=configs/demo.py --workdir=runs/demo          # the base
  python experiments/lora_shapes/run.py --make_data runs/lora_data                   # or your own
  python -m fluxflow_jax.main --config=configs/lora.py --workdir=runs/lora \\
      --config.init_from=runs/demo/export/flow \\
      --config.datasets.subject.image_folder=runs/lora_data/images \\
      --config.datasets.subject.captions_file=runs/lora_data/captions.txt
  python -m fluxflow_jax.generate --export runs/lora/export/lora \\
      --lora runs/lora/export/lora/lora.safetensors --lora_scale 1.0 --prompt "a sks circle" --out out
  # :runlocal - the demo's test size (python -m fluxflow_jax.main --config=configs/demo.py:test
  #   --workdir=/tmp/demo), a few steps, data in /tmp/lora_data

The captions (``name<TAB>caption``) use the trigger word (``stages.lora.lora.trigger``, default
"sks") where the new concept appears. One stage, ``train=('lora',)``: rank-4 adapters on the
attention, pillar and feed-forward layers of the frozen flow model (``:runlocal``: attention only),
AdamW 5e-3 for 600 steps (rank 4 on attention only at 2e-3 for 300 steps barely moved the demo
model: experiments/lora_shapes/README.md), DOP on (the trigger replaced by ``class_word`` keeps the adapted
model's predictions there at the base model's). Writes W/samples (step 0 = the base, with and
without the trigger, then every checkpoint), W/graph (learning curve, ``train/loss_dop``),
W/export/lora/lora.safetensors (the adapter; ``export_merged=True`` adds W/export/lora/merged/).

Expected (experiments/lora_shapes/README.md: measured numbers, command; demo base, 2 CPU cores):
with the trigger the purple share of generations goes 0.14 -> 0.23 (0.34 without DOP); prompts
without it stay closer to the base with DOP (pixel distance 0.028 vs 0.035, colour-vote distance
0.60 vs 0.95); each run ~3.5-4 min wall at load ~10.
"""
import importlib.util
from pathlib import Path

from fluxflow_jax import config_defaults as cd


def _demo(arg: str):
    spec = importlib.util.spec_from_file_location("fluxflow_demo_config",
                                                  Path(__file__).with_name("demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def get_config(arg: str = ""):
    small = arg in ("test", "runlocal")
    n = (lambda full, test: test if small else full)
    demo = _demo("test" if small else "")
    c = cd.base_config()
    c.model = demo.model  # must be the base model's size (checked when the weights load)
    c.rng_impl = "rbg"
    c.tokenizer = "demo"
    c.max_length = 16
    c.init_from = n("runs/demo/export/flow", "/tmp/demo/export/flow")
    root = n("runs/lora_data", "/tmp/lora_data")
    c.datasets.subject = cd.dataset_config("folder", image_folder=f"{root}/images",
                                           captions_file=f"{root}/captions.txt",
                                           img_size=n(32, 16))
    c.default_dataset = "subject"
    c.batch_size = n(8, 4)
    c.stages.lora = cd.stage(
        "lora", train=("lora",), steps=n(600, 6),
        optimizers={"lora": cd.optimizer("AdamW", n(5e-3, 1e-3), betas=(0.9, 0.99),
                                         weight_decay=0.0, clip_norm=1.0)},
        schedulers={"lora": cd.scheduler("CosineAnnealingLR", eta_min_factor=0.1,
                                          warmup_steps=n(20, 1))},
        loss={"sample_posterior": False},
        lora=cd.lora_config(rank=4, alpha=4.0, target_layers=n("all", "attention"), trigger="sks",
                            class_word="colored", dop_multiplier=1.0, dop_every_n_steps=1),
        sample_prompts=("a sks circle", "a sks square", "a red circle", "a blue square"),
        sample_steps=n(16, 4), guidance_scale=2.0)
    c.stage_order = ("lora",)
    c.log_interval = n(20, 2)
    c.checkpoint.interval_steps = n(100, 3)
    c.checkpoint.interval_minutes = 0.0
    c.samples.num_images = 4
    # The base's expander was trained with SPADE (configs/demo.py does): decode samples, and
    # generate from this workdir, with context. Use 'off' for a base trained without it.
    c.samples.spade = n("on", "auto")
    return c
