"""Checkpoint conversion between Hugging Face safetensors and megatron torch_dist checkpoints.
The CLI is `python -m checkpoints_tools`; trainers may call hf_to_mcore / mcore_to_hf directly."""
