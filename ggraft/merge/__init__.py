"""Task-vector merging of language backbones (HF safetensors and GGUF)."""
