"""Models: Hugging Face directories (resolve, load, save; :mod:`.hf`), the tiny preset (:mod:`.tiny`), GGUF
export (:mod:`.gguf`), streaming reads of model directories (:mod:`.reader`) and LoRA adapters (:mod:`.lora`),
checking a set of models against a base (:mod:`.validate`) and sharded safetensors writing (:mod:`.writer`)."""
