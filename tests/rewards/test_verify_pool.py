import os
import time

import pytest

from sapo.rewards.verify_pool import VerifyPool, verify_latex


def flaky_compare(gold: str, pred: str) -> bool:
    if pred == "hang":
        time.sleep(60)
    if pred == "crash":
        os._exit(3)
    if pred == "raise":
        raise RuntimeError("parser bug")
    return gold == pred


def test_verify_latex_direct():
    assert verify_latex(r"\frac{1}{2}", "0.5")
    assert not verify_latex("2", "3")


def test_hang_and_crash_are_killed_and_replaced():
    pool = VerifyPool(num_workers=2, timeout_s=0.5, compare_fn=flaky_compare)
    try:
        start = time.perf_counter()
        results = pool.verify_many([("a", "a"), ("a", "hang"), ("b", "crash"), ("c", "raise"), ("d", "d")])
        elapsed = time.perf_counter() - start
        assert results == [True, None, None, False, True]
        assert elapsed < 10
        assert pool.counters["timeouts"] == 1
        assert pool.counters["crashes"] == 1
        # the pool keeps working with fresh workers
        assert pool.verify_many([("x", "x"), ("x", "y")]) == [True, False]
        assert len(pool._workers) == 2
    finally:
        pool.close()


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_workers"):
        VerifyPool(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifyPool(timeout_s=0)


def broken_compare(gold: str, pred: str) -> bool:
    os._exit(1)


def test_worker_that_cannot_start_raises_clearly():
    pool = VerifyPool(num_workers=1, timeout_s=1.0, compare_fn=broken_compare)
    with pytest.raises(RuntimeError, match="exited while starting"):
        pool.verify_many([("1", "1")])
    assert pool._workers == []


def test_workers_exit_when_the_trainer_is_killed(tmp_path):
    """SIGKILL gives the trainer no chance to stop its workers: they must notice and leave, and never
    hold the trainer's stdout/stderr pipes open (a caller waiting on them would hang)."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from sapo.rewards.verify_pool import VerifyPool\n"
        "pool = VerifyPool(num_workers=2, timeout_s=5.0)\n"
        "print(pool.verify_many([('1/2', '0.5')]), flush=True)\n"
        "print(' '.join(str(w.process.pid) for w in pool._workers), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids  # the pool starts workers as work arrives
    proc.send_signal(signal.SIGKILL)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=30)  # returns only once no worker holds the pipes
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.2)
    assert not alive, f"workers {alive} outlived their parent"


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting to be reaped is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
