import pytest
import torch

from sapo.models.forward import hidden_states, output_bias, output_weight
from sapo.models.tiny import ARCHS, build_tiny_model


def _batch(model, arch):
    torch.manual_seed(0)
    input_ids = torch.randint(4, 58, (2, 10))  # [B, T]
    attention_mask = torch.ones_like(input_ids)
    extra = {}
    if "vl" in arch:
        config = model.config
        input_ids[:, 2] = config.vision_start_token_id
        input_ids[:, 3:7] = config.image_token_id  # 16 patches, merged 2x2 -> 4 image tokens per row
        input_ids[:, 7] = config.vision_end_token_id
        extra = dict(
            pixel_values=torch.randn(32, 3 * 2 * 16 * 16),
            image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]),
            mm_token_type_ids=(input_ids == config.image_token_id).long(),
        )
    else:
        attention_mask[0, :3] = 0  # left padding
    return input_ids, attention_mask, extra


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_times_output_weight_equals_logits(arch):
    model = build_tiny_model(arch, 64).eval()
    input_ids, attention_mask, extra = _batch(model, arch)
    with torch.no_grad():
        hidden = hidden_states(model, input_ids, attention_mask, **extra)  # [B, T, d]
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    assert hidden.shape == (2, 10, model.config.get_text_config().hidden_size)
    assert output_bias(model) is None
    torch.testing.assert_close(hidden @ output_weight(model).T, logits, rtol=0, atol=0)


def test_untied_head_and_gradients_reach_it():
    model = build_tiny_model("qwen3", 64, tie_word_embeddings=False)
    weight = output_weight(model)
    assert weight is model.lm_head.weight and weight is not model.model.embed_tokens.weight
    input_ids = torch.randint(4, 64, (2, 6))
    (hidden_states(model, input_ids) @ weight.T).logsumexp(-1).sum().backward()
    assert (
        model.lm_head.weight.grad is not None
        and model.model.layers[0].self_attn.q_proj.weight.grad is not None
    )


def test_peft_wrapped_model_uses_the_adapters():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model("qwen3", 64)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.eval()
    input_ids = torch.randint(4, 64, (2, 6))
    with torch.no_grad():
        hidden = hidden_states(peft_model, input_ids)
        logits = peft_model(input_ids=input_ids).logits
        with peft_model.disable_adapter():
            base_hidden = hidden_states(peft_model, input_ids)
    torch.testing.assert_close(hidden @ output_weight(peft_model).T, logits, rtol=0, atol=0)
    assert not torch.allclose(hidden, base_hidden)
