"""The streaming merge engine that drives :class:`rlm.core.contracts.MergeMethod` plugins tensor by tensor."""
