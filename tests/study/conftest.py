"""Fixtures of the study tests: a tiny random Llama saved as a model directory."""

from __future__ import annotations

import pytest
import torch
from data.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tiny-study-model")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, dtype=torch.float32, initializer_range=0.2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
