"""Writes thinking.jsonl, the bundled demo dataset: short questions with a worked thought and an answer.

Deterministic (fixed seed); run ``python so8t/data/make_thinking_dataset.py`` to regenerate.
Each line is ``{"prompt": ..., "thinking": ..., "answer": ...}``.
"""

import json
import random
from pathlib import Path

OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("early", "late"),
    ("open", "closed"), ("light", "dark"), ("full", "empty"), ("young", "old"), ("hard", "soft"),
    ("near", "far"), ("wet", "dry"),
]
PLURALS = [
    ("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("city", "cities"),
    ("leaf", "leaves"), ("foot", "feet"), ("bus", "buses"), ("tooth", "teeth"), ("day", "days"),
    ("goose", "geese"), ("wolf", "wolves"), ("baby", "babies"),
]
UNITS = [  # (from, to, factor)
    ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("liters", "ml", 1000),
]
WORDS = [
    "apple", "river", "stone", "cloud", "pencil", "garden", "window", "planet", "tiger", "bridge", "orange", "sky",
    "music", "lemon", "forest", "candle", "rocket", "island", "butter", "dragon", "mirror", "jacket", "valley", "owl",
]


def addition(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return f"What is {a} + {b}?", f"{a} + {b}: add the ones, then the tens. {a} + {b} = {a + b}.", str(a + b)


def subtraction(rng):
    a, b = rng.randint(20, 99), rng.randint(1, 19)
    return f"What is {a} - {b}?", f"Take {b} from {a}: {a} - {b} = {a - b}.", str(a - b)


def multiplication(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} * {b}?", f"{a} groups of {b}: {a} * {b} = {a * b}.", str(a * b)


def conversion(rng):
    source, target, factor = rng.choice(UNITS)
    amount = rng.randint(2, 9)
    question = f"How many {target} are in {amount} {source}?"
    return question, f"1 {source[:-1] if source.endswith('s') else source} is {factor} {target}, so {amount} * {factor} = {amount * factor}.", f"{amount * factor} {target}"


def opposite(rng):
    word, other = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, other = other, word
    return f"What is the opposite of {word}?", f"{word} and {other} are opposites.", other


def plural(rng):
    word, many = rng.choice(PLURALS)
    if rng.random() < 0.5:
        return f"What is the singular of {many}?", f"Two {many}, one {word}.", word
    return f"What is the plural of {word}?", f"One {word}, two {many}.", many


def letters(rng):
    word = rng.choice(WORDS)
    spelled = "-".join(word)
    return f"How many letters are in {word}?", f"Spell it: {spelled}. That is {len(word)} letters.", str(len(word))


def next_number(rng):
    start, step = rng.randint(1, 20), rng.randint(2, 9)
    sequence = [start + step * i for i in range(4)]
    shown = ", ".join(map(str, sequence))
    return f"What comes next: {shown}?", f"Each number adds {step}. {sequence[-1]} + {step} = {sequence[-1] + step}.", str(sequence[-1] + step)


def larger(rng):
    a, b = rng.sample(range(10, 100), 2)
    big = max(a, b)
    return f"Which is larger, {a} or {b}?", f"Compare tens first: {big} is larger.", str(big)


MAKERS = [addition, subtraction, multiplication, conversion, opposite, plural, letters, next_number, larger]
PER_KIND = 24


def distinct_rows(maker, rng) -> list[tuple[str, str, str]]:
    rows: dict[str, tuple[str, str, str]] = {}
    while len(rows) < PER_KIND:
        row = maker(rng)
        rows.setdefault(row[0], row)
    return list(rows.values())


def main() -> None:
    rng = random.Random(8)
    kinds = [distinct_rows(maker, rng) for maker in MAKERS]
    rows = [kind[i] for i in range(PER_KIND) for kind in kinds]  # interleaved: every batch mixes the kinds
    path = Path(__file__).with_name("thinking.jsonl")
    with path.open("w") as file:
        for prompt, thinking, answer in rows:
            file.write(json.dumps({"prompt": prompt, "thinking": thinking, "answer": answer}) + "\n")
    print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
