"""Evaluation: generation, the evaluation engine behind ``rlm eval`` / ``rlm score``, the lm-eval bridge, the
offline NLTK data of lm-eval's IFEval checkers and the sandbox that runs model-written code."""
