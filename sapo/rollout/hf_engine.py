"""Reference engine: HF ``model.generate`` with the raw logits kept to compute sampler log-probs.

It is the baseline the torch engine is tested and benchmarked against, and the engine for multimodal
prompts (Qwen3-VL): ``extra_inputs[i]`` holds row i's ``pixel_values``, ``image_grid_thw`` (stacked over
rows along dim 0) and ``mm_token_type_ids`` (one id per prompt token, left-padded like the prompt).

``generate`` has no generator argument, so a seed is drawn from ``generator`` and the global RNG is set
to it inside a forked RNG state: same generator state, same completions; the caller's global RNG is
left untouched.
"""

from __future__ import annotations

import torch

from sapo.rollout.base import (
    LiveWeights,
    RolloutBatch,
    SamplingParams,
    check_generate_args,
    collate_extra_inputs,
    left_pad,
)


class HFEngine(LiveWeights):
    """Sampling through ``model.generate`` (left-padded batch, cache, HF logits processors) on the live model."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *,
                 extra_inputs: list[dict] | None = None) -> RolloutBatch:
        check_generate_args(prompt_ids, sampling, extra_inputs)
        if sampling.record_experts:
            raise ValueError("the 'hf' engine does not record MoE experts (routing_replay=R3): use engine=torch")
        temperature, generator = sampling.temperature, sampling.generator
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad(prompt_ids, sampling.pad_token_id)  # [B, P], [B, P]
        prompt_len = input_ids.shape[1]
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if extra_inputs is not None and any(extra_inputs):
            inputs.update(collate_extra_inputs(extra_inputs, [len(p) for p in prompt_ids], device))
        # Neutral values for the processors a checkpoint's generation_config may switch on, so both engines
        # sample from the same distribution.
        options = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0}
        if sampling.greedy:
            options["do_sample"] = False
        else:
            options.update(do_sample=True, temperature=temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        seed = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                out = self.model.generate(
                    **inputs, **options, max_new_tokens=sampling.max_new_tokens, eos_token_id=list(sampling.eos_token_ids),
                    pad_token_id=sampling.pad_token_id,
                    output_logits=True, return_dict_in_generate=True,
                )
        finally:
            self.model.train(was_training)
        new_tokens = out.sequences[:, prompt_len:]  # [B, N]
        # One step at a time: stacking [B, N, V] raw logits would hold 10 GB for 64 x 256 x 152k in fp32.
        logprobs = torch.stack([
            torch.log_softmax(step_logits.float() / temperature, dim=-1).gather(-1, new_tokens[:, t, None])[:, 0]
            for t, step_logits in enumerate(out.logits)
        ], dim=1)  # [B, N]
        eos = set(sampling.eos_token_ids)
        completions, completion_logprobs, truncated = [], [], []
        for tokens, logps in zip(new_tokens.tolist(), logprobs.tolist()):
            end = next((t + 1 for t, token in enumerate(tokens) if token in eos), None)
            truncated.append(end is None)
            end = len(tokens) if end is None else end
            completions.append(tokens[:end])
            completion_logprobs.append(logps[:end])
        return RolloutBatch([list(p) for p in prompt_ids], completions, completion_logprobs, truncated,
                            policy_version=self.policy_version)
