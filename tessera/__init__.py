"""Tessera: train early-fusion, token-based multimodal foundation models (Chameleon-style)."""

__version__ = "0.1.0"
