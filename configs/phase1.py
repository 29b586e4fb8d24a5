"""Phase 1 of the reference: VAE-only training (SPADE on, no GAN, no LPIPS) on a COCO-style folder.

Launch:
  python -m fluxflow_jax.main --config=configs/phase1.py --workdir=runs/phase1 \
      --config.datasets.coco.image_folder=/data/coco/train2017 \
      --config.datasets.coco.captions_file=/data/coco/captions.tsv
  python -m fluxflow_jax.main --config=configs/phase1.py:runlocal --workdir=runs/p1_local   # CPU size

Reproduces the reference's Phase 1 report (docs/TRAINING_PROGRESS_2025-12-07 in fluxflow-core):
vae_dim 128, batch 2, RMSprop lr 1e-5 alpha 0.95 momentum 0.9 centered, cosine to 0.001*lr,
kl_beta 1e-4 with a 5000-step cosine warm-up, kl_free_bits 1024 (as the report had it), clip 1.0.
Expected: the reconstruction loss ('vae_loss', L1-frequency + 0.1 MSE) falls from ~0.8 to ~0.3 within
~1,100 steps on one A6000-class GPU (the report's 0.832 -> 0.297); the kl_loss stays large while
kl_beta is still warming up.
"""
from fluxflow_jax import config_defaults as cd


def get_config(arg: str = ""):
    runlocal = arg == "runlocal"
    c = cd.base_config()
    if runlocal:
        c.model = cd.model_config("tiny")
    c.datasets.coco = cd.dataset_config(
        "folder", image_folder="data/coco/images", captions_file="data/coco/captions.tsv",
        resize_mode="bucket", buckets="native", img_size=512)
    if runlocal:
        c.datasets.coco = cd.dataset_config("shapes", num_samples=256, img_size=64)
    c.default_dataset = "coco"
    c.batch_size = 2
    epochs = 0 if runlocal else 3
    c.stages.phase1_vae = cd.stage(
        "phase1_vae", train=("vae", "spade"), epochs=epochs, steps=40 if runlocal else 0,
        optimizers={"vae": cd.optimizer("RMSprop", 1e-5, alpha=0.95, momentum=0.9, centered=True,
                                        clip_norm=1.0)},
        schedulers={"vae": cd.scheduler("CosineAnnealingLR", eta_min_factor=0.001)},
        loss=dict(kl_beta=1e-4, kl_warmup_steps=5000, kl_free_bits=1024.0, adaptive_weights=True),
        ema_decay=0.999)
    c.stage_order = ("phase1_vae",)
    if runlocal:
        c.checkpoint.interval_steps = 20
    return c
