"""COCO captions files and Karpathy split files as --dataset: their rows, splits and references, --image-root,
the cache fingerprint, bad files named in one line, data.py stats/preview and train.py on them.

    python tests/test_caption_files.py measure DIR   # load time of COCO- and Karpathy-sized files (README: Data)
"""
import argparse
import importlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from captioning import errors, image_cache, sources, synthetic  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def retold(caption, n):
    """n different references of one scene."""
    return [caption, f"there is {caption}", f"a picture of {caption}", f"{caption} on a plain background"][:n]


def save_scene(path, seed, i):
    """A synthetic scene as PNG or JPEG (by the name); its caption."""
    image, caption = synthetic.scene(seed, i)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, quality=95) if path.endswith(".jpg") else image.save(path)
    return caption


def write_coco(folder, n=20, seed=11):
    """COCO's own layout: annotations/captions_train.json naming train2017/*.png|jpg by file name only. Image k has
    1 + k % 3 captions; annotations come shuffled, as in COCO. -> (json path, image folder, {file name: refs})."""
    images_dir = os.path.join(folder, "train2017")
    refs, images, annotations = {}, [], []
    for k in range(n):
        name = f"{k:012d}.{'png' if k % 2 == 0 else 'jpg'}"
        refs[name] = retold(save_scene(os.path.join(images_dir, name), seed, k), 1 + k % 3)
        images.append({"license": 1, "file_name": name, "height": 128, "width": 128, "id": 1000 + k})
        annotations += [{"image_id": 1000 + k, "id": 0, "caption": c} for c in refs[name]]
    order = list(range(len(annotations)))
    random.Random(seed).shuffle(order)
    annotations = [dict(annotations[j], id=i) for i, j in enumerate(order)]
    refs = {name: [] for name in refs}  # in the order the shuffled annotations give them
    by_id = {im["id"]: im["file_name"] for im in images}
    for a in annotations:
        refs[by_id[a["image_id"]]].append(a["caption"])
    path = os.path.join(folder, "annotations", "captions_train.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({"info": {"description": "test"}, "licenses": [], "images": images, "annotations": annotations}, f)
    return path, images_dir, refs


KARPATHY_SPLITS = ["train", "restval", "train", "val", "train", "test", "restval", "train", "val", "train",
                   "restval", "test", "train", "val", "restval", "train"]


def write_karpathy(folder, seed=12):
    """dataset_flickr.json at the top of `folder`, its images in a2014/ and b2014/ (filepath) and two at the top
    (no filepath). -> (json path, [(relative path, split, refs)] in file order)."""
    images, rows = [], []
    for i, split in enumerate(KARPATHY_SPLITS):
        sub = None if i in (4, 9) else ("a2014" if i % 2 else "b2014")
        name = f"im_{i:03d}.{'jpg' if i % 3 == 0 else 'png'}"
        relative = f"{sub}/{name}" if sub else name
        refs = retold(save_scene(os.path.join(folder, relative), seed, i), 1 + i % 4)
        entry = {"filename": name, "imgid": i, "split": split, "sentids": list(range(5 * i, 5 * i + len(refs))),
                 "sentences": [{"tokens": r.split(), "raw": r, "imgid": i, "sentid": 5 * i + j}
                               for j, r in enumerate(refs)]}
        if sub:
            entry["filepath"] = sub
        images.append(entry)
        rows.append((relative, split, refs))
    path = os.path.join(folder, "dataset_flickr.json")
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": "flickr8k"}, f)
    return path, rows


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(str(tmp_path_factory.mktemp("coco")))


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    return write_karpathy(str(tmp_path_factory.mktemp("karpathy")))


def flags(dataset, **kw):
    args = dict(dataset=dataset, seed=42, synthetic_size=10, test_size=0.1, image_column="image", text_column="text",
                image_root=None)
    return argparse.Namespace(**{**args, **kw})


def paths_of(table, column="image"):
    return [cell["path"] for cell in sources.undecoded(table, column)[column]]


# ---------------------------------------------------------------------------------------------
# Rows, splits, references

def test_coco_file_has_one_row_per_image_with_its_annotations_as_references(coco):
    path, images_dir, refs = coco
    table = sources.load_source(path, image_root=images_dir)
    assert table.column_names == ["image", "text"] and len(table) == 20
    assert paths_of(table) == [os.path.join(images_dir, name) for name in refs]
    assert table["text"] == list(refs.values())
    assert [len(r) for r in table["text"]] == [1 + k % 3 for k in range(20)]  # several annotations, several refs

    train, held_out = sources.load_tables(flags(path, image_root=images_dir))  # no split of its own: --test-size
    assert (len(train), len(held_out)) == (18, 2)
    assert sorted(paths_of(train) + paths_of(held_out)) == sorted(paths_of(table))
    images, captions = sources.read_rows(train, "image", "text", "train")
    for image, caps, p in zip(images, captions, paths_of(train)):
        assert image.mode == "RGB" and image.size == (128, 128) and caps == refs[os.path.basename(p)]
        if p.endswith(".png"):  # lossless: the very scene written
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(p).convert("RGB")))
    again, _ = sources.load_tables(flags(path, image_root=images_dir, seed=7))
    assert paths_of(again) != paths_of(train)  # the split follows --seed


def test_the_image_root_defaults_to_the_files_folder_and_may_be_relative(coco, tmp_path, monkeypatch):
    path, images_dir, refs = coco
    beside = tmp_path / "captions.json"  # the file among its images: no --image-root needed
    shutil.copytree(images_dir, tmp_path, dirs_exist_ok=True)
    shutil.copy(path, beside)
    table = sources.load_source(str(beside))
    assert paths_of(table) == [str(tmp_path / name) for name in refs]
    assert len(sources.read_rows(table, "image", "text", "train")[0]) == 20
    monkeypatch.chdir(os.path.dirname(images_dir))
    relative = sources.load_source(path, image_root="train2017")
    assert paths_of(relative) == [os.path.join(images_dir, name) for name in refs]  # made absolute


def test_karpathy_file_trains_on_train_and_restval_and_evaluates_on_val(karpathy):
    path, rows = karpathy
    folder = os.path.dirname(path)
    expect = lambda *splits: [os.path.join(folder, r) for r, s, _ in rows if s in splits]  # noqa: E731
    source = sources.load_source(path)
    assert sorted(source) == ["test", "train", "val"]
    train, held_out = sources.load_tables(flags(path))
    assert paths_of(train) == expect("train", "restval")  # the file's own split, in file order
    assert paths_of(held_out) == expect("val")
    assert train["text"] == [refs for _, s, refs in rows if s in ("train", "restval")]
    assert held_out["text"] == [refs for _, s, refs in rows if s == "val"]
    assert [len(r) for r in train["text"]] == \
        [1 + i % 4 for i, s in enumerate(KARPATHY_SPLITS) if s in ("train", "restval")]
    _, test = sources.load_tables(flags(path, eval_split="test"))
    assert paths_of(test) == expect("test")
    assert len(sources.read_rows(train, "image", "text", "train")[0]) == 11

    with pytest.raises(errors.DataError, match=r"^--eval-split 'dev': the dataset has no such split besides the one "
                                             r"trained on \('train'\); its splits are: train, val, test$"):
        sources.load_tables(flags(path, eval_split="dev"))
    with pytest.raises(errors.DataError, match=r"^--eval-split 'test': the dataset has no named splits"):
        sources.load_tables(flags("synthetic", eval_split="test"))


def test_a_karpathy_file_without_val_evaluates_on_test(tmp_path):
    path, rows = write_karpathy(str(tmp_path))
    doc = json.load(open(path))
    for entry in doc["images"]:  # val images to train; test stays
        entry["split"] = {"val": "train"}.get(entry["split"], entry["split"])
    json.dump(doc, open(path, "w"))
    folder = os.path.dirname(path)
    train, held_out = sources.load_tables(flags(path))
    assert paths_of(held_out) == [os.path.join(folder, r) for r, s, _ in rows if s == "test"]
    assert paths_of(train) == [os.path.join(folder, r) for r, s, _ in rows if s in ("train", "restval", "val")]


def test_a_karpathy_file_without_val_or_test_is_split_by_test_size(tmp_path):
    path, rows = write_karpathy(str(tmp_path))
    doc = json.load(open(path))
    for entry in doc["images"]:  # test images to restval, val to train
        entry["split"] = {"test": "restval", "val": "train"}.get(entry["split"], entry["split"])
    json.dump(doc, open(path, "w"))
    train, held_out = sources.load_tables(flags(path, test_size=0.25))
    assert (len(train), len(held_out)) == (12, 4)


def test_the_column_flags_name_the_columns_of_a_caption_file(karpathy):
    path, rows = karpathy
    train, held_out = sources.load_tables(flags(path, image_column="img", text_column="captions"))
    assert train.column_names == held_out.column_names == ["img", "captions"]
    images, captions = sources.read_rows(held_out, "img", "captions", "eval")
    assert captions == [refs for _, s, refs in rows if s == "val"] and len(images) == 3
    with pytest.raises(errors.DataError, match=r"^--image-column and --text-column are both 'x'"):
        sources.load_tables(flags(path, image_column="x", text_column="x"))


def test_a_missing_image_or_an_image_without_annotations_is_a_bad_row(coco, tmp_path):
    path, images_dir, refs = coco
    shutil.copytree(images_dir, tmp_path / "images")
    os.remove(tmp_path / "images" / "000000000003.jpg")
    doc = json.load(open(path))
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 1005]
    json.dump(doc, open(tmp_path / "c.json", "w"))
    table = sources.load_source(str(tmp_path / "c.json"), image_root=str(tmp_path / "images"))
    assert len(table) == 20
    skipped = []
    images, captions = sources.read_rows(table, "image", "text", "train", skipped)
    assert len(images) == 18
    assert skipped == [
        f"train row 3 ({tmp_path}/images/000000000003.jpg, named in {tmp_path}/c.json images[3]): no such file",
        f"train row 5 ({tmp_path}/images/000000000005.jpg): no caption: column 'text' holds an empty list "
        f"(in a COCO file: an image without annotations)"]
    with pytest.raises(errors.DataError, match=r"c.json images\[3\]\): no such file$"):  # --on-bad-sample error
        sources.read_rows(table, "image", "text", "train")


def test_a_changed_image_or_caption_changes_the_fingerprint_that_names_the_cache(coco, tmp_path, tiny_model_dir):
    from transformers import AutoProcessor

    path, images_dir, refs = coco
    shutil.copytree(os.path.dirname(images_dir), tmp_path / "coco")
    path = str(tmp_path / "coco" / "annotations" / "captions_train.json")
    images_dir = str(tmp_path / "coco" / "train2017")
    first = sources.load_source(path, image_root=images_dir)
    assert sources.load_source(path, image_root=images_dir)._fingerprint == first._fingerprint
    processor = AutoProcessor.from_pretrained(tiny_model_dir).image_processor
    cache = str(tmp_path / "cache")
    before, _ = image_cache.prepare_split(first, "image", "text", "train", processor, [], cache)

    save_scene(os.path.join(images_dir, "000000000002.png"), 99, 0)  # another scene under the same name
    os.utime(os.path.join(images_dir, "000000000002.png"), ns=(1, 1))  # and an old time: what counts is a change
    changed = sources.load_source(path, image_root=images_dir)
    assert changed._fingerprint != first._fingerprint
    after, _ = image_cache.prepare_split(changed, "image", "text", "train", processor, [], cache)
    assert len(os.listdir(cache)) == 2  # a new entry, not the stale one
    assert not np.array_equal(after[2], before[2])
    assert np.array_equal(np.delete(after, 2, axis=0), np.delete(before, 2, axis=0))

    doc = json.load(open(path))
    doc["annotations"][0]["caption"] = "a different caption"
    json.dump(doc, open(path, "w"))
    assert sources.load_source(path, image_root=images_dir)._fingerprint not in (first._fingerprint, changed._fingerprint)


# ---------------------------------------------------------------------------------------------
# Bad files: one line naming the file and the entry

COCO_DOC = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 2, "caption": "a dog"},
                            {"image_id": 1, "caption": "the cat"}]}
KARPATHY_DOC = {"images": [{"filename": "a.png", "split": "train", "sentences": [{"raw": "a cat"}, {"raw": "the cat"}]},
                           {"filepath": "x", "filename": "b.png", "split": "val", "sentences": [{"raw": "a dog"}]}]}


def changed(doc, change):
    doc = json.loads(json.dumps(doc))
    change(doc)
    return json.dumps(doc)


BAD_FILES = {
    "cut short": ('{"images": [{"id": 1,', ": not valid JSON (Expecting property name enclosed in double quotes: "
                                           "line 1 column 22)"),
    "not UTF-8": (b'{"images": [],\n "info": "caf\xe9"}',
                  " line 2: not UTF-8 (byte 0xe9 at column 14); save it as UTF-8"),
    "other JSON": ('{"info": {}, "licenses": []}', ': an object with "info", "licenses", neither a COCO captions file '
                   '(an object with "images" and "annotations") nor a Karpathy split file ("images" whose entries '
                   'have "sentences")'),
    "a list": ("[1, 2]", ": a list of numbers, neither a COCO captions file"),
    "images not a list": ('{"images": {"id": 1}, "annotations": []}', ': "images" must be a list, not an object'),
    "no images": ('{"images": [], "annotations": []}', ': "images" is empty'),
    "no file_name": (changed(COCO_DOC, lambda d: d["images"][1].pop("file_name")), ' images[1]: no "file_name"'),
    "file_name a number": (changed(COCO_DOC, lambda d: d["images"][0].update(file_name=7)),
                           ' images[0]: "file_name" must be a file name (a string), not 7'),
    "id a fraction": (changed(COCO_DOC, lambda d: d["images"][1].update(id=1.5)),
                      ' images[1]: "id" must be an integer or a string, not 1.5'),
    "id twice": (changed(COCO_DOC, lambda d: d["images"][1].update(id=1)),
                 " images[1]: id 1 is also the id of images[0]"),
    "unknown image_id": (changed(COCO_DOC, lambda d: d["annotations"][2].update(image_id=99)),
                         ' annotations[2]: image_id 99 is not the id of any entry of "images"'),
    "caption a number": (changed(COCO_DOC, lambda d: d["annotations"][0].update(caption=5)),
                         ' annotations[0]: "caption" must be a string, not 5'),
    "no caption key": (changed(COCO_DOC, lambda d: d["annotations"][1].pop("caption")),
                       ' annotations[1]: no "caption"'),
    "annotation a string": (changed(COCO_DOC, lambda d: d["annotations"].__setitem__(1, "a dog")),
                            " annotations[1]: not an object ({...}) but a string"),
    "unknown split": (changed(KARPATHY_DOC, lambda d: d["images"][1].update(split="dev")),
                      ' images[1]: "split" must be one of train, restval, val, test, not "dev"'),
    "no filename": (changed(KARPATHY_DOC, lambda d: d["images"][0].pop("filename")), ' images[0]: no "filename"'),
    "filepath a number": (changed(KARPATHY_DOC, lambda d: d["images"][1].update(filepath=7)),
                          ' images[1]: "filepath" must be a folder name (a string), not 7'),
    "sentence without raw": (changed(KARPATHY_DOC, lambda d: d["images"][0]["sentences"][1].pop("raw")),
                             ' images[0] sentences[1]: no "raw"'),
    "raw null": (changed(KARPATHY_DOC, lambda d: d["images"][0]["sentences"][0].update(raw=None)),
                 ' images[0] sentences[0]: "raw" must be a string, not null'),
    "sentences a string": (changed(KARPATHY_DOC, lambda d: d["images"][1].update(sentences="a dog")),
                           ' images[1]: "sentences" must be a list, not "a dog"'),
    "no sentences": (changed(KARPATHY_DOC, lambda d: d["images"][1].pop("sentences")), ' images[1]: no "sentences"'),
    "nothing to train on": (changed(KARPATHY_DOC, lambda d: d["images"][0].update(split="test")),
                            ': no image has split "train" or "restval" (the images to train on); '
                            'splits found: test, val'),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_caption_file_is_one_line_naming_the_file_and_entry(case, tmp_path):
    content, problem = BAD_FILES[case]
    path = tmp_path / "captions.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(errors.DataError) as e:
        sources.load_source(str(path))
    assert str(e.value).startswith(f"{path}{problem}") and "\n" not in str(e.value), str(e.value)


def test_bad_names_and_flags_around_a_caption_file_are_one_line(coco, imagefolder, tmp_path):
    path, images_dir, _ = coco
    cases = [((str(tmp_path / "none.json"),), {}, f"caption file '{tmp_path}/none.json' does not exist"),
             ((path,), {"image_root": str(tmp_path / "nowhere")}, f"--image-root '{tmp_path}/nowhere' is not a folder"),
             ((imagefolder,), {"image_root": images_dir},
              f"--image-root is for a COCO or Karpathy caption file (.json); --dataset '{imagefolder}' is not one")]
    for args, kw, message in cases:
        with pytest.raises(errors.DataError) as e:
            sources.load_source(*args, **kw)
        assert str(e.value) == message


# ---------------------------------------------------------------------------------------------
# Command lines: data.py stats and preview, train.py

def run(script, *args, cwd=None):
    from conftest import in_process  # here: run as a script (measure), this file must not set up a test session

    return in_process(script.removesuffix(".py"), *args, cwd=cwd)


def test_data_py_stats_and_preview_read_caption_files(karpathy, coco, tmp_path):
    path, rows = karpathy
    r = run("data.py", "stats", "--dataset", path, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["rows"] == {"train": 11, "eval": 3, "eval_from": "the source's own 'val' split"}
    counts = [len(refs) for _, s, refs in rows if s in ("train", "restval", "val")]
    assert (got["captions_per_image"]["min"], got["captions_per_image"]["max"]) == (min(counts), max(counts))
    assert "warnings" not in got or not got["warnings"]
    r = run("data.py", "stats", "--dataset", path, "--eval-split", "test")
    assert r.returncode == 0, r.stderr
    assert "train 11, eval 2 (the source's own 'test' split)" in r.stdout

    coco_path, images_dir, refs = coco
    bad = tmp_path / "images"
    shutil.copytree(images_dir, bad)
    os.remove(bad / "000000000004.png")
    r = run("data.py", "stats", "--dataset", coco_path, "--image-root", str(bad), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["rows"]["train"] + got["rows"]["eval"] == 20
    assert got["warnings"]["unreadable_image"]["count"] == 1
    assert got["warnings"]["unreadable_image"]["first"][0].endswith(
        f"({bad}/000000000004.png, named in {coco_path} images[4]): no such file")

    out = tmp_path / "row.png"
    r = run("data.py", "preview", "--dataset", coco_path, "--image-root", images_dir, "--n", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size[0] == 2 * 250

    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [{"filename": "a.png", "split": "train", "sentences": [{"raw": "a cat"}]}, ]}')
    r = run("data.py", "stats", "--dataset", str(broken))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {broken}: not valid JSON (Expecting value: line 1 column 87)\n"


@pytest.mark.parametrize("kind", ["coco", "karpathy"])
def test_train_py_trains_on_a_caption_file(kind, coco, karpathy, tiny_model_dir, tmp_path):
    if kind == "coco":
        path, images_dir, _ = coco
        source, train_size, eval_size = ["--dataset", path, "--image-root", images_dir], 18, 2
    else:
        source, train_size, eval_size = ["--dataset", karpathy[0]], 11, 3
    r = run("train.py", *source, "--model", tiny_model_dir, "--max-steps", "2", "--eval-steps", "2",
            "--batch-size", "4", "--grad-accum", "1", "--precision", "fp32", "--num-examples", "1",
            "--preprocessing-num-workers", "1", "--output-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout + r.stderr
    sizes = re.search(r"^train (\d+) images\b.*\beval (\d+)\b", said, re.M)
    assert sizes and sizes.groups() == (str(train_size), str(eval_size)), said[-3000:]
    assert not (tmp_path / "run" / "skipped.txt").exists()
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [2]


# ---------------------------------------------------------------------------------------------
# The load-time measurement quoted in the README: files of COCO train2017's and Karpathy dataset_coco.json's size

WORDS = ("a man woman dog cat sitting on the table with red blue large small riding bike street near next to of in "
         "and").split()


def write_big_files(folder):
    """captions_train2017.json-sized (118,287 images, 5 captions each, COCO's keys) and dataset_coco.json-sized
    (123,287 images with tokens) files, their images hard links to a few small JPEGs (ext4 allows 65,000 links
    to a file)."""
    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."  # noqa: E731
    image, _ = synthetic.scene(0, 0)

    def link(k, path):
        source = os.path.join(folder, f"source-{k // 60000}.jpg")
        if not os.path.exists(source):
            image.save(source)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            os.link(source, path)

    images, sentences = [], 0
    for i in range(123287):
        sub = "train2014" if i % 2 else "val2014"
        link(i, os.path.join(folder, sub, f"COCO_{sub}_{i:012d}.jpg"))
        split = "train" if i < 113287 else "val" if i < 118287 else "test"
        raws = [sentence() for _ in range(5)]
        images.append({"filepath": sub, "sentids": list(range(sentences, sentences + 5)),
                       "filename": f"COCO_{sub}_{i:012d}.jpg", "imgid": i, "cocoid": i,
                       "split": "restval" if split == "train" and i % 3 == 0 else split,
                       "sentences": [{"tokens": r.lower().rstrip(".").split(), "raw": r, "imgid": i,
                                      "sentid": sentences + j} for j, r in enumerate(raws)]})
        sentences += 5
    with open(os.path.join(folder, "dataset_coco.json"), "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)
    images, annotations = [], []
    for i in range(118287):
        link(200000 + i, os.path.join(folder, "train2017", f"{i:012d}.jpg"))
        images.append({"license": 3, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640,
                       "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
                       "date_captured": "2013-11-14 11:18:45", "flickr_url": f"http://farm9.staticflickr.com/{i}_z.jpg",
                       "id": i})
    for k in range(5 * 118287):
        annotations.append({"image_id": rng.randrange(118287), "id": k, "caption": sentence()})
    with open(os.path.join(folder, "captions_train2017.json"), "w") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations}, f)


def measure(folder):
    """Each step in a process of its own: Linux carries a process's peak memory over into the programs it starts."""
    if not os.path.exists(os.path.join(folder, "captions_train2017.json")):
        os.makedirs(folder, exist_ok=True)
        subprocess.run([sys.executable, __file__, "write", folder], check=True)
    for name, root in (("captions_train2017.json", "train2017"), ("dataset_coco.json", None)):
        path = os.path.join(folder, name)
        r = subprocess.run([sys.executable, __file__, "load", path, *([os.path.join(folder, root)] if root else [])],
                           capture_output=True, text=True, env=ENV, check=True)
        print(f"{name}: {os.path.getsize(path) / 1e6:.0f} MB, {r.stdout.strip()}")


def load_once(path, root=None):
    importlib.import_module("datasets")  # before the clock starts, as train.py has it by then

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    train, held_out = sources.load_tables(flags(path, image_root=root))
    seconds = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"train {len(train)}, eval {len(held_out)} in {seconds:.2f} s, peak memory +{grown:.0f} MB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        measure(sys.argv[2])
    elif sys.argv[1:2] == ["write"]:
        write_big_files(sys.argv[2])
    elif sys.argv[1:2] == ["load"]:
        load_once(*sys.argv[2:])
    else:
        sys.exit(__doc__)
