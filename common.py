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
to produce this one. The default collate turns a batch into `(views, targets, skipped[B])`.
"""
import gzip
import html
import math
import os
import random
from functools import lru_cache

import ftfy
import numpy as np
import regex
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

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
    """RandomResizedCrop(size, scale, bicubic), optional horizontal flip, normalisation.
    `return_box=True` also returns the crop box as a FloatTensor[4] (left, top, w, h) in units of the
    source image's width and height, which A-CLIP needs to align attention maps between views."""

    def __init__(self, size, scale, mean, std, flip=False, ratio=(3 / 4, 4 / 3), return_box=False):
        self.size, self.scale, self.ratio, self.mean, self.std = size, scale, ratio, mean, std
        self.flip, self.return_box = flip, return_box

    def __call__(self, img, rng):
        left, top, w, h = crop_box(rng, img.width, img.height, self.scale, self.ratio)
        out = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
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
SIZES = {"small": (0.16, 0.24), "medium": (0.25, 0.33), "large": (0.34, 0.44)}  # radius / image side
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
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
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
    n = 1 if max_objects == 1 or rng.random() < 0.6 else 2
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

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        order = order[: self.steps * self.batch_size * self.world][self.rank::self.world]
        for i in order[self.skip * self.batch_size:].tolist():
            yield (self.epoch, i)


class TrainLoader:
    """Batches for one rank. `batches(epoch, skip)` iterates over the batches of `epoch` from batch `skip`
    on; `steps_per_epoch` is the same on every rank."""

    def __init__(self, dataset, batch_size, rank, world_size, seed, num_workers):
        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), batch_size, rank, world_size, seed)
        self.steps_per_epoch = self.sampler.steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global batch of "
                             f"{batch_size * world_size}; lower --batch-size or add data")
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None)

    def batches(self, epoch, skip=0):
        self.sampler.set_epoch(epoch, skip)
        return iter(self.loader)
