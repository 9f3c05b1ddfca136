"""The grids of `sapo compare`: which runs a study is made of (the runner and the tables are in compare.py).

A run is a `RunSpec`: objective, lr, mini-batches, seed, model, SAPO's temperatures, the staleness K and
any further config keys. Its folder name is made from the config alone, so a config asked for by two
parts of a grid runs once. Grids:

- `smoke`, `default`, `full`: the MoE stability study (docs/moe_study.md).
- `offpolicy-smoke`, `offpolicy`, `offpolicy-full`: the off-policy study (docs/offpolicy_study.md):
  SAPO at several gate temperatures against GRPO, GRPO-R2, GSPO and CISPO as the rollouts grow stale.
- `custom`: the product of the axes given on the command line (`--objectives sapo,grpo --tau 1,9
  --staleness 0,4 --lr 1e-4 --minibatches 4 --seeds 0,1,2`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

OBJECTIVES = ("sapo", "gspo", "grpo", "grpo_r2")  # row labels; grpo_r2 = GRPO clip 0.2/0.27 + R2 replay
MOE, DENSE = "builtin:arith-moe", "builtin:arith-dense"
TAU_NEG_RATIO = 1.05  # the paper's tau_neg / tau_pos


@dataclass(frozen=True)
class RunSpec:
    part: str  # objectives | frontier | tau_neg | tau | dense_vs_moe | staleness | tau_ratio | custom
    label: str  # sapo, gspo, grpo, grpo_r2, tau_neg=0.95, sapo tau=9, ...
    loss_type: str
    lr: float
    num_minibatches: int
    seed: int
    model: str = MOE
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    max_staleness: int = 0
    extra: tuple[tuple[str, str], ...] = ()  # further config keys, sorted: (("old_logprobs", "recompute"), ...)

    @property
    def name(self) -> str:
        """Folder name from the config alone (part and label excluded): a shared config runs once.
        K = 0 without extra keys keeps the MoE study's names, so its finished runs stay valid."""
        model = self.model.split(":")[-1].removeprefix("arith-")
        tail = f"_k{self.max_staleness}" if self.max_staleness else ""
        tail += "".join(f"_{_short(k)}{v}" for k, v in self.extra)
        return (f"{self.loss_type}_{model}_lr{self.lr:g}_mb{self.num_minibatches}"
                f"_tp{self.tau_pos:g}_tn{self.tau_neg:g}{tail}_s{self.seed}")

    def overrides(self, base: dict[str, str]) -> dict[str, str]:
        out = {**base, "loss_type": self.loss_type, "model": self.model, "lr": f"{self.lr:g}",
               "num_minibatches": str(self.num_minibatches), "seed": str(self.seed),
               "tau_pos": f"{self.tau_pos:g}", "tau_neg": f"{self.tau_neg:g}", **dict(self.extra)}
        if self.max_staleness:
            out["max_staleness"] = str(self.max_staleness)
        return out

    @property
    def cell(self) -> tuple:
        """The config without the seed and the part: the seeds of one cell form a table row."""
        return (self.label, self.model, self.num_minibatches, self.lr, self.tau_pos, self.tau_neg,
                self.max_staleness, self.extra)


def _short(key: str) -> str:
    """old_logprobs -> ol, tis_cap -> tc, norm_lr_scale -> nls: short, and stable across runs."""
    return "".join(word[0] for word in key.split("_"))


@dataclass
class StudyGrid:
    name: str
    base: dict[str, str]  # config keys shared by every run
    specs: list[RunSpec] = field(default_factory=list)

    @property
    def runs(self) -> list[RunSpec]:
        """One spec per distinct folder, in grid order."""
        seen: dict[str, RunSpec] = {}
        for s in self.specs:
            seen.setdefault(s.name, s)
        return list(seen.values())

    @property
    def offpolicy(self) -> bool:
        return any(s.part in ("staleness", "tau_ratio", "custom", "norm_lr_scale=1") for s in self.specs)


QUIET = {"progress": "false", "tensorboard": "false", "report": "false", "log_samples": "2", "threads": "1",
         "keep_checkpoints": "1", "eval_greedy": "false", "eval_temperatures": "[]"}
# The studies' task, pinned: builtin:arith with the warm start they were measured with (the built-in
# default task may change; these keys keep a study's runs comparable with its published table)
STUDY_TASK = {"dataset": "builtin:arith", "warmstart_steps": "500", "warmstart_label_smoothing": "0.05",
              "warmstart_teacher_sign_error": "0"}
_COMMON = {**QUIET, **STUDY_TASK, "eval_num_problems": "200", "eval_num_samples": "4", "eval_pass_k": "[1,4]",
           "eval_steps": "10", "save_steps": "10"}
_SMOKE = {**QUIET, **STUDY_TASK, "warmstart_steps": "20", "train_size": "200", "prompts_per_step": "4", "num_generations": "4",
          "max_completion_length": "16", "eval_num_problems": "8", "eval_num_samples": "2", "eval_pass_k": "[1,2]",
          "max_steps": "2", "eval_steps": "1", "save_steps": "1"}


# ---------------------------------------------------------------------------------------------
# The MoE stability study


def _build(name: str, base: dict, *, main_lr: float, lrs: list[float], seeds: list[int], minibatches: list[int],
           frontier_minibatches: list[int], tau_negs: list[float], taus: list[float], tau_seeds: list[int],
           dense_labels: list[str]) -> StudyGrid:
    specs: list[RunSpec] = []
    mb0 = minibatches[0]
    for mb in minibatches:  # Pass@1 over steps per objective at each off-policy degree
        specs += [RunSpec("objectives", o, o, main_lr, mb, s) for o in OBJECTIVES for s in seeds]
    for mb in frontier_minibatches:  # stability frontier over the lr grid
        specs += [RunSpec("frontier", o, o, lr, mb, s) for o in OBJECTIVES for lr in lrs for s in seeds]
    specs += [RunSpec("tau_neg", f"tau_neg={t:g}", "sapo", main_lr, mb0, s, tau_neg=t)  # paper ablation
              for t in tau_negs for s in seeds]
    specs += [RunSpec("tau", f"tau={t:g}", "sapo", main_lr, mb0, s, tau_pos=t, tau_neg=t)  # wider sweep
              for t in taus for s in tau_seeds]
    for model in (DENSE, MOE):  # log-ratio spread and Var_i, dense vs MoE, same objective and lr
        specs += [RunSpec("dense_vs_moe", o, o, main_lr, mb0, s, model=model) for o in dense_labels for s in seeds]
    return StudyGrid(name, base, specs)


# ---------------------------------------------------------------------------------------------
# The off-policy study: objectives x gate temperature x staleness x lr

# Every objective takes its ratio against the policy that sampled (old_logprobs=sampler), so the clip or
# the gate sees the whole lag, except GRPO-R2: R2 replays the old policy's routing, which only a
# recomputed pi_old has. It runs as verl / TRL users run R2 asynchronously: pi_old recomputed by the
# trainer (the proximal policy) and the lag corrected by truncated importance weights, cap 2.
OFFPOLICY_BASE = {"staleness_mode": "sync", "old_logprobs": "sampler"}
OBJECTIVE_KEYS = {"grpo_r2": (("old_logprobs", "recompute"), ("tis_cap", "2"))}
WORKING_LR = 1e-4  # the MoE study's largest stable lr at 4 mini-batches for sapo, gspo and grpo


def objective_spec(part: str, objective: str, lr: float, mb: int, seed: int, *, tau: float = 1.0,
                   tau_neg_ratio: float = TAU_NEG_RATIO, staleness: int = 0, model: str = MOE,
                   extra: tuple[tuple[str, str], ...] = ()) -> RunSpec:
    """One run of the off-policy study. `tau` (SAPO only) is tau_pos; tau_neg = tau_neg_ratio x tau."""
    keys = tuple(sorted({**dict(OBJECTIVE_KEYS.get(objective, ())), **dict(extra)}.items()))
    if objective == "sapo":
        label = f"sapo tau={tau:g}" + (f" neg x{tau_neg_ratio:g}" if tau_neg_ratio != TAU_NEG_RATIO else "")
        tau_neg = float(f"{tau * tau_neg_ratio:.6g}")
        return RunSpec(part, label, "sapo", lr, mb, seed, model, tau, tau_neg, staleness, keys)
    return RunSpec(part, objective, objective, lr, mb, seed, model, max_staleness=staleness, extra=keys)


def _offpolicy(name: str, base: dict, *, seeds: list[int], frontier: dict[str, list[float]],
               staleness: dict[str, list[int]], ratios: list[float], ratio_staleness: list[int],
               norm_lr_repeats: dict[str, list[int]] | None = None, mb: int = 4) -> StudyGrid:
    """frontier: row -> lrs at K = 0; staleness: row -> Ks at WORKING_LR; ratios: tau_neg / tau_pos at
    tau 9; norm_lr_repeats: row -> Ks repeated with norm_lr_scale=1. A row is an objective or `sapo:TAU`."""
    def parse(row: str) -> tuple[str, float]:
        objective, _, tau = row.partition(":")
        return objective, float(tau or 1)

    specs: list[RunSpec] = []
    for row, lrs in frontier.items():
        objective, tau = parse(row)
        specs += [objective_spec("frontier", objective, lr, mb, s, tau=tau) for lr in lrs for s in seeds]
    for row, ks in staleness.items():
        objective, tau = parse(row)
        specs += [objective_spec("staleness", objective, WORKING_LR, mb, s, tau=tau, staleness=k)
                  for k in ks for s in seeds]
    specs += [objective_spec("tau_ratio", "sapo", WORKING_LR, mb, s, tau=9, tau_neg_ratio=r, staleness=k)
              for r in ratios for k in ratio_staleness for s in seeds]
    for row, ks in (norm_lr_repeats or {}).items():
        objective, tau = parse(row)
        specs += [objective_spec("norm_lr_scale=1", objective, WORKING_LR, mb, s, tau=tau, staleness=k,
                                 extra=(("norm_lr_scale", "1"),)) for k in ks for s in seeds]
    return StudyGrid(name, {**base, **OFFPOLICY_BASE}, specs)


def make_grid(name: str) -> StudyGrid:
    """See the module docstring; times in docs/moe_study.md and docs/offpolicy_study.md."""
    if name == "smoke":
        grid = StudyGrid(name, dict(_SMOKE))
        grid.specs = [RunSpec(part, o, o, 1e-3, 2, 0) for part in ("objectives", "frontier")
                      for o in ("sapo", "grpo_r2")]
        grid.specs.append(RunSpec("dense_vs_moe", "sapo", "sapo", 1e-3, 2, 0))
        return grid
    if name == "default":
        return _build(name, {**_COMMON, "max_steps": "50"}, main_lr=5e-5, lrs=[5e-5, 1e-4, 2e-4], seeds=[0, 1, 2],
                      minibatches=[4, 8], frontier_minibatches=[4, 8], tau_negs=[0.95, 1.0, 1.05], taus=[1, 2, 5, 10],
                      tau_seeds=[0], dense_labels=["sapo"])
    if name == "full":
        return _build(name, {**_COMMON, "max_steps": "150"}, main_lr=5e-5, lrs=[2e-5, 5e-5, 1e-4, 2e-4, 3e-4],
                      seeds=[0, 1, 2], minibatches=[4, 8], frontier_minibatches=[4, 8], tau_negs=[0.95, 1.0, 1.05],
                      taus=[1, 2, 5, 10], tau_seeds=[0, 1, 2], dense_labels=["sapo", "grpo"])
    if name == "offpolicy-smoke":  # the test: two objectives, K = 0 and 2, one seed, tiny everything
        return _offpolicy(name, {**_SMOKE, "max_steps": "3"}, seeds=[0], frontier={},
                          staleness={"sapo:9": [0, 2], "grpo_r2": [2]}, ratios=[], ratio_staleness=[], mb=2)
    if name == "offpolicy":  # ~108 runs x 50 steps: about 60 min with --jobs 2 on 2 free cores (measured: 98 min with other jobs running)
        core = ["sapo:1", "sapo:9", "grpo", "grpo_r2", "gspo"]
        return _offpolicy(name, {**_COMMON, "max_steps": "50"}, seeds=[0, 1, 2],
                          frontier={**{r: [1e-4, 2e-4] for r in core}, "sapo:3": [1e-4, 2e-4],
                                    "sapo:27": [1e-4, 2e-4], "cispo": [1e-4, 2e-4]},
                          staleness={**{r: [0, 2, 4, 8] for r in core}, "sapo:3": [0, 8], "sapo:27": [0, 8],
                                     "cispo": [0, 8]},
                          ratios=[1.0, 1.5], ratio_staleness=[8])
    if name == "offpolicy-full":  # everything `offpolicy` left out; its runs are shared with it
        rows = ["sapo:1", "sapo:3", "sapo:9", "sapo:27", "grpo", "grpo_r2", "gspo", "cispo", "dapo"]
        return _offpolicy(name, {**_COMMON, "max_steps": "50"}, seeds=[0, 1, 2],
                          frontier={r: [5e-5, 1e-4, 2e-4, 4e-4] for r in rows},
                          staleness={r: [0, 1, 2, 4, 8] for r in rows},
                          ratios=[0.9, 1.0, 1.05, 1.5], ratio_staleness=[0, 4, 8],
                          norm_lr_repeats={r: [0, 2, 8] for r in ["sapo:1", "sapo:9", "grpo", "grpo_r2", "gspo"]})
    raise ValueError(f"grid={name!r}: choose one of {', '.join(GRIDS)}, or give axes for a custom grid")


GRIDS = ("smoke", "default", "full", "offpolicy-smoke", "offpolicy", "offpolicy-full")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise ValueError(f"--{what} {text!r}: give numbers separated by commas, e.g. --{what} 1,9") from None


def custom_grid(*, objectives: str, taus: str = "1", staleness: str = "0", lrs: str = "1e-4", minibatches: str = "4",
                seeds: str = "0,1,2", steps: int = 50, tau_neg_ratio: float = TAU_NEG_RATIO,
                model: str = MOE) -> StudyGrid:
    """The product of the axes: every objective x lr x staleness x mini-batches x seed, and for SAPO x tau."""
    from sapo.objectives.registry import PRESETS

    names = [o.strip() for o in objectives.split(",") if o.strip()]
    unknown = [o for o in names if o not in PRESETS]
    if not names or unknown:
        raise ValueError(f"--objectives {objectives!r}: unknown {unknown or 'none given'}; "
                         f"choose from {', '.join(sorted(PRESETS))}")
    ks = [int(k) for k in _floats(staleness, "staleness")]
    mbs = [int(m) for m in _floats(minibatches, "minibatches")]
    if any(k < 0 for k in ks) or any(m < 1 for m in mbs):
        raise ValueError("--staleness must be >= 0 and --minibatches >= 1")
    specs = []
    for objective in names:
        for tau in (_floats(taus, "tau") if objective == "sapo" else [1.0]):
            specs += [objective_spec("custom", objective, lr, mb, s, tau=tau, tau_neg_ratio=tau_neg_ratio,
                                     staleness=k, model=model)
                      for lr in _floats(lrs, "lr") for k in ks for mb in mbs
                      for s in (int(x) for x in _floats(seeds, "seeds"))]
    return StudyGrid("custom", {**_COMMON, "max_steps": str(steps), **OFFPOLICY_BASE}, specs)
