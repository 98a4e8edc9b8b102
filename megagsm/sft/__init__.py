"""Supervised fine-tuning: `megagsm.sft.trainer.run_sft(cfg)` (launched by launch/train.py with
algorithm.name=sft), its data stream (`data`), LR schedule (`optim`), evaluation (`evaluation`,
`greedy`), checkpoints (`checkpoint`) and HF export (`export`)."""
