"""The built-in suite: size, determinism, split, and every reference answer checked independently.

The checkers below recompute each answer from the instance's input (and the task's parameters)
with their own, simple implementations; they never call the suite's generators or helpers.
"""

from __future__ import annotations

import codecs
import datetime
import re
import string
from collections import Counter

import pytest

from flora.data import SPECS, build_suite, default_split
from flora.data.suite import CATEGORIES, UNSEEN_CATEGORIES

# -- independent answers ------------------------------------------------------------------------

SMALL = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]  # fmt: skip
DECADES = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty", 9: "ninety"}


def words_of(n: int) -> str:
    hundreds, rest = n // 100, n % 100
    parts = []
    if hundreds:
        parts.append(f"{SMALL[hundreds]} hundred")
    if rest >= 20:
        parts.append(DECADES[rest // 10] + (f"-{SMALL[rest % 10]}" if rest % 10 else ""))
    elif rest or not hundreds:
        parts.append(SMALL[rest])
    return " ".join(parts)


def number_of(text: str) -> int:
    values = {w: i for i, w in enumerate(SMALL)} | {w: 10 * k for k, w in DECADES.items()}
    total = 0
    for token in text.replace("-", " ").split():
        total = total * 100 if token == "hundred" else total + values[token]
    return total


def to_roman(n: int) -> str:
    digits = [("", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"),
              ("", "X", "XX", "XXX", "XL", "L", "LX", "LXX", "LXXX", "XC"),
              ("", "C", "CC", "CCC", "CD", "D", "DC", "DCC", "DCCC", "CM"),
              ("", "M", "MM", "MMM")]  # fmt: skip
    return "".join(digits[p][int(d)] for p, d in reversed(list(enumerate(reversed(str(n))))))


def from_roman(text: str) -> int:
    value = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
    total = 0
    for a, b in zip(text, text[1:] + " ", strict=True):
        total += -value[a] if b != " " and value[b] > value[a] else value[a]
    return total


def zeller_weekday(year: int, month: int, day: int) -> str:
    if month < 3:
        month, year = month + 12, year - 1
    h = (day + 13 * (month + 1) // 5 + year % 100 + (year % 100) // 4 + (year // 100) // 4 + 5 * (year // 100)) % 7
    return ["Saturday", "Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday"][h]


def primes_below(limit: int) -> set[int]:
    sieve = [True] * limit
    sieve[0] = sieve[1] = False
    for i in range(2, limit):
        if sieve[i]:
            for j in range(i * i, limit, i):
                sieve[j] = False
    return {i for i, flag in enumerate(sieve) if flag}


PRIMES = primes_below(10001)
LOWER = string.ascii_lowercase


def fields(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.split("\n"))


def expected(family: str, params: dict, text: str) -> str:  # noqa: C901 (one branch per family, on purpose)
    words = text.split()
    p = params
    if family == "word_order":
        if p["order"] == "reverse":
            return " ".join(reversed(words))
        if p["order"] == "alphabetical":
            return " ".join(sorted(words, key=lambda w: [ord(c) for c in w]))
        if p["order"] == "length":
            return " ".join(w for size in range(1, 30) for w in words if len(w) == size)
        return " ".join([*words[1:], words[0]])
    if family == "letters":
        return {
            "reverse": lambda: "".join(reversed(text)),
            "remove_vowels": lambda: re.sub("[aeiou]", "", text),
            "spell": lambda: " ".join(list(text)),
            "acronym": lambda: "".join(w[:1] for w in words),
        }[p["op"]]()
    if family == "arithmetic":
        a, b = map(int, re.findall(r"\d+", text))
        return str({"add": a + b, "subtract": a - b, "multiply": a * b, "remainder": a - (a // b) * b}[p["op"]])
    if family == "word_problem":
        a, b = map(int, re.findall(r"\d+", text))
        return str({"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a // b}[p["op"]])
    if family == "counting":
        if p["what"] == "words":
            return str(len(words))
        if p["what"] == "vowels":
            return str(len(re.findall("[aeiou]", text)))
        f = fields(text)
        if p["what"] == "letter":
            return str(len(re.findall(re.escape(f["Letter"]), f["Text"])))
        return str(len([n for n in f["Numbers"].split() if int(n) > int(f["Threshold"])]))
    if family == "number_list":
        numbers = [int(w) for w in words]
        if p["op"] == "sort":
            return " ".join(str(n) for n in sorted(numbers))
        return str({"max": max(numbers), "min": min(numbers), "sum": sum(numbers)}[p["op"]])
    if family == "extraction":
        if p["what"] == "numbers":
            return " ".join(re.findall(r"\b\d+\b", text))
        if p["what"] == "names":
            return " ".join(re.findall(r"\b[A-Z][a-z]+\b", text))
        if p["what"] == "email":
            return re.search(r"\S+@\S+", text).group(0)
        f = fields(text)
        return " ".join(w for w in f["Text"].split() if w[0] == f["Letter"])
    if family == "number_class":
        n = int(text)
        return {
            "parity": lambda: ["even", "odd"][int(text[-1]) % 2],
            "divisible_by_3": lambda: "yes" if sum(map(int, str(n))) % 3 == 0 else "no",
            "prime": lambda: "prime" if n in PRIMES else "composite",
            "sign": lambda: "negative" if text.startswith("-") else "positive",
        }[p["rule"]]()
    if family == "word_class":
        return {
            "palindrome": lambda: "yes" if text == text[::-1] else "no",
            "vowel_start": lambda: "vowel" if text[0] in "aeiou" else "consonant",
            "length": lambda: "long" if len(text) > 5 else "short",
            "double_letter": lambda: "yes" if re.search(r"(.)\1", text) else "no",
        }[p["rule"]]()
    if family == "comparison":
        if p["what"] == "relation":
            a, b = map(int, re.findall(r"\d+", text))
            return "greater" if a > b else "less" if a < b else "equal"
        a, b = text.split(" and ")
        if p["what"] == "larger":
            return a if int(a) > int(b) else b
        if p["what"] == "longer":
            return a if len(a) > len(b) else b
        return a if a < b else b
    if family == "date":
        if p["conversion"] == "us_to_iso":
            return datetime.datetime.strptime(text, "%m/%d/%Y").date().isoformat()
        year, month, day = map(int, text.split("-"))
        name = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December"][month - 1]  # fmt: skip
        return {
            "iso_to_long": f"{name} {day}, {year}",
            "month_name": name,
            "weekday": zeller_weekday(year, month, day),
        }[p["conversion"]]
    if family == "unit":
        value, source = text.split()
        return str(int(value) * {"km": 1000, "kg": 1000, "hours": 60, "days": 24}[source])
    if family == "number_format":
        return {
            "to_words": lambda: words_of(int(text)),
            "from_words": lambda: str(number_of(text)),
            "to_roman": lambda: to_roman(int(text)),
            "from_roman": lambda: str(from_roman(text)),
        }[p["conversion"]]()
    if family == "cipher":
        if p["kind"] == "caesar" and p["shift"] == 13:
            return codecs.encode(text, "rot13")
        if p["kind"] == "caesar":
            return text.translate(str.maketrans(LOWER, LOWER[p["shift"] :] + LOWER[: p["shift"]]))
        if p["kind"] == "atbash":
            return text.translate(str.maketrans(LOWER, LOWER[::-1]))
        return " ".join(w + "way" if w[0] in "aeiou" else re.sub(r"^([^aeiou]+)(.*)$", r"\2\1ay", w) for w in words)
    if family == "sequence":
        terms = [int(t) for t in text.split(", ")]
        if p["kind"] in ("arithmetic", "decreasing"):
            return str(2 * terms[-1] - terms[-2])
        if p["kind"] == "geometric":
            return str(terms[-1] * terms[-1] // terms[-2])
        return str(terms[-1] + terms[-2])
    if family == "format_conversion":
        if p["conversion"] == "time_24_to_12":
            t = datetime.datetime.strptime(text, "%H:%M")
            return t.strftime("%I:%M %p").lstrip("0")
        if p["conversion"] == "time_12_to_24":
            return datetime.datetime.strptime(text, "%I:%M %p").strftime("%H:%M")
        if p["conversion"] == "digits_to_words":
            return " ".join(SMALL[int(d)] for d in text)
        return re.sub(r"([A-Z])", r" \1", text).lower()
    if family == "word_sets":
        if p["op"] == "dedupe":
            kept: list[str] = []
            for w in words:
                if w not in kept:
                    kept.append(w)
            return " ".join(kept)
        f = fields(text)
        if p["op"] == "membership":
            return "yes" if f["Word"] in f["List"].split() else "no"
        first, second = f["List 1"].split(), set(f["List 2"].split())
        if p["op"] == "common":
            return " ".join(w for w in first if w in second)
        return " ".join(w for w in first if w not in second)
    if family == "text_edit":
        if p["op"] == "duplicate":
            return " ".join(f"{w} {w}" for w in words)
        if p["op"] == "every_second":
            return " ".join(w for i, w in enumerate(words) if i % 2 == 0)
        f = fields(text)
        if p["op"] == "replace":
            return " ".join(f["With"] if w == f["Replace"] else w for w in f["Text"].split())
        return " ".join(w for w in f["Text"].split() if w != f["Delete"])
    raise AssertionError(f"no independent checker for family {family!r}: add one to this test")


# -- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite():
    return build_suite(seed=0)  # the default sizes: 100 training + 100 held-out instances per task


def test_size_categories_and_metrics(suite):
    assert len(SPECS) >= 60 and len(CATEGORIES) >= 12
    assert len({s.name for s in SPECS}) == len(SPECS)
    assert {s.metric for s in SPECS} == {"exact_match", "rougeL"}
    for train, heldout in zip(suite.train, suite.heldout, strict=True):
        assert train.name == heldout.name and train.definition == heldout.definition
        assert len(train.instances) == 100 and len(heldout.instances) == 100
        assert len(train.positive_examples) == 2 and len(train.negative_examples) == 1
        assert train.metric in ("exact_match", "rougeL")


def test_every_reference_answer_is_right(suite):
    for spec, train, heldout in zip(SPECS, suite.train, suite.heldout, strict=True):
        pairs = [(i.input, i.references[0]) for i in train.instances + heldout.instances]
        pairs += [(e.input, e.output) for e in train.positive_examples]
        for source, answer in pairs:
            assert expected(spec.family, dict(spec.params), source) == answer, (spec.name, source, answer)
        negative = train.negative_examples[0]
        assert expected(spec.family, dict(spec.params), negative.input) != negative.output, spec.name


def test_inputs_are_distinct_and_labels_balanced(suite):
    for train, heldout in zip(suite.train, suite.heldout, strict=True):
        inputs = [i.input for i in train.instances + heldout.instances] + [e.input for e in train.positive_examples]
        assert len(set(inputs)) == len(inputs), train.name
        ids = [i.id for i in train.instances + heldout.instances]
        assert len(set(ids)) == len(ids)
        answers = Counter(i.references[0] for i in train.instances + heldout.instances)
        if len(answers) <= 3:  # a classification task: every label is well represented
            assert min(answers.values()) >= 30, (train.name, answers)
        assert all(i.references[0].strip() for i in train.instances), train.name


def test_same_seed_same_suite_other_seed_other_suite():
    first = build_suite(seed=7, n_train=10, n_heldout=10)
    again = build_suite(seed=7, n_train=10, n_heldout=10)
    other = build_suite(seed=8, n_train=10, n_heldout=10)
    assert [t.to_json() for t in first.train + first.heldout] == [t.to_json() for t in again.train + again.heldout]
    for mine, theirs in zip(first.heldout, other.heldout, strict=True):
        assert [i.input for i in mine.instances] != [i.input for i in theirs.instances], mine.name


def test_heldout_instances_do_not_depend_on_the_training_size():
    small = build_suite(seed=3, n_train=2, n_heldout=5)
    large = build_suite(seed=3, n_train=50, n_heldout=5)
    assert [t.to_json() for t in small.heldout] == [t.to_json() for t in large.heldout]


def test_default_split_holds_out_whole_categories(suite):
    train, test = default_split()
    assert set(train) | set(test) == {s.name for s in SPECS} and not set(train) & set(test)
    category = {s.name: s.category for s in SPECS}
    assert {category[n] for n in test} == set(UNSEEN_CATEGORIES)
    assert not {category[n] for n in train} & set(UNSEEN_CATEGORIES)
    assert {s.metric for s in SPECS if s.name in test} == {"exact_match", "rougeL"}
    assert suite.train_tasks == train and suite.test_tasks == test


def test_selecting_tasks_and_categories():
    suite = build_suite(n_train=1, n_heldout=1, tasks=["Ciphers", "add_numbers"])
    assert [t.name for t in suite.train] == ["add_numbers", "caesar_shift_1", "caesar_shift_3", "rot13", "atbash",
                                             "pig_latin"]  # fmt: skip
    with pytest.raises(KeyError, match="unknown suite task or category 'nope'"):
        build_suite(tasks=["nope"])
