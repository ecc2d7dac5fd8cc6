"""Training engines shared by the trainer plugins, one concern per module: configs (``config``), data order and
token batches (``data``), the pure RL functions (``algorithms``), the response forward pass (``forward``), the
session and its step loop (``session``, composing ``run_dir``, ``checkpoints``, ``metrics_log`` and ``policy``),
and the loops: SFT (``sft``), RFT (``rft``) and RL (``rl``: the RL trainer contract; ``rl_engine``: the loop,
with ``rollout`` and ``critic``). Dependencies go one way: algorithms ← forward ← session ← sft / rft /
rl_engine."""
