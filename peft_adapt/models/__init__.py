"""Base models: resolve a name, load it quantized or not, its fingerprint, task heads."""
