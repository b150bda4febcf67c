"""Layer 2: the mmproj.  ``converter`` is the shape of a family converter and the one registry
of them (modules in ``ggraft.converters``); ``writer`` turns a converter into an mmproj GGUF
(keys, dtype policy)."""
