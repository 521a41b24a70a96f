"""The load benchmark's client: open-loop streaming requests against an OpenAI-compatible server, and their figures.

Each request is sent at its arrival offset whatever the server is doing (open loop), as a streaming
``POST /v1/completions`` with ``ignore_eos`` and ``max_tokens`` (a fixed output length) and
``stream_options.include_usage``. Per request:

- TTFT: send -> the first chunk with text (the first generated token);
- e2e: send -> ``data: [DONE]``;
- TPOT: ``(e2e - TTFT) / (tokens - 1)``, tokens from ``usage.completion_tokens``.

A run is bounded: requests not done at ``deadline_s`` after the first send are cancelled and counted
as unfinished (those due after the deadline are never sent). Throughput is over the finished
requests: output tokens/s = their tokens / (last completion - first send).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx
import numpy as np
from serve_workload import Request


@dataclass
class Outcome:
    """What happened to one request; times in seconds from its send."""

    index: int
    model: str
    requested_tokens: int
    sent_at: float | None = None  # perf_counter
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None
    adapter_cache: str | None = None  # flora's x-flora-adapter-cache: "hit" or "miss" (the adapter was loaded)

    @property
    def finished(self) -> bool:
        return self.e2e_s is not None and self.error is None

    @property
    def tpot_s(self) -> float | None:
        if not self.finished or self.ttft_s is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def completion_body(request: Request, model: str) -> dict:
    return {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_tokens,
        "ignore_eos": True,
        "temperature": request.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_one(client: httpx.AsyncClient, request: Request, outcome: Outcome) -> None:
    """Send one streaming completion and fill ``outcome`` in place (so a cancelled one keeps what it had)."""
    outcome.sent_at = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=completion_body(request, outcome.model)) as response:
        if response.status_code != 200:
            outcome.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
            return
        outcome.adapter_cache = response.headers.get("x-flora-adapter-cache")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                outcome.e2e_s = time.perf_counter() - outcome.sent_at
                break
            chunk = json.loads(data)
            if "error" in chunk:
                outcome.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                return
            if outcome.ttft_s is None and any(choice.get("text") for choice in chunk.get("choices", [])):
                outcome.ttft_s = time.perf_counter() - outcome.sent_at
            if chunk.get("usage"):
                outcome.prompt_tokens = chunk["usage"]["prompt_tokens"]
                outcome.output_tokens = chunk["usage"]["completion_tokens"]
    if outcome.e2e_s is not None and outcome.output_tokens is None:
        outcome.error = "the stream ended without a usage chunk"


async def send_all(
    base_url: str, requests: tuple[Request, ...], model_of: Callable[[Request], str], deadline_s: float
) -> tuple[list[Outcome], float]:
    """Send ``requests`` at their arrival offsets; returns the outcomes (in request order) and the first send time."""
    outcomes = [Outcome(index=r.index, model=model_of(r), requested_tokens=r.output_tokens) for r in requests]
    limits = httpx.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(None)) as client:
        start = time.perf_counter()

        async def one(request: Request, outcome: Outcome) -> None:
            await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
            try:
                await stream_one(client, request, outcome)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as error:
                outcome.error = f"{type(error).__name__}: {error}"

        tasks = [asyncio.create_task(one(r, o)) for r, o in zip(requests, outcomes, strict=True)]
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return outcomes, start


def run_load(
    base_url: str, requests: tuple[Request, ...], model_of: Callable[[Request], str], deadline_s: float
) -> tuple[list[Outcome], float]:
    return asyncio.run(send_all(base_url, requests, model_of, deadline_s))


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


def figures(outcomes: list[Outcome], start: float) -> dict:
    """Throughput and latency percentiles of one run (finished requests only), with its counts."""
    done = [o for o in outcomes if o.finished]
    errors = [o for o in outcomes if o.error is not None]
    result = {
        "requests": len(outcomes),
        "finished": len(done),
        "unfinished": len(outcomes) - len(done) - len(errors),
        "errors": len(errors),
        "short_outputs": sum(1 for o in done if o.output_tokens != o.requested_tokens),  # ignore_eos not honoured
        "first_errors": sorted({o.error for o in errors})[:3],
        "adapter_misses": sum(o.adapter_cache == "miss" for o in outcomes),  # requests that waited for a read
    }
    if not done:
        return result | {"duration_s": None, "requests_per_s": None, "output_tokens_per_s": None}
    duration = max(o.sent_at + o.e2e_s for o in done) - start
    tokens = sum(o.output_tokens for o in done)
    return result | {
        "duration_s": duration,
        "output_tokens": tokens,
        "requests_per_s": len(done) / duration,
        "output_tokens_per_s": tokens / duration,
        "ttft_s": percentiles([o.ttft_s for o in done]),
        "tpot_s": percentiles([o.tpot_s for o in done if o.tpot_s is not None]),
        "e2e_s": percentiles([o.e2e_s for o in done]),
    }


def outcome_records(outcomes: list[Outcome], start: float) -> list[dict]:
    """Per-request rows for the JSON file: times relative to the run's start."""
    rows = []
    for outcome in outcomes:
        row = asdict(outcome)
        row["sent_at"] = None if outcome.sent_at is None else outcome.sent_at - start
        rows.append(row)
    return rows
