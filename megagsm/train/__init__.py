"""The shared training base: one `Trainer` (runtime, model, optimizer, evaluation, checkpoints,
export) that runs an algorithm (megagsm.sft.step.SFT, megagsm.rl.gspo.GSPO) step by step."""
from megagsm.train.trainer import Algorithm, Trainer, TrainResult

__all__ = ["Algorithm", "Trainer", "TrainResult"]
