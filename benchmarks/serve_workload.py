"""The load benchmark's workload: requests with Poisson arrivals, their lengths and adapters, and the adapters.

One request list is drawn once from a seed and sent to every system: arrival offsets (exponential
gaps at ``rate`` requests/s), a prompt of ``prompt_tokens`` tokens of English text, a fixed output
length (``max_tokens`` with ``ignore_eos``), and a per-workload adapter. A workload only changes the
adapter of each request: drawn uniform or Zipf(s) over the first ``k`` of the adapter set,
``p(i) ∝ 1 / i**s`` for the i-th adapter (i = 1..k).

The adapters are LoRA rank-r adapters on every linear layer of the base model, randomised (the same
values for a given seed) and saved once in Hugging Face PEFT's format under flora's cache directory;
flora and vLLM read the same files.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from harness import TEXT, randomize
from tqdm import tqdm

from flora import AdapterModel, LoraConfig
from flora.base import cache_dir

DISTRIBUTIONS = ("uniform", "zipf")
ZIPF_EXPONENT = 1.5


@dataclass(frozen=True)
class Request:
    """One request of a workload; ``adapter`` None means the base model."""

    index: int
    arrival_s: float
    prompt: str
    prompt_tokens: int
    output_tokens: int
    adapter: str | None = None
    temperature: float = 0.0  # 0: greedy


@dataclass(frozen=True)
class Workload:
    """The shared request list with each request's adapter drawn over ``adapters`` adapters."""

    adapters: int
    distribution: str
    requests: tuple[Request, ...]

    @property
    def name(self) -> str:
        return workload_name(self.adapters, self.distribution)


def workload_name(adapters: int, distribution: str) -> str:
    """``"8-zipf"``; ``"1"`` for one adapter (the distribution makes no difference)."""
    return "1" if adapters == 1 else f"{adapters}-{distribution}"


def draw_requests(
    tokenizer, count: int, rate: float, prompt_tokens: tuple[int, int], output_tokens: tuple[int, int], seed: int
) -> tuple[Request, ...]:
    """``count`` requests (base model), arrivals a Poisson process of ``rate``/s, lengths uniform in the ranges.

    Each prompt is a window of ``prompt_tokens`` tokens of English text at a random offset, decoded
    back to text (the servers tokenize it again: their count can differ by a token at the edges).
    """
    if count < 1 or rate <= 0:
        raise ValueError(f"need at least one request at a positive rate, got count={count}, rate={rate}")
    text_ids = tokenizer(TEXT * 8).input_ids
    if prompt_tokens[0] < 1 or prompt_tokens[1] > len(text_ids) // 2 or prompt_tokens[0] > prompt_tokens[1]:
        raise ValueError(f"prompt tokens {prompt_tokens}: expected 1 <= low <= high <= {len(text_ids) // 2}")
    if output_tokens[0] < 1 or output_tokens[0] > output_tokens[1]:
        raise ValueError(f"output tokens {output_tokens}: expected 1 <= low <= high")
    rng = random.Random(seed)
    requests, arrival = [], 0.0
    for index in range(count):
        length = rng.randint(*prompt_tokens)
        start = rng.randrange(len(text_ids) - length)
        requests.append(
            Request(
                index=index,
                arrival_s=arrival,
                prompt=tokenizer.decode(text_ids[start : start + length]),
                prompt_tokens=length,
                output_tokens=rng.randint(*output_tokens),
            )
        )
        arrival += rng.expovariate(rate)
    return tuple(requests)


def route(
    requests: tuple[Request, ...], names: list[str], distribution: str, seed: int, exponent: float = ZIPF_EXPONENT
) -> Workload:
    """The requests with each one's adapter drawn from ``names``: uniform, or Zipf by position,
    ``p(i) ∝ i ** -exponent`` (1.5 here; S-LoRA's power law is 1)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution {distribution!r}: expected one of {', '.join(DISTRIBUTIONS)}")
    weights = [1.0] * len(names) if distribution == "uniform" else [i**-exponent for i in range(1, len(names) + 1)]
    rng = random.Random(seed)
    chosen = rng.choices(names, weights=weights, k=len(requests))
    return Workload(
        len(names), distribution, tuple(replace(r, adapter=a) for r, a in zip(requests, chosen, strict=True))
    )


def adapter_set(model: str, count: int, rank: int, seed: int = 0, root: Path | None = None) -> dict[str, Path]:
    """``count`` random LoRA rank-``rank`` adapters on every linear layer (``lora00``, ...) for ``model``,
    saved once in PEFT format. Returns name -> directory."""
    configs = {f"lora{i:02d}": LoraConfig(r=rank, alpha=2 * rank) for i in range(count)}
    return saved_adapters(model, f"lora-r{rank}-x{count}-seed{seed}", configs, seed, root)


def mixed_adapter_set(
    model: str, count: int, ranks: tuple[int, ...], targets: tuple[str, ...], seed: int = 0, root: Path | None = None
) -> dict[str, Path]:
    """``count`` random LoRA adapters on ``targets`` (``a0000``, ...), adapter ``i`` of rank
    ``ranks[i % len(ranks)]`` (so every prefix of the set mixes the ranks), saved once in PEFT format."""
    configs = {f"a{i:04d}": LoraConfig(r=ranks[i % len(ranks)], alpha=2 * ranks[i % len(ranks)],
                                       target_modules=list(targets)) for i in range(count)}  # fmt: skip
    label = f"lora-r{'-'.join(map(str, ranks))}-{'-'.join(targets)}-x{count}-seed{seed}"
    return saved_adapters(model, label, configs, seed, root)


def saved_adapters(
    model: str, label: str, configs: dict[str, LoraConfig], seed: int, root: Path | None = None
) -> dict[str, Path]:
    """The adapters of ``configs``, randomised from ``seed`` and saved once under flora's cache
    (``serve_load/<model>-<label>``). Returns name -> directory. The set appears atomically (built
    beside its directory, then renamed), so an interrupted build is simply redone."""
    root = root or cache_dir() / "serve_load"
    target = root / f"{model.replace('/', '_')}-{label}"
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        try:
            adapted = AdapterModel.from_pretrained(model)
            for i, (name, config) in enumerate(tqdm(configs.items(), desc=f"writing {label}", unit="adapter")):
                torch.manual_seed(seed * 1000 + i)  # lora_A's initialisation
                adapted.add_adapter(name, config)
                randomize(adapted.adapter_parameters(name), seed=seed * 1000 + i)
                adapted.save_adapter(name, scratch / name)
                adapted.delete_adapter(name)
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {name: target / name for name in configs}
