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

import batches
import data
import synthetic


def rows(source, test_size=0.1, seed=0):
    train, held_out = data.split_source(source, test_size, seed)
    return data.read_rows(train, "image", "text", "train"), data.read_rows(held_out, "image", "text", "eval")


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
    (train_images, train_caps), (eval_images, eval_caps) = rows(data.load_source(imagefolder))
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
    train, held_out = data.split_source(data.load_source(str(tmp_path)), 0.2, 0)
    images, caps = data.read_rows(train, "image", "caption", "train")
    assert len(images) == 8 and all(c[0].startswith("scene number") for c in caps)
    with pytest.raises(data.DataError, match=r"no column 'text' \(--text-column\); columns are: image, caption"):
        data.read_rows(train, "image", "text", "train")


def test_save_to_disk_source_uses_its_own_validation_split(tmp_path):
    ds = datasets.DatasetDict({"train": synthetic.dataset(12, seed=0), "validation": synthetic.dataset(5, seed=9)})
    ds.save_to_disk(str(tmp_path / "saved"))
    (train_images, _), (eval_images, eval_caps) = rows(data.load_source(str(tmp_path / "saved")))
    assert len(train_images) == 12 and len(eval_images) == 5
    assert [c[0] for c in eval_caps] == list(ds["validation"]["text"])


def test_unreachable_hub_dataset_and_missing_folder_are_one_line_errors(tmp_path):
    with pytest.raises(data.DataError, match="dataset 'nobody/no-such-captions' is not a local folder and could not be loaded") as e:
        data.load_source("nobody/no-such-captions")
    assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_source(str(tmp_path / "nope") + "/")
    with pytest.raises(data.DataError, match="neither metadata"):
        data.load_source(str(tmp_path))


def test_list_of_captions_draws_one_per_epoch_and_keeps_all_for_evaluation(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    refs = [["a red circle", "a blue square", "a green triangle", "a small star"]] * 8
    images = [synthetic.scene(0, i)[0] for i in range(8)]
    ds = batches.build_dataset(images, refs, processor, max_text_length=32, seed=5)
    decode = lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert [[decode(ids) for ids in ds.token_ids[i]] for i in range(8)] == refs  # every reference tokenised
    assert {decode(ds[i][1]) for i in range(8)} == {"a red circle"}  # evaluation: the first
    ds.set_epoch(0)
    epoch0 = [decode(ds[i][1]) for i in range(8)]
    assert len(set(epoch0)) > 1  # a draw per image, not one per epoch
    # A resumed run builds its dataset afresh and may arrive at the epoch from another one.
    resumed = batches.build_dataset(images, refs, processor, max_text_length=32, seed=5)
    resumed.set_epoch(3)
    [resumed[i] for i in range(8)]
    resumed.set_epoch(0)
    assert [decode(resumed[i][1]) for i in range(8)] == epoch0
    reseeded = batches.build_dataset(images, refs, processor, max_text_length=32, seed=6)
    reseeded.set_epoch(0)
    assert [decode(reseeded[i][1]) for i in range(8)] != epoch0  # the draw follows --seed
    drawn = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        drawn |= {decode(ds[i][1]) for i in range(8)}
    assert drawn == set(refs[0])


def test_collate_pads_to_the_longest_caption_and_masks_padding():
    pixels = torch.zeros(3, 4, 4)
    batch = batches.collate([(pixels, [2, 7, 3], 0), (pixels, [2, 7, 8, 9, 3], 1)], pad_id=0)
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
    ranks[1].set_epoch(4, start=2)
    assert list(ranks[1]) == list(one)[7::3]
    shards = [list(batches.ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))


class WorkerSeed(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.zeros(1, 1, 1), [1], torch.initial_seed()  # (pixels, ids, index) for collate


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
    assert data.open_image(encoded(red.convert("L"), "PNG")).mode == "RGB"
    la = Image.new("LA", (4, 4), (0, 0))  # fully transparent black: shows the white background
    assert data.open_image(encoded(la, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert data.open_image(encoded(rgba, "PNG")).getpixel((0, 0)) == (255, 0, 0)
    pal = red.convert("P")
    assert data.open_image(encoded(pal, "PNG")).getpixel((0, 0)) == (255, 0, 0)
    cmyk = data.open_image(encoded(red.convert("CMYK"), "JPEG", quality=100))
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 2))[0] > 200 and cmyk.getpixel((4, 2))[2] < 60
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    assert deep.mode.startswith("I")
    grey = data.open_image(encoded(deep, "PNG")).getpixel((0, 0))
    assert 120 <= grey[0] <= 135 and grey[0] == grey[1] == grey[2]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    rotated = data.open_image(encoded(red, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (4, 8)


def test_bad_images_name_the_file(tmp_path):
    with pytest.raises(data.DataError, match="nope.png: no such file"):
        data.open_image(str(tmp_path / "nope.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(data.DataError, match="text.png: not a readable image"):
        data.open_image(str(tmp_path / "text.png"))


def test_a_list_column_gives_several_references_per_image(tmp_path):
    scenes = synthetic.dataset(6, seed=2)
    refs = [[t, t.upper() + "!"] for t in scenes["text"]]
    table = datasets.Dataset.from_dict({"image": list(scenes["image"]), "captions": refs},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "captions": datasets.Sequence(datasets.Value("string"))}))
    table.save_to_disk(str(tmp_path / "multi"))
    images, captions = data.read_rows(data.load_source(str(tmp_path / "multi")), "image", "captions", "train")
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
    table = data.load_source(str(folder))["train"]
    skipped = []
    fresh, captions = batches.prepare_split(table, "image", "text", "train", processor.image_processor, skipped,
                                         str(tmp_path / "cache"))
    assert len(captions) == 39 and len(skipped) == 1 and "000003.png" in skipped[0]

    decoded, real_open = [], data.open_image
    monkeypatch.setattr(data, "open_image", lambda source: decoded.append(source) or real_open(source))
    again_skipped = []
    cached, again = batches.prepare_split(table, "image", "text", "train", processor.image_processor, again_skipped,
                                       str(tmp_path / "cache"))
    assert decoded == [] and isinstance(cached, np.memmap)  # read from disk, mapped, not decoded
    assert np.array_equal(cached, fresh) and again == captions and again_skipped == skipped
    with pytest.raises(data.DataError, match="000003.png"):  # --on-bad-sample error, from the cache too
        batches.prepare_split(table, "image", "text", "train", processor.image_processor, None, str(tmp_path / "cache"))
    in_memory, _ = batches.prepare_split(table.select(range(10)), "image", "text", "train", processor.image_processor,
                                      [], None)
    assert len(decoded) == 10 and len(in_memory) == 9  # no cache: decoded every time (row 3 is the bad one)
    assert sorted(os.listdir(tmp_path / "cache"))[0].startswith("train-") and len(os.listdir(tmp_path / "cache")) == 1
