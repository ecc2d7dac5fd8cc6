"""Merging: the streaming engine that drives :class:`rlm.core.contracts.MergeMethod` plugins tensor by tensor
(``engine``), and the tensor helpers (``ops``) and configs (``params``) the merge-method plugins share."""
