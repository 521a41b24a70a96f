"""Fixtures of the server tests (helpers: `serve.support`)."""

from __future__ import annotations

import pytest
from data.tiny import tiny_llama, tiny_tokenizer
from openai import OpenAI

from flora import AdapterModel
from serve.support import ADAPTERS, MAX_MODEL_LEN, LiveServer, Reference, save_adapters


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("served")
    save_adapters(tokenizer, directory, ADAPTERS)
    return directory


@pytest.fixture(scope="session")
def reference(tokenizer):
    return Reference(tokenizer)


@pytest.fixture(scope="module")
def server(tokenizer, adapter_dir, tmp_path_factory):
    """Runtime adapter loading on, from the adapter dir and every test's temporary directory."""
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(adapter_dir),
                      max_model_len=MAX_MODEL_LEN, max_num_seqs=8, enable_runtime_lora_updating=True,
                      allowed_adapter_paths=[str(tmp_path_factory.getbasetemp())])  # fmt: skip
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
