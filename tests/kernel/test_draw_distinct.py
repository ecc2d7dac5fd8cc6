"""``draw_distinct``: seeded draws without a repeated key while the space allows, then rounds."""

import random

from rlm.core.contracts import draw_distinct


def test_each_round_covers_the_space_before_a_key_repeats():
    rng = random.Random(0)
    items = draw_distinct(25, lambda: rng.randint(0, 9), key=lambda v: v)
    assert sorted(items[:10]) == list(range(10)) and sorted(items[10:20]) == list(range(10))
    assert len(set(items[20:])) == 5
    rng = random.Random(0)
    assert draw_distinct(25, lambda: rng.randint(0, 9), key=lambda v: v) == items  # deterministic


def test_key_decides_what_counts_as_a_repeat():
    rng = random.Random(1)
    pairs = draw_distinct(6, lambda: (rng.randint(0, 2), rng.random()), key=lambda p: p[0])
    assert sorted(p[0] for p in pairs[:3]) == [0, 1, 2] and sorted(p[0] for p in pairs[3:]) == [0, 1, 2]
