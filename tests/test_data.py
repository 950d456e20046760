import argparse
import csv
import io
import json
import os
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from captioning import batches, decode, errors, image_cache, sources, synthetic
from conftest import in_process


def rows(source, test_size=0.1, seed=0):
    train, held_out = sources.split_source(source, test_size, seed)
    return sources.read_rows(train, "image", "text", "train"), sources.read_rows(held_out, "image", "text", "eval")


def test_synthetic_is_deterministic_and_compositional():
    a = synthetic.dataset(20, seed=3)
    b = synthetic.dataset(20, seed=3)
    assert list(a["text"]) == list(b["text"]) == [synthetic.scene(3, i)[1] for i in range(20)]
    assert np.array_equal(np.asarray(a[5]["image"]), np.asarray(b[5]["image"]))
    assert np.array_equal(np.asarray(a[5]["image"]), np.asarray(synthetic.scene(3, 5)[0]))
    assert list(synthetic.dataset(20, seed=4)["text"]) != list(a["text"])
    for caption in a["text"]:
        for phrase in caption.split(" and "):
            words = phrase.split()
            assert words[0] == "a" and words[1] in synthetic.SIZES and words[2] in synthetic.COLORS
            assert words[3] in synthetic.SHAPES and " ".join(words[4:]) in synthetic.PLACES.values()


def test_imagefolder_jsonl_source(imagefolder):
    (train_images, train_caps), (eval_images, eval_caps) = rows(sources.load_source(imagefolder))
    assert len(train_images) == 36 and len(eval_images) == 4
    assert all(im.mode == "RGB" for im in train_images)
    truth = {json.loads(l)["text"] for l in open(os.path.join(imagefolder, "metadata.jsonl"))}
    assert {c[0] for c in train_caps + eval_caps} == truth


def test_imagefolder_csv_source_with_own_caption_column(tmp_path):
    for i in range(10):
        img, _ = synthetic.scene(0, i)
        img.save(tmp_path / f"{i}.png")
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows([[f"{i}.png", f"scene number {i}"] for i in range(10)])
    train, held_out = sources.split_source(sources.load_source(str(tmp_path)), 0.2, 0)
    images, caps = sources.read_rows(train, "image", "caption", "train")
    assert len(images) == 8 and all(c[0].startswith("scene number") for c in caps)
    with pytest.raises(errors.DataError, match=r"no column 'text' \(--text-column\); columns are: image, caption"):
        sources.read_rows(train, "image", "text", "train")


def test_save_to_disk_source_uses_its_own_validation_split(tmp_path):
    ds = datasets.DatasetDict({"train": synthetic.dataset(12, seed=0), "validation": synthetic.dataset(5, seed=9)})
    ds.save_to_disk(str(tmp_path / "saved"))
    (train_images, _), (eval_images, eval_caps) = rows(sources.load_source(str(tmp_path / "saved")))
    assert len(train_images) == 12 and len(eval_images) == 5
    assert [c[0] for c in eval_caps] == list(ds["validation"]["text"])


def test_unreachable_hub_dataset_and_missing_folder_are_one_line_errors(tmp_path):
    with pytest.raises(errors.DataError, match="dataset 'nobody/no-such-captions' is not a local folder and could not be loaded") as e:
        sources.load_source("nobody/no-such-captions")
    assert "\n" not in str(e.value)
    with pytest.raises(errors.DataError, match="does not exist"):
        sources.load_source(str(tmp_path / "nope") + "/")
    with pytest.raises(errors.DataError, match="neither metadata"):
        sources.load_source(str(tmp_path))


def test_a_hub_dataset_that_is_reached_but_unreadable_is_one_line_with_the_reason(monkeypatch):
    import pyarrow

    def damaged(name):
        raise pyarrow.lib.ArrowInvalid("JSON parse error: Missing a name for object member. in row 4\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", damaged)
    with pytest.raises(errors.DataError) as e:
        sources.load_source("someone/captions")
    assert str(e.value) == ("dataset 'someone/captions' (Hugging Face Hub) could not be loaded: ArrowInvalid: "
                            "JSON parse error: Missing a name for object member. in row 4")


def test_list_of_captions_draws_one_per_epoch_and_keeps_all_for_evaluation(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    refs = [["a red circle", "a blue square", "a green triangle", "a small star"]] * 8
    images = [synthetic.scene(0, i)[0] for i in range(8)]
    ds = batches.build_dataset(images, refs, processor, max_text_length=32, seed=5)
    decode = lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert [[decode(ids) for ids in ds.token_ids[i]] for i in range(8)] == refs  # every reference tokenised
    assert {decode(ds[i][1][0]) for i in range(8)} == {"a red circle"}  # evaluation: the first
    ds.set_epoch(0)
    epoch0 = [decode(ds[i][1][0]) for i in range(8)]
    assert len(set(epoch0)) > 1  # a draw per image, not one per epoch
    # A resumed run builds its dataset afresh and may arrive at the epoch from another one.
    resumed = batches.build_dataset(images, refs, processor, max_text_length=32, seed=5)
    resumed.set_epoch(3)
    [resumed[i] for i in range(8)]
    resumed.set_epoch(0)
    assert [decode(resumed[i][1][0]) for i in range(8)] == epoch0
    reseeded = batches.build_dataset(images, refs, processor, max_text_length=32, seed=6)
    reseeded.set_epoch(0)
    assert [decode(reseeded[i][1][0]) for i in range(8)] != epoch0  # the draw follows --seed
    drawn = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        drawn |= {decode(ds[i][1][0]) for i in range(8)}
    assert drawn == set(refs[0])


def test_collate_pads_to_the_longest_caption_and_masks_padding():
    pixels = torch.zeros(3, 4, 4)
    batch = batches.collate([(pixels, [[2, 7, 3]], 0), (pixels, [[2, 7, 8, 9, 3]], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 7, 3, 0, 0], [2, 7, 8, 9, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[2, 7, 3, -100, -100], [2, 7, 8, 9, 3]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["index"].tolist() == [0, 1]


def test_captions_are_truncated_and_images_preprocessed_once(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    calls = []
    original = processor.image_processor.__class__.__call__

    class Counting(processor.image_processor.__class__):
        def __call__(self, images, **kw):
            calls.append(len(images))
            return original(self, images, **kw)

    processor.image_processor.__class__ = Counting
    images = [synthetic.scene(0, i)[0] for i in range(10)]
    ds = batches.build_dataset(images, [["a " + "very " * 40 + "long caption"]] * 10, processor, max_text_length=12)
    assert sum(calls) == 10 and ds.pixels.shape == (10, 3, 64, 64)
    loader = batches.make_loader(ds, 4, batches.EpochSampler(10, seed=0), pad_id=0)
    for epoch in range(2):
        ds.set_epoch(epoch)
        for batch in loader:
            assert batch["input_ids"].shape[1] == 12
            assert (batch["input_ids"][:, -1] == processor.tokenizer.sep_token_id).all()
    assert sum(calls) == 10


def test_epoch_sampler_is_seeded_and_resumes_mid_epoch():
    s = batches.EpochSampler(10, seed=1)
    s.set_epoch(2)
    full = list(s)
    assert sorted(full) == list(range(10))
    s.set_epoch(3)
    assert list(s) != full
    s.set_epoch(2, start=4)
    assert list(s) == full[4:] and len(s) == 6


def test_ranks_share_one_permutation_and_eval_shards_score_each_item_once():
    one = batches.EpochSampler(12, seed=5)
    ranks = [batches.EpochSampler(12, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for s in [one] + ranks:
        s.set_epoch(4)
    # The first global batch of 6 in one process is the union of each rank's first batch of 2.
    assert sorted(list(one)[:6]) == sorted(i for s in ranks for i in list(s)[:2])
    ranks[1].set_epoch(4, start=6)  # the samples all ranks took together: 2 each
    assert list(ranks[1]) == list(one)[7::3]
    shards = [list(batches.ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))


class WorkerSeed(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.zeros(1, 1, 1), [[1]], torch.initial_seed()  # (pixels, [ids of each caption], index) for collate


def test_worker_seeds_depend_on_the_epoch_only_so_a_resume_gets_the_same_ones():
    def seeds(loader, epoch):
        return [b["index"].tolist() for b in batches.epoch_batches(loader, epoch, seed=3)]

    def loader():
        return batches.make_loader(WorkerSeed(), 2, batches.EpochSampler(8, seed=3), pad_id=0, num_workers=2)

    ran_through = loader()
    seeds(ran_through, 0)
    epoch_one = seeds(ran_through, 1)
    assert epoch_one != seeds(ran_through, 0)  # epochs get other worker seeds
    assert seeds(loader(), 1) == epoch_one  # a fresh loader (a resumed run) starting at epoch 1


def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_every_image_mode_becomes_upright_rgb():
    red = Image.new("RGB", (8, 4), (255, 0, 0))
    assert decode.open_image(encoded(red.convert("L"), "PNG")).mode == "RGB"
    la = Image.new("LA", (4, 4), (0, 0))  # fully transparent black: shows the white background
    assert decode.open_image(encoded(la, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert decode.open_image(encoded(rgba, "PNG")).getpixel((0, 0)) == (255, 0, 0)
    pal = red.convert("P")
    assert decode.open_image(encoded(pal, "PNG")).getpixel((0, 0)) == (255, 0, 0)
    cmyk = decode.open_image(encoded(red.convert("CMYK"), "JPEG", quality=100))
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 2))[0] > 200 and cmyk.getpixel((4, 2))[2] < 60
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    assert deep.mode.startswith("I")
    grey = decode.open_image(encoded(deep, "PNG")).getpixel((0, 0))
    assert 120 <= grey[0] <= 135 and grey[0] == grey[1] == grey[2]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    rotated = decode.open_image(encoded(red, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (4, 8)


def test_bad_images_name_the_file(tmp_path):
    with pytest.raises(errors.DataError, match="nope.png: no such file"):
        decode.open_image(str(tmp_path / "nope.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(errors.DataError, match="text.png: not a readable image"):
        decode.open_image(str(tmp_path / "text.png"))


def test_a_list_column_gives_several_references_per_image(tmp_path):
    scenes = synthetic.dataset(6, seed=2)
    refs = [[t, t.upper() + "!"] for t in scenes["text"]]
    table = datasets.Dataset.from_dict({"image": list(scenes["image"]), "captions": refs},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "captions": datasets.Sequence(datasets.Value("string"))}))
    table.save_to_disk(str(tmp_path / "multi"))
    images, captions = sources.read_rows(sources.load_source(str(tmp_path / "multi")), "image", "captions", "train")
    assert captions == refs and len(images) == 6


def test_uint8_pixels_normalised_in_collate_equal_the_processors_output(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    images = [synthetic.scene(3, i, size=300)[0] for i in range(5)]
    ds = batches.build_dataset(images, [["a caption"]] * 5, processor, max_text_length=12)
    assert ds.pixels.dtype == np.uint8 and ds.pixels.shape == (5, 3, 64, 64)
    batch = next(iter(batches.make_loader(ds, 5, batches.EpochSampler(5, shuffle=False), pad_id=0)))
    expected = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected, atol=1e-6, rtol=0)


def test_prepared_splits_are_cached_and_reread_without_decoding(imagefolder, tmp_path, tiny_model_dir, monkeypatch):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    folder = tmp_path / "data"
    shutil.copytree(imagefolder, folder)
    os.remove(folder / "000003.png")  # a bad row: listed in `skipped`, also when read from the cache
    table = sources.load_source(str(folder))["train"]
    skipped = []
    fresh, captions = image_cache.prepare_split(table, "image", "text", "train", processor.image_processor, skipped,
                                         str(tmp_path / "cache"))
    assert len(captions) == 39 and len(skipped) == 1 and "000003.png" in skipped[0]

    decoded, real_open = [], decode.open_image
    monkeypatch.setattr(decode, "open_image",
                        lambda source, **options: decoded.append(source) or real_open(source, **options))
    again_skipped = []
    cached, again = image_cache.prepare_split(table, "image", "text", "train", processor.image_processor, again_skipped,
                                       str(tmp_path / "cache"))
    assert decoded == [] and isinstance(cached, np.memmap)  # read from disk, mapped, not decoded
    assert np.array_equal(cached, fresh) and again == captions and again_skipped == skipped
    with pytest.raises(errors.DataError, match="000003.png"):  # --on-bad-sample error, from the cache too
        image_cache.prepare_split(table, "image", "text", "train", processor.image_processor, None, str(tmp_path / "cache"))
    in_memory, _ = image_cache.prepare_split(table.select(range(10)), "image", "text", "train", processor.image_processor,
                                      [], None)
    assert len(decoded) == 10 and len(in_memory) == 9  # no cache: decoded every time (row 3 is the bad one)
    assert sorted(os.listdir(tmp_path / "cache"))[0].startswith("train-") and len(os.listdir(tmp_path / "cache")) == 1


def test_a_fifo_and_an_image_over_the_pixel_limit_are_bad_rows_not_a_hang(tmp_path, tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir).image_processor
    folder = tmp_path / "data"
    sources.write_imagefolder(synthetic.dataset(4, seed=3), str(folder))
    os.mkfifo(folder / "pipe.png")  # nothing writes to it: a read would wait forever
    Image.new("L", (12000, 12000), 90).save(folder / "huge.png")  # 144 Mpx in a small file
    with open(folder / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "pipe.png", "text": "a pipe"}\n{"file_name": "huge.png", "text": "a grey square"}\n')
    table = sources.load_source(str(folder))["train"]
    skipped = []
    _, captions = image_cache.prepare_split(table, "image", "text", "train", processor, skipped, str(tmp_path / "cache"),
                                        num_workers=2)
    assert len(captions) == 4
    assert skipped == [f"train row 4 ({folder / 'pipe.png'}): a FIFO, not an image file; only regular files are read",
                       f"train row 5 ({folder / 'huge.png'}): refused, too many pixels: 12000 x 12000 is 144.0 Mpx, "
                       f"over --max-image-pixels 40,000,000"]
    skipped = []  # the limit decides the rows kept, so it names its own cache entry
    _, captions = image_cache.prepare_split(table, "image", "text", "train", processor, skipped, str(tmp_path / "cache"),
                                        max_pixels=0)
    assert captions[-1] == ["a grey square"] and len(skipped) == 1 and "pipe.png" in skipped[0]
    assert len(os.listdir(tmp_path / "cache")) == 2


# ---------------------------------------------------------------------------------------------
# Bad data named in one line: metadata lines, damaged save_to_disk folders, captions without words, small splits

def scenes(folder, n=6, seed=5):
    sources.write_imagefolder(synthetic.dataset(n, seed=seed), str(folder))
    return folder


def load_error(folder):
    with pytest.raises(errors.DataError) as e:
        sources.load_source(str(folder))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("line, problem", [
    # the closing brace lost: pyarrow said "JSON parse error: ... in row 3"
    ('{"file_name": "000003.png", "text": "a red circle"', "not valid JSON (Expecting ',' delimiter: column 51)"),
    ('{"text": "a red circle"}', "no 'file_name' naming the image"),
    ('{"file_name": null, "text": "a red circle"}', "no 'file_name' naming the image"),
    ('{"file_name": "000003.png", "text": 7}', "'text' is a number here but a string on line 1"),
    ('["000003.png", "a red circle"]', "not a JSON object ({...}) but a list of strings"),
    ('{"file_name": "../000003.png", "text": "x"}', "file_name '../000003.png' must be a path inside"),
    # json decodes these escapes to a str holding a lone surrogate; pyarrow said "ArrowInvalid: JSON parse error:
    # The surrogate pair in string is invalid. in row 3"
    (r'{"file_name": "000003.png", "text": "caf\udce9"}',
     r"'text' holds \udce9, a lone surrogate escape, not a character; it stands for the byte 0xe9 of text that "
     r"was not UTF-8"),
    (r'{"file_name": "000003.png", "text": ["a circle", "a smile \ud83d"]}',
     r"'text' holds \ud83d, a lone surrogate escape, not a character; write the character itself"),
], ids=["not JSON", "no file_name", "null file_name", "caption type", "not an object", "outside the folder",
        "lone surrogate", "lone surrogate in a list"])
def test_a_bad_metadata_jsonl_line_is_named_by_its_number(tmp_path, line, problem):
    folder = scenes(tmp_path / "scenes")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[3] = line
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert load_error(folder).startswith(f"{folder}/metadata.jsonl line 4: {problem}")


def test_metadata_jsonl_that_is_not_utf8_or_empty_is_named(tmp_path):
    folder = scenes(tmp_path / "scenes")
    lines = (folder / "metadata.jsonl").read_bytes().splitlines()
    lines[4] = b'{"file_name": "000004.png", "text": "caf\xe9"}'  # Latin-1
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines[:2] + [b""] + lines[2:]) + b"\n")  # a blank line counts
    assert load_error(folder) == f"{folder}/metadata.jsonl line 6: not UTF-8 (byte 0xe9 at column 41); save it as UTF-8"
    (folder / "metadata.jsonl").write_text("\n\n")
    assert load_error(folder).startswith(f"{folder}/metadata.jsonl has no rows")


def write_csv(folder, text):
    os.remove(folder / "metadata.jsonl")
    (folder / "metadata.csv").write_bytes(text if isinstance(text, bytes) else text.encode())


CSV = "file_name,text\n" + "".join(f"{i:06d}.png,scene {i}\n" for i in range(6))


@pytest.mark.parametrize("text, problem", [
    (CSV.replace("scene 3", "a red, circle"), "line 5: 3 fields but the header (line 1) has 2"),
    (CSV.replace(",scene 3", ""), "line 5: 1 field but the header (line 1) has 2"),
    (CSV.replace("scene 3", '"a red circle'), "line 5: a quoted field opens here and is never closed"),
    (CSV.replace("scene 3", '"a red" circle'), "line 5: bad quoting (',' expected after '\"')"),
    (CSV.replace("000003.png", ""), "line 5: no 'file_name' naming the image"),
    (CSV.encode().replace(b"scene 3", b"caf\xe9"), "line 5: not UTF-8 (byte 0xe9 at column 15)"),
    # a quoted caption over two lines: the bad record after it is still named by its own line
    (CSV.replace("scene 1", '"scene\none"').replace("scene 3", "a, b"), "line 6: 3 fields"),
    (CSV.replace("file_name", "image"), "line 1: no file_name column in the header (columns: image, text)"),
    ("file_name,text\n", "has no rows"),
], ids=["too many fields", "too few fields", "unclosed quote", "bad quoting", "no file name", "latin-1",
        "after a two-line record", "no file_name column", "header only"])
def test_a_bad_metadata_csv_record_is_named_by_its_line(tmp_path, text, problem):
    folder = scenes(tmp_path / "scenes")
    write_csv(folder, text)
    message = load_error(folder)
    assert message.startswith(f"{folder}/metadata.csv {problem}"), message


def test_a_missing_image_is_a_bad_row_named_by_its_metadata_line(tmp_path):
    folder = scenes(tmp_path / "scenes")
    os.remove(folder / "000002.png")
    table = sources.load_source(str(folder))["train"]
    skipped = []
    images, captions = sources.read_rows(table, "image", "text", "train", skipped)
    assert len(images) == 5 and len(skipped) == 1
    assert skipped[0] == (f"train row 2 ({folder / '000002.png'}, named on {folder}/metadata.jsonl line 3): "
                          f"no such file")
    with pytest.raises(errors.DataError, match=r"metadata.jsonl line 3\): no such file"):  # --on-bad-sample error
        sources.read_rows(table, "image", "text", "train")


def test_a_surrogate_pair_escape_is_one_character_and_loads(tmp_path):
    folder = scenes(tmp_path / "scenes")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[3] = r'{"file_name": "000003.png", "text": "a smile \ud83d\ude00 and a \u00e9"}'  # as ensure_ascii writes it
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    images, captions = sources.read_rows(sources.load_source(str(folder))["train"], "image", "text", "train")
    assert len(images) == 6 and captions[3] == ["a smile \U0001F600 and a \u00e9"]


def test_a_backslash_in_a_file_name_is_a_folder_separator_as_datasets_reads_it(tmp_path):
    # datasets (5.2) reads file_name "sub\\000004.png" as sub/000004.png, as metadata written on Windows means
    # it; so a file named back\slash.png (legal on Linux) is looked for as back/slash.png and not found
    folder = scenes(tmp_path / "scenes")
    os.makedirs(folder / "sub")
    os.rename(folder / "000004.png", folder / "sub" / "000004.png")
    os.rename(folder / "000002.png", folder / "back\\slash.png")
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    rows[2]["file_name"], rows[4]["file_name"] = "back\\slash.png", "sub\\000004.png"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = sources.load_source(str(folder))["train"]
    skipped = []
    images, captions = sources.read_rows(table, "image", "text", "train", skipped)
    assert skipped == [f"train row 2 ({folder / 'back' / 'slash.png'}, named on {folder}/metadata.jsonl line 3, "
                       f"whose backslash datasets reads as a folder separator: rename the file back\\slash.png): "
                       f"no such file"]
    assert captions == [[r["text"]] for k, r in enumerate(rows) if k != 2]
    with Image.open(folder / "sub" / "000004.png") as expected:
        assert np.array_equal(np.asarray(images[3]), np.asarray(expected.convert("RGB")))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "dict"
    datasets.DatasetDict({"train": synthetic.dataset(8, seed=0), "validation": synthetic.dataset(3, seed=9)}) \
        .save_to_disk(str(out))
    return out


def truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


ARROW = "data-00000-of-00001.arrow"
DAMAGE = {
    "truncated arrow": (lambda d: truncate(d / "train" / ARROW), f"train/{ARROW}: not a whole Arrow file (OSError: "),
    "empty arrow": (lambda d: truncate(d / "train" / ARROW, 0), f"train/{ARROW}: not a whole Arrow file (ArrowInvalid"),
    "arrow deleted": (lambda d: os.remove(d / "validation" / ARROW),
                      f"validation/{ARROW} is missing (named in {{saved}}/validation/state.json)"),
    "dataset_info.json garbled": (lambda d: (d / "train" / "dataset_info.json").write_text('{"features": {'),
                                  "train/dataset_info.json: not valid JSON (Expecting property name enclosed in double "
                                  "quotes: line 1 column 15); the save_to_disk folder is damaged"),
    "state.json empty": (lambda d: (d / "train" / "state.json").write_text(""),
                         "train/state.json: not valid JSON (Expecting value: line 1 column 1)"),
    "state.json without its file list": (lambda d: (d / "train" / "state.json").write_text('{"_fingerprint": "x"}'),
                                         'train/state.json: no "_data_files" list of file names'),
    "state.json deleted": (lambda d: os.remove(d / "train" / "state.json"), "train/state.json is missing"),
    "dataset_dict.json garbled": (lambda d: (d / "dataset_dict.json").write_text("splits: train"),
                                  "dataset_dict.json: not valid JSON (Expecting value: line 1 column 1)"),
    "split folder deleted": (lambda d: shutil.rmtree(d / "validation"), "validation/dataset_info.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_save_to_disk_folder_is_one_line_naming_the_file(saved, tmp_path, damage):
    folder = tmp_path / "saved"
    shutil.copytree(saved, folder)
    harm, problem = DAMAGE[damage]
    harm(folder)
    message = load_error(folder)
    assert message.startswith(f"{folder}/{problem.format(saved=folder)}"), message


def test_a_caption_without_words_is_a_bad_row_and_leaves_a_list_of_references(tmp_path):
    drawn = synthetic.dataset(4, seed=6)
    refs = [["..."], ["a cat", "¡¿", " "], ["!!!", ""], ["a dog."]]
    table = datasets.Dataset.from_dict({"image": list(drawn["image"]), "text": refs})
    skipped = []
    images, captions = sources.read_rows(table, "image", "text", "eval", skipped)
    assert captions == [["a cat"], ["a dog."]] and len(images) == 2
    assert [line.split(": ", 1)[1] for line in skipped] == [
        "caption '...' in column 'text' has no words (only punctuation or symbols)",
        "caption '!!!' in column 'text' has no words (only punctuation or symbols)"]
    assert [line.split(" (")[0] for line in skipped] == ["eval row 0", "eval row 2"]
    with pytest.raises(errors.DataError, match=r"^eval row 0 .*'\.\.\.' in column 'text' has no words"):
        sources.read_rows(table, "image", "text", "eval")
    assert sources.caption_texts(table, "text") == ["a cat", "a dog."]  # what a tiny GIT learns its tokenizer from


def test_too_few_rows_to_split_is_one_line_saying_what_is_needed():
    with pytest.raises(errors.DataError) as e:
        sources.split_source(synthetic.dataset(1, seed=0), 0.1, 0)
    assert str(e.value) == ("1 row cannot be split into train and eval with --test-size 0.1 (0 to train on, 1 to "
                            "evaluate): that needs at least 2 rows, or a source with its own validation split")
    with pytest.raises(errors.DataError, match=r"^5 rows .* --test-size 0.9 \(0 to train on, 5 to evaluate\): "
                                             r"that needs at least 10 rows"):
        sources.split_source(synthetic.dataset(5, seed=0), 0.9, 0)
    train, held_out = sources.split_source(synthetic.dataset(10, seed=0), 0.9, 0)  # the 10 it asked for are enough
    assert (len(train), len(held_out)) == (1, 9)
    empty = datasets.DatasetDict({"train": synthetic.dataset(4, seed=0),
                                  "validation": synthetic.dataset(3, seed=0).select([])})
    with pytest.raises(errors.DataError, match=r"^the dataset's 'validation' split has no rows$"):
        sources.split_source(empty, 0.1, 0)


def test_imagefolder_with_split_folders_and_with_split_words_in_its_file_names(tmp_path):
    scenes(tmp_path / "splits" / "train", n=6, seed=1)
    scenes(tmp_path / "splits" / "validation", n=3, seed=2)
    train, held_out = sources.split_source(sources.load_source(str(tmp_path / "splits")), 0.1, 0)
    assert (len(train), len(held_out)) == (6, 3)
    assert list(held_out["text"]) == list(synthetic.dataset(3, seed=2)["text"])
    # COCO's names: `datasets` reads "train" in them as a split name and, left to itself, ignores the
    # top-level metadata.jsonl, leaving a table of images without captions
    folder = scenes(tmp_path / "coco", n=4, seed=3)
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    for row in rows:
        row["file_name"] = f"COCO_train2014_{row['file_name']}"
        os.rename(folder / row["file_name"].removeprefix("COCO_train2014_"), folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = sources.load_source(str(folder))["train"]
    assert sorted(table.column_names) == ["image", "text"] and list(table["text"]) == [r["text"] for r in rows]


def test_an_imagefolder_without_a_caption_column_is_one_line(tmp_path):
    folder = scenes(tmp_path / "scenes")
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": r["file_name"]}) + "\n" for r in rows))
    args = argparse.Namespace(dataset=str(folder), seed=0, synthetic_size=10, test_size=0.5, image_column="image",
                              text_column="text")
    no_text = r"^train split has no column 'text' \(--text-column\); columns are: image$"
    with pytest.raises(errors.DataError, match=no_text):
        sources.load_tables(args)


def train_cli(tmp_path, *args):
    return in_process("train", *args, cwd=tmp_path)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_train_stops_at_a_malformed_metadata_line_in_one_line(tmp_path, tiny_model_dir, kind):
    folder = scenes(tmp_path / "scenes", n=12)
    if kind == "jsonl":
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        lines[3] = lines[3][:-1]  # the closing brace lost: pyarrow's "JSON parse error ... in row 3" before
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        expected = f"error: {folder}/metadata.jsonl line 4: not valid JSON ("
    else:
        write_csv(folder, "file_name,text\n" + "".join(f"{i:06d}.png,scene {i}\n" for i in range(12)).replace(
            "scene 3", "scene, three"))  # pandas: "Error tokenizing data. C error: Expected 2 fields in line 5, saw 3"
        expected = f"error: {folder}/metadata.csv line 5: 3 fields but the header (line 1) has 2"
    proc = train_cli(tmp_path, "--dataset", str(folder), "--model", tiny_model_dir, "--max-steps", "1",
                     "--precision", "fp32", "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(expected), proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoint-1")


def test_a_held_out_caption_without_words_is_skipped_and_the_run_is_scored(tmp_path, tiny_model_dir, capsys):
    import train

    held_out = synthetic.dataset(4, seed=8)
    texts = list(held_out["text"])
    texts[1] = "..."  # before: "ValueError: row 1: empty reference caption" at the first evaluation
    source = datasets.DatasetDict({"train": synthetic.dataset(16, seed=3),
                                   "validation": held_out.remove_columns("text").add_column("text", texts)})
    source.save_to_disk(str(tmp_path / "saved"))
    argv = ["--dataset", str(tmp_path / "saved"), "--model", tiny_model_dir, "--max-steps", "2", "--eval-steps", "2",
            "--batch-size", "8", "--grad-accum", "1", "--precision", "fp32", "--num-examples", "1"]
    out = tmp_path / "run"
    train.main([*argv, "--output-dir", str(out)])
    listed = (out / "skipped.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith("eval row 1 ") and "'...'" in listed[0] and "no words" in listed[0]
    scores = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [s["step"] for s in scores] == [2]
    assert all(np.isfinite(scores[0][k]) for k in ("wer", "cer", "bleu4", "rouge_l", "cider_d"))
    assert (out / "best" / "config.json").exists()

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--output-dir", str(tmp_path / "strict"), "--on-bad-sample", "error"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: eval row 1 ")
