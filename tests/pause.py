"""Run train.py and hold it still at a chosen point until told to go on, so that a test can act
while a run is certainly in progress (start a second run on its folder, say) without sleeping.

    python tests/pause.py N -- TRAIN ARGS   # before the Nth training forward pass: print "paused",
                                            # then wait for a line on stdin
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402


def main():
    n, sep, *train_args = sys.argv[1:]
    assert sep == "--", sys.argv
    n, calls, caption_loss = int(n), [0], train.caption_loss

    def paused_loss(model, batch, num_tokens, **kwargs):
        if model.training:
            calls[0] += 1
            if calls[0] == n:
                print("paused", flush=True)
                sys.stdin.readline()
        return caption_loss(model, batch, num_tokens, **kwargs)

    train.caption_loss = paused_loss
    train.main(train_args)


if __name__ == "__main__":
    main()
