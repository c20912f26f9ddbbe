"""Model loading, layer surgery and 4-bit checkpoints."""
