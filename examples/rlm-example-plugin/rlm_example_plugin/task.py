"""``letter_count``: how often does a letter occur in a word? A generated task with a verifier.

The generator draws words from a fixed alphabet with a seeded random generator (split ``test`` uses another
seed, so test words differ from training words); the verifier reads the last integer of the completion. Every
example has a reference response for SFT; the reward is 1 for the right count, else 0."""

from __future__ import annotations

import random
import re
from typing import Any

from pydantic import Field

from rlm.core.contracts import Example, PluginConfig, Task

INTEGER = re.compile(r"-?\d+")


def make_example(rng: random.Random, index: int, split: str, alphabet: str, min_len: int, max_len: int) -> Example:
    """One word, one letter of it (or not), the count as the answer."""
    word = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
    letter = rng.choice(alphabet)
    count = word.count(letter)
    prompt = (f"How many times does the letter '{letter}' occur in the word '{word}'? "
              f"End with the number alone on the last line.")
    reference = f"The word {word} has {count} '{letter}'.\n{count}"
    return Example(id=f"letters/{split}/{index}", prompt=prompt, answer=count, reference=reference,
                   meta={"word": word, "letter": letter})


def last_integer(completion: Any) -> int | None:
    """The last integer in the completion, or None."""
    found = INTEGER.findall(completion if isinstance(completion, str) else "")
    return int(found[-1]) if found else None


class LetterCount(Task):
    """Count a letter in a word; reward 1 when the last integer of the completion is the count."""

    name = "letter_count"
    subsets = {"gen": "seeded words over a small alphabet (the default)"}

    class Config(PluginConfig):
        num_examples: int = Field(500, ge=1, description="examples when no limit is given")
        alphabet: str = Field("abcde", min_length=1)
        min_length: int = Field(3, ge=1)
        max_length: int = Field(8, ge=1)
        test_seed_offset: int = Field(99_991, description="split 'test' draws with seed + this offset")

    def examples(self, subset: str | None = None, *, split: str = "train", limit: int | None = None,
                 seed: int = 0, path: str | None = None) -> list[Example]:
        from rlm.core.errors import RlmError

        self.check_subset(subset)
        if path is not None:
            raise RlmError("the letter_count task has no data files: its examples come from its generator")
        c = self.config
        if c.min_length > c.max_length:
            raise RlmError(f"letter_count config: min_length {c.min_length} > max_length {c.max_length}")
        rng = random.Random(seed + (c.test_seed_offset if split == "test" else 0))
        return [make_example(rng, i, split, c.alphabet, c.min_length, c.max_length)
                for i in range(limit or c.num_examples)]

    def reward(self, example: Example, completion: str) -> float:
        return 1.0 if last_integer(completion) == example.answer else 0.0
