"""Shared fixtures: tiny random transformers models (a few hundred KB, built from a config)."""

from __future__ import annotations

import pytest
import torch
from data.tiny import tiny_llama, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 97


def tiny_model(arch: str, seed: int = 0):
    """A tiny random causal LM of architecture ``arch`` ('llama', 'gpt2' or 'qwen2'), in eval mode."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        model = GPT2LMHeadModel(config)
    elif arch == "qwen2":
        config = Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )  # fmt: skip
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(arch)
    return model.eval()


# Per architecture: (LoRA targets of adapter a, LoRA targets of adapter b, IA3 targets, IA3 feed-forward).
_LLAMA_LIKE = (
    ["q_proj", "v_proj", "down_proj"],
    ["k_proj", "o_proj", "gate_proj", "up_proj"],
    ["k_proj", "v_proj", "down_proj"],
    ["down_proj"],
)
TARGETS = {
    "llama": _LLAMA_LIKE,
    "gpt2": (["c_attn"], ["c_attn", "c_proj", "c_fc"], ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "qwen2": _LLAMA_LIKE,
}

ARCHS = list(TARGETS)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def batch(rows: int = 6, length: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an attention mask with left padding on some rows."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(0, rows, 3):
        mask[row, : row % 4 + 1] = 0
    return ids, mask


def adam_losses(model, ids, mask, labels, names, lr: float, steps: int) -> list[float]:
    """The loss before each of ``steps`` Adam steps on the adapters that ``names`` (one per row) use."""
    parameters = [p for name in dict.fromkeys(names) for p in model.adapter_parameters(name).values()]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels, adapter_names=list(names)).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny random Llama saved as a model directory (weights and tokenizer), with weights large
    enough (init std 0.2) for every method to move its output."""
    directory = tmp_path_factory.mktemp("tiny-model")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, dtype=torch.float32, initializer_range=0.2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
