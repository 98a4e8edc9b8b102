"""Reinforcement learning (GSPO / GRPO)."""
