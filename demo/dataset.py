"""The demo's embedded dataset: a few hundred instruction examples of our own writing.

The task is one a tiny random model can visibly learn in a minute of CPU training: answer
"what sound does a <animal> make" style questions, phrased several ways, with one fixed
answer shape ("A cow says moo."). Before training the model prints noise; after it, the
answer shape and most of the sounds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "horse": "neigh",
    "owl": "hoot",
    "lion": "roar",
    "snake": "hiss",
    "frog": "croak",
    "mouse": "squeak",
    "bee": "buzz",
    "crow": "caw",
    "goat": "bleat",
    "wolf": "howl",
    "donkey": "bray",
    "rooster": "crow",
    "turkey": "gobble",
    "dove": "coo",
}

QUESTIONS = [
    "What sound does a {animal} make?",
    "What does a {animal} say?",
    "Which noise comes from a {animal}?",
    "Tell me the sound of a {animal}.",
    "How does a {animal} sound?",
    "If you meet a {animal}, what do you hear?",
    "Name the sound a {animal} makes.",
    "What noise would a {animal} make?",
    "A {animal} makes which sound?",
    "Describe the call of a {animal}.",
    "What do we hear from a {animal}?",
    "Say the sound of a {animal}.",
    "Which sound belongs to a {animal}?",
    "What is the noise of a {animal}?",
    "Can you tell me what a {animal} says?",
]

SAMPLE_PROMPT = "What sound does a cow make?"


def examples() -> list[dict[str, str]]:
    """Every (question phrasing, animal) pair as an Alpaca-style record, shuffled reproducibly."""
    rows = [
        {"instruction": q.format(animal=animal), "input": "", "output": f"A {animal} says {sound}."}
        for q in QUESTIONS
        for animal, sound in SOUNDS.items()
    ]
    random.Random(0).shuffle(rows)
    return rows


def write_jsonl(path: Path) -> int:
    """Write the dataset as JSON lines; returns the number of records."""
    rows = examples()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


if __name__ == "__main__":
    print(len(examples()), "examples")
