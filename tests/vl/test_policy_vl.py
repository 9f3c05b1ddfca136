"""The trainer's log-prob passes on image prompts equal a plain, unpadded forward of each row."""

import io

import pytest
import torch
from PIL import Image

from sapo.data import Example
from sapo.data.multimodal import encode_multimodal
from sapo.models import routing as moe
from sapo.rollout import RolloutBatch
from sapo.training.batch import pack_rollout
from sapo.training.behaviour import behaviour_pass
from sapo.training.teacher_forcing import ForwardSettings, TeacherForcing
from tests.vl.conftest import tiny_vl


def _png(seed: int, width: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, width, 3), generator=g, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _rollout(processor):
    """Four rows: images of 2, 4 and 3 tokens and a text-only row; prompts and completions of different lengths."""
    tok = processor.tokenizer
    rows = []
    for seed, (question, width, completion) in enumerate(
            [("=\n", 64, "1+2=3 #### 3"), ("12*3=\n", 128, "36"), ("7-7=\n", None, "0 #### 0"), ("(", 96, "9")]):
        if width is None:
            ids, extra = tok.encode(question, add_special_tokens=False), {}
        else:
            ids, extra = encode_multimodal(Example(question, "0", images=[_png(seed, width)]), question, processor)
        rows.append((ids, tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id], extra))
    batch = RolloutBatch([r[0] for r in rows], [r[1] for r in rows], [[0.0] * len(r[1]) for r in rows],
                         [False] * len(rows))
    tensors = pack_rollout(batch, torch.zeros(len(rows)), tok.pad_token_id, mask_truncated=False)
    tensors.extra = [r[2] for r in rows]
    return rows, tensors


def _plain_logprobs(model, prompt, completion, extra, temperature):
    """Log-probs of the completion tokens from model(...).logits on the row alone (no padding)."""
    ids = torch.tensor([prompt + completion])
    inputs = {}
    if extra:
        types = torch.zeros_like(ids)
        types[0, : len(prompt)] = extra["mm_token_type_ids"]
        inputs = {"pixel_values": extra["pixel_values"], "image_grid_thw": extra["image_grid_thw"],
                  "mm_token_type_ids": types}
    with torch.no_grad():
        logits = model(input_ids=ids, **inputs).logits[0].float() / temperature  # [T, V]
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize(("micro_batch_size", "micro_batch_tokens"), [(0, 0), (3, 0), (0, 60)])
def test_logprobs_equal_plain_forward_per_row(arch, micro_batch_size, micro_batch_tokens):
    """Per micro-batch (trimmed of its all-padding columns, rows grouped by a token budget), the
    log-probs equal a plain forward of each row alone: no image token is misaligned."""
    model, processor = tiny_vl(arch)
    rows, tensors = _rollout(processor)
    forward = TeacherForcing(ForwardSettings(temperature=0.7, autocast_bf16="off", micro_batch_size=micro_batch_size,
                                             micro_batch_tokens=micro_batch_tokens), pad_token_id=0, device="cpu")
    got = torch.zeros(tensors.completion_mask.shape)
    parts = forward.micro_batches(tensors, torch.arange(tensors.num_rows))
    if micro_batch_size or micro_batch_tokens:
        assert len(parts) > 1
    for micro, part, _ in parts:
        logp, _ = forward.logprobs(model, part)
        got[micro, : logp.shape[1]] = logp
    for i, (prompt, completion, extra) in enumerate(rows):
        expected = _plain_logprobs(model, prompt, completion, extra, 0.7)
        torch.testing.assert_close(got[i, : len(completion)], expected, atol=2e-5, rtol=0)
        assert torch.all(got[i, len(completion):] == 0)


def test_images_are_seen_and_rows_do_not_leak():
    model, processor = tiny_vl()
    _, tensors = _rollout(processor)
    forward = TeacherForcing(ForwardSettings(autocast_bf16="off"), pad_token_id=0, device="cpu")
    with torch.no_grad():
        base, _ = forward.logprobs(model, tensors)
        first = tensors.extra[0]
        tensors.extra[0] = dict(first, pixel_values=first["pixel_values"].flip(0))
        changed, _ = forward.logprobs(model, tensors)
    assert not torch.allclose(changed[0], base[0])  # row 0 looks at its image
    torch.testing.assert_close(changed[1:], base[1:], atol=1e-6, rtol=0)  # the others do not see it


def test_vl_moe_routing_replay_reproduces_old_logprobs():
    model, processor = tiny_vl("qwen3_vl_moe")
    _, tensors = _rollout(processor)
    forward = TeacherForcing(ForwardSettings(autocast_bf16="off"), pad_token_id=0, device="cpu")
    old = behaviour_pass(model, forward, tensors, need_old=True, record=True, replay="R2")
    assert old.routing.shape[:3] == (2, tensors.num_rows, tensors.input_ids.shape[1])  # text layers only
    with torch.no_grad(), moe.replay_routing(model, old.routing):
        replayed, _ = forward.logprobs(model, tensors)
    torch.testing.assert_close(replayed, old.old_logprobs, atol=1e-6, rtol=0)
