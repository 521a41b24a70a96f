"""Stop strings over real HTTP with the `openai` client: the text ends just before the first stop
string wherever it falls against the token boundaries, streamed or not, and no part of a stop string
ever reaches the client."""

from __future__ import annotations

import pytest

PROMPT = "sort: pear apple fig"
TOKENS = 16


@pytest.fixture(scope="module")
def printable(tokenizer) -> list[int]:
    """The tokens that are printable ASCII text (the random model's other tokens are pieces of characters)."""
    return [i for i in range(len(tokenizer)) if (t := tokenizer.decode([i])).isascii() and t.isprintable() and t]


@pytest.fixture(scope="module")
def generated(tokenizer, reference, adapter_dir, printable) -> tuple[str, list[int]]:
    """lora4's greedy text of printable tokens for ``PROMPT``, and where each of its tokens' text ends."""
    others = sorted(set(range(len(tokenizer))) - set(printable))
    ids = reference.ids("lora4", str(adapter_dir / "lora4"), tokenizer(PROMPT).input_ids, TOKENS,
                        suppress_tokens=others)  # fmt: skip
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    text = tokenizer.decode(ids)
    assert len(set(ends)) > 8, text  # many boundaries
    return text, ends


@pytest.fixture(scope="module")
def complete(client, printable):
    return lambda *args, **kwargs: _complete(client, printable, *args, **kwargs)


def _complete(client, printable, stop: list[str], stream: bool, **extra) -> tuple[str, str, object]:
    """The text, finish reason and stop reason of one request of printable tokens (a stream's chunks joined)."""
    body = {"ignore_eos": True, "allowed_token_ids": printable, **extra}
    kwargs = dict(model="lora4", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stop=stop, extra_body=body)
    if not stream:
        choice = client.completions.create(**kwargs).choices[0]
        return choice.text, choice.finish_reason, choice.model_extra.get("stop_reason")
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
    last = chunks[-1]
    return "".join(c.text for c in chunks), last.finish_reason, last.model_extra.get("stop_reason")


def _stops_around(text: str, ends: list[int]) -> list[str]:
    """Stop strings at every token boundary: ending at it, starting at it, and straddling it."""
    stops = set()
    for end in ends[:-1]:
        for start, stop in ((end - 2, end), (end, end + 2), (end - 1, end + 1), (end - 2, end + 3)):
            if 0 <= start and stop <= len(text) and text[start:stop].strip():
                stops.add(text[start:stop])
    return sorted(stops)


@pytest.mark.parametrize("stream", [False, True])
def test_the_text_ends_before_a_stop_string_at_every_token_boundary(complete, generated, stream):
    text, ends = generated
    stops = _stops_around(text, ends)
    assert len(stops) > 10
    for stop in stops:
        assert complete([stop], stream) == (text[: text.index(stop)], "stop", stop), stop


@pytest.mark.parametrize("stream", [False, True])
def test_the_earliest_of_several_stop_strings_wins_and_a_stop_at_the_start_gives_no_text(complete, generated, stream):
    text, ends = generated
    late, early = text[ends[5] - 1 : ends[5] + 2], text[ends[1] : ends[1] + 2]
    assert complete([late, early, "never there"], stream) == (text[: text.index(early)], "stop", early)
    assert complete([text[:3]], stream) == ("", "stop", text[:3])
    assert complete(["never there"], stream) == (text, "length", None)


@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_in_output_keeps_the_stop_string(complete, generated, stream):
    text, ends = generated
    stop = text[ends[3] - 1 : ends[3] + 2]
    end = text.index(stop) + len(stop)
    assert complete([stop], stream, include_stop_str_in_output=True) == (text[:end], "stop", stop)


def test_stop_strings_wait_for_min_tokens(complete, generated):
    text, ends = generated
    stop = text[ends[1] : ends[1] + 2]  # found in the first tokens: ignored until min_tokens are out
    after = text.find(stop, ends[7])
    expected = text[:after] if after != -1 else text
    assert complete([stop], False, min_tokens=8)[0] == expected


def test_a_stop_string_ends_the_request_counted_as_stopped_not_aborted(complete, server, generated):
    text, ends = generated
    stops, aborts = (server.metric("flora:request_success_total", adapter="lora4", finished_reason=r)
                     for r in ("stop", "abort"))  # fmt: skip
    complete([text[ends[4] : ends[4] + 2]], False)
    complete([text[ends[2] : ends[2] + 3]], True)
    assert server.metric("flora:request_success_total", adapter="lora4", finished_reason="stop") == stops + 2
    assert server.metric("flora:request_success_total", adapter="lora4", finished_reason="abort") == aborts
