"""The reference training guide's three-stage pipeline: VAE warm-up -> VAE + SPADE + GAN -> flow.

Launch:
  python -m fluxflow_jax.main --config=configs/pipeline.py --workdir=runs/pipeline \
      --config.datasets.main.image_folder=/data/images --config.datasets.main.captions_file=/data/captions.tsv
  python -m fluxflow_jax.main --config=configs/pipeline.py:runlocal --workdir=runs/pipe_local

Stage 1 stops early once the 20-step moving average of the reconstruction loss falls below 0.02
(the guide's stop_condition), otherwise after 10 epochs. Stage 2 adds SPADE and the patch GAN
(lambda_adv 0.9, kl_beta 1e-3, Lion). Stage 3 trains the flow model and the text encoder on the
frozen VAE with Lion at 5e-7 as in the guide. Exports land in W/export/<stage>/ after each stage.
Expected on one A100: stage 1 reaches the 0.02 threshold within a few epochs of a 100k-image set.
"""
from fluxflow_jax import config_defaults as cd


def get_config(arg: str = ""):
    runlocal = arg == "runlocal"
    c = cd.base_config()
    c.model = cd.model_config("tiny" if runlocal else "phase1")
    if runlocal:
        c.datasets.main = cd.dataset_config("shapes", num_samples=256, img_size=64)
    else:
        c.datasets.main = cd.dataset_config(
            "folder", image_folder="data/images", captions_file="data/captions.tsv",
            resize_mode="bucket", buckets="native", img_size=512)
    c.default_dataset = "main"
    c.batch_size = 4 if runlocal else 8
    lion = lambda lr: cd.optimizer("Lion", lr, betas=(0.9, 0.95), weight_decay=0.01)
    c.stages.vae_warmup = cd.stage(
        "vae_warmup", train=("vae",), epochs=0 if runlocal else 10, steps=30 if runlocal else 0,
        optimizers={"vae": cd.optimizer("AdamW", 2e-5, betas=(0.9, 0.999), weight_decay=0.01,
                                        clip_norm=1.0)},
        loss=dict(kl_beta=1e-4), stop_metric="vae_loss", stop_threshold=0.02, stop_window=20)
    c.stages.vae_spade_gan = cd.stage(
        "vae_spade_gan", train=("vae", "spade", "gan"), epochs=0 if runlocal else 40,
        steps=20 if runlocal else 0,
        optimizers={"vae": lion(1e-5 if not runlocal else 1e-4),
                    "discriminator": cd.optimizer("AdamW", 1e-5, betas=(0.0, 0.9), amsgrad=True,
                                                  weight_decay=0.001, clip_norm=0.0)},
        schedulers={"vae": cd.scheduler("CosineAnnealingLR", eta_min_factor=0.1)},
        loss=dict(lambda_adv=0.9, kl_beta=1e-3))
    c.stages.flow_training = cd.stage(
        "flow_training", train=("flow", "text_encoder"), freeze=("compressor", "expander"),
        epochs=0 if runlocal else 100, steps=30 if runlocal else 0,
        optimizers={"flow": lion(5e-7 if not runlocal else 3e-4),
                    "text_encoder": cd.optimizer("AdamW", 5e-8, betas=(0.9, 0.99),
                                                 weight_decay=0.01)},
        sample_prompts=("a photo of a cat sitting on a couch",
                        "an illustration of mountains at sunset") if not runlocal else
                       ("a red circle above a blue square", "a green triangle"))
    c.stage_order = ("vae_warmup", "vae_spade_gan", "flow_training")
    if runlocal:
        c.checkpoint.interval_steps = 20
    return c
