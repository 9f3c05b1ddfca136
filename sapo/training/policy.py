"""The trainable policy: the model with its tokenizer, what ends a completion, and how it is saved.

The jobs around it live one per module: `teacher_forcing` (log-probs of rollout rows), `behaviour`
(pi_old before the updates), `reference` (the KL reference, one class per kind), `update` (one
optimizer step).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sapo.config import ConfigError, TrainConfig
from sapo.models import routing as moe
from sapo.rollout import SamplingParams


class Policy:
    def __init__(self, model, tokenizer, *, eos_token_ids: list[int], pad_token_id: int, lora: bool = False,
                 processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor  # image processor + vision tokens of a VL model (sapo.models.vl), else None
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.lora = lora
        self.is_moe = moe.is_moe(model)
        # routing diagnostics only where sapo knows the router family (sapo.models.moe_families)
        self.routing_recordable = self.is_moe and moe.routing_unavailable(model) is None
        self.device = next(model.parameters()).device

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.eos_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sampling(self, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None, record_experts: bool = False) -> SamplingParams:
        """Sampling parameters with this policy's end-of-sequence and padding ids."""
        return SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=tuple(self.eos_token_ids),
                              pad_token_id=self.pad_token_id, temperature=temperature, top_p=top_p, top_k=top_k,
                              generator=generator, record_experts=record_experts)

    def save_final(self, path: Path, state_dict: dict | None = None) -> None:
        from sapo.models.loading import save_model

        save_model(self.model, self.tokenizer, path, state_dict=state_dict)
        if self.processor is not None:  # a VL model reloads with its image processor
            self.processor.save_pretrained(path)


def load_policy(cfg: TrainConfig) -> Policy:
    """Model and tokenizer from cfg.model, with LoRA and gradient checkpointing as configured."""
    from sapo.models.loading import load_model

    spec = cfg.model
    if spec.startswith("builtin:"):
        from sapo.training.warmstart import BUILTIN_MODELS, WarmStartRecipe, builtin_model_path

        if spec not in BUILTIN_MODELS:
            raise ConfigError(f"model={spec!r}: unknown built-in model; choose one of {', '.join(BUILTIN_MODELS)}")
        spec = str(builtin_model_path(spec, WarmStartRecipe.from_config(cfg)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tokenizer = load_model(spec, dtype=cfg.dtype, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"model={cfg.model!r}: {err}") from err
    processor = None
    from sapo.models.vl import is_vision_language, load_processor

    if is_vision_language(model):
        try:
            processor = load_processor(spec, tokenizer, model)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"model={cfg.model!r}: {err}") from err
    if cfg.routing_replay != "none" and not moe.is_moe(model):
        raise ConfigError(f"routing_replay={cfg.routing_replay} needs a Mixture-of-Experts model; "
                          f"{type(model).__name__} has no top-k router (use routing_replay=none)")
    for feature, wanted, replay in ((f"routing_replay={cfg.routing_replay}", cfg.routing_replay != "none", True),
                                    ("router_aux_loss_coef > 0", cfg.router_aux_loss_coef > 0 and moe.is_moe(model), False)):
        if wanted and (reason := moe.routing_unavailable(model, replay=replay)):
            raise ConfigError(f"{feature} is not available for this model: {reason}")
    if cfg.lora_rank:
        from sapo.models.lora import apply_lora

        try:  # a target name the model lacks is a config error, not peft's traceback
            model = apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.0,
                               target_modules=cfg.lora_target_modules,
                               target_parameters=cfg.lora_target_parameters or None)
        except ValueError as err:
            raise ConfigError(f"model={cfg.model!r}: {err}") from None
    if cfg.freeze_router:
        routers = moe.moe_layers(model)
        if not routers:
            raise ConfigError(f"freeze_router=true needs a Mixture-of-Experts model; {type(model).__name__} has none")
        for _, router in routers:
            for p in router.parameters():
                p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    eos = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, list | tuple):
            eos.update(int(s) for s in source)
    if not eos:
        raise ConfigError(f"model={cfg.model!r}: the tokenizer has no EOS token; completions could never end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return Policy(model, tokenizer, eos_token_ids=sorted(eos), pad_token_id=pad, lora=bool(cfg.lora_rank),
                        processor=processor)
