"""Every method of the study through the same `flora.train` loop on a tiny model: the loss falls on
a small task, and what is saved loads back (flora or transformers) with identical outputs."""

from __future__ import annotations

import pytest
import torch
from test_train import log_records, quick
from transformers import AutoModelForCausalLM

from flora import AdapterModel
from flora.training import method_names, train

SETTINGS = {
    "lora": {"r": 4},
    "flora": {"r": 2},
    "ia3": {"target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "bitfit": {},
    "bottleneck": {"size": 8},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "full": {},
}
LEARNING_RATES = {"full": 3e-3, "prompt_tuning": 1e-1, "prefix_tuning": 1e-1}


def test_every_method_is_covered():
    assert sorted(SETTINGS) == sorted(method_names())


@pytest.mark.parametrize("method", list(SETTINGS))
def test_method_trains_saves_and_loads_back(method, tiny_dir, tmp_path):
    out = tmp_path / method
    result = train(**quick(tiny_dir, out, method=method, settings=SETTINGS[method], tasks=["reverse_words"],
                           suite_train=4, max_steps=30, batch_size=4, save_steps=0, warmup_ratio=0.0,
                           learning_rate=LEARNING_RATES.get(method, 1e-2)))  # fmt: skip
    losses = [record["loss"] for record in log_records(out)]
    assert len(losses) == 30
    assert sum(losses[-4:]) / 4 < 0.97 * sum(losses[:4]) / 4, losses  # memorising 4 examples

    trained = result.model.eval()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7], [8, 8, 31, 2, 40, 11]])
    with torch.no_grad():
        if method == "full":
            expected = trained.base_model(ids).logits if isinstance(trained, AdapterModel) else trained(ids).logits
            loaded = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)(ids).logits
        else:
            (name,) = result.adapters
            expected = trained(ids, adapter_names=[name, name]).logits
            fresh = AdapterModel.from_pretrained(tiny_dir)
            fresh.load_adapter(result.adapters[name], adapter_name=name)
            loaded = fresh(ids, adapter_names=[name, name]).logits
            bare = fresh(ids, adapter_names=[None, None]).logits
            assert not torch.allclose(bare, loaded, atol=1e-4)  # training moved the adapter off the identity
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)
