"""Meissonic backbone: a checkpoint-compatible transformer on diffusers and transformers."""
