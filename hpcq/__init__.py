"""hpcq: per-layer k-means quantization of trained classifiers, retrained without labels."""

__version__ = "0.1.0"
