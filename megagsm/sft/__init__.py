"""Supervised fine-tuning: the `SFT` algorithm of the shared trainer (megagsm.train), its data
stream (`data`) and memory-efficient loss (`fused_ce`). `run_sft(cfg)` trains as the config says."""
from __future__ import annotations


def run_sft(cfg):
    """Train, evaluate, checkpoint and export as `cfg` says. Collective: call on every rank."""
    from megagsm.sft.step import SFT
    from megagsm.train import Trainer

    return Trainer(cfg, SFT).fit()
