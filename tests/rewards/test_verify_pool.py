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
