"""The server's pure parts, without a model: shape buckets, flag parsing and the dynamic batcher."""
import threading
import time

import pytest

from blip2_jax.serve.batcher import Batcher, Busy
from blip2_jax.serve.settings import Settings, batch_sizes_up_to, bucket, int_list


def test_buckets():
    assert batch_sizes_up_to(8) == (1, 2, 4, 8) and batch_sizes_up_to(6) == (1, 2, 4, 6)
    assert batch_sizes_up_to(1) == (1,)
    assert [bucket(n, (1, 4, 8)) for n in (0, 1, 2, 4, 5, 8, 9)] == [1, 1, 4, 4, 8, 8, None]
    assert int_list("5,1", "--num_beams") == (5, 1)
    with pytest.raises(ValueError, match="--num_beams=5,x: expected comma-separated integers"):
        int_list("5,x", "--num_beams")
    for bad in (dict(num_beams=(0,)), dict(batch_sizes=(2, 2)), dict(vqa_prompt="no slot"), dict(queue_size=0)):
        with pytest.raises(ValueError):
            Settings(**bad)


def _batcher(calls, **kw):
    def run(key, payloads):
        calls.append((key, list(payloads)))
        return [f"{key}:{p}" for p in payloads]
    return Batcher(run, **{"max_batch": 3, "max_wait_s": 0.2, "queue_size": 10, **kw})


def test_same_key_requests_share_a_call_up_to_max_batch():
    calls = []
    batcher = _batcher(calls)
    gate = threading.Event()
    batcher.start(before=gate.wait)  # hold the worker until everything is queued
    futures = [batcher.submit("a" if i % 2 == 0 else "b", i) for i in range(7)]
    gate.set()
    assert [f.result(10) for f in futures] == [f"{'a' if i % 2 == 0 else 'b'}:{i}" for i in range(7)]
    assert calls == [("a", [0, 2, 4]), ("b", [1, 3, 5]), ("a", [6])]  # oldest first, same key, at most 3
    assert (batcher.batches, batcher.requests) == (3, 7)
    batcher.close()


def test_the_oldest_request_waits_at_most_max_wait():
    calls = []
    batcher = _batcher(calls, max_wait_s=0.3)
    batcher.start()
    t0 = time.monotonic()
    first = batcher.submit("k", 0)
    time.sleep(0.1)
    second = batcher.submit("k", 1)  # arrives within the first one's wait: same call
    assert (first.result(10), second.result(10)) == ("k:0", "k:1")
    assert calls == [("k", [0, 1])] and 0.25 < time.monotonic() - t0 < 5
    batcher.close()


def test_a_full_queue_refuses_and_a_failing_batch_fails_only_its_requests():
    def run(key, payloads):
        if key == "bad":
            raise RuntimeError("boom")
        return payloads
    batcher = Batcher(run, max_batch=4, max_wait_s=0.0, queue_size=2)
    gate = threading.Event()
    batcher.start(before=gate.wait)
    bad, good = batcher.submit("bad", 1), batcher.submit("good", 2)
    with pytest.raises(Busy, match="2 requests are queued"):
        batcher.submit("good", 3)
    gate.set()
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(10)
    assert good.result(10) == 2
    assert batcher.submit("good", 4).result(10) == 4  # the worker goes on
    batcher.close()


def test_a_failed_warm_up_fails_the_queue():
    batcher = Batcher(lambda k, p: p, max_batch=2, max_wait_s=0.0, queue_size=4)
    gate = threading.Event()

    def warm_up():
        gate.wait()
        raise ValueError("cannot compile")

    batcher.start(before=warm_up)
    queued = batcher.submit("k", 1)
    gate.set()
    with pytest.raises(ValueError, match="cannot compile"):
        queued.result(10)
    assert isinstance(batcher.failure, ValueError)
