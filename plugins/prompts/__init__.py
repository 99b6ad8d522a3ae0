"""Prompt sources that read user files."""
