"""Every sampling field over real HTTP with the `openai` client, each checked against transformers'
`generate` with the logits processor that defines it (the prompt alone, its adapter): rows with
different settings share the server's batch and each gets what its settings give it alone."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LogitsProcessor

from flora.serve.logits import token_counts

PROMPT = "reverse the words: red green blue"
TOKENS = 10


class _PresenceFrequency(LogitsProcessor):
    """OpenAI's penalties on the tokens generated so far: ``z_v -= frequency · c_v + presence · [c_v > 0]``."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :].tolist()
        counts = token_counts(generated, scores.shape[-1], scores.device).to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _ask(client, model: str, **fields) -> object:
    extra = {k: fields.pop(k) for k in list(fields) if k not in ("n", "seed", "logit_bias", "stop", "presence_penalty",
                                                                 "frequency_penalty", "logprobs")}  # fmt: skip
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True, **extra}, **fields)  # fmt: skip


def test_each_sampling_field_does_what_transformers_does_row_by_row_in_one_batch(client, tokenizer, reference,
                                                                                 adapter_dir):  # fmt: skip
    prompt = tokenizer(PROMPT).input_ids
    path = str(adapter_dir / "lora4")
    plain = reference.ids("lora4", path, prompt, TOKENS)
    favourite = plain[0]
    cases = {
        "plain": ({}, {}),
        "repetition_penalty": ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
        "penalties": ({"presence_penalty": 1.5, "frequency_penalty": 0.7},
                      {"logits_processor": [_PresenceFrequency(len(prompt), 1.5, 0.7)]}),
        "logit_bias": ({"logit_bias": {str(favourite): -100}}, {"sequence_bias": {(favourite,): -100.0}}),
        "min_tokens": ({"min_tokens": 6, "ignore_eos": False, "stop_token_ids": [plain[2]]},
                       {"min_new_tokens": 6, "eos_token_id": [tokenizer.eos_token_id, plain[2]]}),
        "stop_token_ids": ({"stop_token_ids": [plain[3]]}, {"eos_token_id": [plain[3]]}),
        "top_k 1": ({"top_k": 1, "temperature": 1.0, "seed": 5}, {}),
        "min_p 1": ({"min_p": 1.0, "temperature": 1.3, "seed": 6}, {}),
    }  # fmt: skip
    answers: dict[str, object] = {}

    def send(name: str) -> None:
        answers[name] = _ask(client, "lora4", **cases[name][0])

    threads = [threading.Thread(target=send, args=(name,)) for name in cases for _ in range(1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, (_, generate) in cases.items():
        ids = reference.ids("lora4", path, prompt, TOKENS, **generate)
        if ids[-1:] and ids[-1] in generate.get("eos_token_id", []):  # a stop token ends the text, not in it
            ids = ids[:-1]
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        assert answers[name].choices[0].text == expected, name
    assert answers["logit_bias"].choices[0].text != answers["plain"].choices[0].text
    assert answers["stop_token_ids"].choices[0].finish_reason == "stop"
    assert answers["stop_token_ids"].choices[0].model_extra["stop_reason"] == plain[3]
    assert answers["top_k 1"].choices[0].text == answers["plain"].choices[0].text  # top_k 1 samples the argmax


def test_n_choices_with_a_seed_are_reproducible_and_differ_from_each_other(client):
    ask = lambda: client.completions.create(model="lora2", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3,  # noqa: E731
                                            seed=11, extra_body={"ignore_eos": True})  # fmt: skip
    first, again = ask(), ask()
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1 and first.usage.completion_tokens == 24


def test_best_of_returns_the_sequence_of_highest_mean_log_probability(client):
    fields = dict(model="lora2", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    every = client.completions.create(n=4, logprobs=0, **fields).choices
    best = client.completions.create(n=1, best_of=4, **fields)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every]
    assert best.choices[0].text == every[means.index(max(means))].text and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 24


def test_a_list_of_prompts_and_token_id_prompts_give_a_choice_each(client, tokenizer, reference, adapter_dir):
    prompts = ["hello", "sort: pear apple fig", PROMPT]
    path = str(adapter_dir / "ia3")
    expected = [reference.text("ia3", path, tokenizer(p).input_ids, 5) for p in prompts]
    reply = client.completions.create(model="ia3", prompt=prompts, max_tokens=5, temperature=0, n=2,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in reply.choices] == list(range(6))
    assert [c.text for c in reply.choices] == [text for text in expected for _ in range(2)]
    ids = [tokenizer(p).input_ids for p in prompts]
    by_ids = client.completions.create(model="ia3", prompt=ids, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.text for c in by_ids.choices] == expected
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))


def test_logprobs_are_the_models_own_for_the_chosen_and_the_top_tokens(client, tokenizer, reference, adapter_dir):
    prompt = tokenizer(PROMPT).input_ids
    path = str(adapter_dir / "lora4")
    reply = _ask(client, "lora4", logprobs=3, repetition_penalty=1.5)  # the logits are changed; logprobs are not
    generated = reference.ids("lora4", path, prompt, TOKENS, repetition_penalty=1.5)
    logprobs = reply.choices[0].logprobs
    expected = reference.logprobs("lora4", path, prompt + generated)[len(prompt) - 1 : -1]
    assert len(logprobs.token_logprobs) == len(generated) == TOKENS
    for step, (token, value, top) in enumerate(zip(generated, logprobs.token_logprobs, logprobs.top_logprobs,
                                                   strict=True)):  # fmt: skip
        assert abs(value - expected[step, token].item()) < 1e-4
        best = expected[step].topk(3)
        strings = [tokenizer.decode([i]) for i in best.indices.tolist()]
        assert set(top) == set(strings) | {tokenizer.decode([token])}
        for string, value in zip(strings, best.values.tolist(), strict=True):
            if strings.count(string) == 1 and string != tokenizer.decode([token]):  # pieces of characters collide
                assert abs(top[string] - value) < 1e-4
    assert logprobs.tokens == [tokenizer.decode([t]) for t in generated]
    assert logprobs.text_offset == [len(tokenizer.decode(generated[:i])) for i in range(len(generated))]


def test_echo_with_no_new_tokens_scores_the_prompt(client, tokenizer, reference, adapter_dir):
    prompt = tokenizer(PROMPT).input_ids
    for model in ("prompt", "flora", "tiny"):  # virtual tokens in front, a layer adapter, the base model
        path = None if model == "tiny" else str(adapter_dir / model)
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
        choice = reply.choices[0]
        assert choice.text == PROMPT and choice.finish_reason == "length" and reply.usage.completion_tokens == 0
        expected = reference.logprobs(None if model == "tiny" else model, path, prompt)
        values = choice.logprobs.token_logprobs
        assert values[0] is None and choice.logprobs.top_logprobs[0] is None and len(values) == len(prompt)
        for position in range(1, len(prompt)):
            assert abs(values[position] - expected[position - 1, prompt[position]].item()) < 1e-4, (model, position)


@pytest.mark.parametrize("stream", [False, True])
def test_the_token_that_ends_a_completion_has_its_logprob_but_no_text(client, tokenizer, reference, stream):
    """As vLLM: end of sequence ends the text but its log probability is reported, last; lm-eval's echo scoring
    (``max_tokens`` 1) drops the last log probability it gets, which must be the generated token's."""
    prompt = tokenizer(PROMPT).input_ids
    eos = tokenizer.eos_token_id
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0,
                                      logit_bias={str(eos): 100}, stream=stream)  # fmt: skip
    choices = [c.choices[0] for c in reply] if stream else [reply.choices[0]]
    values = [v for c in choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert "".join(c.text for c in choices) == PROMPT and choices[-1].finish_reason == "stop"
    assert len(values) == len(prompt) + 1  # the prompt's, then the end of sequence's
    expected = reference.logprobs(None, None, prompt)
    assert abs(values[-2] - expected[-2, prompt[-1]].item()) < 1e-4  # the prompt's last token stays in place
    assert abs(values[-1] - expected[-1, eos].item()) < 1e-4  # the model's own, before the bias


def test_echo_puts_the_prompt_in_front_of_the_completion_streamed_or_not(client):
    whole = client.completions.create(model="lora2", prompt=PROMPT, max_tokens=4, echo=True, temperature=0,
                                      logprobs=0, extra_body={"ignore_eos": True})  # fmt: skip
    plain = client.completions.create(model="lora2", prompt=PROMPT, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert whole.choices[0].text == PROMPT + plain.choices[0].text
    chunks = list(client.completions.create(model="lora2", prompt=PROMPT, max_tokens=4, echo=True, temperature=0,
                                            logprobs=0, stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs


def test_chat_logprobs_and_top_logprobs(client, tokenizer, reference, adapter_dir):
    messages = [{"role": "user", "content": "sort: pear apple fig"}]
    reply = client.chat.completions.create(model="flora", messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    content = reply.choices[0].logprobs.content
    generated = reference.ids("flora", str(adapter_dir / "flora"), prompt, 5)
    expected = reference.logprobs("flora", str(adapter_dir / "flora"), prompt + generated)[len(prompt) - 1 : -1]
    assert [entry.token for entry in content] == [tokenizer.decode([t]) for t in generated]
    for step, entry in enumerate(content):
        assert abs(entry.logprob - expected[step, generated[step]].item()) < 1e-4
        assert [abs(t.logprob - v) < 1e-4 for t, v in zip(entry.top_logprobs, expected[step].topk(2).values.tolist(),
                                                           strict=True)] == [True, True]  # fmt: skip
        assert bytes(entry.bytes) == entry.token.encode()
    stream = client.chat.completions.create(model="flora", messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [entry.logprob for entry in content]


def test_tokenize_and_detokenize_round_trip(server, tokenizer):
    import httpx

    reply = httpx.post(f"{server.url}/tokenize", json={"model": "lora4", "prompt": PROMPT, "return_token_strs": True})
    body = reply.json()
    assert body["tokens"] == tokenizer(PROMPT).input_ids and body["count"] == len(body["tokens"])
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"]) and body["max_model_len"] > 0
    back = httpx.post(f"{server.url}/detokenize", json={"model": "lora4", "tokens": body["tokens"]}).json()
    assert back == {"prompt": PROMPT}
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "messages": messages}).json()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    assert httpx.post(f"{server.url}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]}).status_code == 400
