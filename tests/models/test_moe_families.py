"""Routing record / replay on every MoE family sapo registers (sapo.models.moe_families), on tiny models.

The checks that would catch a replay that does nothing or the wrong thing:
- replaying a forward's own record reproduces its logits bit for bit (torch.equal), in float32 and
  bfloat16: the replayed gate weights are computed exactly as the family's router computes them;
- after the routers change, the experts modules receive the recorded experts (used_experts), and on
  tokens where the current router agrees with the record, the replayed gate weights equal the
  router's own (so DeepSeek-V3's correction bias, scaling factor, Mixtral's float32 weights, gpt-oss's
  softmax over k logits are all reproduced);
- moe/replay_mismatch is 0 under replay and > 0 for a replay that the experts never see.
"""

import pytest
import torch

from sapo.models.moe_families import family_of
from sapo.models.routing import (
    is_moe,
    moe_layers,
    record_routing,
    replay_mismatch_fraction,
    replay_routing,
    routing_changed_fraction,
    routing_unavailable,
)
from sapo.models.tiny_moe import FAMILIES, build_tiny_moe

VOCAB = 64
_MODELS: dict[str, torch.nn.Module] = {}


def _model(family: str, dtype=torch.float32) -> torch.nn.Module:
    """One float32 model per family per session (tests that change weights deep-copy it)."""
    if family not in _MODELS:
        _MODELS[family] = build_tiny_moe(family, VOCAB, seed=0).eval()
    model = _MODELS[family]
    if dtype != torch.float32:
        import copy

        model = copy.deepcopy(model).to(dtype)
    return model


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, VOCAB, (3, 10), generator=generator)  # [B, T]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    return input_ids, attention_mask


def _perturbed(family: str, scale: float = 0.5, seed: int = 1) -> torch.nn.Module:
    """A copy whose routers moved by `scale` x their own std: enough to change some tokens' experts."""
    import copy

    model = copy.deepcopy(_model(family))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, router in moe_layers(model):
            weight = router.weight
            weight.add_(scale * weight.std() * torch.randn(weight.shape, generator=generator))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_registered_and_recordable(family, batch):
    model = _model(family)
    layers = moe_layers(model)
    assert is_moe(model) and len(layers) == 2
    assert all(family_of(router) is not None for _, router in layers)
    assert routing_unavailable(model, replay=True) is None
    input_ids, attention_mask = batch
    with torch.no_grad(), record_routing(model, with_logits=True) as record:
        model(input_ids=input_ids, attention_mask=attention_mask)
    num_experts = layers[0][1].num_experts
    assert record.experts.shape == (2, 3, 10, 2) and record.experts.dtype == torch.int8
    assert record.router_logits.shape == (2, 3, 10, num_experts)
    assert 0 <= int(record.experts.min()) and int(record.experts.max()) < num_experts
    # without replay the experts modules get exactly the routers' choice
    assert torch.equal(record.used_experts, record.experts)
    # the two top-k slots of a token are different experts
    assert (record.experts[..., 0] != record.experts[..., 1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_the_own_record_is_bit_identical(family, dtype, batch):
    model = _model(family, dtype)
    input_ids, attention_mask = batch
    with torch.no_grad():
        with record_routing(model) as record:
            reference = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with replay_routing(model, record.experts) as replayed:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(logits, reference)
    assert torch.equal(replayed.experts, record.experts) and torch.equal(replayed.used_experts, record.experts)
    assert replay_mismatch_fraction(record.experts, replayed.used_experts, attention_mask) == 0.0


def _capture(model):
    """Hooks registered before the replay's: each router's own (weights, indices) output and each
    experts module's (indices, weights) inputs, per layer."""
    own, fed, handles = [], [], []
    for name, router in moe_layers(model):
        block = model.get_submodule(name.rsplit(".", 1)[0])
        handles.append(router.register_forward_hook(lambda m, a, out: own.append((out[1].detach(), out[2]))))
        handles.append(block.experts.register_forward_pre_hook(lambda m, a: fed.append((a[2].detach(), a[1]))))
    return own, fed, handles


def _by_expert(weights, indices):
    order = indices.argsort(dim=-1)
    return weights.gather(1, order), indices.gather(1, order)


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_after_a_router_change_forces_the_recorded_experts_with_the_routers_own_weights(family, batch):
    input_ids, attention_mask = batch
    with torch.no_grad(), record_routing(_model(family)) as old:
        _model(family)(input_ids=input_ids, attention_mask=attention_mask)
    model = _perturbed(family)
    own, fed, handles = _capture(model)
    try:
        with torch.no_grad(), replay_routing(model, old.experts) as replayed:
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    # the experts modules received the recorded experts, and the record says so
    assert torch.equal(torch.stack([f[1] for f in fed]).reshape(old.experts.shape), old.experts.long())
    assert torch.equal(replayed.used_experts, old.experts)
    assert replay_mismatch_fraction(old.experts, replayed.used_experts, attention_mask) == 0.0
    # ... while the current routers would have chosen otherwise on some tokens
    changed, _ = routing_changed_fraction(old.experts, replayed.experts, attention_mask)
    assert changed > 0.0
    agreeing = 0
    for (own_w, own_i), (fed_w, fed_i) in zip(own, fed):
        own_w, own_i = _by_expert(own_w, own_i)
        fed_w, fed_i = _by_expert(fed_w, fed_i)
        same = (own_i == fed_i).all(dim=-1)  # tokens where the router's choice is the forced one
        assert fed_w.dtype == own_w.dtype  # e.g. Mixtral's and DeepSeek-V3's stay float32
        torch.testing.assert_close(fed_w[same], own_w[same], rtol=1e-6, atol=1e-7)
        agreeing += int(same.sum())
        assert (fed_w > 0).all() and torch.isfinite(fed_w).all()
    assert agreeing > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_get_gradients_under_replay(family, batch):
    input_ids, attention_mask = batch
    with torch.no_grad(), record_routing(_model(family)) as old:
        _model(family)(input_ids=input_ids, attention_mask=attention_mask)
    model = _perturbed(family)
    with replay_routing(model, old.experts):
        model(input_ids=input_ids, attention_mask=attention_mask).logits.logsumexp(-1).mean().backward()
    for _, router in moe_layers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_a_replay_the_experts_never_see_is_caught_by_replay_mismatch(family, batch):
    """A replay that changes the router's output while the block feeds the experts the router's own
    choice (what a block that re-derives its top-k would do) must not report success."""
    input_ids, attention_mask = batch
    with torch.no_grad(), record_routing(_model(family)) as old:
        _model(family)(input_ids=input_ids, attention_mask=attention_mask)
    model = _perturbed(family)
    handles, own = [], {}
    for index, (name, router) in enumerate(moe_layers(model)):
        experts = model.get_submodule(name.rsplit(".", 1)[0]).experts

        def keep(m, a, out, index=index):
            own[index] = out[2]

        def undo(m, args, index=index):
            return (args[0], own[index], args[2])  # the router's own experts, not the forced ones

        handles.append(router.register_forward_hook(keep))
        handles.append(experts.register_forward_pre_hook(undo))
    try:
        with torch.no_grad(), replay_routing(model, old.experts) as broken:
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    changed, _ = routing_changed_fraction(old.experts, broken.experts, attention_mask)
    mismatch = replay_mismatch_fraction(old.experts, broken.used_experts, attention_mask)
    assert mismatch == pytest.approx(changed) and mismatch > 0.0


def test_replay_mismatch_exact_values():
    replayed = torch.tensor([[[[0, 1], [2, 3], [4, 5], [-1, -1]]]])  # [L=1, B=1, T=4, k=2]
    used = torch.tensor([[[[1, 0], [2, 4], [4, 5], [6, 7]]]])  # same set, other, same, (not replayed)
    assert replay_mismatch_fraction(replayed, used, torch.ones(1, 4)) == pytest.approx(1 / 3)
    assert replay_mismatch_fraction(replayed, used, torch.tensor([[1, 0, 1, 1]])) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        replay_mismatch_fraction(replayed, used[:, :, :3], torch.ones(1, 3))


def test_unknown_router_is_moe_but_record_and_replay_say_which_family():
    from transformers import PhimoeConfig, PhimoeForCausalLM

    config = PhimoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = PhimoeForCausalLM(config)
    assert is_moe(model) and len(moe_layers(model)) == 1
    assert "PhimoeTopKRouter" in routing_unavailable(model)
    with pytest.raises(NotImplementedError, match=r"routing replay is not available.*phimoe.*PhimoeTopKRouter"):
        with replay_routing(model, torch.zeros(1, 1, 3, 2, dtype=torch.long)):
            pass
    with pytest.raises(NotImplementedError, match="routing record is not available"), record_routing(model):
        pass


def test_config_with_experts_but_no_router_is_moe_and_says_so():
    class Blob(torch.nn.Module):
        def __init__(self):
            super().__init__()
            from transformers import PretrainedConfig

            self.config = PretrainedConfig(num_local_experts=8)
            self.mlp = torch.nn.Linear(4, 4)

    model = Blob()
    assert is_moe(model) and moe_layers(model) == []
    with pytest.raises(NotImplementedError, match="declares experts in its config"), record_routing(model):
        pass


def _fed_positions(batch, width):
    """[B, width] True where a token was fed to the model (real prompt tokens, completion tokens but the
    last), in the left-padded columns of RolloutBatch.to_padded."""
    prompt_len = max(len(p) for p in batch.prompt_ids)
    fed = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, (prompt, completion) in enumerate(zip(batch.prompt_ids, batch.completion_ids)):
        fed[i, prompt_len - len(prompt) : prompt_len + len(completion) - 1] = True
    return fed


# qwen3_moe: the lean forward records itself (tests/rollout/test_lean_qwen3.py); qwen3_vl_moe: tests/vl;
# minimax: the torch engine cannot drive MiniMax's own cache class (engine=hf generates, without R3)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("qwen3_moe", "qwen3_vl_moe", "minimax")])
def test_r3_record_on_the_hf_generation_path_matches_a_teacher_forced_forward(family):
    """The torch engine's lean forward is Qwen3-only: the other families fall back to the HF forward,
    where record_routing hooks record the experts of prefill and every decode step."""
    from sapo.rollout import SamplingParams
    from sapo.rollout.lean_families import lean_unsupported
    from sapo.rollout.torch_engine import TorchEngine

    model = _model(family)
    assert lean_unsupported(model) is not None
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    engine = TorchEngine(model)
    greedy = SamplingParams(max_new_tokens=6, eos_token_ids=(2,), pad_token_id=0, greedy=True, record_experts=True)
    free = engine.generate(prompts, greedy)
    # an EOS id row 1 emits first: rows then leave the batch (and its KV / linear-attention cache) mid-decode
    out = engine.generate(prompts, greedy.replace(eos_token_ids=(free.completion_ids[1][0],)))
    lengths = sorted(len(c) for c in out.completion_ids)
    assert engine.last_path == "hf" and lengths[0] < lengths[-1]
    width = 5 + 6 - 1
    assert out.routing.shape == (2, 3, width, 2)
    fed = _fed_positions(out, width)
    assert (out.routing[:, 1, 5 + len(out.completion_ids[1]) - 1 :] == -1).all()  # row 1 left
    packed = out.to_padded(pad_id=0)
    with torch.no_grad(), record_routing(model) as full:
        model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
              position_ids=packed["position_ids"])
    assert torch.equal(full.experts[:, :, :width][:, fed], out.routing[:, fed])


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_activation_checkpointing_replays_the_recompute_and_records_once(family, batch):
    input_ids, attention_mask = batch
    with torch.no_grad(), record_routing(_model(family)) as old:
        _model(family)(input_ids=input_ids, attention_mask=attention_mask)
    grads = []
    for checkpointing in (False, True):
        model = _perturbed(family).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with replay_routing(model, old.experts) as replayed:
            model(input_ids=input_ids, attention_mask=attention_mask).logits.square().mean().backward()
        assert replayed.used_experts.shape == old.experts.shape  # the recompute is not recorded twice
        assert replay_mismatch_fraction(old.experts, replayed.used_experts, attention_mask) == 0.0
        grads.append(moe_layers(model)[0][1].weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_a_family_that_cannot_be_forced_records_but_refuses_replay(monkeypatch, batch):
    import dataclasses

    from sapo.models import moe_families

    family = moe_families._BY_ROUTER["MixtralTopKRouter"]
    monkeypatch.setitem(moe_families._BY_ROUTER, "MixtralTopKRouter",
                        dataclasses.replace(family, no_replay="its block re-derives the top-k"))
    model = _model("mixtral")
    input_ids, attention_mask = batch
    assert routing_unavailable(model) is None and "re-derives" in routing_unavailable(model, replay=True)
    with torch.no_grad(), record_routing(model) as record:
        model(input_ids=input_ids, attention_mask=attention_mask)
    with pytest.raises(NotImplementedError, match="routing replay is not available.*Mixtral router.*re-derives"):
        with replay_routing(model, record.experts):
            pass
