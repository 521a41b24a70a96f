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


def _never(name):
    def run():
        raise AssertionError(f"{name} measured again")

    return run


def test_a_tuner_with_a_path_keeps_its_choices_for_the_next_process(tmp_path):
    path = tmp_path / "autotune" / "machine.json"
    key = ("lora", (8, 16, 4), 1, 1, 4, 4, "cpu", torch.float32, False)
    first = Autotuner(repeats=1, path=path)
    assert (
        first.pick(key, {"slow": lambda: time.sleep(0.01) or torch.zeros(1), "fast": lambda: torch.zeros(1)}) == "fast"
    )
    later = Autotuner(repeats=1, path=path)  # a server restarted
    assert later.known(key) == "fast"
    assert later.pick(key, {"slow": _never("slow"), "fast": _never("fast")}) == "fast"
    # a choice this version no longer offers is measured again, not used
    assert later.pick(key, {"bmm": lambda: torch.zeros(1)}) == "bmm"


def test_two_tuners_on_one_file_keep_each_others_choices(tmp_path):
    """Replicas on one machine share the file: one's write does not drop what the other wrote."""
    path = tmp_path / "machine.json"
    one, other = Autotuner(repeats=1, path=path), Autotuner(repeats=1, path=path)
    one.pick("k1", {"a": lambda: torch.zeros(1)})
    other.pick("k2", {"b": lambda: torch.zeros(1)})
    assert Autotuner(path=path)._saved == {repr("k1"): "a", repr("k2"): "b"}


def test_a_cache_file_that_is_not_a_tuners_is_measured_over_with_a_warning(tmp_path, caplog):
    path = tmp_path / "machine.json"
    for content in ("not json {", '["a list"]', '{"k": 3}'):
        path.write_text(content)
        tuner = Autotuner(repeats=1, path=path)
        assert tuner.pick("k", {"a": lambda: torch.zeros(1)}) == "a"
        assert "autotune cache" in caplog.text and "measuring again" in caplog.text
        assert Autotuner(path=path)._saved == {repr("k"): "a"}
        caplog.clear()


def test_a_model_restarted_on_a_tuners_file_measures_nothing_and_computes_the_same(tmp_path, monkeypatch):
    path = tmp_path / "machine.json"
    ids, mask = batch(rows=4)
    names = ["a0", "a1", None, "a0"]
    logits = []
    for run in range(2):
        model = AdapterModel(tiny_model("llama"))
        torch.manual_seed(0)
        for i in range(2):
            model.add_adapter(f"a{i}", LoraConfig(r=2 + i))
            with torch.no_grad():
                for parameter in model.adapter_parameters(f"a{i}").values():
                    parameter.normal_(0, 0.3)
        model.runtime.tuner = Autotuner(path=path)
        if run == 1:
            monkeypatch.setattr(Autotuner, "_cold", lambda self, device: _never("a strategy")())
        logits.append(model(ids, attention_mask=mask, adapter_names=names).logits)
        assert model.runtime.tuner.choices
    assert torch.equal(logits[0], logits[1])
