"""Does SCST improve held-out captions over more cross-entropy? Two offline fixtures, two seeds.

    python bench/scst_quality.py [--work /tmp/scst-quality] [--json bench/scst-quality.json]

For each fixture: a small GIT (--model tiny) is trained with cross-entropy (the CE start), then
continued from that one checkpoint for --steps more optimizer steps twice per seed: with more
cross-entropy, and with --objective scst, at the same learning rate, batch of images and seed.
Each result is the model after its last step (not best/: the held-out split is not used to pick
anything), scored on the held-out split by metrics.py --model (CIDEr-D, BLEU-4, WER), and the
SCST runs' mean training reward per logged window is read from their log lines.

The fixtures are drawn scenes (captioning/synthetic.py), five references per image:
- consensus: the five wordings synthetic.retellings writes ("a red circle on the left", "there
  is a red circle on the left", ...). The most common wording is the scene's own caption, and
  cross-entropy's greedy caption already is it: what is left to gain is what the encoder misreads.
- split-detail: two-object scenes. Two references name only the first object; three name both,
  each joining them with its own word ("and", "beside", "next to"). All five agree on the first
  object; three of five agree on the second, but split three ways on the word that leads to it.
  After the first object, cross-entropy learns end-of-caption at 2/5 and each joining word at 1/5,
  so its greedy caption ends there, while the references' consensus (CIDEr-D) names both objects.
  This stands for what real references do: annotators agree on a detail but phrase it differently,
  and a maximum-likelihood decoder drops what no single phrasing carries (the short, generic
  captions cross-entropy models are known for).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from captioning import synthetic  # noqa: E402

LINKS = ("and", "beside", "next to")
FIXTURES = ("consensus", "split-detail")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/scst-quality", help="fixtures and runs (reused when already there)")
    p.add_argument("--fixtures", nargs="+", choices=FIXTURES, default=list(FIXTURES))
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--ce-epochs", type=int, default=6, help="the cross-entropy start")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each continuation")
    p.add_argument("--learning-rate", type=float, default=3e-5, help="both continuations")
    p.add_argument("--batch-size", type=int, default=16, help="images per continuation step")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def references(fixture, caption):
    if fixture == "consensus":
        return synthetic.retellings(caption, 5)
    first, second = caption.split(" and ")
    return [first, first, *(f"{first} {link} {second}" for link in LINKS)]


def write_fixture(folder, fixture, train_size, test_size):
    """An imagefolder with train/ and test/ splits, five references per image in metadata.jsonl."""
    if os.path.exists(os.path.join(folder, "test", "metadata.jsonl")):
        return
    index = 0
    for split, size, seed in (("train", train_size, 101), ("test", test_size, 202)):
        os.makedirs(os.path.join(folder, split), exist_ok=True)
        rows = []
        while len(rows) < size:
            image, caption = synthetic.scene(seed, index)
            index += 1
            if fixture == "split-detail" and " and " not in caption:
                continue
            name = f"{len(rows):06d}.png"
            image.save(os.path.join(folder, split, name))
            rows.append(json.dumps({"file_name": name, "text": references(fixture, caption)}))
        with open(os.path.join(folder, split, "metadata.jsonl"), "w") as f:
            f.write("\n".join(rows) + "\n")


def run(cmd, log):
    """Run a command, its output to log; fail loudly with the log's tail."""
    t0 = time.time()
    with open(log, "w") as f:
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if status:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f"{' '.join(cmd)} failed ({status}):\n{tail}")
    return time.time() - t0


def train(out, args, *flags):
    if not os.path.exists(os.path.join(out, "done")):
        seconds = run([sys.executable, "train.py", "--output-dir", out, "--overwrite-output-dir",
                       "--logging-steps", "10", "--num-examples", "0", *flags], out + ".log")
        with open(os.path.join(out, "done"), "w") as f:
            f.write(f"{seconds:.0f}\n")
    with open(os.path.join(out, "done")) as f:
        return float(f.read())


def last_checkpoint(out):
    steps = [int(m.group(1)) for m in map(re.compile(r"checkpoint-(\d+)$").match, os.listdir(out)) if m]
    return os.path.join(out, f"checkpoint-{max(steps)}")


def held_out(model, dataset, out):
    """metrics.py --model on the held-out split: scores, and the captions (in image order)."""
    predictions = out + ".predictions.jsonl"
    proc = subprocess.run([sys.executable, "metrics.py", "--model", model, "--dataset", dataset, "--split", "eval",
                           "--json", "--output", predictions], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"metrics.py --model {model} failed: {proc.stderr[-2000:]}")
    with open(predictions) as f:
        captions = [json.loads(line)["caption"] for line in f]
    return json.loads(proc.stdout), captions


def rewards(log):
    with open(log) as f:
        return [float(x) for x in re.findall(r"scst reward ([0-9.]+)", f.read())]


def fixture_results(fixture, args):
    folder = os.path.join(args.work, fixture)
    write_fixture(folder, fixture, args.train_size, args.test_size)
    start_dir = os.path.join(args.work, f"{fixture}-ce-start")
    start_seconds = train(start_dir, args, "--model", "tiny", "--dataset", folder, "--epochs", str(args.ce_epochs),
                          "--learning-rate", "3e-4", "--warmup-steps", "30", "--batch-size", "32",
                          "--eval-steps", "100000", "--save-steps", "100000")
    start = last_checkpoint(start_dir)
    start_scores, start_captions = held_out(start, folder, start_dir)
    result = {"ce_start": {"model": start, "seconds": start_seconds, "held_out": start_scores}, "runs": []}
    for seed in args.seeds:
        for objective in ("cross-entropy", "scst"):
            out = os.path.join(args.work, f"{fixture}-{objective}-seed{seed}")
            seconds = train(out, args, "--model", start, "--dataset", folder, "--objective", objective,
                            "--max-steps", str(args.steps), "--learning-rate", str(args.learning_rate),
                            "--warmup-steps", "0", "--batch-size", str(args.batch_size), "--seed", str(seed),
                            "--eval-steps", str(args.steps), "--save-steps", str(args.steps))
            scores, captions = held_out(last_checkpoint(out), folder, out)
            entry = {"objective": objective, "seed": seed, "seconds": seconds, "held_out": scores,
                     "captions": captions[:4]}
            if objective == "scst":
                entry["train_reward_by_window"] = rewards(out + ".log")
            result["runs"].append(entry)
            print(f"{fixture} {objective} seed {seed}: cider_d {scores['cider_d']:.4f} bleu4 {scores['bleu4']:.4f} "
                  f"wer {scores['wer']:.4f} ({seconds:.0f}s)", flush=True)
    with open(os.path.join(folder, "test", "metadata.jsonl")) as f:
        refs = [json.loads(line)["text"] for line in f][:4]
    result["examples"] = {"references": refs, "ce_start": start_captions[:4]}
    return result


def main():
    args = parse_args()
    os.makedirs(args.work, exist_ok=True)
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("work", "json")}}
    for fixture in args.fixtures:
        results[fixture] = fixture_results(fixture, args)
        s = results[fixture]["ce_start"]["held_out"]
        print(f"{fixture} CE start: cider_d {s['cider_d']:.4f} bleu4 {s['bleu4']:.4f} wer {s['wer']:.4f}", flush=True)
        if args.json:  # after each fixture: a run stopped later keeps what is done
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
