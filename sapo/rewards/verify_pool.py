"""math-verify in worker processes, with a hard per-comparison timeout.

math-verify's own timeouts use ``signal.alarm``, which raises outside the main thread and can
not stop C-level sympy work. So we call it with ``parsing_timeout=None`` / ``timeout_seconds=None``
inside child processes and bound time from the parent: a worker that has not answered within
``timeout_s`` is killed and replaced, and that comparison reports None (a timeout). A worker that
dies (segfault, MemoryError) is replaced the same way. The parent never blocks longer than
``timeout_s`` per comparison (plus one worker restart).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

logger = logging.getLogger(__name__)


def verify_latex(gold: str, pred: str) -> bool:
    """math-verify equivalence of two LaTeX answers, each wrapped in ``$...$`` (no timeouts: call
    this only inside a worker process, see the module docstring)."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _worker_main(conn: Connection, compare_fn: Callable[[str, str], bool], parent_pid: int) -> None:
    # A worker must not outlive a trainer killed with SIGKILL (a forked child also holds copies of the
    # parent's pipe ends, so it would never see EOF), nor keep the trainer's stdout/stderr open for
    # whoever waits on them: detach from both, and leave as soon as the parent is gone.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    # math-verify warns once that its timeouts are disabled: that is intended here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    compare_fn("\\frac{1}{2}", "0.5")  # warm-up: loads sympy and the LaTeX parser before timing starts
    conn.send("ready")
    while True:
        try:
            if not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        gold, pred = task
        try:
            ok = compare_fn(gold, pred)
        except Exception:  # a parser bug on one odd input is a wrong answer, not a crash
            ok = False
        conn.send(ok)


def default_start_method() -> str:
    # fork starts in milliseconds and does not re-import the user's __main__; the child only runs
    # sympy, never torch or CUDA, so forking a process that uses them is safe here.
    return "fork" if sys.platform.startswith("linux") else "spawn"


class _Worker:
    def __init__(self, ctx, compare_fn: Callable[[str, str], bool], startup_timeout_s: float):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn, compare_fn, os.getpid()), daemon=True)
        self.process.start()
        child_conn.close()
        self.startup_timeout_s = startup_timeout_s

    def wait_ready(self) -> None:
        if not self.conn.poll(self.startup_timeout_s):
            raise RuntimeError(f"math-verify worker did not start within {self.startup_timeout_s} s")
        try:
            self.conn.recv()
        except (EOFError, OSError) as err:
            raise RuntimeError("math-verify worker exited while starting (is math-verify installed? "
                               "pip install 'math-verify[antlr4_13_2]')") from err

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=1)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


class VerifyPool:
    """A few math-verify worker processes; ``verify_many`` returns True / False / None (timeout or crash)."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, start_method: str | None = None,
                 startup_timeout_s: float = 120.0, compare_fn: Callable[[str, str], bool] = verify_latex):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.compare_fn = compare_fn  # a module-level function (picklable for "spawn")
        self._ctx = mp.get_context(start_method or default_start_method())
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.counters = {"calls": 0, "timeouts": 0, "crashes": 0}

    def _fill(self, wanted: int) -> None:
        """Start workers up to ``wanted``, all at once (each warms up for about a second)."""
        new = [_Worker(self._ctx, self.compare_fn, self.startup_timeout_s)
               for _ in range(wanted - len(self._workers))]
        try:
            for worker in new:
                worker.wait_ready()
        except RuntimeError:
            for worker in new:
                worker.kill()
            raise
        self._workers.extend(new)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)

    def verify_many(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        """Compare each (gold, pred) pair; None marks a comparison that timed out or crashed its worker."""
        results: list[bool | None] = [None] * len(pairs)
        if not pairs:
            return results
        with self._lock:
            self._fill(min(self.num_workers, len(pairs)))
            pending = deque(range(len(pairs)))
            busy: dict[Connection, tuple[_Worker, int, float]] = {}  # conn -> (worker, task index, deadline)
            while pending or busy:
                idle = [w for w in self._workers if w.conn not in busy]
                for worker in idle:
                    if not pending:
                        break
                    index = pending.popleft()
                    worker.conn.send(pairs[index])
                    busy[worker.conn] = (worker, index, time.monotonic() + self.timeout_s)
                    self.counters["calls"] += 1
                next_deadline = min(deadline for _, _, deadline in busy.values())
                for conn in wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic())):
                    worker, index, _ = busy.pop(conn)
                    try:
                        results[index] = bool(conn.recv())
                    except (EOFError, OSError):  # the worker died mid-comparison
                        self.counters["crashes"] += 1
                        logger.warning("math-verify worker died on one comparison; it scores 0 and is replaced")
                        self._replace(worker)
                now = time.monotonic()
                for conn, (worker, _, deadline) in list(busy.items()):
                    if now >= deadline:
                        busy.pop(conn)
                        self.counters["timeouts"] += 1
                        self._replace(worker)
                self._fill(min(self.num_workers, len(pending) + len(busy)))
        return results

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                worker.stop()
            self._workers.clear()

    def __del__(self):  # best effort; daemon workers also die with the parent
        try:
            for worker in self._workers:
                worker.process.kill()
        except Exception:
            pass
