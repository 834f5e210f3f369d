"""Model compression: magnitude (unstructured) and channel (structured) pruning."""
