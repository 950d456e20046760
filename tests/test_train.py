import glob
import http.server
import threading
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoProcessor

from captioning import batches, captioner, decode, evaluation, flags, gitmodel, measures, sources, synthetic, upload
import train
from conftest import ROOT, TRAINED_RUN, Child, in_process


def run_train(out, *extra, model="tiny", size=160):
    argv = ["--dataset", "synthetic", "--synthetic-size", str(size), "--model", model, "--output-dir", str(out),
            "--batch-size", "16", "--grad-accum", "1", "--learning-rate", "1e-3", "--precision", "fp32",
            "--logging-steps", "5", "--num-examples", "2", *extra]
    return train.main(argv)


def history(out, step):
    with open(os.path.join(out, f"checkpoint-{step}", "trainer_state.json")) as f:
        return json.load(f)["history"]


def evaluations(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def lowest_wer(evaluations):
    """The evaluation best/ must hold: the lowest WER, the earlier of equal ones (only a lower score replaces best/)."""
    return min(evaluations, key=lambda h: (h["wer"], h["step"]))


LAST = 500  # the trained_run fixture: 500 steps, evaluated every 100, saved every 250


def test_eval_wer_falls_during_a_short_run(trained_run):
    logged = evaluations(trained_run)
    wers = [h["wer"] for h in logged]
    assert [h["step"] for h in logged] == [100, 200, 300, 400, 500]
    assert wers[-1] < wers[0] - 0.1, wers
    assert sorted(os.listdir(trained_run)) == [".lock", "best", "checkpoint-250", "checkpoint-500", "curves.png",
                                               "init-model", "metrics.jsonl", "runs", "training_args.json"]
    assert logged == history(trained_run, LAST)  # the checkpoint keeps the same record as metrics.jsonl
    # The record is true to the model: best/ is the evaluation with the lowest WER, and the captions
    # infer.py writes with it for the held-out scenes score that WER again (at the run's precision;
    # the tolerance, about 6 of the 1,139 reference words, allows for the two image preprocessings).
    best = lowest_wer(logged)
    state = json.load(open(os.path.join(trained_run, f"checkpoint-{LAST}", "trainer_state.json")))
    assert state["best"]["step"] == best["step"]
    args = flags.parse_args([*TRAINED_RUN, "--output-dir", trained_run])
    images, references = sources.read_rows(sources.load_tables(args)[1], "image", "text", "eval")
    captions = captioner.caption(images, model=os.path.join(trained_run, "best"), precision=args.precision, batch_size=32)
    assert len(captions) == 100 and measures.caption_scores(captions, references)["wer"] == \
        pytest.approx(best["wer"], abs=0.005)
    curves = Image.open(os.path.join(trained_run, "curves.png"))
    assert curves.size == (1000, 350) and np.asarray(curves.convert("L")).std() > 5


def test_model_card_has_hub_metadata_and_a_usage_snippet_that_runs(trained_run, tmp_path):
    best = os.path.join(trained_run, "best")
    card = open(os.path.join(best, "README.md")).read()
    header, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    for line in ("library_name: transformers", "pipeline_tag: image-to-text", "- wer"):
        assert line in header.splitlines()
    best_wer = lowest_wer(evaluations(trained_run))["wer"]
    assert f"value: {best_wer:.4f}" in header
    assert os.path.isfile(os.path.join(trained_run, f"checkpoint-{LAST}", "README.md"))
    snippet = body.split("```python\n")[1].split("```")[0]
    synthetic.scene(5, 0)[0].save(tmp_path / "image.png")
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    expected = in_process("infer", "--model", best, "--precision", "fp32", "image.png", cwd=tmp_path).stdout
    assert proc.stdout.strip() == expected.split("\t")[1].strip()


def test_best_model_loads_with_from_pretrained_and_infer_gives_its_captions(trained_run, tmp_path):
    best = os.path.join(trained_run, "best")
    model = AutoModelForCausalLM.from_pretrained(best).eval()
    processor = AutoProcessor.from_pretrained(best)
    paths = []
    for i in range(3):
        img, _ = synthetic.scene(77, i)
        paths.append(str(tmp_path / f"scene{i}.png"))
        img.save(paths[-1])
    pixels = processor(images=[decode.open_image(p) for p in paths], return_tensors="pt").pixel_values
    expected = processor.batch_decode(model.generate(pixel_values=pixels, max_length=50), skip_special_tokens=True)
    assert all(expected)

    (tmp_path / "notes.png").write_text("this is text, not a PNG")
    missing = str(tmp_path / "missing.png")
    proc = in_process("infer", "--model", best, "--precision", "fp32", paths[0], missing, str(tmp_path / "notes.png"),
                      paths[1], paths[2], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"{p}\t{c}" for p, c in zip(paths, expected)]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 2 and "missing.png: no such file" in errors[0] and "notes.png: not a readable image" in errors[1]


def test_tensorboard_holds_the_scalars_and_example_images(trained_run):
    events = EventAccumulator(os.path.join(trained_run, "runs"))
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/captions_per_second", "train/images_per_second",
                "eval/loss", "eval/wer", "eval/cer", "eval/bleu4", "eval/rouge_l", "eval/cider_d"):
        assert tag in tags["scalars"], tag
    logged = evaluations(trained_run)
    assert [e.step for e in events.Scalars("eval/wer")] == [h["step"] for h in logged] == [100, 200, 300, 400, 500]
    assert [e.value for e in events.Scalars("eval/wer")] == pytest.approx([h["wer"] for h in logged], rel=1e-6)
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([h["eval_loss"] for h in logged], rel=1e-6)
    assert [e.value for e in events.Scalars("eval/distinct_captions")] == pytest.approx(
        [h["distinct_captions"] for h in logged], rel=1e-6)
    assert "eval/example_0" in tags["images"]


def test_train_py_warns_of_collapse_at_the_evaluations_that_collapsed(trained_run):
    """The tiny GIT writes one caption for every image at step 100 (conftest's TRAINED_RUN) and looks at
    the images by step 500: the first evaluation's lines end in the warning, the last one's do not."""
    said = open(trained_run + ".stdout").read()
    blocks = {int(b.split(":", 1)[0]): b for b in said.split("eval step ")[1:]}
    assert sorted(blocks) == [100, 200, 300, 400, 500]
    warned = sorted(step for step, block in blocks.items() if "\nwarning: the model may have collapsed: " in block)
    logged = {h["step"]: h for h in evaluations(trained_run)}
    assert 100 in warned and 500 not in warned, said
    # Warned exactly where the predictions were least varied (eval/distinct_captions).
    lowest_unwarned = min(logged[step]["distinct_captions"] for step in blocks if step not in warned)
    assert all(logged[step]["distinct_captions"] < lowest_unwarned for step in warned)


def test_rotation_keeps_the_newest_and_the_best(tmp_path, tiny_model_dir):
    run_train(tmp_path, "--max-steps", "12", "--eval-steps", "3", "--save-steps", "3", "--save-total-limit", "1",
              model=tiny_model_dir)
    logged = evaluations(tmp_path)
    assert [h["step"] for h in logged] == [3, 6, 9, 12]
    best_step = lowest_wer(logged)["step"]
    assert best_step < 12  # else this run would not show an older best being kept
    assert json.load(open(tmp_path / "checkpoint-12" / "trainer_state.json"))["best"]["step"] == best_step
    kept = sorted(int(p.rsplit("-", 1)[1]) for p in glob.glob(str(tmp_path / "checkpoint-*")))
    assert kept == sorted({12, best_step})


@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_continues_exactly_where_the_checkpoint_left_off(tmp_path, tiny_model_dir, workers):
    # 160 scenes -> 144 for training -> 9 steps an epoch: step 4 is mid-epoch, step 12 in the next one.
    args = ["--max-steps", "12", "--save-steps", "4", "--eval-steps", "100", "--num-workers", workers]
    run_train(tmp_path / "full", *args, model=tiny_model_dir)
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    run_train(tmp_path / "resumed", *args, "--resume", model=tiny_model_dir)
    a = load_file(str(tmp_path / "full" / "checkpoint-12" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint-12" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    start = load_file(str(tmp_path / "full" / "checkpoint-4" / "model.safetensors"))
    assert any(not torch.equal(start[k], a[k]) for k in a)  # it did train after step 4

    # The same folder again without --resume would mix two runs: refused.
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "full", *args, model=tiny_model_dir)
    assert e.value.code == 2


def test_fp16_autocast_with_grad_scaler_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
    # What each Linear layer of the model train.py loads puts out, in training and in evaluation.
    outputs = {True: {}, False: {}}
    real_load = gitmodel.load_model

    def load_and_watch(*args, **kwargs):
        git, processor = real_load(*args, **kwargs)
        for name, layer in git.named_modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(lambda module, inputs, output, name=name:
                                            outputs[module.training].setdefault(name, set()).add(output.dtype))
        return git, processor

    monkeypatch.setattr(gitmodel, "load_model", load_and_watch)
    # Batches of 4: a float16 backward pass on a CPU without float16 units costs some 15 times a float32 one.
    run_train(tmp_path, "--max-steps", "4", "--save-steps", "4", "--eval-steps", "4", "--precision", "fp16",
              "--batch-size", "4", model=tiny_model_dir)
    linears = sum(isinstance(m, torch.nn.Linear) for m in AutoModelForCausalLM.from_pretrained(tiny_model_dir).modules())
    assert len(outputs[True]) == linears and all(d == {torch.float16} for d in outputs[True].values()), outputs[True]
    assert outputs[False] and all(d == {torch.float16} for d in outputs[False].values()), outputs[False]

    state = torch.load(tmp_path / "checkpoint-4" / "training_state.pt", weights_only=True)
    # No step overflowed: the scale is still its initial 2 ** 16, and the scaler counted 4 good steps
    # towards its next growth (a disabled GradScaler saves an empty state).
    assert state["skipped_steps"] == 0
    assert state["scaler"]["scale"] == 65536.0 and state["scaler"]["_growth_tracker"] == 4
    assert all(torch.isfinite(torch.tensor(h["eval_loss"])) for h in state["history"])
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in after.values())  # fp32 master weights
    assert any(not torch.equal(before[k], after[k]) for k in before)


def batch_of(processor, captions, first=0):
    images = [synthetic.scene(0, first + i)[0] for i in range(len(captions))]
    ds = batches.build_dataset(images, [[c] for c in captions], processor, max_text_length=40)
    return batches.collate([ds[i] for i in range(len(ds))], processor.tokenizer.pad_token_id)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_matches_git_and_accumulation_equals_one_big_batch(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # eval: no dropout, exact comparison
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    captions = ["a red circle", "a small blue square at the top and a large red circle on the left",
                "a green triangle in the center", "a large orange circle"]
    big = batch_of(processor, captions)
    first, second = batch_of(processor, captions[:2]), batch_of(processor, captions[2:], first=2)

    # Our text-only logits give GIT's own loss (which projects every position, image tokens too).
    n = evaluation.num_targets(big)
    git_loss = model(**{k: big[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}).loss
    torch.testing.assert_close(evaluation.caption_loss(model, big, n), git_loss)

    evaluation.caption_loss(model, big, n).backward()
    expected = grads(model)
    model.zero_grad()
    for micro in (first, second):
        evaluation.caption_loss(model, micro, n).backward()
    accumulated = grads(model)
    model.zero_grad()
    for k in expected:
        torch.testing.assert_close(accumulated[k], expected[k], atol=1e-6, rtol=1e-5, msg=lambda m: k + m)

    # Averaging each micro-batch and then the two (what naive accumulation does) weighs tokens unequally.
    for micro in (first, second):
        (evaluation.caption_loss(model, micro, evaluation.num_targets(micro)) / 2).backward()
    naive = grads(model)
    assert any(not torch.allclose(naive[k], expected[k], atol=1e-6, rtol=1e-5) for k in expected)


def test_label_smoothing_is_f_cross_entropy_s_on_the_caption_positions(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    batch = batch_of(processor, ["a red circle", "a small blue square at the top and a large red circle"])
    n = evaluation.num_targets(batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
        images = logits.shape[1] - batch["input_ids"].shape[1]
        # caption position j predicts token j + 1; padding's targets are -100 and count for nothing
        expected = torch.nn.functional.cross_entropy(logits[:, images:-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                     label_smoothing=0.1, reduction="sum") / n
        for static in (False, True):
            smoothed = evaluation.caption_loss(model, batch, n, static=static, label_smoothing=0.1)
            torch.testing.assert_close(smoothed, expected, atol=1e-5, rtol=1e-6)
        assert evaluation.caption_loss(model, batch, n) < expected  # smoothing adds the cost of the spread
    args = flags.parse_args(["--label-smoothing", "0.1"])
    assert args.label_smoothing == 0.1 and flags.parse_args([]).label_smoothing == 0.0
    assert "label_smoothing" in flags.FIXED_ON_RESUME and "label_smoothing" in flags.CARD_FLAGS


def test_two_accumulated_micro_batches_train_as_one_batch_twice_the_size(tmp_path, no_dropout_model):
    # 167 scenes -> 150 to train on: an epoch is 9 steps of 16 and a 10th of 6 (one short micro-batch
    # when accumulating), and step 12 is in the second epoch. Both runs draw the samples in the same
    # order: the sampler shuffles samples, by seed and epoch, whatever the batch size.
    common = ["--max-steps", "12", "--save-steps", "12", "--eval-steps", "12", "--logging-steps", "1"]
    run_train(tmp_path / "accumulated", *common, "--batch-size", "8", "--grad-accum", "2", model=no_dropout_model,
              size=167)
    run_train(tmp_path / "one", *common, "--batch-size", "16", "--grad-accum", "1", model=no_dropout_model, size=167)
    a, b = (torch.load(tmp_path / run / "checkpoint-12" / "training_state.pt", weights_only=True)
            for run in ("accumulated", "one"))
    assert a["epoch"] == b["epoch"] == 1 and a["samples_done"] == b["samples_done"] == 32  # 4 x 8 and 2 x 16
    assert [s for s, _ in a["train_log"]] == [s for s, _ in b["train_log"]] == list(range(1, 13))
    torch.testing.assert_close([v for _, v in a["train_log"]], [v for _, v in b["train_log"]], atol=1e-5, rtol=0)
    start = load_file(os.path.join(no_dropout_model, "model.safetensors"))
    accumulated, one = (load_file(str(tmp_path / run / "checkpoint-12" / "model.safetensors"))
                        for run in ("accumulated", "one"))
    assert accumulated.keys() == one.keys() == start.keys()
    for k in one:
        torch.testing.assert_close(accumulated[k], one[k], atol=1e-5, rtol=0, msg=lambda m: k + m)
    # They trained: the weights moved a hundred times further than the two runs are apart.
    assert max(float((one[k] - start[k]).abs().max()) for k in one) > 1e-3


def test_bad_flags_and_missing_model_are_one_line_errors(tmp_path):
    for args, needles in [(["--batch-size", "0"], ("argument --batch-size", "must be positive, not 0")),
                          (["--learning-rate", "-1"], ("argument --learning-rate", "must be positive, not -1")),
                          (["--test-size", "1.5"], ("argument --test-size", "must be between 0 and 1")),
                          (["--num-workers", "-1"], ("argument --num-workers", "must be non-negative")),
                          (["--eval-steps", "ten"], ("argument --eval-steps", "'ten' is not an integer")),
                          (["--precision", "fp8"], ("--precision",)),
                          (["--model", "./no-such-model", "--dataset", "synthetic"], ("no-such-model",)),
                          (["--dataset", str(tmp_path / "absent") + "/"], ("absent",)),
                          (["--resume"], ("no complete checkpoint",))] + \
            ([] if torch.cuda.is_available() else [(["--device", "cuda", "--model", "tiny", "--dataset", "synthetic"],
                                                    ("--device cuda", "no CUDA GPU"))]):
        proc = in_process("train", *args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and all(n in lines[0] for n in needles), (args, proc.stderr)
        assert "Traceback" not in proc.stderr


class Refuse(http.server.BaseHTTPRequestHandler):
    """A stand-in Hub that answers every request 401, as the real one does to a bad token."""
    def handle_one_request(self):
        try:
            super().handle_one_request()
        except ConnectionError:
            pass

    def _refuse(self):
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *a):
        pass


def test_push_to_hub_failure_is_one_line_and_keeps_the_results(tmp_path, tiny_model_dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_TOKEN="hf_not_a_real_token",
               HF_HOME=str(tmp_path / "hf-home"))
    out = tmp_path / "run"
    try:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "synthetic",
                               "--synthetic-size", "40", "--model", tiny_model_dir, "--output-dir", str(out),
                               "--max-steps", "2", "--batch-size", "8", "--precision", "fp32", "--push-to-hub",
                               "--hub-model-id", "someone/tiny-captioner"], capture_output=True, text=True, env=env,
                              timeout=300)
    finally:
        server.shutdown()
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not upload" in errors[0] and "someone/tiny-captioner" in errors[0]
    assert "Traceback" not in proc.stderr
    assert os.path.isfile(out / "best" / "model.safetensors") and os.path.isdir(out / "checkpoint-2")
    assert "from_pretrained('someone/tiny-captioner')" in (out / "best" / "README.md").read_text()


def test_tensorboard_server_shows_the_run(trained_run):
    """The real tensorboard server, on a loopback port, serves the run's scalars, images and captions."""
    import queue
    import re
    import urllib.request

    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "tensorboard"), "--logdir",
                               os.path.join(trained_run, "runs"), "--host", "127.0.0.1", "--port", "0",
                               "--load_fast=false"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in server.stdout], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=120)  # raises queue.Empty if the server never says where it listens
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = found and found.group(1)

        def get(path):
            with urllib.request.urlopen(url + path, timeout=30) as response:
                return json.loads(response.read())

        scalars = get("/data/plugin/scalars/tags")["."]
        assert {"train/loss", "train/lr", "eval/wer", "eval/loss"} <= set(scalars)
        assert "eval/example_0" in get("/data/plugin/images/tags")["."]
        texts = get("/data/plugin/text/text?run=.&tag=eval/captions/text_summary")
        assert [t["step"] for t in texts] == [100, 200, 300, 400, 500]
        generated = re.findall(r"<strong>gen:</strong> ([^<]+)<br>", texts[-1]["text"])
        assert generated and all(g.strip().startswith("a ") for g in generated), texts[-1]["text"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_push_to_hub_uploads_best_with_its_card(tmp_path, tiny_model_dir, monkeypatch):
    """The upload itself, with huggingface_hub's HfApi replaced by a recorder (no network here)."""
    import huggingface_hub


    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, exist_ok=False, **kw):
            calls.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message=None, **kw):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), commit_message))

    monkeypatch.setattr(upload, "push_problem", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    run_train(tmp_path, "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2", "--push-to-hub",
              "--hub-model-id", "someone/captioner", "--hub-strategy", "every_save", model=tiny_model_dir)
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert len(uploads) == 3  # after each of the two saves, and at the end
    assert all(c[1] == "someone/captioner" and "README.md" in c[2] and "model.safetensors" in c[2] for c in uploads)
    assert calls[0] == ("create_repo", "someone/captioner", True)
    assert "from_pretrained('someone/captioner')" in (tmp_path / "best" / "README.md").read_text()


def test_bad_rows_are_skipped_and_listed_or_stop_the_run(tmp_path, tiny_model_dir):
    folder = tmp_path / "scenes"
    sources.write_imagefolder(synthetic.dataset(30, seed=4), str(folder))
    (folder / "000003.png").write_text("not a png")
    (folder / "000007.png").write_bytes(b"")
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    rows[12]["text"] = "   "
    with open(folder / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    out = tmp_path / "run"
    run_train(out, "--dataset", str(folder), "--max-steps", "2", model=tiny_model_dir)
    listed = (out / "skipped.txt").read_text().splitlines()
    assert len(listed) == 3
    assert sorted(name for line in listed for name in ("000003.png", "000007.png", "000012.png") if name in line) == \
        ["000003.png", "000007.png", "000012.png"]
    state = json.load(open(out / "checkpoint-2" / "trainer_state.json"))
    assert state["step"] == 2

    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "strict", "--dataset", str(folder), "--max-steps", "2", "--on-bad-sample", "error",
                  model=tiny_model_dir)
    assert e.value.code == 2


def poison(monkeypatch, bad_calls):
    """Make the training loss NaN on the given (1-based) training calls of caption_loss."""
    real, calls = evaluation.caption_loss, [0]

    def loss(model, batch, n, **kwargs):
        value = real(model, batch, n, **kwargs)
        if model.training:
            calls[0] += 1
            if calls[0] in bad_calls:
                return value * float("nan")
        return value

    monkeypatch.setattr(evaluation, "caption_loss", loss)


def test_non_finite_steps_are_skipped_then_stop_the_run_in_fp32(tmp_path, tiny_model_dir, monkeypatch):
    poison(monkeypatch, {2})
    run_train(tmp_path / "once", "--max-steps", "4", "--save-steps", "4", "--eval-steps", "4", model=tiny_model_dir)
    assert json.load(open(tmp_path / "once" / "checkpoint-4" / "trainer_state.json"))["skipped_steps"] == 1

    poison(monkeypatch, set(range(3, 100)))
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "many", "--max-steps", "10", "--save-steps", "2", "--eval-steps", "100",
                  "--max-bad-steps", "3", model=tiny_model_dir)
    assert e.value.code == 2
    # Steps 3-5 were bad: the run stopped at step 5; the save at step 4 holds step 2's weights, unharmed.
    assert not os.path.exists(tmp_path / "many" / "checkpoint-6")
    good = load_file(str(tmp_path / "many" / "checkpoint-2" / "model.safetensors"))
    after = load_file(str(tmp_path / "many" / "checkpoint-4" / "model.safetensors"))
    assert all(torch.isfinite(w).all() and torch.equal(w, after[k]) for k, w in good.items())


def test_fp16_scaler_skips_a_non_finite_step_and_counts_it(tmp_path, tiny_model_dir, monkeypatch):
    poison(monkeypatch, {2})
    run_train(tmp_path, "--max-steps", "3", "--save-steps", "1", "--eval-steps", "3", "--precision", "fp16",
              "--batch-size", "4", model=tiny_model_dir)
    states = {step: torch.load(tmp_path / f"checkpoint-{step}" / "training_state.pt", weights_only=True)
              for step in (1, 2, 3)}
    assert [states[step]["skipped_steps"] for step in (1, 2, 3)] == [0, 1, 1]
    # The NaN step halves the scale and restarts the count of good steps towards growing it.
    assert [(states[step]["scaler"]["scale"], states[step]["scaler"]["_growth_tracker"]) for step in (1, 2, 3)] == \
        [(65536.0, 1), (32768.0, 0), (32768.0, 1)]
    # The skipped step left the weights and AdamW's step count as they were; step 3 moved them again.
    weights = {step: load_file(str(tmp_path / f"checkpoint-{step}" / "model.safetensors")) for step in (1, 2, 3)}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert [max(int(s["step"]) for s in states[step]["optimizer"]["state"].values()) for step in (1, 2, 3)] == [1, 1, 2]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_run_with_a_checkpoint_to_resume_from(tmp_path, tiny_model_dir, sig):
    out = tmp_path / "run"
    with Child([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "synthetic",
                "--synthetic-size", "80", "--model", tiny_model_dir, "--output-dir", str(out),
                "--max-steps", "100000", "--batch-size", "8", "--precision", "fp32",
                "--logging-steps", "1", "--save-steps", "100000", "--eval-steps", "100000"],
               env={**os.environ, "HF_HUB_OFFLINE": "1"}) as child:
        child.stdout.read(timeout=300, until=lambda line: line.startswith("step 3/"))  # training is under way
        child.proc.send_signal(sig)
        rest = "".join(child.stdout.read(timeout=300))
        errors = "".join(child.stderr.read(timeout=60))
        assert child.proc.wait(timeout=60) == 0, errors
    last = rest.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {sig.name} at step") and "--resume" in last
    stopped_at = int(last.split(" at step ")[1].split(";")[0])
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{stopped_at}"]
    state = torch.load(out / f"checkpoint-{stopped_at}" / "training_state.pt", weights_only=True)
    assert state["step"] == stopped_at


def test_a_failed_save_stops_in_one_line_and_keeps_earlier_checkpoints(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import errno

    from captioning import checkpoint

    real_save, calls = checkpoint.torch.save, [0]

    def save(obj, path):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--max-steps", "6", "--save-steps", "2", "--eval-steps", "100", model=tiny_model_dir)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint-4" in err[0] and "No space left on device" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / "training_state.pt").is_file()
