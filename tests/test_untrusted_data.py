"""Hostile inputs: tar members that try to escape (absolute names, `..`, links, devices) and a PNG whose
header claims 100,000 x 100,000 pixels. Bad members are ignored and counted, nothing is written, good
samples come through; the bomb is refused before any pixel memory is allocated and counted as corrupt."""
import io
import itertools
import os
import resource
import struct
import sys
import tarfile
import warnings
import zlib

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import (CLIP_MEAN, CLIP_STD, CsvDataset, DataWarning, TarShards, TrainCrop, open_image,  # noqa: E402
                    tokenize)

CROP = TrainCrop(16, (0.5, 1.0), CLIP_MEAN, CLIP_STD)


def jpeg(i):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (i * 40 % 256, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def claimed_png(width, height):
    """A valid PNG holding one RGB pixel of data whose IHDR claims width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no filter, no interlace
    idat = zlib.compress(b"\x00" + b"\x10\x20\x30")  # filter byte 0, then one pixel
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


BOMB = claimed_png(100_000, 100_000)


def add(tar, name, data=b"", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def ident(tokens):
    return {tuple(tokenize(f"good {i}")[0].tolist()): i for i in range(10)}[tuple(tokens.tolist())]


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def test_crafted_png_is_valid_except_for_its_size():
    img = open_image(claimed_png(1, 1))  # the same bytes with an honest header decode fine
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (16, 32, 48)


def test_open_image_refuses_decompression_bombs():
    before, filters = maxrss_mib(), list(warnings.filters)
    with pytest.raises(Image.DecompressionBombError):  # more than twice the limit: PIL raises
        open_image(BOMB)
    with pytest.raises(Image.DecompressionBombWarning):  # over the limit: PIL warns, open_image raises
        open_image(claimed_png(10_000, 10_000))
    assert warnings.filters == filters  # the warning became an error locally only
    assert maxrss_mib() - before < 200
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's default is left alone


def test_tar_with_escaping_members(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_WARNINGS_ISSUED", 0)
    monkeypatch.chdir(tmp_path)
    shard = tmp_path / "shards" / "evil.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        add(tar, "../evil.txt", b"escaped")
        add(tar, "0000.jpg", jpeg(0))
        add(tar, "0000.txt", b"good 0")
        add(tar, "/etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        add(tar, "/tmp/evil.txt", b"escaped")
        add(tar, "0001.jpg", jpeg(1))
        add(tar, "0001.txt", b"good 1")
        add(tar, "sub/../../evil.txt", b"escaped")
        add(tar, "0002.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd")  # never followed
        add(tar, "0002.txt", b"good 2")
        add(tar, "0003.jpg", kind=tarfile.LNKTYPE, linkname="0000.jpg")
        add(tar, "0003.txt", b"good 3")
        add(tar, "dev.jpg", kind=tarfile.CHRTYPE)
        add(tar, "dir", kind=tarfile.DIRTYPE)  # a plain directory entry is harmless
        add(tar, "dir/0004.jpg", jpeg(4))
        add(tar, "dir/0004.txt", b"good 4")
    with tarfile.open(shard) as tar:  # the hostile names really are in the archive
        assert {"../evil.txt", "/etc/passwd", "sub/../../evil.txt"} <= set(tar.getnames())
    ds = TarShards([str(shard)], CROP, shuffle_buffer=0)
    with pytest.warns(DataWarning) as record:
        items = list(itertools.islice(iter(ds), 3))  # reading the third sample reads the whole shard
    assert sorted(ident(t) for _, t, _ in items) == [0, 1, 4]
    assert ds.stats["unsafe_members"] == 7  # 4 escaping names, a symlink, a hard link, a device
    assert ds.stats["incomplete"] == 2  # 0002 and 0003 lost their image
    assert sum(s for _, _, s in items) == 2
    text = " ".join(str(w.message) for w in record)
    assert "../evil.txt" in text and "/etc/passwd" in text
    for folder in (tmp_path, tmp_path.parent, shard.parent, os.getcwd()):
        assert not os.path.exists(os.path.join(folder, "evil.txt"))
    assert not os.path.exists("/tmp/evil.txt") or open("/tmp/evil.txt", "rb").read() != b"escaped"


def test_bomb_in_a_csv_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_WARNINGS_ISSUED", 0)
    (tmp_path / "bomb.png").write_bytes(BOMB)
    (tmp_path / "big.png").write_bytes(claimed_png(10_000, 10_000))
    rows = ["filepath\ttitle"]
    for i in range(4):
        Image.open(io.BytesIO(jpeg(i))).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\tgood {i}")
    rows[2:2] = ["bomb.png\tbomb", "big.png\tbig"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    ds = CsvDataset(tmp_path / "data.csv", CROP)
    before = maxrss_mib()
    with pytest.warns(DataWarning) as record:
        items = [ds[(0, i)] for i in range(len(ds))]
    assert "bomb.png" in str(record[0].message) and "big.png" in str(record[1].message)
    assert maxrss_mib() - before < 200
    assert [ident(t) for _, t, _ in items] == [0, 1, 1, 1, 2, 3]
    assert [s for _, _, s in items] == [0, 2, 1, 0, 0, 0]
    loader = common.TrainLoader(ds, 3, 0, 1, seed=0, num_workers=0)
    with pytest.warns(DataWarning):
        assert sum(int(b[2].sum()) for b in loader.batches(0)) == 3  # rows 1, 2, 3 -> 2 skips at row 1, 1 at row 2
    assert sorted(loader.take_unreadable()) == [1, 2]  # the two bad files, each once
    with pytest.warns(DataWarning):
        list(loader.batches(1))
    assert loader.take_unreadable() == []  # met again in the next epoch: not new


def test_bomb_in_a_tar_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_WARNINGS_ISSUED", 0)
    shard = tmp_path / "0.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.jpg", jpeg(0))
        add(tar, "a.txt", b"good 0")
        add(tar, "b.png", BOMB)
        add(tar, "b.txt", b"bomb")
        add(tar, "c.jpg", jpeg(1))
        add(tar, "c.txt", b"good 1")
    ds = TarShards([str(shard)], CROP, shuffle_buffer=0)
    before = maxrss_mib()
    with pytest.warns(DataWarning, match="DecompressionBomb"):
        items = list(itertools.islice(iter(ds), 2))
    assert maxrss_mib() - before < 200
    assert [ident(t) for _, t, _ in items] == [0, 1] and [s for _, _, s in items] == [0, 1]
    assert ds.stats["corrupt"] == 1 and isinstance(items[0][0], torch.Tensor)
