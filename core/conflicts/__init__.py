"""Task-vector statistics (``rlm conflicts``): the streaming engines that drive
:class:`rlm.core.contracts.Metric` plugins, one concern per module.

``config`` (:class:`ConflictsConfig`), ``stats`` (the pure statistics and name helpers), ``chunk`` (the block
context handed to metrics), ``pair_topk`` (the base of the top-k pair metrics), ``passes`` (the state both
engines share), ``eager`` (the torch engine), ``fused`` (the compiled kernels' engine,
:mod:`rlm.core.conflicts._kernels`), ``engine`` (choosing the engine and assembling the result), ``over_steps``
(statistics over training steps) and ``report`` (``conflicts.json``, ``report.md`` and the over-steps files)."""
