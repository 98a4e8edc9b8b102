"""Reinforcement learning with in-process rollouts: the `GSPO` algorithm of the shared trainer
(megagsm.train), its rollouts (`rollout`), batching (`batching`), losses (`losses`) and update
(`update`). `run_gspo(cfg)` trains as the config says; imported lazily so that `megagsm.rl.losses`
stays a light import."""
from __future__ import annotations


def run_gspo(cfg):
    """Train as `cfg` says. Collective: call on every rank. Returns the TrainResult."""
    from megagsm.rl.gspo import GSPO
    from megagsm.train import Trainer

    return Trainer(cfg, GSPO).fit()
