"""Training speed of the guide's Trainer recipe and of train.py, side by side (`make bench`).

    python bench/bench.py                 # the full comparison (about 15 min on 2 cores)
    python bench/bench.py --quick         # a few seconds of each program, for the tests
    python bench/bench.py --sizes small --programs ours,trainer-dynamic

Three programs train the same model on the same images with the same flags, one after the
other, each in its own process:

    recipe           bench/trainer_recipe.py --padding max_length: the guide as written (Trainer,
                     captions padded to the tokenizer's model_max_length, labels = input ids)
    trainer-dynamic  bench/trainer_recipe.py --padding longest: the same Trainer padding per batch
    ours             train.py

All run the same number of optimizer steps, except "recipe" at base size (--recipe-base-steps:
its 512-token steps are slow); speeds are per step, so they still compare.
Data: synthetic scenes scaled up to 1280 x 1280 and saved as JPEG with a metadata.jsonl, an
imagefolder like the guide's Pokemon captions, so decoding costs what it really costs. Models,
written with save_pretrained: "small" is the tiny preset, "base" the git-base architecture
randomly initialised (preset base-scratch). Each program runs under bench/timed.py, which stamps
the end of every optimizer step; speed is taken over the steps after the first few (warm-up),
so loading, the final evaluation and the final save are not part of it. For the base size the
model FLOPs utilisation (MFU) of each program is set against this machine's measured matmul peak.

Everything generated goes to --work-dir (data and models are reused by later runs with the same
settings; each program's output folder is deleted after its run); the numbers to --out.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from captioning import captioner, sources  # noqa: E402

# name -> (module run by timed.py, its flags beyond the shared ones)
PROGRAMS = {
    "recipe": ("trainer_recipe", ["--padding", "max_length", "--skip-generation-eval"]),
    "trainer-dynamic": ("trainer_recipe", ["--padding", "longest", "--skip-generation-eval"]),
    "ours": ("train", []),
}
SIZES = {"small": "tiny", "base": "base-scratch"}  # size -> model.TINY_PRESETS preset
QUICK = dict(images=24, image_size=128, sizes="small", small_steps=4, small_batch=4, inference_images=8)
OURS_SPEED = re.compile(r"training speed: [\d.]+ captions/s, ([\d.]+) images/s, ([\d.]+) s per optimizer step, "
                        r"data wait ([\d.]+)%")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true",
      help=f"a tiny run for the tests: {', '.join(f'{k}={v}' for k, v in QUICK.items())}, no MFU")
    a("--out", default=os.path.join(HERE, "results.json"), help="JSON file for all the numbers")
    a("--work-dir", default=os.path.join(HERE, "bench-work"), help="data, models, logs and program outputs")
    a("--sizes", default="small,base", help="model sizes to compare: small (tiny preset), base (git-base sized)")
    a("--programs", default=",".join(PROGRAMS), help=f"which of {', '.join(PROGRAMS)}")
    a("--images", type=int, default=833, help="synthetic images (the guide's Pokemon set has 833)")
    a("--image-size", type=int, default=1280, help="side of the square JPEGs, in pixels")
    a("--jpeg-quality", type=int, default=90)
    a("--test-size", type=float, default=0.02,
      help="held-out fraction; it is only evaluated once, after the timed steps, so kept small")
    a("--small-steps", type=int, default=30, help="optimizer steps for the small model")
    a("--small-batch", type=int, default=32, help="--batch-size for the small model")
    a("--base-steps", type=int, default=10, help="optimizer steps for the base-size model")
    a("--base-batch", type=int, default=8, help="--batch-size for the base-size model")
    a("--recipe-base-steps", type=int, default=6,
      help="optimizer steps of 'recipe' at base size (512-token padding makes its steps slow)")
    a("--skip-first", type=int, default=None,
      help="optimizer steps left out of the timing as warm-up (default: steps // 3, at least 1, at most 5)")
    a("--grad-accum", type=int, default=1)
    a("--learning-rate", type=float, default=5e-5)
    a("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    a("--num-workers", type=int, default=0)
    a("--seed", type=int, default=42)
    a("--inference-images", type=int, default=64, help="images captioned per inference measurement")
    a("--skip-scaling", action="store_true", help="leave out the batch-size and dataset-size sweeps")
    if "--quick" in argv:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.programs = [s for s in args.programs.split(",") if s]
    for name, known in (("sizes", SIZES), ("programs", PROGRAMS)):
        unknown = [x for x in getattr(args, name) if x not in known]
        if unknown or not getattr(args, name):
            p.error(f"--{name}: choose from {', '.join(known)} (got {', '.join(unknown) or 'nothing'})")
    for name in ("small_steps", "base_steps", "recipe_base_steps"):
        if getattr(args, name) < 2:
            p.error(f"--{name.replace('_', '-')} must be at least 2 (one warm-up step, one timed)")
    for name in ("images", "image_size", "small_batch", "base_batch", "grad_accum"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.skip_first is not None and args.skip_first < 1:
        p.error("--skip-first must be at least 1 (the first step has no start stamp)")
    return args, argv


def main(argv=None):
    args, argv = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    # Offline, and every cache of the programs inside the work folder.
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      HF_DATASETS_CACHE=os.path.join(args.work_dir, "hf-datasets-cache"),
                      GIT_CAPTION_CACHE=os.path.join(args.work_dir, "image-cache"))
    report = {
        "command": shlex.join([sys.executable, os.path.abspath(__file__), *argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
    }
    # One section after the other, each adding its part to the report (written after each, so
    # a failure late in the run keeps what came before).
    data_dir = prepare_data(args)
    report["data"] = {"folder": data_dir, "images": args.images, "image_size": args.image_size,
                      "jpeg_mib": round(folder_mib(data_dir), 2)}
    model_dirs = {size: prepare_model(args, size, data_dir) for size in args.sizes}

    report["train"] = {}
    for size, model_dir in model_dirs.items():
        report["train"][size] = compare_training(args, size, data_dir, model_dir)
        print_training_table(size, report["train"][size])
        write_report(args.out, report)

    if "base" in model_dirs and not args.quick:
        report["mfu"] = bench_mfu(args, report["train"]["base"], model_dirs["base"], data_dir)
        print_mfu_table(report["mfu"])
        write_report(args.out, report)

    report["inference"] = bench_inference(args, model_dirs, data_dir)
    write_report(args.out, report)
    if "small" in model_dirs and not args.quick and not args.skip_scaling:
        report["scaling"] = bench_scaling(args, model_dirs["small"])
        write_report(args.out, report)

    report["machine"]["load_average_at_end"] = os.getloadavg()
    write_report(args.out, report)
    print(f"results in {args.out}; logs in {os.path.join(args.work_dir, 'logs')}")
    failed = [f"{size}/{name}" for size, r in report["train"].items() for name, p in r["programs"].items()
              if p.get("error")]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Data and models

def prepare_data(args, images=None):
    """An imagefolder of synthetic scenes as large JPEGs (--images of them unless `images` is
    given); reused when one with the same settings exists."""
    from PIL import Image

    from captioning import synthetic

    images = images or args.images
    folder = os.path.join(args.work_dir, f"data-{images}x{args.image_size}-q{args.jpeg_quality}-s{args.seed}")
    if os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        return folder
    print(f"writing {images} synthetic {args.image_size} px JPEGs to {folder}", flush=True)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    lines = []
    for i in range(images):
        image, caption = synthetic.scene(args.seed, i)
        name = f"{i:06d}.jpg"
        image.resize((args.image_size, args.image_size), Image.BICUBIC).save(
            os.path.join(tmp, name), quality=args.jpeg_quality)
        lines.append(json.dumps({"file_name": name, "text": caption}) + "\n")
    with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
        f.writelines(lines)
    os.replace(tmp, folder)  # a folder with metadata.jsonl is complete
    return folder


def prepare_model(args, size, data_dir):
    """A randomly initialised GIT of the size's preset, written with save_pretrained; reused when present."""
    import transformers

    from captioning.gitmodel import build_tiny_git

    transformers.logging.set_verbosity_error()  # the processor's PIL-backend notice is noise here
    transformers.logging.disable_progress_bar()
    preset = SIZES[size]
    folder = os.path.join(args.work_dir, f"model-{preset}-{os.path.basename(data_dir)}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    print(f"building the {preset} model in {folder}", flush=True)
    with open(os.path.join(data_dir, "metadata.jsonl")) as f:
        captions = [json.loads(line)["text"] for line in f]
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_git(captions, tmp, preset=preset, seed=args.seed)
    os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Training speed

def compare_training(args, size, data_dir, model_dir):
    steps = args.small_steps if size == "small" else args.base_steps
    batch = args.small_batch if size == "small" else args.base_batch
    result = {"model": model_summary(model_dir, SIZES[size]), "batch_size": batch, "grad_accum": args.grad_accum,
              "programs": {}}
    for name in args.programs:
        max_steps = args.recipe_base_steps if (size, name) == ("base", "recipe") else steps
        result["programs"][name] = run_program(args, size, name, data_dir, model_dir, max_steps, batch)
    ours = result["programs"].get("ours", {}).get("samples_per_second")
    for r in result["programs"].values():
        r["ours_speedup"] = ours / r["samples_per_second"] if ours and r.get("samples_per_second") else None
    return result


def run_program(args, size, name, data_dir, model_dir, max_steps, batch, tag=""):
    """One program in its own process under timed.py; its speed over the steady-state steps."""
    module, own_flags = PROGRAMS[name]
    out_dir = os.path.join(args.work_dir, "runs", f"{size}-{name}{tag}")
    timing_path, log_path = out_dir + ".timing.json", os.path.join(args.work_dir, "logs", f"{size}-{name}{tag}.log")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if os.path.exists(timing_path):
        os.remove(timing_path)
    # Evaluation and saving only after the last step (both programs do both once there), outside
    # the timed steps; one log line, at the end; short captions at train.py's final evaluation.
    flags = ["--dataset", data_dir, "--model", model_dir, "--output-dir", out_dir, "--seed", str(args.seed),
             "--test-size", str(args.test_size), "--batch-size", str(batch), "--eval-batch-size", str(batch),
             "--grad-accum", str(args.grad_accum), "--max-steps", str(max_steps),
             "--learning-rate", str(args.learning_rate), "--precision", args.precision,
             "--num-workers", str(args.num_workers), "--eval-steps", str(max_steps + 1),
             "--save-steps", str(max_steps + 1), "--logging-steps", str(max_steps), "--gen-max-length", "20",
             *own_flags]
    cmd = [sys.executable, os.path.join(HERE, "timed.py"), "--out", timing_path, "--program", module, "--", *flags]
    print(f"{size} / {name}: {max_steps} steps of {batch} x {args.grad_accum} (log: {log_path})", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n\n")
        log.flush()
        status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.time() - t0
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints of a git-base-sized run take gigabytes
    result = {"module": module, "flags": flags, "max_steps": max_steps, "global_batch": batch * args.grad_accum,
              "wall_seconds": round(wall, 1), "log": log_path}
    timing = None
    if os.path.exists(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
    if status != 0 or timing is None:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        print(f"  FAILED (exit status {status}); the end of its log:\n{tail}", flush=True)
        return {**result, "error": f"exit status {status}, see {log_path}"}
    result.update(step_speed(timing["step_times"], result["global_batch"], args.skip_first))
    if "seconds_per_step" not in result:
        result["error"] = f"{result['steps_recorded']} optimizer steps recorded: too few to time after the warm-up"
    result.update(
        exit_status=status,
        peak_rss_mib=round(timing["peak_rss_mib_self"] + timing["peak_rss_mib_children"]),
        peak_rss_mib_self=round(timing["peak_rss_mib_self"]),
        peak_rss_mib_children=round(timing["peak_rss_mib_children"]),
        peak_rss_mib_self_at_last_step=round(timing["peak_rss_mib_self_at_last_step"] or 0),
    )
    if result["steps_recorded"] != max_steps:
        result["warning"] = f"{result['steps_recorded']} optimizer steps recorded, {max_steps} asked for"
    if name == "ours":
        with open(log_path) as f:
            found = OURS_SPEED.findall(f.read())
        if found:
            samples, seconds, wait = map(float, found[-1])
            # train.py's own figures cover all steps, warm-up included.
            result.update(data_wait_share=wait / 100, own_samples_per_second=samples, own_seconds_per_step=seconds)
    print(f"  {result.get('samples_per_second', 0):.2f} samples/s, {result.get('seconds_per_step', 0):.3f} s/step, "
          f"run {wall:.0f} s", flush=True)
    return result


def step_speed(step_times, global_batch, skip_first=None):
    """Seconds per optimizer step over the steps after the first `skip_first` (warm-up: first
    batches, allocator and kernel set-up), and the samples per second that makes."""
    n = len(step_times)
    skip = skip_first if skip_first is not None else min(5, max(1, n // 3))
    if n < skip + 1:
        return {"steps_recorded": n, "skipped_first": skip}
    # Step k ends at step_times[k - 1]; steps skip+1 .. n take from the end of step skip to the end.
    seconds = [b - a for a, b in zip(step_times[skip - 1:], step_times[skip:])]
    per_step = sum(seconds) / len(seconds)
    return {"steps_recorded": n, "skipped_first": skip, "timed_steps": len(seconds),
            "seconds_per_step": per_step, "samples_per_second": global_batch / per_step,
            "step_seconds": [round(s, 4) for s in seconds]}


def model_summary(model_dir, preset):
    from safetensors import safe_open
    from transformers import GitConfig

    params = 0
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            params += math.prod(f.get_slice(key).get_shape())
    config = GitConfig.from_pretrained(model_dir)
    vision = config.vision_config
    return {"folder": model_dir, "preset": preset, "parameters": params,
            "image_tokens": (vision.image_size // vision.patch_size) ** 2 + 1, "vocab_size": config.vocab_size}


def print_training_table(size, result):
    model = result["model"]
    print(f"\n{size} model: preset {model['preset']}, {model['parameters'] / 1e6:.1f}M parameters, "
          f"{model['image_tokens']} image tokens; batch {result['batch_size']} x accumulation {result['grad_accum']}")
    print(f"{'program':<16} {'steps (timed)':>13} {'samples/s':>10} {'s/step':>8} "
          f"{'peak RSS MiB':>12} {'ours is x faster':>16}")
    for name, r in result["programs"].items():
        if r.get("error"):
            print(f"{name:<16} {'failed: ' + r['error']}")
            continue
        timed = f"{r['max_steps']} ({r.get('timed_steps', 0)})"
        speedup = f"{r['ours_speedup']:.2f}" if r.get("ours_speedup") else "-"
        print(f"{name:<16} {timed:>13} {r.get('samples_per_second', 0):>10.2f} {r.get('seconds_per_step', 0):>8.3f} "
              f"{r['peak_rss_mib']:>12} {speedup:>16}")
        if r.get("warning"):
            print(f"  warning: {r['warning']}")
    skips = sorted({r["skipped_first"] for r in result["programs"].values() if "skipped_first" in r})
    if skips:
        print(f"timed: the steps after the first {' or '.join(map(str, skips))} (warm-up); peak RSS of the whole "
              f"process (DataLoader workers added), final evaluation and save included")
    ours = result["programs"].get("ours", {})
    if "data_wait_share" in ours:
        print(f"ours: waiting for data {100 * ours['data_wait_share']:.1f}% of the training time (train.py's own "
              f"measure over all steps: {ours['own_samples_per_second']:.2f} samples/s)")
    print(flush=True)


# ---------------------------------------------------------------------------------------------
# Model FLOPs utilisation

def git_forward_flops(config, caption_tokens):
    """FLOPs of one GIT forward pass over one image and a caption of `caption_tokens` tokens
    ([CLS] ... [SEP]), counting matrix multiplications at 2 FLOPs per multiply-add.

    With n_i = (image_size / patch)^2 + 1 image tokens (197 for git-base), d_v, f_v, l_v the ViT's
    width, MLP width and layers, d, f, l the text decoder's, V the vocabulary, and
    n = n_i + caption_tokens the decoder's sequence:

        patch embedding     2 (n_i - 1) (3 patch^2) d_v
        ViT layers          l_v [2 n_i (4 d_v^2 + 2 d_v f_v) + 4 n_i^2 d_v]
        visual projection   2 n_i d_v d
        decoder layers      l [2 n (4 d^2 + 2 d f) + 4 n^2 d]
        output projection   2 (caption_tokens - 1) d V

    In a layer, 4 d^2 per token are the query, key, value and output projections, 2 d f the MLP,
    and 4 n^2 d the attention scores (Q K^T) and their product with V, counted in full since GIT
    computes the whole n x n score matrix and masks it. The output projection counts only the
    caption positions that predict a next caption token: these "model FLOPs" leave out what an
    implementation may add (logits at image positions, padding), so programs are compared on the
    same useful work. Layer norms, softmax, activations and embedding lookups are left out (under 1%).
    """
    vision = config.vision_config
    n_img = (vision.image_size // vision.patch_size) ** 2 + 1
    d_v, f_v, l_v = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    d, f, l = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = n_img + caption_tokens
    patch_embedding = 2 * (n_img - 1) * 3 * vision.patch_size ** 2 * d_v
    vit = l_v * (2 * n_img * (4 * d_v ** 2 + 2 * d_v * f_v) + 4 * n_img ** 2 * d_v)
    projection = 2 * n_img * d_v * d
    decoder = l * (2 * n * (4 * d ** 2 + 2 * d * f) + 4 * n ** 2 * d)
    output = 2 * (caption_tokens - 1) * d * config.vocab_size
    return patch_embedding + vit + projection + decoder + output


def git_train_flops(config, caption_lengths):
    """Training FLOPs per sample, averaged over captions: 3 x forward (the backward pass does
    twice the forward's matmuls: gradients with respect to activations and to weights)."""
    return 3 * sum(git_forward_flops(config, n) for n in caption_lengths) / len(caption_lengths)


def peak_matmul_flops(dtype, n=4096, warmup=2, reps=5):
    """FLOP/s of the best of `reps` n x n matrix products on this machine, with torch's threads."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def train_caption_lengths(args, data_dir, model_dir):
    """Token counts of the training split's captions with the model's tokenizer, as train.py cuts them."""
    from transformers import AutoTokenizer


    train_table, _ = sources.split_source(sources.load_source(data_dir), args.test_size, args.seed)
    captions = [sources.caption_refs(text)[0] for text in train_table["text"]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [len(ids) for ids in tokenizer(captions, truncation=True, max_length=64)["input_ids"]]


def bench_mfu(args, base_result, model_dir, data_dir):
    import torch
    from transformers import GitConfig

    print("measuring this machine's matmul peak (bf16, fp32)", flush=True)
    peak = {"bf16": peak_matmul_flops(torch.bfloat16), "fp32": peak_matmul_flops(torch.float32)}
    lengths = train_caption_lengths(args, data_dir, model_dir)
    per_sample = git_train_flops(GitConfig.from_pretrained(model_dir), lengths)
    result = {"peak_flops": peak, "torch_threads": torch.get_num_threads(),
              "mean_caption_tokens": sum(lengths) / len(lengths), "train_flops_per_sample": per_sample,
              "programs": {}}
    for name, r in base_result["programs"].items():
        if not r.get("seconds_per_step"):
            continue
        step_flops = per_sample * r["global_batch"]
        achieved = step_flops / r["seconds_per_step"]
        result["programs"][name] = {"step_flops": step_flops, "achieved_flops": achieved,
                                    "mfu_bf16": achieved / peak["bf16"], "mfu_fp32": achieved / peak["fp32"]}
    return result


def print_mfu_table(mfu):
    print(f"\nbase model FLOPs utilisation: measured peak {mfu['peak_flops']['bf16'] / 1e9:.0f} GFLOP/s bf16, "
          f"{mfu['peak_flops']['fp32'] / 1e9:.0f} GFLOP/s fp32 ({mfu['torch_threads']} threads, torch.mm 4096^2); "
          f"training FLOPs per sample {mfu['train_flops_per_sample'] / 1e9:.1f} G "
          f"(mean caption {mfu['mean_caption_tokens']:.1f} tokens)")
    print(f"{'program':<16} {'TFLOP/step':>10} {'GFLOP/s':>8} {'MFU bf16':>9} {'MFU fp32':>9}")
    for name, r in mfu["programs"].items():
        print(f"{name:<16} {r['step_flops'] / 1e12:>10.2f} {r['achieved_flops'] / 1e9:>8.1f} "
              f"{100 * r['mfu_bf16']:>8.1f}% {100 * r['mfu_fp32']:>8.1f}%")
    print("model FLOPs: the useful work of each step (no padding, no logits at image positions), see "
          "git_forward_flops in bench/bench.py; under bf16 autocast the fp32 figure may pass 100%\n", flush=True)


# ---------------------------------------------------------------------------------------------
# Report

# ---------------------------------------------------------------------------------------------
# Inference

def bench_inference(args, model_dirs, data_dir):
    """Images per second of infer.py's batched generate (batch 16) against one image at a time,
    on the same images and model, in this process; and the wall time of `infer.py --help` and of
    a first caption from a cold start (a new process: imports, model load, one image)."""
    paths = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".jpg"))
    paths = paths[:args.inference_images]
    images = [captioner.load_input(p) for p in paths]  # decoding is the same for both: not timed
    result = {"images": len(images), "max_length": 20, "sizes": {}}
    for size, model_dir in model_dirs.items():
        model, processor, device, amp = captioner.load(model_dir, "auto", args.precision)
        row = {}
        for name, batch in (("one_at_a_time", 1), ("batched_16", 16)):
            captioner.generate(model, processor, device, amp, images[:2], max_length=20, batch_size=batch)  # warm-up
            t0 = time.perf_counter()
            captioner.generate(model, processor, device, amp, images, max_length=20, batch_size=batch)
            row[f"{name}_images_per_second"] = len(images) / (time.perf_counter() - t0)
        row["batched_speedup"] = row["batched_16_images_per_second"] / row["one_at_a_time_images_per_second"]
        result["sizes"][size] = row
        print(f"inference, {size} model: one at a time {row['one_at_a_time_images_per_second']:.1f} images/s, "
              f"batched (16) {row['batched_16_images_per_second']:.1f} images/s: {row['batched_speedup']:.2f}x",
              flush=True)

    def wall(cmd, reps):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, check=True)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]  # the median

    infer_py = os.path.join(ROOT, "infer.py")
    small = model_dirs.get("small") or next(iter(model_dirs.values()))
    reps = 1 if args.quick else 3  # a cold start is ~10 s here; the tests need one, not a median
    result["help_seconds"] = wall([sys.executable, infer_py, "--help"], 5)
    result["cold_first_caption_seconds"] = wall([sys.executable, infer_py, "--model", small, paths[0]], reps)
    print(f"python infer.py --help: {result['help_seconds']:.3f} s; first caption from a cold start "
          f"({os.path.basename(small)}): {result['cold_first_caption_seconds']:.2f} s", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Scaling

def bench_scaling(args, model_dir):
    """train.py on the small model: samples per second as the batch doubles (4 to 64), and the time
    of one epoch as the dataset grows (1x, 4x, 16x of --images / 8)."""
    result = {"batch": [], "dataset": [], "num_workers": 2}
    data_dir = prepare_data(args)
    # With two DataLoader workers, as a user would set them, so the data-wait share says whether
    # loading keeps up (the comparison above uses the recipe's default of none).
    workers = argparse.Namespace(**{**vars(args), "num_workers": 2})
    for batch in (4, 8, 16, 32, 64):
        r = run_program(workers, "small", "ours", data_dir, model_dir, 12, batch, tag=f"-batch{batch}")
        result["batch"].append({"batch_size": batch, **{k: r.get(k) for k in
                                                        ("samples_per_second", "seconds_per_step", "data_wait_share",
                                                         "peak_rss_mib", "error")}})
    base = max(8, args.images // 8)
    for factor in (1, 4, 16):
        folder = prepare_data(args, base * factor)
        n_train = base * factor - math.ceil(args.test_size * base * factor)  # as datasets' train_test_split
        one_epoch = math.ceil(math.ceil(n_train / args.small_batch) / args.grad_accum)
        r = run_program(workers, "small", "ours", folder, model_dir, max(2, one_epoch), args.small_batch,
                        tag=f"-images{base * factor}")
        steps = r.get("steps_recorded") or 0
        result["dataset"].append({"images": base * factor, "factor": factor, "steps": steps,
                                  "epoch_seconds": steps * r["seconds_per_step"] if r.get("seconds_per_step") else None,
                                  "process_seconds": r["wall_seconds"], "error": r.get("error")})
    print("scaling (train.py, small model):")
    for row in result["batch"]:
        print(f"  batch {row['batch_size']:>3}: {row['samples_per_second'] or 0:8.1f} samples/s")
    for row in result["dataset"]:
        print(f"  {row['images']:>5} images ({row['factor']:>2}x): one epoch {row['epoch_seconds'] or 0:6.1f} s of "
              f"training, {row['process_seconds']:6.1f} s for the whole process (with decoding the images into the cache when it is not filled yet)")
    return result


def machine_info():
    import accelerate
    import datasets
    import torch
    import transformers

    cpu, flags = platform.processor() or "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = value.split()
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_matrix_flags": [x for x in ("amx_bf16", "avx512_bf16") if x in flags],
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "accelerate": accelerate.__version__, "load_average_at_start": os.getloadavg()}


def folder_mib(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2 ** 20


def write_report(path, report):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
