"""Plug-ins for other RL frameworks: `sapo.integrations.trl` (TRL's GRPOTrainer) and `sapo.integrations.verl`
(verl's policy-loss registry). Import the submodule you need; nothing here imports trl or verl."""
