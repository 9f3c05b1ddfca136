import pytest
import torch

from sapo.models.forward import hidden_states, output_weight
from sapo.models.loading import load_model, save_model
from sapo.models.routing import record_routing, replay_routing
from sapo.models.tiny import build_tiny_model

pytest.importorskip("peft")
from sapo.models.lora import (  # noqa: E402
    QWEN3_ATTENTION,
    QWEN3_MOE_EXPERTS,
    adapters_disabled,
    apply_lora,
    merge_lora,
)

IDS = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def _lora_moe():
    model = build_tiny_model("qwen3_moe", 64, num_hidden_layers=2)
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    lora = apply_lora(
        model, rank=4, alpha=8, target_modules=QWEN3_ATTENTION, target_parameters=QWEN3_MOE_EXPERTS
    )
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); make the adapters do something
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return lora, base


def test_only_lora_parameters_train_and_reach_the_experts():
    lora, _ = _lora_moe()
    trainable = [name for name, param in lora.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("mlp.experts" in name for name in trainable)
    assert any("self_attn.q_proj" in name for name in trainable)
    lora(input_ids=IDS).logits.logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in lora.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_B" in n and "experts" in n)


def test_disabled_adapters_reproduce_the_base_logits():
    lora, base = _lora_moe()
    with torch.no_grad():
        adapted = lora(input_ids=IDS).logits
        with adapters_disabled(lora):
            reference = lora(input_ids=IDS).logits
            reference_hidden = hidden_states(lora, IDS)
        after = lora(input_ids=IDS).logits
    assert torch.equal(reference, base)
    torch.testing.assert_close(reference_hidden @ output_weight(lora).T, base, rtol=0, atol=0)
    assert not torch.allclose(adapted, base) and torch.equal(after, adapted)


def test_adapters_disabled_needs_lora():
    with pytest.raises(TypeError, match="separate reference model"):
        with adapters_disabled(build_tiny_model("qwen3", 64)):
            pass


def test_routing_replay_on_a_lora_model_is_bit_identical():
    lora, _ = _lora_moe()
    with torch.no_grad():
        with record_routing(lora) as record:
            reference = lora(input_ids=IDS).logits
        with replay_routing(lora, record.experts):
            replayed = lora(input_ids=IDS).logits
    assert record.experts.shape == (2, 2, 8, 2) and torch.equal(replayed, reference)


def test_merge_then_save_and_load_round_trip(tmp_path):
    from sapo.models.char_tokenizer import build_char_tokenizer

    lora, _ = _lora_moe()
    with torch.no_grad():
        adapted = lora(input_ids=IDS).logits
    save_model(
        lora,
        build_char_tokenizer("0123456789" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        tmp_path,
    )
    with torch.no_grad():  # saving merged a copy: the adapters are still live
        assert torch.equal(lora(input_ids=IDS).logits, adapted)
    loaded, tokenizer = load_model(tmp_path, dtype="float32")
    assert type(loaded).__name__ == "Qwen3MoeForCausalLM" and len(tokenizer) == 66
    merged = merge_lora(lora)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, adapted, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(input_ids=IDS).logits, adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(rank=0), dict(dropout=1.0), dict(target_modules=["q_proj", "lm_head"])])
def test_bad_lora_options(bad):
    options = dict(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj"]) | bad
    with pytest.raises(ValueError):
        apply_lora(build_tiny_model("qwen3", 64), **options)
