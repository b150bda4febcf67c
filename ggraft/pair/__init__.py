"""Layer 3: a text GGUF + mmproj pair.  ``check`` decides from the headers whether llama.cpp
can run it: it reads them through ``headers`` and ``vocab``, runs its own checks and those of
``token_checks`` (boundary tokens, the [IMG_BREAK] row) and ``text_fit``, with the data tables
``boundary_tokens``, ``runtime_defects``, ``text_fit`` and ``ggraft.mmproj.requirements``, and
what the installed llama.cpp knows (``libmtmd``); its results are ``findings``.
``chat_template`` renders the text model's template within a budget; ``engine`` is the one door
to llama-cpp-python; ``runtime.Pair`` loads and runs a pair that check passed."""
