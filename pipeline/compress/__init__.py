"""Model compression and its measurement: pruning (unstructured, structured), int8 quantization, measure."""
