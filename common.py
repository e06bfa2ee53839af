"""Tokenizer and data helpers shared by maskclip.py, aclip.py, silc.py, milan.py and maskdistill.py.

Only two things live here, because every method script needs them unchanged:

1. The CLIP tokenizer, byte-identical to OpenAI CLIP's (and open_clip's): byte-level BPE over the
   bundled `bpe_simple_vocab_16e6.txt.gz`, start token 49406, end token 49407, context 77.
2. Data: a built-in captioned dataset rendered on the fly (no download), the real-data readers
   (image-text CSV, WebDataset-layout tar shards, ImageFolder), crop transforms that take an explicit
   random generator, and a loader that splits samples across ranks and workers and can resume in the
   middle of an epoch.

Randomness contract. Every transform is called as `transform(img, rng)` with a `random.Random` that is
seeded from (seed, epoch, sample index). A sample is therefore the same image, crop and caption in
every process, every worker and after every resume, whatever the number of workers.

Item contract. Every dataset yields `(views, target, skipped)`: `views` is what the transform returned
(a tensor, or a tuple of tensors), `target` is a LongTensor[context] of token ids for image-text data or
an int class label for image-only data, and `skipped` is how many unreadable samples were passed over
to produce this one. `collate` turns a batch into `(views, targets, skipped[B])`.

Bad input from the user (a missing path, a CSV without the named columns, ...) raises `UsageError`, whose
message is one line naming the problem and the fix; the scripts print it as `error: <message>`. A bad
sample inside good data (a corrupt or missing image, an incomplete tar sample) is never fatal: it is
skipped with a rate-limited `DataWarning`, counted in `skipped`, and replaced so that batches keep their
size. Images are decoded by `open_image`, which refuses decompression bombs and truncated files.
"""
import argparse
import atexit
import contextlib
import csv
import gzip
import html
import importlib
import io
import json
import math
import os
import pickle
import platform
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import warnings
import zipfile
from functools import lru_cache

import ftfy
import numpy as np
import regex
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from tqdm import tqdm



class _LazyModule:
    """A module imported at its first use. torchvision imports torch._dynamo, about a second that every
    start-up (and every one-line flag error) would otherwise wait for before the data is touched."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


TF = _LazyModule("torchvision.transforms.functional")  # torchvision's functional transforms

# ----------------------------------------------------------------------------------------------------
# Tokenizer (OpenAI CLIP's byte-level BPE)
# ----------------------------------------------------------------------------------------------------

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SOT_ID, EOT_ID = 49406, 49407  # <|startoftext|>, <|endoftext|>; EOT is the largest id, so argmax pools at it
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77


@lru_cache()
def bytes_to_unicode():
    """Map every byte 0..255 to a printable unicode character, so that BPE never sees whitespace or
    control bytes. Printable latin-1 bytes map to themselves; the remaining 68 bytes are shifted to
    code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # insertion order matters: it is the order of the first 256 vocabulary ids
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return table


def _clean(text):
    """ftfy, HTML unescape twice, whitespace collapse, lower-case: OpenAI's `basic_clean` +
    `whitespace_clean` followed by open_clip's default lower-casing."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _merge_pair(word, pair):
    """Replace every left-to-right occurrence of `pair` in the symbol tuple `word` by its merge."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


class SimpleTokenizer:
    """OpenAI CLIP's tokenizer: 256 byte symbols, the same with `</w>`, 48,894 merges, then SOT, EOT."""

    def __init__(self, bpe_path=BPE_PATH):
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # the first line is a header
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        assert len(vocab) == VOCAB_SIZE, len(vocab)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {}
        # contractions, letter runs, single digits, runs of other non-space symbols. Unlike OpenAI's
        # pattern this one does not match the special tokens' spelling, so that no caption can inject a
        # start or end token (open_clip does the same for OpenAI's spelling).
        self.pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token):
        """Apply the merges to one pre-token (already mapped to byte symbols); returns space-joined symbols."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")  # the last symbol carries the end-of-word marker
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, math.inf))
            if best not in self.bpe_ranks:
                break
            word = _merge_pair(word, best)
        out = " ".join(word)
        if len(self.cache) >= 100_000:  # bounded: web captions hold an endless stream of new words
            self.cache.clear()
        self.cache[token] = out
        return out

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(_clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self.bpe(piece).split(" "))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER


def tokenize(texts, context_length=CONTEXT_LENGTH):
    """texts: str or list of str -> LongTensor[B, context_length]: SOT, ids, EOT, zero padding.
    A text that is too long is truncated so that EOT is still the last token (text features are
    pooled at the largest id, which is EOT)."""
    if isinstance(texts, str):
        texts = [texts]
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [SOT_ID] + _tokenizer().encode(text) + [EOT_ID]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = EOT_ID
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def decode(ids):
    """LongTensor[L] or list of ids -> text, without SOT, EOT and padding."""
    ids = [int(i) for i in ids]
    ids = [i for i in ids if i not in (0, SOT_ID, EOT_ID)]
    return _tokenizer().decode(ids).strip()


# ----------------------------------------------------------------------------------------------------
# Normalisation constants and transforms (each takes an explicit random.Random)
# ----------------------------------------------------------------------------------------------------

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def sample_rng(seed, epoch, index):
    """The per-sample generator of the randomness contract (see the module docstring)."""
    return random.Random((int(seed) * 1_000_003 + int(epoch)) * 4_294_967_311 + int(index))


def crop_box(rng, width, height, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box for an image of `width` x `height`: area fraction in `scale`, aspect in
    `ratio` (log-uniform), ten tries, then the largest centred crop within the ratio bounds.
    Returns (left, top, w, h) in pixels."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_normalized_tensor(img, mean, std):
    """PIL image -> FloatTensor[3, H, W], normalised."""
    return TF.normalize(TF.to_tensor(img), mean, std)


class TrainCrop:
    """RandomResizedCrop(size, scale, ratio, resampling: bicubic as MAE and BEiT v2, or Image.BILINEAR as
    SLIP), optional horizontal flip, normalisation.
    `return_box=True` also returns the crop box as a FloatTensor[4] (left, top, w, h) in units of the
    source image's width and height, which A-CLIP needs to align attention maps between views."""

    def __init__(self, size, scale, mean, std, flip=False, ratio=(3 / 4, 4 / 3), return_box=False,
                 resample=Image.BICUBIC):
        self.size, self.scale, self.ratio, self.mean, self.std = size, scale, ratio, mean, std
        self.flip, self.return_box, self.resample = flip, return_box, resample

    def __call__(self, img, rng):
        left, top, w, h = crop_box(rng, img.width, img.height, self.scale, self.ratio)
        out = img.resize((self.size, self.size), self.resample, box=(left, top, left + w, top + h))
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        x = to_normalized_tensor(out, self.mean, self.std)
        if self.return_box:
            return x, torch.tensor([left / img.width, top / img.height, w / img.width, h / img.height])
        return x


class EvalTransform:
    """Resize the shorter side to `size` (bicubic), centre crop, normalise (OpenAI's preprocessing)."""

    def __init__(self, size, mean, std):
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, img, rng=None):
        img = TF.center_crop(TF.resize(img, self.size, interpolation=TF.InterpolationMode.BICUBIC), self.size)
        return to_normalized_tensor(img, self.mean, self.std)


# ----------------------------------------------------------------------------------------------------
# Built-in captioned dataset: shapes rendered on the fly
# ----------------------------------------------------------------------------------------------------

SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond"]
COLOURS = {  # name -> RGB; saturated, so that the muted backgrounds never share an object's colour name
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 180, 50),
    "cyan": (30, 210, 220), "blue": (35, 70, 225), "purple": (140, 50, 200), "pink": (250, 110, 190),
}
COLOUR_NAMES = list(COLOURS)
SHAPE_CLASSNAMES = [f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES]  # class = shape * 8 + colour
SHAPE_TEMPLATES = ["a photo of a {}.", "a {}.", "an image of a {}.", "there is a {}."]
SIZES = {"small": (0.22, 0.28), "medium": (0.29, 0.36), "large": (0.37, 0.46)}  # radius / image side
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["", "medium", "medium-sized"],
              "large": ["large", "big", "huge"]}
POSITIONS = {  # name -> (x, y) centre as a fraction of the side; 3 x 3 grid
    "in the top left corner": (0.28, 0.28), "at the top": (0.5, 0.28), "in the top right corner": (0.72, 0.28),
    "on the left": (0.28, 0.5), "in the center": (0.5, 0.5), "on the right": (0.72, 0.5),
    "in the bottom left corner": (0.28, 0.72), "at the bottom": (0.5, 0.72),
    "in the bottom right corner": (0.72, 0.72),
}
BACKGROUNDS = {"gray": (128, 128, 128), "dark gray": (60, 60, 64), "light gray": (190, 190, 186),
               "beige": (200, 185, 150), "brown": (110, 85, 60), "black": (20, 20, 24),
               "white": (235, 235, 235), "slate": (90, 100, 115)}


def _shape_polygon(shape, cx, cy, r, angle):
    """Vertices of a shape of radius r centred at (cx, cy), rotated by `angle` radians."""
    def ring_pts(n, radii, offset=0.0):
        return [(cx + radii[k % len(radii)] * math.cos(offset + angle + 2 * math.pi * k / n),
                 cy + radii[k % len(radii)] * math.sin(offset + angle + 2 * math.pi * k / n)) for k in range(n)]
    if shape == "square":
        return ring_pts(4, [r * 1.2], math.pi / 4)  # axis-aligned when angle = 0
    if shape == "diamond":
        return ring_pts(4, [r * 1.3, r * 0.85], -math.pi / 2)
    if shape == "triangle":
        return ring_pts(3, [r * 1.15], -math.pi / 2)
    if shape == "star":
        return ring_pts(10, [r * 1.2, r * 0.5], -math.pi / 2)
    if shape == "cross":
        t = r * 0.38
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t),
               (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]
    if shape == "heart":
        pts = []
        for k in range(24):
            t = 2 * math.pi * k / 24
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 15, y * r / 15 - r * 0.1))
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]
    raise ValueError(shape)


def _draw_shape(draw, shape, cx, cy, r, angle, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=fill)


def _jitter(rgb, rng, amount):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng, size):
    """A muted background: flat, a linear gradient, or flat plus noise. Returns (uint8 [H, W, 3], name)."""
    name = rng.choice(list(BACKGROUNDS))
    base = np.array(_jitter(BACKGROUNDS[name], rng, 12), dtype=np.float32)
    kind = rng.random()
    if kind < 0.35:
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind < 0.7:
        other = np.array(_jitter(BACKGROUNDS[name], rng, 40), dtype=np.float32)
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        img = base + (other - base) * ramp
        img = np.broadcast_to(img, (size, size, 3)).copy()
    else:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 10, (size, size, 1)).astype(np.float32)
        img = base + noise
    return np.clip(img, 0, 255).astype(np.uint8), name


def render_shapes(seed, index, size=64, max_objects=2):
    """Render sample `index` of the stream `seed`: one or two coloured shapes on a muted background.

    Returns (PIL RGB image, caption, label, mask): `label` is the class (shape * 8 + colour) of the first,
    larger object, and `mask` is a uint8 [size, size] array holding 1 + class at each object pixel and
    0 on the background (the second object is drawn on top of the first).
    """
    rng = random.Random(int(seed) * 2_147_483_647 + int(index))
    bg, bg_name = _background(rng, size)
    img = Image.fromarray(bg)
    mask = Image.new("L", (size, size), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    n = 1 if max_objects == 1 or rng.random() < 0.75 else 2
    objects = []
    positions = list(POSITIONS)
    for k in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(COLOUR_NAMES)
        size_name = rng.choice(list(SIZES)) if k == 0 else "small"
        if n == 2:  # two objects: keep them apart, in opposite halves
            pos = rng.choice([p for p in positions if ("left" in p) == (k == 0) and "center" not in p]
                             or positions)
        else:
            pos = rng.choice(positions)
        r = rng.uniform(*SIZES[size_name]) * size * (0.8 if n == 2 else 1.0)
        fx, fy = POSITIONS[pos]
        cx = fx * size + rng.uniform(-0.05, 0.05) * size
        cy = fy * size + rng.uniform(-0.05, 0.05) * size
        cx, cy = (min(max(c, 0.9 * r), size - 0.9 * r) for c in (cx, cy))  # keep the object in the frame
        angle = rng.uniform(-0.2, 0.2)
        label = SHAPES.index(shape) * len(COLOURS) + COLOUR_NAMES.index(colour)
        # draw the shape into a temporary stencil so that the ring's hole shows the background
        stencil = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(stencil), shape, cx, cy, r, angle, 255)
        img.paste(_jitter(COLOURS[colour], rng, 18), (0, 0, size, size), stencil)
        mask.paste(1 + label, (0, 0, size, size), stencil)
        objects.append(dict(shape=shape, colour=colour, size=size_name, pos=pos, label=label))
    del draw, mdraw
    caption = _caption(rng, objects, bg_name)
    return img, caption, objects[0]["label"], np.asarray(mask)


def _noun(rng, o, with_size=True):
    size = rng.choice(SIZE_WORDS[o["size"]]) if with_size else ""
    words = " ".join(w for w in (size, o["colour"], o["shape"]) if w)
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}"


def _caption(rng, objects, bg_name):
    """A caption from a small grammar with paraphrase variety."""
    a = objects[0]
    if len(objects) == 1:
        forms = [
            lambda: f"{_noun(rng, a)} {a['pos']}",
            lambda: f"a photo of {_noun(rng, a)}",
            lambda: f"{_noun(rng, a)} on a {bg_name} background",
            lambda: f"there is {_noun(rng, a)} {a['pos']}",
            lambda: f"{_noun(rng, a, with_size=False)}",
            lambda: f"a picture showing {_noun(rng, a)} {a['pos']} on {bg_name}",
            lambda: f"{a['pos']} of the image is {_noun(rng, a)}".replace("in the ", "the ", 1)
            if a["pos"].startswith("in the ") else f"{_noun(rng, a)} sits {a['pos']}",
        ]
    else:
        b = objects[1]
        forms = [
            lambda: f"there is {_noun(rng, a)} and {_noun(rng, b)}",
            lambda: f"{_noun(rng, a)} {a['pos']} and {_noun(rng, b)} {b['pos']}",
            lambda: f"{_noun(rng, a)} next to {_noun(rng, b)}",
            lambda: f"two shapes: {_noun(rng, a, False)} and {_noun(rng, b, False)}",
            lambda: f"{_noun(rng, a)} with {_noun(rng, b)} on a {bg_name} background",
        ]
    return " ".join(rng.choice(forms)().split())


class Shapes(torch.utils.data.Dataset):
    """The built-in captioned dataset (see `render_shapes`). Training and held-out splits use disjoint
    seeds. Keys are (epoch, index) pairs from `EpochSampler`; the transform gets the per-sample rng.

    `target="text"` yields tokenized captions, `target="label"` the 64-way shape x colour class.
    """
    SEEDS = {"train": 0, "val": 1_000_000_007}

    def __init__(self, split="train", length=100_000, transform=None, target="text", image_size=64,
                 max_objects=None, context_length=CONTEXT_LENGTH, seed=0):
        self.split, self.length, self.transform, self.target = split, length, transform, target
        self.image_size, self.context_length, self.seed = image_size, context_length, seed
        self.max_objects = max_objects or (2 if split == "train" else 1)
        self.classnames, self.templates = SHAPE_CLASSNAMES, SHAPE_TEMPLATES

    def __len__(self):
        return self.length

    def sample(self, index):
        """(PIL image, caption, label, mask) of sample `index`, without any transform."""
        return render_shapes(self.SEEDS[self.split], index, self.image_size, self.max_objects)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, caption, label, _ = self.sample(index)
        views = self.transform(img, sample_rng(self.seed, epoch, index)) if self.transform else TF.to_tensor(img)
        target = tokenize(caption, self.context_length)[0] if self.target == "text" else label
        return views, target, 0


# ----------------------------------------------------------------------------------------------------
# Errors, warnings and safe image decoding
# ----------------------------------------------------------------------------------------------------

class UsageError(Exception):
    """A bad input from the user. The message is one line that names the problem (the path, the
    column, ...) and the fix; the scripts catch it at top level and print `error: <message>`."""


class DataWarning(UserWarning):
    """A bad sample or shard inside otherwise good data: it is skipped, counted and warned about."""


MAX_CONSECUTIVE_FAILURES = 100  # a reader gives up (UsageError) after this many unusable samples in a row
_WARNINGS_ISSUED = 0


def _warn_data(message):
    """Warn about a skipped sample or shard: the first 20 times in this process, then at powers of two,
    so that a dataset with 1% corrupt images cannot flood the log."""
    global _WARNINGS_ISSUED
    _WARNINGS_ISSUED += 1
    n = _WARNINGS_ISSUED
    if n <= 20 or n & (n - 1) == 0:
        note = f" [{n} data warnings so far in this process; rate-limited from now on]" if n >= 20 else ""
        warnings.warn(message + note, DataWarning, stacklevel=3)


def _reason(exc):
    """`Type: message` of an exception, on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _one_line(exc):
    """The message of a UsageError, also when a DataLoader worker re-raised it with a traceback
    ("Caught UsageError in DataLoader worker process 0. Original Traceback ... UsageError: msg")."""
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else text
    return last.split("UsageError: ", 1)[1] if "UsageError: " in last else last


# Decoders that open_image may use: the formats real image datasets hold. Leaving out the rest keeps
# untrusted bytes away from rarely used parsers (EPS, for instance, would run Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG's opener also returns MPO (phone) images


def open_image(source):
    """Decode an image from a path or from bytes into a PIL RGB image, safely: an image with more pixels
    than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) raises before any pixel memory is
    allocated (PIL only warns between 1x and 2x the limit; that warning is turned into an error here,
    locally), and the whole image is decoded here, so a truncated file raises here and not later in a
    transform. Any failure raises; the datasets catch it and skip the sample."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    Image.init()  # registers every plugin (once), so that `formats` can name WEBP and TIFF
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(fp, formats=IMAGE_FORMATS) as img:
            img.load()
            return img.convert("RGB")


# ----------------------------------------------------------------------------------------------------
# Real data: image-text CSV/TSV, WebDataset-layout tar shards, ImageFolder
# ----------------------------------------------------------------------------------------------------

class _Strings:
    """A list of str stored as one UTF-8 buffer plus an offset array. Reading entry i touches no Python
    object per entry, so DataLoader workers forked from the main process keep sharing these pages; a
    list of millions of str would be copied into every worker, page by page, as refcounts change.
    Build it with `append`, then call `freeze` once."""

    def __init__(self):
        self.data, self.ends, self.offsets = bytearray(), [], None

    def append(self, s):
        self.data += s.encode("utf-8")
        self.ends.append(len(self.data))

    def freeze(self):
        self.offsets = np.zeros(len(self.ends) + 1, dtype=np.int64)
        self.offsets[1:] = self.ends
        self.data, self.ends = bytes(self.data), None
        return self

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.data[self.offsets[i]:self.offsets[i + 1]].decode("utf-8")


def _split_key(key):
    """(epoch, index) from a sampler key, or from a bare index (epoch 0)."""
    return key if isinstance(key, tuple) else (0, key)


def _load_or_next(n, index, load, describe, source):
    """Return (j, load(j), skipped) for the first j in index, index + 1, ... (wrapping) whose load
    succeeds, so that an unreadable sample is replaced deterministically and a batch keeps its size.
    Gives up with a UsageError after MAX_CONSECUTIVE_FAILURES failures in a row (or after trying all n)."""
    first_error = None
    for k in range(min(n, MAX_CONSECUTIVE_FAILURES)):
        j = (index + k) % n
        try:
            return j, load(j), k
        except Exception as e:  # a corrupt, missing or unreadable file: skip it
            reason = f"{describe(j)}: {_reason(e)}"
            first_error = first_error or reason
            _warn_data(f"skipping unreadable sample {j} of {source} ({reason})")
    raise UsageError(f"{min(n, MAX_CONSECUTIVE_FAILURES)} samples in a row of {source} could not be read, "
                     f"starting at {index} (first: {first_error}); check the paths and the files")


class CsvDataset(torch.utils.data.Dataset):
    """Image-text pairs listed in a CSV/TSV file, open_clip's convention: a header row, the image path in
    column `img_key` and the caption in `caption_key`, TAB-separated by default. A comma-separated
    `caption_key` ("title,description") names several caption columns: each sample draws one of them
    uniformly, deterministic per (seed, epoch, index), and an empty cell falls back to the next non-empty
    one (SLIP's and A-CLIP's YFCC-15M loaders draw title or description, datasets.py). Image paths are
    relative to the CSV file's folder (absolute paths are used as they are); open_clip resolves them
    against the working directory instead. Keys are (epoch, index) pairs, as in `Shapes`.

    A corrupt, unreadable or missing image is skipped with a `DataWarning` and replaced by the next row
    (wrapping); the item's `skipped` says how many rows were passed over."""

    def __init__(self, path, transform, img_key="filepath", caption_key="title", sep="\t",
                 context_length=CONTEXT_LENGTH, seed=0):
        self.path, self.transform, self.context_length, self.seed = path, transform, context_length, seed
        self.root = os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(path):
            raise UsageError(f"CSV file {path} does not exist; check --train-data")
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a column
            rows = csv.reader(f, delimiter=sep)
            header = next(rows, None)
            if not header:
                raise UsageError(f"CSV file {path} is empty; it needs a header row naming the columns "
                                 f"{img_key!r} and {caption_key!r}")
            keys = caption_key.split(",")
            missing = [k for k in (img_key, *keys) if k not in header]
            if missing:
                hint = ""
                if sep != "," and len(header) == 1 and "," in header[0]:
                    hint = "; the header holds commas, so try --csv-separator ','"
                elif sep != "\t" and len(header) == 1 and "\t" in header[0]:
                    hint = "; the header holds tabs, so try --csv-separator $'\\t'"
                raise UsageError(f"CSV file {path} has no column {missing[0]!r} (separator {sep!r}; columns "
                                 f"found: {header}); name the columns with --csv-img-key and --csv-caption-key "
                                 f"and the separator with --csv-separator{hint}")
            i_img, i_caps = header.index(img_key), [header.index(k) for k in keys]
            images, captions = _Strings(), [_Strings() for _ in keys]  # not lists of str: see _Strings
            try:
                for row in rows:
                    if not row:  # a blank line
                        continue
                    images.append(row[i_img] if i_img < len(row) else "")
                    for column, i in zip(captions, i_caps):
                        column.append(row[i] if i < len(row) else "")
            except (csv.Error, UnicodeDecodeError) as e:  # e.g. a field over csv's 128 KiB limit, or not UTF-8
                raise UsageError(f"CSV file {path} cannot be read past line {rows.line_num} "
                                 f"({_reason(e)}); it must be UTF-8 text in the csv format") from None
        self.images, self.captions = images.freeze(), [c.freeze() for c in captions]
        if not len(self.images):
            raise UsageError(f"CSV file {path} has a header but no rows; add image-caption rows")
        # The most common mistake is paths relative to another folder: catch it now, not in a worker.
        probe = [os.path.join(self.root, self.images[i]) for i in range(min(len(self.images), 16))]
        if not any(os.path.isfile(p) for p in probe):
            raise UsageError(f"none of the first {len(probe)} images listed in {path} exists (first: {probe[0]}); "
                             f"image paths are read relative to the CSV file's folder {self.root}")

    def __len__(self):
        return len(self.images)

    def row_captions(self, i):
        """Row i's non-empty captions, in column order ([""] if all are empty)."""
        return [c[i] for c in self.captions if c[i]] or [""]

    def caption(self, i, rng):
        """One of row i's caption columns, drawn with rng; an empty cell falls back to the next non-empty one."""
        k = rng.randrange(len(self.captions)) if len(self.captions) > 1 else 0
        return next((c[i] for c in self.captions[k:] + self.captions[:k] if c[i]), "")

    def _image_path(self, i):
        rel = self.images[i]
        if not rel:
            raise FileNotFoundError(f"row {i} has an empty {self.path} image path")
        return os.path.join(self.root, rel)

    def __getitem__(self, key):
        epoch, index = _split_key(key)
        j, img, skipped = _load_or_next(len(self), index, lambda i: open_image(self._image_path(i)),
                                        lambda i: repr(self.images[i]), self.path)
        rng = sample_rng(self.seed, epoch, index)  # the requested index: a replacement gets its own crop
        views = self.transform(img, rng) if self.transform else TF.to_tensor(img)
        return views, tokenize(self.caption(j, rng), self.context_length)[0], skipped


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageFolder(torch.utils.data.Dataset):
    """Images in one subfolder per class (ImageNet's layout): labels are the indices of the sorted class
    folder names (`classes`), images are found recursively and sorted; hidden folders and files are
    ignored. Keys, skipping and replacement as in `CsvDataset`; items are `(views, label, skipped)`,
    where the label is that of the image actually returned."""

    def __init__(self, root, transform, seed=0):
        self.root, self.transform, self.seed = root, transform, seed
        if not os.path.isdir(root):
            raise UsageError(f"image folder {root} does not exist or is not a folder")
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise UsageError(f"image folder {root} has no class subfolders; put the images of each class "
                             f"in a subfolder of their own (root/<class>/<image>.jpg)")
        paths, labels = _Strings(), []
        for label, name in enumerate(self.classes):
            for folder, dirs, files in os.walk(os.path.join(root, name), followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                        paths.append(os.path.relpath(os.path.join(folder, f), root))
                        labels.append(label)
        if not labels:
            raise UsageError(f"image folder {root} has {len(self.classes)} class subfolders but no images "
                             f"({'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}) in them")
        self.paths, self.labels = paths.freeze(), np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        epoch, index = _split_key(key)
        j, img, skipped = _load_or_next(len(self), index, lambda i: open_image(os.path.join(self.root, self.paths[i])),
                                        lambda i: repr(self.paths[i]), self.root)
        views = self.transform(img, sample_rng(self.seed, epoch, index)) if self.transform else TF.to_tensor(img)
        return views, int(self.labels[j]), skipped


def _expand_braces(pattern):
    """Brace expansion as in bash and braceexpand: `{a,b}` alternatives (nestable) and `{0..9}` ranges,
    optionally with a step `{0..10..2}`, keeping zero padding (`{00000..00331}`), plus letter ranges."""
    depth, start = 0, -1
    for i, c in enumerate(pattern):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1:i], pattern[i + 1:]
                choices = _brace_body(body)
                if choices is None:  # not an expansion: keep "{body}" literally, expand the rest
                    return [head + "{" + body + "}" + t for t in _expand_braces(tail)]
                tails = _expand_braces(tail)
                return [head + c2 + t for c in choices for c2 in _expand_braces(c) for t in tails]
    return [pattern]


def _brace_body(body):
    """The alternatives inside one pair of braces, or None when the body is not an expansion."""
    parts, depth, last = [], 0, 0
    for i, c in enumerate(body):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    if parts:
        return parts + [body[last:]]
    m = regex.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    if m:
        a, b = int(m[1]), int(m[2])
        step = abs(int(m[3] or 1)) or 1
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (m[1], m[2]))
        width = max(len(m[1]), len(m[2])) if padded else 0
        values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        return [str(v).zfill(width) for v in values]
    m = regex.fullmatch(r"([a-zA-Z])\.\.([a-zA-Z])", body)
    if m:
        a, b = ord(m[1]), ord(m[2])
        return [chr(v) for v in (range(a, b + 1) if a <= b else range(a, b - 1, -1))]
    return None


def expand_urls(spec):
    """Shard list from a spec such as `cc3m/{00000..00331}.tar::cc12m/{00000..01242}.tar`: sources joined
    by `::`, each brace-expanded (ranges keep their zero padding, `{a,b}` lists). A list of specs is
    expanded item by item. Empty parts are dropped."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = []
    for s in specs:
        for part in s.split("::"):
            if part.strip():
                urls.extend(_expand_braces(part.strip()))
    return urls


_END_OF_PASS = object()  # marker in a reader's stream: every one of its shards has been read once
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _is_url(path):
    return path.startswith(("http://", "https://"))


def _unsafe_member_name(name):
    """An absolute name, a drive letter or a `..` component. Nothing is ever extracted, so such a name
    could do no harm here, but it marks a hostile or broken archive: it is ignored and counted."""
    n = name.replace("\\", "/")
    return n.startswith("/") or regex.match(r"[A-Za-z]:", n) is not None or ".." in n.split("/")


def _shuffle(stream, size, rng):
    """A shuffle buffer of `size` samples. Items that are not samples (the str reasons of skipped
    samples) go straight through; at `_END_OF_PASS` the buffer is emptied in random order, so that each
    pass over a reader's shards is a permutation of its samples."""
    buf = []
    for item in stream:
        if item is _END_OF_PASS:
            rng.shuffle(buf)
            yield from buf
            buf = []
        elif isinstance(item, str) or size <= 1:
            yield item
        elif len(buf) < size:
            buf.append(item)
        else:
            j = rng.randrange(size)
            item, buf[j] = buf[j], item
            yield item


class TarShards(torch.utils.data.IterableDataset):
    """Image-text samples from WebDataset-layout tar shards, as img2dataset writes them (CC3M, CC12M,
    LAION): consecutive members sharing a key (the name up to the first dot of the basename, directory
    included) form a sample, which needs an image (jpg, jpeg, png or webp) and a txt caption. `urls` are
    local paths or http(s) URLs, or a spec for `expand_urls`.

    Shards are read in streaming mode, member by member into memory; nothing is ever extracted.
    Members with an absolute name or a `..` component and members that are not regular files (links,
    devices) are ignored and counted in `stats`; incomplete, oversized or undecodable samples are
    skipped with a `DataWarning` and counted in the next item's `skipped`; a shard that cannot be read
    is warned about and counted. A reader whose shards all end up yielding nothing raises a UsageError.

    The stream is infinite; the loader sets the length of an epoch (`TrainLoader`, `num_samples`). Every
    (rank, DataLoader worker) pair is one reader. Without `resampled` a reader cycles through its own
    shards (shard i goes to reader i mod readers; with fewer shards than readers, readers share shards),
    in an order reshuffled on every pass, and the shuffle buffer is emptied at the end of each pass, so a
    pass is a permutation of the reader's samples. With `resampled` every reader draws shards from the
    whole list with replacement, forever.

    Determinism and resuming: `set_epoch(epoch, skip)` must be called before an iterator is created (the
    loader does it). A reader's stream (shard order, shuffle buffer, and the transform rng of its n-th
    sample, `sample_rng` seeded from (seed, skip, reader)) is a function of (seed, epoch, skip, rank,
    worker). Each epoch starts a fresh stream, so with a `num_samples` that is not one pass, an epoch
    does not resume where the last one stopped. On a mid-epoch resume the exact position is not
    restored: the stream is reseeded with (epoch, skip) instead, which is statistically clean (no
    sample is favoured) but may repeat or leave out samples of that one epoch. With `resampled`, an
    epoch is simply a number of samples drawn, and a restart is as clean as a fresh epoch."""

    def __init__(self, urls, transform, context_length=CONTEXT_LENGTH, seed=0, shuffle_buffer=1000,
                 resampled=False, rank=0, world_size=1, max_member_bytes=64 << 20):
        self.urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise UsageError(f"no tar shards given ({urls!r}); give shards as 'dir/{{00000..00331}}.tar', "
                             f"several sources joined with '::'")
        self.transform, self.context_length, self.seed = transform, context_length, seed
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.rank, self.world_size, self.max_member_bytes = rank, world_size, max_member_bytes
        self.epoch, self.skip = 0, 0
        # counters of this process (each DataLoader worker has its own copy): shards, bad_shards, samples,
        # incomplete, corrupt, unsafe_members
        self.stats = {k: 0 for k in ("shards", "bad_shards", "samples", "incomplete", "corrupt", "unsafe_members")}

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def _open(self, url):
        if _is_url(url):
            return urllib.request.urlopen(url, timeout=60)
        return open(url, "rb")

    def _read_shard(self, url):
        """Yield the samples of one shard as (key, url, image bytes, text bytes), and for each sample that
        cannot be used a str saying why."""
        self.stats["shards"] += 1
        try:
            f = self._open(url)
        except Exception as e:
            self.stats["bad_shards"] += 1
            _warn_data(f"cannot open tar shard {url}: {_reason(e)}")
            return
        key, group, members = None, {}, 0
        try:
            with f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for m in tar:
                    members += 1
                    unsafe = _unsafe_member_name(m.name)
                    if unsafe or not (m.isreg() or m.isdir()):  # links, devices, fifos are never followed
                        self.stats["unsafe_members"] += 1
                        why = "absolute name or '..' component" if unsafe else "not a regular file"
                        _warn_data(f"ignoring tar member {m.name!r} of {url}: {why}")
                        continue
                    if m.isdir():
                        continue
                    folder, _, base = m.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not stem or not dot:  # no extension, or a hidden file such as "._0001.jpg"
                        continue
                    k = f"{folder}/{stem}" if folder else stem
                    if k != key:
                        if key is not None:
                            yield self._sample(url, key, group)
                        key, group = k, {}
                    group[ext.lower()] = tar.extractfile(m).read() if m.size <= self.max_member_bytes else None
        except Exception as e:  # a truncated or corrupt archive: keep what was read, drop the open group
            self.stats["bad_shards"] += 1
            _warn_data(f"tar shard {url} is unreadable after {members} members: {_reason(e)}")
            if key is not None:
                yield f"sample {key!r} of {url} cut short by the read error"
            return
        if key is not None:
            yield self._sample(url, key, group)

    def _sample(self, url, key, group):
        image = next((e for e in TAR_IMAGE_EXTENSIONS if e in group), None)
        if image is None or "txt" not in group:
            return (f"incomplete sample {key!r} of {url}: it has {sorted(group)}, a sample needs an image "
                    f"({'/'.join(TAR_IMAGE_EXTENSIONS)}) and a txt")
        if group[image] is None or group["txt"] is None:
            return f"sample {key!r} of {url} has a member larger than {self.max_member_bytes} bytes"
        return key, url, group[image], group["txt"]

    def _own_shards(self, reader, readers):
        """The shards a reader cycles through without resampling: every readers-th from `reader` on, or
        one shared shard when there are fewer shards than readers."""
        return self.urls[reader::readers] if len(self.urls) >= readers else [self.urls[reader % len(self.urls)]]

    def _shard_order(self, reader, readers, rng):
        """The shards of one reader, forever, with _END_OF_PASS after each pass (without resampling)."""
        if self.resampled:
            while True:
                yield rng.choice(self.urls)
        mine = self._own_shards(reader, readers)
        while True:
            order = list(mine)
            rng.shuffle(order)
            yield from order
            yield _END_OF_PASS

    def _raw_samples(self, reader, readers, rng):
        """Undecoded samples of one reader; raises once every shard it can draw has been tried since the
        last sample came out (no sample at all), or after too many unusable samples in a row."""
        pool = set(self.urls if self.resampled else self._own_shards(reader, readers))
        fruitless, bad_in_a_row, last_reason = set(), 0, None
        for url in self._shard_order(reader, readers, rng):
            if url is _END_OF_PASS:
                yield url
                continue
            produced = 0
            for item in self._read_shard(url):
                if isinstance(item, str):
                    self.stats["incomplete"] += 1
                    bad_in_a_row, last_reason = bad_in_a_row + 1, item
                    if bad_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                        raise UsageError(f"{bad_in_a_row} samples in a row of the tar shards could not be used "
                                         f"(last: {last_reason})")
                else:
                    produced, bad_in_a_row = produced + 1, 0
                yield item
            if produced:
                fruitless.clear()
            else:
                fruitless.add(url)
                if fruitless >= pool:
                    raise UsageError(
                        f"reader {reader} (rank {self.rank}) read all of its {len(pool)} tar shards (e.g. {url}) "
                        f"and found no usable sample (last problem: {last_reason or 'none'}; stats {self.stats}); "
                        f"each sample needs an image ({'/'.join(TAR_IMAGE_EXTENSIONS)}) and a txt with the same key")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        epoch, skip = self.epoch, self.skip
        # str seeds are hashed with SHA-512 by random.seed, so this is the same in every process
        rng = random.Random(f"TarShards/{self.seed}/{epoch}/{skip}/{reader}")
        stream_seed = (self.seed * 2 ** 40 + skip) * 2 ** 24 + reader  # unique per (seed, skip, reader)
        pending, corrupt_in_a_row, count = 0, 0, 0
        for item in _shuffle(self._raw_samples(reader, readers, rng), self.shuffle_buffer, rng):
            if isinstance(item, str):
                _warn_data(f"skipping {item}")
                pending += 1
                continue
            key, url, image, text = item
            try:
                img = open_image(image)
            except Exception as e:
                self.stats["corrupt"] += 1
                _warn_data(f"skipping undecodable image of sample {key!r} of {url}: {_reason(e)}")
                pending, corrupt_in_a_row = pending + 1, corrupt_in_a_row + 1
                if corrupt_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                    raise UsageError(f"{corrupt_in_a_row} images in a row of the tar shards could not be decoded "
                                     f"(last: sample {key!r} of {url}: {_reason(e)})")
                continue
            rng_i = sample_rng(stream_seed, epoch, count)
            views = self.transform(img, rng_i) if self.transform else TF.to_tensor(img)
            caption = text.decode("utf-8", errors="replace")
            self.stats["samples"] += 1
            yield views, tokenize(caption, self.context_length)[0], pending
            pending, corrupt_in_a_row, count = 0, 0, count + 1


# ----------------------------------------------------------------------------------------------------
# Sampling across ranks and workers, resumable mid-epoch
# ----------------------------------------------------------------------------------------------------

class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) keys for one rank: a permutation of range(n) seeded by (seed, epoch), cut to a
    multiple of the global batch (every rank runs the same number of steps), rank r taking every
    world-th index from r. `skip` batches at the start are passed over without loading them, which is
    how a run resumes in the middle of an epoch."""

    def __init__(self, n, batch_size, rank, world_size, seed=0, shuffle=True):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.skip = 0, 0
        self.steps = n // (batch_size * world_size)

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return (self.steps - self.skip) * self.batch_size

    def indices(self):
        """This rank's indices of the epoch, from batch `skip` on: LongTensor[(steps - skip) · batch_size]."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        order = order[: self.steps * self.batch_size * self.world][self.rank::self.world]
        return order[self.skip * self.batch_size:]

    def __iter__(self):
        for i in self.indices().tolist():
            yield (self.epoch, i)


def _stack(values):
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, (tuple, list)):
        return tuple(_stack(v) for v in zip(*values))
    return torch.tensor(values)


def collate(items):
    """A list of dataset items -> a tuple with one batched entry per field: `(views, targets, skipped[B])`
    for the item contract. Tensors are stacked (a tuple of views gives a tuple of stacked views) and
    numbers become a tensor (int labels and `skipped` a LongTensor[B])."""
    return tuple(_stack(field) for field in zip(*items))


class _Batches:
    """The batches of one epoch: exactly `n` of them. It has a len(), and a UsageError raised in a
    DataLoader worker comes out with its one-line message instead of the worker's traceback. `note(b,
    skipped)`, if given, sees the skipped counts of the b-th batch."""

    def __init__(self, loader, n, note=None):
        self.it, self.n, self.done, self.note = iter(loader), n, 0, note

    def __iter__(self):
        return self

    def __len__(self):
        return self.n - self.done

    def __next__(self):
        if self.done >= self.n:
            self.it = None  # lets a non-persistent DataLoader iterator shut its workers down
            raise StopIteration
        try:
            batch = next(self.it)
        except UsageError as e:
            raise UsageError(_one_line(e)) from None
        except StopIteration:
            raise RuntimeError(f"the data ran out after {self.done} of {self.n} batches") from None
        if self.note is not None:
            self.note(self.done, batch[2])
        self.done += 1
        return batch


class TrainLoader:
    """Batches for one rank. `batches(epoch, skip)` iterates over the batches of `epoch` from batch `skip`
    on, exactly `steps_per_epoch - skip` of them; `steps_per_epoch` is the same on every rank.

    A map-style dataset (keys (epoch, index)) goes through `EpochSampler`; its workers persist across
    epochs, since the sampler runs in the main process. A `TarShards` stream needs `num_samples`, which
    sets steps_per_epoch = num_samples // (batch_size * world_size); its workers are started anew every
    epoch, after `set_epoch(epoch, skip)`, so that each worker sees the epoch.

    Unreadable samples of a map-style dataset are known by index: an item whose `skipped` is k stands for
    the unusable rows index, index + 1, ..., index + k - 1 (see _load_or_next), and the sampler says which
    index each item was asked for. `take_unreadable` returns the indices met since its last call that this
    loader had not met before (so a bad file is reported once, whatever the epochs and the retries that meet
    it); None for tar shards, whose samples have no index."""

    def __init__(self, dataset, batch_size, rank, world_size, seed, num_workers, num_samples=None):
        self.dataset, self.batch_size = dataset, batch_size
        self.unreadable, self.new_unreadable, self.order = set(), [], None
        # the loader's own generator: starting an iterator must not draw from the global RNG, or a resumed
        # run's random masks would drift from those of an uninterrupted one
        workers = dict(num_workers=num_workers, pin_memory=torch.cuda.is_available(), collate_fn=collate,
                       prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(seed))
        if isinstance(dataset, torch.utils.data.IterableDataset):
            if num_samples is None:
                raise UsageError("tar shards have no length: pass --train-num-samples (the number of samples "
                                 "in one epoch, e.g. the dataset's size)")
            if (getattr(dataset, "rank", rank), getattr(dataset, "world_size", world_size)) != (rank, world_size):
                raise ValueError(f"the dataset was built for rank {dataset.rank} of {dataset.world_size}, "
                                 f"the loader for rank {rank} of {world_size}")
            self.sampler = None
            self.steps_per_epoch = num_samples // (batch_size * world_size)
            readers = world_size * max(num_workers, 1)
            if len(getattr(dataset, "urls", ())) < readers:
                warnings.warn(f"only {len(dataset.urls)} tar shards for {readers} readers ({world_size} ranks x "
                              f"{max(num_workers, 1)} workers): some readers share shards"
                              + ("" if dataset.resampled else ", so an epoch repeats their samples; add shards "
                                 "or draw shards with replacement"), DataWarning)
            self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, **workers)
        else:
            self.sampler = EpochSampler(len(dataset), batch_size, rank, world_size, seed)
            self.steps_per_epoch = self.sampler.steps
            self.loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                persistent_workers=num_workers > 0, **workers)
        if self.steps_per_epoch == 0:
            n = num_samples if self.sampler is None else len(dataset)
            raise UsageError(f"the dataset has {n} samples, fewer than one global batch of {batch_size * world_size}; "
                             f"lower --batch-size or add data")

    def batches(self, epoch, skip=0):
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, skip)
            self.order = None  # this epoch's indices, computed when a batch first reports a skip
        else:
            self.dataset.set_epoch(epoch, skip)
        return _Batches(self.loader, self.steps_per_epoch - skip, self._note if self.sampler is not None else None)

    def _note(self, b, skipped):
        if not int(skipped.sum()):
            return
        if self.order is None:
            self.order = self.sampler.indices()
        n = len(self.dataset)
        for p in skipped.nonzero().flatten().tolist():
            first = int(self.order[b * self.batch_size + p])
            for j in ((first + k) % n for k in range(int(skipped[p]))):
                if j not in self.unreadable:
                    self.unreadable.add(j)
                    self.new_unreadable.append(j)

    def take_unreadable(self):
        if self.sampler is None:
            return None
        new, self.new_unreadable = self.new_unreadable, []
        return new


IMAGE_TEXT_FORMATS = ("an image-text CSV/TSV file (*.csv, *.tsv) or WebDataset tar shards "
                      "('dir/{00000..00331}.tar', sources joined by '::')")
ACCEPTED_FORMATS = IMAGE_TEXT_FORMATS + ", or an ImageFolder directory (root/<class>/<image>) for image-only data"


def make_train_loader(source, *, transform, kind, batch_size, rank, world_size, seed, num_workers,
                      context_length=CONTEXT_LENGTH, csv_img_key="filepath", csv_caption_key="title",
                      csv_separator="\t", num_samples=None, resampled=False, builtin_length=100_000,
                      builtin_size=64):
    """The training loader for `source`: None for the built-in `Shapes`, a *.csv/*.tsv file
    (`CsvDataset`), tar shards (`TarShards`, which need `num_samples`) or a directory (`ImageFolder`).
    `kind` is 'image-text' (targets are token ids) or 'image' (targets are class labels)."""
    if kind not in ("image-text", "image"):
        raise ValueError(f"kind must be 'image-text' or 'image', not {kind!r}")
    if source is None:
        dataset = Shapes("train", length=builtin_length, transform=transform, image_size=builtin_size,
                         target="text" if kind == "image-text" else "label", context_length=context_length, seed=seed)
        return TrainLoader(dataset, batch_size, rank, world_size, seed, num_workers)
    source = str(source)
    if source.lower().endswith((".csv", ".tsv")):
        if kind != "image-text":
            raise UsageError(f"{source} is an image-text CSV, but this script trains on images only; "
                             f"give an ImageFolder directory (root/<class>/<image>)")
        dataset = CsvDataset(source, transform, csv_img_key, csv_caption_key, csv_separator, context_length, seed)
        return TrainLoader(dataset, batch_size, rank, world_size, seed, num_workers)
    if os.path.isdir(source):
        if kind != "image":
            tars = any(name.endswith(".tar") for name in os.listdir(source))
            example = os.path.join(source, "{00000..00099}.tar")
            hint = f"; it holds .tar files, so give them as a pattern, e.g. '{example}'" if tars else ""
            raise UsageError(f"{source} is a directory, which is read as an ImageFolder without captions; this "
                             f"script needs image-text data: {IMAGE_TEXT_FORMATS}{hint}")
        return TrainLoader(ImageFolder(source, transform, seed), batch_size, rank, world_size, seed, num_workers)
    if ".tar" in source:
        if kind != "image-text":
            raise UsageError(f"{source} names tar shards of image-text pairs, but this script trains on images "
                             f"only; give an ImageFolder directory (root/<class>/<image>)")
        urls = expand_urls(source)
        if not urls:
            raise UsageError(f"{source!r} expands to no tar shards; give e.g. 'dir/{{00000..00331}}.tar'")
        if num_samples is None:
            raise UsageError(f"tar shards ({source}) have no length: pass --train-num-samples (the number of "
                             f"samples in one epoch, e.g. the dataset's size)")
        local = [u for u in urls if not _is_url(u)]
        missing = [u for u in local if not os.path.isfile(u)]
        if local and len(missing) == len(local):
            raise UsageError(f"no tar shard of {source} exists (first: {missing[0]}); check --train-data")
        if missing:
            warnings.warn(f"{len(missing)} of {len(urls)} tar shards do not exist (first: {missing[0]}); "
                          f"they will be skipped", DataWarning)
        dataset = TarShards(urls, transform, context_length, seed, resampled=resampled, rank=rank,
                            world_size=world_size)
        return TrainLoader(dataset, batch_size, rank, world_size, seed, num_workers, num_samples=num_samples)
    if not os.path.exists(source):
        raise UsageError(f"training data {source} does not exist; give {ACCEPTED_FORMATS}")
    raise UsageError(f"cannot read training data {source}: give {ACCEPTED_FORMATS}")


# ----------------------------------------------------------------------------------------------------
# Evaluation: each rank takes a slice of the evaluation set
# ----------------------------------------------------------------------------------------------------

class ShardSampler(torch.utils.data.Sampler):
    """The indices range(rank, n, world_size): every sample on exactly one rank, in order. Ranks may get
    one sample more or less than others, so the evaluation loop must not call collectives per batch;
    all-reduce the counts once at the end."""

    def __init__(self, n, rank, world_size):
        self.n, self.rank, self.world = n, rank, world_size

    def __len__(self):
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))


def eval_loader(dataset, batch_size, rank, world_size, num_workers):
    """A plain DataLoader over this rank's slice of `dataset` (see `ShardSampler`), in order."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------------
# Zero-shot metadata (plain data): OpenAI's class names and prompt templates
# ----------------------------------------------------------------------------------------------------

# The 80 ImageNet templates of openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb
OPENAI_IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]

# The 7 of them chosen in the same notebook by forward selection; SLIP and A-CLIP evaluate ImageNet with these
SIMPLE_IMAGENET_TEMPLATES = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
]

# The 18 templates of openai/CLIP data/prompts.md, used for both CIFAR-10 and CIFAR-100
CIFAR_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
]

# OpenAI's 1000 hand-edited ImageNet class names (same notebook), in the order of the sorted synset folders
# (n01440764, n01443537, ...) that ImageFolder gives. Some names occur twice ("missile", "sunglasses").
IMAGENET_CLASSNAMES = (
    "tench|goldfish|great white shark|tiger shark|hammerhead shark|electric ray|stingray|rooster|hen|ostrich|"
    "brambling|goldfinch|house finch|junco|indigo bunting|American robin|bulbul|jay|magpie|chickadee|"
    "American dipper|kite (bird of prey)|bald eagle|vulture|great grey owl|fire salamander|smooth newt|newt|"
    "spotted salamander|axolotl|American bullfrog|tree frog|tailed frog|loggerhead sea turtle|"
    "leatherback sea turtle|mud turtle|terrapin|box turtle|banded gecko|green iguana|Carolina anole|"
    "desert grassland whiptail lizard|agama|frilled-necked lizard|alligator lizard|Gila monster|"
    "European green lizard|chameleon|Komodo dragon|Nile crocodile|American alligator|triceratops|worm snake|"
    "ring-necked snake|eastern hog-nosed snake|smooth green snake|kingsnake|garter snake|water snake|"
    "vine snake|night snake|boa constrictor|African rock python|Indian cobra|green mamba|sea snake|"
    "Saharan horned viper|eastern diamondback rattlesnake|sidewinder rattlesnake|trilobite|harvestman|scorpion|"
    "yellow garden spider|barn spider|European garden spider|southern black widow|tarantula|wolf spider|tick|"
    "centipede|black grouse|ptarmigan|ruffed grouse|prairie grouse|peafowl|quail|partridge|african grey parrot|"
    "macaw|sulphur-crested cockatoo|lorikeet|coucal|bee eater|hornbill|hummingbird|jacamar|toucan|duck|"
    "red-breasted merganser|goose|black swan|tusker|echidna|platypus|wallaby|koala|wombat|jellyfish|"
    "sea anemone|brain coral|flatworm|nematode|conch|snail|slug|sea slug|chiton|chambered nautilus|"
    "Dungeness crab|rock crab|fiddler crab|red king crab|American lobster|spiny lobster|crayfish|hermit crab|"
    "isopod|white stork|black stork|spoonbill|flamingo|little blue heron|great egret|bittern bird|crane bird|"
    "limpkin|common gallinule|American coot|bustard|ruddy turnstone|dunlin|common redshank|dowitcher|"
    "oystercatcher|pelican|king penguin|albatross|grey whale|killer whale|dugong|sea lion|Chihuahua|"
    "Japanese Chin|Maltese|Pekingese|Shih Tzu|King Charles Spaniel|Papillon|toy terrier|Rhodesian Ridgeback|"
    "Afghan Hound|Basset Hound|Beagle|Bloodhound|Bluetick Coonhound|Black and Tan Coonhound|"
    "Treeing Walker Coonhound|English foxhound|Redbone Coonhound|borzoi|Irish Wolfhound|Italian Greyhound|"
    "Whippet|Ibizan Hound|Norwegian Elkhound|Otterhound|Saluki|Scottish Deerhound|Weimaraner|"
    "Staffordshire Bull Terrier|American Staffordshire Terrier|Bedlington Terrier|Border Terrier|"
    "Kerry Blue Terrier|Irish Terrier|Norfolk Terrier|Norwich Terrier|Yorkshire Terrier|Wire Fox Terrier|"
    "Lakeland Terrier|Sealyham Terrier|Airedale Terrier|Cairn Terrier|Australian Terrier|"
    "Dandie Dinmont Terrier|Boston Terrier|Miniature Schnauzer|Giant Schnauzer|Standard Schnauzer|"
    "Scottish Terrier|Tibetan Terrier|Australian Silky Terrier|Soft-coated Wheaten Terrier|"
    "West Highland White Terrier|Lhasa Apso|Flat-Coated Retriever|Curly-coated Retriever|Golden Retriever|"
    "Labrador Retriever|Chesapeake Bay Retriever|German Shorthaired Pointer|Vizsla|English Setter|Irish Setter|"
    "Gordon Setter|Brittany dog|Clumber Spaniel|English Springer Spaniel|Welsh Springer Spaniel|Cocker Spaniel|"
    "Sussex Spaniel|Irish Water Spaniel|Kuvasz|Schipperke|Groenendael dog|Malinois|Briard|Australian Kelpie|"
    "Komondor|Old English Sheepdog|Shetland Sheepdog|collie|Border Collie|Bouvier des Flandres dog|Rottweiler|"
    "German Shepherd Dog|Dobermann|Miniature Pinscher|Greater Swiss Mountain Dog|Bernese Mountain Dog|"
    "Appenzeller Sennenhund|Entlebucher Sennenhund|Boxer|Bullmastiff|Tibetan Mastiff|French Bulldog|Great Dane|"
    "St. Bernard|husky|Alaskan Malamute|Siberian Husky|Dalmatian|Affenpinscher|Basenji|pug|Leonberger|"
    "Newfoundland dog|Great Pyrenees dog|Samoyed|Pomeranian|Chow Chow|Keeshond|brussels griffon|"
    "Pembroke Welsh Corgi|Cardigan Welsh Corgi|Toy Poodle|Miniature Poodle|Standard Poodle|"
    "Mexican hairless dog (xoloitzcuintli)|grey wolf|Alaskan tundra wolf|red wolf or maned wolf|coyote|dingo|"
    "dhole|African wild dog|hyena|red fox|kit fox|Arctic fox|grey fox|tabby cat|tiger cat|Persian cat|"
    "Siamese cat|Egyptian Mau|cougar|lynx|leopard|snow leopard|jaguar|lion|tiger|cheetah|brown bear|"
    "American black bear|polar bear|sloth bear|mongoose|meerkat|tiger beetle|ladybug|ground beetle|"
    "longhorn beetle|leaf beetle|dung beetle|rhinoceros beetle|weevil|fly|bee|ant|grasshopper|cricket insect|"
    "stick insect|cockroach|praying mantis|cicada|leafhopper|lacewing|dragonfly|damselfly|"
    "red admiral butterfly|ringlet butterfly|monarch butterfly|small white butterfly|sulphur butterfly|"
    "gossamer-winged butterfly|starfish|sea urchin|sea cucumber|cottontail rabbit|hare|Angora rabbit|hamster|"
    "porcupine|fox squirrel|marmot|beaver|guinea pig|common sorrel horse|zebra|pig|wild boar|warthog|"
    "hippopotamus|ox|water buffalo|bison|ram (adult male sheep)|bighorn sheep|Alpine ibex|hartebeest|"
    "impala (antelope)|gazelle|arabian camel|llama|weasel|mink|European polecat|black-footed ferret|otter|"
    "skunk|badger|armadillo|three-toed sloth|orangutan|gorilla|chimpanzee|gibbon|siamang|guenon|patas monkey|"
    "baboon|macaque|langur|black-and-white colobus|proboscis monkey|marmoset|white-headed capuchin|"
    "howler monkey|titi monkey|Geoffroy's spider monkey|common squirrel monkey|ring-tailed lemur|indri|"
    "Asian elephant|African bush elephant|red panda|giant panda|snoek fish|eel|silver salmon|rock beauty fish|"
    "clownfish|sturgeon|gar fish|lionfish|pufferfish|abacus|abaya|academic gown|accordion|acoustic guitar|"
    "aircraft carrier|airliner|airship|altar|ambulance|amphibious vehicle|analog clock|apiary|apron|trash can|"
    "assault rifle|backpack|bakery|balance beam|balloon|ballpoint pen|Band-Aid|banjo|baluster / handrail|"
    "barbell|barber chair|barbershop|barn|barometer|barrel|wheelbarrow|baseball|basketball|bassinet|bassoon|"
    "swimming cap|bath towel|bathtub|station wagon|lighthouse|beaker|military hat (bearskin or shako)|"
    "beer bottle|beer glass|bell tower|baby bib|tandem bicycle|bikini|ring binder|binoculars|birdhouse|"
    "boathouse|bobsleigh|bolo tie|poke bonnet|bookcase|bookstore|bottle cap|hunting bow|bow tie|"
    "brass memorial plaque|bra|breakwater|breastplate|broom|bucket|buckle|bulletproof vest|high-speed train|"
    "butcher shop|taxicab|cauldron|candle|cannon|canoe|can opener|cardigan|car mirror|carousel|tool kit|"
    "cardboard box / carton|car wheel|automated teller machine|cassette|cassette player|castle|catamaran|"
    "CD player|cello|mobile phone|chain|chain-link fence|chain mail|chainsaw|storage chest|chiffonier|"
    "bell or wind chime|china cabinet|Christmas stocking|church|movie theater|cleaver|cliff dwelling|cloak|"
    "clogs|cocktail shaker|coffee mug|coffeemaker|spiral or coil|combination lock|computer keyboard|"
    "candy store|container ship|convertible|corkscrew|cornet|cowboy boot|cowboy hat|cradle|construction crane|"
    "crash helmet|crate|infant bed|Crock Pot|croquet ball|crutch|cuirass|dam|desk|desktop computer|"
    "rotary dial telephone|diaper|digital clock|digital watch|dining table|dishcloth|dishwasher|disc brake|"
    "dock|dog sled|dome|doormat|drilling rig|drum|drumstick|dumbbell|Dutch oven|electric fan|electric guitar|"
    "electric locomotive|entertainment center|envelope|espresso machine|face powder|feather boa|filing cabinet|"
    "fireboat|fire truck|fire screen|flagpole|flute|folding chair|football helmet|forklift|fountain|"
    "fountain pen|four-poster bed|freight car|French horn|frying pan|fur coat|garbage truck|"
    "gas mask or respirator|gas pump|goblet|go-kart|golf ball|golf cart|gondola|gong|gown|grand piano|"
    "greenhouse|radiator grille|grocery store|guillotine|hair clip|hair spray|half-track|hammer|hamper|"
    "hair dryer|hand-held computer|handkerchief|hard disk drive|harmonica|harp|combine harvester|hatchet|"
    "holster|home theater|honeycomb|hook|hoop skirt|gymnastic horizontal bar|horse-drawn vehicle|hourglass|"
    "iPod|clothes iron|carved pumpkin|jeans|jeep|T-shirt|jigsaw puzzle|rickshaw|joystick|kimono|knee pad|knot|"
    "lab coat|ladle|lampshade|laptop computer|lawn mower|lens cap|letter opener|library|lifeboat|lighter|"
    "limousine|ocean liner|lipstick|slip-on shoe|lotion|music speaker|loupe magnifying glass|sawmill|"
    "magnetic compass|messenger bag|mailbox|tights|one-piece bathing suit|manhole cover|maraca|marimba|mask|"
    "matchstick|maypole|maze|measuring cup|medicine cabinet|megalith|microphone|microwave oven|"
    "military uniform|milk can|minibus|miniskirt|minivan|missile|mitten|mixing bowl|mobile home|ford model t|"
    "modem|monastery|monitor|moped|mortar and pestle|graduation cap|mosque|mosquito net|vespa|mountain bike|"
    "tent|computer mouse|mousetrap|moving van|muzzle|metal nail|neck brace|necklace|baby pacifier|"
    "notebook computer|obelisk|oboe|ocarina|odometer|oil filter|pipe organ|oscilloscope|overskirt|bullock cart|"
    "oxygen mask|product packet / packaging|paddle|paddle wheel|padlock|paintbrush|pajamas|palace|pan flute|"
    "paper towel|parachute|parallel bars|park bench|parking meter|railroad car|patio|payphone|pedestal|"
    "pencil case|pencil sharpener|perfume|Petri dish|photocopier|plectrum|Pickelhaube|picket fence|"
    "pickup truck|pier|piggy bank|pill bottle|pillow|ping-pong ball|pinwheel|pirate ship|drink pitcher|"
    "block plane|planetarium|plastic bag|plate rack|farm plow|plunger|Polaroid camera|pole|police van|poncho|"
    "pool table|soda bottle|plant pot|potter's wheel|power drill|prayer rug|printer|prison|missile|projector|"
    "hockey puck|punching bag|purse|quill|quilt|race car|racket|radiator|radio|radio telescope|rain barrel|"
    "recreational vehicle|fishing casting reel|reflex camera|refrigerator|remote control|restaurant|revolver|"
    "rifle|rocking chair|rotisserie|eraser|rugby ball|ruler measuring stick|sneaker|safe|safety pin|"
    "salt shaker|sandal|sarong|saxophone|scabbard|weighing scale|school bus|schooner|scoreboard|CRT monitor|"
    "screw|screwdriver|seat belt|sewing machine|shield|shoe store|shoji screen / room divider|shopping basket|"
    "shopping cart|shovel|shower cap|shower curtain|ski|balaclava ski mask|sleeping bag|slide rule|"
    "sliding door|slot machine|snorkel|snowmobile|snowplow|soap dispenser|soccer ball|sock|"
    "solar thermal collector|sombrero|soup bowl|keyboard space bar|space heater|space shuttle|spatula|"
    "motorboat|spider web|spindle|sports car|spotlight|stage|steam locomotive|through arch bridge|steel drum|"
    "stethoscope|scarf|stone wall|stopwatch|stove|strainer|tram|stretcher|couch|stupa|submarine|suit|sundial|"
    "sunglasses|sunglasses|sunscreen|suspension bridge|mop|sweatshirt|swim trunks / shorts|swing|"
    "electrical switch|syringe|table lamp|tank|tape player|teapot|teddy bear|television|tennis ball|"
    "thatched roof|front curtain|thimble|threshing machine|throne|tile roof|toaster|tobacco shop|toilet seat|"
    "torch|totem pole|tow truck|toy store|tractor|semi-trailer truck|tray|trench coat|tricycle|trimaran|tripod|"
    "triumphal arch|trolleybus|trombone|hot tub|turnstile|typewriter keyboard|umbrella|unicycle|upright piano|"
    "vacuum cleaner|vase|vaulted or arched ceiling|velvet fabric|vending machine|vestment|viaduct|violin|"
    "volleyball|waffle iron|wall clock|wallet|wardrobe|military aircraft|sink|washing machine|water bottle|"
    "water jug|water tower|whiskey jug|whistle|hair wig|window screen|window shade|Windsor tie|wine bottle|"
    "airplane wing|wok|wooden spoon|wool|split-rail fence|shipwreck|sailboat|yurt|website|comic book|crossword|"
    "traffic or street sign|traffic light|dust jacket|menu|plate|guacamole|consomme|hot pot|trifle|ice cream|"
    "popsicle|baguette|bagel|pretzel|cheeseburger|hot dog|mashed potatoes|cabbage|broccoli|cauliflower|"
    "zucchini|spaghetti squash|acorn squash|butternut squash|cucumber|artichoke|bell pepper|cardoon|mushroom|"
    "Granny Smith apple|strawberry|orange|lemon|fig|pineapple|banana|jackfruit|cherimoya (custard apple)|"
    "pomegranate|hay|carbonara|chocolate syrup|dough|meatloaf|pizza|pot pie|burrito|red wine|espresso|tea cup|"
    "eggnog|mountain|bubble|cliff|coral reef|geyser|lakeshore|promontory|sandbar|beach|valley|volcano|"
    "baseball player|bridegroom|scuba diver|rapeseed|daisy|yellow lady's slipper|corn|acorn|rose hip|"
    "horse chestnut seed|coral fungus|agaric|gyromitra|stinkhorn mushroom|earth star fungus|"
    "hen of the woods mushroom|bolete|corn cob|toilet paper"
).split("|")


# ----------------------------------------------------------------------------------------------------
# Model sizes
# ----------------------------------------------------------------------------------------------------
# Image tower: image size, patch, width, layers, heads. Text tower: context, width, layers, heads.
# embed_dim: the joint embedding. Every head is 64 wide except ViT-H's image heads (80), as in open_clip.
MODELS = {
    "tiny": dict(image_size=32, patch_size=8, width=128, layers=4, heads=2,
                 context_length=24, text_width=128, text_layers=2, text_heads=2, embed_dim=128),
    # the GPU quality study's size: ViT-S width at the built-in images' 64 px, patch 8 (64 patches), 6 layers
    "small": dict(image_size=64, patch_size=8, width=384, layers=6, heads=6,
                  context_length=24, text_width=256, text_layers=4, text_heads=4, embed_dim=256),
    "ViT-S/16": dict(image_size=224, patch_size=16, width=384, layers=12, heads=6,
                     context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-B/16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12,
                     context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-B/32": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12,
                     context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-L/14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16,
                     context_length=77, text_width=768, text_layers=12, text_heads=12, embed_dim=768),
    "ViT-L/16": dict(image_size=224, patch_size=16, width=1024, layers=24, heads=16,
                     context_length=77, text_width=768, text_layers=12, text_heads=12, embed_dim=768),
    "ViT-H/14": dict(image_size=224, patch_size=14, width=1280, layers=32, heads=16,
                     context_length=77, text_width=1024, text_layers=24, text_heads=16, embed_dim=1024),
}
# Where a method's released code builds a size otherwise: A-CLIP's ViT-L/16 keeps the 512-wide, 8-head text
# tower and 512-d joint space of its ViT-B/16, and its ViT-S/16 has 12 heads of 32 (microsoft/A-CLIP models.py,
# ACLIP_VITL16 and ACLIP_VITS16).
METHOD_MODELS = {("aclip", "ViT-L/16"): dict(text_width=512, text_heads=8, embed_dim=512),
                 ("aclip", "ViT-S/16"): dict(heads=12)}


def model_size(method, name):
    """The MODELS entry `name` with the method's released-code overrides (METHOD_MODELS)."""
    return {**MODELS[name], **METHOD_MODELS.get((method, name), {})}


def sincos_2d(grid, dim):
    """MAE's fixed 2-D sin-cos position embedding, with an all-zero [CLS] row first: (1 + grid², dim).
    The first half of the channels encodes the column, the second half the row."""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4, not {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))   # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out_x, out_y = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega                 # (grid², dim/4)
    emb = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)         # (grid², dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


# ----------------------------------------------------------------------------------------------------
# Command line: the flags every method script shares
# ----------------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr, exit status 2 (argparse's), no usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


class Range:
    """An argparse type: a number of `kind` (int or float) in the range [lo, hi], open at an end with
    lo_open / hi_open (None: unbounded), finite. A value outside is a one-line usage error naming the flag
    (argparse adds it), the value, the range and an example: `type=Range(int, 1, eg=256)`."""

    def __init__(self, kind, lo=None, hi=None, *, lo_open=False, hi_open=False, eg=None):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.eg = eg if eg is not None else lo if lo is not None and not lo_open else (lo or 0) + 1

    def __repr__(self):
        what = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo}"
        return f"{what} {'<' if self.hi_open else '<='} {self.hi}" if self.hi is not None else what

    def __call__(self, text):
        try:
            v = self.kind(text)
        except ValueError:
            v = None
        ok = v is not None and math.isfinite(v) and (
            self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and (
            self.hi is None or (v < self.hi if self.hi_open else v <= self.hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"got {text}; give {self!r}, e.g. {self.eg}")
        return v


def at_least(lo, kind=int, eg=None):
    """Range(kind, lo): the common case of a count (`at_least(1)`) or a non-negative weight (`at_least(0, float)`)."""
    return Range(kind, lo, eg=eg)


def positive(eg):
    """A float > 0 (a learning rate, a temperature, ε)."""
    return Range(float, 0, lo_open=True, eg=eg)


def fraction(lo_open=False, hi_open=False, eg=0.5):
    """A float in [0, 1], with either end open."""
    return Range(float, 0, 1, lo_open=lo_open, hi_open=hi_open, eg=eg)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' after each flag, except where X is None or False: there the help text itself
    says what happens by default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def make_parser(description, method, kind):
    """The flags every method script shares, in groups: data, model, optimisation, system. Image-only
    scripts (kind 'image') get no caption, CSV, tar or context-length flags. The method adds its own
    group; `parse_with_defaults` then fills in the recipe's or the demo's defaults."""
    p = Parser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    if kind == "image-text":
        g.add_argument("--train-data", help="image-text CSV/TSV, tar shards ('dir/{00000..00099}.tar', several "
                                            "sources joined by '::'); default: the built-in shapes")
        g.add_argument("--train-num-samples", type=at_least(1),
                       help="samples per epoch of tar shards (required for tar)")
        g.add_argument("--dataset-resampled", action="store_true", help="draw tar shards with replacement")
        g.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths")
        g.add_argument("--csv-caption-key", default="title",
                       help="CSV column of captions; 'title,description': one of them drawn per sample")
        g.add_argument("--csv-separator", default="\t", help="CSV separator")
    else:
        g.add_argument("--train-data", help="an ImageFolder directory (root/<class>/<image>); "
                                            "default: the built-in shapes")
    g.add_argument("--builtin-samples", type=at_least(1, eg=16384), help="samples per epoch of the built-in data")
    g.add_argument("--imagenet-val", help="ImageNet-style val folder for the periodic evaluation "
                                          "(default: the built-in held-out set)")
    g.add_argument("--workers", type=at_least(0, eg=8), help="data-loading processes per rank")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(MODELS), help="model size")
    g.add_argument("--act", choices=["quickgelu", "gelu"], help="MLP activation")
    if kind == "image-text":
        g.add_argument("--context-length", type=at_least(2, eg=77),
                       help="text tokens (the model size's when no default is set)")
    g.add_argument("--norm", choices=list(NORMS), help="pixel normalisation constants")
    g.add_argument("--crop-scale", type=fraction(lo_open=True),
                   help="smallest area fraction of the random training crop")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=at_least(1, eg=25), help="epochs")
    g.add_argument("--steps", type=at_least(1, eg=1000),
                   help="stop after this many steps in all (default: epochs × steps per epoch)")
    g.add_argument("--batch-size", type=at_least(1, eg=256), help="global batch over all ranks")
    g.add_argument("--lr", type=positive(5e-4), help="peak learning rate for the global batch (with --blr: "
                                                     "unless given, blr · batch / 256)")
    g.add_argument("--lr-start", type=at_least(0, float, 1e-6), help="learning rate at the start of the linear warm-up")
    g.add_argument("--lr-end", type=at_least(0, float, 1e-5), help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-epochs", type=at_least(0, float, 1), help="linear warm-up length, per step")
    g.add_argument("--wd", type=at_least(0, float, 0.1), help="AdamW weight decay")
    g.add_argument("--beta1", type=fraction(hi_open=True, eg=0.9), help="AdamW β1")
    g.add_argument("--beta2", type=fraction(hi_open=True, eg=0.98), help="AdamW β2")
    g.add_argument("--eps", type=positive(1e-8), help="AdamW ε")
    g.add_argument("--grad-clip", type=at_least(0, float, 1.0), help="clip the gradient norm to this (0 = off)")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default=f"runs/{method}", help="output folder: checkpoint, exports, logs")
    g.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help="continue from the checkpoint in --out-dir; `--resume auto`: continue if there is one, else "
                        "start a new run (the rule whenever torchrun or SLURM restarts the job)")
    g.add_argument("--seed", type=at_least(0), default=0, help="random seed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast precision (default: bf16 on CUDA, fp32 on CPU); fp16 uses a GradScaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass")
    g.add_argument("--log-every", type=at_least(1, eg=20), default=20, help="steps between log lines (and host syncs)")
    g.add_argument("--eval-every", type=at_least(0, float, 1), help="epochs between evaluations (0 = only at the end)")
    g.add_argument("--save-every", type=at_least(1, eg=1000), default=1000,
                   help="steps between checkpoints (and at the end)")
    return p


def parse_with_defaults(p, argv, recipe, demo):
    """Parse argv with the paper's recipe as the defaults when --train-data is given, and the built-in demo's
    values (demo over recipe) otherwise, so that `--help` shows the defaults that apply: `script.py --help`
    the demo's, `script.py --train-data x --help` the recipe's. An explicit flag always wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    real_data = any(a == "--train-data" or a.startswith("--train-data=") for a in argv)
    p.set_defaults(**(recipe if real_data else {**recipe, **demo}))
    args = p.parse_args(argv, argparse.Namespace(lr=None))  # lr stays None unless --lr is given
    if args.lr is None:  # MAE's rule where the method has a base lr (--blr), else the recipe's or demo's lr
        args.lr = args.blr * args.batch_size / 256 if getattr(args, "blr", None) is not None else p.get_default("lr")
    if getattr(args, "context_length", 0) is None:
        args.context_length = MODELS[args.model]["context_length"]
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def train_loader(args, *, transform, kind, rank, world_size):
    """`make_train_loader` with the data flags of `make_parser` (the image-text ones where the script has them)."""
    text = dict(context_length=args.context_length, csv_img_key=args.csv_img_key, num_samples=args.train_num_samples,
                csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator,
                resampled=args.dataset_resampled) if kind == "image-text" else {}
    return make_train_loader(args.train_data, transform=transform, kind=kind, batch_size=args.batch_size // world_size,
                             rank=rank, world_size=world_size, seed=args.seed, num_workers=args.workers,
                             builtin_length=args.builtin_samples or 100_000, **text)


# ----------------------------------------------------------------------------------------------------
# Distributed set-up and precision
# ----------------------------------------------------------------------------------------------------
def setup_distributed(device):
    """One process group in every case: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR are
    set, one or many nodes) and as plain `python script.py` (a world of one). Collectives then need no
    `if distributed` branches. gloo on CPU, nccl on CUDA. Returns (rank, world size, device)."""
    rank, world, local = (int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    world = max(world, 1)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no GPU is visible; pass --device cpu")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), dev


def rank_world():
    """(rank, world size), (0, 1) when no process group exists."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(x):
    """dist.all_reduce (sum, in place) where a process group exists; a world of one needs nothing."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def is_main():
    return rank_world()[0] == 0


def print0(*args):
    """print on the global rank 0 only (builtins.print is left alone)."""
    if is_main():
        tqdm.write(" ".join(str(a) for a in args))


def autocast(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch, device):
    """Tensors, possibly nested in tuples or lists, to the device (asynchronously from pinned memory)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(x, device) for x in batch)


# ----------------------------------------------------------------------------------------------------
# Weight files: checkpoints, exports, OpenAI TorchScript archives, OpenAI / open_clip state dicts
# ----------------------------------------------------------------------------------------------------
OPENAI_PREFIXES = ("visual.", "token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                   "text_projection", "logit_scale")
ACCEPTED = ("a checkpoint.pt or export written by maskclip.py, aclip.py or silc.py, an OpenAI CLIP "
            "TorchScript archive, or an OpenAI/open_clip ViT state dict")


def is_torchscript(path):
    """A TorchScript archive: a zip with a code/ folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def read_weights_file(path):
    """torch.load(weights_only=True) for pickled checkpoints; OpenAI's TorchScript archives are read for
    their tensors only by read_torchscript_tensors (no TorchScript code is compiled or run)."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist; expected {ACCEPTED}")
    if is_torchscript(path):
        return read_torchscript_tensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, a pickle of arbitrary objects, not a torch file at all
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a readable checkpoint ({reason}); expected {ACCEPTED}") from None


STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


class _ScriptObject:
    """Stands in for every TorchScript module class while unpickling: keeps the attributes, runs nothing."""
    state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def read_torchscript_tensors(path):
    """The parameters and buffers of a TorchScript archive (OpenAI's CLIP .pt files) as a flat state dict.
    Only `data.pkl` is unpickled, by an unpickler that resolves nothing but tensor rebuilding and stands
    in a plain object for every module class; the archive's code/ folder is never read or executed."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        root = names[0].split("/")[0]
        data_pkl = next((n for n in names if n == f"{root}/data.pkl"), None)
        if data_pkl is None:
            raise UsageError(f"{path} is a zip without data.pkl; expected {ACCEPTED}")

        def storage(key, dtype):
            raw = bytearray(z.read(f"{root}/data/{key}"))
            return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if module.startswith("__torch__"):
                    return _ScriptObject
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor
                if (module, name) == ("torch._utils", "_rebuild_parameter"):
                    return lambda data, *unused: data
                if (module, name) == ("collections", "OrderedDict"):
                    return dict
                if module == "torch" and name in STORAGE_DTYPES:
                    return STORAGE_DTYPES[name]
                if module == "torch.jit._pickle" and (name == "restore_type_tag" or name.startswith("build_")):
                    return lambda value, *unused: value  # type tags and list wrappers: plain data
                raise pickle.UnpicklingError(f"refusing {module}.{name}")

            def persistent_load(self, pid):  # ('storage', dtype from find_class, key, location, numel)
                return storage(pid[2], pid[1])

        try:
            obj = Unpickler(z.open(data_pkl)).load()
        except Exception as e:
            raise UsageError(f"{path}: cannot read its tensors ({e}); expected {ACCEPTED}") from None
    out = {}

    def walk(o, prefix):
        for k, v in (o.state if isinstance(o, _ScriptObject) else {}).items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v
            elif isinstance(v, _ScriptObject):
                walk(v, prefix + k + ".")
    walk(obj, "")
    return out


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return torch.as_strided(storage, size, stride, offset).clone()


def openai_state_dict(path, obj=None):
    """An OpenAI-layout CLIP state dict from any accepted file (or from `obj`, the file already read by
    read_weights_file), plus whatever the file says about itself (architecture, activation,
    normalisation). Returns (state_dict, info)."""
    obj = read_weights_file(path) if obj is None else obj
    info = {}
    if isinstance(obj, dict) and "model" in obj and "method" in obj:        # our training checkpoint
        info = {"config": obj["config"], "method": obj["method"], "norm": obj["args"].get("norm")}
        obj = {k: v for k, v in obj["model"].items() if k.startswith(OPENAI_PREFIXES)}
    elif isinstance(obj, dict) and "state_dict" in obj:                     # our export, or open_clip's
        info = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} holds no state dict of tensors; expected {ACCEPTED}")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    for extra in ("input_resolution", "context_length", "vocab_size"):      # entries of OpenAI's archives
        sd.pop(extra, None)
    sd = {k: v for k, v in sd.items() if k.split(".")[-1] != "attn_mask"}   # causal masks saved by TorchScript
    missing = [k for k in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj") if k not in sd]
    if missing:  # e.g. a ResNet CLIP (RN50): its visual.layer1..., visual.attnpool...
        raise UsageError(f"{path} lacks {missing}, so it is not a CLIP ViT image tower; expected {ACCEPTED}")
    return sd, info


def clip_config_from_state_dict(sd, act="quickgelu"):
    """The architecture, read off the tensor shapes as OpenAI's build_model does. Heads are width / 64
    (width / 80 for a 1280-wide ViT-H image tower, as in open_clip)."""
    def count(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    cfg = dict(image_size=grid * patch, patch_size=patch, width=width, layers=count("visual.transformer.resblocks"),
               heads=width // (80 if width == 1280 else 64), act=act)
    if "token_embedding.weight" in sd:
        text_width = sd["ln_final.weight"].shape[0]
        cfg.update(context_length=sd["positional_embedding"].shape[0], text_width=text_width,
                   text_layers=count("transformer.resblocks"), text_heads=text_width // 64,
                   embed_dim=sd["text_projection"].shape[1])
    return cfg


def load_strict(module, sd, path, what):
    """load_state_dict(strict=True), with a one-line UsageError naming what does not match."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise UsageError(f"{path} does not match {what} ({len(missing)} missing keys, e.g. {missing[:2]}; "
                         f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}; {len(wrong)} of another "
                         f"shape, e.g. {wrong[:2]}); use the flags it was made with, or another file")
    module.load_state_dict(sd, strict=True)


def load_clip(path, clip_class, vit_class, act=None, device="cpu", obj=None):
    """A CLIP (`clip_class`), or for an image-only file its image tower (`vit_class`, as `.visual` of an
    empty module), from any accepted file, with strict key and shape checks. `obj`: the file already read
    by read_weights_file. Returns (module, info) with info["config"] the architecture."""
    sd, info = openai_state_dict(path, obj)
    cfg = info.get("config") or clip_config_from_state_dict(sd, act or info.get("act", "quickgelu"))
    cfg = dict(cfg, act=act or cfg.get("act", "quickgelu"))
    if "token_embedding.weight" in sd:
        model = clip_class(**cfg)
    else:
        model = torch.nn.Module()
        model.visual = vit_class(cfg["image_size"], cfg["patch_size"], cfg["width"], cfg["layers"],
                                 cfg["heads"], sd["visual.proj"].shape[1], cfg["act"])
    load_strict(model, sd, path, "a CLIP ViT")
    return model.to(device).eval(), dict(info, config=cfg)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: atomic saves, random states, exact resume
# ----------------------------------------------------------------------------------------------------
def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    """This process's random states as tensors and plain lists (loadable with weights_only=True)."""
    v, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": [v, list(state), gauss]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def plain(obj):
    """Arguments as plain JSON-able types (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


def trained(teacher):
    """An EMA teacher changes during training and is saved; a frozen one (`frozen = True`, a CLIP loaded
    from --teacher) is read from its file again on resume."""
    return teacher is not None and not getattr(teacher, "frozen", False)


def load_checkpoint(path):
    """Our checkpoint, read with weights_only=True (no code runs). A bad file is a one-line UsageError."""
    ckpt = read_weights_file(path)
    if not (isinstance(ckpt, dict) and "model" in ckpt and "method" in ckpt):
        raise UsageError(f"{path} is not a training checkpoint of this project; expected {ACCEPTED}")
    return ckpt


LOCK_HEARTBEAT_S, LOCK_STALE_S = 60, 600  # the lock's refresh period; its age at which another host calls it stale


def _machine():
    """Where this process runs, as a lock records it: host name, boot id and pid namespace (the last two on
    Linux, '' elsewhere). Two processes see each other's pids only when all three are equal."""
    def read(path, link=False):
        try:
            if link:
                return os.readlink(path)
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""
    return {"host": platform.node(), "boot": read("/proc/sys/kernel/random/boot_id"),
            "pidns": read("/proc/self/ns/pid", link=True)}


def _process_start(pid):
    """Start time of process `pid` in clock ticks after boot (Linux): '' where /proc cannot tell, None for a
    process that has exited but is not yet reaped (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces and ')'
    return None if fields[0] in "ZX" else fields[19]


def _pid_alive(pid, start):
    """Whether process `pid` of this machine runs and is the one that started at `start` (not a reused pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    now = _process_start(pid)
    return now is not None and not (start and now and now != start)


class RunLock:
    """`folder/run.lock`, held by one run for as long as it runs: a JSON file naming its owner (host, pid,
    boot id, pid namespace, start time), created atomically (a complete file hard-linked into place, which
    also works on NFS), refreshed every LOCK_HEARTBEAT_S seconds by a daemon thread and removed by
    `release` (at the end of the run, on an exception, on SIGTERM; atexit as a fallback).

    A lock whose owner is gone does not block. On the owner's machine (same host, boot id and pid
    namespace) the owner is gone when its pid no longer runs, or is another process's (kill -9, a crash).
    From anywhere else (another node on a shared filesystem, another container) it is gone when the lock has
    not been refreshed for LOCK_STALE_S seconds, so a run killed on another node blocks its folder for up to
    ten minutes (the clocks of the nodes are assumed to agree to within minutes)."""

    def __init__(self, folder):
        self.folder, self.path, self.created = folder, os.path.join(folder, "run.lock"), []
        parent = os.path.abspath(folder)
        while not os.path.isdir(parent):  # the folders this run creates, deepest first: removed if left empty
            self.created.append(parent)
            parent = os.path.dirname(parent)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out-dir {folder} cannot be created ({_reason(e)}); give a folder you can "
                             f"write to") from None
        self.me = dict(_machine(), pid=os.getpid(), start=_process_start(os.getpid()) or "",
                       since=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv))
        for _ in range(5):
            try:
                if self._create():
                    break
            except OSError as e:
                raise UsageError(f"--out-dir {folder} is not writable ({_reason(e)}); give a folder you can "
                                 f"write to") from None
            owner = self._read()
            if owner is not None and self._alive(owner):
                raise UsageError(f"--out-dir {folder} is in use by another run (host {owner.get('host', '?')}, pid "
                                 f"{owner.get('pid', '?')}, since {owner.get('since', '?')}); wait for it to end "
                                 f"or stop it, or give another --out-dir")
            if owner is not None:
                self._remove_stale(owner)
        else:
            raise UsageError(f"--out-dir {folder}: could not take its lock {self.path}; remove the file if no "
                             f"run uses the folder")
        self.released, self.stop = False, threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()
        atexit.register(self.release)

    def _create(self):
        """Write the lock if there is none; False if there is one."""
        tmp = f"{self.path}.{os.getpid()}.new"
        with open(tmp, "w") as f:
            json.dump(self.me, f)
        try:
            os.link(tmp, self.path)  # fails if the lock exists, and the lock is never seen half-written
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return True
        finally:
            os.remove(tmp)

    def _read(self):
        """The owner as the lock names it; {} if the lock cannot be read; None if there is no lock."""
        try:
            with open(self.path) as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _same_machine(self, owner):
        return all(owner.get(k) == self.me[k] for k in ("host", "boot", "pidns"))

    def _alive(self, owner):
        if self._same_machine(owner):
            return owner.get("pid") != self.me["pid"] and _pid_alive(owner.get("pid"), owner.get("start"))
        try:
            return time.time() - os.path.getmtime(self.path) < LOCK_STALE_S
        except OSError:
            return False

    def _remove_stale(self, owner):
        """Move the stale lock aside and delete it, unless another run replaced it in the meantime."""
        aside = f"{self.path}.{os.getpid()}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside) as f:
                replaced = json.load(f) != owner
        except (OSError, ValueError):
            replaced = False
        if replaced:  # a new owner's lock: put it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        os.remove(aside)
        if not replaced:
            why = "that has ended" if self._same_machine(owner) else f"silent for {LOCK_STALE_S // 60} minutes"
            print0(f"--out-dir {self.folder}: removed the lock of a run {why} "
                   f"(host {owner.get('host', '?')}, pid {owner.get('pid', '?')})")

    def _heartbeat(self):
        while not self.stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self):
        """Remove the lock if it is still this run's, and the folder if this run created it and left it empty."""
        if self.released:
            return
        self.released = True
        self.stop.set()
        if (self._read() or {}).get("pid") == self.me["pid"]:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        for created in self.created:
            with contextlib.suppress(OSError):
                os.rmdir(created)


def remove_temporaries(folder):
    """Delete the `<file>.tmp<pid>` files that save_atomic leaves when a process is killed while it writes.
    Called under the folder's lock, so no other run of this project is writing them."""
    for name in os.listdir(folder):
        if name.rpartition(".tmp")[2].isdigit():
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                print0(f"removed {os.path.join(folder, name)}, left by a process killed while it saved")


RESTART_COUNTERS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")  # set by torchrun, and by SLURM on requeue


def restart_count():
    """How often torchrun (--max-restarts) or SLURM (--requeue) has restarted this job: 0 on its first try."""
    counts = (os.environ.get(k, "").strip() for k in RESTART_COUNTERS)
    return max((int(c) for c in counts if c.isdigit()), default=0)


_RUN = {"lock": None, "sigterm": None}  # what open_run set up for close_run to undo


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through `finally`, so the lock is released


def open_run(args, method, cfg, world):
    """The checkpoint path of this run and the checkpoint to continue from (else None), after the start-up
    checks that follow the parser's (which refuses --epochs 0, --steps 0, ...): --out-dir a folder, batch
    divisible by the ranks, the folder's lock (RunLock, taken by rank 0 and reported to every rank), the
    resume rule, the same method and architecture. Until the training loop catches SIGTERM, SIGTERM ends
    the run through `close_run`, which releases the lock.

    The resume rule: without --resume an existing checkpoint is never overwritten; `--resume` continues from
    it and needs one; `--resume auto` continues from it if there is one and starts a new run if not. When
    torchrun or SLURM restarts the job (TORCHELASTIC_RESTART_COUNT or SLURM_RESTART_COUNT > 0) the rule is
    `--resume auto`, for a checkpoint saved by the same command: one saved with other flags is refused, as
    the first try refused it."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f"--out-dir {args.out_dir} is a file; give a folder")
    path = os.path.join(args.out_dir, "checkpoint.pt")
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if getattr(args, "imagenet_val", None) and not os.path.isdir(args.imagenet_val):  # read only at evaluation
        raise UsageError(f"--imagenet-val {args.imagenet_val} is not a folder; give an ImageNet-style val folder "
                         f"(one subfolder per class)")
    found = [None, False]  # rank 0's [lock error, whether the checkpoint exists], broadcast
    if is_main():
        try:
            _RUN["lock"] = RunLock(args.out_dir)
            remove_temporaries(args.out_dir)
            found[1] = os.path.isfile(path)
        except UsageError as e:
            found[0] = str(e)
    dist.broadcast_object_list(found)  # every rank stops, or goes on, together
    if found[0]:
        raise UsageError(found[0])
    if threading.current_thread() is threading.main_thread():
        _RUN["sigterm"] = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    restarts, exists = restart_count(), found[1]
    auto = args.resume == "auto" or restarts > 0
    if args.resume is True and not exists and not restarts:
        raise UsageError(f"--resume: no checkpoint at {path}; drop --resume to start a new run")
    if not args.resume and not restarts and exists:
        raise UsageError(f"{path} exists; pass --resume (or --resume auto) to continue that run or --out-dir "
                         f"for a new one")
    ckpt = load_checkpoint(path) if exists and (auto or args.resume) else None
    if ckpt is not None and (ckpt["method"], ckpt["config"]) != (method, plain(cfg)):
        raise UsageError(f"{path} is a {ckpt['method']} checkpoint of {ckpt['config']}, not {method} "
                         f"of {cfg}; resume with the same --model and flags, or use another --out-dir")
    if ckpt is not None and restarts and not args.resume:
        ours = {k: v for k, v in plain(vars(args)).items() if k != "resume"}
        changed = sorted(k for k, v in ours.items() if ckpt["args"].get(k) != v)
        if changed:
            raise UsageError(f"{path} was saved by another command (--{changed[0].replace('_', '-')} differs), "
                             f"so restart {restarts} does not continue it; pass --resume to continue it or "
                             f"--out-dir for a new run")
    if auto:
        why = f"restart {restarts} of this job" if restarts and args.resume != "auto" else "--resume auto"
        print0(f"{why}: continuing from step {ckpt['step']} of {path}" if ckpt is not None else
               f"{why}: no checkpoint in {args.out_dir}, starting a new run")
    return path, ckpt


def close_run():
    """The end of every run, however it ends: the process group is destroyed and the out-dir lock released."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if _RUN["lock"] is not None:
        _RUN["lock"].release()
        _RUN["lock"] = None
    if _RUN["sigterm"] is not None:
        signal.signal(signal.SIGTERM, _RUN["sigterm"])
        _RUN["sigterm"] = None


def _tensors(obj):
    """The tensors in a nest of dicts, lists and tuples (a state dict, an optimizer's state)."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for x in obj for t in _tensors(x)] if isinstance(obj, (list, tuple)) else []


def count_nonfinite(tensors):
    """How many of the floating-point tensors hold a NaN or an inf: a device scalar (no host sync)."""
    flags = [~torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return torch.stack(flags).sum().float() if flags else torch.zeros(())


def save_checkpoint(path, *, method, cfg, args, step, model, teacher, optimizer, scaler, log=None):
    """Everything needed to continue exactly: weights (of the unwrapped model), EMA teacher, optimizer,
    grad scaler, step (which fixes the data position), every rank's RNG states, arguments and config.
    Only tensors and plain Python types, so that it loads with torch.load(weights_only=True).

    Never with a NaN or an inf: the weights, the teacher, the optimizer state and the loss scale are checked
    first, with the run's non-finite flag (`log`, a MetricLog; see its guard), and the run stops instead."""
    sd, opt_sd = model.state_dict(), optimizer.state_dict()
    teacher_sd = teacher.state_dict() if trained(teacher) else None
    tensors = _tensors([sd, teacher_sd or {}, opt_sd["state"]])
    if log is not None:
        log.check(step, tensors)
    elif count_nonfinite(tensors).item() or not math.isfinite(scaler.get_scale() if scaler.is_enabled() else 1):
        raise SystemExit(f"error: non-finite weights or optimizer state at step {step}; {path} was not written")
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())  # between our own processes
    if is_main():
        save_atomic({"method": method, "config": cfg, "args": plain(vars(args)), "step": step, "model": sd,
                     "teacher": teacher_sd, "optimizer": opt_sd,
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "rng": states, "world_size": dist.get_world_size()}, path)
    if log is not None:
        log.kept = step


def restore(ckpt, path, *, method, model, teacher, optimizer, scaler, rank, world, seed):
    """Loads a checkpoint from open_run into the run's objects and returns its step (0 without one). Then
    seeds this rank's randomness (masks, drop paths) from here on: the saved states of the same number of
    ranks, else afresh from (seed, step, rank)."""
    if ckpt is None:
        torch.manual_seed(seed + rank)  # per-rank randomness from here on
        return 0
    load_strict(model, ckpt["model"], path, f"this {method} model")
    if trained(teacher):
        load_strict(teacher, ckpt["teacher"] or {}, path, f"this {method} teacher")
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt["world_size"] == world:
        set_rng_state(ckpt["rng"][rank])
    else:
        print0(f"resuming on {world} processes from {ckpt['world_size']}: random states start afresh")
        torch.manual_seed(seed + 1000 * ckpt["step"] + rank)
    return ckpt["step"]


def export_weights(path, sd, cfg, *, norm, method, weights):
    """An OpenAI-layout state dict, under 'state_dict' (open_clip's loader reads that key) with what the
    file needs to describe itself: the architecture, activation and pixel normalisation."""
    mean, std = NORMS[norm]
    save_atomic({"state_dict": sd, "config": cfg, "act": cfg["act"], "image_mean": list(mean),
                 "image_std": list(std), "norm": norm, "method": method, "weights": weights}, path)


def write_exports(exports, out_dir, cfg, *, norm, method):
    """Writes each {name: OpenAI-layout state dict} to out_dir/export_<name>.pt on the main rank; {name: path}."""
    paths = {name: os.path.join(out_dir, f"export_{name}.pt") for name in exports}
    if is_main():
        for name, sd in exports.items():
            export_weights(paths[name], sd, cfg, norm=norm, method=method, weights=name)
    return paths


def done_message(step, skipped, results, ckpt_path, export_paths, *, method, args, images):
    """The end-of-run lines: steps, skipped samples, the held-out numbers, where the weights are, and last how
    the numbers compare with the committed quality study (versus_study)."""
    line = (f"done: {step} steps" + (f", {skipped} unreadable samples skipped" if skipped else "")
            + ". Held-out evaluation: " + ", ".join(f"{k} {v:.1f}" for k, v in results.items())
            + f". Checkpoint: {ckpt_path}"
            + "".join(f"; {n} weights (OpenAI layout): {p}" for n, p in export_paths.items()))
    versus = versus_study(method, args, results, images)
    return line + ("\n" + versus if versus else "")


STUDY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "quality", "quality.json")
# a script's end-of-run metric -> the quality study's (eval_zeroshot.py's names, built-in held-out set)
STUDY_METRICS = {"online/top1": ("zeroshot_top1", "zero-shot top-1"), "student/knn_top1": ("knn_top1", "k-NN top-1"),
                 "online/colour_miou": ("seg_colour_mIoU", "colour mIoU")}
STUDY_NAMES = {"clip": "CLIP", "maskclip": "MaskCLIP", "aclip": "A-CLIP", "aclip-eff": "A-CLIP-eff", "silc": "SILC-C",
               "silc-sigmoid": "SILC-S", "milan": "MILAN", "maskdistill": "MaskDistill"}


def study_row(method, args):
    """The quality study's row (benchmark.py's ROWS) that a run of `method` with these flags (a dict) is."""
    if method == "maskclip" and not args.get("dist_weight") and not args.get("mlm_weight"):
        return "clip"
    if method == "aclip" and args.get("eff"):
        return "aclip-eff"
    if method == "silc" and args.get("loss") == "sigmoid":
        return "silc-sigmoid"
    return method


def versus_study(method, args, results, images, path=STUDY_FILE):
    """One line: this run's held-out numbers next to the CLIP baseline's (the students' teacher) and the same
    row's in the committed quality study (benchmark.py --quality, README "Does it work?"), saying whether the
    run is below, within or above the baseline's range over seeds; "" without a study file, and for a run on
    its own --train-data, which the built-in study says nothing about. The study's runs may have seen another
    number of images than this one: both counts are named."""
    if dict(args).get("train_data"):
        return ""
    try:
        with open(path) as f:
            report = json.load(f)
        summary, info = report["summary"], report["info"]
    except (OSError, ValueError, KeyError):
        return ""
    row, parts = study_row(method, dict(args)), []
    for key, (metric, words) in STUDY_METRICS.items():
        if key not in results:
            continue
        base = summary.get("clip", {}).get("points", [{}])[-1].get("metrics", {}).get(metric)
        mine = summary.get(row, {}).get("points", [{}])[-1].get("metrics", {}).get(metric) if row != "clip" else None
        if base is None:
            continue
        where = "below" if results[key] < base["min"] else "above" if results[key] > base["max"] else "within"
        parts.append(f"{words} {results[key]:.1f}, {where} the CLIP baseline's {base['min']:.1f}–{base['max']:.1f}"
                     + (f" ({STUDY_NAMES.get(row, row)} there {mine['min']:.1f}–{mine['max']:.1f})" if mine else ""))
    if not parts:
        return ""
    seen = summary["clip"]["points"][-1]["images"]
    return (f"Against the quality study (README, Does it work?; {seen:,} images per run, {len(info['seeds'])} seeds; "
            f"this run {images:,} images): " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------------
# Run records: provenance, the metrics log
# ----------------------------------------------------------------------------------------------------
def write_provenance(out_dir, args, world, script):
    """The resolved arguments, the code (the script and this file), the git revision and the environment."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10,
                                  cwd=os.path.dirname(os.path.abspath(script))).stdout.strip()
        except Exception:
            return ""
    with open(os.path.join(out_dir, "args.json"), "w") as f:
        json.dump(plain(vars(args)), f, indent=1)
    env = {"git_revision": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
           "command": " ".join(sys.argv), "python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda,
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "world_size": world, "host": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(out_dir, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    os.makedirs(os.path.join(out_dir, "code"), exist_ok=True)
    for src in (os.path.abspath(script), os.path.abspath(__file__)):
        with open(src) as f_in, open(os.path.join(out_dir, "code", os.path.basename(src)), "w") as f_out:
            f_out.write(f_in.read())


NO_BAD_STEP = 2 ** 62  # MetricLog.first_bad before any step with a non-finite loss
MIN_LOSS_SCALE = 1e-4  # fp16: a GradScaler scale below this means the loss overflows whatever the scale (fairseq's)


class MetricLog:
    """The training log and its non-finite guard. Metrics are summed on the device between log steps (no host
    sync per step), the unreadable-sample count on the host; `flush` all-reduces them once per log step with
    the SIGTERM flag (so that every rank agrees to stop), writes a line to metrics.jsonl and the progress bar.
    SIGTERM is caught from construction to `close`.

    The guard: `add` keeps on the device the first step whose loss was not finite (a flag, no sync); it is
    read, with a check that the weights are finite, in the all-reduce of every log step, and before every
    checkpoint (`check`, from save_checkpoint, which adds the teacher and the optimizer state), one sync
    each. A non-finite value stops the run on every rank with one line naming the checkpoint kept (`kept`,
    the step of the last one written, or of the one resumed from), so no checkpoint ever holds one.
    Under fp16 the GradScaler skips every step whose gradients are not finite and leaves the weights as they
    were; a step whose loss is not finite is one of them (its gradients are not finite either), so under fp16
    a non-finite loss is not an error. There the guard judges what is saved, the weights and the optimizer
    state, and the loss scale: below MIN_LOSS_SCALE the steps keep overflowing, and the run stops too.

    Unreadable samples (`skipped_all`): those of a map-style dataset (CSV, ImageFolder) are counted once
    each, by index, however many epochs, ranks, workers and replacement attempts meet them (the loader's
    `take_unreadable`, all-gathered at the log steps that met new ones); those of tar shards as the readers
    report them, once per pass over a shard. Counted from the start of this process (not across a resume)."""

    def __init__(self, out_dir, desc, *, world, device, data, total, step, ckpt_path, scaler):
        self.path, self.ckpt_path = os.path.join(out_dir, "metrics.jsonl"), ckpt_path
        self.data, self.scaler, self.world, self.device, self.fp16 = data, scaler, world, device, scaler.is_enabled()
        self.batch_size, self.steps_per_epoch = data.batch_size * world, data.steps_per_epoch
        self.sums, self.skipped, self.skipped_all, self.signal, self.stopping = {}, 0, 0, False, False
        self.unreadable, self.step, self.kept = set(), step, step or None
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.long, device=device)
        self.last_time, self.last_step = time.time(), step
        self.previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signal", True))
        self.pbar = tqdm(total=total, initial=step, disable=not is_main(), dynamic_ncols=True, desc=desc)

    def add(self, metrics, skipped):
        """metrics: {name: device scalar} of one step; skipped: the batch's (B,) host count of unreadable samples."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.skipped += int(skipped.sum())  # a host tensor: no copy to the device, no sync
        self.step += 1
        if not self.fp16:  # under fp16 a non-finite loss is a step the GradScaler skipped (see above)
            ok = torch.isfinite(metrics["loss"].detach())
            self.first_bad = torch.minimum(self.first_bad, torch.where(ok, NO_BAD_STEP, self.step))

    def flush(self, step, lr, model):
        keys = sorted(self.sums)
        new = self.data.take_unreadable()  # this rank's newly met unreadable indices; None for tar shards
        host = torch.tensor([float(self.skipped if new is None else len(new)), float(self.signal)], device=self.device)
        guard = torch.stack([(self.first_bad < NO_BAD_STEP).float(), count_nonfinite(model.state_dict().values())
                             .to(self.device)])
        values = torch.cat([torch.stack([self.sums[k] for k in keys]), guard, host])
        dist.all_reduce(values)  # one host sync per log interval
        values = values.tolist()
        n = (step - self.last_step) * self.world
        record = {k: v / n for k, v in zip(keys, values)}
        self.stopping = values[-1] > 0  # agreed by every rank
        if new is None:
            self.skipped_all = int(values[-2])
        elif values[-2]:  # some rank met unreadable samples it had not met before: gather their indices
            parts = [None] * self.world
            dist.all_gather_object(parts, new)
            self.unreadable.update(i for part in parts for i in part)
            self.skipped_all = len(self.unreadable)
        now = time.time()
        record.update(step=step, epoch=step / self.steps_per_epoch, lr=lr, logit_scale=model.logit_scale.exp().item()
                      if hasattr(model, "logit_scale") else None, skipped_samples=self.skipped_all,
                      images_per_s=(step - self.last_step) * self.batch_size / (now - self.last_time))
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.pbar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.0f}")
            self.pbar.update(step - self.last_step)
        self.sums, self.last_time, self.last_step = {}, now, step
        self._judge(step, values[-4], values[-3], "weights")

    def check(self, step, tensors):
        """Before a checkpoint of `step`: the loss flag and the finiteness of `tensors` (what is about to be
        saved), all-reduced in one sync; stops the run instead of saving a non-finite value."""
        guard = torch.stack([(self.first_bad < NO_BAD_STEP).float(), count_nonfinite(tensors).to(self.device)])
        dist.all_reduce(guard)
        self._judge(step, *guard.tolist(), "weights or optimizer state")

    def _judge(self, step, bad_loss, bad_tensors, what):
        if bad_loss:
            first = self.first_bad.clone()
            dist.all_reduce(first, op=dist.ReduceOp.MIN)  # the first bad step over all ranks
            self._stop(f"non-finite loss at step {int(first)}")
        if bad_tensors:
            self._stop(f"non-finite {what} at step {step} ({int(bad_tensors)} tensors)")
        if self.fp16 and not self.scaler.get_scale() >= MIN_LOSS_SCALE:
            self._stop(f"fp16 loss scale {self.scaler.get_scale():.1e} at step {step}: the loss overflows at any scale")

    def _stop(self, what):
        kept = (f"the last good checkpoint, of step {self.kept}, is kept in {self.ckpt_path} (continue with --resume)"
                if self.kept else "no checkpoint was kept (none had been saved)")
        fix = "use --precision bf16 instead of fp16, or lower --lr" if self.fp16 else "lower --lr, or set --grad-clip"
        self.pbar.close()  # ends the progress bar's line, so that the error is a line of its own
        raise SystemExit(f"error: {what}; {kept}. To avoid it: {fix}.")

    def eval(self, step, results):
        if is_main():
            print0(f"eval at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "eval": results}) + "\n")

    def close(self):
        self.pbar.close()
        signal.signal(signal.SIGTERM, self.previous)


def save_mask_grid(path, images, ema, boxes, keep, patch, mean, std, rows=8, tile=96):
    """A-CLIP's --save-masks: a PNG, one row per sample: the EMA view (if any) with the crop boxes drawn on
    it, then each online view with its dropped patches darkened. images: (V·B, 3, S, S) view-major; ema:
    (B, 3, Se, Se) or None; boxes: (B, V+1, 4); keep: (V·B, K) or None."""
    B, S = boxes.shape[0], images.shape[-1]
    V, g = images.shape[0] // B, S // patch
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def to_pil(x, kept=1.0):                                                     # dropped patches darkened
        x = ((x.detach().float().cpu() * std + mean).clamp(0, 1) * (0.25 + 0.75 * kept)).permute(1, 2, 0)
        return Image.fromarray((x * 255).round().byte().numpy()).resize((tile, tile), Image.NEAREST)

    sheet = Image.new("RGB", ((V + (ema is not None)) * (tile + 4), min(rows, B) * (tile + 4)), (255, 255, 255))
    for i in range(min(rows, B)):
        tiles = []
        if ema is not None:
            tiles.append(to_pil(ema[i]))
            e = boxes[i, -1].tolist()
            for k in range(V):
                l, t, w, h = boxes[i, k].tolist()
                x0, y0 = (l - e[0]) / e[2] * tile, (t - e[1]) / e[3] * tile
                ImageDraw.Draw(tiles[0]).rectangle([x0, y0, x0 + w / e[2] * tile - 1, y0 + h / e[3] * tile - 1],
                                                   outline=[(255, 64, 64), (64, 160, 255)][k % 2])
        for k in range(V):
            kept = 1.0
            if keep is not None:
                kept = torch.zeros(g * g).index_fill_(0, keep[k * B + i].cpu(), 1).view(g, g)
                kept = kept.repeat_interleave(patch, 0).repeat_interleave(patch, 1)   # (S, S)
            tiles.append(to_pil(images[k * B + i], kept))
        for c, tile_img in enumerate(tiles):
            sheet.paste(tile_img, (c * (tile + 4), i * (tile + 4)))
    sheet.save(path)


# ----------------------------------------------------------------------------------------------------
# Evaluation helpers: zero-shot classification, features, k-NN, zero-shot segmentation
# ----------------------------------------------------------------------------------------------------
def eval_dataset(image_size, norm, imagenet_val=None, target="label", imagenet_templates=OPENAI_IMAGENET_TEMPLATES):
    """The held-out set, its class names and templates: `imagenet_val` (an ImageNet-style val folder) if
    given, with `imagenet_templates`, else the built-in shapes' held-out split."""
    mean, std = NORMS[norm]
    transform = EvalTransform(image_size, mean, std)
    if imagenet_val:
        return ImageFolder(imagenet_val, transform), IMAGENET_CLASSNAMES, imagenet_templates
    ds = Shapes("val", length=2048, transform=transform, target=target)
    return ds, ds.classnames, ds.templates


def zero_shot_setup(encode_text, *, image_size, norm, imagenet_val, context_length, workers, device,
                    imagenet_templates=OPENAI_IMAGENET_TEMPLATES):
    """The zero-shot classifier of the held-out set's classes and a loader of this rank's slice of it. On
    ImageNet the log says how many templates (imagenet_templates: OpenAI's 80 unless the method says)."""
    dataset, classnames, templates = eval_dataset(image_size, norm, imagenet_val, imagenet_templates=imagenet_templates)
    if imagenet_val:
        print0(f"zero-shot on {imagenet_val}: {len(templates)} prompt templates per class")
    if len(classnames) != len(getattr(dataset, "classes", classnames)):
        raise UsageError(f"{imagenet_val} has {len(dataset.classes)} class folders but there are "
                         f"{len(classnames)} class names; point --imagenet-val at a 1000-class val folder")
    classifier = zero_shot_classifier(encode_text, classnames, templates, context_length, device)
    rank, world = rank_world()
    return classifier, eval_loader(dataset, 256, rank, world, workers)


@torch.no_grad()
def zero_shot_classifier(encode_text, classnames, templates, context_length, device, batch=1024):
    """(C, E) class embeddings: for each class, normalise each template's text embedding, average over the
    templates, renormalise (OpenAI's protocol). The prompts are encoded in batches of up to `batch` prompts."""
    classnames = list(classnames)
    prompts = [t.format(name) for name in classnames for t in templates]              # C·T, class-major

    def encode(chunk):
        return torch.nn.functional.normalize(encode_text(tokenize(chunk, context_length).to(device)).float(), dim=-1)
    emb = torch.cat([encode(prompts[i:i + batch]) for i in range(0, len(prompts), batch)])  # (C·T, E)
    emb = emb.view(len(classnames), len(templates), -1).mean(1)                       # (C, E)
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def zero_shot_accuracy(towers, loader, device):
    """Top-1 and top-5 accuracy (%) of each tower, {name: (encode_image, (C, E) classifier)}, in one pass over
    an evaluation set split across ranks (the images are read once for all towers); counts are all-reduced.
    Returns {name: (top1, top5)}."""
    counts = {name: torch.zeros(3, device=device) for name in towers}  # correct@1, correct@5, total
    for images, labels, _ in loader:
        images, labels = images.to(device), labels.to(device)
        for name, (encode_image, classifier) in towers.items():
            with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
                logits = torch.nn.functional.normalize(encode_image(images).float(), dim=-1) @ classifier.t()
            top5 = logits.topk(min(5, logits.shape[1]), dim=-1).indices
            counts[name] += torch.stack([(top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(-1).sum(),
                                         torch.tensor(labels.numel(), device=device)]).float()
    out = {}
    for name, count in counts.items():
        all_reduce(count)
        out[name] = ((100 * count[0] / count[2]).item(), (100 * count[1] / count[2]).item())
    return out


@torch.no_grad()
def extract_features(encode, loader, device):
    """Features and labels of an evaluation set split across ranks, gathered on every rank: (n, D), (n,)."""
    feats, labels = [], []
    for images, y, _ in loader:
        with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
            feats.append(encode(images.to(device)).float())
        labels.append(y.to(device))
    return gather_uneven(torch.cat(feats)), gather_uneven(torch.cat(labels))


def gather_uneven(x):
    """all_gather for tensors whose first dimension differs between ranks (no gradient)."""
    if rank_world()[1] == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = max(int(s) for s in sizes)
    padded = torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=20, temperature=0.07):
    """DINO's weighted k-NN: cosine similarity, the k nearest training features vote for their class with
    weight exp(sim / T). Returns top-1 (%)."""
    F = torch.nn.functional
    train_feats, test_feats = F.normalize(train_feats, dim=-1), F.normalize(test_feats, dim=-1)
    correct = 0
    for i in range(0, test_feats.shape[0], 256):
        sim = test_feats[i:i + 256] @ train_feats.t()                        # (b, n_train)
        top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=-1)            # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(-1) == test_labels[i:i + 256]).sum().item()
    return 100 * correct / test_feats.shape[0]


def check_knn_data(train_data, imagenet_val):
    """At start-up: --imagenet-val needs an ImageFolder --train-data with the same classes for the k-NN."""
    if imagenet_val and not (train_data and os.path.isdir(train_data)):
        raise UsageError(f"--imagenet-val {imagenet_val}: the k-NN evaluation takes its training "
                         f"features from an ImageFolder --train-data with the same classes; give one, or "
                         f"drop --imagenet-val")
    if imagenet_val and not os.path.isdir(imagenet_val):
        raise UsageError(f"--imagenet-val {imagenet_val} is not a folder; give an ImageFolder "
                         f"(root/<class>/<image>) of held-out images")


def knn_datasets(*, image_size, norm, train_data, imagenet_val, samples):
    """The k-NN's training set (`samples` images), held-out set and number of classes: the built-in
    shapes' train and held-out splits, or, with imagenet_val, evenly spaced images of the train_data
    ImageFolder against the imagenet_val folder."""
    mean, std = NORMS[norm]
    transform = EvalTransform(image_size, mean, std)
    test, classnames, _ = eval_dataset(image_size, norm, imagenet_val)
    if not imagenet_val:
        return Shapes("train", length=samples, transform=transform, target="label"), test, len(classnames)
    full = ImageFolder(train_data, transform)
    if full.classes != test.classes:
        raise UsageError(f"--train-data {train_data} and --imagenet-val {imagenet_val} have "
                         f"different class folders; the k-NN needs the same classes in both")
    index = torch.linspace(0, len(full) - 1, min(samples, len(full))).round().long().unique()
    return torch.utils.data.Subset(full, index.tolist()), test, len(test.classes)


@torch.no_grad()
def segmentation_confusion(dense, classifier, n_background, grid, masks, bg_threshold=0.0):
    """(1 + C, 1 + C) confusion counts (rows: truth, columns: prediction; 0 = background) of one batch.
    dense: (B, N, E) patch embeddings, N = gh·gw for grid = (gh, gw); classifier: (n_background + C, E)
    normalised prompt embeddings, background prompts first; masks: (B, h, w) labels, 255 = ignored. A pixel
    is background when a background prompt wins the argmax, or when its best class probability,
    softmax(100·cos) over the classes, is below bg_threshold."""
    F = torch.nn.functional
    B = dense.shape[0]
    n = classifier.shape[0] - n_background + 1                                 # 1 + C
    gh, gw = grid
    cos = F.normalize(dense.float(), dim=-1) @ classifier.t()                  # (B, N, nb + C)
    cos = cos.transpose(1, 2).reshape(B, -1, gh, gw)                           # (B, nb + C, gh, gw)
    cos = F.interpolate(cos, size=masks.shape[-2:], mode="bilinear", align_corners=False)  # (B, nb + C, h, w)
    pred = (cos.argmax(1) - n_background + 1).clamp(min=0)                    # (B, h, w): any background -> 0
    if bg_threshold > 0:
        prob = (100 * cos[:, n_background:]).softmax(1).amax(1)                # (B, h, w) best class probability
        pred = torch.where(prob < bg_threshold, 0, pred)
    masks = masks.long()                                                       # uint8 labels would overflow
    cell = torch.where(masks == 255, n * n, masks * n + pred)                  # ignored pixels -> extra bin
    return torch.bincount(cell.flatten(), minlength=n * n + 1)[: n * n].view(n, n)


def miou(confusion):
    """(mIoU %, pixel accuracy %) over the classes present in the truth or the prediction."""
    confusion = confusion.double()
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    return (100 * (inter[union > 0] / union[union > 0]).mean()).item(), (100 * inter.sum() / confusion.sum()).item()


def collapse_confusion(confusion, groups):
    """Confusion counts in coarser labels: label i of `confusion` (L, L) becomes label groups[i]; (G, G),
    G = max(groups) + 1. Truth and prediction are mapped alike, so the result is the confusion matrix the
    coarser task would have counted."""
    g = torch.as_tensor(groups, device=confusion.device)
    n, L = int(g.max()) + 1, g.numel()
    out = torch.zeros(n, n, dtype=confusion.dtype, device=confusion.device)
    rows, cols = g[:, None].expand(L, L).flatten(), g[None, :].expand(L, L).flatten()
    return out.index_put_((rows, cols), confusion.flatten(), accumulate=True)


# The built-in segmentation labels (0 = background, 1 + c for class c = shape * 8 + colour) grouped three ways
SHAPES_LABEL_SETS = {
    "colour": [0] + [1 + c % len(COLOURS) for c in range(len(SHAPE_CLASSNAMES))],    # background + 8 colours
    "shape": [0] + [1 + c // len(COLOURS) for c in range(len(SHAPE_CLASSNAMES))],    # background + 8 shapes
    "fg": [0] + [1] * len(SHAPE_CLASSNAMES),                                          # background, object
}


def shapes_segmentation_scores(confusion):
    """The built-in zero-shot segmentation, scored from one (65, 65) confusion matrix (background + the 64
    shape × colour classes; rows truth, columns prediction) in four ways, all in %:

      seg_mIoU        mIoU over the 65 labels: a pixel counts only when its shape and its colour are right;
      seg_colour_mIoU mIoU over background + 8 colours: is the object where the truth has it, in its colour;
      seg_shape_mIoU  mIoU over background + 8 shapes: the same for the shape;
      seg_fg_IoU      IoU of the object pixels (object against background, whatever class is named): how well
                      the text prompts separate the object from the background;
      seg_pixel_acc   pixels whose 65-way label is right.

    A mean IoU is over the labels present in the truth or the prediction. A perfect predictor scores 100
    everywhere. A constant prediction of the background scores seg_fg_IoU 0 and, in each mIoU, the
    background's pixel fraction (about 0.7) divided by the labels present; a constant object label scores
    seg_fg_IoU = the object pixels' fraction (about 0.28) and near 0 in each mIoU.

    What separates models (tiny model, 256 held-out images at 64 px, 8 × 8 patches): the 65-label mIoU stays
    at its floor for every model (untrained CLIP 0.4, the CLIP demo after 250 steps 1.4: each class is 1/64 of
    the objects and one wrong attribute zeroes a pixel); the colour mIoU goes from 4.1 (untrained) to 22.3
    (trained; 18.6 at the model's 32 px, 4 × 4 patches), since the trained patch tokens name the right
    colour on 90% of the object pixels they call object. The foreground IoU is the strict test of
    localisation: CLIP's patch tokens call 33% of the object pixels and 33% of the background pixels object
    (18.5, below the 28 of an untrained model that calls everything object), so it rewards a model whose
    patches know where the object is, which is what SILC's local-to-global distillation claims."""
    full, acc = miou(confusion)
    out = {"seg_mIoU": full, "seg_pixel_acc": acc}
    for name in ("colour", "shape"):
        out[f"seg_{name}_mIoU"] = miou(collapse_confusion(confusion, SHAPES_LABEL_SETS[name]))[0]
    fg = collapse_confusion(confusion, SHAPES_LABEL_SETS["fg"]).double()
    union = fg[1].sum() + fg[:, 1].sum() - fg[1, 1]
    out["seg_fg_IoU"] = (100 * fg[1, 1] / union).item() if union > 0 else 100.0   # no object, none found
    return out


@torch.no_grad()
def shapes_segmentation_classifier(encode_text, context_length, device, classes=None):
    """(8 + C, E): the 8 background prompts ('a photo of a gray background.', one per background colour of the
    built-in shapes, over the shapes' templates) then the C = 64 class embeddings (`classes` if already built),
    each template-averaged."""
    backgrounds = [f"{name} background" for name in BACKGROUNDS]
    if classes is None:
        classes = zero_shot_classifier(encode_text, SHAPE_CLASSNAMES, SHAPE_TEMPLATES, context_length, device)
    return torch.cat([zero_shot_classifier(encode_text, backgrounds, SHAPE_TEMPLATES, context_length, device),
                      classes])


@torch.no_grad()
def shapes_segmentation(encode_dense, classifier, *, image_size, patch_size, norm, device, n_images=512,
                        seg_size=None, scores=False):
    """Zero-shot segmentation on the first n_images built-in held-out images (one shape each, split across
    ranks), shown to the model at seg_size px (default: image_size; the position embedding is interpolated for
    another size): cosine of every patch feature with the 8 background prompts and the 64 class embeddings
    (`shapes_segmentation_classifier`), upsampled to the 64 px mask, per-pixel argmax; a pixel is background
    when a background prompt wins. Returns the 65-label mIoU (%), or with scores=True every score of
    `shapes_segmentation_scores` (the colour mIoU is the one that separates trained from untrained models)."""
    mean, std = NORMS[norm]
    transform, data = EvalTransform(seg_size or image_size, mean, std), Shapes("val", length=n_images)
    rank, world = rank_world()
    mine = list(range(rank, n_images, world))
    n = 1 + len(SHAPE_CLASSNAMES)
    confusion = torch.zeros(n, n, dtype=torch.long, device=device)
    for i in range(0, len(mine), 128):
        samples = [data.sample(j) for j in mine[i:i + 128]]
        images = torch.stack([transform(s[0]) for s in samples]).to(device)   # (b, 3, S, S)
        masks = torch.stack([torch.tensor(s[3]) for s in samples]).to(device)     # (b, 64, 64)
        with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
            dense = encode_dense(images)                                       # (b, N, E)
        grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
        confusion += segmentation_confusion(dense, classifier, len(BACKGROUNDS), grid, masks)
    all_reduce(confusion)
    return shapes_segmentation_scores(confusion) if scores else miou(confusion)[0]


# ----------------------------------------------------------------------------------------------------
# Augmentation shared by several methods
# ----------------------------------------------------------------------------------------------------
def photometric(img, rng, blur=0.5, solarize=0.0):
    """BYOL/DINO-style photometric augmentation of a PIL image, every draw from `rng`: ColorJitter(0.4, 0.4,
    0.2, 0.1) with p 0.8 (its four operations in random order), grayscale p 0.2, Gaussian blur σ ∈ [0.1, 2]
    px with p `blur`, solarize at 128 with p `solarize` (no draw when 0). DINO's local crops: blur 0.5;
    SLIP's (and A-CLIP's) augmented views: blur 0.1, solarize 0.2."""
    if rng.random() < 0.8:
        ops = [(TF.adjust_brightness, rng.uniform(0.6, 1.4)), (TF.adjust_contrast, rng.uniform(0.6, 1.4)),
               (TF.adjust_saturation, rng.uniform(0.8, 1.2)), (TF.adjust_hue, rng.uniform(-0.1, 0.1))]
        rng.shuffle(ops)
        for op, factor in ops:
            img = op(img, factor)
    if rng.random() < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if solarize and rng.random() < solarize:
        img = ImageOps.solarize(img, 128)
    return img
