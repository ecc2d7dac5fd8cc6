"""rlm-example-plugin: a third-party package that extends every kind of rlm plugin without touching rlm.

It registers, through one entry point of the ``rlm`` group (see ``pyproject.toml``):

* ``sign_consensus`` — a merge method with a ``paper`` preset (:mod:`.merge`);
* ``max_update`` — a task-vector metric with its own report section and figure (:mod:`.metric`);
* ``letter_count`` — a generated task with a verifier (:mod:`.task`);
* ``median_rl`` — an RL trainer with its own advantage estimator, a group-median baseline (:mod:`.trainer`).

Everything heavy (torch, matplotlib) is imported inside functions, so ``rlm --help`` stays fast.
"""

from rlm.core.hookspecs import hookimpl


@hookimpl
def register_merge_methods(register):
    from rlm_example_plugin.merge import SignConsensus

    register(SignConsensus)


@hookimpl
def register_metrics(register):
    from rlm_example_plugin.metric import MaxUpdate

    register(MaxUpdate)


@hookimpl
def register_tasks(register):
    from rlm_example_plugin.task import LetterCount

    register(LetterCount)


@hookimpl
def register_trainers(register):
    from rlm_example_plugin.trainer import MedianRL

    register(MedianRL)
