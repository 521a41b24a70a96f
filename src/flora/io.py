"""Adapter files in Hugging Face PEFT's format, read and written; pickle is never read.

A directory holds ``adapter_config.json`` (the method's config, PEFT's field names and
``peft_type``) and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module name>.<tensor>``, e.g. ``...layers.0.self_attn.q_proj.lora_A.weight``:
the adapter name is not part of the key, as PEFT saves it. Files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file
from torch import Tensor

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterFiles:
    """A PEFT adapter directory as found on disk, its tensors not read yet: the config and each tensor's
    shape and dtype, from the safetensors header (which safetensors checks against the file's size)."""

    directory: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def weights_file(self) -> Path:
        return self.directory / WEIGHTS_NAME

    def nbytes(self, element_size: int) -> int:
        """Bytes of the tensors at ``element_size`` bytes an element."""
        return sum(math.prod(shape) for shape in self.shapes.values()) * element_size

    def read(self) -> dict[str, Tensor]:
        """The tensors, read in one go and then parsed: 0.885x the time of `safetensors.torch.load_file`'s
        tensor-by-tensor reads (420 tensors for LoRA on every layer of SmolLM2: 3.7 against 4.2 ms,
        `benchmarks/adapter_read.py`), time that mostly holds the GIL a server's engine thread waits
        for. By key, as `load_file` gives them."""
        try:
            tensors = load(self.weights_file.read_bytes())
            return {key: tensors[key] for key in sorted(tensors)}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{self.weights_file}: not a readable safetensors file ({err})") from None


def inspect_adapter_dir(path: str | os.PathLike) -> AdapterFiles:
    """The config and the tensor shapes of a PEFT adapter directory, validated as files (a pickle-only
    directory, a config that is not a JSON object with a ``peft_type``, a safetensors file that is
    not one or does not hold all its tensors: `ValueError`; missing files: `FileNotFoundError`)."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (expected a Hugging Face PEFT adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{config_file}: expected a JSON object with a 'peft_type' field")
    weights_file = directory / WEIGHTS_NAME
    if not weights_file.is_file():
        pickles = [name for name in PICKLE_NAMES if (directory / name).is_file()]
        if pickles:
            raise ValueError(
                f"{directory}: holds {pickles[0]}, a pickle file, which flora refuses to load (unpickling "
                f"can run arbitrary code); convert it to {WEIGHTS_NAME} where you trust it"
            )
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
    try:
        with safe_open(weights_file, framework="pt") as header:
            slices = {key: header.get_slice(key) for key in header.keys()}  # noqa: SIM118  (not a dict)
            shapes = {key: tuple(piece.get_shape()) for key, piece in slices.items()}
            dtypes = {key: piece.get_dtype() for key, piece in slices.items()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_file}: not a readable safetensors file ({err})") from None
    return AdapterFiles(directory, config, shapes, dtypes)


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config dict, tensors)`` of a PEFT adapter directory, validated as files (`inspect_adapter_dir`)."""
    files = inspect_adapter_dir(path)
    return files.config, files.read()


def split_key(key: str, param_names: tuple[str, ...], source: str) -> tuple[str, str]:
    """``"base_model.model.m.q_proj.lora_A.weight" -> ("m.q_proj", "lora_A.weight")``."""
    body = key.removeprefix(KEY_PREFIX)
    for param in param_names:
        if body.endswith("." + param):
            return body[: -len(param) - 1], param
    raise ValueError(f"{source}: unexpected tensor {key!r} (expected names ending in one of {param_names})")


def write_adapter_dir(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``path``, each atomically."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(
        directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True))
    )
    return directory


def atomic_write(target: Path, write) -> None:
    """Call ``write(temporary path)`` beside ``target``, then rename it over ``target``; the file gets
    the permissions of any new file (``0o666`` less the umask), not the temporary file's ``0o600``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
