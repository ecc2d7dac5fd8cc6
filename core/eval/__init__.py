"""Evaluation: generation, the evaluation engine behind ``rlm eval`` / ``rlm score``, the lm-eval bridge and the
sandbox that runs model-written code."""
