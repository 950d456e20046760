"""The session's trained tiny GIT (conftest's trained_run fixture), made once for all test processes.

    python tests/trained_run.py FOLDER   # train into FOLDER unless it is there; FOLDER.stdout last

Under `make test`'s two processes (pytest-xdist) the first worker to start runs this in the
background at once, so that neither worker sits idle waiting for it when a test first asks; the
fixture takes the same lock, so it waits for the run to end, or trains itself if nobody has.
"""
import contextlib
import fcntl
import io
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# 1,000 scenes with train.py's default --seed 42 and --test-size 0.1: 900 to train on, 100 to evaluate.
# The tiny GIT first learns the captions' grammar and writes one caption for every image; it starts
# to look at the image between steps 200 and 400 of 16 (measured: after 200 steps the best-by-WER
# model wrote the same caption for all of 11 new scenes; after 500, 11 different ones, held-out WER
# 0.37). --precision auto: bf16 on a CPU with bf16 units, where 500 steps cost what 200 did in fp32 (45 s);
# fp32 on one without (AVX2 only: 141 s, where bf16 emulated took over 20 minutes), with the same course:
# one caption for all at step 100, 13% distinct at 200, then 39-62%, WER 0.49 at step 500.
TRAINED_RUN = ["--dataset", "synthetic", "--synthetic-size", "1000", "--model", "tiny", "--batch-size", "16",
               "--grad-accum", "1", "--learning-rate", "5e-4", "--warmup-steps", "20", "--precision", "auto",
               "--max-steps", "500", "--eval-steps", "100", "--save-steps", "250", "--logging-steps", "25",
               "--num-examples", "2"]


def trained(out):
    """The output folder of the trained run, training it first unless a complete one is there (its
    printed lines, written last, in OUT.stdout). Holds OUT.lock meanwhile: one process trains."""
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(out + ".stdout"):
            shutil.rmtree(out, ignore_errors=True)  # what a run that did not finish left
            import train  # here: a test that needs no training must not need train.py to import

            said = io.StringIO()
            with contextlib.redirect_stdout(said):
                train.main([*TRAINED_RUN, "--output-dir", out])
            with open(out + ".stdout.tmp", "w") as f:
                f.write(said.getvalue())
            os.replace(out + ".stdout.tmp", out + ".stdout")
    return out


if __name__ == "__main__":
    trained(sys.argv[1])
