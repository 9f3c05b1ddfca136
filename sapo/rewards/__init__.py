"""Rewards: final-answer extraction, math equivalence (bounded-time math-verify), format, user functions."""

from sapo.rewards.extract import extract_answer, find_boxed
from sapo.rewards.format_reward import format_reward, hash_format_reward
from sapo.rewards.math_reward import (
    MathReward,
    answers_equivalent,
    configure_math_reward,
    default_math_reward,
    math_reward,
)
from sapo.rewards.normalize import fast_compare, normalize_answer, parse_number
from sapo.rewards.runner import RewardOutput, RewardRunner, load_reward_function
from sapo.rewards.verify_pool import VerifyPool

__all__ = [
    "MathReward", "RewardOutput", "RewardRunner", "VerifyPool", "answers_equivalent", "configure_math_reward",
    "default_math_reward", "extract_answer", "fast_compare", "find_boxed", "format_reward",
    "hash_format_reward", "load_reward_function", "math_reward", "normalize_answer", "parse_number",
]
