"""Model compression: pruning and quantization."""
