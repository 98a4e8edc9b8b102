"""Checkpoint conversion between Hugging Face safetensors and megatron torch_dist checkpoints.
The CLI is `python -m checkpoints_tools`; trainers may call hf_to_mcore / mcore_to_hf directly.

Importing this package makes every torch_dist load in the process refuse pickled code
(safe_pickle.install(): `.metadata`, byte objects and megatron's common.pt go through restricted
unpicklers)."""
from megagsm.checkpoint import safe_pickle

safe_pickle.install()
