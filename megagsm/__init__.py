"""megagsm: a Megatron-first post-training stack (SFT and GSPO on GSM8K-style math)."""
__version__ = "0.1.0"
