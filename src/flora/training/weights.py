"""What a training checkpoint holds, and its weights written and read back.

A `FloraTrainer` checkpoint holds each adapter in PEFT format (``adapters/<name>/``), or the base
model for full fine-tuning (``save_pretrained`` files), never the frozen base weights. Owns the
writing of those weights (`save_adapters`, `save_full_model`, `save_checkpoint_weights`) and their
loading back into a model in place (`load_checkpoint_weights`, `load_adapter_weights`,
`load_model_weights`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from flora.io import KEY_PREFIX, read_adapter_dir
from flora.model import AdapterModel
from flora.training.outputs import ADAPTERS_DIR


def save_adapters(model: AdapterModel, names: Iterable[str], directory: str | os.PathLike) -> dict[str, Path]:
    """Save each adapter of ``names`` to ``<directory>/adapters/<name>/``; ``{name: its directory}``."""
    return {name: model.save_adapter(name, Path(directory) / ADAPTERS_DIR / name) for name in names}


def save_full_model(model: AdapterModel, directory: str | os.PathLike) -> None:
    """Save the base model (and its tokenizer) with ``save_pretrained`` (full fine-tuning)."""
    model.base_model.save_pretrained(directory)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)


def save_checkpoint_weights(model: AdapterModel, directory: str | os.PathLike, full: bool = False) -> None:
    """Write what a checkpoint holds into ``directory``: every adapter, or the base model (``full``)."""
    os.makedirs(directory, exist_ok=True)
    if full:
        save_full_model(model, directory)
    else:
        save_adapters(model, model.list_adapters(), directory)


def load_checkpoint_weights(model: AdapterModel, checkpoint: str | os.PathLike, full: bool = False) -> None:
    """Load what a `FloraTrainer` checkpoint holds (every adapter, or the base model) into ``model``."""
    if full:
        load_model_weights(model.base_model, Path(checkpoint))
        return
    for name in model.list_adapters():
        load_adapter_weights(model, name, Path(checkpoint) / ADAPTERS_DIR / name)


def load_adapter_weights(model: AdapterModel, name: str, directory: Path) -> None:
    """Copy the tensors of a saved adapter directory into adapter ``name``'s parameters, in place."""
    _, tensors = read_adapter_dir(directory)
    params = model.adapter_parameters(name)
    stored = {key.removeprefix(KEY_PREFIX): tensor for key, tensor in tensors.items()}
    if set(stored) != set(params):
        raise ValueError(f"checkpoint adapter {directory} does not match adapter {name!r} of this run "
                         f"({len(stored)} tensors there, {len(params)} here)")  # fmt: skip
    with torch.no_grad():
        for key, parameter in params.items():
            if stored[key].shape != parameter.shape:
                raise ValueError(f"{directory}: {key} has shape {tuple(stored[key].shape)}, the adapter "
                                 f"{tuple(parameter.shape)}")  # fmt: skip
            parameter.copy_(stored[key])


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load the safetensors weights written by ``save_pretrained`` (one file or shards) into ``model``."""
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors (expected a full fine-tuning checkpoint)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and "lm_head" not in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: weights do not match the model (missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]})")  # fmt: skip
