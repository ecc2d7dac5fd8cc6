"""The built-in merge methods (``averaging``, ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``), each
a plugin module built on the shared helpers in :mod:`rlm.core.merge.ops` and configs in
:mod:`rlm.core.merge.params`."""
