"""The RL recipe: rollout -> reward -> group advantages -> old log-probs -> mini-batch updates.

Read top to bottom; `train(cfg)` is the whole loop. One "step" is one rollout batch
(prompts_per_step x num_generations completions) followed by `num_minibatches` optimizer updates
over it, which is what makes the update off-policy (SAPO.md: with one update per rollout, SAPO,
GSPO and GRPO are all the plain policy gradient).
"""

from __future__ import annotations

import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from sapo import checkpoint as ckpt
from sapo import distributed
from sapo.config import ConfigError, TrainConfig, save_config
from sapo.evaluate import evaluate_items
from sapo.models import routing as moe_routing
from sapo.resume import RESUMABLE_OVERRIDES, resolve_resume, start_run  # noqa: F401  (re-exported)
from sapo.rollout import make_engine
from sapo.tracking import NullLogger, RunLogger
from sapo.training.batch import (
    completion_positions,
    group_advantages,
    merge_metrics,
    pack_rollout,
    select_rows,
)
from sapo.training.policy import PolicyHandle, load_policy
from sapo.training.tasks import TaskData, load_examples, load_task

NonFiniteError = ckpt.NonFiniteError  # raised when too many updates are non-finite (CLI exit 1)


# ---------------------------------------------------------------------------------------------
# Data order: a seeded permutation per epoch, so the position is two integers in the checkpoint


class PromptSampler:
    def __init__(self, size: int, seed: int, epoch: int = 0, index: int = 0):
        if size == 0:
            raise ValueError("the training set is empty")
        self.size, self.seed, self.epoch, self.index = size, seed, epoch, index
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        return np.random.RandomState((self.seed * 1_000_003 + self.epoch) % 2**32).permutation(self.size).tolist()

    def next(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.index >= self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.index])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


# ---------------------------------------------------------------------------------------------
# Setup helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: normalisation gains (1-D weights of *norm* modules) at lr * norm_lr_scale and
    without weight decay; everything else at lr.

    Why: Adam moves each parameter by about lr per update, so at an RL learning rate the gains, which
    set how sharp the output distribution is, barely move. The built-in models start from a short
    label-smoothed warm start whose samples at T = 1 are far noisier than its greedy answers; RL's
    first gain there is sharpening, and raising the matrices' lr instead collapses the run. Automatic
    (-1): 100 for built-in models, 1 (plain AdamW) for pretrained ones."""
    norms, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (norms if p.dim() == 1 and "norm" in name.rsplit(".", 2)[-2].lower() else rest).append(p)
    groups = [{"params": rest}]
    if norms:
        scale = cfg.norm_lr_scale if cfg.norm_lr_scale >= 0 else (100.0 if cfg.model.startswith("builtin:") else 1.0)
        groups.append({"params": norms, "lr": cfg.lr * scale, "weight_decay": 0.0})
    return groups


def _generation_routing(engine, tensors) -> torch.Tensor:
    """The experts the rollout engine chose, [L, N, P + C, k] in the columns of the packed rollout
    (the engine's covers P + max_new_tokens - 1: the last sampled token was never fed; -1 = unset)."""
    routing, width = engine.last_routing, tensors.input_ids.shape[1]
    return routing[:, :, :width] if routing.shape[2] >= width else moe_routing.pad_routing(routing, width)


def _make_scheduler(optimizer, cfg: TrainConfig, total_updates: int):
    warm = cfg.warmup_steps

    def factor(update: int) -> float:
        if warm and update < warm:
            return (update + 1) / warm
        progress = (update - warm) / max(1, total_updates - warm)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _StopFlag:
    """First Ctrl-C (or SIGTERM, as schedulers send before a pre-emption): finish the current step,
    checkpoint, exit. A second one: stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[sapo] interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def _check_data_parallel(cfg: TrainConfig, info: distributed.DistInfo) -> None:
    try:
        distributed.check_divisible(cfg.prompts_per_step, cfg.num_generations, cfg.num_minibatches, info.world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.drop_equal_groups:
        raise ConfigError("drop_equal_groups=true is not supported with several processes (ranks would hold "
                          "different row counts); their advantages are 0 anyway: use drop_equal_groups=false")
    if cfg.lora_rank and info.parallel == "fsdp":
        raise ConfigError("lora_rank > 0 with several processes needs parallel=ddp (FSDP here shards full weights)")


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, overrides: dict | None = None) -> dict:
    """Run the RL loop described by cfg; returns the last metrics row (with eval metrics)."""
    # [reliab] lock output_dir for the run's lifetime, resolve resume=, pick a verified checkpoint
    with start_run(cfg, overrides) as run:  # sapo/resume.py
        if run.finished:  # nothing to train (final_model/ rebuilt if it was missing)
            return run.result
        return _train(run.cfg, run.checkpoint)
    # [/reliab]


def _train(cfg: TrainConfig, checkpoint_path: Path | None) -> dict:
    out_dir = Path(cfg.output_dir)
    info = distributed.init_distributed(cfg.parallel)  # torchrun: one rank per process (sapo/distributed.py)
    if info.enabled:
        _check_data_parallel(cfg, info)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)

    # -- model, reference, data ---------------------------------------------------------------
    examples = load_examples(cfg)  # [reliab] data errors surface before the model loads
    with distributed.main_first(info):  # rank 0 builds a built-in model's cache, the others read it
        policy: PolicyHandle = load_policy(cfg)
    task: TaskData = load_task(cfg, policy.tokenizer, policy.processor, examples=examples)  # [reliab] examples=
    model = policy.model
    if info.is_main:
        save_config(cfg, out_dir / "config.yaml")
    # the KL reference is the starting policy: copy it before sharding or a checkpoint changes the weights
    reference = policy.reference() if cfg.beta > 0 else None
    distributed.prepare_model(model, info)  # FSDP2 / replicated; before the optimizer sees the parameters

    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
        eps=1e-8,
    )
    total_updates = cfg.max_steps * cfg.num_minibatches
    scheduler = _make_scheduler(optimizer, cfg, total_updates)
    rollout_gen = torch.Generator().manual_seed(cfg.seed)
    sampler = PromptSampler(len(task.train), cfg.seed)
    start_step, nonfinite_total, nonfinite_run, best_eval = 0, 0, 0, None
    # reward counters count per process; a run logs them from its own start, across resumes
    counter_base, counter_offset = _counters(task.rewards.metrics()), {}

    if checkpoint_path is not None:
        state = ckpt.load_checkpoint(
            checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, generators={"rollout": rollout_gen},
            load_full_state=(lambda w, o: distributed.load_full_state(model, optimizer, w, o)) if info.enabled else None,
        )
        start_step = state["step"]
        sampler = PromptSampler(len(task.train), cfg.seed, **state["data"])
        nonfinite_total = state.get("nonfinite_total", 0)
        nonfinite_run = state.get("nonfinite_run", 0)
        counter_offset = state.get("reward_counters", {}) if info.is_main else {}  # saved summed over ranks
        best_eval = state.get("best_eval")
        print(f"[sapo] resuming {out_dir} from step {start_step}", flush=True)

    # rows after the checkpoint are dropped; with no checkpoint the run starts over with fresh files
    logger = RunLogger(out_dir, tensorboard=cfg.tensorboard,
                       resume_step=start_step if checkpoint_path is not None else None) if info.is_main else NullLogger()
    engine = make_engine(cfg.engine, model)
    # R3: the rollout engine records each MoE layer's chosen experts; evaluation does not need them
    rollout_engine = make_engine(cfg.engine, model, record_experts=True) if cfg.routing_replay == "R3" else engine
    loss_options = policy.loss_options(cfg)

    def run_eval(step: int) -> dict[str, float]:
        if not task.eval:
            return {}
        with distributed.gathered(model):  # rank 0 evaluates on the full weights; the others wait
            return _eval(step) if info.is_main else {}

    def _eval(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        own_stream = torch.Generator().manual_seed(cfg.seed * 7919 + step)  # eval never shifts training's RNG
        result = evaluate_items(engine, policy, task.eval, task.correctness, cfg, generator=own_stream)
        result.metrics["time/eval"] = time.perf_counter() - t0
        return result.metrics

    step_metrics: dict[str, float] = {}
    progress = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc="sapo train", dynamic_ncols=True)

    with _StopFlag() as stop:
        if start_step == 0 and cfg.eval_steps:
            eval_metrics = run_eval(0)
            logger.log(0, eval_metrics)
            step_metrics = {"step": 0, **eval_metrics}
            best_eval = eval_metrics.get("eval/pass@1")
            _show(progress, step_metrics)
        step = start_step
        while step < cfg.max_steps:
            step += 1
            t_step = time.perf_counter()
            model.train()
            # 1. sample prompts, roll out G completions each from the current policy
            # (several processes: every rank draws the step's prompts and keeps its own slice of whole groups)
            idx = distributed.rank_slice(sampler.next(cfg.prompts_per_step), info)
            examples = [task.train[i] for i in idx]
            prompt_ids = [e.prompt_ids for e in examples for _ in range(cfg.num_generations)]
            # per-row visual inputs (VL); text-only rows of a mixed batch have {}
            row_extra = [e.extra or {} for e in examples for _ in range(cfg.num_generations)]
            row_extra = row_extra if any(row_extra) else []
            t0 = time.perf_counter()
            if info.enabled:  # each rank samples its own completions; a resume draws the same ones
                rollout_gen.manual_seed(distributed.rollout_seed(cfg.seed, step, info))
            with distributed.gathered(model):  # FSDP: full layers, so ranks decode different lengths freely
                batch = rollout_engine.generate(
                    prompt_ids, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                    top_p=cfg.top_p, top_k=cfg.top_k, eos_token_ids=policy.eos_token_ids,
                    pad_token_id=policy.pad_token_id, generator=rollout_gen,
                    extra_inputs=row_extra or None,
                )
            t_rollout = time.perf_counter() - t0
            # 2. rewards (the same code as evaluation), 3. group-normalised advantages
            texts = [policy.decode(c) for c in batch.completion_ids]
            prompts_text = [e.prompt_text for e in examples for _ in range(cfg.num_generations)]
            answers = [e.answer for e in examples for _ in range(cfg.num_generations)]
            t0 = time.perf_counter()
            reward_out = task.rewards(prompts_text, texts, answers)
            t_reward = time.perf_counter() - t0
            rewards = torch.tensor(reward_out.total, dtype=torch.float32).view(len(examples), cfg.num_generations)
            advantages = group_advantages(rewards, cfg.scale_rewards)  # [P, G]
            equal = (rewards.max(dim=1).values == rewards.min(dim=1).values)  # [P]
            keep_rows = torch.arange(rewards.numel())
            if cfg.drop_equal_groups:
                keep_rows = (~equal).repeat_interleave(cfg.num_generations).nonzero().flatten()
            tensors = pack_rollout(batch, advantages.flatten(), policy.pad_token_id, cfg.mask_truncated)
            tensors.extra = row_extra
            metrics: dict[str, float] = {
                "reward/mean": rewards.mean().item(),
                "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
                "groups/equal_reward_frac": equal.float().mean().item(),
                "completion/length_mean": float(np.mean([len(c) for c in batch.completion_ids])),
                "completion/length_max": float(max(len(c) for c in batch.completion_ids)),
                "completion/truncated_frac": float(np.mean(batch.truncated)),
                "advantage/abs_mean": advantages.abs().mean().item(),
                **reward_out.metrics,
            }
            metrics.update(_run_counters(reward_out.metrics, counter_base, counter_offset))
            metrics.update({f"data/skipped/{k}": float(v) for k, v in task.skipped.items()})  # e.g. too long
            updates_metrics: list[dict[str, float]] = []
            if len(keep_rows) > 0:
                tensors = select_rows(tensors, keep_rows)
                # 4. old (behaviour) log-probs, once, before any update; the routing they used (MoE)
                t0 = time.perf_counter()
                old = policy.behaviour_pass(tensors, cfg, need_old=cfg.num_minibatches > 1 or cfg.tis_cap > 0)
                ref_logprobs = policy.reference_logprobs(reference, tensors, cfg) if reference is not None else None
                t_old = time.perf_counter() - t0
                if cfg.routing_replay == "R3":
                    old.replay = _generation_routing(rollout_engine, tensors)[:, keep_rows]
                    if old.routing is not None:  # the sampler's experts against pi_old's, before any update
                        fed = (old.replay >= 0).all(dim=3).all(dim=0)  # [N, P + C]: the sampler never fed an EOS
                        metrics["moe/r3_mismatch"], _ = moe_routing.routing_changed_fraction(
                            old.replay, old.routing, completion_positions(tensors) & fed)
                metrics.update(old.metrics)
                # 5. num_minibatches sequential updates over the rollout batch
                t0 = time.perf_counter()
                for mb_rows in _minibatches(cfg, step, info, keep_rows, rewards.numel()):
                    if len(mb_rows) == 0:
                        continue
                    m = policy.update(
                        optimizer, tensors, mb_rows, old, ref_logprobs, loss_options, cfg,
                    )
                    ckpt.kill_point_for_tests("step", step)  # crash-safety tests only
                    if m.pop("nonfinite", 0.0):
                        nonfinite_run += 1
                        nonfinite_total += 1
                        if nonfinite_run >= cfg.max_consecutive_nonfinite:
                            raise NonFiniteError(
                                f"{nonfinite_run} consecutive updates had non-finite loss or gradients (step {step}); "
                                "the weights were left untouched and the last checkpoint is clean. Lower lr, "
                                "check rewards for NaN, or raise max_consecutive_nonfinite."
                            )
                    else:
                        nonfinite_run = 0
                        scheduler.step()
                    updates_metrics.append(m)
                t_update = time.perf_counter() - t0
            else:
                t_old = t_update = 0.0
            metrics.update(merge_metrics(updates_metrics))
            metrics.update({
                "nonfinite/skipped_total": float(nonfinite_total),
                "lr": scheduler.get_last_lr()[0],
                "time/rollout": t_rollout, "time/reward": t_reward, "time/old_logprobs": t_old,
                "time/update": t_update, "time/step": time.perf_counter() - t_step,
                "tokens/completion_per_s": sum(len(c) for c in batch.completion_ids) / max(t_rollout, 1e-9),
            })
            metrics = distributed.reduce_metrics(metrics)  # one row for all ranks
            # 6. evaluation, logging, checkpoints
            last = step == cfg.max_steps
            if cfg.eval_steps and (step % cfg.eval_steps == 0 or last):
                metrics.update(run_eval(step))
                if "eval/pass@1" in metrics:
                    best_eval = max(best_eval or 0.0, metrics["eval/pass@1"])
            logger.log(step, metrics)
            if cfg.log_samples:
                logger.log_samples(step, [
                    {"prompt": prompts_text[i], "completion": texts[i], "answer": answers[i],
                     "reward": float(reward_out.total[i]), "advantage": float(advantages.flatten()[i])}
                    for i in range(0, len(texts), max(1, len(texts) // cfg.log_samples))
                ][: cfg.log_samples])
            step_metrics = {"step": step, **metrics}
            _show(progress, step_metrics)
            stopping = distributed.any_true(stop.requested)  # every rank stops at the same step
            if last or stopping or (cfg.save_steps and step % cfg.save_steps == 0):
                # several processes: gather the full (unsharded) state, rank 0 writes it
                full_state = distributed.full_state(model, optimizer) if info.enabled else None
                counters = distributed.reduce_metrics(
                    _run_counters(task.rewards.metrics(), counter_base, counter_offset))  # counters now: after eval too
                if info.is_main:
                    ckpt.save_checkpoint(
                        out_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"data": sampler.state(), "nonfinite_total": nonfinite_total,
                                       "nonfinite_run": nonfinite_run, "reward_counters": counters,
                                       "best_eval": best_eval, "max_steps": cfg.max_steps,
                                       "world_size": info.world_size},
                        generators={"rollout": rollout_gen}, keep=cfg.keep_checkpoints, full_state=full_state,
                    )
                logger.flush()
            if stopping:
                print(f"[sapo] stopped at step {step}; resume with: sapo train resume={out_dir}", flush=True)
                break
    if progress is not None:
        progress.close()
    logger.close()
    if step >= cfg.max_steps:
        distributed.save_final_model(policy, out_dir / "final_model", info)
        if cfg.report and info.is_main:
            from sapo.report import write_report

            write_report(out_dir)
    return step_metrics


COUNTER_PREFIXES = ("reward/errors/", "reward/timeouts/", "math/")  # cumulative counts since process start


def _minibatches(cfg: TrainConfig, step: int, info, keep_rows: torch.Tensor, num_rows: int) -> list[torch.Tensor]:
    """Row indices (into the kept rows) of each of the step's num_minibatches updates.

    The split is seeded from (seed, step) and spreads every group over the mini-batches
    (distributed.minibatch_rows), so it is the same whatever the number of processes.
    """
    split = distributed.minibatch_rows(cfg.seed, step, cfg.prompts_per_step, cfg.num_generations,
                                       cfg.num_minibatches, info)
    if len(keep_rows) == num_rows:
        return split
    position = torch.full((num_rows,), -1, dtype=torch.long)  # row -> index among the kept rows
    position[keep_rows] = torch.arange(len(keep_rows))
    return [position[rows][position[rows] >= 0] for rows in split]


def _counters(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(COUNTER_PREFIXES)}


def _run_counters(metrics: dict[str, float], base: dict, offset: dict) -> dict[str, float]:
    """This run's counts: the process's counts since train() started plus those before the resume."""
    return {k: v - base.get(k, 0.0) + offset.get(k, 0.0) for k, v in _counters(metrics).items()}


def _show(progress, metrics: dict) -> None:
    if progress is None:
        return
    progress.n = int(metrics.get("step", 0))
    shown = {}
    for key, name in (("reward/mean", "reward"), ("eval/pass@1", "pass@1"), ("sapo/gate_mean", "gate"),
                      ("ratio/max", "r_max"), ("completion/length_mean", "len")):
        if key in metrics:
            shown[name] = f"{metrics[key]:.3g}"
    progress.set_postfix(shown, refresh=False)
    progress.refresh()


__all__ = ["train", "PromptSampler", "NonFiniteError", "resolve_resume"]
