"""One command for the first CUDA GPU we are lent: is --attention sdpa right there, does the whole
program run there, and how fast is it. `make check-gpu` runs it.

    python bench/check_gpu.py                    # on a CUDA machine: git-base size (about 8 minutes)
    python bench/check_gpu.py --quick            # tiny sizes, on the CPU too: what the tests run

Three parts; each check is guarded, so a failure (an error, a GPU out of memory) is recorded and
the next check still runs. A table at the end, every number in one JSON file (--json).

1. correctness, at git-base size (`base-scratch`: random weights, dropout off), on a padded batch
   with filler rows (every caption of an image, as --caption-sampling all trains):
   - sdpa against eager in fp32: loss, logits and every gradient, within fixed tolerances;
   - the same under fp16 and bf16 autocast: there both attentions round differently, so each is
     compared with the fp32 eager result, and sdpa passes when its error is at most twice eager's
     (plus a floor) in the loss, the logits and each parameter's gradient;
   - generate: greedy and 3-beam captions of sdpa identical to eager's in fp32; under fp16 autocast
     the share of captions equal to the fp32 ones, for each attention (sdpa passes when its share is
     no more than 10 points under eager's), and the share where fp16 sdpa and fp16 eager agree;
   - torch.compile of the sdpa model (inductor; --quick: aot_eager, seconds instead of a minute of
     code generation on a CPU) gives the loss of the uncompiled one.
2. the program: train.py on the tiny model and synthetic scenes with fp16 autocast and a GradScaler
   (evaluation, checkpoints, best/), once uninterrupted and once killed with SIGKILL after a
   checkpoint and resumed; the final weights compared (bit-exact or not, and the largest
   difference); then infer.py and metrics.py --model on what it wrote.
3. speed: bench/gpu.py's table (eager / sdpa / sdpa+compile x fp16 / bf16 at git-base size, batch
   32; generate at batch 64) and infer.py's images/s over 2,000 photo-like 1280 x 960 JPEGs
   (bench/photos.py) with its reading workers (start-up excluded: from its first printed batch to
   its last).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from captioning import cli  # noqa: E402

SIZES = {
    "full": dict(preset="base-scratch", images=6, generate_images=32, gen_max_length=20, compile_backend="inductor",
                 train_size=400, train_steps=40, save_steps=10, eval_steps=20, photos=2000, photo_size=(1280, 960),
                 infer_batch_size=32, gpu_flags=[]),
    # The CPU's quick run leaves out gpu.py's sdpa+compile rows: inductor would take minutes compiling there.
    "quick": dict(preset="tiny", images=3, generate_images=4, gen_max_length=8, compile_backend="aot_eager",
                  train_size=40, train_steps=4, save_steps=2, eval_steps=2, photos=12, photo_size=(320, 240),
                  infer_batch_size=4, gpu_flags=["--quick", "--variants", "eager,sdpa"]),
}
FP32_TOLERANCE = {"loss": 1e-5, "logits": 1e-4, "grad": 1e-3}  # grad: relative, see differences()
LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR = 2.0, {"loss": 1e-5, "logits": 1e-4, "grad": 1e-3}
FP16_SHARE_MARGIN = 0.10
PARTS = ("correctness", "program", "speed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds a part: runs on a CPU (the tests)")
    p.add_argument("--device", choices=cli.DEVICES, default="auto")
    p.add_argument("--parts", type=cli.comma_list(PARTS), default=list(PARTS), help="comma-separated, of " + ",".join(PARTS))
    p.add_argument("--work-dir", default=os.path.join(HERE, "bench-work"), help="built models and JPEGs, reused")
    p.add_argument("--json", default=os.path.join(HERE, "check-gpu.json"), help="every result, as JSON")
    args = p.parse_args(argv)
    args.size = SIZES["quick" if args.quick else "full"]
    return args


# ---------------------------------------------------------------------------------------------
# 1. Correctness

def no_dropout(model):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def filler_batch(processor, n, device):
    """n scenes with 1, 2, 3, ... captions of different lengths, collated as --caption-sampling all
    collates them: right padding, and filler rows (all padding) for images with fewer captions."""
    from captioning import batches, evaluation, synthetic

    scenes = [synthetic.scene(11, i) for i in range(n)]
    captions = [[caption, caption.split(" and ")[0], "a scene"][:1 + i % 3] for i, (_, caption) in enumerate(scenes)]
    ds = batches.build_dataset([image for image, _ in scenes], captions, processor, max_text_length=40, all_captions=True)
    ds.set_epoch(0)
    batch = batches.collate([ds[i] for i in range(len(ds))], processor.tokenizer.pad_token_id,
                            *batches.normaliser(processor.image_processor))
    assert not batch["attention_mask"].all(dim=1).all(), "the batch must hold padding"
    return evaluation.to_device(batch, device)


def forward_backward(model, batch, device, amp_dtype):
    """(loss, logits at every position, {parameter: gradient}) of training's caption loss."""
    import torch

    from captioning import evaluation, runtime

    model.zero_grad(set_to_none=True)
    n = evaluation.num_targets(batch)
    # A fixed loss scale under fp16 (a GradScaler's first one would do), the same for both attentions.
    scale = 2.0 ** 12 if amp_dtype == torch.float16 else 1.0
    with runtime.autocast(device, amp_dtype):
        loss = evaluation.caption_loss(model, batch, n)
    (loss * scale).backward()
    with torch.no_grad(), runtime.autocast(device, amp_dtype):
        logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"], use_cache=False).logits.float()
    grads = {k: p.grad.float() / scale for k, p in model.named_parameters() if p.grad is not None}
    return loss.item(), logits, grads


def differences(a, b):
    """Largest differences of (loss, logits, gradients) b against a, the worst gradient named. A
    gradient's is relative to its tensor's largest entry, or to 1% of the model's largest when the
    tensor's is smaller: some gradients are zero in exact arithmetic (attention's key bias: a softmax
    ignores what is added to every score) and hold only rounding noise."""
    loss_a, logits_a, grads_a = a
    loss_b, logits_b, grads_b = b
    floor = 0.01 * max(g.abs().max().item() for g in grads_a.values())
    relative = {k: ((grads_b[k] - grads_a[k]).abs().max() / max(grads_a[k].abs().max().item(), floor, 1e-30)).item()
                for k in grads_a if k in grads_b}
    worst = max(relative, key=relative.get)
    return {"loss": abs(loss_b - loss_a), "logits": (logits_b - logits_a).abs().max().item(),
            "grad": relative[worst], "worst_grad": worst, "grads_compared": len(relative),
            "grads_missing": sorted(set(grads_a) ^ set(grads_b))}


def check_attention_numbers(folder, device, precision, images):
    """sdpa against eager in one precision (see the module's docstring for the rule)."""
    import torch

    from captioning import attention, runtime
    from captioning.gitmodel import load_model

    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return {"status": "skipped", "why": "this GPU has no bf16 tensor cores"}
    results = {}
    for name in ("eager", "sdpa"):
        model, processor = load_model(folder)
        model = no_dropout(attention.set_attention(model, name)).to(device).train()
        batch = filler_batch(processor, images, device)
        results[name, "fp32"] = forward_backward(model, batch, device, None)
        if precision != "fp32":
            results[name, precision] = forward_backward(model, batch, device, runtime.pick_precision(precision, device)[0])
        del model
    if precision == "fp32":
        diff = differences(results["eager", "fp32"], results["sdpa", "fp32"])
        failed = [k for k, tol in FP32_TOLERANCE.items() if not diff[k] <= tol] + diff["grads_missing"]
        return {"status": "failed" if failed else "passed", "failed": failed, "sdpa_vs_eager": diff,
                "tolerance": FP32_TOLERANCE}
    sdpa = differences(results["eager", "fp32"], results["sdpa", precision])
    eager = differences(results["eager", "fp32"], results["eager", precision])
    bound = {k: LOW_PRECISION_FACTOR * eager[k] + floor for k, floor in LOW_PRECISION_FLOOR.items()}
    failed = [k for k in bound if not sdpa[k] <= bound[k]] + sdpa["grads_missing"]
    return {"status": "failed" if failed else "passed", "failed": failed, "sdpa_vs_fp32": sdpa,
            "eager_vs_fp32": eager, "bound": bound,
            "sdpa_vs_eager": differences(results["eager", precision], results["sdpa", precision])}


def check_generate(folder, device, count, max_length):
    """Greedy and 3-beam captions: sdpa identical to eager in fp32; under fp16 autocast, the share of
    captions equal to the fp32 ones for each attention."""
    import torch

    from captioning import attention, runtime, synthetic
    from captioning.gitmodel import load_model

    captions = {}
    for name in ("eager", "sdpa"):
        model, processor = load_model(folder)
        model = attention.set_attention(model, name).to(device).eval()
        images = [synthetic.scene(12, i)[0] for i in range(count)]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
        for beams in (1, 3):
            for precision in ("fp32", "fp16"):
                amp_dtype = runtime.pick_precision(precision, device)[0]
                with torch.inference_mode(), runtime.autocast(device, amp_dtype):
                    ids = model.generate(pixel_values=pixels, max_length=max_length, num_beams=beams)
                captions[name, beams, precision] = processor.batch_decode(ids, skip_special_tokens=True)
        del model
    result = {"images": count, "max_length": max_length}
    failed = []
    for beams in (1, 3):
        kind = "greedy" if beams == 1 else "beam3"
        same = captions["sdpa", beams, "fp32"] == captions["eager", beams, "fp32"]
        shares = {name: sum(a == b for a, b in zip(captions[name, beams, "fp16"], captions[name, beams, "fp32"]))
                  / len(captions[name, beams, "fp32"]) for name in ("eager", "sdpa")}
        alike = sum(a == b for a, b in zip(captions["sdpa", beams, "fp16"], captions["eager", beams, "fp16"]))
        result[kind] = {"fp32_identical": same, "fp16_share_equal_to_fp32": shares,
                        "fp16_share_sdpa_equal_to_eager": alike / len(captions["eager", beams, "fp16"]),
                        "distinct_fp32_captions": len(set(captions["eager", beams, "fp32"]))}
        if not same:
            failed.append(f"{kind} fp32")
        if shares["sdpa"] < shares["eager"] - FP16_SHARE_MARGIN:
            failed.append(f"{kind} fp16 share")
    return {"status": "failed" if failed else "passed", "failed": failed, **result}


def check_compile(folder, device, backend, images):
    """The caption loss of torch.compile(sdpa model) against the same model uncompiled, on the
    fixed shapes --compile trains with."""
    import torch

    from captioning import attention, evaluation
    from captioning.gitmodel import load_model

    model, processor = load_model(folder)
    model = no_dropout(attention.set_attention(model, "sdpa")).to(device).train()
    batch = filler_batch(processor, images, device)
    n = evaluation.num_targets(batch)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    losses = [evaluation.caption_loss(m, batch, n, static=True) for m in (model, compiled)]
    seconds = time.perf_counter() - t0
    (losses[1]).backward()  # the compiled backward runs too
    grads_finite = all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
    difference = abs(losses[1].item() - losses[0].item())
    failed = [name for name, ok in (("loss", difference <= 1e-5 * max(1.0, abs(losses[0].item()))),
                                    ("gradients finite", grads_finite)) if not ok]
    return {"status": "failed" if failed else "passed", "failed": failed, "backend": backend,
            "loss": losses[0].item(), "compiled_loss": losses[1].item(), "difference": difference,
            "seconds_with_compiling": seconds}


def correctness(device, work_dir, size):
    import gpu

    folder = gpu.build_model(size["preset"], work_dir)
    checks = {f"sdpa vs eager, {p}": (check_attention_numbers, folder, device, p, size["images"])
              for p in ("fp32", "fp16", "bf16")}
    checks["generate"] = (check_generate, folder, device, size["generate_images"], size["gen_max_length"])
    checks["compile"] = (check_compile, folder, device, size["compile_backend"], size["images"])
    return {name: guarded(*call) for name, call in checks.items()}


# ---------------------------------------------------------------------------------------------
# 2. The program

def quietly(log_path, command, *argv):
    """A command's main(argv) in this process, its output appended to a log: (exit status, what
    main returned, the output text)."""
    import importlib

    module = importlib.import_module(command)
    returned = None
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        log.write(f"\n$ python {command}.py {shlex.join(map(str, argv))}\n")
        log.flush()
        start = log.tell()
        try:
            returned = module.main([str(a) for a in argv])
            status = returned if isinstance(returned, int) else 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=log)
    with open(log_path) as log:
        log.seek(start)
        return status, returned, log.read()


def train_flags(model_dir, out, device, size):
    steps = size["train_steps"]
    return ["--dataset", "synthetic", "--synthetic-size", size["train_size"], "--model", model_dir,
            "--output-dir", out, "--device", device.type, "--precision", "fp16", "--batch-size", 4,
            "--grad-accum", 2, "--eval-batch-size", 8, "--learning-rate", 1e-3, "--max-steps", steps,
            "--save-steps", size["save_steps"], "--eval-steps", size["eval_steps"], "--logging-steps", size["save_steps"],
            "--num-examples", 0, "--gen-max-length", 12]


def killed_after_a_checkpoint(flags, out, log_path):
    """train.py in its own process, killed with SIGKILL once it has written its first checkpoint;
    returns that checkpoint's name."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, flags)]
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}   (killed with SIGKILL after its first checkpoint)\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        saved = None
        for line in proc.stdout:
            log.write(line)
            if line.startswith(f"saved {out}{os.sep}checkpoint-"):
                saved = line.split()[1]
                proc.send_signal(signal.SIGKILL)
                break
        proc.kill()
        proc.wait()
    if saved is None:
        raise RuntimeError(f"train.py ended (status {proc.returncode}) before a checkpoint; see {log_path}")
    return os.path.basename(saved)


def weights_difference(start, a, b):
    """(largest entry of |a - b|, ||a - b|| over ||a - start||: the runs' difference against how far
    training moved the weights) for the model.safetensors of three folders."""
    from safetensors.torch import load_file

    w0, x, y = (load_file(os.path.join(folder, "model.safetensors")) for folder in (start, a, b))
    assert x.keys() == y.keys() == w0.keys()
    largest = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    apart = math.sqrt(sum((x[k].float() - y[k].float()).pow(2).sum().item() for k in x))
    moved = math.sqrt(sum((x[k].float() - w0[k].float()).pow(2).sum().item() for k in x))
    return largest, apart / max(moved, 1e-30)


def program(device, work_dir, size):
    import torch

    import gpu

    model_dir = gpu.build_model("tiny", work_dir)
    runs = os.path.join(work_dir, "check-gpu-runs")
    shutil.rmtree(runs, ignore_errors=True)
    os.makedirs(runs)
    log = os.path.join(runs, "log.txt")
    full, killed = os.path.join(runs, "uninterrupted"), os.path.join(runs, "killed")
    result = {"log": log}

    def trained():
        status, best, _ = quietly(log, "train", *train_flags(model_dir, full, device, size))
        checkpoints = sorted(n for n in os.listdir(full) if n.startswith("checkpoint-")) if status == 0 else []
        done = status == 0 and best and best.get("value") is not None and os.path.isdir(os.path.join(full, "best"))
        return {"status": "passed" if done else "failed", "failed": [] if done else ["train.py"],
                "exit_status": status, "checkpoints": checkpoints, "best": best}

    def resumed():
        first = killed_after_a_checkpoint(train_flags(model_dir, killed, device, size), killed, log)
        status, _, _ = quietly(log, "train", *train_flags(model_dir, killed, device, size), "--resume")
        final = f"checkpoint-{size['train_steps']}"
        largest, relative = weights_difference(model_dir, os.path.join(full, final), os.path.join(killed, final))
        # A CPU repeats every sum in the same order: bit-exact. CUDA's atomic adds (embedding and index
        # backward) do not, and Adam turns a rounding-sized gradient difference into a step-sized one:
        # there the runs must stay close against how far training moved the weights.
        tolerance = 0.0 if device.type == "cpu" else 0.05
        failed = [n for n, ok in (("exit status", status == 0), ("weights", relative <= tolerance)) if not ok]
        return {"status": "failed" if failed else "passed", "failed": failed, "killed_after": first,
                "bit_exact": largest == 0.0, "largest_weight_difference": largest,
                "difference_over_training_movement": relative, "tolerance": tolerance}

    def captioned():
        from captioning import synthetic

        folder = os.path.join(runs, "scenes")
        os.makedirs(folder, exist_ok=True)
        photos = []
        for i in range(4):
            photos.append(os.path.join(folder, f"{i}.png"))
            synthetic.scene(13, i)[0].save(photos[-1])
        status, _, out = quietly(log, "infer", "--model", os.path.join(full, "best"), "--device", device.type, *photos)
        lines = [line for line in out.splitlines() if line.startswith(folder)]
        failed = [] if status == 0 and len(lines) == len(photos) else ["infer.py"]
        return {"status": "failed" if failed else "passed", "failed": failed, "captions": lines}

    def scored():
        # metrics.py --model takes the run's flags from its training_args.json: the WER it reported for best/.
        status, _, out = quietly(log, "metrics", "--model", os.path.join(full, "best"), "--json")
        scores = json.loads(out.strip().splitlines()[-1]) if status == 0 else {}
        best = result.get("train", {}).get("best") or {}
        same = (status == 0 and best.get("metric") == "wer" and best.get("value") is not None
                and math.isclose(scores["wer"], best["value"], abs_tol=1e-9))
        return {"status": "passed" if same else "failed", "failed": [] if same else ["WER of the run"],
                "wer": scores.get("wer"), "run_best": best}

    torch.manual_seed(0)
    result["train"] = guarded(trained)
    result["kill -9, resume"] = guarded(resumed)
    result["infer.py"] = guarded(captioned)
    result["metrics.py --model"] = guarded(scored)
    return result


# ---------------------------------------------------------------------------------------------
# 3. Speed

def photo_folder(work_dir, count, width, height):
    """`count` photo-like JPEGs (bench/photos.py: ~250 KB at 1280 x 960, a phone photo's decoding
    cost), written once in parallel and reused."""
    import photos

    folder = os.path.join(work_dir, f"photos-{count}x{width}x{height}")
    if not os.path.isfile(os.path.join(folder, "metadata.jsonl")):  # written last: the folder is complete
        shutil.rmtree(folder, ignore_errors=True)
        photos.main(["--out", folder, "--n", str(count), "--size", f"{width}x{height}"])
    return folder


def infer_speed(model_dir, folder, device, max_length, batch_size, log_path):
    """infer.py over a folder in its own process, as a user runs it (reading workers by default):
    images/s from the end of its first printed batch to its last line, and the whole wall time."""
    cmd = [sys.executable, os.path.join(ROOT, "infer.py"), "--model", model_dir, "--device", device.type,
           "--max-length", str(max_length), "--batch-size", str(batch_size), folder]
    stamps = []
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        for line in proc.stdout:
            stamps.append(time.perf_counter())
        status = proc.wait()
    wall = time.perf_counter() - t0
    first_batch = min(batch_size, len(stamps))  # a batch's captions print at once
    steady = stamps[-1] - stamps[first_batch - 1] if len(stamps) > first_batch else None
    ok = status == 0 and len(stamps) == sum(name.endswith(".jpg") for name in os.listdir(folder))
    return {"status": "passed" if ok else "failed", "failed": [] if ok else ["infer.py"], "exit_status": status,
            "images": len(stamps), "wall_seconds": wall, "first_output_seconds": stamps[0] - t0 if stamps else None,
            "images_per_second": (len(stamps) - first_batch) / steady if steady else None}


def speed(device, work_dir, size):
    import gpu

    runs = os.path.join(work_dir, "check-gpu-runs")
    os.makedirs(runs, exist_ok=True)
    gpu_json = os.path.join(runs, "gpu.json")

    def training_and_generate():
        if os.path.exists(gpu_json):
            os.remove(gpu_json)
        status = gpu.main([*size["gpu_flags"], "--device", device.type, "--work-dir", work_dir, "--json", gpu_json])
        with open(gpu_json) as f:
            report = json.load(f)
        return {"status": "passed" if status == 0 else "failed", "failed": [] if status == 0 else ["a row"],
                "report": report}

    def inference():
        return infer_speed(gpu.build_model(size["preset"], work_dir),
                           photo_folder(work_dir, size["photos"], *size["photo_size"]), device,
                           size["gen_max_length"], size["infer_batch_size"], os.path.join(runs, "log.txt"))

    return {"bench/gpu.py": guarded(training_and_generate), "infer.py over photos": guarded(inference)}


# ---------------------------------------------------------------------------------------------
# Report

def guarded(check, *a):
    """A check's result, or the error that stopped it: the other checks still run."""
    t0 = time.perf_counter()
    try:
        result = check(*a)
    except Exception as e:  # noqa: BLE001 - any failure becomes the check's result
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def summary(name, r):
    """One line of figures for the table."""
    if r.get("status") in ("error", "skipped"):
        return r.get("error") or r.get("why", "")
    if "sdpa_vs_eager" in r and "bound" not in r:
        d = r["sdpa_vs_eager"]
        return f"loss {d['loss']:.1e}, logits {d['logits']:.1e}, grad {d['grad']:.1e} (tolerance {r['tolerance']})"
    if "bound" in r:
        s, e = r["sdpa_vs_fp32"], r["eager_vs_fp32"]
        return (f"error vs fp32, sdpa / eager: loss {s['loss']:.1e} / {e['loss']:.1e}, logits {s['logits']:.1e} / "
                f"{e['logits']:.1e}, grad {s['grad']:.1e} / {e['grad']:.1e}")
    if "greedy" in r:
        g, b = r["greedy"], r["beam3"]
        return (f"fp32 identical: greedy {g['fp32_identical']}, 3 beams {b['fp32_identical']}; fp16 share equal to "
                f"fp32, sdpa / eager: greedy {g['fp16_share_equal_to_fp32']['sdpa']:.2f} / "
                f"{g['fp16_share_equal_to_fp32']['eager']:.2f}, 3 beams {b['fp16_share_equal_to_fp32']['sdpa']:.2f} / "
                f"{b['fp16_share_equal_to_fp32']['eager']:.2f}; fp16 sdpa = fp16 eager: greedy "
                f"{g['fp16_share_sdpa_equal_to_eager']:.2f}, 3 beams {b['fp16_share_sdpa_equal_to_eager']:.2f}")
    if "compiled_loss" in r:
        return f"{r['backend']}: loss {r['loss']:.6f}, compiled {r['compiled_loss']:.6f}"
    if "bit_exact" in r:
        return (f"killed after {r['killed_after']}: bit-exact {r['bit_exact']}, largest difference "
                f"{r['largest_weight_difference']:.1e}, {r['difference_over_training_movement']:.1e} of training's movement")
    if "checkpoints" in r:
        return f"best {r['best']}, {', '.join(r['checkpoints'])}"
    if "run_best" in r:
        return f"WER {r['wer']} (the run's best: {r['run_best'].get('value')})"
    if "captions" in r:
        return f"{len(r['captions'])} captions"
    if "report" in r:
        rows = [f"{v}/{p} {x['images_per_second']:.1f}" for v, by in r["report"]["train"].items()
                for p, x in by.items() if "images_per_second" in x]
        return "train images/s: " + ", ".join(rows)
    if "images_per_second" in r:
        rate = r["images_per_second"]
        return (f"{r['images']} images, {rate:.1f} images/s after the first batch, " if rate else f"{r['images']} images, ") + \
            f"first caption at {r['first_output_seconds'] or 0:.1f} s, {r['wall_seconds']:.1f} s in all"
    return ""


def print_table(report):
    print(f"\ncheck-gpu on {report['device']} ({report['device_name']}), torch {report['torch']}, "
          f"{'quick' if report['quick'] else 'full'} sizes")
    print(f"{'part':<12} {'check':<22} {'result':<8} figures")
    for part in PARTS:
        for name, r in report.get(part, {}).items():
            if isinstance(r, dict):
                print(f"{part:<12} {name:<22} {r.get('status', ''):<8} {summary(name, r)}")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    from captioning import runtime, training

    try:
        device = runtime.pick_device(args.device)
    except ValueError as e:
        cli.fail(str(e))
    training.quiet_libraries()
    os.makedirs(args.work_dir, exist_ok=True)
    import gpu

    report = {"command": shlex.join([sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
              "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else gpu.cpu_name(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "settings": args.size}
    for part, run in (("correctness", correctness), ("program", program), ("speed", speed)):
        if part in args.parts:
            print(f"--- {part}", flush=True)
            report[part] = run(device, args.work_dir, args.size)
            gpu.write_json(report, args.json)  # what is done survives a crash in a later part
    report["failed"] = [f"{part}: {name}" for part in PARTS
                        for name, r in report.get(part, {}).items()
                        if isinstance(r, dict) and r.get("status") in ("failed", "error")]
    gpu.write_json(report, args.json)
    print_table(report)
    print(f"\n{'all checks passed' if not report['failed'] else 'FAILED: ' + '; '.join(report['failed'])}; "
          f"every number in {args.json}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
