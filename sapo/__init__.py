"""sapo: reinforcement-learning fine-tuning of language models with Soft Adaptive Policy Optimization."""

__version__ = "0.1.0"
