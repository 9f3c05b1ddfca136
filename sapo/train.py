"""The RL recipe: collect -> score -> advantages -> behaviour log-probs -> updates -> sync.

`train(cfg)` sets the run up and then loops over RL steps; each step calls the phases of
`sapo.training.phases` in order over a `TrainerState` (exactly what a checkpoint restores). One
"step" is one rollout batch (prompts_per_step x num_generations completions) followed by
`num_minibatches` optimizer updates over it, which is what makes the update off-policy (SAPO.md:
with one update per rollout, SAPO, GSPO and GRPO are all the plain policy gradient).
"""

from __future__ import annotations

import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sapo import checkpoint as ckpt
from sapo import distributed
from sapo.config import ConfigError, TrainConfig, config_to_dict, save_config
from sapo.evaluate import EvalSettings, evaluate_items, temperature_sweep
from sapo.resume import RESUMABLE_OVERRIDES, resolve_resume, start_run  # noqa: F401  (re-exported)
from sapo.rollout import RolloutEngine, make_engine
from sapo.tracking import NullLogger, RunLogger
from sapo.training import phases
from sapo.training.async_sampler import AsyncSampler
from sapo.training.policy import Policy, load_policy
from sapo.training.reference import make_reference
from sapo.training.staleness import LaggedSampler, RolloutRequest, WeightHistory, sampling_version
from sapo.training.state import PromptSampler, TrainerState
from sapo.training.tasks import TaskData, load_examples, load_task
from sapo.training.teacher_forcing import ForwardSettings, TeacherForcing
from sapo.training.update import UpdateSettings

WEIGHT_HISTORY = "weight_history"  # checkpoint file of the weight versions a lagging sampler still needs
NonFiniteError = ckpt.NonFiniteError  # raised when too many updates are non-finite (CLI exit 3)


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
    if cfg.max_staleness and info.parallel == "fsdp":
        raise ConfigError("max_staleness > 0 with several processes needs parallel=ddp (the sampler's weight "
                          "versions are kept whole, not sharded)")
    if cfg.lora_rank and info.parallel == "fsdp":
        raise ConfigError("lora_rank > 0 with several processes needs parallel=ddp (FSDP here shards full weights)")


# ---------------------------------------------------------------------------------------------
# The run: what setup builds once, and the loop


@dataclass
class Run:
    """The parts of a run that setup builds once; the loop reads them (no methods, no hidden state)."""

    cfg: TrainConfig
    info: distributed.DistInfo
    out_dir: Path
    policy: Policy
    task: TaskData
    engine: RolloutEngine
    forward: TeacherForcing
    reference: object | None  # sapo.training.reference.*, when beta > 0
    update: UpdateSettings
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rollout_gen: torch.Generator
    lagged: LaggedSampler | AsyncSampler | None  # max_staleness > 0: what samples step t with version t-1-K
    sampler: PromptSampler
    state: TrainerState
    counter_base: dict[str, float]
    resumed: bool


def train(cfg: TrainConfig, overrides: dict | None = None) -> dict:
    """Run the RL loop described by cfg; returns the last metrics row (with eval metrics) and
    "finished" (max_steps reached). The run report is the CLI's job (`sapo report DIR` rewrites it)."""
    # lock output_dir for the run's lifetime, resolve resume=, pick a verified checkpoint (sapo/resume.py)
    with start_run(cfg, overrides) as start:
        if start.finished:  # nothing to train (final_model/ rebuilt if it was missing)
            return start.result
        run = setup(start.cfg, start.checkpoint)
        try:
            return _loop(run)
        finally:
            if run.lagged is not None:
                run.lagged.close()  # the sampler process, if any


def _loop(run: Run) -> dict:
    cfg, state, info = run.cfg, run.state, run.info
    logger = RunLogger(run.out_dir, report_to=cfg.report_to, tensorboard=cfg.tensorboard,
                       resume_step=state.step if run.resumed else None,
                       config=config_to_dict(cfg)) if info.is_main else NullLogger()
    progress = _progress_bar(cfg, state.step) if info.is_main else None
    step_metrics: dict[str, float] = {}
    with _StopFlag() as stop:
        if state.step == 0 and cfg.eval_steps:
            eval_metrics = evaluate_policy(run, 0)
            logger.log(0, eval_metrics)
            step_metrics = {"step": 0, **eval_metrics}
            state.best_eval = eval_metrics.get("eval/pass@1")
            _show(progress, step_metrics)
        while state.step < cfg.max_steps:
            state.step += 1
            metrics, samples = rl_step(run)
            # evaluation, logging, checkpoints
            last = state.step == cfg.max_steps
            if cfg.eval_steps and (state.step % cfg.eval_steps == 0 or last):
                metrics.update(evaluate_policy(run, state.step))
                if "eval/pass@1" in metrics:
                    state.best_eval = max(state.best_eval or 0.0, metrics["eval/pass@1"])
            logger.log(state.step, metrics)
            if cfg.log_samples:
                logger.log_samples(state.step, samples)
            step_metrics = {"step": state.step, **metrics}
            _show(progress, step_metrics)
            stopping = distributed.any_true(stop.requested)  # every rank stops at the same step
            if last or stopping or (cfg.save_steps and state.step % cfg.save_steps == 0):
                save(run)
                logger.flush()
            if stopping:
                print(f"[sapo] stopped at step {state.step}; resume with: sapo train resume={run.out_dir}", flush=True)
                break
    if progress is not None:
        progress.close()
    logger.close()
    if state.step >= cfg.max_steps:
        distributed.save_final_model(run.policy, run.out_dir / "final_model", info)
    return {**step_metrics, "finished": state.step >= cfg.max_steps}


def rl_step(run: Run) -> tuple[dict[str, float], list[dict]]:
    """One RL step on run.state.step: the phases in order; returns the step's metrics row and a few
    of its completions for samples.jsonl."""
    cfg, state, info = run.cfg, run.state, run.info
    t_step = time.perf_counter()
    run.policy.model.train()
    # 1. sample prompts, roll out G completions each (several processes: every rank draws the step's
    # prompts and keeps its own slice of whole groups, with its own sampling stream)
    prompt_indices = distributed.rank_slice(run.sampler.next(cfg.prompts_per_step), info)
    if run.lagged is None:
        if info.enabled:  # a resume draws the same completions
            run.rollout_gen.manual_seed(distributed.rollout_seed(cfg.seed, state.step, info))
        sampling = run.policy.sampling(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                       top_p=cfg.top_p, top_k=cfg.top_k, generator=run.rollout_gen,
                                       record_experts=cfg.routing_replay == "R3")
        rollout = phases.collect(run.engine, run.policy, run.task, prompt_indices,
                                 num_generations=cfg.num_generations, sampling=sampling)
        async_metrics = {}
    else:  # max_staleness = K: sampled with the weights after step t-1-K (now, or ahead in the sampler process)
        rollout, async_metrics = phases.collect_lagged(run.lagged, rollout_request(run, state.step), run.task,
                                                       prompt_indices, cfg.num_generations)
    # 2. rewards, 3. group-normalised advantages
    scored = phases.score(rollout, run.task, run.policy.decode, cfg.num_generations)
    adv = phases.advantages(rollout, scored, scale_rewards=cfg.scale_rewards, drop_equal_groups=cfg.drop_equal_groups,
                            pad_token_id=run.policy.pad_token_id, mask_truncated=cfg.mask_truncated)
    metrics = {**adv.metrics, **scored.metrics}
    metrics.update(_run_counters(scored.metrics, run.counter_base, state.reward_counters))
    metrics.update({f"data/skipped/{k}": float(v) for k, v in run.task.skipped.items()})  # e.g. too long
    t_old = t_update = 0.0
    if len(adv.keep_rows) > 0:
        # 4. behaviour (old) log-probs, once, before any update; the routing they used (MoE)
        beh = phases.behaviour(run.policy, run.forward, run.reference, rollout, adv,
                               need_old=cfg.num_minibatches > 1 or cfg.tis_cap > 0,
                               routing_replay=cfg.routing_replay, old_logprobs=cfg.old_logprobs, tis_cap=cfg.tis_cap)
        metrics.update(beh.metrics)
        # 5. num_minibatches sequential updates over the rollout batch
        try:
            opt = phases.optimize(
                run.policy, run.forward, run.optimizer, run.scheduler, adv, beh,
                _minibatches(cfg, state.step, info, adv.keep_rows, scored.rewards.numel()), run.update,
                nonfinite_run=state.nonfinite_run, max_nonfinite=cfg.max_consecutive_nonfinite,
                after_update=lambda: ckpt.kill_point_for_tests("step", state.step),  # crash-safety tests only
            )
        except phases.TooManyNonFinite as err:
            raise NonFiniteError(
                f"{err.args[0]} consecutive updates had non-finite loss or gradients (step {state.step}); "
                "the weights were left untouched and the last checkpoint is clean. Lower lr, "
                "check rewards for NaN, or raise max_consecutive_nonfinite."
            ) from None
        state.nonfinite_total += opt.skipped
        state.nonfinite_run = opt.nonfinite_run
        metrics.update(opt.metrics)
        t_old, t_update = beh.seconds, opt.seconds
    # 6. the new weights: to the engine now, or kept for the step that samples with them (staleness)
    if run.lagged is None:
        t_hand = phases.sync_weights(run.engine, run.policy.model, version=state.step)
    else:
        t_hand = run.lagged.weights_ready(state.step, run.policy.model)
    batch = rollout.batch
    state.policy_version = batch.policy_version
    metrics.update({
        "nonfinite/skipped_total": float(state.nonfinite_total),
        "lr": run.scheduler.get_last_lr()[0],
        "time/rollout": rollout.seconds, "time/reward": scored.seconds, "time/old_logprobs": t_old,
        "time/update": t_update, "time/step": time.perf_counter() - t_step,
        "tokens/completion_per_s": batch.num_completion_tokens / max(rollout.seconds, 1e-9),
        "async/staleness": float(state.step - 1 - batch.policy_version),  # RL steps behind, this batch
        "async/sync_s": t_hand + async_metrics.pop("async/sync_s", 0.0),  # handing weights to the sampler
        **async_metrics,  # async/sampler_wait_s, async/trainer_wait_s
    })
    samples = _sample_rows(scored, adv, cfg.log_samples) if cfg.log_samples else []
    return distributed.reduce_metrics(metrics), samples  # one row for all ranks


def setup(cfg: TrainConfig, checkpoint_path: Path | None) -> Run:
    """Build everything the loop reads: model, data, engine, optimizer; restore a checkpoint."""
    out_dir = Path(cfg.output_dir)  # start_run locked and checked it
    info = distributed.init_distributed(cfg.parallel)  # torchrun: one rank per process (sapo/distributed.py)
    if info.enabled:
        _check_data_parallel(cfg, info)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)

    examples = load_examples(cfg)  # data errors surface before the model loads
    with distributed.main_first(info):  # rank 0 builds a built-in model's cache, the others read it
        policy = load_policy(cfg)
    task = load_task(cfg, policy.tokenizer, policy.processor, examples=examples)
    model = policy.model
    if info.is_main:
        save_config(cfg, out_dir / "config.yaml")
    # the KL reference is the starting policy: copy it before sharding or a checkpoint changes the weights
    reference = make_reference(model, lora=policy.lora) if cfg.beta > 0 else None
    distributed.prepare_model(model, info)  # FSDP2 / replicated; before the optimizer sees the parameters
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
        eps=1e-8,
    )
    scheduler = _make_scheduler(optimizer, cfg, cfg.max_steps * cfg.num_minibatches)
    rollout_gen = torch.Generator().manual_seed(cfg.seed)
    state = TrainerState(max_steps=cfg.max_steps, world_size=info.world_size)
    # reward counters count per process; a run logs them from its own start, across resumes
    counter_base = _counters(task.rewards.metrics())
    if checkpoint_path is not None:
        saved = ckpt.load_checkpoint(
            checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, generators={"rollout": rollout_gen},
            load_full_state=(lambda w, o: distributed.load_full_state(model, optimizer, w, o)) if info.enabled else None,
        )
        state = TrainerState.from_dict(saved)
        state.max_steps, state.world_size = cfg.max_steps, info.world_size
        if not info.is_main:
            state.reward_counters = {}  # saved summed over ranks: rank 0 carries them
        print(f"[sapo] resuming {out_dir} from step {state.step}", flush=True)
    engine = make_engine(cfg.engine, model)  # K = 0: the rollouts; always: evaluation
    phases.sync_weights(engine, model, version=state.step)  # the version a resumed engine holds, too
    run = Run(
        cfg=cfg, info=info, out_dir=out_dir, policy=policy, task=task, engine=engine,
        forward=TeacherForcing(ForwardSettings.from_config(cfg), pad_token_id=policy.pad_token_id,
                               device=policy.device),
        reference=reference, update=UpdateSettings.from_config(cfg), optimizer=optimizer, scheduler=scheduler,
        rollout_gen=rollout_gen, lagged=None,
        sampler=PromptSampler(len(task.train), cfg.seed, state.data_epoch, state.data_index),
        state=state, counter_base=counter_base, resumed=checkpoint_path is not None,
    )
    if cfg.max_staleness > 0:
        run.lagged = _lagged_sampler(run, checkpoint_path)
    return run


def _lagged_sampler(run: Run, checkpoint_path: Path | None) -> LaggedSampler | AsyncSampler:
    """max_staleness = K > 0: the weight versions the coming steps sample with, and what samples them."""
    cfg, model = run.cfg, run.policy.model
    history = WeightHistory(cfg.max_staleness)
    if checkpoint_path is None:
        history.record(0, model)
    else:  # the versions the next K + 1 steps sample with, saved beside the weights
        try:
            history.load_state(ckpt.load_extra(checkpoint_path, WEIGHT_HISTORY))
        except ckpt.CheckpointError as err:
            raise ConfigError(f"resume: {checkpoint_path} holds no older weight versions for max_staleness="
                              f"{cfg.max_staleness} ({err})") from None
    if cfg.staleness_mode == "async":
        return AsyncSampler(cfg, cfg.engine, model, history, lambda step: rollout_request(run, step),
                            first_step=run.state.step + 1, max_steps=cfg.max_steps)
    if cfg.engine == "torch":
        engine = make_engine("torch-copy", model)
    else:
        engine = make_engine(cfg.engine, model)
    if not engine.owns_weights:
        raise ConfigError(f"max_staleness > 0 with staleness_mode=sync needs an engine with its own copy of the "
                          f"weights; engine={cfg.engine} samples the live model (use engine=torch, or "
                          "staleness_mode=async, whose sampler process has its own model)")
    return LaggedSampler(engine, history)


def rollout_request(run: Run, step: int) -> RolloutRequest:
    """What RL step `step` samples, fixed by the step alone: its prompts (the data order is a pure
    function of the step), its stream (seeded by the step) and the weights version t-1-K."""
    cfg, info = run.cfg, run.info
    size, per_step = len(run.task.train), cfg.prompts_per_step
    drawn = (step - 1) * per_step
    indices = distributed.rank_slice(PromptSampler(size, cfg.seed, drawn // size, drawn % size).next(per_step), info)
    _, prompt_ids, row_extra = phases.step_prompts(run.task, indices, cfg.num_generations)
    sampling = run.policy.sampling(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                   top_p=cfg.top_p, top_k=cfg.top_k, record_experts=cfg.routing_replay == "R3")
    return RolloutRequest(step, prompt_ids, sampling, seed=distributed.rollout_seed(cfg.seed, step, info),
                          extra_inputs=row_extra or None, version=sampling_version(step, cfg.max_staleness))


def evaluate_policy(run: Run, step: int) -> dict[str, float]:
    """Held-out evaluation: rank 0 evaluates on the full weights, the others wait. Its own sampling
    stream, so evaluating never shifts training's RNG."""
    if not run.task.eval:
        return {}
    with distributed.gathered(run.policy.model):
        if not run.info.is_main:
            return {}
        t0 = time.perf_counter()
        own_stream = torch.Generator().manual_seed(run.cfg.seed * 7919 + step)
        engine = make_engine(run.cfg.engine, run.policy.model) if run.engine.owns_weights else run.engine
        settings = EvalSettings.from_config(run.cfg)
        result = evaluate_items(engine, run.policy, run.task.eval, run.task.correctness, settings,
                                generator=own_stream)
        if step in (0, run.cfg.max_steps):  # the temperature curve of the start and of the final policy
            result.metrics.update(temperature_sweep(engine, run.policy, run.task.eval, run.task.correctness,
                                                    settings, generator=own_stream))
        result.metrics["time/eval"] = time.perf_counter() - t0
        return result.metrics


def save(run: Run) -> None:
    """Checkpoint the run (several processes: gather the full, unsharded state; rank 0 writes it)."""
    state, info = run.state, run.info
    model = run.policy.model
    full_state = distributed.full_state(model, run.optimizer) if info.enabled else None
    state.data_epoch, state.data_index = run.sampler.epoch, run.sampler.index
    # counters now: after evaluation too
    counters = distributed.reduce_metrics(
        _run_counters(run.task.rewards.metrics(), run.counter_base, state.reward_counters))
    if info.is_main:
        saved = TrainerState(**{**state.to_dict(), "reward_counters": counters})
        ckpt.save_checkpoint(
            run.out_dir, state.step, model=model, optimizer=run.optimizer, scheduler=run.scheduler,
            trainer_state=saved.to_dict(), generators={"rollout": run.rollout_gen},
            keep=run.cfg.keep_checkpoints, full_state=full_state,
            extra={WEIGHT_HISTORY: run.lagged.history.state()} if run.lagged is not None else None,
        )


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


def _sample_rows(scored: phases.Scored, adv: phases.Advantaged, count: int) -> list[dict]:
    """A few of the step's completions, spread over the batch, for samples.jsonl."""
    n, advantages = len(scored.completions), adv.advantages.flatten()
    return [
        {"prompt": scored.prompts[i], "completion": scored.completions[i], "answer": scored.answers[i],
         "reward": float(scored.total[i]), "advantage": float(advantages[i])}
        for i in range(0, n, max(1, n // count))
    ][:count]


def _progress_bar(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, desc="sapo train", dynamic_ncols=True)


__all__ = ["train", "PromptSampler", "NonFiniteError", "resolve_resume", "rl_step", "setup"]
