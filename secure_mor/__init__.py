"""Secure MoR: privacy-hardened federated alignment of vision-language models."""

__version__ = "0.1.0"
