"""What the training loop watches besides the model: how fast it goes, and whether it was asked to stop."""
import signal
import threading
import time


class Meter:
    """Wall time, time spent waiting for data, images and captions, per logging window and over the run;
    evaluation and saving are left out, and so is compiling when compile_clock (compile_seconds) is
    given: it is paid once, and would hide the speed of the compiled steps. When waiting is a large
    share of a step the loader is the bottleneck (more --num-workers)."""

    def __init__(self, compile_clock=None):
        self.compile_clock = compile_clock or (lambda: 0.0)
        self.restart()
        self.run_seconds, self.run_waited, self.run_images, self.run_captions, self.run_steps = 0.0, 0.0, 0, 0, 0
        self.run_compiled = 0.0

    def restart(self):
        """Start a new window (after a logged line, once evaluation and saving are done)."""
        self.t0, self.waited, self.compiled_at_start = time.time(), 0.0, self.compile_clock()

    def timed(self, iterable):
        """The items of iterable; the time spent getting each one counts as data wait."""
        iterator = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - t
            yield item

    def close_window(self, images, captions, steps):
        """(captions per second, images per second, share of the time spent waiting for data) of
        the window now ending. Captions and images differ with --caption-sampling all."""
        compiled = self.compile_clock() - self.compiled_at_start
        seconds = max(time.time() - self.t0 - compiled, 1e-9)
        self.run_compiled += compiled
        self.run_seconds, self.run_waited = self.run_seconds + seconds, self.run_waited + self.waited
        self.run_images, self.run_captions = self.run_images + images, self.run_captions + captions
        self.run_steps += steps
        return captions / seconds, images / seconds, min(self.waited / seconds, 1.0)

    def summary(self):
        """One line on the whole run's speed, or None before any window closed."""
        if not self.run_seconds:
            return None
        return (f"training speed: {self.run_captions / self.run_seconds:.1f} captions/s, "
                f"{self.run_images / self.run_seconds:.1f} images/s, "
                f"{self.run_seconds / self.run_steps:.3f} s per optimizer step, "
                f"data wait {100 * self.run_waited / self.run_seconds:.1f}% (evaluation and saving"
                + (f", and {self.run_compiled:.1f} s of compiling, excluded)" if self.run_compiled else " excluded)"))


class Stopped(BaseException):
    """A stop signal (Ctrl-C, SIGTERM) outside the training loop. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way up mistakes it for an error."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.name, self.signum = signal.Signals(signum).name, signum


class RaiseOnSignal:
    """Ctrl-C or SIGTERM raise Stopped wherever the program is (loading data and model, filling the
    image cache, captioning), so that it unwinds through its cleanups (temporary files removed,
    worker processes ended, locks let go) to one line, instead of the traceback of a
    KeyboardInterrupt or SIGTERM's silent death. The training loop puts StopOnSignal over it."""

    def __enter__(self):
        # Only the main thread may set handlers: called from another (a caller's worker thread), leave them be.
        main = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.signal(s, self._raise) for s in StopOnSignal.SIGNALS} if main else {}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False

    @staticmethod
    def _raise(signum, frame):
        raise Stopped(signum)


class StopOnSignal:
    """Ctrl-C or SIGTERM (a scheduler taking the machine back) asks the loop to stop at the next
    step boundary, where it saves a checkpoint; a second signal stops the process at once. The
    previous handlers come back when the block ends, by an exception too."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say):
        self.say, self.name, self.previous = say, None, {}

    @property
    def requested(self):
        return int(self.name is not None)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False

    def _on_signal(self, signum, frame):
        if self.name is not None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.name = signal.Signals(signum).name
        self.say(f"{self.name}: finishing this step and saving a checkpoint (again to stop at once)")
