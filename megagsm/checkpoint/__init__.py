"""Every checkpoint megagsm reads or writes, in one package: trainer checkpoints (manager), model
weights (model_weights: the one loader), the side files and manifest that make a checkpoint
self-describing (manifest), and the HF <-> megatron converters (hf_to_mcore, mcore_to_hf, verify).
The CLI is `python -m checkpoints_tools`."""
