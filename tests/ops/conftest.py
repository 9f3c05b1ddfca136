import os

import pytest
import torch

# Without CUDA the Triton kernels run under Triton's CPU interpreter. The flag must be set before triton is
# first imported (it is read then), so here rather than in the test module: test files import in name order.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def plain_logprobs(hidden, weight, labels, temperature=1.0, bias=None):
    """The path the ops replace: full [N, V] logits, log_softmax, gather (float64 unless inputs say otherwise)."""
    logits = hidden @ weight.T  # [N, V]
    if bias is not None:
        logits = logits + bias
    log_probs = torch.log_softmax(logits / temperature, dim=-1)  # [N, V]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [N]
    return log_probs.gather(1, labels[:, None]).squeeze(1), entropy


@pytest.fixture
def plain():
    return plain_logprobs
