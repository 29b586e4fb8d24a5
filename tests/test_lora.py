"""LoRA adapters on a tiny flow model: step 0 is the base bit for bit, the merge equals the
unmerged textbook form, only adapters are trained and carry optimizer state, DOP runs every n
steps, the adapter file round-trips, and config mistakes name their key.

In-process and small: one compiled flow step (flow + text encoder on cached packed latents, no
VAE) shared by the step tests. The end-to-end run through the user's commands is
tests/test_lora_e2e.py.
"""
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from fluxflow_jax import lora, lora_io, lora_run, optim, sharding, stages, steps
from fluxflow_jax.data import load_tokenizer, tokenize
from fluxflow_jax.models import registry
from fluxflow_jax.state import create_train_state, step_params

ROOT = Path(__file__).resolve().parents[1]
MODEL_CFG = {"vae_dim": 8, "downscales": 2, "upscales": 2, "vae_attn_layers": 1,
             "vae_attn_heads": 2, "flow_dim": 16, "flow_layers": 2, "flow_heads": 2,
             "text_embedding_dim": 16, "max_hw": 1024, "activation": "bezier", "remat": False,
             "dtype": "float32", "disc": {"base_ch": 4, "depth": 2},
             "text": {"vocab_size": 400, "dim": 16, "n_layers": 1, "n_heads": 2,
                      "hidden_dim": 32, "max_position_embeddings": 16, "dropout": 0.0,
                      "pooling": "mean", "freeze_backbone": False}}
B, T, L = 4, 16, 8


@pytest.fixture(scope="module")
def world():
    models = registry.build_models(MODEL_CFG, {"flow", "text_encoder"})
    params, _ = registry.init_params(models, jax.random.key(0, impl="rbg"), (16, 16), L)
    params = jax.device_get(params)
    r = np.random.default_rng(0)
    packed = r.normal(size=(B, T + 1, 8)).astype(np.float32)
    emb = r.normal(size=(B, 16)).astype(np.float32)
    t = r.uniform(size=(B,)).astype(np.float32)
    return models, params, (packed, emb, t)


def _random_adapters(flow_params, target, rank=3, seed=1):
    ad = lora.init_adapters(flow_params, rank, target, jax.random.key(seed))
    flat = lora.flatten(ad)
    r = np.random.default_rng(seed)
    return lora.unflatten({k: (v if k.endswith("lora_A") else
                               jnp.asarray(r.normal(0, 0.2, np.shape(v)), jnp.float32))
                           for k, v in flat.items()})


def test_lora_targets_attention_and_all(world):
    _, params, _ = world
    att = lora.target_paths(params["flow"], "attention")
    full = lora.target_paths(params["flow"], "all")
    # 2 blocks x (self, cross) x (q, kv, out); 'all' adds 4 pillars x 3 layers + ffn per block
    assert len(att) == 12 and len(full) == 12 + 2 * 13
    assert "transformer_blocks_1/cross_attn/kv_proj" in att
    assert "transformer_blocks_0/p3/l2" in full and "transformer_blocks_0/p3/l2" not in att
    with pytest.raises(ValueError, match="target_layers"):
        lora.target_paths(params["flow"], "mlp")


def test_lora_step0_equals_base_bit_for_bit(world):
    models, params, (packed, emb, t) = world
    ad = lora.init_adapters(params["flow"], 4, "all", jax.random.key(3))
    assert all(not np.any(np.asarray(v)) for k, v in lora.flatten(ad).items()
               if k.endswith("lora_B"))
    merged = lora.merge(params["flow"], ad, 2.0)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params["flow"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    apply = jax.jit(lambda p: models.flow.apply({"params": p}, packed, emb, t, hw=(4, 4)))
    np.testing.assert_array_equal(np.asarray(apply(merged)), np.asarray(apply(params["flow"])))


@pytest.mark.parametrize("target", ["attention", "all"])
def test_lora_merged_equals_unmerged(world, target):
    models, params, (packed, emb, t) = world
    ad = _random_adapters(params["flow"], target)
    s = lora.scale(3, 6.0)
    apply = jax.jit(lambda p: models.flow.apply({"params": p}, packed, emb, t, hw=(4, 4)))
    merged = apply(lora.merge(params["flow"], ad, s))
    unmerged = jax.jit(lambda p, a: lora.apply_unmerged(models.flow, p, a, s, packed, emb, t,
                                                         hw=(4, 4)))(params["flow"], ad)
    base = apply(params["flow"])
    assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-2  # the adapters do something
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def lora_step(world):
    models, params, _ = world
    params = {**params, "flow_lora": lora.init_adapters(params["flow"], 2, "attention",
                                                        jax.random.key(5))}
    sub = step_params("flow", params)
    labels = optim.param_labels(sub, {m: ("lora" if m == "flow_lora" else "frozen") for m in sub})
    tx = optim.make_partitioned(
        {"frozen": None, "lora": optim.make_optimizer({"type": "AdamW", "lr": 1e-2}, None, 100,
                                                      name="optimizers.lora")}, labels)
    mesh = sharding.make_mesh()
    st = create_train_state(params, {"flow": tx}, adaptive_window=None)
    sh = sharding.tree_shardings(st, mesh)
    cfg = lora.settings({"rank": 2, "alpha": 2.0, "trigger": "sks", "class_word": "colored",
                         "dop_multiplier": 1.0, "dop_every_n_steps": 2})
    step = steps.make_flow_step(models, tx, {}, mesh, sh, frozen=("flow", "text_encoder"),
                                lora_cfg=cfg)
    r = np.random.default_rng(2)
    ids = r.integers(5, 400, (B, L)).astype(np.int32)
    batch = {"latent": r.normal(size=(B, T + 1, 8)).astype(np.float32), "input_ids": ids,
             "attention_mask": np.ones((B, L), np.int32),
             "dop_input_ids": np.where(ids == ids[0, 1], 7, ids),
             "dop_attention_mask": np.ones((B, L), np.int32)}
    return params, tx, st, sh, step, sharding.put_batch(batch, mesh)


def test_lora_only_adapters_have_optimizer_state(lora_step):
    params, _, st, _, _, _ = lora_step
    ad_shapes = sorted(np.shape(x) for x in jax.tree.leaves(params["flow_lora"]))
    opt_shapes = sorted(np.shape(x) for x in jax.tree.leaves(st.opt_state) if np.ndim(x) > 0)
    assert opt_shapes == sorted(ad_shapes * 2)  # AdamW mu and nu of the adapters, nothing else
    n_ad = sum(np.size(x) for x in jax.tree.leaves(params["flow_lora"]))
    n_flow = sum(np.size(x) for x in jax.tree.leaves(params["flow"]))
    assert n_ad < n_flow / 5


def test_lora_step_trains_adapters_only_and_dop_every_n(lora_step):
    params, _, st, sh, step, batch = lora_step
    st = jax.device_put(st, sh)
    rows = []
    for _ in range(3):
        st, m = step(st, batch, jax.random.key(0))
        rows.append({k: float(v) for k, v in m.items()})
    got = jax.device_get(st.params)
    for name in ("flow", "text_encoder"):  # the base stays bit for bit
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(params[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = {k: bool(np.any(np.asarray(v))) for k, v in lora.flatten(got["flow_lora"]).items()
             if k.endswith("lora_B")}
    # Every adapter learns but cross-attention's q_proj: the text is one token, so its softmax is
    # constantly 1 and the queries get no gradient (the reference architecture; lora.py notes it).
    assert moved == {k: "cross_attn/q_proj" not in k for k in moved}
    assert [r["train/dop_ran"] for r in rows] == [1.0, 0.0, 1.0]
    assert rows[0]["train/loss_dop"] == 0.0  # B = 0: adapted == base exactly
    assert rows[1]["train/loss_dop"] == 0.0  # not run on odd steps
    assert rows[2]["train/loss_dop"] > 0.0   # adapters moved: DOP measures the drift
    assert rows[2]["train/grad_norm_lora"] > 0 and "train/grad_norm_flow" not in rows[2]


def test_dop_branch_compiles_the_flow_heads_convolutions_in_the_library_layout(lora_step):
    """The DoP term runs inside a ``lax.cond``, where XLA:CPU compiles a convolution outside its
    canonical layout as a plain loop (benchmarks/README.md, "Convolutions inside lax.cond").
    Before ``layers.Conv`` wrote its stride-1 gradients canonically, the input gradients of the
    flow head's 5x5, 3x3 and 7x7 convolutions were 3 such loops in the DoP branch
    (``b01f_01oi->b01f``; ``benchmarks/lora_dop.py`` at D=128 and 256 tokens: 442-453 -> 301-321
    ms a step)."""
    from test_discriminator import CANONICAL, conv_labels

    _, _, st, sh, step, batch = lora_step
    # An 8 x 8 latent grid: on the fixture's 4 x 4 one XLA itself turns the head's convolutions
    # around (the input is smaller than the 5x5 and 7x7 kernels), in the entry computation too.
    r = np.random.default_rng(3)
    hw = np.zeros((B, 1, 8), np.float32)
    hw[:, 0, :2] = 8
    batch = {**batch, "latent": jnp.asarray(np.concatenate(
        [r.normal(size=(B, 64, 8)).astype(np.float32), hw], 1))}
    # shapes only: another test's steps may have donated (deleted) the fixture's state arrays
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            st, sh)
    hlo = step.lower(abstract, batch, jax.random.key(0)).compile().as_text()
    in_cond = [ln for ln in hlo.splitlines() if " convolution(" in ln and "cond/branch" in ln]
    assert len(in_cond) == 9  # the head's 3 forwards on the class prompt, twice, and 3 dx
    assert set(conv_labels(hlo)) == {CANONICAL}


def test_lora_adapter_file_round_trip(world, tmp_path):
    _, params, _ = world
    ad = _random_adapters(params["flow"], "all", rank=3)
    meta = {"rank": 3, "alpha": 6.0, "target_layers": "all", "trigger": "sks", "class_word": ""}
    f = lora_io.save_adapter(tmp_path / "a.safetensors", ad, meta)
    with safe_open(str(f), "np") as h:
        keys = set(h.keys())
        assert json.loads(h.metadata()[lora_io.META]) == meta
        a = h.get_tensor("diffuser.flow_processor.transformer_blocks.0.self_attn.q_proj.lora_A")
        b = h.get_tensor("diffuser.flow_processor.transformer_blocks.1.p2.1.0.lora_B")
    assert a.shape == (3, 16) and b.shape == (16, 3)  # PEFT layout: A [r, in], B [out, r]
    assert "diffuser.flow_processor.transformer_blocks.0.ffn.0.lora_A" in keys
    back, meta2 = lora_io.load_adapter(f, params["flow"])
    assert meta2 == meta
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    off, _ = lora_io.apply_adapter(params, f, 0.0)
    assert off["flow"] is params["flow"]
    on, _ = lora_io.apply_adapter(params, f, 0.5)
    want = lora.merge(params["flow"], ad, 0.5 * 2.0)
    for x, y in zip(jax.tree.leaves(on["flow"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    small = jax.tree.map(lambda x: x[:, :8] if x.ndim == 2 and x.shape[1] == 16 else x,
                         params["flow"])
    with pytest.raises(lora_io.AdapterFileError, match="cross_attn.out_proj has A .* the model needs"):
        lora_io.load_adapter(f, small)


def test_dop_class_prompts_replace_the_trigger():
    tok = load_tokenizer(None)
    ids, mask = tokenize(tok, ["a sks circle above a red square", "a blue sks"], 16)
    got_ids, got_mask = lora_run.class_prompts(ids, mask, tok, "sks", "colored", 16)
    want_ids, want_mask = tokenize(tok, ["a colored circle above a red square",
                                         "a blue colored"], 16)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_mask, want_mask)
    assert lora.swap_word("sksx sks", "sks", "c") == "sksx c"


def _lora_config():
    spec = importlib.util.spec_from_file_location("lora_cfg", ROOT / "configs" / "lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("runlocal")


@pytest.mark.parametrize("key,value,message", [
    ("rank", 0, "stages.lora.lora.rank: must be an integer >= 1"),
    ("alpha", -1.0, "stages.lora.lora.alpha: must be > 0"),
    ("target_layers", "mlp", "stages.lora.lora.target_layers: 'mlp' not in"),
    ("dropout", 0.1, "stages.lora.lora.dropout: 0.1 - adapter dropout is not implemented"),
    ("trigger", "", "stages.lora.lora.trigger: required"),
    ("class_word", "", "stages.lora.lora.class_word: required when dop_multiplier > 0"),
])
def test_lora_config_errors_name_their_key(key, value, message):
    c = _lora_config()
    c.init_from = ""
    c.stages.lora.lora[key] = value
    errs = stages.validate_config(c, check_paths=False)
    assert any(e.startswith(message) for e in errs), errs


def test_lora_config_errors_stage_level(tmp_path):
    c = _lora_config()
    c.init_from = ""
    assert stages.validate_config(c, check_paths=False) == []
    c.stages.lora.train = ("lora", "flow")
    assert any(e.startswith("stages.lora.train: 'lora' trains adapters over a frozen base")
               for e in stages.validate_config(c, check_paths=False))
    c.stages.lora.train = ("flow",)  # a lora block on a stage that does not train adapters
    assert any(e.startswith("stages.lora.lora: the stage does not train 'lora'")
               for e in stages.validate_config(c, check_paths=False))
    c.stages.lora.train = ("lora",)
    cap = tmp_path / "captions.txt"
    cap.write_text("a.png\ta purple circle\n")
    c.datasets.subject.captions_file = str(cap)
    assert any(e.startswith("stages.lora.lora.trigger: no caption in") and "'sks'" in e
               for e in stages.validate_config(c, check_paths=False))
