"""Natural-language rendering of the ``puzzle`` task's Knights and Knaves puzzles: statements as English
sentences, the prompt, the answer line and a step-by-step reference response."""

from __future__ import annotations

from typing import Sequence

from rlm.plugins.tasks.puzzle.logic import Statement, evaluate


def role_word(knight: bool) -> str:
    return "knight" if knight else "knave"


def render(stmt: Statement, names: Sequence[str], speaker: int, top: bool = True) -> str:
    op = stmt[0]
    if op == "is":
        who = "I am" if stmt[1] == speaker else f"{names[stmt[1]]} is"
        return f"{who} a {role_word(stmt[2])}"
    if op == "not":
        inner = stmt[1]
        if inner[0] == "is":
            who = "I am" if inner[1] == speaker else f"{names[inner[1]]} is"
            return f"{who} not a {role_word(inner[2])}"
        else:
            text = f"it is false that {render(inner, names, speaker, False)}"
    elif op in ("and", "or"):
        text = f" {op} ".join(render(s, names, speaker, False) for s in stmt[1:])
    elif op == "imp":
        text = f"if {render(stmt[1], names, speaker, False)} then {render(stmt[2], names, speaker, False)}"
    else:
        text = f"{render(stmt[1], names, speaker, False)} if and only if {render(stmt[2], names, speaker, False)}"
    return text if top else f"({text})"


INTRO = ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, and "
         "knaves always lie. You meet {n} inhabitants: {people}.")
FORMAT = ("Who is a knight and who is a knave? Reason step by step, then end with one line of the form "
          "\"ANSWER: {example}\" naming every inhabitant.")


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def prompt(statements: Sequence[Statement], names: Sequence[str]) -> str:
    n = len(statements)
    people = ", ".join(names[:-1]) + f" and {names[-1]}" if n > 1 else names[0]
    lines = [INTRO.format(n=n, people=people)]
    lines += [f'{names[i]} says: "{_sentence(render(s, names, i))}."' for i, s in enumerate(statements)]
    example = ", ".join(f"{nm} is a {'knight' if k % 2 == 0 else 'knave'}" for k, nm in enumerate(names[:2]))
    lines.append(FORMAT.format(example=example + (", ..." if n > 2 else "")))
    return "\n".join(lines)


def answer_line(truth: Sequence[bool], names: Sequence[str]) -> str:
    return "ANSWER: " + ", ".join(f"{nm} is a {role_word(k)}" for nm, k in zip(names, truth))


def reference(statements: Sequence[Statement], truth: Sequence[bool], names: Sequence[str]) -> str:
    """An SFT response: the candidate assignment, each statement checked against it, uniqueness, answer."""
    lines = ["Each knight's statement must be true and each knave's statement must be false. "
             "Consider the assignment: " + ", ".join(f"{nm} is a {role_word(k)}" for nm, k in zip(names, truth))
             + "."]
    for i, s in enumerate(statements):
        val = bool(evaluate(s, tuple(truth)))
        lines.append(f'- {names[i]} says "{_sentence(render(s, names, i))}". Under this assignment the statement '
                     f"is {'true' if val else 'false'}, so {names[i]} is a {role_word(val)}, which is consistent.")
    lines.append(f"Every other assignment of the {len(names)} roles makes at least one statement contradict its "
                 "speaker's role, so this is the only solution.")
    lines.append(answer_line(truth, names))
    return "\n".join(lines)
