"""Training: data, configuration, the loop and its checkpoints."""
