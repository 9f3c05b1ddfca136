"""staleness_mode=async: the rollout engine in its own process, up to K + 1 RL steps ahead.

The trainer sends, in one ordered queue, weight versions and rollout requests; each request for step
s follows the weights it needs (version s - 1 - K) and precedes any newer ones, so the sampler process
always holds exactly the version a request names (it checks). What is sampled therefore depends on the
step only, never on timing: with the same seed and the same torch thread count per forward,
staleness_mode=async and staleness_mode=sync give the same rollouts, metrics and weights.

    trainer:  send v0, ask 1 .. K+1 | train 1 | send v1, ask K+2 | train 2 | ...
    sampler:  sample 1, 2, ..., K+1 (v0)           | sample K+2 (v1) | ...

The sampler process is forked where that is safe (no CUDA, and a single-threaded trainer, `threads=1`:
forking after OpenMP started a thread pool hangs the child): it starts with a copy-on-write copy of the
trainer's memory, imports and model included, so it costs little more than the pages it writes. Otherwise it is spawned and builds the model from the run's own config
(`load_policy`), then takes all the trainer's weights once. Then it takes each new version of what
trains (LoRA: the adapters). Engines that
only exist in the trainer process (registered at run time) cannot be used here; built-in and
entry-point engines can.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback

import torch
import torch.multiprocessing as mp

from sapo.training.staleness import RolloutRequest, Sampled, WeightHistory, sampling_version

POLL_S = 1.0  # how often a waiting trainer checks that the sampler process is alive


def _serve(source, engine_name: str, threads: int, requests, results) -> None:
    """The sampler process: apply weights and answer requests in order until told to stop.
    source: the model itself (a forked process holds a copy-on-write copy of the trainer's memory), or the
    run's config to build it from (a spawned process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if threads:
            torch.set_num_threads(threads)
        from sapo.rollout import make_engine

        if isinstance(source, torch.nn.Module):
            model = source
        else:
            from sapo.training.policy import load_policy

            model = load_policy(source).model
        for p in model.parameters():
            p.requires_grad_(False)
        engine = make_engine(engine_name, model)
        waited, trainer = 0.0, os.getppid()
        while True:
            t0 = time.perf_counter()
            while True:
                try:
                    kind, *payload = requests.get(timeout=POLL_S)
                    break
                except queue.Empty:
                    if os.getppid() != trainer:  # the trainer died (SIGKILL): nobody will stop us
                        return
            waited += time.perf_counter() - t0
            if kind == "stop":
                return
            if kind == "weights":
                version, named = payload
                _load(engine, model, named, version)
                continue
            (request,) = payload
            if engine.policy_version != request.version:
                raise RuntimeError(f"step {request.step} needs weights version {request.version}, the sampler holds "
                                   f"{engine.policy_version}: requests and weights arrived out of order")
            t1 = time.perf_counter()
            batch = engine.generate(request.prompt_ids, request.stream(), extra_inputs=request.extra_inputs)
            results.put(("batch", request.step, batch, time.perf_counter() - t1, waited))
            waited = 0.0
    except BaseException:  # the trainer re-raises it with this traceback
        results.put(("error", traceback.format_exc()))


@torch.no_grad()
def _load(engine, model: torch.nn.Module, named: dict[str, torch.Tensor], version: int) -> None:
    """Weights into the sampler process's engine: a copy-holding engine takes them itself; a live one
    samples this process's own model, which takes them first."""
    if engine.owns_weights:
        engine.load_weights(named.items(), version=version)
        return
    own = dict(model.named_parameters())
    for name, tensor in named.items():
        own[name].copy_(tensor)
    engine.load_weights(None, version=version)


class AsyncSampler:
    """The trainer's side: starts the sampler process, feeds it weights and requests, takes batches."""

    def __init__(self, cfg, engine_name: str, model: torch.nn.Module, history: WeightHistory, make_request,
                 first_step: int, max_steps: int):
        self.history, self.make_request, self.max_steps = history, make_request, max_steps
        self.max_staleness = history.max_staleness
        # fork where it is safe: the sampler then shares the imports and the weights copy-on-write instead of
        # loading both again (~330 MB of imports per process here). Safe means no CUDA yet, and a trainer
        # that never started an OpenMP thread pool (threads=1): a forked child's first parallel region
        # waits forever for pool threads that were not copied. Spawn otherwise.
        forked = ("fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized() and cfg.threads == 1
                  and torch.get_num_threads() == 1)
        context = mp.get_context("fork" if forked else "spawn")
        self.requests, self.results = context.Queue(), context.Queue()
        source = model if forked else cfg
        self.process = context.Process(target=_serve, args=(source, engine_name, cfg.threads, self.requests,
                                                            self.results), daemon=True, name="sapo-sampler")
        self.process.start()
        self._sent_version: int | None = None
        if not forked:  # the model as it is (frozen weights included); a forked copy has it already
            self.requests.put(("weights", -1, _shared(model.named_parameters())))
        for step in range(first_step, min(first_step + self.max_staleness, max_steps) + 1):
            self._ask(step)

    def _send(self, version: int) -> float:
        t0 = time.perf_counter()
        if self._sent_version != version:
            # the history's snapshots are CPU copies already, never written again: they travel as they are
            self.requests.put(("weights", version, dict(self.history.weights(version))))
            self._sent_version = version
        return time.perf_counter() - t0

    def _ask(self, step: int) -> float:
        seconds = self._send(sampling_version(step, self.max_staleness))
        self.requests.put(("request", self.make_request(step)))
        return seconds

    def get(self, request: RolloutRequest) -> Sampled:
        """The batch of request.step (asked for earlier); blocks until the sampler has it."""
        t0 = time.perf_counter()
        while True:
            try:
                message = self.results.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the sampler process died (exit code {self.process.exitcode})") from None
        if message[0] == "error":
            raise RuntimeError(f"the sampler process failed:\n{message[1]}")
        _, step, batch, seconds, sampler_wait = message
        if step != request.step:
            raise RuntimeError(f"expected the batch of step {request.step}, the sampler sent step {step}")
        return Sampled(batch, seconds, {"async/trainer_wait_s": time.perf_counter() - t0,
                                        "async/sampler_wait_s": sampler_wait})

    def weights_ready(self, version: int, model: torch.nn.Module) -> float:
        """After optimizer step `version`: keep it, and ask for the step that samples with it."""
        t0 = time.perf_counter()
        self.history.record(version, model)
        step = version + 1 + self.max_staleness
        if step <= self.max_steps:
            self._ask(step)
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.process.is_alive():
            self.requests.put(("stop",))
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _shared(named) -> dict[str, torch.Tensor]:
    """CPU copies the queue hands over through shared memory (the trainer keeps training its own)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in named}
