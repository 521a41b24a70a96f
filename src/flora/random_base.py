"""Base models without weights, for benchmarks where the model package cannot be installed (a lent GPU).

``random:NAME`` is the architecture of a known model (`ARCHITECTURES`: its config as a small dict)
with weights drawn at random from a fixed seed, and a byte-level tokenizer (the 256 bytes and three
special tokens: no vocabulary file to ship). A forward of such a model costs what the real one's
does, so every speed figure holds; its tokens mean nothing. `flora.base.load_base` takes the name
anywhere a model is named (``--model random:smollm2-135m``): the first use writes a directory with
the config, the tokenizer and `MARKER` (the seed) under flora's cache, and loading builds the model
from the config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2TokenizerFast, PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

PREFIX = "random:"
MARKER = "random_weights.json"  # in a random model's directory: the seed its weights are drawn from
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2: padding, start, end of sequence
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAMA = {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": True,
          "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}  # fmt: skip
ARCHITECTURES: dict[str, dict[str, object]] = {
    # SmolLM2-135M-Instruct (HuggingFaceTB/SmolLM2-135M-Instruct), the model `smollm2-135m` converts.
    "smollm2-135m": {**_LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_parameters": {"rope_theta": 100000.0,
                                                                          "rope_type": "default"}},
    # Llama-3.2-1B's shape (its llama3 rope scaling left out: it changes no cost).
    "llama-1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                 "max_position_embeddings": 131072, "rope_parameters": {"rope_theta": 500000.0,
                                                                        "rope_type": "default"}},
    # For tests: a few hundred kilobytes.
    "tiny": {**_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 512},
}  # fmt: skip


def is_random(name: str | os.PathLike) -> bool:
    return str(name).startswith(PREFIX)


def random_model_dir(name: str, root: Path, seed: int = 0) -> Path:
    """The directory of ``random:NAME`` under ``root`` (config, tokenizer, `MARKER`), written on first use;
    it appears atomically (written beside, then renamed)."""
    architecture = name.removeprefix(PREFIX)
    if architecture not in ARCHITECTURES:
        raise FileNotFoundError(
            f"model {name!r}: no architecture {architecture!r} for random weights (expected one of "
            f"{', '.join(PREFIX + known for known in ARCHITECTURES)})"
        )
    target = root / f"random-{architecture}"
    if (target / MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        AutoConfig.for_model(**ARCHITECTURES[architecture]).save_pretrained(staging)
        byte_tokenizer().save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"seed": seed, "architecture": architecture}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def random_weights_seed(directory: Path) -> int | None:
    """The seed of a random model's directory; ``None`` for a directory with weights."""
    marker = directory / MARKER
    return json.loads(marker.read_text())["seed"] if marker.is_file() else None


def build_random(directory: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The model of ``directory``'s config with weights drawn from its seed (the global generator is left as it was)."""
    config = AutoConfig.from_pretrained(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_weights_seed(directory))
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def byte_tokenizer() -> GPT2TokenizerFast:
    """A byte-level tokenizer: `SPECIALS`, then one token per byte (GPT-2's files: a vocabulary of
    GPT-2's byte alphabet, no merges)."""
    vocabulary = {token: i for i, token in enumerate(SPECIALS)}
    vocabulary.update({char: len(SPECIALS) + i for i, char in enumerate(bytes_to_unicode().values())})
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "vocab.json").write_text(json.dumps(vocabulary))
        (Path(scratch) / "merges.txt").write_text("#version: 0.2\n")
        return GPT2TokenizerFast(str(Path(scratch) / "vocab.json"), str(Path(scratch) / "merges.txt"),
                                 unk_token=SPECIALS[0], pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                 eos_token=SPECIALS[2], chat_template=CHAT_TEMPLATE)  # fmt: skip
