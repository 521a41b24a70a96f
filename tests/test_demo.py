"""`flora demo` (`flora.demo.run_demo`) on a tiny model: the same seed trains the same adapters (up to
float rounding, which CPU kernels need not repeat bit for bit), another seed others."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from flora.demo import DEMO_TASKS, run_demo


def _adapters(directory) -> dict[str, dict[str, torch.Tensor]]:
    return {task: load_file(directory / task / "adapter_model.safetensors") for task in DEMO_TASKS}


def test_the_same_seed_trains_the_same_adapters_and_another_seed_others(tiny_dir, tmp_path):
    runs = {}
    for run, seed in (("first", 0), ("again", 0), ("other", 1)):
        results = run_demo(tmp_path / run, model_name=tiny_dir, steps=2, seed=seed)
        assert {r["adapter"] for r in results} == {*DEMO_TASKS, None}  # both adapters and the base model answered
        runs[run] = _adapters(tmp_path / run)
    for task in DEMO_TASKS:
        first, again, other = (runs[run][task] for run in ("first", "again", "other"))
        assert first.keys() == again.keys() == other.keys()
        assert all(torch.allclose(first[key], again[key], rtol=0, atol=1e-5) for key in first)
        assert not all(torch.allclose(first[key], other[key], rtol=0, atol=1e-3) for key in first)
