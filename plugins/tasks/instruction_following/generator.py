"""Offline generator of the ``instruction_following`` task's ``generated`` subset: a topic prompt plus 1-3
verifiable IFEval constraints (described in the registry's own words), and a reference response built to meet
them and checked with the strict checker.

A reference is built in four steps, each drawing from the same seeded ``random.Random`` in a fixed order:
content (sentences, keywords, placeholders, highlights), layout (bullets, paragraphs), decoration (title,
postscript, ending, punctuation, case, quotes) and finally the measured constraints (word count, letter
frequency), whose kwargs describe the finished text.
"""

from __future__ import annotations

import random
import re
from typing import Any

from rlm.core.errors import RlmError
from rlm.plugins.tasks.instruction_following.checks import check, registry

TOPICS = ("the water cycle", "honey bees", "the history of bicycles", "volcanoes", "learning a new language",
          "city gardens", "the moon", "public libraries", "recycling plastic", "the first computers",
          "sleep and memory", "coral reefs", "trains in winter", "the printing press", "desert plants",
          "rainforests", "chess openings", "the human heart", "wind energy", "ancient maps",
          "healthy breakfasts", "deep sea fish", "mountain hiking", "the invention of paper", "bird migration",
          "solar eclipses", "small businesses", "jazz music", "glaciers", "the internet")
TEMPLATES = ("Write a short essay about {t}.", "Explain {t} to a curious teenager.",
             "Write a blog post about {t}.", "Describe {t} for a school newsletter.",
             "Give an overview of {t}.", "Write a brief report on {t}.")
_SENTENCES = ("{T} is a subject that many people find interesting.",
              "There are several facts about {t} that are worth knowing.",
              "Scientists and writers have studied {t} for a long time.",
              "One useful way to think about {t} is to look at small details.",
              "Many people learn about {t} at school or from books.",
              "The story of {t} shows how the world keeps changing.",
              "It is easy to see why {t} matters in daily life.",
              "Learning more about {t} can be fun and rewarding.",
              "Some questions about {t} still have no final answer.",
              "Anyone can explore {t} with a little patience.")
_WORDS = ("river", "lantern", "harvest", "compass", "meadow", "signal", "window", "garden", "pocket", "thunder",
          "marble", "ladder", "orbit", "canyon", "feather", "puzzle", "candle", "harbor", "velvet", "anchor")
_ENDINGS = ("Is there anything else I can help with?", "Let me know if you have additional questions.",
            "Any other questions?")

# constraint ids the generator draws from (each has a builder below)
GENERATOR_IDS = ("punctuation:no_comma", "change_case:english_lowercase", "change_case:english_capital",
                 "startend:end_checker", "startend:quotation", "detectable_content:postscript",
                 "detectable_format:title", "keywords:existence", "keywords:forbidden_words",
                 "detectable_format:number_highlighted_sections", "detectable_format:number_bullet_lists",
                 "length_constraints:number_paragraphs", "detectable_content:number_placeholders",
                 "length_constraints:number_words", "keywords:letter_frequency", "keywords:frequency")


def _conflicts(a: str, b: str) -> bool:
    c = registry().INSTRUCTION_CONFLICTS
    return a == b or b in c.get(a, ()) or a in c.get(b, ())


def describe(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """The registry's own description text for an instruction with these kwargs."""
    inst = registry().INSTRUCTION_DICT[instruction_id](instruction_id)
    return inst.build_description(**{k: v for k, v in kwargs.items() if v is not None})


def _add_content(kw: dict[str, dict[str, Any]], sents: list[str], rng: random.Random) -> None:
    """Content constraints: keywords present / repeated / forbidden, placeholders and highlighted sentences
    (``sents`` is edited in place, ``kw`` filled)."""
    words = rng.sample(_WORDS, 6)
    if "keywords:existence" in kw:
        keys = words[:2]
        kw["keywords:existence"] = {"keywords": keys}
        sents.insert(1, f"It reminds me of the {keys[0]} and the {keys[1]}.")
    if "keywords:frequency" in kw:
        key, freq = words[2], rng.randint(2, 3)
        kw["keywords:frequency"] = {"keyword": key, "frequency": freq, "relation": "at least"}
        sents.extend(f"The word {key} appears here too." for _ in range(freq))
    if "keywords:forbidden_words" in kw:
        kw["keywords:forbidden_words"] = {"forbidden_words": words[4:6]}
    if "detectable_content:number_placeholders" in kw:
        n = rng.randint(1, 3)
        kw["detectable_content:number_placeholders"] = {"num_placeholders": n}
        sents.append("You can visit " + " or ".join(f"[place {i + 1}]" for i in range(n)) + ".")
    if "detectable_format:number_highlighted_sections" in kw:
        n = rng.randint(1, 3)
        kw["detectable_format:number_highlighted_sections"] = {"num_highlights": n}
        for i in range(n):
            sents[i] = f"*{sents[i]}*"


def _lay_out(kw: dict[str, dict[str, Any]], sents: list[str], rng: random.Random) -> str:
    """The sentences joined into a body: a bullet list at the end, ``***``-separated paragraphs, or one
    paragraph."""
    if "detectable_format:number_bullet_lists" in kw:
        n = min(rng.randint(2, 5), len(sents))
        kw["detectable_format:number_bullet_lists"] = {"num_bullets": n}
        head, tail = sents[:-n], sents[-n:]
        blocks = [" ".join(head)] if head else []
        blocks.append("\n".join(f"* {s}" for s in tail))
        return "\n\n".join(blocks)
    if "length_constraints:number_paragraphs" in kw:
        n = rng.randint(2, min(4, len(sents)))
        kw["length_constraints:number_paragraphs"] = {"num_paragraphs": n}
        size = -(-len(sents) // n)
        paras = [" ".join(sents[i * size:(i + 1) * size]) for i in range(n)]
        paras = [p for p in paras if p]
        if len(paras) != n:
            paras = [" ".join(sents[:len(sents) - n + 1])] + sents[len(sents) - n + 1:]
        return "\n\n***\n\n".join(paras)
    return " ".join(sents)


def _decorate(kw: dict[str, dict[str, Any]], body: str, topic: str, rng: random.Random) -> str:
    """Title, postscript and ending added; commas removed, case changed and quotes put around as asked."""
    if "detectable_format:title" in kw:
        body = f"<<{topic.title()}>>\n\n{body}"
    if "detectable_content:postscript" in kw:
        marker = rng.choice(("P.S.", "P.P.S"))
        kw["detectable_content:postscript"] = {"postscript_marker": marker}
        body += f"\n\n{marker} Thank you for reading about {topic}."
    if "startend:end_checker" in kw:
        end = rng.choice(_ENDINGS)
        kw["startend:end_checker"] = {"end_phrase": end}
        body += f"\n\n{end}"
    if "punctuation:no_comma" in kw:
        body = body.replace(",", "")
    if "change_case:english_lowercase" in kw:
        body = body.lower()
    if "change_case:english_capital" in kw:
        body = body.upper()
    if "startend:quotation" in kw:
        body = f'"{body}"'
    return body


def _measure(kw: dict[str, dict[str, Any]], body: str, rng: random.Random) -> None:
    """Kwargs of the constraints measured on the finished body: word count and letter frequency."""
    if "length_constraints:number_words" in kw:
        n_words = len(re.findall(r"\w+", body))
        if rng.random() < 0.5:
            kw["length_constraints:number_words"] = {"relation": "at least", "num_words": max(5, n_words // 10 * 10)}
        else:
            kw["length_constraints:number_words"] = {"relation": "less than", "num_words": (n_words // 10 + 2) * 10}
    if "keywords:letter_frequency" in kw:
        letter = rng.choice("etaoinsrh")
        count = body.lower().count(letter)
        if rng.random() < 0.5 and count >= 2:
            kw["keywords:letter_frequency"] = {"letter": letter, "let_frequency": max(1, count // 2),
                                               "let_relation": "at least"}
        else:
            kw["keywords:letter_frequency"] = {"letter": letter, "let_frequency": count + rng.randint(3, 10),
                                               "let_relation": "less than"}


def _build(ids: list[str], rng: random.Random, topic: str, n_sent: int) -> tuple[str, list[dict[str, Any]]]:
    """Build a response meeting all ``ids`` and the kwargs describing them (one per id, in order)."""
    sents = [s.format(t=topic, T=topic[0].upper() + topic[1:]) for s in rng.sample(_SENTENCES, n_sent)]
    kw: dict[str, dict[str, Any]] = {i: {} for i in ids}
    _add_content(kw, sents, rng)
    body = _decorate(kw, _lay_out(kw, sents, rng), topic, rng)
    _measure(kw, body, rng)
    return body, [kw[i] for i in ids]


def generate(n: int, seed: int = 0, min_constraints: int = 1, max_constraints: int = 3,
             min_sentences: int = 4, max_sentences: int = 7, max_tries: int = 50) -> list[dict[str, Any]]:
    """``n`` IFEval-format rows (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``) plus ``reference``,
    a response that the registry's strict checker accepts for every constraint (checked here; rows whose
    reference fails are redrawn)."""
    if not 1 <= min_constraints <= max_constraints:
        raise RlmError(f"need 1 <= min_constraints <= max_constraints, got {min_constraints}, {max_constraints}")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for idx in range(n):
        for _ in range(max_tries):
            k = rng.randint(min_constraints, max_constraints)
            ids: list[str] = []
            for cand in rng.sample(GENERATOR_IDS, len(GENERATOR_IDS)):
                if len(ids) == k:
                    break
                if not any(_conflicts(cand, other) for other in ids):
                    ids.append(cand)
            topic = rng.choice(TOPICS)
            task = rng.choice(TEMPLATES).format(t=topic)
            reference, kwargs = _build(ids, rng, topic, rng.randint(min_sentences, max_sentences))
            prompt = " ".join([task] + [describe(i, kw) for i, kw in zip(ids, kwargs)])
            if all(check(prompt, ids, kwargs, reference)):
                rows.append({"key": f"gen-{seed}-{idx}", "prompt": prompt, "instruction_id_list": ids,
                             "kwargs": kwargs, "reference": reference})
                break
        else:  # pragma: no cover - the builders are designed to succeed
            raise RlmError(f"could not generate a consistent constraint example after {max_tries} tries")
    return rows
