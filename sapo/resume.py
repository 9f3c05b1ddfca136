"""Starting a run: the output_dir lock, `resume=` that means what it says, and which checkpoint.

`start_run(cfg, overrides)` is the first thing `train()` does; it returns a `RunStart` (a context
manager holding the output_dir lock) with the config to train with and the checkpoint to load:

* resume=DIR keeps DIR's saved config. A key given on this command line, or in a `--config` file
  given with it, may differ from the saved value only if it is in RESUMABLE_OVERRIDES; any other
  changed key is a ConfigError naming it.
* Resume runs no code the user did not name on this command line: user reward code
  (module:function, file.py:function) in the saved config needs trust_saved_rewards=true or the
  same rewards= again. A finished run with its final_model/ is "nothing to do" before any import.
* The newest checkpoint that `verify_checkpoint` finds intact is used; damaged newer ones are
  moved aside (`checkpoint-N.damaged`) with a warning saying what was wrong. None intact: ConfigError.
* A finished run whose final_model/ is missing or partial gets it rebuilt from its last checkpoint.
* Storage problems of the output_dir (a file, under a file, read-only) are one StorageError line.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sapo import checkpoint as ckpt
from sapo.config import ConfigError, TrainConfig, build_config, coerce_value, read_config_file
from sapo.runlock import RunLock, RunLockedError, is_rank_zero
from sapo.storage import StorageError, describe_os_error

RESUMABLE_OVERRIDES = {"max_steps", "threads", "progress", "eval_steps", "save_steps", "keep_checkpoints", "resume",
                       "tensorboard", "report_to", "report", "parallel", "trust_saved_rewards"}
FINAL_MODEL = "final_model"


@dataclass
class RunStart:
    """What train() starts from. Use as a context manager: the output_dir lock is released on exit."""

    cfg: TrainConfig
    checkpoint: Path | None = None  # the verified checkpoint to resume from (None: start at step 0)
    finished: bool = False  # nothing to train: train() returns `result`
    result: dict = field(default_factory=dict)
    lock: RunLock | None = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunStart:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


# ---------------------------------------------------------------------------------------------
# The saved config, the keys that may change, and the code it would run


def _same(key: str, old: Any, new: Any) -> bool:
    if key == "output_dir":
        return Path(str(old)).expanduser().resolve() == Path(str(new)).expanduser().resolve()
    return old == new


def changed_keys(saved: dict, overrides: dict) -> list[str]:
    """Keys of `overrides` (command line and --config file) whose value differs from the saved run's
    and may not change on resume. A key repeated with its saved value is not a change."""
    defaults = TrainConfig()
    changed = []
    for key, value in overrides.items():
        if key in RESUMABLE_OVERRIDES:
            continue
        new = coerce_value(key, value)
        old = coerce_value(key, saved[key]) if key in saved else getattr(defaults, key)
        if not _same(key, old, new):
            changed.append(key)
    return sorted(changed)


def user_reward_code(rewards: list[str]) -> list[str]:
    """The reward specs that name code to import (everything but the built-in names)."""
    from sapo.rewards.runner import BUILTIN_REWARDS

    return [r for r in rewards if isinstance(r, str) and r not in BUILTIN_REWARDS]


def _check_reward_trust(run_dir: Path, saved: dict, overrides: dict, cfg: TrainConfig) -> None:
    saved_rewards = coerce_value("rewards", saved.get("rewards", ["math"]))
    code = user_reward_code(saved_rewards)
    if not code:
        return
    named_again = "rewards" in overrides and coerce_value("rewards", overrides["rewards"]) == saved_rewards
    trusted = cfg.trust_saved_rewards or coerce_value("trust_saved_rewards", overrides.get("trust_saved_rewards",
                                                                                            False))
    if not (named_again or trusted):
        raise ConfigError(
            f"resume={run_dir}: its config.yaml names reward code that would be imported and run: "
            f"{', '.join(code)}. A resume runs no code you did not name: check it, then add "
            f"trust_saved_rewards=true (or give the same rewards=[{','.join(saved_rewards)}] again)")


def read_saved(run_dir: Path) -> dict:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        if not run_dir.exists():
            raise ConfigError(f"resume={run_dir}: no such folder; pass the output_dir of a sapo run")
        raise ConfigError(f"resume={run_dir}: no config.yaml there; is it the output_dir of a sapo run?")
    return read_config_file(saved)


def resolve_resume(cfg: TrainConfig, overrides: dict) -> tuple[TrainConfig, Path | None]:
    """For resume=DIR: the saved config (plus the overrides that may change) and the newest intact
    checkpoint (damaged newer ones moved aside). Takes no lock; start_run is what train() uses."""
    run_dir = Path(cfg.resume)
    saved = read_saved(run_dir)
    _refuse_changes(saved, overrides)
    _check_reward_trust(run_dir, saved, overrides, cfg)
    return _resumed_config(run_dir, overrides), choose_checkpoint(run_dir)


def _refuse_changes(saved: dict, overrides: dict) -> None:
    changed = changed_keys(saved, overrides)
    if changed:
        raise ConfigError(
            f"resume keeps the saved config; these keys cannot change on resume: {', '.join(changed)} "
            f"(allowed: {', '.join(sorted(RESUMABLE_OVERRIDES - {'resume'}))})"
        )


def _resumed_config(run_dir: Path, overrides: dict, *, rewards_off: bool = False) -> TrainConfig:
    keep = {k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES and k != "resume"}
    if rewards_off:  # only the model is needed: import no reward code at all
        keep.update({"rewards": ["math"], "reward_weights": []})
    new_cfg = build_config(run_dir / "config.yaml", keep)
    new_cfg.output_dir = str(run_dir)
    new_cfg.resume = str(run_dir)
    return new_cfg


# ---------------------------------------------------------------------------------------------
# Checkpoints


def choose_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are moved aside (`.damaged`) with a
    warning naming what was wrong. None when the run has no checkpoint at all. ConfigError when none
    is intact: then nothing is renamed, so the next attempt says the same, and a run that only has
    damaged checkpoints is never silently restarted from step 0."""
    found = ckpt.list_checkpoints(run_dir)
    problems, damaged = [], []
    for _, path in reversed(found):
        problem = ckpt.verify_checkpoint(path)
        if problem is None:
            if damaged and is_rank_zero():  # torchrun: one process renames, the others only skip them
                problems = [f"{msg} (moved aside to {ckpt.set_aside(p).name})" for p, msg in zip(damaged, problems)]
            if problems:
                warnings.warn(f"resume={run_dir}: {'; '.join(problems)}; resuming from {path.name}, the newest "
                              "intact checkpoint", stacklevel=3)
            return path
        damaged.append(path)
        problems.append(f"{path.name} is damaged: {problem}")
    earlier = sorted(p.name for p in run_dir.glob("checkpoint-*.damaged*")) if run_dir.is_dir() else []
    if problems or earlier:
        listed = problems + [f"{name} was set aside by an earlier resume" for name in earlier]
        raise ConfigError(
            f"resume={run_dir}: no intact checkpoint: {'; '.join(listed)}. Restore a checkpoint from a backup, or "
            f"start the run over: move {run_dir} aside and run again without resume=")
    return None


def final_model_complete(path: Path) -> bool:
    """final_model/ is written atomically; a folder there without its config and weights was
    tampered with or copied partially."""
    return (path / "config.json").is_file() and any(
        p.suffix in (".safetensors", ".bin") for p in path.iterdir() if p.is_file())


def export_checkpoint(checkpoint: Path, dest: Path, run_cfg: TrainConfig) -> Path:
    """Write a checkpoint's model as a Hugging Face folder (what final_model/ holds): the run's base
    model with the checkpoint's trainable weights (LoRA adapters merged), written atomically."""
    from sapo.training.policy import load_policy

    policy = load_policy(run_cfg)
    _, unexpected = policy.model.load_state_dict(ckpt.load_weights(checkpoint), strict=False)
    if unexpected:
        raise ckpt.CheckpointError(f"{checkpoint} has weights the model {run_cfg.model} does not: {unexpected[:5]}")
    with ckpt.atomic_folder(dest) as tmp:
        policy.save_final(tmp)
    return dest


def _finish(run: RunStart, overrides: dict, checkpoint: Path, done: int, max_steps: int) -> RunStart:
    out = Path(run.cfg.resume)
    final = out / FINAL_MODEL
    run.finished, run.checkpoint = True, checkpoint
    run.result = {"step": done, "finished": True}
    if final.is_dir() and final_model_complete(final):
        print(f"[sapo] run in {out} already finished at step {done} (max_steps={max_steps}); nothing to do",
              flush=True)
        return run
    if not is_rank_zero():
        return run
    partial = [p.name for p in (out / f"{FINAL_MODEL}.tmp", out / f"{FINAL_MODEL}.old", final) if p.exists()]
    state = f"partial ({', '.join(partial)} left by an interrupted write)" if partial else "missing"
    print(f"[sapo] run in {out} finished at step {done}, but {FINAL_MODEL}/ is {state}: rebuilding it from "
          f"{checkpoint.name}", flush=True)
    run.cfg = _resumed_config(out, overrides, rewards_off=True)
    export_checkpoint(checkpoint, final, run.cfg)
    for leftover in (out / f"{FINAL_MODEL}.tmp", out / f"{FINAL_MODEL}.old"):
        shutil.rmtree(leftover, ignore_errors=True)
    print(f"[sapo] wrote {final}", flush=True)  # the CLI rewrites report.md for a finished run
    return run


# ---------------------------------------------------------------------------------------------
# The entry point


def prepare_output_dir(out: Path) -> None:
    """Create output_dir, or raise StorageError saying why it cannot be (a file, under a file, read-only)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"output_dir={out}: cannot create it: {describe_os_error(err)}", err.errno) from None
    if not out.is_dir():
        raise StorageError(f"output_dir={out}: it is a file, not a folder")


def _lock(out: Path) -> RunLock | None:
    if not is_rank_zero():
        return None
    try:
        return RunLock(out).acquire()
    except RunLockedError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise StorageError(f"output_dir={out}: cannot write there: {describe_os_error(err)}", err.errno) from None


def start_run(cfg: TrainConfig, overrides: dict | None = None) -> RunStart:
    """Lock output_dir and decide where the run starts (see the module docstring). Raises ConfigError
    (exit 2) for a changed key, untrusted reward code, another run holding the folder, no intact
    checkpoint, or a new run into a folder with checkpoints; StorageError for an unusable folder."""
    overrides = dict(overrides or {})
    if not cfg.resume:
        out = Path(cfg.output_dir)
        if not str(cfg.output_dir).strip():
            raise ConfigError("output_dir is empty: name the folder the run writes to")
        prepare_output_dir(out)
        run = RunStart(cfg, lock=_lock(out))
        try:
            if ckpt.list_checkpoints(out):
                raise ConfigError(
                    f"output_dir={out} already holds a run with checkpoints; pass resume={out} to continue it, "
                    "or choose another output_dir (nothing was overwritten)"
                )
        except BaseException:
            run.close()
            raise
        return run

    run_dir = Path(cfg.resume)
    saved = read_saved(run_dir)
    _refuse_changes(saved, overrides)
    max_steps = coerce_value("max_steps", overrides.get("max_steps", saved.get("max_steps", cfg.max_steps)))
    run = RunStart(cfg, lock=_lock(run_dir))
    try:
        checkpoint = choose_checkpoint(run_dir)
        if checkpoint is not None and (done := ckpt.read_trainer_state(checkpoint)["step"]) >= max_steps:
            return _finish(run, overrides, checkpoint, done, max_steps)  # before any reward code is imported
        _check_reward_trust(run_dir, saved, overrides, cfg)
        run.cfg, run.checkpoint = _resumed_config(run_dir, overrides), checkpoint
        if checkpoint is None:
            warnings.warn(
                f"resume={run_dir}: no complete checkpoint found (the run stopped before its first save); "
                "starting again from step 0", stacklevel=3,
            )
    except BaseException:
        run.close()
        raise
    return run


def storage_error_line(err: OSError, output_dir: str | Path | None) -> str:
    """One line for a storage OSError raised anywhere in a run: the path, the cause, and the
    newest intact checkpoint to resume from."""
    line = describe_os_error(err, None if err.filename or not output_dir else f"writing into {output_dir}")
    if output_dir:
        newest = ckpt.latest_checkpoint(output_dir)
        if newest is not None:
            line += f"; {newest.name} is intact: after fixing this, sapo train resume={output_dir}"
    return line


@contextlib.contextmanager
def eval_model_source(cfg: TrainConfig) -> Iterator[TrainConfig]:
    """`sapo eval model=RUN/checkpoint-N`: the checkpoint's model exported to a temporary Hugging Face
    folder (the run's config.yaml says which base model and LoRA settings); any other model is used
    as it is."""
    path = Path(cfg.model)
    if not (path.is_dir() and (path / "model.pt").is_file() and (path / "trainer_state.json").is_file()):
        yield cfg
        return
    problem = ckpt.verify_checkpoint(path)
    if problem is not None:
        raise ConfigError(f"model={path}: the checkpoint is damaged: {problem}")
    if not (path.parent / "config.yaml").is_file():
        raise ConfigError(f"model={path} is a checkpoint, but {path.parent} has no config.yaml naming its base model")
    run_cfg = _resumed_config(path.parent, {}, rewards_off=True)
    with tempfile.TemporaryDirectory(prefix="sapo-eval-") as tmp:
        print(f"[sapo] exporting {path} to a temporary model folder", file=sys.stderr, flush=True)
        export_checkpoint(path, Path(tmp) / "model", run_cfg)
        yield type(cfg)(**{**cfg.__dict__, "model": str(Path(tmp) / "model")})


__all__ = ["RESUMABLE_OVERRIDES", "RunStart", "start_run", "resolve_resume", "choose_checkpoint", "export_checkpoint",
           "eval_model_source", "storage_error_line"]
