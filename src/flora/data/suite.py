"""The built-in task suite: synthetic tasks with checkable answers, in Super-NaturalInstructions form.

The suite is a table (`SPECS`): each `TaskSpec` names a *family* (a generator function
``family(rng, **params) -> (input, output)``) and its parameters, a definition, a category and
its primary metric: ``"exact_match"`` for short labels and numbers, ``"rougeL"`` for free text.
Everything is generated deterministically from a seed: each task draws from its own
``random.Random`` stream keyed by (seed, task name, part), so the held-out instances do not
change when the number of training instances does.

Per task: 2 positive examples, 1 negative example, ``n_train`` training instances and
``n_heldout`` held-out instances, all with distinct inputs. The default split (as the official
English track) holds out whole categories (`UNSEEN_CATEGORIES`: unseen tasks); the other tasks
are training tasks whose held-out instances measure seen tasks.

Outputs avoid what the official metrics erase: no answer differs from another only by case or
punctuation (exact match lower-cases and strips punctuation; ROUGE's tokenizer keeps only
lower-case letters and digits), and numbers are non-negative without thousands separators.
"""

from __future__ import annotations

import datetime
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora.data.formats import Example, Instance, Task, write_sni_task, write_text_atomic

# fmt: off
WORDS = (
    "apple", "river", "stone", "cloud", "green", "house", "light", "music", "paper", "table",
    "water", "bread", "chair", "dream", "earth", "field", "glass", "heart", "honey", "lemon",
    "money", "night", "ocean", "plant", "queen", "radio", "smile", "tiger", "train", "voice",
    "world", "zebra", "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish", "book",
    "road", "rain", "snow", "wind", "fire", "gold", "milk", "salt", "rice", "corn", "lamp",
    "door", "wall", "ship", "boat", "king", "hill", "lake", "park", "farm", "shop", "coin",
    "ring", "bell", "drum", "song", "game", "card", "rock", "sand", "leaf", "rose", "seed",
    "frog", "bear", "wolf", "lion", "deer", "goat", "duck", "owl", "ant", "bee", "cow", "pig",
    "hat", "cup", "pen", "box", "bag", "bus", "car", "map", "key", "egg", "jam", "tea", "ice",
    "garden", "window", "pencil", "rabbit", "monkey", "orange", "purple", "yellow", "silver",
    "castle", "forest", "island", "market", "planet", "rocket", "summer", "winter", "spring",
    "bottle", "candle", "carpet", "doctor", "farmer", "finger", "flower", "kitten", "ladder",
    "mirror", "pepper", "pillow", "pocket", "basket", "button", "cookie", "dragon", "guitar",
    "hammer", "jacket", "number", "parrot", "potato", "saddle", "tunnel", "turtle", "violin",
    "blanket", "captain", "chicken", "diamond", "dolphin", "giraffe", "kitchen", "lantern",
    "morning", "octopus", "pumpkin", "rainbow", "sandwich", "teacher", "thunder", "village",
    "blue", "red", "tall", "small", "quick", "slow", "warm", "cold", "happy", "quiet", "bright",
    "dark", "soft", "loud", "sweet", "fresh", "old", "new", "big", "tiny", "wild", "calm",
)
NAMES = (
    "Anna", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Hugo", "Irene", "Jack", "Kara",
    "Leo", "Maria", "Nina", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tina", "Umar", "Vera",
    "Walter", "Xenia", "Yusuf", "Zoe", "Omar", "Lucy", "Peter", "Sofia",
)
ITEMS = ("apples", "pencils", "books", "stamps", "cookies", "marbles", "cards", "shells", "coins", "stickers")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
ROMAN = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
         (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))
# fmt: on
VOWELS = "aeiou"
CONSONANTS = "bcdfghjklmnprstvwz"
LETTERS = "abcdefghijklmnopqrstuvwxyz"

Family = Callable[..., tuple[str, str]]
FAMILIES: dict[str, Family] = {}


def family(function: Family) -> Family:
    """Register a generator ``function(rng, **params) -> (input, output)`` under its name."""
    FAMILIES[function.__name__] = function
    return function


# -- helpers ------------------------------------------------------------------------------------


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def _distinct_words(rng: random.Random, count: int) -> list[str]:
    return rng.sample(WORDS, count)


def _pseudo_word(rng: random.Random, syllables: int | None = None) -> str:
    count = syllables if syllables is not None else rng.randint(2, 3)
    word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(count))
    return word + rng.choice(CONSONANTS) if rng.random() < 0.5 else word


def number_words(n: int) -> str:
    """English words for ``0 <= n <= 999`` ("three hundred forty-two")."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    rest = n % 100
    return ONES[n // 100] + " hundred" + (" " + number_words(rest) if rest else "")


def roman(n: int) -> str:
    """Roman numeral of ``1 <= n <= 3999``."""
    out = []
    for value, symbol in ROMAN:
        count, n = divmod(n, value)
        out.append(symbol * count)
    return "".join(out)


def _shift(text: str, shift: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + shift) % 26] if c in LETTERS else c for c in text)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# -- families -----------------------------------------------------------------------------------


@family
def word_order(rng: random.Random, order: str) -> tuple[str, str]:
    words = _words(rng, 4, 7)
    if order == "reverse":
        out = words[::-1]
    elif order == "alphabetical":
        out = sorted(words)
    elif order == "length":
        out = sorted(words, key=len)
    elif order == "rotate":
        out = words[1:] + words[:1]
    else:
        raise ValueError(order)
    return " ".join(words), " ".join(out)


@family
def letters(rng: random.Random, op: str) -> tuple[str, str]:
    if op == "acronym":
        words = _words(rng, 3, 6)
        return " ".join(words), "".join(w[0] for w in words)
    word = rng.choice(WORDS) if rng.random() < 0.5 else _pseudo_word(rng)
    if op == "reverse":
        return word, word[::-1]
    if op == "remove_vowels":
        return word, "".join(c for c in word if c not in VOWELS)
    if op == "spell":
        return word, " ".join(word)
    raise ValueError(op)


@family
def arithmetic(rng: random.Random, op: str) -> tuple[str, str]:
    if op == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return f"{a} + {b}", str(a + b)
    if op == "subtract":
        a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
        return f"{a} - {b}", str(a - b)
    if op == "multiply":
        a, b = rng.randint(11, 99), rng.randint(2, 9)
        return f"{a} * {b}", str(a * b)
    if op == "remainder":
        a, b = rng.randint(20, 999), rng.randint(3, 12)
        return f"{a} divided by {b}", str(a % b)
    raise ValueError(op)


@family
def word_problem(rng: random.Random, op: str) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if op == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", str(a + b)
    if op == "subtract":
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {item} and gives away {b}. How many {item} are left?", str(a - b)
    if op == "multiply":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{name} buys {a} bags with {b} {item} in each bag. How many {item} is that in total?", str(a * b)
    if op == "divide":
        b, q = rng.randint(2, 9), rng.randint(2, 15)
        return f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?", str(q)
    raise ValueError(op)


@family
def counting(rng: random.Random, what: str) -> tuple[str, str]:
    if what == "words":
        words = _words(rng, 3, 12)
        return " ".join(words), str(len(words))
    if what == "vowels":
        word = _pseudo_word(rng, rng.randint(2, 4))
        return word, str(sum(c in VOWELS for c in word))
    if what == "letter":
        words = _words(rng, 3, 7)
        letter = rng.choice("".join(words))
        return f"Letter: {letter}\nText: {' '.join(words)}", str(" ".join(words).count(letter))
    if what == "above":
        numbers = [rng.randint(1, 99) for _ in range(rng.randint(4, 8))]
        threshold = rng.randint(20, 80)
        text = f"Numbers: {' '.join(map(str, numbers))}\nThreshold: {threshold}"
        return text, str(sum(n > threshold for n in numbers))
    raise ValueError(what)


@family
def number_list(rng: random.Random, op: str) -> tuple[str, str]:
    numbers = [rng.randint(1, 99) for _ in range(rng.randint(4, 7))]
    text = " ".join(map(str, numbers))
    if op == "max":
        return text, str(max(numbers))
    if op == "min":
        return text, str(min(numbers))
    if op == "sum":
        return text, str(sum(numbers))
    if op == "sort":
        return text, " ".join(map(str, sorted(numbers)))
    raise ValueError(op)


@family
def extraction(rng: random.Random, what: str) -> tuple[str, str]:
    words = _words(rng, 4, 8)
    if what == "numbers":
        numbers = [str(rng.randint(1, 999)) for _ in range(rng.randint(2, 3))]
        for number in numbers:
            words.insert(rng.randint(0, len(words)), number)
        found = [w for w in words if w.isdigit()]
        return " ".join(words), " ".join(found)
    if what == "names":
        for name in rng.sample(NAMES, rng.randint(2, 3)):
            words.insert(rng.randint(0, len(words)), name)
        return " ".join(words), " ".join(w for w in words if w[0].isupper())
    if what == "email":
        domain = f"{rng.choice(WORDS)}.{rng.choice(['com', 'org', 'net'])}"
        address = f"{rng.choice(NAMES).lower()}.{rng.choice(WORDS)}@{domain}"
        words.insert(rng.randint(0, len(words)), address)
        return " ".join(words), address
    if what == "initial":
        letter = rng.choice(words)[0]
        return f"Letter: {letter}\nText: {' '.join(words)}", " ".join(w for w in words if w.startswith(letter))
    raise ValueError(what)


@family
def number_class(rng: random.Random, rule: str) -> tuple[str, str]:
    label = rng.random() < 0.5
    while True:
        n = rng.randint(2, 9999)
        if rule == "parity" and (n % 2 == 0) == label:
            return str(n), "even" if label else "odd"
        if rule == "divisible_by_3" and (n % 3 == 0) == label:
            return str(n), _yes(label)
        if rule == "prime" and _is_prime(n) == label and n < 3000:
            return str(n), "prime" if label else "composite"
        if rule == "sign":
            return (str(n), "positive") if label else (f"-{n}", "negative")


@family
def word_class(rng: random.Random, rule: str) -> tuple[str, str]:
    label = rng.random() < 0.5
    while True:
        word = _pseudo_word(rng) if rule != "vowel_start" else rng.choice(VOWELS + CONSONANTS) + _pseudo_word(rng)
        if rule == "palindrome":
            half = _pseudo_word(rng)
            word = half + half[-2::-1] if label else word
            if (word == word[::-1]) == label:
                return word, _yes(label)
        elif rule == "vowel_start" and (word[0] in VOWELS) == label:
            return word, "vowel" if label else "consonant"
        elif rule == "length" and (len(word) >= 6) == label:
            return word, "long" if label else "short"
        elif rule == "double_letter":
            if label:
                position = rng.randint(0, len(word) - 1)
                word = word[: position + 1] + word[position] + word[position + 1 :]
            if any(a == b for a, b in zip(word, word[1:], strict=False)) == label:
                return word, _yes(label)


@family
def comparison(rng: random.Random, what: str) -> tuple[str, str]:
    if what == "larger":
        a, b = rng.sample(range(1, 10000), 2)
        return f"{a} and {b}", str(max(a, b))
    if what == "longer":
        while True:
            a, b = rng.sample(WORDS, 2)
            if len(a) != len(b):
                return f"{a} and {b}", a if len(a) > len(b) else b
    if what == "alphabetical":
        a, b = rng.sample(WORDS, 2)
        return f"{a} and {b}", min(a, b)
    if what == "relation":
        a = rng.randint(1, 999)
        b = a if rng.random() < 1 / 3 else rng.randint(1, 999)
        return f"A = {a}, B = {b}", "greater" if a > b else "less" if a < b else "equal"
    raise ValueError(what)


@family
def date(rng: random.Random, conversion: str) -> tuple[str, str]:
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randint(0, 365 * 100))
    iso = f"{day.year:04d}-{day.month:02d}-{day.day:02d}"
    if conversion == "iso_to_long":
        return iso, f"{MONTHS[day.month - 1]} {day.day}, {day.year}"
    if conversion == "us_to_iso":
        return f"{day.month:02d}/{day.day:02d}/{day.year:04d}", iso
    if conversion == "month_name":
        return iso, MONTHS[day.month - 1]
    if conversion == "weekday":
        return iso, WEEKDAYS[day.weekday()]
    raise ValueError(conversion)


@family
def unit(rng: random.Random, source: str, target: str, factor: int) -> tuple[str, str]:
    value = rng.randint(1, 999)
    return f"{value} {source}", str(value * factor)


@family
def number_format(rng: random.Random, conversion: str) -> tuple[str, str]:
    if conversion == "to_words":
        n = rng.randint(0, 999)
        return str(n), number_words(n)
    if conversion == "from_words":
        n = rng.randint(0, 999)
        return number_words(n), str(n)
    if conversion == "to_roman":
        n = rng.randint(1, 3999)
        return str(n), roman(n)
    if conversion == "from_roman":
        n = rng.randint(1, 3999)
        return roman(n), str(n)
    raise ValueError(conversion)


@family
def cipher(rng: random.Random, kind: str, shift: int = 0) -> tuple[str, str]:
    words = _words(rng, 2, 4)
    text = " ".join(words)
    if kind == "caesar":
        return text, _shift(text, shift)
    if kind == "atbash":
        return text, "".join(LETTERS[25 - LETTERS.index(c)] if c in LETTERS else c for c in text)
    if kind == "pig_latin":
        out = []
        for word in words:
            if word[0] in VOWELS:
                out.append(word + "way")
            else:
                cut = next((i for i, c in enumerate(word) if c in VOWELS), len(word))
                out.append(word[cut:] + word[:cut] + "ay")
        return text, " ".join(out)
    raise ValueError(kind)


@family
def sequence(rng: random.Random, kind: str) -> tuple[str, str]:
    length = rng.randint(4, 6)
    if kind == "arithmetic":
        start, step = rng.randint(1, 99), rng.randint(2, 15)
        terms = [start + i * step for i in range(length + 1)]
    elif kind == "decreasing":
        step = rng.randint(2, 15)
        start = rng.randint(step * length + 1, 999)
        terms = [start - i * step for i in range(length + 1)]
    elif kind == "geometric":
        start, ratio = rng.randint(1, 60), rng.randint(2, 5)
        terms = [start * ratio**i for i in range(rng.randint(3, 4) + 1)]
    elif kind == "fibonacci":
        terms = [rng.randint(1, 30), rng.randint(1, 30)]
        while len(terms) < length + 1:
            terms.append(terms[-1] + terms[-2])
    else:
        raise ValueError(kind)
    return ", ".join(map(str, terms[:-1])), str(terms[-1])


@family
def format_conversion(rng: random.Random, conversion: str) -> tuple[str, str]:
    hour, minute = rng.randint(0, 23), rng.randint(0, 59)
    twelve = f"{hour % 12 or 12}:{minute:02d} {'AM' if hour < 12 else 'PM'}"
    if conversion == "time_24_to_12":
        return f"{hour:02d}:{minute:02d}", twelve
    if conversion == "time_12_to_24":
        return twelve, f"{hour:02d}:{minute:02d}"
    if conversion == "digits_to_words":
        digits = str(rng.randint(100, 99999))
        return digits, " ".join(ONES[int(d)] for d in digits)
    if conversion == "camel_to_words":
        words = _distinct_words(rng, rng.randint(2, 4))
        return words[0] + "".join(w.capitalize() for w in words[1:]), " ".join(words)
    raise ValueError(conversion)


@family
def word_sets(rng: random.Random, op: str) -> tuple[str, str]:
    if op == "dedupe":
        pool = _distinct_words(rng, rng.randint(3, 5))
        words = pool + [rng.choice(pool) for _ in range(rng.randint(1, 3))]
        rng.shuffle(words)
        return " ".join(words), " ".join(dict.fromkeys(words))
    if op == "membership":
        pool = _distinct_words(rng, rng.randint(4, 7))
        word = rng.choice(pool[1:]) if rng.random() < 0.5 else pool[0]
        listed = pool[1:]
        return f"Word: {word}\nList: {' '.join(listed)}", _yes(word in listed)
    pool = _distinct_words(rng, 8)
    shared = rng.randint(1, 3)
    first, second = pool[:5], pool[5 - shared : 8]
    rng.shuffle(second)
    text = f"List 1: {' '.join(first)}\nList 2: {' '.join(second)}"
    if op == "common":
        return text, " ".join(w for w in first if w in second)
    if op == "only_first":
        return text, " ".join(w for w in first if w not in second)
    raise ValueError(op)


@family
def text_edit(rng: random.Random, op: str) -> tuple[str, str]:
    words = _words(rng, 4, 8)
    if op == "replace":
        old = rng.choice(words)
        new = rng.choice([w for w in WORDS if w not in words])
        out = [new if w == old else w for w in words]
        return f"Text: {' '.join(words)}\nReplace: {old}\nWith: {new}", " ".join(out)
    if op == "delete":
        old = rng.choice(words)
        if all(w == old for w in words):
            return text_edit(rng, op)
        return f"Text: {' '.join(words)}\nDelete: {old}", " ".join(w for w in words if w != old)
    if op == "duplicate":
        return " ".join(words), " ".join(w for w in words for _ in range(2))
    if op == "every_second":
        return " ".join(words), " ".join(words[::2])
    raise ValueError(op)


# -- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One suite task: a family with parameters, its definition, category and primary metric."""

    name: str
    category: str
    family: str
    definition: str
    metric: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def generate(self, rng: random.Random) -> tuple[str, str]:
        return FAMILIES[self.family](rng, **self.params)


EM, RL = "exact_match", "rougeL"
_NUMBER = " Answer with the number only."

# (name, category, family, params, metric, definition)
_TABLE: list[tuple[str, str, str, dict[str, Any], str, str]] = [
    ("reverse_words", "Word Order", "word_order", {"order": "reverse"}, RL,
     "Write the words of the input in reverse order, separated by single spaces."),
    ("sort_words_alphabetically", "Word Order", "word_order", {"order": "alphabetical"}, RL,
     "Sort the words of the input in alphabetical order, keeping repeated words."),
    ("sort_words_by_length", "Word Order", "word_order", {"order": "length"}, RL,
     "Sort the words of the input from shortest to longest; words of the same length keep their order."),
    ("move_first_word_to_end", "Word Order", "word_order", {"order": "rotate"}, RL,
     "Move the first word of the input to the end and keep the other words in order."),
    ("reverse_letters", "Character Manipulation", "letters", {"op": "reverse"}, EM,
     "Write the letters of the given word in reverse order."),
    ("remove_vowels", "Character Manipulation", "letters", {"op": "remove_vowels"}, EM,
     "Remove every vowel (a, e, i, o, u) from the given word."),
    ("spell_out_word", "Character Manipulation", "letters", {"op": "spell"}, RL,
     "Spell the given word: write its letters separated by single spaces."),
    ("acronym", "Character Manipulation", "letters", {"op": "acronym"}, EM,
     "Write the first letter of every word of the input, joined together without spaces."),
    ("add_numbers", "Arithmetic", "arithmetic", {"op": "add"}, EM, "Compute the sum." + _NUMBER),
    ("subtract_numbers", "Arithmetic", "arithmetic", {"op": "subtract"}, EM, "Compute the difference." + _NUMBER),
    ("multiply_numbers", "Arithmetic", "arithmetic", {"op": "multiply"}, EM, "Compute the product." + _NUMBER),
    ("division_remainder", "Arithmetic", "arithmetic", {"op": "remainder"}, EM,
     "Give the remainder of the integer division." + _NUMBER),
    ("word_problem_addition", "Word Problems", "word_problem", {"op": "add"}, EM, "Solve the word problem." + _NUMBER),
    ("word_problem_subtraction", "Word Problems", "word_problem", {"op": "subtract"}, EM,
     "Solve the word problem." + _NUMBER),
    ("word_problem_multiplication", "Word Problems", "word_problem", {"op": "multiply"}, EM,
     "Solve the word problem." + _NUMBER),
    ("word_problem_division", "Word Problems", "word_problem", {"op": "divide"}, EM,
     "Solve the word problem." + _NUMBER),
    ("count_words", "Counting", "counting", {"what": "words"}, EM, "Count the words in the input." + _NUMBER),
    ("count_vowels", "Counting", "counting", {"what": "vowels"}, EM,
     "Count the vowels (a, e, i, o, u) in the given word." + _NUMBER),
    ("count_letter", "Counting", "counting", {"what": "letter"}, EM,
     "Count how many times the given letter occurs in the text." + _NUMBER),
    ("count_above_threshold", "Counting", "counting", {"what": "above"}, EM,
     "Count the numbers that are greater than the threshold." + _NUMBER),
    ("list_maximum", "Number Lists", "number_list", {"op": "max"}, EM, "Give the largest number of the list."),
    ("list_minimum", "Number Lists", "number_list", {"op": "min"}, EM, "Give the smallest number of the list."),
    ("list_sum", "Number Lists", "number_list", {"op": "sum"}, EM, "Give the sum of the numbers of the list."),
    ("sort_numbers", "Number Lists", "number_list", {"op": "sort"}, RL,
     "Sort the numbers in increasing order, separated by single spaces."),
    ("extract_numbers", "Extraction", "extraction", {"what": "numbers"}, RL,
     "List the numbers that appear in the text, in order, separated by single spaces."),
    ("extract_names", "Extraction", "extraction", {"what": "names"}, RL,
     "List the capitalized names that appear in the text, in order, separated by single spaces."),
    ("extract_email", "Extraction", "extraction", {"what": "email"}, EM, "Give the email address in the text."),
    ("extract_words_with_initial", "Extraction", "extraction", {"what": "initial"}, RL,
     "List the words of the text that start with the given letter, in order, separated by single spaces."),
    ("even_or_odd", "Number Classification", "number_class", {"rule": "parity"}, EM,
     "Is the number even or odd? Answer \"even\" or \"odd\"."),
    ("divisible_by_three", "Number Classification", "number_class", {"rule": "divisible_by_3"}, EM,
     "Is the number divisible by 3? Answer \"yes\" or \"no\"."),
    ("prime_or_composite", "Number Classification", "number_class", {"rule": "prime"}, EM,
     "Is the number prime or composite? Answer \"prime\" or \"composite\"."),
    ("positive_or_negative", "Number Classification", "number_class", {"rule": "sign"}, EM,
     "Is the number positive or negative? Answer \"positive\" or \"negative\"."),
    ("is_palindrome", "Word Classification", "word_class", {"rule": "palindrome"}, EM,
     "Does the word read the same forwards and backwards? Answer \"yes\" or \"no\"."),
    ("vowel_or_consonant_start", "Word Classification", "word_class", {"rule": "vowel_start"}, EM,
     "Does the word start with a vowel or a consonant? Answer \"vowel\" or \"consonant\"."),
    ("short_or_long_word", "Word Classification", "word_class", {"rule": "length"}, EM,
     "A word with 6 or more letters is long, otherwise short. Answer \"long\" or \"short\"."),
    ("has_double_letter", "Word Classification", "word_class", {"rule": "double_letter"}, EM,
     "Does the word contain the same letter twice in a row? Answer \"yes\" or \"no\"."),
    ("larger_number", "Comparison", "comparison", {"what": "larger"}, EM, "Give the larger of the two numbers."),
    ("longer_word", "Comparison", "comparison", {"what": "longer"}, EM, "Give the longer of the two words."),
    ("first_alphabetically", "Comparison", "comparison", {"what": "alphabetical"}, EM,
     "Give the word that comes first in alphabetical order."),
    ("compare_numbers", "Comparison", "comparison", {"what": "relation"}, EM,
     "Is A greater than, less than or equal to B? Answer \"greater\", \"less\" or \"equal\"."),
    ("date_iso_to_long", "Date Conversion", "date", {"conversion": "iso_to_long"}, EM,
     "Write the date (year-month-day) as month name, day and year, like \"March 5, 2021\"."),
    ("date_us_to_iso", "Date Conversion", "date", {"conversion": "us_to_iso"}, EM,
     "Convert the date from month/day/year to year-month-day, like \"2021-03-05\"."),
    ("date_month_name", "Date Conversion", "date", {"conversion": "month_name"}, EM,
     "Give the name of the month of the date (year-month-day)."),
    ("date_weekday", "Date Conversion", "date", {"conversion": "weekday"}, EM,
     "Give the day of the week of the date (year-month-day)."),
    ("kilometers_to_meters", "Unit Conversion", "unit", {"source": "km", "target": "m", "factor": 1000}, EM,
     "Convert the distance from kilometers to meters." + _NUMBER),
    ("hours_to_minutes", "Unit Conversion", "unit", {"source": "hours", "target": "minutes", "factor": 60}, EM,
     "Convert the time from hours to minutes." + _NUMBER),
    ("kilograms_to_grams", "Unit Conversion", "unit", {"source": "kg", "target": "g", "factor": 1000}, EM,
     "Convert the weight from kilograms to grams." + _NUMBER),
    ("days_to_hours", "Unit Conversion", "unit", {"source": "days", "target": "hours", "factor": 24}, EM,
     "Convert the time from days to hours." + _NUMBER),
    ("number_to_words", "Number Words", "number_format", {"conversion": "to_words"}, RL,
     "Write the number in English words, like \"three hundred forty-two\"."),
    ("words_to_number", "Number Words", "number_format", {"conversion": "from_words"}, EM,
     "Write the number given in English words as digits."),
    ("number_to_roman", "Number Words", "number_format", {"conversion": "to_roman"}, EM,
     "Write the number as a Roman numeral."),
    ("roman_to_number", "Number Words", "number_format", {"conversion": "from_roman"}, EM,
     "Write the Roman numeral as a number in digits."),
    ("caesar_shift_1", "Ciphers", "cipher", {"kind": "caesar", "shift": 1}, RL,
     "Replace every letter by the next letter of the alphabet (z becomes a); keep the spaces."),
    ("caesar_shift_3", "Ciphers", "cipher", {"kind": "caesar", "shift": 3}, RL,
     "Apply a Caesar cipher: shift every letter 3 places forward in the alphabet (x becomes a); keep the spaces."),
    ("rot13", "Ciphers", "cipher", {"kind": "caesar", "shift": 13}, RL,
     "Encode the text with ROT13: shift every letter 13 places in the alphabet; keep the spaces."),
    ("atbash", "Ciphers", "cipher", {"kind": "atbash"}, RL,
     "Encode the text with the Atbash cipher: a becomes z, b becomes y, and so on; keep the spaces."),
    ("pig_latin", "Ciphers", "cipher", {"kind": "pig_latin"}, RL,
     "Translate into Pig Latin: a word starting with a vowel gets \"way\" added; otherwise its leading "
     "consonants move to the end, followed by \"ay\"."),
    ("next_in_arithmetic_sequence", "Sequences", "sequence", {"kind": "arithmetic"}, EM,
     "Give the next number of the sequence." + _NUMBER),
    ("next_in_decreasing_sequence", "Sequences", "sequence", {"kind": "decreasing"}, EM,
     "Give the next number of the decreasing sequence." + _NUMBER),
    ("next_in_geometric_sequence", "Sequences", "sequence", {"kind": "geometric"}, EM,
     "Each number is the previous one times the same factor. Give the next number." + _NUMBER),
    ("next_in_fibonacci_sequence", "Sequences", "sequence", {"kind": "fibonacci"}, EM,
     "Each number is the sum of the two before it. Give the next number." + _NUMBER),
    ("time_24h_to_12h", "Format Conversion", "format_conversion", {"conversion": "time_24_to_12"}, EM,
     "Convert the time from the 24-hour clock to the 12-hour clock with AM or PM, like \"2:05 PM\"."),
    ("time_12h_to_24h", "Format Conversion", "format_conversion", {"conversion": "time_12_to_24"}, EM,
     "Convert the time from the 12-hour clock to the 24-hour clock, like \"14:05\"."),
    ("digits_to_words", "Format Conversion", "format_conversion", {"conversion": "digits_to_words"}, RL,
     "Write each digit of the number as an English word, separated by single spaces."),
    ("camel_case_to_words", "Format Conversion", "format_conversion", {"conversion": "camel_to_words"}, EM,
     "Split the camelCase identifier into its words, in lower case, separated by single spaces."),
    ("remove_duplicate_words", "Word Sets", "word_sets", {"op": "dedupe"}, RL,
     "Remove repeated words: keep only the first occurrence of each word, in order."),
    ("word_in_list", "Word Sets", "word_sets", {"op": "membership"}, EM,
     "Is the word in the list? Answer \"yes\" or \"no\"."),
    ("common_words", "Word Sets", "word_sets", {"op": "common"}, RL,
     "List the words of list 1 that also appear in list 2, in the order of list 1."),
    ("words_only_in_first_list", "Word Sets", "word_sets", {"op": "only_first"}, RL,
     "List the words of list 1 that do not appear in list 2, in the order of list 1."),
    ("replace_word", "Text Editing", "text_edit", {"op": "replace"}, RL,
     "Rewrite the text, replacing every occurrence of the given word with the new word."),
    ("delete_word", "Text Editing", "text_edit", {"op": "delete"}, RL,
     "Rewrite the text without any occurrence of the given word."),
    ("duplicate_each_word", "Text Editing", "text_edit", {"op": "duplicate"}, RL,
     "Write every word of the input twice in a row."),
    ("keep_every_second_word", "Text Editing", "text_edit", {"op": "every_second"}, RL,
     "Keep the first, third, fifth (and so on) words of the input and drop the others."),
]  # fmt: skip

SPECS: tuple[TaskSpec, ...] = tuple(
    TaskSpec(name=name, category=category, family=fam, params=params, metric=metric, definition=definition)
    for name, category, fam, params, metric, definition in _TABLE
)
SPEC_BY_NAME: dict[str, TaskSpec] = {spec.name: spec for spec in SPECS}
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(spec.category for spec in SPECS))
# Held out whole (unseen tasks): a mix of exact-match and free-text categories.
UNSEEN_CATEGORIES: tuple[str, ...] = ("Comparison", "Date Conversion", "Sequences", "Text Editing")
DEFAULT_TRAIN = 100
DEFAULT_HELDOUT = 100


def default_split() -> tuple[list[str], list[str]]:
    """``(train_tasks, test_tasks)``: the test tasks are those of `UNSEEN_CATEGORIES`."""
    train = [s.name for s in SPECS if s.category not in UNSEEN_CATEGORIES]
    test = [s.name for s in SPECS if s.category in UNSEEN_CATEGORIES]
    return train, test


def _unique(spec: TaskSpec, rng: random.Random, count: int, taken: set[str]) -> list[tuple[str, str]]:
    pairs = []
    attempts = 0
    while len(pairs) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(
                f"task {spec.name!r}: could not draw {count} distinct inputs (got {len(pairs)}); "
                f"ask for fewer instances"
            )
        source, target = spec.generate(rng)
        if source not in taken:
            taken.add(source)
            pairs.append((source, target))
    return pairs


def generate_task(spec: TaskSpec, seed: int = 0, n_train: int = DEFAULT_TRAIN, n_heldout: int = DEFAULT_HELDOUT
                  ) -> tuple[Task, Task]:  # fmt: skip
    """``(training task, held-out task)`` of ``spec``: same definition and examples, distinct inputs.

    The examples come first, then the held-out instances, then the training instances, each
    from its own stream, so held-out instances do not depend on ``n_train``.
    """
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"n_train={n_train}, n_heldout={n_heldout}: expected numbers >= 0")
    taken: set[str] = set()
    stream = f"flora-suite/{seed}/{spec.name}"
    examples = _unique(spec, random.Random(f"{stream}/examples"), 3, taken)
    heldout = _unique(spec, random.Random(f"{stream}/heldout"), n_heldout, taken)
    train = _unique(spec, random.Random(f"{stream}/train"), n_train, taken)
    positive = [Example(i, o, f"Following the definition, the output for this input is \"{o}\".")
                for i, o in examples[:2]]  # fmt: skip
    wrong_input, right = examples[2]
    wrong = next((o for o in (examples[0][1], examples[1][1], wrong_input) if o != right), f"{right} {right}")
    negative = [Example(wrong_input, wrong, f'The output should be "{right}".')]

    def task(pairs: list[tuple[str, str]], part: str) -> Task:
        return Task(
            name=spec.name,
            definition=spec.definition,
            categories=[spec.category],
            positive_examples=positive,
            negative_examples=negative,
            instances=[Instance(f"{spec.name}-{part}-{i:04d}", s, (t,)) for i, (s, t) in enumerate(pairs)],
            metric=spec.metric,
            extra={"Source": ["flora synthetic suite"], "Input_language": ["English"],
                   "Output_language": ["English"], "Instruction_language": ["English"], "Flora_seed": seed},
        )  # fmt: skip

    return task(train, "train"), task(heldout, "heldout")


@dataclass
class Suite:
    """The generated suite: per task a training and a held-out `Task`, and the default split."""

    seed: int
    n_train: int
    n_heldout: int
    train: list[Task]
    heldout: list[Task]
    train_tasks: list[str]
    test_tasks: list[str]

    def seen(self, task: str) -> bool:
        return task in self.train_tasks

    def export(self, directory: str | Path) -> Path:
        """Write ``train/<task>.json``, ``heldout/<task>.json`` (SNI files), the default split
        ``splits/default/{train,test}_tasks.txt`` and ``suite.json`` (how it was generated)."""
        directory = Path(directory)
        for part, tasks in (("train", self.train), ("heldout", self.heldout)):
            for task in tasks:
                write_sni_task(task, directory / part / f"{task.name}.json")
        split = directory / "splits" / "default"
        write_text_atomic(split / "train_tasks.txt", "".join(f"{n}\n" for n in self.train_tasks))
        write_text_atomic(split / "test_tasks.txt", "".join(f"{n}\n" for n in self.test_tasks))
        info = {
            "generator": "flora built-in task suite",
            "seed": self.seed,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "tasks": len(self.train),
            "unseen_categories": [c for c in UNSEEN_CATEGORIES if any(t.category == c for t in self.heldout)],
        }
        write_text_atomic(directory / "suite.json", json.dumps(info, indent=1) + "\n")
        return directory


def select_specs(names: Iterable[str] | None = None) -> list[TaskSpec]:
    """The specs named (task names or categories), in table order; all when ``names`` is None."""
    if names is None:
        return list(SPECS)
    wanted = list(names)
    unknown = [n for n in wanted if n not in SPEC_BY_NAME and n not in CATEGORIES]
    if unknown:
        raise KeyError(
            f"unknown suite task or category {', '.join(map(repr, unknown))} "
            f"(see `flora tasks list`; categories: {', '.join(CATEGORIES)})"
        )
    return [s for s in SPECS if s.name in wanted or s.category in wanted]


def build_suite(
    seed: int = 0,
    n_train: int = DEFAULT_TRAIN,
    n_heldout: int = DEFAULT_HELDOUT,
    tasks: Sequence[str] | None = None,
) -> Suite:
    """Generate the suite (or the named tasks/categories of it) from ``seed``."""
    specs = select_specs(tasks)
    pairs = [generate_task(spec, seed, n_train, n_heldout) for spec in specs]
    train_tasks, test_tasks = default_split()
    names = {s.name for s in specs}
    return Suite(
        seed=seed,
        n_train=n_train,
        n_heldout=n_heldout,
        train=[p[0] for p in pairs],
        heldout=[p[1] for p in pairs],
        train_tasks=[n for n in train_tasks if n in names],
        test_tasks=[n for n in test_tasks if n in names],
    )
