"""Batching across requests for serve.py: many callers, one model thread, one generate a batch.

    batcher = Batcher(run_batch, max_batch_size=16, max_wait_s=0.01, max_queue=256)
    batcher.start()
    future = batcher.submit(pixels)      # any thread; a concurrent.futures.Future of its caption
    batcher.stop()                       # the queued and running items finish first

Callers put items in one bounded queue (a full queue raises QueueFull at once: the server answers
503 instead of holding requests without bound). The model thread takes the oldest item, then
whatever else arrives, up to max_batch_size items, waiting for more at most max_wait_s after the
oldest item was queued, and calls run_batch(payloads) once for them; each result goes to its own
item's future, in order. A future cancelled while queued (its request timed out) is dropped from
its batch before the batch runs. run_batch raising fails that batch's items alone.
"""
import queue
import threading
import time
from concurrent.futures import Future


class QueueFull(Exception):
    """The batcher holds max_queue items already."""


class Stopped(Exception):
    """The batcher is stopping and takes no new items."""


class _Item:
    __slots__ = ("payload", "future", "queued_at")

    def __init__(self, payload, future, queued_at):
        self.payload, self.future, self.queued_at = payload, future, queued_at


_STOP = object()


class Batcher:
    def __init__(self, run_batch, max_batch_size, max_wait_s, max_queue, clock=time.monotonic, on_batch=None):
        """run_batch(list of payloads) -> list of results, one each, in order; called on the model thread.
        on_batch(size, seconds), if given, is called after each batch (the server's metrics)."""
        self.run_batch, self.max_batch_size, self.max_wait_s = run_batch, max_batch_size, max_wait_s
        self.clock, self.on_batch = clock, on_batch
        self._queue = queue.Queue(maxsize=max_queue)
        self._accepting = True
        self._lock = threading.Lock()  # submit against stop: nothing is queued after the stop marker
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def depth(self):
        """Items waiting for the model (not those in the running batch)."""
        return self._queue.qsize()

    def submit(self, payload):
        future = Future()
        with self._lock:
            if not self._accepting:
                raise Stopped("the server is stopping")
            try:
                self._queue.put_nowait(_Item(payload, future, self.clock()))
            except queue.Full:
                raise QueueFull(f"{self._queue.maxsize} images are queued already") from None
        return future

    def stop(self, timeout=None):
        """Take no new items; let the model thread finish what is queued and running, then end."""
        with self._lock:
            self._accepting = False
            self._queue.put(_STOP)  # blocks while the queue is full: the model thread is draining it
        self._thread.join(timeout)

    def _next_batch(self):
        """The oldest item and what joins it within the wait bound; None once stopped and drained."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = first.queued_at + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:  # what is queued already joins without waiting; after that, only until the deadline
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                self._queue.put(_STOP)  # seen again after this batch, which still runs
                break
            batch.append(item)
        return batch

    def _loop(self):
        while (batch := self._next_batch()) is not None:
            batch = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            started = self.clock()
            try:
                results = self.run_batch([item.payload for item in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch gave {len(results)} results for {len(batch)} items")
            except Exception as e:  # the batch's requests fail; the thread goes on with the next batch
                for item in batch:
                    item.future.set_exception(e)
            else:
                for item, result in zip(batch, results):
                    item.future.set_result(result)
            if self.on_batch:
                self.on_batch(len(batch), self.clock() - started)
