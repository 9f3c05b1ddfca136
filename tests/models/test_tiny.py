import pytest
import torch

from sapo.models.tiny import ARCHS, build_tiny_model, count_parameters, tiny_config


def test_moe_and_dense_have_the_same_active_size():
    moe = count_parameters(build_tiny_model("qwen3_moe", 64))
    dense = count_parameters(build_tiny_model("qwen3", 64))
    assert 1_000_000 < moe["total"] < 5_000_000
    assert dense["total"] == dense["active"]
    assert abs(moe["active"] - dense["active"]) / dense["active"] < 0.02


def test_moe_defaults_are_explicit():
    config = tiny_config("qwen3_moe", 64)
    assert config.router_aux_loss_coef == 0.0
    assert config._experts_implementation == "grouped_mm"
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (8, 2, True)
    assert tiny_config("qwen3_moe", 64, router_aux_loss_coef=0.01).router_aux_loss_coef == 0.01
    vl = tiny_config("qwen3_vl_moe", 64)
    assert vl.text_config.router_aux_loss_coef == 0.0
    assert vl.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert (vl.vision_start_token_id, vl.image_token_id) == (60, 62)


def test_same_seed_same_weights():
    a, b = build_tiny_model("qwen3_moe", 32, seed=3), build_tiny_model("qwen3_moe", 32, seed=3)
    c = build_tiny_model("qwen3_moe", 32, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.layers[0].mlp.gate.weight, c.model.layers[0].mlp.gate.weight)


def test_grouped_mm_matches_eager_forward_and_backward():
    ids = torch.randint(0, 64, (3, 12))
    outputs = {}
    for impl in ("eager", "grouped_mm"):
        model = build_tiny_model("qwen3_moe", 64, seed=1, experts_implementation=impl)
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        outputs[impl] = (logits.detach(), model.model.layers[1].mlp.experts.down_proj.grad)
    torch.testing.assert_close(outputs["grouped_mm"][0], outputs["eager"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["grouped_mm"][1], outputs["eager"][1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_generates(arch):
    model = build_tiny_model(arch, 64).eval()
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_unknown_arch():
    with pytest.raises(ValueError, match="qwen3_moe"):
        tiny_config("mixtral", 64)
