"""Compression stages: pruning, quantization and side-by-side measurement of the resulting models."""
