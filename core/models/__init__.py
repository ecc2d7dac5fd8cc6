"""Models: Hugging Face directories (resolve, load, save; :mod:`.hf`), the tiny preset (:mod:`.tiny`), GGUF
export (:mod:`.gguf`) and streaming safetensors reading and writing (:mod:`.safetensors_io`)."""
