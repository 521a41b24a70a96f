"""`flora serve` over real HTTP with the `openai` client: every request, whatever runs beside it,
gets what `AdapterModel.generate` gives its prompt alone with its adapter."""

from __future__ import annotations

import itertools
import threading
import time

import httpx

from flora.serve.engine import FORWARD_COST_TOKENS, EngineRequest, SamplingParams, prefill_groups, slot_order
from serve.support import ADAPTERS

MODELS = [*ADAPTERS, "tiny"]  # every adapter kind, and the base model
PROMPTS = ["reverse the words: red green blue", "add 12 and 30", "sort: pear apple fig", "hello"]


def _path(adapter_dir, model: str) -> str | None:
    return None if model == "tiny" else str(adapter_dir / model)


def test_models_lists_every_adapter_and_the_base(client, adapter_dir):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"tiny", *ADAPTERS}
    assert cards["tiny"].model_extra["parent"] is None
    for name in ADAPTERS:
        assert cards[name].model_extra["root"] == str(adapter_dir / name)
        assert cards[name].model_extra["parent"] == "tiny"


def test_requests_arriving_at_different_times_each_equal_generate_alone(client, tokenizer, reference, adapter_dir):
    jobs = [(model, PROMPTS[i % len(PROMPTS)], 6 + 2 * (i % 3)) for i, model in enumerate(MODELS * 2)]
    results: dict[int, str] = {}

    def send(index: int, model: str, prompt: str, tokens: int) -> None:
        time.sleep(0.03 * index)  # arrivals spread over the decoding of the earlier ones
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        assert reply.usage.completion_tokens == tokens and reply.choices[0].finish_reason == "length"
        results[index] = reply.choices[0].text

    threads = [threading.Thread(target=send, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(jobs)
    for index, (model, prompt, tokens) in enumerate(jobs):
        expected = reference.text(None if model == "tiny" else model, _path(adapter_dir, model),
                                  tokenizer(prompt).input_ids, tokens)  # fmt: skip
        assert results[index] == expected, (model, prompt)


def test_streaming_gives_the_same_text_and_a_usage_chunk(client, tokenizer, reference, adapter_dir):
    chunks = list(client.completions.create(model="lora4", prompt=PROMPTS[0], max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference.text("lora4", _path(adapter_dir, "lora4"), tokenizer(PROMPTS[0]).input_ids, 9)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 9
    assert usage.usage.prompt_tokens == len(tokenizer(PROMPTS[0]).input_ids)


def test_chat_completion_uses_the_chat_template(client, tokenizer, reference, adapter_dir):
    messages = [{"role": "user", "content": "sort: pear apple fig"}]
    reply = client.chat.completions.create(model="flora", messages=messages, max_tokens=7, temperature=0,
                                           extra_body={"ignore_eos": True})  # fmt: skip
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert reply.choices[0].message.content == reference.text("flora", _path(adapter_dir, "flora"), ids, 7)
    assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="flora", messages=messages, max_tokens=7, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.choices[0].message.content


def test_a_seeded_sampled_request_is_reproducible_whatever_runs_beside_it(client):
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model="lora2",
                prompt=PROMPTS[1],
                max_tokens=12,
                temperature=1.0,
                top_p=0.9,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    alone = sample(7)
    crowd = [threading.Thread(target=sample, args=(s,)) for s in range(3)]
    for thread in crowd:
        thread.start()
    beside = sample(7)
    for thread in crowd:
        thread.join()
    assert alone == beside
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1  # different seeds: different samples


def test_stop_strings_end_the_text_before_the_stop(client, tokenizer, reference, adapter_dir):
    full = reference.text("lora4", _path(adapter_dir, "lora4"), tokenizer(PROMPTS[2]).input_ids, 12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    reply = client.completions.create(model="lora4", prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    body = {"model": "lora2", "prompt": PROMPTS[0], "max_tokens": 110, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    aborted = server.metric("flora:request_success_total", adapter="lora2", finished_reason="abort")
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        for _ in zip(range(3), response.iter_lines(), strict=False):
            pass  # read a few events, then hang up
    deadline = time.monotonic() + 20
    while server.metric("flora:request_success_total", adapter="lora2", finished_reason="abort") == aborted:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)
    assert server.metric("flora:num_requests_running") == 0


def test_rows_that_stay_keep_their_slots():
    """A leaving row's slot takes a staying row from past the new end; the others do not move, so the
    next decoding step's per-row tables differ only where rows changed."""
    assert slot_order([0, 2, 3, 5]) == [0, 5, 2, 3]
    assert slot_order([1, 2]) == [2, 1]
    assert slot_order([3, 4, 5]) == [3, 4, 5]
    assert slot_order([0, 1, 2]) == [0, 1, 2] and slot_order([]) == []


def _requests(lengths: list[int]) -> list[EngineRequest]:
    params = SamplingParams(max_tokens=1)
    return [EngineRequest(str(i), [0] * n, params, None, lambda event: None) for i, n in enumerate(lengths)]


def _lengths(groups: list[list[EngineRequest]]) -> list[list[int]]:
    return [[len(r.prompt_ids) for r in group] for group in groups]


def _cost(groups: list[list[int]]) -> int:
    """A split's prefill cost: per forward, `FORWARD_COST_TOKENS` plus its longest prompt per row."""
    return sum(FORWARD_COST_TOKENS + max(group) * len(group) for group in groups)


def test_prefill_groups_prompts_of_similar_length():
    assert _lengths(prefill_groups(_requests([128, 16, 120, 20]))) == [[16, 20], [120, 128]]
    assert _lengths(prefill_groups(_requests([64, 60, 70]))) == [[60, 64, 70]]  # padding cheaper than a forward
    assert _lengths(prefill_groups(_requests([5]))) == [[5]] and prefill_groups([]) == []
    requests = _requests([3, 90, 17, 41, 128, 66, 8, 100, 45, 12])
    groups = prefill_groups(requests)
    assert sorted(map(id, (r for group in groups for r in group))) == sorted(map(id, requests))
    lengths = sorted(len(r.prompt_ids) for r in requests)
    splits = []  # every split of the sorted lengths into consecutive groups
    for cuts in itertools.product([False, True], repeat=len(lengths) - 1):
        bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), len(lengths)]
        splits.append([lengths[a:b] for a, b in itertools.pairwise(bounds)])
    assert _cost(_lengths(groups)) == min(map(_cost, splits))
