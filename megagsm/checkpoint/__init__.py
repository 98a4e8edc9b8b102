"""Every checkpoint megagsm reads or writes, in one package: trainer checkpoints (manager), model
weights (model_weights: the one loader), the side files and manifest that make a checkpoint
self-describing (manifest, integrity), and the HF <-> megatron converters (hf_to_mcore, mcore_to_hf,
verify). The CLI is `python -m checkpoints_tools`.

Importing this package makes every torch_dist load in the process refuse pickled code
(safe_pickle.install(): `.metadata`, byte objects and megatron's common.pt go through restricted
unpicklers)."""
from megagsm.checkpoint import safe_pickle

safe_pickle.install()
