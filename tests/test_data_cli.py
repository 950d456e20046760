"""`python data.py preview` and `python data.py stats`, driven as a user would, offline: through
data.py's main (its exit status, stdout and stderr), and once in a process of its own."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from captioning import sources, strings, synthetic
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return in_process("data", *args)


def captions_of(folder):
    return [json.loads(line)["text"] for line in open(os.path.join(folder, "metadata.jsonl"))]


def summary(values, *percentiles):
    arr = np.asarray(values, dtype=np.float64)
    return [arr.min(), np.median(arr), *[np.percentile(arr, q) for q in percentiles], arr.max()]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """12 scenes; 000003.png is not an image, row 000005 has an empty caption, 000007 a blank one, 000009
    one of punctuation only."""
    out = str(tmp_path_factory.mktemp("bad-imagefolder"))
    sources.write_imagefolder(synthetic.dataset(12, seed=2), out)
    with open(os.path.join(out, "000003.png"), "wb") as f:
        f.write(b"this is not a PNG file")
    rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
    rows[5]["text"], rows[7]["text"], rows[9]["text"] = "", "   ", "¡¿...!"
    with open(os.path.join(out, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return out


def test_preview_writes_one_row_of_n_captioned_images(imagefolder, tmp_path):
    out = str(tmp_path / "samples.png")
    r = run("preview", "--dataset", imagefolder, "--n", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == out
    img = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    height, width, _ = img.shape
    assert width == 3 * 250 and height > 250  # 2.5 inch panels at 100 dpi, captions above them
    assert img.std() > 10  # not blank
    panel = width // 3
    for k in range(3):  # every panel holds a picture: coloured pixels in its lower part
        strip = img[height // 2:, k * panel:(k + 1) * panel]
        saturation = strip.max(axis=2) - strip.min(axis=2)
        assert (saturation > 100).mean() > 0.01, f"panel {k} looks empty"
    gaps = [img[height // 2:, k * panel - 2:k * panel + 2] for k in (1, 2)]
    assert all((g > 250).all() for g in gaps)  # white space between the panels: three separate images


def test_preview_default_name_and_count(imagefolder, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "preview", "--dataset", imagefolder],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "samples.png").size[0] == 5 * 250


def test_stats_numbers_match_the_fixture(imagefolder):
    r = run("stats", "--dataset", imagefolder, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["rows"]["train"] == 36 and s["rows"]["eval"] == 4  # 40 rows, test-size 0.1
    words = [len(c.split()) for c in captions_of(imagefolder)]
    got = s["caption_length"]
    assert s["caption_length"]["unit"].startswith("words")
    assert [got["min"], got["median"], got["p95"], got["max"]] == pytest.approx(summary(words, 95), abs=0.01)
    assert s["captions_per_image"] == {"min": 1, "median": 1, "max": 1}
    sizes = [Image.open(os.path.join(imagefolder, f)).size for f in os.listdir(imagefolder) if f.endswith(".png")]
    assert s["image_width"]["max"] == max(w for w, _ in sizes) and s["image_height"]["min"] == min(h for _, h in sizes)
    assert s["warnings"] == {}

    text = run("stats", "--dataset", imagefolder)
    assert text.returncode == 0, text.stderr
    lines = {line[:20].strip(): line[20:] for line in text.stdout.splitlines()}  # aligned "label   value"
    assert lines["rows"].startswith("train 36, eval 4")
    assert lines["caption length"].startswith("words (whitespace): min ")
    assert lines["warnings"] == "none"


def test_synthetic_writes_the_scenes_as_an_imagefolder_and_is_a_dataset_name(tmp_path):
    out = tmp_path / "scenes"
    r = run("synthetic", "--size", "6", "--seed", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote 6 images and metadata.jsonl to {out}"
    rows = [json.loads(line) for line in open(out / "metadata.jsonl")]
    assert [row["file_name"] for row in rows] == [f"{i:06d}.png" for i in range(6)]
    for i, row in enumerate(rows):
        image, caption = synthetic.scene(3, i)
        assert row["text"] == caption
        assert np.array_equal(np.asarray(Image.open(out / row["file_name"])), np.asarray(image))  # PNG: lossless

    s = run("stats", "--dataset", "synthetic", "--synthetic-size", "30", "--seed", "1", "--json")
    assert s.returncode == 0, s.stderr
    got = json.loads(s.stdout)
    assert got["rows"] == {"train": 27, "eval": 3, "eval_from": "split from train, test-size 0.1, seed 1"}
    words = [len(synthetic.scene(1, i)[1].split()) for i in range(30)]
    assert [got["caption_length"]["min"], got["caption_length"]["max"]] == [min(words), max(words)]


def test_stats_counts_tokens_with_the_models_tokenizer(imagefolder, tiny_model_dir):
    from transformers import AutoTokenizer

    r = run("stats", "--dataset", imagefolder, "--model", tiny_model_dir, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["caption_length"]
    assert got["unit"].startswith("tokens")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [len(tokenizer(c)["input_ids"]) for c in captions_of(imagefolder)]
    assert [got["min"], got["median"], got["p95"], got["max"]] == pytest.approx(summary(lengths, 95), abs=0.01)


def test_stats_warns_about_bad_rows_by_name_instead_of_failing(bad_folder):
    r = run("stats", "--dataset", bad_folder, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["rows"]["train"] + s["rows"]["eval"] == 12
    w = s["warnings"]
    assert w["unreadable_image"]["count"] == 1 and "000003.png" in w["unreadable_image"]["first"][0]
    assert w["empty_caption"]["count"] == 3
    assert sorted(os.path.basename(n.split("(")[1].rstrip(")")) for n in w["empty_caption"]["first"]) == \
        ["000005.png", "000007.png", "000009.png"]
    assert s["captions_per_image"]["min"] == 0
    good = [c for c in captions_of(bad_folder) if strings.normalize(c)]
    assert s["caption_length"]["max"] == max(len(c.split()) for c in good)
    assert s["image_width"]["min"] == 128  # the 11 readable images

    text = run("stats", "--dataset", bad_folder)
    assert text.returncode == 0, text.stderr
    assert "3 empty caption, 1 unreadable image" in text.stdout
    assert any("unreadable image" in line and "000003.png" in line for line in text.stdout.splitlines())


def test_preview_of_a_bad_row_is_a_one_line_error(bad_folder, tmp_path):
    r = run("preview", "--dataset", bad_folder, "--n", "12", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: train row ")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, named", [
    (["stats", "--dataset", "{missing}"], "does not exist"),
    (["preview", "--dataset", "{missing}"], "does not exist"),
    (["stats", "--dataset", "{folder}", "--text-column", "caption"], "no column 'caption' (--text-column)"),
    (["preview", "--dataset", "{folder}", "--image-column", "img"], "no column 'img' (--image-column)"),
    (["stats", "--dataset", "nobody-here/no-such-dataset"], "'nobody-here/no-such-dataset'"),
    (["stats", "--dataset", "{folder}", "--model", "{missing}"], "--model folder"),
    (["preview", "--dataset", "{folder}", "--out", "{missing}/x.png"], "--out"),
])
def test_bad_inputs_are_one_line_errors(args, named, imagefolder, tmp_path):
    missing = str(tmp_path / "no-such-folder")
    r = run(*[a.format(missing=missing, folder=imagefolder) for a in args])
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert named in r.stderr and "Traceback" not in r.stderr
    if "{missing}" in " ".join(args):
        assert missing in r.stderr


def bad_sources(root):
    """Folders that stopped `data.py` with a traceback before: {name: (folder, what the error must say)}."""
    out = {}
    folder = root / "bad-jsonl"
    sources.write_imagefolder(synthetic.dataset(6, seed=3), str(folder))
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[3] = lines[3].replace('"text": "', '"text": "a \\q ')  # an escape JSON does not have
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out["jsonl"] = folder, f"{folder}/metadata.jsonl line 4: not valid JSON (Invalid \\escape: column "
    folder = root / "bad-csv"
    sources.write_imagefolder(synthetic.dataset(6, seed=3), str(folder))
    os.remove(folder / "metadata.jsonl")
    (folder / "metadata.csv").write_text("file_name,text\n000000.png,a cat\n000001.png,\"a dog\n")
    out["csv"] = folder, f"{folder}/metadata.csv line 3: a quoted field opens here and is never closed"
    folder = root / "saved"
    synthetic.dataset(6, seed=3).save_to_disk(str(folder))
    arrow = next(f for f in os.listdir(folder) if f.endswith(".arrow"))
    with open(folder / arrow, "r+b") as f:
        f.truncate(os.path.getsize(folder / arrow) - 100)
    out["saved"] = folder, f"{folder}/{arrow}: not a whole Arrow file"
    folder = root / "one-row"
    sources.write_imagefolder(synthetic.dataset(1, seed=3), str(folder))
    out["one row"] = folder, "1 row cannot be split into train and eval with --test-size 0.1"
    return out


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return bad_sources(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("cmd", ["stats", "preview"])
@pytest.mark.parametrize("source", ["jsonl", "csv", "saved", "one row"])
def test_bad_sources_are_the_same_one_line_errors_as_in_training(broken, cmd, source, tmp_path):
    folder, expected = broken[source]
    r = run(cmd, "--dataset", str(folder), *(["--out", str(tmp_path / "x.png")] if cmd == "preview" else []))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"error: {expected}") and r.stderr.count("\n") == 1, r.stderr
