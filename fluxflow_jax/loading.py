"""Trained models for inference: from a workdir, an export folder or reference checkpoint files.

Used by ``python -m fluxflow_jax.generate`` and ``python -m fluxflow_jax.evaluate``. Every file
carries what is needed to rebuild its modules: our param files and exports store the module
configs in safetensors metadata (``interop``); a bare reference checkpoint has its config inferred
from tensor shapes, and then the flow model's ``ctx_tokens`` is set to the compressor's
``downscales``, as the reference's ``FluxPipeline`` does (DESIGN.md). The tokenizer and sampling
defaults come from the run's ``config.json`` when the weights belong to a workdir (an export folder
inside ``W/export/`` counts), otherwise from the caller.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import safe_open

from fluxflow_jax import data as data_lib
from fluxflow_jax import interop, stages
from fluxflow_jax import workdir as wd
from fluxflow_jax.models.discriminator import PatchDiscriminator
from fluxflow_jax.models.flow import FluxFlowProcessor
from fluxflow_jax.models.registry import ModelSet
from fluxflow_jax.models.text import BertTextEncoder
from fluxflow_jax.models.vae import FluxCompressor, FluxExpander

MODULES = {"compressor": FluxCompressor, "expander": FluxExpander, "flow": FluxFlowProcessor,
           "text_encoder": BertTextEncoder, "discriminator": PatchDiscriminator}
WEIGHTS = ("auto", "ema", "raw")


class UserError(ValueError):
    """A mistake in what the user asked for; the message names the flag or file and the fix."""


@dataclasses.dataclass
class Loaded:
    """Modules, their params, and where they came from."""

    models: ModelSet
    params: dict
    source: str
    weights: str                      # 'ema' or 'raw' (reference files: 'raw')
    run_config: dict | None = None    # the workdir's config.json, when known
    stage: str | None = None

    def use_context(self) -> bool:
        """Decode with SPADE context? Only when the run trained the expander with it; files from
        outside a workdir: yes (the reference always decodes with it)."""
        if not self.run_config or not self.stage:
            return True
        return stages.spade_trained(self.run_config, self.stage)

    def stage_config(self) -> dict:
        """The stage's config section ({} outside a workdir)."""
        if not self.run_config or not self.stage:
            return {}
        return dict(self.run_config["stages"].get(self.stage, {}))


def read_run_config(workdir: Path) -> dict:
    p = Path(workdir) / "config.json"
    if not p.is_file():
        raise UserError(f"--workdir {workdir}: no config.json (is it a fluxflow_jax workdir?)")
    return json.loads(p.read_text())


def _workdir_of_export(folder: Path) -> tuple[Path, str] | None:
    """``(W, stage)`` when ``folder`` is ``W/export/<stage>`` or ``W/export/<stage>/ema``."""
    folder = folder.resolve()
    for stage_dir in (folder, folder.parent):
        w = stage_dir.parent.parent
        if stage_dir.parent.name == "export" and (w / "config.json").is_file():
            return w, stage_dir.name
    return None


def _has_stored_configs(files: Iterable[Path]) -> bool:
    for f in files:
        with safe_open(str(f), "np") as h:
            if interop.CONFIG_META in (h.metadata() or {}):
                return True
    return False


def _build(found: Mapping[str, tuple[dict, dict]]) -> tuple[ModelSet, dict]:
    mods, params = {}, {}
    for name, (variables, cfg) in found.items():
        mods[name] = MODULES[name](**dict(cfg))
        params[name] = jax.tree.map(jnp.asarray, variables["params"])
    return ModelSet(**mods), params


def _check_needed(found: Mapping, needed: set[str], where: str, flag: str) -> None:
    missing = sorted(needed - set(found))
    if missing:
        raise UserError(f"{flag} {where}: no weights for {missing} (has {sorted(found)}); "
                        "pass weights of a stage or checkpoint that trained them")


def _param_file_models(path: Path) -> set[str]:
    """Model names a param file of ours holds (from its metadata; no tensor is read)."""
    return set(interop.param_file_configs(path))


def _pick_stage(workdir: Path, config: Mapping, needed: set[str], stage: str | None) -> str:
    finished = wd.read_pipeline_state(workdir).get("finished", [])
    order = list(config["stage_order"])
    if stage is not None:
        if stage not in order:
            raise UserError(f"--stage {stage!r} is not a stage of {workdir} ({order})")
        if stage not in finished:
            raise UserError(f"--stage {stage!r} has not finished; export its latest checkpoint "
                            f"with python -m fluxflow_jax.export --workdir {workdir} --stage "
                            f"{stage} and pass --export {workdir}/export/{stage}")
        return stage
    for name in reversed(order):
        p = wd.stage_params_path(workdir, name)
        if name in finished and p.is_file() and needed <= _param_file_models(p):
            return name
    raise UserError(f"--workdir {workdir}: no finished stage has weights for {sorted(needed)} "
                    f"(finished: {finished}); train further or pass --stage")


def load(*, workdir: str | Path | None = None, stage: str | None = None,
         export: str | Path | None = None, checkpoint: Sequence[str | Path] = (),
         weights: str = "auto", needed: Iterable[str] = ()) -> Loaded:
    """Load the models in ``needed`` (and any others the files hold) from exactly one source.

    ``weights``: 'ema' (error when the run kept none), 'raw', or 'auto' (EMA where present).
    """
    needed = set(needed)
    if weights not in WEIGHTS:
        raise UserError(f"--weights must be one of {WEIGHTS}, got {weights!r}")
    given = [x for x in (workdir, export, list(checkpoint) or None) if x]
    if len(given) != 1:
        raise UserError("give exactly one of --workdir, --export or --checkpoint")
    if workdir:
        workdir = Path(workdir)
        config = read_run_config(workdir)
        stage = _pick_stage(workdir, config, needed, stage)
        ema_dir = workdir / "export" / stage / "ema"
        if weights == "ema" and not ema_dir.is_dir():
            raise UserError(f"--weights ema: stage {stage!r} kept no EMA weights ({ema_dir} "
                            "missing); use --weights raw")
        if weights != "raw" and ema_dir.is_dir():
            found, used, src = interop.load_reference(ema_dir), "ema", ema_dir
        else:
            src = wd.stage_params_path(workdir, stage)
            found, used = interop.load_flax_params(src), "raw"
        _check_needed(found, needed, str(src), "--workdir")
        models, params = _build(found)
        return Loaded(models, params, str(src), used, config, stage)
    if export:
        folder = Path(export)
        if not folder.is_dir():
            raise UserError(f"--export {folder}: not a directory (give an export folder such as "
                            "W/export/<stage>, or reference files with --checkpoint)")
        files = interop.reference_files(folder)
        inside = _workdir_of_export(folder)
        config, stage_name = (read_run_config(inside[0]), inside[1]) if inside else (None, None)
        used = "ema" if folder.name == "ema" else "raw"
    else:
        files = [Path(f) for f in checkpoint]
        for f in files:
            if not f.is_file():
                raise UserError(f"--checkpoint {f}: file not found")
        config, stage_name, used = None, None, "raw"
    found: dict = {}
    for f in files:
        found.update(interop.load_reference(f))
    if not _has_stored_configs(files) and "compressor" in found:
        ds = int(found["compressor"][1]["downscales"])
        for name in ("flow", "expander"):
            if name in found:
                found[name] = (found[name][0], {**found[name][1], "ctx_tokens": ds})
    where = str(export) if export else ", ".join(map(str, files))
    _check_needed(found, needed, where, "--export" if export else "--checkpoint")
    models, params = _build(found)
    return Loaded(models, params, where, used, config, stage_name)


def load_tokenizer(loaded: Loaded, flag_value: str | None) -> Any:
    """The run's tokenizer (``config.json`` ``tokenizer``; 'demo' = embedded), else the
    ``--tokenizer`` value, else the demo tokenizer; checked against the text encoder's
    vocabulary."""
    value = flag_value or (loaded.run_config or {}).get("tokenizer") or "demo"
    try:
        tok = data_lib.load_tokenizer(value)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--tokenizer: {e}") from None
    te = loaded.models.text_encoder
    if te is not None and len(tok) > te.vocab_size:
        raise UserError(f"--tokenizer {value!r} has {len(tok)} tokens but the text encoder's "
                        f"vocabulary is {te.vocab_size}; pass --tokenizer DIR with the tokenizer "
                        "the model was trained with")
    if te is not None and len(tok) != te.vocab_size and not flag_value and not loaded.run_config:
        raise UserError(f"the text encoder's vocabulary ({te.vocab_size}) is not the demo "
                        f"tokenizer's ({len(tok)}): pass --tokenizer DIR (a local HF tokenizer)")
    return tok


def max_length(loaded: Loaded, flag_value: int | None) -> int:
    """Token sequence length: the flag, the run's ``max_length``, else min(128, positions)."""
    if flag_value:
        return int(flag_value)
    if loaded.run_config:
        return int(loaded.run_config["max_length"])
    te = loaded.models.text_encoder
    return min(128, te.max_position_embeddings) if te is not None else 128


def dataset_config(loaded: Loaded) -> dict | None:
    """The resolved config of the stage's dataset (None outside a workdir)."""
    c = loaded.run_config
    if not c:
        return None
    name = loaded.stage_config().get("dataset") or c.get("default_dataset")
    if not name or name not in c.get("datasets", {}):
        return None
    return data_lib.resolve_dataset_config(c["datasets"][name], f"datasets.{name}")
