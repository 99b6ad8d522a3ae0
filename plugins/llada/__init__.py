"""LLaDA backbone: the masked diffusion language model, written in this project, loading published checkpoints."""
