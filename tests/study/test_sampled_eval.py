"""Sampled evaluation in a study (``eval.temperature``, ``eval.n``): the config's checks, the step keys of greedy
studies, and per-example scores as the mean of an example's samples, checked against a backend whose right and
wrong answers are known in advance."""

from __future__ import annotations

import re

import pytest

from rlm.core.contracts import Generation, GenerationBackend
from rlm.core.study.config import EvalConfig
from rlm.core.study.plan import plan_steps
from rlm.core.study.presets import load_experiment
from rlm.core.study.steps import _decoding, evaluate_loaded
from rlm.core.study.summary import decoding_text


def test_eval_config_sampling_fields():
    assert EvalConfig().decoding() == {}
    assert EvalConfig(temperature=0.7, n=2).decoding() == {"temperature": 0.7, "top_p": 1.0, "n": 2, "seed": 0}
    for bad in ({"n": 2}, {"top_p": 0.9}):
        with pytest.raises(ValueError, match="greedy decoding"):
            EvalConfig(**bad)
    with pytest.raises(ValueError):
        EvalConfig(temperature=-0.1)
    with pytest.raises(ValueError):
        EvalConfig(temperature=0.7, n=0)
    assert decoding_text(None) == decoding_text({"temperature": 0.0}) == "greedy"
    assert decoding_text({"temperature": 0.7, "top_p": 1.0, "n": 2, "seed": 3}) == (
        "sampled at temperature 0.7, top-p 1, 2 samples per example, an example scoring their mean (pass@1 "
        "estimated from samples); seed 3 for every model")
    assert decoding_text({"temperature": 1.0, "top_p": 0.9, "n": 1, "seed": 0}).startswith(
        "sampled at temperature 1, top-p 0.9, 1 sample per example (pass@1")
    assert _decoding({"max_new_tokens": 8}) == "greedy"
    assert _decoding({"temperature": 0.5, "n": 4}) == {"temperature": 0.5, "top_p": 1.0, "n": 4, "seed": 0}


def _eval_configs(cfg) -> dict[str, dict]:
    return {s.name: s.config["eval"] for s in plan_steps(cfg) if s.name.startswith("eval_")}


def test_greedy_studies_keep_their_step_config_and_sampling_changes_it():
    greedy = load_experiment("micro")
    sampled = load_experiment("micro", sets=["eval.temperature=0.7", "eval.n=2"])
    g, s = _eval_configs(greedy), _eval_configs(sampled)
    assert g.keys() == s.keys() and g
    for name in g:
        assert set(g[name]) == {"max_new_tokens", "batch_size"}  # what greedy studies had before sampling existed
        assert s[name] == {**g[name], "temperature": 0.7, "top_p": 1.0, "n": 2, "seed": 0}
    report = {s.name: s.config for s in plan_steps(sampled)}["report"]
    assert report["decoding"] == {"temperature": 0.7, "top_p": 1.0, "n": 2, "seed": 0}
    assert "decoding" not in {s.name: s.config for s in plan_steps(greedy)}["report"]


class _KnownAnswers(GenerationBackend):
    """Answers ``What is a + b?`` right (steps and final line) exactly when ``(prompt index + sample index) % 3
    == 0``, else with a wrong sum; records the sampling parameters it was asked for."""

    name = "known-answers"

    def __init__(self) -> None:
        self.params = []

    @classmethod
    def load(cls, model_path, *, device=None, dtype="float32", config=None):  # pragma: no cover - not loaded
        return cls()

    def generate(self, prompts, params):
        self.params.append(params)
        out = []
        for i, p in enumerate(prompts):
            a, b = (int(x) for x in re.search(r"What is (\d+) \+ (\d+)\?", p).groups())
            for j in range(params.n):
                c = a + b if (i + j) % 3 == 0 else a + b + 1
                text = f"{a} + {b} = {c}\n#### {c}"
                out.append(Generation(i, j, p, [1], [2], text, "stop"))
        return out


@pytest.mark.parametrize("n", [1, 3, 4])
def test_an_example_scores_the_mean_of_its_samples(n):
    backend = _KnownAnswers()
    task = {"label": "math", "name": "math", "subset": "gen", "size": 7, "config": {"check_steps": True}}
    ev = {"max_new_tokens": 16, "batch_size": 5, "temperature": 0.7, "top_p": 0.9, "n": n, "seed": 11}
    res = evaluate_loaded(backend, None, task, ev)
    (params,) = backend.params
    assert (params.n, params.temperature, params.top_p, params.seed, params.batch_size) == (n, 0.7, 0.9, 11, 5)
    expected = [sum((i + j) % 3 == 0 for j in range(n)) / n for i in range(7)]
    assert res["n"] == 7 and res["per_example"] == pytest.approx(expected)
    assert res["score"] == pytest.approx(sum(expected) / 7)
    assert res["metrics"]["accuracy"] == pytest.approx(sum(expected) / 7)
    assert len(res["records"]) == 7 * n and len(res["clusters"]) == 7
    if n > 1:
        assert [r["sample"] for r in res["records"][:n]] == list(range(n))
        assert all(r["score"] == float((k // n + k % n) % 3 == 0) for k, r in enumerate(res["records"]))


def test_greedy_evaluation_is_one_answer_per_example():
    backend = _KnownAnswers()
    task = {"label": "math", "name": "math", "subset": "gen", "size": 6, "config": {"check_steps": True}}
    res = evaluate_loaded(backend, None, task, {"max_new_tokens": 16, "batch_size": 8, "n": 5})
    (params,) = backend.params
    assert params.temperature == 0 and params.n == 1  # n is ignored without a temperature
    assert res["per_example"] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert all("sample" not in r for r in res["records"])
