import csv
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

import infer
import synthetic
from conftest import ROOT


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Good images in several formats and modes, some in a sub-folder, plus bad files."""
    root = tmp_path_factory.mktemp("pictures")
    scenes = [synthetic.scene(11, i)[0] for i in range(6)]
    scenes[0].save(root / "a.png")
    scenes[1].convert("L").save(root / "b.jpg")
    scenes[2].convert("P").save(root / "c.png")
    scenes[3].convert("CMYK").save(root / "d.jpg")
    rgba = scenes[4].convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "e.png")
    Image.fromarray((np.asarray(scenes[5].convert("L"), dtype=np.uint16) * 257)).save(root / "f16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    scenes[0].resize((128, 96)).save(root / "g_exif.jpg", exif=exif.tobytes())
    os.makedirs(root / "sub")
    scenes[4].save(root / "sub" / "h.png")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (4000, 6000, 3), dtype=np.uint8))
    big.save(root / "sub" / "large.jpg", quality=70)
    bad = tmp_path_factory.mktemp("bad")
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image at all")
    buf = io.BytesIO()
    scenes[5].save(buf, format="JPEG")
    (bad / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # A PNG header that claims 30000 x 30000 pixels: PIL refuses it as a decompression bomb on open.
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    (bad / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) +
                                   chunk(b"IEND", b""))
    return root, bad


def test_folders_expand_sorted_and_recursive_on_request(pictures):
    root, _ = pictures
    flat = infer.expand_inputs([str(root)])
    names = ["a.png", "b.jpg", "c.png", "d.jpg", "e.png", "f16.png", "g_exif.jpg"]
    assert [os.path.basename(p) for p in flat] == names
    deep = infer.expand_inputs([str(root), str(root / "a.png")], recursive=True)
    assert [os.path.relpath(p, root) for p in deep] == names + ["sub/h.png", "sub/large.jpg", "a.png"]


def test_cli_captions_good_inputs_and_reports_each_bad_one(pictures, tiny_model_dir, tmp_path):
    root, bad = pictures
    out = tmp_path / "captions.jsonl"
    proc = cli("--model", tiny_model_dir, "--recursive", "--json", "--output", str(out), "--precision", "fp32",
               str(root), str(bad / "empty.png"), str(bad / "text.png"), str(bad / "truncated.jpg"),
               str(bad / "missing.png"), str(bad / "bomb.png"))
    assert proc.returncode == 1, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [os.path.basename(r["image"]) for r in rows] == ["a.png", "b.jpg", "c.png", "d.jpg", "e.png", "f16.png",
                                                            "g_exif.jpg", "h.png", "large.jpg", "empty.png",
                                                            "text.png", "truncated.jpg", "missing.png", "bomb.png"]
    assert all(r["error"] is None and r["caption"] and r["captions"] == [r["caption"]] for r in rows[:9])
    assert all(r["error"] and r["caption"] is None for r in rows[9:])
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 5 and "Traceback" not in proc.stderr
    for name, line in zip(["empty.png", "text.png", "truncated.jpg", "missing.png", "bomb.png"], errors):
        assert name in line
    assert "no such file" in errors[3] and "too many pixels" in errors[4]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """10 scenes of a seed the trained model never saw (it trained on seed 42's), as PNG files."""
    root = tmp_path_factory.mktemp("unseen")
    for i in range(10):
        synthetic.scene(2026, i)[0].save(root / f"{i}.png")
    return [str(root / f"{i}.png") for i in range(10)]


def test_batched_greedy_equals_one_at_a_time_and_csv_output(pictures, unseen, trained_run, tmp_path):
    # A trained model, so that the captions differ and end at different steps: a batch then holds
    # finished captions padded beside unfinished ones. Plus five images of other modes and formats.
    root, _ = pictures
    files = unseen + infer.expand_inputs([str(root)], recursive=True)[:5]
    model = os.path.join(trained_run, "best")
    tokenizer = AutoTokenizer.from_pretrained(model)
    captions = {}
    for precision in ("fp32", "bf16"):
        batched = infer.caption(files, model=model, precision=precision, batch_size=4)  # 4, 4, 4, 3
        single = infer.caption(files, model=model, precision=precision, batch_size=1)
        assert batched == single, precision
        assert len(batched) == 15 and all(isinstance(c, str) and c for c in batched)
        assert len(set(batched[:10])) >= 6, (precision, batched)
        assert len({len(tokenizer(c)["input_ids"]) for c in batched[:10]}) >= 3, (precision, batched)
        captions[precision] = batched
    proc = cli("--model", model, "--precision", "fp32", "--output", str(tmp_path / "c.csv"), *files)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{f}\t{c}" for f, c in zip(files, captions["fp32"])]
    with open(tmp_path / "c.csv") as f:
        assert [(r["image"], r["caption"]) for r in csv.DictReader(f)] == list(zip(files, captions["fp32"]))


def test_beams_and_sampling_give_several_captions(pictures, tiny_model_dir):
    root, _ = pictures
    files = [str(root / "a.png"), str(root / "c.png")]
    beams = infer.caption(files, model=tiny_model_dir, precision="fp32", num_beams=3, num_captions=3)
    assert [len(c) for c in beams] == [3, 3] and all(len(set(c)) == 3 for c in beams)  # three hypotheses each
    sampled = infer.caption(files, model=tiny_model_dir, precision="fp32", do_sample=True, temperature=1.5,
                            num_captions=2, seed=3)
    again = infer.caption(files, model=tiny_model_dir, precision="fp32", do_sample=True, temperature=1.5,
                          num_captions=2, seed=3)
    assert sampled == again and [len(c) for c in sampled] == [2, 2]
    reseeded = infer.caption(files, model=tiny_model_dir, precision="fp32", do_sample=True, temperature=1.5,
                             num_captions=2, seed=4)
    assert reseeded != sampled  # the seed, not greedy decoding, made the two draws equal


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the client hanging up on an over-size download is expected


def test_urls_are_downloaded_with_a_size_cap(pictures, tiny_model_dir):
    root, _ = pictures
    server = QuietServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        proc = cli("--model", tiny_model_dir, "--precision", "fp32", "--max-download-mb", "1",
                   f"{base}/a.png", f"{base}/nothing.png", f"{base}/sub/large.jpg")
    finally:
        server.shutdown()
    assert proc.returncode == 1
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [f"{base}/a.png"]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 2
    assert f"{base}/nothing.png: download failed" in errors[0] and "HTTP 404" in errors[0]
    assert f"{base}/sub/large.jpg: download refused" in errors[1]


def test_training_output_folder_means_its_best_model(tmp_path, tiny_model_dir):
    os.makedirs(tmp_path / "run")
    os.symlink(tiny_model_dir, tmp_path / "run" / "best")
    assert infer.resolve_model(str(tmp_path / "run")) == str(tmp_path / "run" / "best")
    assert infer.resolve_model(tiny_model_dir) == tiny_model_dir


def test_flag_errors_answer_without_loading_torch(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); import infer\n"
            "try:\n    infer.parse_args(['x.png', '--num-captions', '3'])\nexcept SystemExit as e:\n    print(e.code)\n"
            "print('torch' in sys.modules)") % ROOT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False"]
    assert proc.stderr.strip().endswith("--num-captions above 1 needs --do-sample, or --num-beams at least as large")
    for args, needle in [(["x.png", "--model", "./nowhere"], "'./nowhere' does not exist"),
                         (["x.png", "--device", "cuda"], "no CUDA GPU"),
                         (["x.png", "--output", "out.txt"], ".jsonl or .csv"),
                         (["x.png", "--top-p", "0"], "--top-p")]:
        proc = cli(*args, cwd=str(tmp_path))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr
