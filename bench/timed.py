"""Run train.py or bench/trainer_recipe.py in this process and record when each optimizer step ends.

    python bench/timed.py --out timing.json --program train -- --dataset D --model M --max-steps 30 ...

A global optimizer step hook stamps time.perf_counter() after every optimizer.step(), whoever
calls it (our loop, or the Trainer through accelerate's wrapper, whose own step is not hooked and
calls the inner optimizer's once). Only the hook runs inside the program's loop: the stamps cost
microseconds. At exit, also when the program fails, the stamps, the exit status and the peak
resident memory go to --out as JSON.
"""
import argparse
import importlib
import json
import os
import resource
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mib(who):
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the step times and peak memory")
    p.add_argument("--program", required=True, choices=("train", "trainer_recipe"))
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the program's own flags")
    args = p.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

    from torch.optim.optimizer import register_optimizer_step_post_hook

    step_times, rss_at_step = [], []

    def on_step(optimizer, step_args, step_kwargs):
        step_times.append(time.perf_counter())
        rss_at_step.append(peak_rss_mib(resource.RUSAGE_SELF))

    register_optimizer_step_post_hook(on_step)
    program = importlib.import_module(args.program)
    status, started = 0, time.perf_counter()
    try:
        program.main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        ended = time.perf_counter()
        # DataLoader workers count once they have exited; by now every loader is finished.
        record = {
            "program": args.program, "argv": argv, "exit_status": status,
            "started": started, "ended": ended, "step_times": step_times,
            "peak_rss_mib_self": peak_rss_mib(resource.RUSAGE_SELF),
            "peak_rss_mib_children": peak_rss_mib(resource.RUSAGE_CHILDREN),
            # The final evaluation and save come after the last step and may need more memory.
            "peak_rss_mib_self_at_last_step": rss_at_step[-1] if rss_at_step else None,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    sys.stdout.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()
