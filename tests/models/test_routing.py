import pytest
import torch

from sapo.models.routing import (
    expert_load_entropy,
    is_moe,
    load_balancing_loss,
    moe_layers,
    pad_routing,
    record_routing,
    replay_routing,
    routing_changed_fraction,
)
from sapo.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 64, (4, 9), generator=generator)  # [B, T]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    attention_mask[2, :5] = 0
    return input_ids, attention_mask


def _model(**overrides):
    return build_tiny_model("qwen3_moe", 64, seed=0, **overrides)


def _perturb_routers(model, scale=0.02, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, router in moe_layers(model):
            router.weight.add_(scale * torch.randn(router.weight.shape, generator=generator))


def _experts_used(model):
    """Capture the top_k_index each experts module actually receives."""
    used, handles = [], []
    for name, _ in moe_layers(model):
        block = model.get_submodule(name.rsplit(".", 1)[0])
        handles.append(block.experts.register_forward_pre_hook(lambda m, args: used.append(args[1].clone())))
    return used, handles


def test_layers_found_and_dense_model_is_not_moe():
    model = _model()
    assert [name for name, _ in moe_layers(model)] == [f"model.layers.{i}.mlp.gate" for i in range(4)]
    assert is_moe(model) and not is_moe(build_tiny_model("qwen3", 64))


def test_record_shapes_and_storage_dtype(batch):
    input_ids, attention_mask = batch
    model = _model()
    with torch.no_grad(), record_routing(model, with_logits=True) as record:
        model(input_ids=input_ids, attention_mask=attention_mask)
    assert record.experts.shape == (4, 4, 9, 2) and record.experts.dtype == torch.int8
    assert record.router_logits.shape == (4, 4, 9, 8)
    # the recorded experts are the top-2 of the recorded logits
    top = record.router_logits.topk(2, dim=-1).indices
    assert torch.equal(top.sort(-1).values, record.experts.long().sort(-1).values)

    wide = build_tiny_model("qwen3_moe", 64, num_experts=130, moe_intermediate_size=4, num_hidden_layers=1)
    with torch.no_grad(), record_routing(wide) as record:
        wide(input_ids=input_ids)
    assert record.experts.dtype == torch.int16 and int(record.experts.max()) < 130


@pytest.mark.parametrize(
    "norm_topk_prob, dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)]
)
def test_replay_with_unchanged_weights_is_bit_identical(batch, norm_topk_prob, dtype):
    input_ids, attention_mask = batch
    model = _model(norm_topk_prob=norm_topk_prob).to(dtype)
    with torch.no_grad():
        with record_routing(model) as record:
            reference = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with replay_routing(model, record.experts) as replayed:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(logits, reference)
    assert torch.equal(replayed.experts, record.experts)


def test_replay_pins_experts_after_a_router_change(batch):
    input_ids, attention_mask = batch
    model = _model()
    with torch.no_grad(), record_routing(model) as old:
        model(input_ids=input_ids, attention_mask=attention_mask)
    _perturb_routers(model)
    used, handles = _experts_used(model)
    with torch.no_grad(), replay_routing(model, old.experts, with_logits=True) as replayed:
        model(input_ids=input_ids, attention_mask=attention_mask)
    for handle in handles:
        handle.remove()
    # the experts modules received the old experts ...
    assert torch.equal(torch.stack(used).reshape(old.experts.shape), old.experts.long())
    # ... while the router itself now prefers others on some tokens (reported for diagnostics)
    mask = attention_mask.bool()
    changed, per_layer = routing_changed_fraction(old.experts, replayed.experts, mask)
    assert 0.0 < changed < 1.0 and len(per_layer) == 4
    with torch.no_grad(), record_routing(model) as fresh:
        model(input_ids=input_ids, attention_mask=attention_mask)
    # layer 0 sees the same input either way; later layers see the replayed layers' outputs
    assert torch.equal(fresh.experts[0], replayed.experts[0])


def test_replayed_gate_weights_come_from_the_current_router(batch):
    input_ids, _ = batch
    model = _model()
    with torch.no_grad(), record_routing(model) as old:
        model(input_ids=input_ids)
    _perturb_routers(model)
    seen = []  # the gate weights layer 0's experts receive
    handle = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: seen.append(a[2]))
    with torch.no_grad(), replay_routing(model, old.experts, with_logits=True) as replayed:
        model(input_ids=input_ids)
    handle.remove()
    probs = replayed.router_logits[0].reshape(-1, 8).softmax(-1)  # [N, E] current router
    chosen = probs.gather(1, old.experts[0].reshape(-1, 2).long())
    torch.testing.assert_close(seen[0], chosen / chosen.sum(-1, keepdim=True), rtol=1e-6, atol=0)


def test_router_gets_gradients_under_replay(batch):
    input_ids, attention_mask = batch
    model = _model()
    with torch.no_grad(), record_routing(model) as old:
        model(input_ids=input_ids, attention_mask=attention_mask)
    _perturb_routers(model)
    with replay_routing(model, old.experts):
        model(input_ids=input_ids, attention_mask=attention_mask).logits.logsumexp(-1).mean().backward()
    for _, router in moe_layers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_micro_batches_and_gradient_accumulation_match_the_full_batch(batch):
    input_ids, attention_mask = batch
    model = _model()
    with torch.no_grad(), record_routing(model) as old:
        model(input_ids=input_ids, attention_mask=attention_mask)
    _perturb_routers(model)

    def loss_of(rows):
        logits = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).logits
        return logits.logsumexp(-1).sum() / input_ids.numel()

    with replay_routing(model, old.experts):
        loss_of(slice(0, 4)).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for rows in (slice(0, 2), slice(2, 4)):
        with replay_routing(model, old.experts[:, rows]):
            loss_of(rows).backward()
    for accumulated, reference in zip((p.grad for p in model.parameters()), full):
        torch.testing.assert_close(accumulated, reference, rtol=1e-4, atol=1e-7)

    with pytest.raises(ValueError, match="slice its rows"), replay_routing(model, old.experts):
        model(input_ids=input_ids[:2])


def test_activation_checkpointing_recompute_replays_and_records_once(batch):
    input_ids, attention_mask = batch
    model = _model()
    with torch.no_grad(), record_routing(model) as old:
        model(input_ids=input_ids, attention_mask=attention_mask)
    _perturb_routers(model)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with replay_routing(model, old.experts) as replayed:
            model(input_ids=input_ids, attention_mask=attention_mask).logits.square().mean().backward()
        assert replayed.experts.shape == old.experts.shape  # the recompute is not recorded twice
        grads.append(model.model.layers[0].mlp.gate.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_unset_entries_fall_back_to_the_current_router(batch):
    input_ids, attention_mask = batch
    model = _model()
    with torch.no_grad():
        with record_routing(model) as old:
            reference = model(input_ids=input_ids[:, :6], attention_mask=attention_mask[:, :6]).logits
        _perturb_routers(model)
        with record_routing(model) as new:
            model(input_ids=input_ids[:, :6], attention_mask=attention_mask[:, :6])
        unset = pad_routing(old.experts[:, :, :0], 6)  # every entry -1
        assert torch.equal(unset, torch.full_like(old.experts, -1))
        with replay_routing(model, unset) as replayed:
            model(input_ids=input_ids[:, :6], attention_mask=attention_mask[:, :6])
    assert torch.equal(replayed.experts, new.experts)
    assert reference.shape == (4, 6, 64)


def test_r3_record_during_generation_matches_a_full_forward():
    model = _model().eval()
    prompt = torch.randint(4, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), record_routing(model) as generation:
        sequences = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    routing = pad_routing(generation.experts, sequences.shape[1])  # [L, B, 9, k]
    assert routing.shape == (4, 2, 9, 2) and (routing[:, :, -1] == -1).all()
    with torch.no_grad(), record_routing(model) as full:
        model(input_ids=sequences)
    changed, _ = routing_changed_fraction(routing[:, :, :-1], full.experts[:, :, :-1], torch.ones(2, 8))
    assert changed == 0.0


def test_vl_moe_replay_is_bit_identical():
    model = build_tiny_model("qwen3_vl_moe", 64).eval()
    input_ids = torch.randint(4, 58, (2, 7))
    with torch.no_grad():
        with record_routing(model) as record:
            reference = model(input_ids=input_ids).logits
        with replay_routing(model, record.experts):
            logits = model(input_ids=input_ids).logits
    assert record.experts.shape == (2, 2, 7, 2)
    assert torch.equal(logits, reference)


def test_diagnostics_exact_values():
    old = torch.tensor([[[[0, 1], [2, 3], [4, 5]]]])  # [L=1, B=1, T=3, k=2]
    new = torch.tensor([[[[1, 0], [2, 4], [6, 7]]]])  # same set, changed, changed (masked out)
    mask = torch.tensor([[1, 1, 0]])
    assert routing_changed_fraction(old, new, mask) == (0.5, [0.5])
    # experts used on masked tokens: 0, 1, 2, 3 once each -> entropy log 4, normalised by log 8
    assert expert_load_entropy(old, mask, 8) == pytest.approx([2 / 3])
    with pytest.raises(ValueError, match="num_experts"):
        expert_load_entropy(old, mask, 4)
    collapsed = torch.tensor([[[[0, 1], [0, 1], [0, 1]]]])
    assert expert_load_entropy(collapsed, torch.ones(1, 3), 4) == pytest.approx([0.5])


def test_replay_shape_is_checked(batch):
    input_ids, _ = batch
    model = _model()
    with pytest.raises(ValueError, match=r"expected \[L=4"), replay_routing(model, torch.zeros(3, 4, 9, 2)):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match="no MoE layers"), record_routing(build_tiny_model("qwen3", 64)):
        pass


def test_r3_rows_that_leave_the_batch_are_placed_by_select_rows():
    model = _model().eval()
    prompt = torch.randint(4, 64, (3, 4), generator=torch.Generator().manual_seed(5))
    step = torch.randint(4, 64, (2, 1), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with record_routing(model) as generation:
            model(input_ids=prompt)  # "prefill" of all 3 rows
            generation.select_rows(torch.tensor([0, 2]))  # row 1 finished
            model(input_ids=step)  # "decode step" of rows 0 and 2
        with record_routing(model) as prefill:
            model(input_ids=prompt)
        with record_routing(model) as decode:
            model(input_ids=step)
    routing = generation.experts
    assert routing.shape == (4, 3, 5, 2)
    assert torch.equal(routing[:, :, :4], prefill.experts)
    assert torch.equal(routing[:, [0, 2], 4:], decode.experts)
    assert (routing[:, 1, 4] == -1).all()


def test_load_balancing_loss_matches_the_hf_reference_and_its_bounds():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    generator = torch.Generator().manual_seed(0)
    layers, batch, length, experts, top_k = 3, 2, 5, 8, 2
    logits = [torch.randn(batch * length, experts, generator=generator) for _ in range(layers)]
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    ours = load_balancing_loss(logits, top_k, mask.bool().flatten())
    reference = load_balancing_loss_func(tuple(logits), experts, top_k, attention_mask=mask)
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(load_balancing_loss(logits, top_k), load_balancing_loss_func(tuple(logits), experts, top_k))
    # top-1: even routing gives 1, every token on one expert gives E
    even = [torch.zeros(experts, experts) + 10 * torch.eye(experts)]  # token i prefers expert i
    assert load_balancing_loss(even, 1).item() == pytest.approx(1.0, abs=1e-3)
    skewed = [torch.zeros(experts, experts) + 10 * torch.nn.functional.one_hot(torch.zeros(experts).long(), experts)]
    assert load_balancing_loss(skewed, 1).item() == pytest.approx(experts, rel=1e-3)


def test_graph_logits_carry_gradients_to_the_router_under_replay(batch):
    input_ids, attention_mask = batch
    model = _model()
    with torch.no_grad(), record_routing(model) as old:
        model(input_ids=input_ids, attention_mask=attention_mask)
    with replay_routing(model, old.experts, keep_graph=True) as record:
        model(input_ids=input_ids, attention_mask=attention_mask)
        load_balancing_loss(record.graph_logits, record.top_k, attention_mask.bool().flatten()).backward()
    for _, router in moe_layers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
