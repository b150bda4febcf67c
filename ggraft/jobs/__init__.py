"""Layer 4: the jobs the CLI offers, each a library call: verify, graft, audit, inspect, serve,
pack, merge, bridge, probe (convert is ``ggraft.mmproj.writer.convert``; run is
``ggraft.pair.runtime.Pair``)."""
