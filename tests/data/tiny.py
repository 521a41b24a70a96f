"""Tiny tokenizers (trained on the fly with `tokenizers`) and tiny random Llama models for tests."""

from __future__ import annotations

from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from flora.data.suite import build_suite
from flora.data.templates import SNI_TEMPLATE

SPECIALS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}bot: {% endif %}"
)


@cache
def _trained(vocab_size: int) -> str:
    corpus = [SNI_TEMPLATE]
    suite = build_suite(seed=123, n_train=5, n_heldout=0)
    for task in suite.train:
        corpus.append(task.definition)
        corpus.extend(i.input + " " + i.references[0] for i in task.instances)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 400, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (left padding, pad/bos/eos tokens, a chat template)."""
    backend = Tokenizer.from_str(_trained(vocab_size))
    if add_bos:
        bos = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    tokenizer, seed: int = 0, dtype: torch.dtype = torch.float64, initializer_range: float = 0.02
) -> LlamaForCausalLM:
    """A tiny random Llama for ``tokenizer`` (float64 by default: no near-ties from rounding).
    A larger ``initializer_range`` makes a model whose output adapters can move in a few steps."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=initializer_range, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
