"""Former name of the lean decode path, kept so that existing imports work: see ``sapo.rollout.lean_decoder``."""

from sapo.rollout.lean_decoder import LeanDecoder as LeanQwen3
from sapo.rollout.lean_decoder import lean_unsupported

__all__ = ["LeanQwen3", "lean_unsupported"]
