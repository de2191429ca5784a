"""Reproductions of published studies built on the fusionops layers (see README.md)."""
