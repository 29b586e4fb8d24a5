"""Settings a checkpoint's shapes cannot show: the pipeline's ctx_tokens, head counts, and a
pretrained DistilBERT directory (``model.text.pretrained_dir``). Through the registry, the
``convert`` CLI and the public interop functions, against the reference fixtures."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_utils import assert_close_ref, load_case, parity_dir
from safetensors.numpy import save_file

from fluxflow_jax import interop, weights
from fluxflow_jax.convert import load_model_section
from fluxflow_jax.data.tokenizer import DEMO_TOKENIZER_DIR, load_tokenizer
from fluxflow_jax.interop.common import InteropError
from fluxflow_jax.interop.flow import infer_flow_config
from fluxflow_jax.interop.text import (
    load_pretrained_text_encoder,
    pretrained_tokenizer_dir,
    text_from_torch,
)
from fluxflow_jax.models import registry
from fluxflow_jax.models.text import BertTextEncoder

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"vae_dim": 16, "downscales": 3, "upscales": 3, "vae_attn_layers": 1,
         "vae_attn_heads": 4, "flow_dim": 32, "flow_layers": 2, "flow_heads": 4,
         "text_embedding_dim": 24,
         "text": {"vocab_size": 100, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
                  "max_position_embeddings": 64, "dropout": 0.1, "pooling": "mean"}}
CONFIG_FILE = """import ml_collections
def get_config(arg=""):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({model})
    return c
"""


def _convert(*args):
    r = subprocess.run([sys.executable, "-m", "fluxflow_jax.convert", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       check=False)
    return r.returncode, r.stdout, r.stderr


def _config_file(tmp_path, **changes):
    model = {**MODEL, **changes}
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*')))}.py"
    path.write_text(CONFIG_FILE.format(model=repr(model)))
    return path


def test_registry_ties_ctx_tokens_to_downscales():
    models = registry.build_models(MODEL, {"compressor", "expander", "flow"})
    assert models.flow.ctx_tokens == models.expander.ctx_tokens == 3
    # what exports store in their metadata
    assert weights.module_config(models.flow)["ctx_tokens"] == 3
    assert weights.module_config(models.expander)["ctx_tokens"] == 3
    assert registry.build_models({**MODEL, "ctx_tokens": 3}, {"flow"}).flow.ctx_tokens == 3
    with pytest.raises(ValueError, match=r"config.model.ctx_tokens=4 but downscales=3.*remove"):
        registry.build_models({**MODEL, "ctx_tokens": 4}, {"flow"})


def test_loaded_config_must_agree_with_the_run_on_shapeless_settings():
    models = registry.build_models({**MODEL, "downscales": 4, "upscales": 4}, {"flow"})
    built = weights.module_config(models.flow)
    interop.check_loaded_config("flow", dict(built), built, "x.safetensors")  # agrees
    with pytest.raises(InteropError, match=r"x.safetensors: flow.ctx_tokens=3 in the checkpoint "
                                           r"but 4 .*config.model.downscales"):
        interop.check_loaded_config("flow", {**built, "ctx_tokens": 3}, built, "x.safetensors")
    with pytest.raises(InteropError, match=r"flow.n_head=8 in the checkpoint but 4"):
        interop.check_loaded_config("flow", {**built, "n_head": 8}, built, "x.safetensors")


def test_convert_pipeline_checkpoint_heads_and_ctx_tokens(tmp_path):
    _, _, weights = load_case(parity_dir() / "pipeline")
    ref = tmp_path / "ref"
    ref.mkdir()
    save_file({"diffuser." + k: v for k, v in weights.items()},
              str(ref / "flxflow_final.safetensors"))
    out = tmp_path / "flax.safetensors"
    # No metadata, no --config: the compressor's heads would be a guess -> refused, one line.
    rc, _, err = _convert("to-flax", ref, out)
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and "attention heads" in err and "--config" in err, err
    rc, _, err = _convert("to-flax", ref, out, "--config", _config_file(tmp_path))
    assert rc == 0, err
    got = interop.load_flax_params(out)
    assert got["compressor"][1]["attn_heads"] == 4 and got["flow"][1]["n_head"] == 4
    assert got["flow"][1]["ctx_tokens"] == got["expander"][1]["ctx_tokens"] == 3
    # The export carries the configs: it converts back without --config, same settings.
    rc, _, err = _convert("to-torch", out, tmp_path / "export")
    assert rc == 0, err
    rc, _, err = _convert("to-flax", tmp_path / "export", tmp_path / "again.safetensors")
    assert rc == 0, err
    again = interop.load_flax_params(tmp_path / "again.safetensors")
    for name in ("compressor", "flow", "expander"):
        assert again[name][1] == got[name][1], name
    # A --config that contradicts the file's metadata is refused.
    rc, _, err = _convert("to-flax", tmp_path / "export", tmp_path / "x.safetensors",
                          "--config", _config_file(tmp_path, vae_attn_heads=2))
    assert rc == 2 and "compressor.attn_heads=4 in the file's metadata but 2" in err, err


def test_convert_text_encoder_needs_heads(tmp_path):
    cfg, io, weights = load_case(parity_dir() / "text_encoder")
    ref = tmp_path / "ref"
    ref.mkdir()
    save_file({"text_encoder." + k: v for k, v in weights.items()},
              str(ref / "text_encoder.safetensors"))
    rc, _, err = _convert("to-flax", ref, tmp_path / "t.safetensors")
    assert rc == 2 and "n_heads" in err and "--config" in err, err
    rc, _, err = _convert("to-flax", ref, tmp_path / "t.safetensors",
                          "--config", _config_file(tmp_path))
    assert rc == 0, err
    variables, config = interop.load_flax_params(tmp_path / "t.safetensors")["text_encoder"]
    assert config["n_heads"] == cfg["kwargs"]["distilbert"]["n_heads"]
    out = BertTextEncoder(**config).apply(variables, jnp.asarray(io["input_ids"]),
                                          jnp.asarray(io["attention_mask"]))
    assert_close_ref(out, io["out"], "text encoder converted with --config")


def test_flow_heads_without_inv_freq_are_asked_for():
    _, _, weights = load_case(parity_dir() / "pipeline")
    flow = {k[len("flow_processor."):]: v for k, v in weights.items()
            if k.startswith("flow_processor.") and not k.endswith("rotary_pe.inv_freq")}
    with pytest.raises(InteropError, match=r"head count cannot be read.*model.flow_heads"):
        infer_flow_config(flow)
    assert infer_flow_config(flow, overrides={"n_head": 4})["n_head"] == 4
    with_buffers = {k[len("flow_processor."):]: v for k, v in weights.items()
                    if k.startswith("flow_processor.")}
    assert infer_flow_config(with_buffers)["n_head"] == 4  # read from the inv_freq length


def test_config_file_gives_the_head_counts():
    model = load_model_section(str(ROOT / "configs" / "phase1.py"))
    got = interop.overrides_from_model_config(model)
    assert got["compressor"]["attn_heads"] == model.vae_attn_heads
    assert got["flow"]["n_head"] == model.flow_heads
    assert got["text_encoder"]["n_heads"] == model.text.n_heads
    assert got["flow"]["ctx_tokens"] == got["expander"]["ctx_tokens"] == model.downscales
    with pytest.raises(FileNotFoundError, match="--config"):
        load_model_section("configs/nope.py")


def _write_hf_dir(path: Path, weights: dict, distilbert: dict, tokenizer: bool) -> None:
    """A HF DistilBertModel directory (HF key names and config.json) from the fixture."""
    path.mkdir()
    lm = "language_model."
    save_file({"distilbert." + k[len(lm):]: v for k, v in weights.items() if k.startswith(lm)},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "distilbert", "architectures": ["DistilBertForMaskedLM"],
        "activation": "gelu", "dropout": 0.1, "attention_dropout": 0.1, "pad_token_id": 0,
        **distilbert}))
    if tokenizer:
        for f in DEMO_TOKENIZER_DIR.iterdir():
            shutil.copy(f, path / f.name)


def test_pretrained_dir_loads_the_reference_backbone(tmp_path):
    cfg, io, weights = load_case(parity_dir() / "text_encoder")
    d = tmp_path / "distilbert"
    _write_hf_dir(d, weights, cfg["kwargs"]["distilbert"], tokenizer=True)
    models = registry.build_models(MODEL, {"text_encoder"})
    fresh, _ = registry.init_params(models, jax.random.key(0), text_len=10)
    # The head is not part of DistilBERT: take the reference's, so the numbers can be compared.
    ref_vars, _ = text_from_torch(weights, {"embed_dim": 24, **cfg["kwargs"]["distilbert"]})
    params = {**fresh["text_encoder"], "head": ref_vars["params"]["head"]}
    ids, mask = jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"])
    before = models.text_encoder.apply({"params": params}, ids, mask)
    assert np.max(np.abs(np.asarray(before) - io["out"])) > 1e-2
    loaded = load_pretrained_text_encoder(d, MODEL, params)
    assert_close_ref(models.text_encoder.apply({"params": loaded}, ids, mask), io["out"],
                     "BertTextEncoder with the pretrained_dir backbone")
    np.testing.assert_array_equal(
        np.asarray(loaded["language_model"]["layer_1"]["ffn"]["lin1"]["kernel"]),
        weights["language_model.transformer.layer.1.ffn.lin1.weight"].T)  # as stored, no re-init
    # Its tokenizer comes from the same folder when the folder has one.
    assert pretrained_tokenizer_dir(d) == str(d)
    assert len(load_tokenizer(pretrained_tokenizer_dir(d))) == len(load_tokenizer(None))
    bare = tmp_path / "bare"
    _write_hf_dir(bare, weights, cfg["kwargs"]["distilbert"], tokenizer=False)
    assert pretrained_tokenizer_dir(bare) is None and pretrained_tokenizer_dir("") is None


def test_pretrained_dir_config_mismatch_is_one_line(tmp_path):
    cfg, _, weights = load_case(parity_dir() / "text_encoder")
    d = tmp_path / "distilbert"
    _write_hf_dir(d, weights, cfg["kwargs"]["distilbert"], tokenizer=False)
    params = {"language_model": {}, "head": {}}
    bad = {**MODEL, "text": {**MODEL["text"], "n_heads": 4}}
    with pytest.raises(InteropError) as e:
        load_pretrained_text_encoder(d, bad, params)
    assert str(e.value).count("\n") == 0
    assert "config.model.text.n_heads=4 but" in str(e.value)
    assert "has n_heads=2: set --config.model.text.n_heads=2" in str(e.value)
    bad = {**MODEL, "text": {**MODEL["text"], "vocab_size": 30522}}
    with pytest.raises(InteropError, match=r"vocab_size=30522 but .* config.tokenizer="):
        load_pretrained_text_encoder(d, bad, params)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained_text_encoder(tmp_path / "nowhere", MODEL, params)
