"""Data readers and loaders of common.py on tiny CSV, tar and ImageFolder fixtures built in tmp_path: the
item contract, determinism across worker counts, splitting across ranks and workers, mid-epoch resume,
brace expansion, corrupt files, the one-line UsageErrors, evaluation sharding, zero-shot metadata."""
import functools
import hashlib
import http.server
import io
import itertools
import os
import sys
import tarfile
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import (CLIP_MEAN, CLIP_STD, CsvDataset, DataWarning, ImageFolder, TarShards, TrainCrop,  # noqa: E402
                    TrainLoader, UsageError, eval_loader, expand_urls, make_train_loader, tokenize)

CROP = TrainCrop(16, (0.3, 1.0), CLIP_MEAN, CLIP_STD, flip=True)


def image_bytes(i, fmt="PNG", size=(24, 20)):
    img = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    img.putpixel((i % size[0], 0), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def caption(i):
    return f"sample number {i}"


@functools.lru_cache()
def _ids():
    return {tuple(tokenize(caption(i))[0].tolist()): i for i in range(400)}


def ident(tokens):
    """The fixture index of a caption's token ids."""
    return _ids()[tuple(tokens.tolist())]


def make_csv(tmp_path, n, name="data.csv", sep="\t", header=("filepath", "title")):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    lines = [sep.join(header)]
    for i in range(n):
        (tmp_path / "imgs" / f"{i:03d}.png").write_bytes(image_bytes(i))
        lines.append(sep.join((f"imgs/{i:03d}.png", caption(i))))
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def write_shard(path, samples):
    """samples: (key, {ext: bytes}) in order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shards(tmp_path, n_shards, per_shard, start=0):
    paths = []
    for s in range(n_shards):
        samples = []
        for k in range(per_shard):
            i = start + s * per_shard + k
            samples.append((f"{i:06d}", {"jpg": image_bytes(i, "JPEG"), "txt": caption(i).encode(), "json": b"{}"}))
        path = tmp_path / f"shard-{s:05d}.tar"
        write_shard(path, samples)
        paths.append(str(path))
    return paths


def make_folder(tmp_path, per_class=(3, 2, 4)):
    root = tmp_path / "folder"
    i = 0
    for c, n in enumerate(per_class):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for k in range(n):
            ext = [".png", ".JPG", ".bmp", ".webp"][k % 4]
            fmt = {".png": "PNG", ".JPG": "JPEG", ".bmp": "BMP", ".webp": "WEBP"}[ext]
            (d / f"img{k}{ext}").write_bytes(image_bytes(i, fmt))
            i += 1
        (d / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(image_bytes(0))
    return root


def assert_item(item, text):
    views, target, skipped = item
    assert isinstance(views, torch.Tensor) and views.shape == (3, 16, 16) and views.dtype == torch.float32
    if text:
        assert isinstance(target, torch.Tensor) and target.shape == (77,) and target.dtype == torch.long
    else:
        assert isinstance(target, int)
    assert isinstance(skipped, int) and skipped >= 0


def collect(loader, epoch, skip=0):
    return [tuple(b) for b in loader.batches(epoch, skip)]


# ---- item contract ---------------------------------------------------------------------------------

def test_every_source_yields_the_item_contract(tmp_path):
    csv_ds = CsvDataset(make_csv(tmp_path, 6), CROP)
    assert len(csv_ds) == 6
    assert_item(csv_ds[(1, 3)], text=True)
    assert_item(csv_ds[2], text=True)
    assert ident(csv_ds[(0, 4)][1]) == 4
    folder = ImageFolder(make_folder(tmp_path), CROP)
    assert_item(folder[(0, 1)], text=False)
    tar = TarShards(make_shards(tmp_path, 1, 4), CROP)
    assert_item(next(iter(tar)), text=True)
    shapes = common.Shapes(length=10, transform=CROP, target="label")
    assert_item(shapes[(0, 1)], text=False)


def test_collate_gives_views_targets_skipped(tmp_path):
    loader = TrainLoader(CsvDataset(make_csv(tmp_path, 8), CROP), 4, 0, 1, 0, 0)
    views, targets, skipped = next(loader.batches(0))
    assert views.shape == (4, 3, 16, 16) and targets.shape == (4, 77)
    assert skipped.dtype == torch.long and skipped.tolist() == [0, 0, 0, 0]
    two = TrainCrop(16, (0.3, 1.0), CLIP_MEAN, CLIP_STD, return_box=True)
    folder = ImageFolder(make_folder(tmp_path), two)
    (x, boxes), labels, skipped = common.collate([folder[i] for i in range(3)])
    assert x.shape == (3, 3, 16, 16) and boxes.shape == (3, 4) and labels.dtype == torch.long


def test_csv_caption_drawn_per_sample_from_several_columns(tmp_path):
    """--csv-caption-key title,description: one column per sample, drawn deterministically per (seed, epoch,
    index), both columns drawn over the rows, an empty cell falling back to the other (SLIP's YFCC loader)."""
    (tmp_path / "imgs").mkdir()
    rows = ["filepath\ttitle\tdescription"]
    for i in range(40):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(image_bytes(i))
        title, desc = caption(i), caption(100 + i)
        rows.append(f"imgs/{i}.png\t{'' if i == 0 else title}\t{'' if i == 1 else desc}")
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    ds = CsvDataset(str(tmp_path / "d.csv"), CROP, caption_key="title,description", seed=3)
    drawn = [ident(ds[(0, i)][1]) for i in range(40)]
    assert drawn == [ident(ds[(0, i)][1]) for i in range(40)]                     # deterministic
    assert drawn[0] == 100 and drawn[1] == 1                                       # empty cells fall back
    assert {d >= 100 for d in drawn[2:]} == {True, False}                          # both columns are drawn
    assert [d % 100 for d in drawn] == list(range(40))                             # always the row's own caption
    assert [ident(ds[(1, i)][1]) for i in range(40)] != drawn                      # another epoch, other draws
    assert torch.equal(ds[(0, 5)][0], CsvDataset(str(tmp_path / "d.csv"), CROP, seed=3)[(0, 5)][0])  # same crop
    with pytest.raises(UsageError, match="no column 'summary'"):
        CsvDataset(str(tmp_path / "d.csv"), CROP, caption_key="title,summary")


def test_imagefolder_classes_and_labels(tmp_path):
    ds = ImageFolder(make_folder(tmp_path, (3, 2, 4)), None)
    assert ds.classes == ["class_0", "class_1", "class_2"]  # .hidden is not a class
    assert len(ds) == 9  # notes.txt is not an image; .JPG counts
    assert [ds[i][1] for i in range(9)] == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_shapes_output_is_unchanged():
    h = hashlib.sha256()
    for split_seed, max_objects in ((0, 2), (1_000_000_007, 1)):
        for i in range(50):
            _, cap, label, _ = common.render_shapes(split_seed, i, 64, max_objects)
            h.update(cap.encode())
            h.update(str(label).encode())
    assert h.hexdigest() == "be4e83f3356944d00ad766405f82243d68c75b10c10d4d6b508262fd19a8269f"
    means = [float(np.asarray(common.render_shapes(0, i)[0]).mean()) for i in range(5)]
    assert np.allclose(means, [215.29, 187.5, 133.12, 179.64, 152.01], atol=1.0)
    assert [int((common.render_shapes(0, i)[3] > 0).sum()) for i in range(5)] == pytest.approx(
        [1022, 1746, 1276, 1407, 672], rel=0.05)


def test_shapes_renders_fast():
    # the budget is 2,000 images/s per core at 64x64; this floor only catches a large regression on a busy machine
    t = time.perf_counter()
    for i in range(300):
        common.render_shapes(0, i, 64)
    assert 300 / (time.perf_counter() - t) > 600


# ---- determinism, splitting, resuming --------------------------------------------------------------

def test_same_key_same_tensor_with_0_and_2_workers(tmp_path):
    ds = CsvDataset(make_csv(tmp_path, 24), CROP, seed=3)
    a = collect(TrainLoader(ds, 4, 0, 1, seed=5, num_workers=0), epoch=2)
    b = collect(TrainLoader(ds, 4, 0, 1, seed=5, num_workers=2), epoch=2)
    assert len(a) == len(b) == 6
    for (va, ta, _), (vb, tb, _) in zip(a, b):
        assert torch.equal(va, vb) and torch.equal(ta, tb)
    # the tensor depends on the key alone: ds[(epoch, index)] gives it again
    first = ident(a[0][1][0])
    assert torch.equal(ds[(2, first)][0], a[0][0][0])
    c = collect(TrainLoader(ds, 4, 0, 1, seed=5, num_workers=0), epoch=3)
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))  # another epoch, another order


def test_map_style_split_over_2_ranks_x_2_workers(tmp_path):
    n = 32
    ds = CsvDataset(make_csv(tmp_path, n), CROP)
    seen = []
    for rank in range(2):
        loader = TrainLoader(ds, 4, rank, 2, seed=0, num_workers=2)
        assert loader.steps_per_epoch == 4
        for views, targets, skipped in loader.batches(1):
            seen += [ident(t) for t in targets]
    assert sorted(seen) == list(range(n))


def test_tar_split_over_2_ranks_x_2_workers(tmp_path):
    urls = make_shards(tmp_path, 4, 8)
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            loader = make_train_loader(str(tmp_path / "shard-{00000..00003}.tar"), transform=CROP, kind="image-text",
                                       batch_size=4, rank=rank, world_size=2, seed=0, num_workers=2, num_samples=32)
            assert loader.dataset.urls == urls and loader.steps_per_epoch == 4
            batches = collect(loader, epoch)
            assert len(batches) == 4
            seen += [ident(t) for b in batches for t in b[1]]
        assert sorted(seen) == list(range(32)), epoch


def test_tar_stream_is_deterministic_per_epoch(tmp_path):
    make_shards(tmp_path, 4, 8)
    src = str(tmp_path / "shard-{00000..00003}.tar")

    def run(epoch, skip=0):
        loader = make_train_loader(src, transform=CROP, kind="image-text", batch_size=4, rank=1, world_size=2,
                                   seed=7, num_workers=2, num_samples=64)
        return collect(loader, epoch, skip)

    a, b = run(3), run(3)
    assert len(a) == 8
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    other = run(4)
    assert [ident(t) for x in a for t in x[1]] != [ident(t) for x in other for t in x[1]]
    resumed = run(3, skip=3)  # reseeded: the same length, not the same samples
    assert len(resumed) == 5


def test_resume_with_skip_yields_the_tail_of_the_epoch(tmp_path):
    ds = CsvDataset(make_csv(tmp_path, 40), CROP)
    for workers in (0, 2):
        loader = TrainLoader(ds, 4, 1, 2, seed=1, num_workers=workers)
        full = collect(loader, 5)
        it = loader.batches(5, 2)
        assert len(it) == 3
        tail = list(it)
        assert len(full) == 5 and len(tail) == 3
        for x, y in zip(full[2:], tail):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


# ---- brace expansion -------------------------------------------------------------------------------

def test_expand_urls():
    assert expand_urls("d/{00000..00003}.tar") == [f"d/{i:05d}.tar" for i in range(4)]
    assert expand_urls("d/{00330..00331}.tar") == ["d/00330.tar", "d/00331.tar"]
    assert len(expand_urls("cc3m/{00000..00331}.tar")) == 332
    assert expand_urls("{8..11}.tar") == ["8.tar", "9.tar", "10.tar", "11.tar"]
    assert expand_urls("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    assert expand_urls("a/{0..1}.tar::b/{09..10}.tar") == ["a/0.tar", "a/1.tar", "b/09.tar", "b/10.tar"]
    assert expand_urls(" one.tar :: :: two.tar ") == ["one.tar", "two.tar"]
    assert expand_urls("{x,{y,z}1}.tar") == ["x.tar", "y1.tar", "z1.tar"]
    assert expand_urls("plain.tar") == ["plain.tar"] and expand_urls("{single}.tar") == ["{single}.tar"]
    assert expand_urls("{0..6..3}") == ["0", "3", "6"] and expand_urls("{3..1}") == ["3", "2", "1"]
    assert expand_urls(["a.tar", "b/{0..1}.tar"]) == ["a.tar", "b/0.tar", "b/1.tar"]
    assert expand_urls("") == [] and expand_urls("::") == []


# ---- corrupt data ----------------------------------------------------------------------------------

def test_csv_with_corrupt_and_missing_images_completes_an_epoch(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_WARNINGS_ISSUED", 0)
    path = make_csv(tmp_path, 100)
    (tmp_path / "imgs" / "037.png").write_bytes(image_bytes(37)[:60])  # truncated
    (tmp_path / "imgs" / "064.png").unlink()  # missing
    ds = CsvDataset(path, CROP)
    with pytest.warns(DataWarning) as record:
        batches = collect(TrainLoader(ds, 10, 0, 1, seed=0, num_workers=0), 0)
    assert sorted(str(w.message).split("'")[1] for w in record) == ["imgs/037.png", "imgs/064.png"]
    assert len(batches) == 10 and all(b[0].shape[0] == 10 for b in batches)
    assert sum(int(b[2].sum()) for b in batches) == 2
    # a bad row is replaced by the next one, and says it skipped one
    with pytest.warns(DataWarning, match="037.png"):
        assert ident(ds[(0, 37)][1]) == 38 and ds[(0, 37)][2] == 1
    assert ident(ds[(0, 63)][1]) == 63 and ds[(0, 63)][2] == 0
    # the same with workers: the counts come back through the batches
    batches = collect(TrainLoader(ds, 10, 0, 1, seed=0, num_workers=2), 1)
    assert sum(int(b[2].sum()) for b in batches) == 2


def test_imagefolder_skips_a_corrupt_image(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_WARNINGS_ISSUED", 0)
    root = make_folder(tmp_path, (2, 2))
    (root / "class_0" / "img1.JPG").write_bytes(b"not a jpeg at all")
    ds = ImageFolder(root, CROP)
    with pytest.warns(DataWarning, match="img1.JPG"):
        views, label, skipped = ds[(0, 1)]
    assert (label, skipped) == (1, 1)  # replaced by the next image, whose label comes with it


def test_too_many_failures_in_a_row_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_WARNINGS_ISSUED", 0)
    path = make_csv(tmp_path, 5)
    for i in range(1, 5):
        (tmp_path / "imgs" / f"{i:03d}.png").unlink()
    ds = CsvDataset(path, CROP)
    assert ds[0][2] == 0
    (tmp_path / "imgs" / "000.png").write_bytes(b"junk")
    with pytest.warns(DataWarning), pytest.raises(UsageError, match="5 samples in a row"):
        ds[2]


def test_tar_skips_incomplete_corrupt_and_unreadable(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_WARNINGS_ISSUED", 0)
    good = [(f"{i:06d}", {"jpg": image_bytes(i, "JPEG"), "txt": caption(i).encode()}) for i in range(4)]
    bad = [("nocap", {"jpg": image_bytes(9, "JPEG")}), ("noimg", {"txt": b"x", "json": b"{}"}),
           ("broken", {"png": b"\x89PNG not really", "txt": b"y"})]
    write_shard(tmp_path / "a.tar", [good[0], bad[0], good[1], bad[1]])
    write_shard(tmp_path / "b.tar", [bad[2], good[2], good[3]])
    (tmp_path / "c.tar").write_bytes(b"this is not a tar file" * 50)
    urls = [str(tmp_path / n) for n in ("a.tar", "b.tar", "c.tar", "missing.tar")]
    ds = TarShards(urls, CROP, shuffle_buffer=0)
    with pytest.warns(DataWarning) as record:
        items = list(itertools.islice(iter(ds), 4))
    assert sorted(ident(t) for _, t, _ in items) == [0, 1, 2, 3]
    assert sum(s for _, _, s in items) == 3
    assert ds.stats["incomplete"] == 2 and ds.stats["corrupt"] == 1 and ds.stats["bad_shards"] == 2
    text = " ".join(str(w.message) for w in record)
    assert "nocap" in text and "missing.tar" in text and "c.tar" in text


def test_tar_without_any_sample_is_an_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_WARNINGS_ISSUED", 0)
    write_shard(tmp_path / "0.tar", [(f"{i}", {"jpg": image_bytes(i, "JPEG"), "caption": b"x"}) for i in range(3)])
    write_shard(tmp_path / "1.tar", [])
    src = str(tmp_path / "{0..1}.tar")
    for workers, resampled in ((0, False), (2, False), (0, True)):
        loader = make_train_loader(src, transform=CROP, kind="image-text", batch_size=2, rank=0, world_size=1,
                                   seed=0, num_workers=workers, num_samples=8, resampled=resampled)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            with pytest.raises(UsageError) as e:
                next(loader.batches(0))
        msg = str(e.value)
        assert "\n" not in msg and "no usable sample" in msg and "txt" in msg, msg


def test_tar_resampled_and_shared_shards(tmp_path):
    make_shards(tmp_path, 2, 6)
    with pytest.warns(DataWarning, match="share shards"):
        loader = make_train_loader(str(tmp_path / "shard-{00000..00001}.tar"), transform=CROP, kind="image-text",
                                   batch_size=3, rank=0, world_size=2, seed=0, num_workers=2, num_samples=24,
                                   resampled=True)
    batches = collect(loader, 0)
    assert len(batches) == 4 and all(b[0].shape == (3, 3, 16, 16) for b in batches)
    assert all(0 <= ident(t) < 12 for b in batches for t in b[1])


def test_tar_shards_over_http(tmp_path):
    make_shards(tmp_path, 2, 3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = f"http://127.0.0.1:{server.server_port}/shard-{{00000..00001}}.tar"
        ds = TarShards(spec, CROP, shuffle_buffer=0)
        assert len(ds.urls) == 2
        items = list(itertools.islice(iter(ds), 6))
        assert sorted(ident(t) for _, t, _ in items) == list(range(6))
    finally:
        server.shutdown()
        server.server_close()


# ---- bad input: one-line UsageErrors ---------------------------------------------------------------

def usage_error(fn, *must_contain):
    with pytest.raises(UsageError) as e:
        fn()
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    for s in must_contain:
        assert str(s) in msg, (s, msg)
    return msg


def loader_for(source, kind="image-text", **kw):
    kw = dict(transform=CROP, kind=kind, batch_size=2, rank=0, world_size=1, seed=0, num_workers=0, **kw)
    return lambda: make_train_loader(source, **kw)


def test_usage_errors(tmp_path):
    make_csv(tmp_path, 4)
    make_shards(tmp_path, 1, 4)
    missing = tmp_path / "nope" / "data.csv"
    usage_error(loader_for(str(missing)), missing)
    usage_error(loader_for(str(tmp_path / "nowhere")), tmp_path / "nowhere", "tar")
    usage_error(lambda: TarShards([], CROP), "no tar shards")
    usage_error(lambda: TarShards(" :: ", CROP), "no tar shards", "' :: '")
    usage_error(loader_for(str(tmp_path / "none-{0..3}.tar"), num_samples=8), "none-0.tar")
    usage_error(loader_for(str(tmp_path / "shard-00000.tar")), "--train-num-samples")
    usage_error(loader_for(str(tmp_path / "shard-00000.tar"), num_samples=1), "fewer than one global batch")
    usage_error(lambda: TrainLoader(TarShards(str(tmp_path / "shard-00000.tar"), CROP), 2, 0, 1, 0, 0),
                "--train-num-samples")
    usage_error(loader_for(str(tmp_path / "data.csv"), csv_caption_key="caption"),
                "data.csv", "'caption'", "--csv-caption-key", "--csv-img-key", "--csv-separator", "title")
    usage_error(loader_for(str(tmp_path / "data.csv"), csv_separator=","), "'filepath'", "--csv-separator")
    make_csv(tmp_path, 2, name="commas.csv", sep=",")
    usage_error(loader_for(str(tmp_path / "commas.csv")), "commas.csv", "--csv-separator ','")
    (tmp_path / "empty.csv").write_text("")
    usage_error(loader_for(str(tmp_path / "empty.csv")), "empty.csv", "empty")
    (tmp_path / "header.tsv").write_text("filepath\ttitle\n")
    usage_error(loader_for(str(tmp_path / "header.tsv")), "header.tsv", "no rows")
    (tmp_path / "elsewhere.csv").write_text("filepath\ttitle\nelsewhere/0.png\ta\n")
    usage_error(loader_for(str(tmp_path / "elsewhere.csv")), "elsewhere/0.png", "relative to the CSV")
    (tmp_path / "notes.txt").write_text("hello")
    usage_error(loader_for(str(tmp_path / "notes.txt")), "notes.txt", "csv", "tar", "ImageFolder")
    usage_error(loader_for(str(tmp_path)), str(tmp_path), "image-text", ".tar files")
    usage_error(loader_for(str(tmp_path / "data.csv"), kind="image"), "data.csv", "ImageFolder")
    usage_error(loader_for(str(tmp_path / "nope")), "nope")
    usage_error(lambda: ImageFolder(str(tmp_path / "nope"), CROP), "nope")
    (tmp_path / "flat").mkdir()
    usage_error(lambda: ImageFolder(str(tmp_path / "flat"), CROP), "flat", "subfolder")
    (tmp_path / "flat" / "cls").mkdir()
    usage_error(loader_for(str(tmp_path / "flat"), kind="image"), "flat", "no images")
    usage_error(lambda: TrainLoader(CsvDataset(tmp_path / "data.csv", CROP), 4, 0, 2, 0, 0), "global batch of 8")


def test_make_train_loader_sources(tmp_path):
    loader = make_train_loader(None, transform=CROP, kind="image", batch_size=4, rank=0, world_size=1, seed=0,
                               num_workers=0, builtin_length=8, builtin_size=32)
    views, labels, skipped = next(loader.batches(0))
    assert views.shape == (4, 3, 16, 16) and labels.dtype == torch.long and labels.shape == (4,)
    loader = make_train_loader(None, transform=CROP, kind="image-text", batch_size=4, rank=0, world_size=1, seed=0,
                               num_workers=0, builtin_length=8)
    assert loader.steps_per_epoch == 2 and next(loader.batches(0))[1].shape == (4, 77)
    make_csv(tmp_path, 8, name="d.tsv", sep=";", header=("img", "cap"))
    loader = make_train_loader(str(tmp_path / "d.tsv"), transform=CROP, kind="image-text", batch_size=4, rank=0,
                               world_size=1, seed=0, num_workers=0, csv_img_key="img", csv_caption_key="cap",
                               csv_separator=";")
    assert isinstance(loader.dataset, CsvDataset) and len(collect(loader, 0)) == 2
    loader = make_train_loader(str(make_folder(tmp_path)), transform=CROP, kind="image", batch_size=3, rank=0,
                               world_size=1, seed=0, num_workers=0)
    assert isinstance(loader.dataset, ImageFolder) and loader.steps_per_epoch == 3


# ---- evaluation ------------------------------------------------------------------------------------

def test_shard_sampler_and_eval_loader(tmp_path):
    assert [list(common.ShardSampler(10, r, 3)) for r in range(3)] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert len(common.ShardSampler(10, 1, 3)) == 3
    ds = CsvDataset(make_csv(tmp_path, 7), common.EvalTransform(16, CLIP_MEAN, CLIP_STD))
    seen = []
    for rank in range(2):
        for views, targets, skipped in eval_loader(ds, 2, rank, 2, num_workers=0):
            assert views.shape[1:] == (3, 16, 16)
            seen += [ident(t) for t in targets]
    assert seen == [0, 2, 4, 6, 1, 3, 5]


# ---- zero-shot metadata ----------------------------------------------------------------------------

def test_zero_shot_metadata():
    assert len(common.IMAGENET_CLASSNAMES) == 1000
    assert len(common.OPENAI_IMAGENET_TEMPLATES) == 80 and len(common.SIMPLE_IMAGENET_TEMPLATES) == 7
    assert len(common.CIFAR_TEMPLATES) == 18 and len(set(common.CIFAR_TEMPLATES)) == 18
    for t in common.OPENAI_IMAGENET_TEMPLATES + common.SIMPLE_IMAGENET_TEMPLATES + common.CIFAR_TEMPLATES:
        assert t.count("{}") == 1
    assert set(common.SIMPLE_IMAGENET_TEMPLATES) <= set(common.OPENAI_IMAGENET_TEMPLATES)
    names = common.IMAGENET_CLASSNAMES
    assert names[0] == "tench" and names[-1] == "toilet paper" and names.count("missile") == 2
    assert common.CIFAR_TEMPLATES[0] == "a photo of a {}." and common.CIFAR_TEMPLATES[-1] == "a photo of the big {}."
    meta = pytest.importorskip("open_clip.zero_shot_metadata")
    assert names == list(meta.IMAGENET_CLASSNAMES)
    assert common.OPENAI_IMAGENET_TEMPLATES == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    assert common.SIMPLE_IMAGENET_TEMPLATES == [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]
