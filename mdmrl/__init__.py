"""mdmrl: reinforcement-learning post-training of masked diffusion models."""

__version__ = "0.1.0"
