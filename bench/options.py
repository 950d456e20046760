"""What --freeze-vision, --gradient-checkpointing, --caption-sampling all and --objective scst cost and
save, at git-base size.

    python bench/options.py                  # git-base architecture (random weights), about 10 min on 2 cores
    python bench/options.py --quick          # the tiny model, a few steps of each: for the tests

Every configuration trains the same model on the same images, each in its own process under
bench/timed.py (which stamps the end of every optimizer step and records the peak resident
memory), one after the other: nothing else should run on the machine meanwhile. The data are
synthetic scenes with five captions each (like COCO), so that every configuration trains on 20
caption rows a step: 20 images with one caption drawn each (`one`, today's default), or 4 images
with all five (`all`, one image-encoder pass for five captions), or 4 images with five sampled
captions each (`scst`: sampling, rewards and the weighed loss; a model with random weights rarely
samples the end token, so its samples run to --scst-max-length). Speed is taken over the steps
after the first few; peak memory is the process's resident high-water mark when its last
optimizer step ended (before the final evaluation and save).
"""
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

from captioning import sources  # noqa: E402

from bench import OURS_SPEED, machine_info, step_speed  # noqa: E402

CAPTIONS_PER_IMAGE = 5
SCST_MAX_LENGTH = 20  # tokens: about the length of the scenes' captions (15-22 with the image tokens' [CLS])
# name -> (train.py flags, images per micro-batch, caption rows per image); all with 20 caption rows a step.
CONFIGS = {
    "one": ([], 20, 1),  # 20 images, one caption drawn each: full fine-tuning as by default
    "freeze-vision": (["--freeze-vision"], 20, 1),
    "gradient-checkpointing": (["--gradient-checkpointing"], 20, 1),
    "all": (["--caption-sampling", "all"], 4, CAPTIONS_PER_IMAGE),  # 4 images x their 5 captions
    # 4 images x 5 samples of the model's own
    "scst": (["--objective", "scst", "--scst-samples", str(CAPTIONS_PER_IMAGE), "--scst-max-length",
              str(SCST_MAX_LENGTH)], 4, CAPTIONS_PER_IMAGE),
    # The attention implementations (README: Attention), full fine-tuning as "one".
    "attention-eager": (["--attention", "eager"], 20, 1),
    "attention-sdpa": (["--attention", "sdpa"], 20, 1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true", help="the tiny model, 3 steps of each configuration (for the tests)")
    a("--preset", default="base-scratch", help="model.TINY_PRESETS name of the randomly initialised GIT")
    a("--images", type=int, default=240, help="synthetic scenes (each with five captions)")
    a("--steps", type=int, default=8, help="optimizer steps per configuration")
    a("--skip-first", type=int, default=3, help="steps left out of the timing as warm-up")
    a("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    a("--configs", default="one,freeze-vision,gradient-checkpointing,all",
      help=f"which configurations, comma-separated, of {','.join(CONFIGS)}")
    a("--work-dir", default=os.path.join(HERE, "bench-work"))
    a("--out", default=os.path.join(HERE, "options.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.images, args.steps, args.skip_first = "tiny", 40, 3, 1
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    return args


def prepare(args):
    """(imagefolder of scenes with five captions each, a randomly initialised GIT of --preset); reused."""
    from captioning import synthetic
    from captioning.gitmodel import build_tiny_git

    data_dir = os.path.join(args.work_dir, f"five-captions-{args.images}")
    if not os.path.isfile(os.path.join(data_dir, "metadata.jsonl")):
        shutil.rmtree(data_dir + ".tmp", ignore_errors=True)
        sources.write_imagefolder(synthetic.dataset(args.images, seed=7, captions_per_image=CAPTIONS_PER_IMAGE),
                               data_dir + ".tmp")
        os.replace(data_dir + ".tmp", data_dir)
    model_dir = os.path.join(args.work_dir, f"model-{args.preset}-five-captions-{args.images}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        with open(os.path.join(data_dir, "metadata.jsonl")) as f:
            captions = [c for line in f for c in json.loads(line)["text"]]
        shutil.rmtree(model_dir + ".tmp", ignore_errors=True)
        build_tiny_git(captions, model_dir + ".tmp", preset=args.preset, seed=0)
        os.replace(model_dir + ".tmp", model_dir)
    return data_dir, model_dir


def run_config(args, name, data_dir, model_dir):
    flags, batch, rows_per_image = CONFIGS[name]
    out_dir = os.path.join(args.work_dir, "runs", f"options-{name}")
    timing_path, log_path = out_dir + ".timing.json", os.path.join(args.work_dir, "logs", f"options-{name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = ["--dataset", data_dir, "--model", model_dir, "--output-dir", out_dir, "--batch-size", str(batch),
            "--grad-accum", "1", "--max-steps", str(args.steps), "--learning-rate", "5e-5", "--precision",
            args.precision, "--test-size", "0.05", "--eval-batch-size", "8", "--eval-steps", str(args.steps + 1),
            "--save-steps", str(args.steps + 1), "--logging-steps", str(args.steps), "--gen-max-length", "5",
            "--num-examples", "0", *flags]
    cmd = [sys.executable, os.path.join(HERE, "timed.py"), "--out", timing_path, "--program", "train", "--", *argv]
    print(f"{name}: {args.steps} steps of {batch} images (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n\n")
        log.flush()
        status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    shutil.rmtree(out_dir, ignore_errors=True)
    if status != 0 or not os.path.exists(timing_path):
        return {"error": f"exit status {status}, see {log_path}"}
    with open(timing_path) as f:
        timing = json.load(f)
    captions_per_step = batch * rows_per_image
    result = {"flags": flags, "images_per_step": batch, "captions_per_step": captions_per_step,
              **step_speed(timing["step_times"], captions_per_step, args.skip_first),
              "peak_rss_mib_at_last_step": round(timing["peak_rss_mib_self_at_last_step"] or 0)}
    result["captions_per_second"] = result.pop("samples_per_second", None)
    with open(log_path) as f:
        found = OURS_SPEED.findall(f.read())
    if found:
        result["train_py_images_per_second"] = float(found[-1][0])
    with open(log_path) as f:
        lengths = re.findall(r"sample length ([0-9.]+) tokens", f.read())
    if lengths:
        result["scst_sample_length"] = float(lengths[-1])
    print(f"  {result.get('seconds_per_step', 0):.3f} s/step, {result.get('captions_per_second') or 0:.2f} captions/s, "
          f"peak RSS {result['peak_rss_mib_at_last_step']} MiB", flush=True)
    return result


def print_table(results):
    """Each configuration against the first one run ("one" by default)."""
    base = next(iter(results.values()), {})
    print(f"\n{'configuration':<40} {'s/step':>8} {'captions/s':>11} {'vs 1st':>7} {'peak RSS MiB':>13} {'vs 1st':>7}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<40} failed: {r['error']}")
            continue
        speed = r["captions_per_second"] / base["captions_per_second"] if base.get("captions_per_second") else None
        memory = r["peak_rss_mib_at_last_step"] / base["peak_rss_mib_at_last_step"] if base.get(
            "peak_rss_mib_at_last_step") else None
        name = f"{name} ({r['images_per_step']} images x {r['captions_per_step'] // r['images_per_step']})"
        print(f"{name:<40} {r['seconds_per_step']:>8.3f} {r['captions_per_second']:>11.2f} "
              f"{speed or 0:>6.2f}x {r['peak_rss_mib_at_last_step']:>13} {memory or 0:>6.2f}x")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      HF_DATASETS_CACHE=os.path.join(args.work_dir, "hf-datasets-cache"),
                      GIT_CAPTION_CACHE=os.path.join(args.work_dir, "image-cache"))
    data_dir, model_dir = prepare(args)
    report = {"command": shlex.join([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine_info(), "preset": args.preset, "steps": args.steps, "skip_first": args.skip_first,
              "results": {}}
    for name in args.configs:
        report["results"][name] = run_config(args, name, data_dir, model_dir)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print_table(report["results"])
    print(f"results in {args.out}")
    return 1 if any("error" in r for r in report["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
