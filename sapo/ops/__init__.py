"""Layer 2: log-probs / entropy of sampled tokens from last hidden states and the lm_head weight.

Chunked (never the full [N, V] logits), float32 softmax math, a Triton kernel on CUDA.
"""

from sapo.ops.fused_loss import fused_token_policy_loss
from sapo.ops.logprobs import token_logprobs

__all__ = ["token_logprobs", "fused_token_policy_loss"]
