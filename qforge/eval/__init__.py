"""Evaluation: generation, task accuracy, the method bench."""
