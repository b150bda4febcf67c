"""ggraft's command line: ``main`` wires the ``*_cmd`` modules of this package."""
