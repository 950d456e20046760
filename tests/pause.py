"""Run train.py and hold it still at a chosen point until told to go on, so that a test can act
while a run is certainly in progress (start a second run on its folder, say) without sleeping.

    python tests/pause.py N -- TRAIN ARGS     # before the Nth training forward pass: print "paused",
                                              # then wait for a line on stdin
    python tests/pause.py fill -- TRAIN ARGS  # each image cache worker process, at its first image:
                                              # print "filling PID", then wait until it is killed
    python tests/pause.py spawn -- TRAIN ARGS # as fill, and the run sends itself SIGTERM the instant
                                              # its second worker process is forked (printing
                                              # "started PID" for each), before the pool has noted it
"""
import faulthandler
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from captioning import decode, evaluation  # noqa: E402


def hold_fill_workers():
    parent, open_image = os.getpid(), decode.open_image

    def held_open(source, **options):
        if os.getpid() != parent:  # a forked worker of the fill (they inherit this function)
            # A raw write: sys.stdout's buffer lock is copied into a forked child as it was, held if another
            # thread of the parent was writing at that instant.
            os.write(1, f"filling {os.getpid()}\n".encode())
            threading.Event().wait()  # until killed: by the parent, or by the kernel when the parent is gone
        return open_image(source, **options)

    decode.open_image = held_open


def stop_at_the_second_fork():
    """SIGTERM to this process the moment the second multiprocessing child has started: its handler
    runs at the next bytecode, before ProcessPoolExecutor records the worker it forked."""
    import multiprocessing.process

    start, started = multiprocessing.process.BaseProcess.start, []

    def start_and_stop(process):
        start(process)
        started.append(process.pid)
        os.write(1, f"started {process.pid}\n".encode())
        if len(started) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    multiprocessing.process.BaseProcess.start = start_and_stop


def hold_training(n):
    calls, caption_loss = [0], evaluation.caption_loss

    def paused_loss(model, batch, num_tokens, **kwargs):
        if model.training:
            calls[0] += 1
            if calls[0] == n:
                print("paused", flush=True)
                sys.stdin.readline()
        return caption_loss(model, batch, num_tokens, **kwargs)

    evaluation.caption_loss = paused_loss


def main():
    # SIGUSR1 prints every thread's Python stack to stderr, here and in the workers forked from here
    # (they inherit the handler): what a test that waited in vain reports.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    point, sep, *train_args = sys.argv[1:]
    assert sep == "--", sys.argv
    if point in ("fill", "spawn"):
        hold_fill_workers()
        if point == "spawn":
            stop_at_the_second_fork()
    else:
        hold_training(int(point))
    train.main(train_args)


if __name__ == "__main__":
    main()
