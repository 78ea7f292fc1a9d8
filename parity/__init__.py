"""pgconv.parity: layer-by-layer parity harness against transformers."""
