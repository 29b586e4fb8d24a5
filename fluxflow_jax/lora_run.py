"""A LoRA stage's run pieces: its adapters in the state, DOP captions, sampling and outputs.

A stage with ``'lora'`` in ``train`` keeps its adapters as ``params['flow_lora']`` (so Orbax
checkpoints them with their optimizer state, and resume, SIGTERM and the file controls behave as
in any stage - the loop is ``train.train_stage``). Its outputs: the usual param file and export of
the (unchanged) base, ``W/export/<stage>/lora.safetensors`` (``lora_io``) and, with
``lora.export_merged``, ``W/export/<stage>/merged/`` - base + adapter in the reference layout.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fluxflow_jax import data as data_lib
from fluxflow_jax import interop, lora, lora_io, weights
from fluxflow_jax import workdir as wd
from fluxflow_jax.sharding import to_host
from fluxflow_jax.state import TrainState


def stage_lora(stage_cfg: Mapping) -> dict | None:
    """The stage's ``lora`` settings (defaults filled), or None for a stage without adapters."""
    if "lora" not in tuple(stage_cfg["train"]):
        return None
    block = stage_cfg.get("lora")
    return lora.settings(block.to_dict() if hasattr(block, "to_dict") else dict(block or {}))


def add_adapters(stage_cfg: Mapping, params: Mapping, rng: jax.Array) -> dict:
    """``params`` plus fresh ``flow_lora`` adapters when the stage trains them (B = 0)."""
    cfg = stage_lora(stage_cfg)
    if cfg is None:
        return dict(params)
    key = jax.random.fold_in(rng, 20_000)
    return {**params, "flow_lora": lora.init_adapters(params["flow"], int(cfg["rank"]),
                                                      cfg["target_layers"], key)}


def sampling_view(params: Mapping, cfg: Mapping | None) -> dict:
    """Weights to sample/evaluate with: the flow model with the adapters merged in."""
    if cfg is None or "flow_lora" not in params:
        return dict(params)
    out = {k: v for k, v in params.items() if k != "flow_lora"}
    out["flow"] = lora.merge(params["flow"], params["flow_lora"],
                             lora.scale(cfg["rank"], cfg["alpha"]))
    return out


def class_prompts(ids: np.ndarray, mask: np.ndarray, tokenizer: Any, trigger: str,
                  class_word: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the same captions with the trigger replaced by the class word (decode,
    replace whole words, tokenize again: exact for any tokenizer that round-trips its text)."""
    texts = [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
             for row, mrow in zip(np.asarray(ids), np.asarray(mask))]
    return data_lib.tokenize(tokenizer, [lora.swap_word(t, trigger, class_word) for t in texts],
                             max_length)


class ClassPromptLoader:
    """A loader whose batches also carry ``dop_input_ids`` / ``dop_attention_mask`` (the DOP
    captions); everything else (state, stats, close, epoch_length) is the wrapped loader's."""

    def __init__(self, loader: Any, tokenizer: Any, trigger: str, class_word: str,
                 max_length: int):
        self._loader, self._tok = loader, tokenizer
        self._words, self._max_length = (trigger, class_word), int(max_length)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self._loader))
        ids, mask = class_prompts(batch["input_ids"], batch["attention_mask"], self._tok,
                                  *self._words, self._max_length)
        batch["dop_input_ids"], batch["dop_attention_mask"] = ids, mask
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def wrap_loader(stage_cfg: Mapping, loader: Any, tokenizer: Any, max_length: int) -> Any:
    """The stage's loader, with DOP captions when the stage runs DOP."""
    cfg = stage_lora(stage_cfg)
    if loader is None or cfg is None or float(cfg["dop_multiplier"]) <= 0:
        return loader
    return ClassPromptLoader(loader, tokenizer, str(cfg["trigger"]).strip(),
                             str(cfg["class_word"]).strip(), max_length)


def adapter_meta(cfg: Mapping) -> dict:
    """What the adapter file's metadata records."""
    return {k: cfg[k] for k in lora_io.META_KEYS}


def save_outputs(workdir: Path, stage: str, models: Any, state: TrainState, carried: Mapping,
                 cfg: Mapping) -> list[Path]:
    """``W/export/<stage>/lora.safetensors`` (EMA adapters where kept: what samples showed) and,
    with ``export_merged``, the merged reference-layout export in ``W/export/<stage>/merged``."""
    params = to_host({**state.params, **state.ema})  # every host gathers (fsdp over hosts)
    if jax.process_index() != 0:
        return []
    out = wd.export_dir(workdir, stage)
    written = [lora_io.save_adapter(out / lora_io.ADAPTER_FILE, params["flow_lora"],
                                    adapter_meta(cfg))]
    if cfg["export_merged"]:
        merged = state.replace(params=sampling_view(params, cfg), ema={})
        written += interop.export_reference(
            out / "merged", weights.models_for_export(models, merged, carried))
    return written
