"""Task-vector statistics (``rlm conflicts``): the streaming engines that drive
:class:`rlm.core.contracts.Metric` plugins (eager torch, and fused C kernels for bf16/float32 safetensors)."""
