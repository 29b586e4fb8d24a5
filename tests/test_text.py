"""BertTextEncoder / DistilBert: interop, HF directory loading, pooling, freezing, dropout."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from run_utils import USER_LEVEL
from safetensors.numpy import save_file

from fluxflow_jax.interop.common import InteropError, count_params
from fluxflow_jax.interop.text import (infer_text_config, load_hf_distilbert, text_from_torch,
                                       text_template, text_to_torch)
from fluxflow_jax.models.text import BertTextEncoder, Embed

BACKBONE = dict(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                max_position_embeddings=16)
TINY = dict(embed_dim=4, **BACKBONE)


def random_variables(config, seed=0):
    """Model-shaped variables filled by numpy (``init`` compiles one RNG kernel per shape)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        base = 1.0 if path[-1] == "scale" else 0.0
        return (base + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)

    flat = traverse_util.flatten_dict(text_template(config))
    return traverse_util.unflatten_dict({p: fill(p, s) for p, s in flat.items()})


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(tree)))


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def _batch(seed=0, b=3, length=8):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, BACKBONE["vocab_size"], (b, length))
    mask = np.ones((b, length), np.int32)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids = np.where(mask == 1, ids, 0)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


def _apply(model, variables, ids, mask, **kw):
    return jax.jit(lambda v, i, m: model.apply(v, i, m, **kw))(variables, ids, mask)


def test_roundtrip_is_bit_identical_and_keys_are_the_reference_ones():
    variables = random_variables(TINY)
    sd = text_to_torch(variables, TINY, prefix="text_encoder.")
    assert sd["text_encoder.ouput_layer.3.weight"].shape == (20, 512)
    assert "text_encoder.language_model.transformer.layer.1.attention.q_lin.weight" in sd
    assert len(sd) == 4 + 16 * BACKBONE["n_layers"] + 8
    back, config = text_from_torch(sd, {"n_heads": 2}, prefix="text_encoder.")
    assert {k: config[k] for k in TINY} == TINY and config["activation"] == "bezier"
    _assert_trees_equal(back, variables)
    # A persistent position_ids buffer (older transformers) is accepted and ignored.
    sd["text_encoder.language_model.embeddings.position_ids"] = np.arange(16)[None]
    back2, _ = text_from_torch(sd, {"n_heads": 2}, prefix="text_encoder.")
    _assert_trees_equal(back2, variables)


def test_ablation_head_roundtrip_needs_its_activation():
    config = {**TINY, "activation": "relu"}
    variables = random_variables(config)
    assert variables["params"]["head"]["dense_0"]["kernel"].shape == (16, 512)
    sd = text_to_torch(variables, config)
    with pytest.raises(InteropError, match="ablation head"):
        text_from_torch(sd, {"n_heads": 2})
    back, cfg = text_from_torch(sd, {"n_heads": 2, "activation": "relu"})
    assert cfg["embed_dim"] == 4
    _assert_trees_equal(back, variables)


def test_infer_config_and_its_errors():
    sd = text_to_torch(random_variables(TINY))
    with pytest.raises(InteropError, match="n_heads"):
        infer_text_config(sd)  # never guessed from the width
    assert infer_text_config(sd, overrides={"n_heads": 2}) == {**TINY, "activation": "bezier"}
    with pytest.raises(InteropError, match="unknown BertTextEncoder config keys"):
        infer_text_config(sd, overrides={"n_heads": 2, "heads": 2})
    del sd["language_model.transformer.layer.0.ffn.lin2.bias"]
    sd["ouput_layer.1.weight"] = np.zeros(7, np.float32)
    with pytest.raises(InteropError) as e:
        text_from_torch(sd, {"n_heads": 2})
    msg = str(e.value)
    assert "missing" in msg and "language_model.transformer.layer.0.ffn.lin2.bias" in msg
    assert "ouput_layer.1.weight: checkpoint [7] vs model [2560]" in msg


def test_param_count_default_backbone():
    template = text_template({"embed_dim": 1024})
    assert count_params(template) == 70_973_440
    assert count_params({"params": template["params"]["language_model"]}) == 66_362_880


def test_masked_and_unmasked_pooling_differ_only_with_padding():
    variables = random_variables(TINY)
    ids, mask = _batch()
    mean = BertTextEncoder(**TINY, pooling="mean")
    masked = BertTextEncoder(**TINY, pooling="masked_mean")
    a = np.asarray(_apply(mean, variables, ids, mask))
    b = np.asarray(_apply(masked, variables, ids, mask))
    assert a.shape == (3, 4)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)  # row 0 has no padding
    assert np.all(np.abs(a[1:] - b[1:]).max(axis=1) > 1e-4)  # padded rows differ
    # Masked pooling never looks at padded tokens; the reference's mean does.
    ids2 = jnp.where(mask == 1, ids, 7)
    np.testing.assert_allclose(_apply(masked, variables, ids2, mask), b, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(_apply(mean, variables, ids2, mask)) - a)[1:].max() > 1e-4
    # No mask at all == an all-ones mask.
    ones = jnp.ones_like(mask)
    np.testing.assert_allclose(jax.jit(lambda v, i: mean.apply(v, i))(variables, ids),
                               _apply(mean, variables, ids, ones), rtol=1e-5, atol=1e-6)


def _write_hf_dir(path, backbone_sd, prefix="distilbert.", extra_config=None):
    cfg = {"activation": "gelu", "architectures": ["DistilBertForMaskedLM"],
           "attention_dropout": 0.1, "dropout": 0.1, "initializer_range": 0.02,
           "model_type": "distilbert", "pad_token_id": 0, "qa_dropout": 0.1,
           "seq_classif_dropout": 0.2, "sinusoidal_pos_embds": False, "tie_weights_": True,
           "transformers_version": "4.57.0", **BACKBONE, **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = {prefix + k: v for k, v in backbone_sd.items()}
    d, v = BACKBONE["dim"], BACKBONE["vocab_size"]
    tensors.update({"vocab_transform.weight": np.ones((d, d), np.float32),
                    "vocab_transform.bias": np.ones(d, np.float32),
                    "vocab_layer_norm.weight": np.ones(d, np.float32),
                    "vocab_layer_norm.bias": np.ones(d, np.float32),
                    "vocab_projector.bias": np.ones(v, np.float32),
                    prefix + "embeddings.position_ids": np.arange(16, dtype=np.int64)[None]})
    save_file(tensors, str(path / "model.safetensors"))


def test_load_local_hf_directory(tmp_path):
    variables = random_variables(TINY, seed=3)
    sd = text_to_torch(variables)
    backbone_sd = {k[len("language_model."):]: v for k, v in sd.items()
                   if k.startswith("language_model.")}
    for prefix in ("distilbert.", ""):
        d = tmp_path / (prefix or "bare")
        d.mkdir()
        _write_hf_dir(d, backbone_sd, prefix)
        params, cfg = load_hf_distilbert(str(d))
        assert cfg == {**BACKBONE, "dropout": 0.1, "attention_dropout": 0.1, "pad_token_id": 0}
        _assert_trees_equal(params, variables["params"]["language_model"])
    # The loaded backbone drops into a BertTextEncoder built with the same kwargs.
    model = BertTextEncoder(embed_dim=4, **cfg)
    ids, mask = _batch()
    mixed = {"params": {**variables["params"], "language_model": params}}
    np.testing.assert_array_equal(_apply(model, mixed, ids, mask),
                                  _apply(model, variables, ids, mask))


def test_hf_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_distilbert(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "distilbert", **BACKBONE}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pickle"):
        load_hf_distilbert(str(tmp_path))
    sd = text_to_torch(random_variables(TINY))
    backbone_sd = {k[len("language_model."):]: v for k, v in sd.items()
                   if k.startswith("language_model.") and "layer.1.ffn.lin1.weight" not in k}
    _write_hf_dir(tmp_path, backbone_sd)
    with pytest.raises(InteropError) as e:
        load_hf_distilbert(str(tmp_path))
    assert "model.safetensors" in str(e.value) and "missing keys (1)" in str(e.value)
    assert "transformer.layer.1.ffn.lin1.weight [32, 16]" in str(e.value)
    _write_hf_dir(tmp_path, backbone_sd, extra_config={"model_type": "bert"})
    with pytest.raises(InteropError, match="model_type is 'bert'"):
        load_hf_distilbert(str(tmp_path))
    _write_hf_dir(tmp_path, backbone_sd, extra_config={"activation": "relu"})
    with pytest.raises(InteropError, match="activation 'relu'"):
        load_hf_distilbert(str(tmp_path))


def test_frozen_backbone_gets_zero_gradients():
    variables = random_variables(TINY)
    ids, mask = _batch()

    def grads(freeze):
        model = BertTextEncoder(**TINY, freeze_backbone=freeze)
        loss = lambda p: jnp.sum(model.apply({"params": p}, ids, mask) ** 2)
        return jax.jit(jax.grad(loss), compiler_options=USER_LEVEL)(variables["params"])

    frozen, free = grads(True), grads(False)
    assert all(not np.any(g) for g in _flat(frozen["language_model"]).values())
    for tree in (frozen["head"], free["head"], free["language_model"]["layer_1"]):
        assert all(np.any(g) for g in _flat(tree).values())
    _assert_trees_equal(frozen["head"], free["head"])


def test_dropout_only_when_not_deterministic():
    variables = random_variables(TINY)
    ids, mask = _batch()
    model = BertTextEncoder(**TINY)
    run = jax.jit(lambda k, det: model.apply(variables, ids, mask, deterministic=det,
                                             rngs={"dropout": k}), static_argnums=1)
    eval_a, eval_b = run(jax.random.key(0), True), run(jax.random.key(1), True)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_a2, train_b = (run(jax.random.key(s), False) for s in (0, 0, 1))
    np.testing.assert_array_equal(train_a, train_a2)
    assert np.abs(np.asarray(train_a) - np.asarray(train_b)).max() > 1e-4
    assert np.abs(np.asarray(train_a) - np.asarray(eval_a)).max() > 1e-4
    no_drop = BertTextEncoder(**TINY, dropout=0.0, attention_dropout=0.0)
    np.testing.assert_allclose(
        jax.jit(lambda k: no_drop.apply(variables, ids, mask, deterministic=False,
                                        rngs={"dropout": k}))(jax.random.key(2)),
        eval_a, rtol=1e-6, atol=1e-7)


def test_padding_row_gets_no_gradient_and_zero_init():
    emb = Embed(10, 4, padding_idx=0)
    variables = emb.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))
    table = np.asarray(variables["params"]["embedding"])
    assert not np.any(table[0]) and np.all(table[1:] != 0)
    ids = jnp.asarray([[0, 3, 0, 5]])
    g = jax.grad(lambda p: jnp.sum(emb.apply({"params": p}, ids) ** 2))(
        {"embedding": jnp.ones((10, 4))})["embedding"]
    assert not np.any(g[0]) and np.all(g[3] != 0) and np.all(g[5] != 0)


def test_bad_inputs_raise():
    variables = random_variables(TINY)
    model = BertTextEncoder(**TINY)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.apply(variables, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.apply(variables, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="pooling must be one of"):
        BertTextEncoder(**TINY, pooling="cls").apply(variables, jnp.zeros((1, 4), jnp.int32))


def test_models_import_without_interop():
    """models/ is the lower layer: importing every model module must not pull in interop/
    (the HF loader lives in interop.text; a back-import would be an import cycle)."""
    import subprocess
    import sys
    code = ("import sys, fluxflow_jax.models.registry, fluxflow_jax.models.text; "
            "bad = [m for m in sys.modules if m.startswith('fluxflow_jax.interop')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
