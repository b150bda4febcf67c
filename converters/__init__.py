"""Family converters, one module each; ``ggraft.converter.discover`` imports them all."""
