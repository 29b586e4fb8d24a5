"""``model.text.pretrained_dir`` through the entry point: a stage starts its text encoder from a
local Hugging Face DistilBERT folder (written here from the reference's fixture), keeps the weights
as stored (the reference re-initialised them, REFERENCE.md §10), and its export carries them."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from parity_utils import load_case, parity_dir
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_interop_settings import _write_hf_dir  # noqa: E402
from test_pipeline import ROOT, _run  # noqa: E402

pytestmark = pytest.mark.xdist_group("cached")


def test_stage_text_encoder_starts_from_the_pretrained_folder(tmp_path):
    cfg, _, weights = load_case(parity_dir() / "text_encoder")
    hf = tmp_path / "distilbert"
    _write_hf_dir(hf, weights, cfg["kwargs"]["distilbert"], tokenizer=False)
    d = cfg["kwargs"]["distilbert"]
    conf = tmp_path / "cfg.py"
    conf.write_text(textwrap.dedent(f"""\
        import importlib.util
        spec = importlib.util.spec_from_file_location("demo", {str(ROOT / 'configs/demo.py')!r})
        demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(demo)

        def get_config(arg=""):
            c = demo.get_config("test")
            c.model.text.update(vocab_size={d['vocab_size']}, dim={d['dim']},
                                n_layers={d['n_layers']}, n_heads={d['n_heads']},
                                hidden_dim={d['hidden_dim']},
                                max_position_embeddings={d['max_position_embeddings']},
                                pretrained_dir={str(hf)!r})
            c.stage_order = ("flow",)
            c.stages.flow.train = ("flow",)   # the text encoder stays frozen
            c.stages.flow.optimizers = {{"flow": c.stages.flow.optimizers.flow.to_dict()}}
            c.stages.flow.steps = 2
            c.stages.flow.schedulers.flow.warmup_steps = 1
            c.samples.enabled = False
            return c
        """))
    p = _run(tmp_path / "w", config=str(conf))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"text encoder backbone from {hf}" in p.stdout
    exported = load_file(str(tmp_path / "w" / "export" / "flow" / "text_encoder.safetensors"))
    backbone = {k: v for k, v in weights.items() if k.startswith("language_model.")}
    assert backbone and all("text_encoder." + k in exported for k in backbone)
    for k, v in backbone.items():  # bit for bit: loaded as stored, frozen, exported
        np.testing.assert_array_equal(exported["text_encoder." + k], v, err_msg=k)
