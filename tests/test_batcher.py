"""captioning/batcher.py with a stand-in for the model: requests coalesce up to the batch size, each
result goes back to its own request, a failing batch fails alone, a full queue refuses at once, the
wait for a batch to fill is bounded from the oldest request's arrival, and stop drains the queue."""
import queue
import threading

import pytest

from captioning.batcher import Batcher, QueueFull, Stopped


class Model:
    """run_batch for the tests: records each batch, can be held inside a batch until released."""

    def __init__(self, fail_on=()):
        self.batches, self.fail_on = [], set(fail_on)
        self.inside, self.release = threading.Event(), threading.Event()
        self.release.set()

    def hold(self):
        self.inside.clear()
        self.release.clear()

    def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.inside.set()
        self.release.wait()
        if self.fail_on & set(payloads):
            raise ValueError(f"bad batch {payloads}")
        return [f"caption of {p}" for p in payloads]


def test_requests_coalesce_up_to_the_batch_size_and_each_gets_its_own_result():
    model = Model()
    batcher = Batcher(model, max_batch_size=4, max_wait_s=0.0, max_queue=100).start()
    model.hold()
    first = batcher.submit("a")
    assert model.inside.wait(10)  # the model is busy with ["a"]: the next seven queue up
    later = {name: batcher.submit(name) for name in "bcdefgh"}
    assert batcher.depth() == 7
    model.release.set()
    assert first.result(10) == "caption of a"
    assert {name: f.result(10) for name, f in later.items()} == {n: f"caption of {n}" for n in "bcdefgh"}
    assert model.batches == [["a"], ["b", "c", "d", "e"], ["f", "g", "h"]]
    batcher.stop(10)


def test_a_failing_batch_fails_its_own_requests_only():
    model = Model(fail_on={"bad"})
    batcher = Batcher(model, max_batch_size=2, max_wait_s=0.0, max_queue=100).start()
    model.hold()
    busy = batcher.submit("x")
    assert model.inside.wait(10)
    doomed, good = [batcher.submit("bad"), batcher.submit("y")], [batcher.submit("z")]
    model.release.set()
    assert busy.result(10) == "caption of x" and good[0].result(10) == "caption of z"
    for f in doomed:
        with pytest.raises(ValueError, match="bad batch"):
            f.result(10)
    batcher.stop(10)


def test_a_full_queue_refuses_at_once_and_a_cancelled_request_is_left_out():
    model = Model()
    batcher = Batcher(model, max_batch_size=8, max_wait_s=0.0, max_queue=2).start()
    model.hold()
    batcher.submit("busy")
    assert model.inside.wait(10)
    gone, kept = batcher.submit("gone"), batcher.submit("kept")
    with pytest.raises(QueueFull, match="2 images are queued"):
        batcher.submit("one too many")
    assert gone.cancel()  # a request that timed out while queued
    model.release.set()
    assert kept.result(10) == "caption of kept"
    batcher.stop(10)
    assert model.batches == [["busy"], ["kept"]]


class Clock:
    """A clock the test moves; queue waits report the timeout they were given instead of sleeping."""

    def __init__(self):
        self.now, self.waits = 100.0, []


def test_the_wait_for_more_is_bounded_from_the_oldest_request_s_arrival(monkeypatch):
    clock = Clock()
    model = Model()
    batcher = Batcher(model, max_batch_size=8, max_wait_s=0.5, max_queue=10, clock=lambda: clock.now)
    real_get = batcher._queue.get

    def get(block=True, timeout=None):
        if not block or timeout is None:
            return real_get(block)
        clock.waits.append(timeout)
        clock.now += timeout  # the wait runs out with nothing new
        raise queue.Empty

    monkeypatch.setattr(batcher._queue, "get", get)
    future = batcher.submit("a")  # queued at 100.0
    clock.now = 100.2             # the model thread comes for it 0.2 s later
    batcher.start()
    assert future.result(10) == "caption of a"
    assert clock.waits == [pytest.approx(0.3)]  # 0.5 from its arrival, not from when the thread looked
    batcher.stop(10)


def test_stop_finishes_what_is_queued_then_refuses_new_requests():
    model = Model()
    batcher = Batcher(model, max_batch_size=2, max_wait_s=0.0, max_queue=10).start()
    model.hold()
    futures = [batcher.submit(n) for n in "abc"]
    assert model.inside.wait(10)
    stopper = threading.Thread(target=batcher.stop, args=(10,))
    stopper.start()
    model.release.set()
    stopper.join(10)
    assert [f.result(0) for f in futures] == ["caption of a", "caption of b", "caption of c"]
    with pytest.raises(Stopped):
        batcher.submit("late")
