"""Layer 1: GGUF files.  ``gguf_file`` is the validated header index every command reads
through (``gguf_layout`` checks the bytes under it); ``output`` writes any GGUF (output types, streaming, the one output-path rule,
atomic replacement); ``numeric`` encodes tensors the way ggml does; ``gguf_inspect``
summarizes a file."""
