import csv
import fcntl
import functools
import http.server
import io
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import struct
import termios
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

import infer
from captioning import captioner, decode, gitmodel, synthetic  # noqa: E402
from conftest import ROOT, Child, descendants, in_process, wait_until_gone

INFER = os.path.join(ROOT, "infer.py")


def cli(*args, cwd=None, merged=False):
    """infer.py's exit status and output; merged: stderr into stdout, to see the order of all lines."""
    return in_process("infer", *args, cwd=cwd, merged=merged)


def cli_in_a_process(*args, env):
    """infer.py in a new process: where the test sets what only a process has (its streams' encoding)."""
    return subprocess.run([sys.executable, INFER, *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=300)


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
    flat = captioner.expand_inputs([str(root)])
    names = ["a.png", "b.jpg", "c.png", "d.jpg", "e.png", "f16.png", "g_exif.jpg"]
    assert [os.path.basename(p) for p in flat] == names
    deep = captioner.expand_inputs([str(root), str(root / "a.png")], recursive=True)
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
    files = unseen + captioner.expand_inputs([str(root)], recursive=True)[:5]
    model = os.path.join(trained_run, "best")
    tokenizer = AutoTokenizer.from_pretrained(model)
    captions = {}
    for precision in ("fp32", "bf16"):
        batched = captioner.caption(files, model=model, precision=precision, batch_size=4)  # 4, 4, 4, 3
        single = captioner.caption(files, model=model, precision=precision, batch_size=1)
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
    beams = captioner.caption(files, model=tiny_model_dir, precision="fp32", num_beams=3, num_captions=3)
    assert [len(c) for c in beams] == [3, 3] and all(len(set(c)) == 3 for c in beams)  # three hypotheses each
    sampled = captioner.caption(files, model=tiny_model_dir, precision="fp32", do_sample=True, temperature=1.5,
                            num_captions=2, seed=3)
    again = captioner.caption(files, model=tiny_model_dir, precision="fp32", do_sample=True, temperature=1.5,
                          num_captions=2, seed=3)
    assert sampled == again and [len(c) for c in sampled] == [2, 2]
    reseeded = captioner.caption(files, model=tiny_model_dir, precision="fp32", do_sample=True, temperature=1.5,
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
    assert gitmodel.resolve_model(str(tmp_path / "run")) == str(tmp_path / "run" / "best")
    assert gitmodel.resolve_model(tiny_model_dir) == tiny_model_dir


def test_flag_errors_answer_without_loading_torch(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); import infer\n"
            "try:\n    infer.parse_args(['x.png', '--num-captions', '3'])\nexcept SystemExit as e:\n    print(e.code)\n"
            "print('torch' in sys.modules)") % ROOT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False"]
    assert proc.stderr.strip().endswith("--num-captions above 1 needs --do-sample, or --num-beams at least as large")
    os.makedirs(tmp_path / "folder.jsonl")
    for args, needle in [(["x.png", "--model", "./nowhere"], "'./nowhere' does not exist"),
                         (["x.png", "--device", "cuda"], "no CUDA GPU"),
                         (["x.png", "--output", "out.txt"], ".jsonl or .csv"),
                         (["x.png", "--resume"], "--resume needs --output"),
                         (["x.png", "--output", "folder.jsonl"], "is a folder"),
                         (["x.png", "--num-workers", "-1"], "--num-workers"),
                         (["x.png", "--top-p", "0"], "--top-p")]:
        proc = cli(*args, cwd=str(tmp_path))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr


def test_a_fifo_among_the_inputs_is_named_and_the_others_are_captioned(pictures, tiny_model_dir, tmp_path):
    root, _ = pictures
    folder = tmp_path / "with-a-pipe"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        shutil.copy(root / name, folder / name)
    os.mkfifo(folder / "pipe.jpg")  # nothing ever writes to it: opening it to read would wait forever
    for inputs in ([str(folder)], [str(folder / "a.png"), str(folder / "pipe.jpg"), str(folder / "b.jpg")]):
        proc = cli("--model", tiny_model_dir, "--precision", "fp32", *inputs)
        assert proc.returncode == 1, proc.stderr
        assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [str(folder / "a.png"),
                                                                              str(folder / "b.jpg")]
        assert proc.stderr.splitlines() == [f"error: {folder / 'pipe.jpg'}: a FIFO, not an image file; only regular "
                                            f"files are read"]


# Runs infer.py and prints, last on stderr, the kernel's count of its peak memory (VmHWM, per address
# space: ru_maxrss would start from this test process's own peak, which fork and exec pass on).
PEAK = ("import atexit, runpy, sys\n"
        "def peak():\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "    print('peak_kb', line.split()[1], file=sys.stderr)\n"
        "atexit.register(peak)\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def peak_rss_mb(cmd):
    """(exit status, stderr without the peak line, the peak resident memory of infer.py in MB)."""
    proc = subprocess.run([cmd[0], "-c", PEAK, *cmd[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    *err, last = proc.stderr.splitlines()
    assert last.startswith("peak_kb "), proc.stderr
    return proc.returncode, "".join(line + "\n" for line in err), int(last.split()[1]) / 1024


def test_an_image_over_max_image_pixels_is_refused_before_it_is_decoded(pictures, tiny_model_dir, tmp_path):
    root, _ = pictures
    huge, large = tmp_path / "huge.png", tmp_path / "large.png"
    Image.new("L", (12000, 12000), 128).save(huge)  # 144 Mpx in a file of a few hundred KB
    Image.new("L", (8000, 6000), 128).save(large)  # 48 Mpx, a third of it
    assert huge.stat().st_size < 1 << 20
    cmd = [sys.executable, INFER, "--model", tiny_model_dir, "--precision", "fp32", "--num-workers", "0"]
    status, err, refused_mb = peak_rss_mb(cmd + [str(huge), str(root / "a.png")])
    assert status == 1, err
    assert err.splitlines() == [f"error: {huge}: refused, too many pixels: 12000 x 12000 is 144.0 Mpx, over "
                                f"--max-image-pixels 40,000,000"]  # PIL's DecompressionBombWarning is not printed
    # The control decodes the smaller one (all 144 Mpx took seconds more to decode): it held 48 Mpx of
    # RGB (144 MB) and the copies resizing makes (measured: 620 MB more than the refused run); the refused
    # 144 Mpx would have held three times that, and held none of it.
    status, err, decoded_mb = peak_rss_mb(cmd + [str(large), str(root / "a.png"), "--max-image-pixels", "0"])
    assert status == 0, err
    assert refused_mb + 300 < decoded_mb, (refused_mb, decoded_mb)


def test_odd_file_names_round_trip_through_both_output_formats(pictures, tiny_model_dir, tmp_path):
    root, _ = pictures
    folder = tmp_path / "odd"
    folder.mkdir()
    names = {os.fsdecode(b"caf\xe9.png"): "caf\\xe9.png",  # not UTF-8: held by Python as a lone surrogate
             "new\nline.png": "new\\nline.png", "tab\tname.png": "tab\\tname.png",
             "back\\slash.png": "back\\slash.png", "plain é.png": "plain é.png"}
    for name in names:
        shutil.copy(root / "a.png", os.path.join(folder, name))
    shown = sorted(f"{folder}/{written}" for written in names.values())
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    for ext in ("csv", "jsonl"):
        out = tmp_path / f"odd.{ext}"
        flags = ["--model", tiny_model_dir, "--precision", "fp32", "--output", str(out), str(folder)]
        # jsonl in a process whose stdout refuses what is not UTF-8 (printing a lone surrogate would fail there)
        proc = cli_in_a_process(*flags, env=strict) if ext == "jsonl" else cli(*flags)
        assert proc.returncode == 0, proc.stderr
        assert sorted(line.split("\t")[0] for line in proc.stdout.splitlines()) == shown  # one line each
        text = out.read_bytes().decode("utf-8")  # strict: every byte of the file is UTF-8
        rows = (list(csv.DictReader(io.StringIO(text, newline=""))) if ext == "csv" else
                [json.loads(line) for line in text.splitlines()])
        assert sorted(row["image"] for row in rows) == shown
        again = cli(*flags, "--resume")  # the written names match the files they came from
        assert again.returncode == 0 and again.stdout == "", again.stderr
        assert again.stderr == f"resuming: 5 of 5 inputs already in {out}.partial\n"
        assert out.read_bytes().decode("utf-8") == text


def test_resume_refuses_rows_of_other_inputs_or_other_settings(pictures, tiny_model_dir, tmp_path, capsys):
    root, _ = pictures
    a, b, c = (str(root / name) for name in ("a.png", "b.jpg", "c.png"))
    out = tmp_path / "out.jsonl"
    flags = ["--model", tiny_model_dir, "--precision", "fp32", "--num-workers", "0", "--output", str(out)]
    assert infer.main([*flags, a, b]) == 0
    finished = out.read_bytes()
    assert json.loads((tmp_path / "out.jsonl.settings.json").read_text())["max_length"] == 50
    capsys.readouterr()

    def refused(*argv):
        with pytest.raises(SystemExit) as e:
            infer.main([*flags, "--resume", *argv])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        return err[0]

    assert refused(c) == (f"error: --resume: 2 of the 2 rows in {str(out)!r} are for images that are not among the "
                          f"inputs given (the first: {a!r}, {b!r}); resume with the same inputs, or start over "
                          f"without --resume")
    assert out.read_bytes() == finished and not (tmp_path / "out.jsonl.partial").exists()
    # The same rows as a killed run's partial file: generation flags that differ are named, old and new.
    shutil.copy(out, tmp_path / "out.jsonl.partial")
    os.remove(out)
    assert refused("--max-length", "3", a, b) == (
        f"error: --resume: the rows in {str(out) + '.partial'!r} were made with other settings: max_length 3 (was 50); "
        f"resume with those, or start over without --resume")
    assert (tmp_path / "out.jsonl.partial").read_bytes() == finished
    assert infer.main([*flags, "--resume", a, b, c]) == 0
    assert capsys.readouterr().err == f"resuming: 2 of 3 inputs already in {out}.partial\n"
    assert out.read_bytes().startswith(finished)


# ---------------------------------------------------------------------------------------------
# Streaming: workers read ahead, rows are printed and saved a batch at a time, --resume

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 JPEG scenes of 320x240, large enough for the tiny model's 64 px draft to apply."""
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(40):
        paths.append(str(root / f"p{i:02d}.jpg"))
        synthetic.scene(9, i)[0].resize((320, 240)).save(paths[-1], quality=90)
    return paths


class HeldServer:
    """Serves a folder over HTTP; a request for /held/NAME is answered only after release(). An
    input behind it holds a run at a known batch for as long as a test needs: no timing."""

    def __init__(self, root):
        self.released = threading.Event()
        released = self.released

        class Handler(QuietHandler):
            def do_GET(self):
                if self.path.startswith("/held/"):
                    released.wait(120)  # bounded: a broken test must not hang the server thread forever
                    self.path = self.path[len("/held"):]
                super().do_GET()

        self.server = QuietServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/held/"

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held(photos):
    server = HeldServer(os.path.dirname(photos[0]))
    yield server
    server.close()


def wait_for_lines(path, n, timeout=120):
    """Poll a file a child process writes (a file has no other way to say it changed) until it
    holds n complete lines; AssertionError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read().count(b"\n") >= n:
                    return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("ext,stop", [("jsonl", signal.SIGKILL), ("csv", signal.SIGTERM)],
                         ids=["jsonl-SIGKILL", "csv-SIGTERM"])
def test_killed_run_resumed_gives_the_same_file_as_one_uninterrupted_run(photos, held, tiny_model_dir, tmp_path,
                                                                          ext, stop):
    # Input 22 waits on the server, so the run writes batches 0-4 (inputs 0-19) and can go no further.
    inputs = photos[:22] + [held.url + os.path.basename(photos[22])] + photos[23:]
    args = ["--model", tiny_model_dir, "--precision", "fp32", "--batch-size", "4", "--num-workers", "2",
            "--timeout", "120", *inputs]
    header = 1 if ext == "csv" else 0
    out = tmp_path / f"killed.{ext}"
    partial = tmp_path / f"killed.{ext}.partial"
    with Child([sys.executable, INFER, *args, "--output", str(out)]) as child:
        wait_for_lines(partial, header + 20)
        readers = descendants(child.proc.pid)
        assert len(readers) == 2  # the reading workers, one of them waiting on the held input
        # The signal to infer.py alone, as `timeout`, `docker stop` or a scheduler sends it: its
        # workers must end with it, and must not keep the lock on OUTPUT.partial.
        os.kill(child.proc.pid, stop)
        if stop == signal.SIGKILL:
            assert child.proc.wait(60) == -signal.SIGKILL
        else:
            assert child.proc.wait(60) == 128 + signal.SIGTERM
            assert child.stderr.read(10)[-1] == (f"stopped by SIGTERM; the rows so far are in {str(partial)!r}, "
                                                 f"--resume continues\n")
        wait_until_gone(readers)
    assert not out.exists() and partial.read_bytes().count(b"\n") == header + 20
    held.released.set()

    resumed = cli(*args, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.splitlines() == [f"resuming: 20 of 40 inputs already in {partial}"]
    assert [line.split("\t")[0] for line in resumed.stdout.splitlines()] == inputs[20:]  # the rest, once each
    whole = tmp_path / f"whole.{ext}"
    proc = cli(*args, "--output", str(whole))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == whole.read_bytes() and not partial.exists()
    rows = whole.read_bytes().splitlines(keepends=True)
    assert len(rows) == header + 40

    # A kill in the middle of a write leaves part of a row at the end: it is dropped and redone.
    cut = tmp_path / f"cut.{ext}"
    (tmp_path / f"cut.{ext}.partial").write_bytes(b"".join(rows[:header + 13]) + rows[header + 13][:25])
    shutil.copy(tmp_path / f"whole.{ext}.settings.json", tmp_path / f"cut.{ext}.settings.json")  # as the run wrote it
    again = cli(*args, "--output", str(cut), "--resume")
    assert again.returncode == 0, again.stderr
    assert [line.split("\t")[0] for line in again.stdout.splitlines()] == inputs[13:]
    assert cut.read_bytes() == whole.read_bytes()


@pytest.mark.slow
def test_each_batch_is_saved_and_printed_before_the_next_is_captioned(photos, held, tiny_model_dir, tmp_path):
    inputs = photos[:8] + [held.url + os.path.basename(photos[8])] + photos[9:12]
    out = tmp_path / "streamed.jsonl"
    partial = tmp_path / "streamed.jsonl.partial"
    cmd = [sys.executable, INFER, "--model", tiny_model_dir, "--precision", "fp32", "--batch-size", "4",
           "--num-workers", "2", "--timeout", "120", "--json", "--output", str(out)]
    with Child(cmd + inputs) as child:
        # Input 8 is held: the run cannot finish batch 2 until the test lets it.
        printed = child.stdout.read(120, until=lambda line: json.loads(line)["image"] == inputs[7])
        assert [json.loads(line)["image"] for line in printed] == inputs[:8]
        assert partial.read_text().splitlines(keepends=True) == printed  # saved before it was printed
        assert not out.exists()
        # A second run on the same --output meanwhile is refused, and leaves the first run's file alone.
        second = cli(*cmd[2:], photos[0])
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr.splitlines() == [f"error: --output {str(out)!r}: another infer.py is writing "
                                              f"{str(partial)!r}"]
        assert partial.read_text().splitlines(keepends=True) == printed
        held.released.set()
        rest = child.stdout.read(120)
        assert child.proc.wait(60) == 0
        assert child.stderr.read(10) == []  # no progress bar when stderr is not a terminal
    rows = [json.loads(line) for line in printed + rest]
    assert [r["image"] for r in rows] == inputs and all(r["caption"] for r in rows)
    assert out.read_text().splitlines(keepends=True) == printed + rest and not partial.exists()


def test_resume_appends_new_inputs_to_a_finished_file_and_a_stale_partial_is_started_over(pictures, tiny_model_dir,
                                                                                         tmp_path):
    root, _ = pictures
    a, b, c = (str(root / name) for name in ("a.png", "b.jpg", "c.png"))
    out = tmp_path / "out.csv"
    flags = ["--model", tiny_model_dir, "--precision", "fp32", "--output", str(out)]
    assert cli(*flags, a, b).returncode == 0
    first = out.read_text()
    more = cli(*flags, "--resume", a, b, c)
    assert more.returncode == 0 and more.stderr == f"resuming: 2 of 3 inputs already in {out}.partial\n"
    assert [line.split("\t")[0] for line in more.stdout.splitlines()] == [c]
    assert out.read_text().startswith(first) and [r["image"] for r in csv.DictReader(open(out))] == [a, b, c]

    (tmp_path / "out.csv.partial").write_text("image,caption,error\r\nleft,by a killed run,\r\n")
    fresh = cli(*flags, a)
    assert fresh.returncode == 0
    assert fresh.stderr == f"note: {out}.partial from an earlier run is started over (--resume continues it)\n"
    assert [r["image"] for r in csv.DictReader(open(out))] == [a]
    assert not os.path.exists(f"{out}.partial")

    nowhere = cli(*flags[:-1], str(tmp_path / "no" / "out.jsonl"), a)
    assert nowhere.returncode == 1 and nowhere.stdout == ""
    assert nowhere.stderr == f"error: --output {str(tmp_path / 'no' / 'out.jsonl')!r}: No such file or directory\n"


class CountingReader(captioner.Reader):
    """infer's Reader that appends each index it is asked for to a file as it starts on it (the
    workers are other processes: a file is what they share with the test)."""

    def __init__(self, items, log, **kwargs):
        super().__init__(items, **kwargs)
        self.log = log

    def __getitem__(self, i):
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{i}\n".encode())  # one small O_APPEND write: whole lines, never interleaved
        finally:
            os.close(fd)
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_read_at_most_batch_x_prefetch_images_ahead(photos, tiny_model_dir, tmp_path, workers):
    image_processor = AutoProcessor.from_pretrained(tiny_model_dir).image_processor
    log, batch = str(tmp_path / "started.log"), 2
    reader = CountingReader(photos[:30], log)
    ahead = workers * captioner.PREFETCH  # batches the workers may hold besides the one being captioned

    def started():
        return open(log).read().split() if os.path.exists(log) else []

    seen = []
    for k, (rows, pixels) in enumerate(captioner.loader(reader, image_processor, batch, workers)):
        seen += [row["image"] for row in rows]
        assert pixels.shape == (batch, 3, 64, 64)
        allowed = min(30, (k + 1 + ahead) * batch)
        # The workers do read ahead, as far as they may (they run on while this test waits) ...
        deadline = time.monotonic() + 60
        while len(started()) < allowed and time.monotonic() < deadline:
            time.sleep(0.01)
        # ... and no further: nothing is asked of them until the next batch is taken.
        assert len(started()) == allowed, (k, started())
    assert seen == photos[:30] and sorted(map(int, started())) == list(range(30))


def test_bad_inputs_in_order_spoil_nothing_and_num_workers_0_and_2_agree(pictures, trained_run, tmp_path):
    root, bad = pictures
    model = os.path.join(trained_run, "best")
    files = [str(root / "a.png"), str(bad / "empty.png"), str(root / "b.jpg"),  # batch 3 x 3
             str(root / "c.png"), str(bad / "missing.png"), str(root / "d.jpg"),
             str(root / "sub" / "large.jpg"), str(bad / "text.png"), str(root / "e.png")]
    good = [f for f in files if f.startswith(str(root))]
    alone = dict(zip(good, captioner.caption(good, model=model, precision="fp32", batch_size=1)))
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.jsonl"
        proc = cli("--model", model, "--precision", "fp32", "--batch-size", "3", "--num-workers", str(workers),
                   "--output", str(out), *files, merged=True)
        assert proc.returncode == 1
        runs[workers] = proc.stdout, out.read_bytes()
    assert runs[0] == runs[2]
    lines = runs[0][0].splitlines()
    assert len(lines) == len(files) and "Traceback" not in runs[0][0]
    for f, line in zip(files, lines):  # stdout and stderr lines, in input order
        assert line == (f"{f}\t{alone[f]}" if f in alone else line) and (f in alone or line.startswith(f"error: {f}: "))
    rows = [json.loads(line) for line in runs[0][1].decode().splitlines()]
    assert [r["image"] for r in rows] == files
    assert [r["error"] is None for r in rows] == [f in alone for f in files]


def test_exact_preprocessing_gives_the_processors_own_pixels_and_the_default_drafts(tiny_model_dir, tmp_path):
    path = str(tmp_path / "large.jpg")
    synthetic.scene(4, 1)[0].resize((2048, 1536), Image.BILINEAR).save(path, quality=92)
    image_processor = AutoProcessor.from_pretrained(tiny_model_dir).image_processor
    own = image_processor(images=[decode.open_image(path)], return_tensors="pt")["pixel_values"]
    collate = captioner.Collate(image_processor)
    pixels = {}
    for exact in (True, False):
        row, image = captioner.reader_for([path], image_processor, exact=exact)[0]
        assert row["error"] is None
        pixels[exact] = torch.from_numpy(collate([(row, image)])[1])
        # The JPEG decoder scales by 1/8 at most, and never below the processor's 64 px.
        assert image.size == ((2048, 1536) if exact else (256, 192))
    assert torch.equal(pixels[True], own)
    assert not torch.equal(pixels[False], own)
    assert (pixels[False] - own).abs().mean() < 0.02  # the same picture (pixels are normalised, ~[-2, 2])

    # The command line's caption is generate's on those pixels (the model loaded as any HF user would).
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for exact, flags in ((True, ["--exact-preprocessing"]), (False, [])):
        with torch.inference_mode():
            ids = model.generate(pixel_values=pixels[exact], max_length=50)
        expected = tokenizer.batch_decode(ids, skip_special_tokens=True)[0]
        proc = cli("--model", tiny_model_dir, "--precision", "fp32", *flags, path)
        assert proc.returncode == 0 and proc.stdout == f"{path}\t{expected}\n", proc.stderr


def test_progress_bar_with_images_per_second_on_a_terminal(pictures, tiny_model_dir):
    root, _ = pictures
    files = [str(root / name) for name in ("a.png", "b.jpg", "c.png")]
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen([sys.executable, INFER, "--model", tiny_model_dir, "--precision", "fp32",
                             "--batch-size", "2", *files], stdout=subprocess.PIPE, stderr=child, text=True)
    os.close(child)
    stdout, _ = proc.communicate(timeout=120)
    terminal = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # EIO: the child's side is closed and everything it wrote has been read
            break
        if not chunk:
            break
        terminal += chunk
    os.close(parent)
    assert proc.returncode == 0
    assert [line.split("\t")[0] for line in stdout.splitlines()] == files
    assert b"3/3" in terminal and b"img/s" in terminal
