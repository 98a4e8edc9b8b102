"""Reinforcement learning (GSPO / GRPO) with in-process rollouts.

`run_gspo(cfg)` (megagsm.rl.trainer) is the entry point launch/train.py dispatches to for
algorithm.name=gspo; it is imported lazily so that `megagsm.rl.losses` stays a light import.
"""


def __getattr__(name):
    if name in ("run_gspo", "GSPORun"):
        from megagsm.rl import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'megagsm.rl' has no attribute {name!r}")
