"""Training and captioning speed of GIT at git-base size on a GPU: attention, compile and precision.

    python bench/gpu.py                          # git-base size, batch 32, every variant (on a CUDA GPU)
    python bench/gpu.py --json bench/gpu.json    # the same, with every number written as JSON too
    python bench/gpu.py --quick                  # the tiny model, a few steps: runs on a CPU, for the tests

The model is git-base's architecture with random weights (model.py's `base-scratch` preset), built
offline once and read back with from_pretrained. For each attention variant (`eager`: GIT as
transformers loads it; `sdpa`: attention.py's fused attention; `sdpa+compile`: the same under
torch.compile, as train.py --compile) and each precision (`fp16` autocast with a GradScaler,
`bf16` autocast), a freshly loaded model trains on one fixed batch of synthetic scenes: warm-up
steps, then timed steps. The step is train.py's own `optimizer_step` (its caption-only loss,
gradient clipping, AdamW as train.py builds it), so the numbers are what train.py would do with
data that is already on the device: loading and decoding images is not part of them.

Printed for each row: images/s, seconds per step, peak memory (CUDA: the most memory allocated by
tensors; CPU: the process's peak resident memory, which counts everything in the process), the
model FLOP/s and the MFU: those FLOP/s over the device's dense fp16/bf16 tensor-core peak, from a
table of datasheet figures by device name, or measured with one large matrix product when the
device is not in the table (and always on a CPU). Then captioning speed: images/s of
model.generate on a batch of 64, eager against sdpa.

The compile time is that of a cold start: inductor and Triton write to an empty cache of this
run's own, deleted at the end.
"""
import argparse
import datetime
import gc
import json
import math
import os
import re
import resource
import shlex
import shutil
import sys
import tempfile
import time
import traceback
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from captioning import evaluation, flags, gitmodel, runtime, training  # noqa: E402

VARIANTS = ("eager", "sdpa", "sdpa+compile")
PRECISIONS = ("fp16", "bf16")

# Dense (not 2:4 sparse) fp16/bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets, which
# print the sparse figure, twice these, first. Matched in order against torch's device name; the
# first match wins. A device not listed (A10G, H100 NVL, H200, V100, GeForce cards...) gets a
# measured peak instead, or pass --peak-tflops.
PEAK_TFLOPS = [
    (r"H100.*PCIE", 756.0, "NVIDIA H100 PCIe"),
    (r"H100.*NVL", None, None),  # not the SXM part: measured
    (r"H100", 989.4, "NVIDIA H100 SXM"),  # the SXM part is named "NVIDIA H100 80GB HBM3"
    (r"A100", 312.0, "NVIDIA A100"),
    (r"L40S", 362.05, "NVIDIA L40S"),
    (r"\bL4\b", 121.0, "NVIDIA L4"),
    (r"\bA10\b", 125.0, "NVIDIA A10"),  # not the A10G, whose peak NVIDIA does not publish
    (r"\bT4\b", 65.0, "NVIDIA T4"),  # fp16 only: its bf16 row is skipped
]

# Full size is what the issue asks for; --quick is small enough for a CPU in a test (training batches of 2:
# a float16 or emulated bfloat16 backward pass is slow on a CPU without units for them).
SIZES = {
    "full": dict(model="base-scratch", batch_size=32, generate_batch_size=64, steps=20, warmup=5,
                 gen_max_length=20, generate_reps=3, matmul_size=None),
    "quick": dict(model="tiny", batch_size=2, generate_batch_size=8, steps=3, warmup=2,
                  gen_max_length=8, generate_reps=1, matmul_size=2048),
}


def parse_args(argv=None):
    from captioning import cli

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    full, quick = SIZES["full"], SIZES["quick"]
    a("--quick", action="store_true",
      help="the small CPU setting for the tests: " + ", ".join(f"{k}={v}" for k, v in quick.items()))
    a("--model", choices=("base-scratch", "tiny"), default=None,
      help=f"model.TINY_PRESETS preset, randomly initialised (default {full['model']})")
    a("--batch-size", type=cli.positive_int, default=None,
      help=f"training images a step (default {full['batch_size']})")
    a("--generate-batch-size", type=cli.positive_int, default=None,
      help=f"images a generate call (default {full['generate_batch_size']})")
    a("--steps", type=cli.positive_int, default=None, help=f"timed training steps (default {full['steps']})")
    a("--warmup", type=cli.positive_int, default=None,
      help=f"training steps before the timed ones, left out of the speed (default {full['warmup']}); "
           "with compile, their extra time is reported as the compile time")
    a("--gen-max-length", type=cli.positive_int, default=None,
      help=f"max_length of generate; every caption is written to it (default {full['gen_max_length']})")
    a("--generate-reps", type=cli.positive_int, default=None,
      help=f"timed generate calls after one warm-up call (default {full['generate_reps']})")
    a("--variants", type=cli.comma_list(VARIANTS), default=list(VARIANTS), help="comma-separated, of " + ",".join(VARIANTS))
    a("--precisions", type=cli.comma_list(PRECISIONS), default=list(PRECISIONS),
      help="comma-separated: fp16 (autocast + GradScaler), bf16 (autocast)")
    a("--generate-precision", choices=cli.PRECISIONS, default="auto",
      help="autocast for generate; auto: fp16 on CUDA, bf16 on a CPU with bf16 units, else fp32")
    a("--skip-generate", action="store_true", help="measure training only")
    a("--device", choices=cli.DEVICES, default="auto")
    a("--peak-tflops", type=cli.positive_float, default=None,
      help="the device's dense fp16 peak in TFLOP/s, for MFU (default: the table by device name, else measured)")
    a("--matmul-size", type=cli.positive_int, default=None,
      help="side of the square matrices timed for a measured peak (default 8192 on a GPU, 4096 on a CPU)")
    a("--work-dir", default=os.path.join(HERE, "bench-work"), help="where the built model is kept and reused")
    a("--json", metavar="OUT", default=None, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    for key, value in SIZES["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------
# FLOPs and the device's peak

def train_step_flops(config, images, caption_rows, caption_length, predicted_tokens):
    """Model FLOPs of one training step of GIT: the matrix products of the forward pass at 2 FLOPs
    a multiply-add, times 3 (the backward computes gradients for both activations and weights, two
    more products of the same size).

    images          images through the vision tower, n_i = (image_size / patch_size)^2 + 1 tokens each
    caption_rows    decoder rows, each n_i image tokens + caption_length caption tokens (padded)
    predicted_tokens  caption positions with a target: the only ones evaluation.caption_loss projects
                      onto the vocabulary

    Counted, per token that goes through them: the patch embedding (3 * patch^2 * d_v weights, the
    n_i - 1 patches), each ViT and decoder layer's linear weights (4 d^2 for query, key, value and
    output, 2 d f for the MLP), the visual projection (d_v * d) and the output layer (d * vocab);
    and in each layer the attention's two products, scores and scores x values: 4 n^2 d for a
    sequence of n, the full n x n even where a mask throws scores away. Not counted: biases, layer
    norms, softmax, activations, embedding lookups and the optimizer, each linear in tokens or
    parameters and together well under 1% at git-base size.
    """
    vision = config.vision_config
    n_img = gitmodel.num_image_tokens(config)
    d_v, f_v, d, f = vision.hidden_size, vision.intermediate_size, config.hidden_size, config.intermediate_size
    seq = n_img + caption_length

    vit_layer = 2 * n_img * (4 * d_v * d_v + 2 * d_v * f_v) + 4 * n_img * n_img * d_v
    per_image = (2 * (n_img - 1) * 3 * vision.patch_size ** 2 * d_v
                 + vision.num_hidden_layers * vit_layer
                 + 2 * n_img * d_v * d)
    decoder_layer = 2 * seq * (4 * d * d + 2 * d * f) + 4 * seq * seq * d
    per_row = config.num_hidden_layers * decoder_layer
    output_layer = 2 * predicted_tokens * d * config.vocab_size
    return 3 * (images * per_image + caption_rows * per_row + output_layer)


def table_peak(device_name):
    """(dense fp16 TFLOP/s, what it is) for a CUDA device name in PEAK_TFLOPS, else None."""
    for pattern, tflops, label in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return (tflops, label) if tflops else None
    return None


def measured_matmul_peak(device, dtype, n, reps=5):
    """FLOP/s of the fastest of `reps` n x n products in `dtype`, after two untimed ones."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def device_peak(device, device_name, args):
    """{'flops', 'source'}: --peak-tflops, the datasheet figure, or a measured matmul peak (fp16
    on a GPU; on a CPU bf16 where it has bf16 units, its fastest matrix path, else fp32: without
    them bf16 is emulated, many times slower, and would put the MFU of an fp32 step above 1)."""
    import torch


    if args.peak_tflops:
        return {"flops": args.peak_tflops * 1e12, "source": "--peak-tflops"}
    if device.type == "cuda":
        found = table_peak(device_name)
        if found:
            return {"flops": found[0] * 1e12, "source": f"{found[1]}, dense fp16 tensor cores, NVIDIA datasheet"}
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16 if runtime.cpu_has_bf16_units() else torch.float32
    n = args.matmul_size or (8192 if device.type == "cuda" else 4096)
    where = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return {"flops": measured_matmul_peak(device, dtype, n),
            "source": f"measured: torch.mm {str(dtype).split('.')[-1]} {n}x{n}{where}"}


# ---------------------------------------------------------------------------------------------
# Device helpers: one code path, the device a parameter

def sync(device):
    """Wait for the GPU's queued work, so that a clock read after it means it is done."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: restarts the process's peak resident set (VmHWM) from its current size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib(device):
    """CUDA: the most memory tensors held since the reset. CPU: the process's peak resident set
    since the reset (VmHWM), or since the process started where it cannot be reset."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def free_memory(device):
    """Let the last row's model go: torch.compile's caches hold on to the model they compiled."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The model and the data

def build_model(preset, work_dir):
    """The folder of a randomly initialised GIT of `preset`, built once and reused afterwards."""
    from captioning import synthetic
    from captioning.gitmodel import build_tiny_git

    folder = os.path.join(work_dir, f"gpu-model-{preset}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        captions = [synthetic.scene(0, i)[1] for i in range(300)]
        shutil.rmtree(folder + ".tmp", ignore_errors=True)
        build_tiny_git(captions, folder + ".tmp", preset=preset, seed=0)
        os.replace(folder + ".tmp", folder)
    return folder


def make_data(processor, batch_size, generate_batch_size, device):
    """(a training batch as train.py's collate makes it: pixels, captions right-padded to the
    longest, labels with padding as -100; pixel values for generate), both on `device`."""
    import torch

    from captioning import synthetic

    scenes = [synthetic.scene(1, i) for i in range(max(batch_size, generate_batch_size))]
    pixels = processor.image_processor([image for image, _ in scenes], return_tensors="pt")["pixel_values"]
    text = processor.tokenizer([caption for _, caption in scenes[:batch_size]], padding=True, return_tensors="pt")
    batch = {"pixel_values": pixels[:batch_size], "input_ids": text["input_ids"],
             "attention_mask": text["attention_mask"],
             "labels": text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)}
    # Channels-last images, as evaluation.to_device makes them: that call is then a no-op in the step.
    on_device = {k: v.to(device, memory_format=torch.channels_last) if v.ndim == 4 else v.to(device)
                 for k, v in batch.items()}
    generate_pixels = pixels[:generate_batch_size].to(device, memory_format=torch.channels_last)
    return on_device, generate_pixels


def fresh_model(folder, attention_name, device):
    """The model read back from disk with the given attention, on `device` as train.py puts it there."""
    import torch

    from captioning import attention
    from captioning.gitmodel import load_model

    model, _ = load_model(folder)
    attention.set_attention(model, attention_name)
    model.to(device, memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------------
# Measurements

def bench_train(folder, variant, precision, batch, device, args):
    """One row: warm-up steps, then timed steps of train.py's optimizer step on a fresh model."""
    import torch

    import train

    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return {"skipped": "this GPU has no bf16 tensor cores"}
    compiled = variant.endswith("+compile")
    # train.py's own defaults (learning rate, weight decay, clipping) and its --compile wrapping.
    train_args = flags.parse_args(["--precision", precision] + (["--compile"] if compiled else []))
    amp_dtype, use_scaler = runtime.pick_precision(precision, device)
    torch.manual_seed(0)
    model = fresh_model(folder, variant.split("+")[0], device)
    model.train()
    total_steps = args.warmup + args.steps
    optimizer, scheduler, scaler = training.make_optimizer(train_args, model, total_steps, device, use_scaler)
    state = types.SimpleNamespace(args=train_args, device=device, world=1, model=model,
                                  net=training.wrap_for_training(model, train_args, device, 1), amp_dtype=amp_dtype,
                                  optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    n_tokens = evaluation.num_targets(batch)

    free_memory(device)  # also: no compiled graphs or recompile counts left from an earlier row
    reset_peak_memory(device)
    warmup_seconds, skipped, losses = [], 0, []
    for _ in range(args.warmup):
        sync(device)
        t0 = time.perf_counter()
        train.optimizer_step(state, [batch], n_tokens)
        sync(device)
        warmup_seconds.append(time.perf_counter() - t0)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss, _, was_skipped = train.optimizer_step(state, [batch], n_tokens)
        skipped += bool(was_skipped)
        losses.append(loss)
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    row = {"seconds_per_step": seconds, "images_per_second": len(batch["input_ids"]) / seconds,
           "peak_memory_mib": peak_memory_mib(device), "warmup_seconds": warmup_seconds,
           "skipped_steps": skipped, "last_loss": float(losses[-1]),
           "scale": scaler.get_scale() if scaler.is_enabled() else None}
    if compiled:
        # The first steps' time beyond what they would take at the steady speed: compiling.
        row["compile_seconds"] = max(0.0, sum(warmup_seconds) - args.warmup * seconds)
    return row


def bench_generate(folder, variant, pixels, amp_dtype, device, args):
    """Images/s of model.generate over a batch, each caption written to --gen-max-length tokens."""
    import torch


    model = fresh_model(folder, variant, device)
    model.eval()
    free_memory(device)
    reset_peak_memory(device)

    def caption():
        # min_length = max_length: a random model would stop at an early [SEP] by chance, and
        # variants are compared on the same work (a trained model's shorter captions cost less).
        with torch.inference_mode(), runtime.autocast(device, amp_dtype):
            return model.generate(pixel_values=pixels, max_length=args.gen_max_length,
                                  min_length=args.gen_max_length, num_beams=1, do_sample=False)

    caption()  # first call: lazy initialisation, allocator growth
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.generate_reps):
        out = caption()
    sync(device)
    seconds = (time.perf_counter() - t0) / args.generate_reps
    return {"seconds_per_batch": seconds, "images_per_second": len(pixels) / seconds,
            "tokens_per_second": out.shape[0] * (out.shape[1] - 1) / seconds, "caption_tokens": out.shape[1],
            "peak_memory_mib": peak_memory_mib(device)}


def guarded(measure, *a):
    """A row's numbers, or the error that stopped it (a GPU out of memory, a failed compile): the
    other rows still run."""
    try:
        return measure(*a)
    except Exception as e:  # noqa: BLE001 - any failure becomes the row's result
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}


# ---------------------------------------------------------------------------------------------
# Report

def print_header(report):
    m, peak = report["model"], report["peak"]
    print(f"device: {report['device']} ({report['device_name']}) | torch {report['torch']} | "
          f"transformers {report['transformers']}")
    print(f"peak for MFU: {peak['flops'] / 1e12:.3g} TFLOP/s ({peak['source']})")
    print(f"model: {m['preset']}, {m['parameters'] / 1e6:.1f}M parameters, {m['image_tokens']} image tokens | "
          f"batch {report['batch_size']} images, captions padded to {m['caption_length']} tokens, "
          f"{m['predicted_tokens']} targets | {report['warmup']} warm-up + {report['steps']} timed steps")
    print(f"training FLOPs a step: {report['train_flops_per_step'] / 1e12:.4g} TFLOP (train_step_flops)", flush=True)


def print_train_table(report):
    memory = "peak CUDA MiB" if report["device"] == "cuda" else "peak RSS MiB"
    print(f"\n{'variant':<13} {'precision':<17} {'images/s':>9} {'s/step':>8} {memory:>13} {'TFLOP/s':>9} "
          f"{'MFU':>7} {'compile s':>9}")
    for variant, by_precision in report["train"].items():
        for precision, r in by_precision.items():
            label = "fp16 + GradScaler" if precision == "fp16" else precision
            if "images_per_second" not in r:
                print(f"{variant:<13} {label:<17} {r.get('error') or 'skipped: ' + r.get('skipped', '')}")
                continue
            compile_s = f"{r['compile_seconds']:.1f}" if "compile_seconds" in r else ""
            print(f"{variant:<13} {label:<17} {r['images_per_second']:>9.2f} {r['seconds_per_step']:>8.3f} "
                  f"{r['peak_memory_mib']:>13.0f} {r['achieved_tflops']:>9.3f} {100 * r['mfu']:>6.1f}% {compile_s:>9}")
    for variant, by_precision in report["train"].items():
        for precision, r in by_precision.items():
            if r.get("skipped_steps"):
                print(f"note: {variant} {precision}: the GradScaler skipped {r['skipped_steps']} of the "
                      f"{report['steps']} timed steps (inf/nan gradients), which then made no optimizer update")
    if report["device"] == "cpu":
        print("(CPU: peak RSS is the whole process's resident memory, not the model's alone)")


def print_generate_table(report):
    g = report["generate_settings"]
    memory = "peak CUDA MiB" if report["device"] == "cuda" else "peak RSS MiB"
    print(f"\ngenerate: batch {g['batch_size']}, max_length {g['max_length']} (every caption that long), "
          f"{g['precision']}, {g['reps']} timed call(s)")
    print(f"{'variant':<13} {'images/s':>9} {'s/batch':>8} {'tokens/s':>9} {memory:>13}")
    for variant, r in report["generate"].items():
        if "error" in r:
            print(f"{variant:<13} {r['error']}")
            continue
        print(f"{variant:<13} {r['images_per_second']:>9.2f} {r['seconds_per_batch']:>8.3f} "
              f"{r['tokens_per_second']:>9.1f} {r['peak_memory_mib']:>13.0f}")


def write_json(report, path):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never wait on the Hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Compiled kernels from an earlier run would make the compile time that of a cache lookup:
    # inductor and Triton get an empty cache of their own (set before torch reads them).
    compile_cache = tempfile.mkdtemp(prefix="bench-gpu-compile-cache-")
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=compile_cache, TRITON_CACHE_DIR=os.path.join(compile_cache, "triton"))
    try:
        return measure_and_report(args, argv)
    finally:
        shutil.rmtree(compile_cache, ignore_errors=True)


def measure_and_report(args, argv):
    import torch
    import transformers

    from captioning import cli
    from captioning.gitmodel import load_model

    try:
        device = runtime.pick_device(args.device)
    except ValueError as e:
        cli.fail(str(e))
    training.quiet_libraries()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    os.makedirs(args.work_dir, exist_ok=True)
    folder = build_model(args.model, args.work_dir)
    model, processor = load_model(folder)
    batch, generate_pixels = make_data(processor, args.batch_size, args.generate_batch_size, device)
    config = model.config
    predicted = evaluation.num_targets(batch)
    flops = train_step_flops(config, args.batch_size, args.batch_size, batch["input_ids"].shape[1], predicted)
    report = {
        "command": shlex.join([sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type, "device_name": device_name, "torch": torch.__version__,
        "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "model": {"preset": args.model, "parameters": sum(p.numel() for p in model.parameters()),
                  "image_tokens": gitmodel.num_image_tokens(config), "caption_length": batch["input_ids"].shape[1],
                  "predicted_tokens": predicted},
        "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps,
        "train_flops_per_step": flops, "peak": device_peak(device, device_name, args),
        "train": {}, "generate": {},
    }
    del model
    print_header(report)
    for variant in args.variants:
        report["train"][variant] = {}
        for precision in args.precisions:
            print(f"training: {variant}, {precision} ...", flush=True)
            r = guarded(bench_train, folder, variant, precision, batch, device, args)
            if "seconds_per_step" in r:
                r["achieved_tflops"] = flops / r["seconds_per_step"] / 1e12
                r["mfu"] = flops / r["seconds_per_step"] / report["peak"]["flops"]
            report["train"][variant][precision] = r
            free_memory(device)
            write_json(report, args.json)  # what is done so far survives a crash in a later row
    if not args.skip_generate:
        amp_dtype, _ = runtime.pick_precision(args.generate_precision, device)
        report["generate_settings"] = {"batch_size": args.generate_batch_size, "max_length": args.gen_max_length,
                                       "precision": str(amp_dtype or torch.float32).split(".")[-1],
                                       "reps": args.generate_reps}
        for variant in ("eager", "sdpa"):
            print(f"generate: {variant} ...", flush=True)
            report["generate"][variant] = guarded(bench_generate, folder, variant, generate_pixels, amp_dtype,
                                                  device, args)
            free_memory(device)
    write_json(report, args.json)
    print_train_table(report)
    if not args.skip_generate:
        print_generate_table(report)
    if args.json:
        print(f"\nnumbers in {args.json}")
    rows = [r for v in report["train"].values() for r in v.values()] + list(report["generate"].values())
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
