"""Layer 3: a text GGUF + mmproj pair.  ``check`` decides from the headers whether llama.cpp
can run it (with its data tables ``boundary_tokens``, ``runtime_defects``, ``text_fit`` and
``requirements``, what llama.cpp's loader and graphs need of each projector type, applied by
``requirements_fit``; ``chat_template`` renders the text model's template within a budget);
``engine`` is the one door to llama-cpp-python; ``runtime.Pair`` loads and runs a pair that
check passed."""
