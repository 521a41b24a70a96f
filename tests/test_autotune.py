"""The autotuner: picks the fastest candidate, measures once per key, and never changes results."""

from __future__ import annotations

import time

import torch
from conftest import batch, tiny_model

from flora import AdapterModel, LoraConfig
from flora.kernels.autotune import Autotuner, token_bucket
from flora.methods.lora import LoraBank


def test_picks_the_fastest_and_measures_once_per_key():
    calls = {"slow": 0, "fast": 0}

    def candidate(name, pause):
        def run():
            calls[name] += 1
            time.sleep(pause)
            return torch.zeros(1)

        return run

    tuner = Autotuner(repeats=2)
    candidates = {"slow": candidate("slow", 0.01), "fast": candidate("fast", 0.0)}
    assert tuner.pick("k", candidates) == "fast"
    assert calls == {"slow": 3, "fast": 3}
    assert tuner.pick("k", candidates) == "fast"
    assert calls == {"slow": 3, "fast": 3}


def test_each_timed_call_finds_the_caches_cold(monkeypatch):
    """A layer timed alone would find its tables in cache, where in a forward the other layers have pushed
    them out: every timed call comes right after a read of the flush buffer (not the warm-up calls)."""
    events = []
    tuner = Autotuner(repeats=2, flush_bytes=4096)
    cold = tuner._cold
    monkeypatch.setattr(tuner, "_cold", lambda device: events.append("cold") or cold(device))
    candidates = {name: (lambda name=name: events.append(name) or torch.zeros(1)) for name in ("a", "b")}
    tuner.pick("k", candidates)
    assert events == ["a", "b", *(["cold", "a", "cold", "b"] * 2)]
    assert tuner._flush[torch.device("cpu")].numel() * 4 == 4096


def test_token_bucket():
    assert [token_bucket(n) for n in (1, 2, 3, 32, 33)] == [1, 2, 4, 32, 64]


def test_auto_records_one_choice_per_shape_and_equals_fixed_strategies():
    model = AdapterModel(tiny_model("llama"))
    for i in range(3):
        model.add_adapter(f"a{i}", LoraConfig(r=2 + i))
        with torch.no_grad():
            for key, parameter in model.adapter_parameters(f"a{i}").items():
                if "lora_B" in key:
                    parameter.normal_(0, 0.3)
    ids, mask = batch(rows=4)
    names = ["a0", "a1", None, "a2"]
    auto = model(ids, attention_mask=mask, adapter_names=names).logits
    choices = dict(model.runtime.tuner.choices)
    assert choices and set(choices.values()) <= set(LoraBank.strategies)
    model(ids, attention_mask=mask, adapter_names=names)
    assert model.runtime.tuner.choices == choices
    for strategy in LoraBank.strategies:
        model.strategy = strategy
        assert (model(ids, attention_mask=mask, adapter_names=names).logits - auto).abs().max() <= 1e-5


def test_one_lora_adapter_for_every_row_takes_segmented_without_measuring():
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("a", LoraConfig(r=2))
    model.add_adapter("b", LoraConfig(r=4))
    ids, mask = batch(rows=4)
    model(ids, attention_mask=mask, adapter_names=["a"] * 4)
    assert model.runtime.tuner.choices == {}  # nothing measured: two plain matmuls per group
    model(ids, attention_mask=mask, adapter_names=["a", "a", "a", None])  # a row without: measured
    assert set(model.runtime.tuner.choices.values()) <= set(LoraBank.strategies)
    assert model.runtime.tuner.choices
