"""`sapo.train.train` end to end on tiny Qwen3-VL / Qwen3-VL-MoE models (real models, a few steps)."""

import io
import json

import pytest
import torch
from PIL import Image

from sapo.config import build_config
from sapo.models.loading import load_model, save_model
from sapo.models.vl import load_processor
from sapo.train import train
from tests.vl.conftest import tiny_vl

TINY = {
    "train_size": "32", "prompts_per_step": "2", "num_generations": "4", "num_minibatches": "2",
    "micro_batch_size": "3", "max_completion_length": "8", "max_prompt_length": "64", "eval_num_problems": "4",
    "eval_num_samples": "2", "eval_pass_k": "[1,2]", "eval_steps": "0", "threads": "1", "progress": "false",
    "tensorboard": "false", "report": "false", "lr": "1e-3", "autocast_bf16": "off", "engine": "torch",
    "rewards": "[math,tests.training.rewards:shorter_is_better]",  # varies within groups: a gradient every step
}


def _model_folder(tmp_path, arch):
    model, processor = tiny_vl(arch)
    folder = tmp_path / arch
    save_model(model, processor.tokenizer, folder)
    processor.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def _changed(start, folder):
    model, tokenizer = load_model(str(folder))
    load_processor(folder, tokenizer, model)  # the final model reloads with its processor
    end = model.state_dict()
    return sum(not torch.equal(start[k], end[k]) for k in start), len(start)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_steps_on_the_builtin_visual_task_change_the_weights(tmp_path, arch):
    folder, start = _model_folder(tmp_path, arch)
    extra = {"routing_replay": "R2"} if arch == "qwen3_vl_moe" else {}
    cfg = build_config(overrides={**TINY, **extra, "model": str(folder), "dataset": "builtin:vl-digits",
                                  "eval_steps": "2", "max_steps": "2", "output_dir": str(tmp_path / "run")})
    last = train(cfg)
    changed, total = _changed(start, tmp_path / "run" / "final_model")
    assert changed > total // 2, f"only {changed}/{total} tensors changed"
    vision_changed, _ = _changed({k: v for k, v in start.items() if ".visual." in k}, tmp_path / "run" / "final_model")
    assert vision_changed > 0  # the gradient reaches the vision tower
    assert last["eval/num_problems"] == 4 and last["eval/num_samples"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r.get("nonfinite/skipped_total", 0) == 0 for r in rows)
    if arch == "qwen3_vl_moe":
        assert "moe/routing_changed" in rows[-1]


def test_a_jsonl_mixing_text_and_image_rows_trains(tmp_path):
    folder, start = _model_folder(tmp_path, "qwen3_vl")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), (200, 10, 10)).save(buffer, format="PNG")
    (tmp_path / "red.png").write_bytes(buffer.getvalue())
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "<image>+1=", "answer": "3", "images": ["red.png"]},
            {"prompt": "2*2=", "answer": "4", "images": ["red.png", "red.png"]}, {"prompt": "9-1=", "answer": "8"},
            {"prompt": "3=", "answer": "3", "images": ["gone.png"]}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    overrides = {**TINY, "model": str(folder), "dataset": str(data), "prompt_field": "prompt", "answer_field": "answer",
                 "prompts_per_step": "4", "max_steps": "2", "max_prompt_length": "256",
                 "output_dir": str(tmp_path / "run")}
    with pytest.raises(Exception, match=r"mixed\.jsonl: line 5: image 0: image file 'gone.png' not found"):
        train(build_config(overrides=overrides))
    train(build_config(overrides={**overrides, "data_on_error": "skip", "output_dir": str(tmp_path / "run2")}))
    changed, total = _changed(start, tmp_path / "run2" / "final_model")
    assert changed > total // 2


def test_asynchronous_rollouts_with_image_prompts_equal_the_synchronous_lag(tmp_path):
    """max_staleness=1 on the visual task: the sampler process gets the image inputs with each request
    and samples exactly what the same lag samples in one process."""
    folder, _ = _model_folder(tmp_path, "qwen3_vl_moe")
    rows = {}
    for mode in ("sync", "async"):
        out = tmp_path / mode
        train(build_config(overrides={**TINY, "model": str(folder), "dataset": "builtin:vl-digits", "max_steps": "3",
                                      "max_staleness": "1", "staleness_mode": mode, "routing_replay": "R3",
                                      "output_dir": str(out)}))
        rows[mode] = [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "tokens/", "math/",
                       "async/sync_s", "async/sampler_wait_s", "async/trainer_wait_s"))}
                      for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows["sync"] == rows["async"]
    assert [r["async/staleness"] for r in rows["async"]] == [0.0, 1.0, 1.0]
