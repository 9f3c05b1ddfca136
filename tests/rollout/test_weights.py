"""The engine's weight seam: a live engine samples the trainer's module, a copy-holding engine
samples the weights last given to load_weights; every batch says which policy version sampled it."""

import pytest
import torch

from sapo.rollout import OwnCopyTorchEngine, SamplingParams, TorchEngine, make_engine
from tests.rollout.conftest import VOCAB, tiny_qwen3, tiny_qwen3_moe

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]


def sample(engine, seed=0, **options):
    return engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, eos_token_ids=(VOCAB + 7,), pad_token_id=0,
                                                   generator=torch.Generator().manual_seed(seed), **options))


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("factory", [tiny_qwen3, tiny_qwen3_moe])
def test_copy_engine_samples_the_synced_weights_not_the_live_ones(factory):
    model = factory()
    live, own = TorchEngine(model), make_engine("torch-copy", model)
    assert isinstance(own, OwnCopyTorchEngine) and own.owns_weights and not live.owns_weights
    assert sample(own) == sample(live)  # equal weights, equal draws
    before = sample(live)
    _perturb(model)
    after = sample(live)
    assert after.completion_ids != before.completion_ids  # the live engine follows the module at once
    stale = sample(own)
    assert stale.completion_ids == before.completion_ids and stale.policy_version == 0  # the copy does not
    own.load_weights(((n, p.detach()) for n, p in model.named_parameters()), version=3)
    synced = sample(own)
    assert synced.completion_ids == after.completion_ids and synced.sampler_logprobs == after.sampler_logprobs
    assert synced.policy_version == 3 and own.policy_version == 3
    assert not any(p.requires_grad for p in own.model.parameters())  # the copy never trains


def test_live_engine_records_the_version_and_refuses_a_state():
    model = tiny_qwen3()
    live = TorchEngine(model)
    assert sample(live).policy_version == 0
    live.load_weights(None, version=5)
    assert sample(live).policy_version == 5
    with pytest.raises(ValueError, match="samples the live model"):
        live.load_weights(model.named_parameters(), version=6)


def test_copy_engine_errors_name_the_problem():
    own = make_engine("torch-copy", tiny_qwen3())
    with pytest.raises(ValueError, match="own copy"):
        own.load_weights(None, version=1)
    with pytest.raises(KeyError, match="not a weight of the engine's model"):
        own.load_weights([("no.such.weight", torch.zeros(1))], version=1)


def test_a_partial_sync_changes_only_the_given_tensors():
    model = tiny_qwen3()
    own = make_engine("torch-copy", model)
    name = "lm_head.weight"
    new = torch.randn_like(model.lm_head.weight)
    own.load_weights([(name, new)], version=1)  # e.g. only LoRA adapters change
    state = own.model.state_dict()
    assert torch.equal(state[name], new)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)
