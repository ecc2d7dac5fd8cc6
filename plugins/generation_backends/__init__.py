"""Built-in generation backends: ``hf`` (transformers) and ``vllm`` (vLLM's offline engine)."""
