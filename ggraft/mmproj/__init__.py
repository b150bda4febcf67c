"""Layer 2: the mmproj.  ``converter`` is the shape of a family converter and the one registry
of them (modules in ``ggraft.converters``); ``writer`` turns a converter into an mmproj GGUF
(keys, dtype policy); ``requirements`` is what the installed llama.cpp's loader and graphs
require of an mmproj of each projector type, applied to a header by ``requirements_fit`` (by the
writer before anything is written, and by ``ggraft.pair.check``)."""
