"""Evaluation on held-out problems: `evaluate_model` (used by the trainers every train.eval_interval
steps) and the CLI `python -m megagsm.eval`."""
from megagsm.eval.core import EvalResult, EvalSampling, answer_key, evaluate_model

__all__ = ["EvalResult", "EvalSampling", "answer_key", "evaluate_model"]
