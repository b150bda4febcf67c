"""Layer 1: GGUF files.  ``gguf_file`` is the validated header index every command reads
through (``gguf_layout`` checks the bytes under it); ``output_types`` is the one vocabulary of
output types; ``output`` writes any GGUF (tensor encoding, streaming, the one output-path rule,
atomic replacement); ``numeric`` encodes tensors the way ggml does."""
