"""Builders of damaged inputs for ``tests/test_damaged_inputs.py``: each takes a good input and
returns a copy with one thing wrong (a GGUF key retyped, a safetensors header field, a config
value, an image)."""
