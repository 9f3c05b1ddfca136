"""End to end on the tiny built-in MoE model (real transformers model, no mocks)."""

import importlib.util
import json

import pytest
import torch

from sapo.config import build_config
from sapo.models.loading import load_model
from sapo.train import train
from tests.training.conftest import TINY


def _run(tmp_path, name, **overrides):
    cfg = build_config(overrides={**TINY, "output_dir": str(tmp_path / name), **overrides})
    return cfg, train(cfg)


def _start_weights():
    """The warm-started model the TINY runs start from (same recipe as their config)."""
    from sapo.training.warmstart import WarmStartRecipe, builtin_model_path

    recipe = WarmStartRecipe.from_config(build_config(overrides=TINY))
    return _weights(builtin_model_path("builtin:arith-moe", recipe, verbose=False))


def _weights(folder):
    model, _ = load_model(str(folder))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "cispo", "grpo_r2"])
def test_each_objective_runs_and_changes_weights(tmp_path, sapo_cache, loss_type):
    start = _start_weights()
    cfg, last = _run(tmp_path, loss_type, loss_type=loss_type, max_steps="2", lr="1e-3")
    end = _weights(tmp_path / loss_type / "final_model")
    changed = sum(not torch.equal(start[k], end[k]) for k in start)
    assert changed > len(start) // 2, f"{loss_type}: only {changed}/{len(start)} tensors changed"
    rows = [json.loads(line) for line in (tmp_path / loss_type / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["nonfinite/skipped_total"] == 0 for r in rows)
    if loss_type == "sapo":
        assert 0 < rows[-1]["sapo/gate_mean"] <= 1
    if loss_type == "grpo_r2":
        assert "moe/routing_changed" in rows[-1]


def test_eval_logged_at_step_zero_and_end(tmp_path, sapo_cache):
    _run(tmp_path, "ev", max_steps="2", eval_steps="5")
    rows = [json.loads(line) for line in (tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval/num_problems"] == 8 and evals[0]["eval/num_samples"] == 2
    assert 0 <= evals[0]["eval/pass@1"] <= 1 and "eval/greedy" in evals[0] and "eval/pass@2" in evals[0]


def test_temperature_curve_at_the_start_and_the_end_only(tmp_path, sapo_cache):
    _run(tmp_path, "temps", max_steps="3", eval_steps="2", eval_temperatures="[0.5,1.0]")
    rows = [json.loads(line) for line in (tmp_path / "temps" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/pass@1" in r}
    assert sorted(evals) == [0, 2, 3]
    for step in (0, 3):
        assert 0 <= evals[step]["eval/pass@1_T0.5"] <= 1 and 0 <= evals[step]["eval/pass@1_T1"] <= 1
        assert evals[step]["eval/pass@1_T0.5"] * 16 == int(evals[step]["eval/pass@1_T0.5"] * 16)  # 8 x 2 samples
    assert not any(k.startswith("eval/pass@1_T") for k in evals[2])  # intermediate evaluations: no sweep


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("wandb") is None,
                    reason="the mlflow and wandb extras are not installed")
def test_report_to_mlflow_and_wandb_offline(tmp_path, sapo_cache, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    _run(tmp_path, "trk", max_steps="2", eval_steps="5", eval_temperatures="[0.5]", report_to="mlflow,wandb")
    out = tmp_path / "trk"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ids = json.loads((out / "trackers.json").read_text())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    history = client.get_metric_history(ids["mlflow"], "eval/pass_at_1_T0.5")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["eval/pass@1_T0.5"]) for r in rows
                                                     if "eval/pass@1_T0.5" in r]
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "reward/mean")] == [1, 2]
    assert client.get_run(ids["mlflow"]).data.params["loss_type"] == "sapo"
    assert list((out / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))


def test_resume_continues_with_same_step_count(tmp_path, sapo_cache):
    out = tmp_path / "res"
    cfg = build_config(overrides={**TINY, "output_dir": str(out), "max_steps": "2", "save_steps": "1"})
    train(cfg)
    # the saved config names a user reward module: a resume imports it only when told to
    resumed = build_config(overrides={"resume": str(out), "max_steps": "4", "trust_saved_rewards": "true"})
    train(resumed, {"resume": str(out), "max_steps": "4"})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # a finished run says so and does nothing
    again = train(resumed, {"resume": str(out), "max_steps": "4"})
    assert again.get("finished") is True


def test_output_dir_with_a_run_is_not_overwritten(tmp_path, sapo_cache):
    from sapo.config import ConfigError

    _run(tmp_path, "once", max_steps="1")
    with pytest.raises(ConfigError, match="resume="):
        _run(tmp_path, "once", max_steps="1")


@pytest.mark.parametrize("loss_type", ["sapo", "cispo"])
def test_fused_loss_head_gives_the_same_training(tmp_path, sapo_cache, loss_type):
    """The fused lm_head gradient path and the plain chunked path train to the same weights."""
    _run(tmp_path, "fused", loss_type=loss_type, max_steps="2", lr="1e-3", fused_loss_head="true")
    _run(tmp_path, "plain", loss_type=loss_type, max_steps="2", lr="1e-3", fused_loss_head="false")
    fused, plain = _weights(tmp_path / "fused" / "final_model"), _weights(tmp_path / "plain" / "final_model")
    for key in fused:
        # two Adam steps amplify float32 rounding differences; the gradients themselves are checked
        # exactly in tests/ops/test_fused_loss.py
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-3, atol=1e-4)
    rows_f = [json.loads(x) for x in (tmp_path / "fused" / "metrics.jsonl").read_text().splitlines()]
    rows_p = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert rows_f[-1]["loss/policy"] == pytest.approx(rows_p[-1]["loss/policy"], rel=1e-4, abs=1e-6)


def test_lora_run_with_kl_saves_a_merged_model(tmp_path, sapo_cache):
    """LoRA on attention + fused experts, KL to the adapter-disabled base, a merged final folder."""
    start = _start_weights()
    _run(tmp_path, "lora", max_steps="2", lr="1e-2", lora_rank="4", beta="0.1",
         lora_target_parameters="[mlp.experts.gate_up_proj]")
    end = _weights(tmp_path / "lora" / "final_model")
    assert set(end) == set(start), "the final folder must be a plain (merged) model"
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert any("q_proj" in k for k in changed) and any("experts.gate_up_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k for k in changed), "only LoRA targets may change"
    rows = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kl/mean"] >= 0 and rows[0]["nonfinite/skipped_total"] == 0


def test_gradient_checkpointing_with_routing_replay_matches(tmp_path, sapo_cache):
    """Activation checkpointing re-runs the forward in backward; with R2 replay the update is unchanged."""
    _run(tmp_path, "ckpt", loss_type="grpo_r2", max_steps="1", lr="1e-3", gradient_checkpointing="true")
    _run(tmp_path, "plain", loss_type="grpo_r2", max_steps="1", lr="1e-3", gradient_checkpointing="false")
    a, b = _weights(tmp_path / "ckpt" / "final_model"), _weights(tmp_path / "plain" / "final_model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo_r2", "gspo"])
def test_token_budget_micro_batches_match_the_whole_mini_batch(tmp_path, sapo_cache, loss_type):
    """Micro-batches by token budget (rows grouped by length, padding columns trimmed) accumulate
    to the whole mini-batch's update, with R2 routing replay and with a sequence-level objective."""
    _run(tmp_path, "budget", loss_type=loss_type, max_steps="1", lr="1e-3", micro_batch_tokens="120")
    _run(tmp_path, "whole", loss_type=loss_type, max_steps="1", lr="1e-3", micro_batch_tokens="0")
    a, b = _weights(tmp_path / "budget" / "final_model"), _weights(tmp_path / "whole" / "final_model")
    for key in a:  # Adam's first step is about lr * sign(g): a near-zero gradient's rounding shows
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss/policy", "grad_norm"):  # the gradient itself agrees to float32 rounding
        assert rows[-1][key] == pytest.approx(whole[-1][key], rel=1e-5, abs=1e-7)


def test_norm_gains_get_their_own_learning_rate():
    """norm_lr_scale puts every RMSNorm gain (and nothing else) in a group at lr * scale, without
    weight decay; automatic (-1) is 100 for built-in models and plain AdamW for any other."""
    from sapo.models.tiny import build_tiny_model
    from sapo.train import _param_groups

    model = build_tiny_model("qwen3_moe", vocab_size=16)
    groups = _param_groups(model, build_config(overrides={"lr": "1e-4", "weight_decay": "0.1"}))
    names = {id(p): n for n, p in model.named_parameters()}
    gains = [names[id(p)] for p in groups[1]["params"]]
    assert gains and all(n.endswith(("norm.weight", "layernorm.weight")) for n in gains)
    assert "model.norm.weight" in gains and not any("norm" in names[id(p)] for p in groups[0]["params"])
    assert groups[1]["lr"] == pytest.approx(1e-2) and groups[1]["weight_decay"] == 0.0
    plain = _param_groups(model, build_config(overrides={"lr": "1e-4", "model": "/some/pretrained"}))
    assert plain[1]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("old_logprobs", ["recompute", "sampler"])
def test_r3_replays_the_samplers_experts(tmp_path, sapo_cache, old_logprobs):
    """R3 forces the experts the rollout engine chose. Here the sampler is the trainer's own model in
    float32, so its experts are pi_old's (moe/r3_mismatch = 0) and R3 trains like R2."""
    _run(tmp_path, "r3", loss_type="grpo", max_steps="2", lr="1e-3", routing_replay="R3", old_logprobs=old_logprobs)
    _run(tmp_path, "r2", loss_type="grpo", max_steps="2", lr="1e-3", routing_replay="R2")
    a, b = _weights(tmp_path / "r3" / "final_model"), _weights(tmp_path / "r2" / "final_model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "r3" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    if old_logprobs == "recompute":
        assert all(r["moe/r3_mismatch"] == 0.0 for r in steps) and "moe/routing_changed" in steps[-1]
    else:  # no old-policy forward: nothing to compare the sampler's experts with
        assert "moe/r3_mismatch" not in steps[-1]


def test_r3_needs_the_torch_engine():
    from sapo.config import ConfigError

    with pytest.raises(ConfigError, match="engine=torch"):
        build_config(overrides={"routing_replay": "R3", "engine": "hf"})


def test_router_aux_loss_trains_the_routers_and_is_logged(tmp_path, sapo_cache):
    """router_aux_loss_coef adds the load-balancing loss: the routers move differently, moe/aux_loss
    is logged (near top_k = 2 for balanced routing), and loss/total includes it."""
    _run(tmp_path, "aux", max_steps="1", lr="1e-3", router_aux_loss_coef="1.0", routing_replay="R2")
    _run(tmp_path, "plain", max_steps="1", lr="1e-3", routing_replay="R2")
    a, b = _weights(tmp_path / "aux" / "final_model"), _weights(tmp_path / "plain" / "final_model")
    routers = [k for k in a if k.endswith("mlp.gate.weight")]
    assert routers and any(not torch.allclose(a[k], b[k], atol=1e-6) for k in routers)
    rows = [json.loads(x) for x in (tmp_path / "aux" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if "reward/mean" in r][-1]
    assert 2.0 <= step["moe/aux_loss"] < 8.0
    plain = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert "moe/aux_loss" not in [r for r in plain if "reward/mean" in r][-1]


def test_freeze_router_keeps_routers_fixed(tmp_path, sapo_cache):
    start = _start_weights()
    _run(tmp_path, "frz", max_steps="1", lr="1e-3", freeze_router="true")
    end = _weights(tmp_path / "frz" / "final_model")
    routers = [k for k in start if k.endswith("mlp.gate.weight")]
    assert routers and all(torch.equal(start[k], end[k]) for k in routers)
    assert any(not torch.equal(start[k], end[k]) for k in start if "experts" in k)


def test_sampler_old_logprobs_train_like_recomputed_ones(tmp_path, sapo_cache):
    """In float32 our engine's log-probs are the trainer's to rounding, so skipping the old-policy
    forward (old_logprobs=sampler) trains to the same weights."""
    _run(tmp_path, "samp", max_steps="2", lr="1e-3", old_logprobs="sampler")
    _run(tmp_path, "reco", max_steps="2", lr="1e-3", old_logprobs="recompute")
    a, b = _weights(tmp_path / "samp" / "final_model"), _weights(tmp_path / "reco" / "final_model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "samp" / "metrics.jsonl").read_text().splitlines()]
    assert "moe/routing_changed" not in rows[-1]  # no routing record without the old-policy forward


def test_sampler_old_logprobs_refuse_replay():
    from sapo.config import ConfigError

    with pytest.raises(ConfigError, match="R2 replay"):
        build_config(overrides={"old_logprobs": "sampler", "loss_type": "grpo_r2"})
