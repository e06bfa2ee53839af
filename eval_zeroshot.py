"""Evaluation of every checkpoint of this project, and of OpenAI / open_clip CLIP ViT weights.

Zero-shot classification, image-text retrieval, zero-shot segmentation, k-NN and linear probing on frozen
features, with the protocols the papers use.

What it loads (one file; every set of weights in it is reported, e.g. MaskCLIP's online and EMA weights):
  - checkpoint.pt of maskclip.py, aclip.py, silc.py, milan.py or maskdistill.py: the script named in the
    checkpoint builds the towers (its `eval_towers`); image-text towers get every task, image-only towers
    (MILAN and MaskDistill students) get k-NN and the linear probe;
  - OpenAI-layout files: our export_*.pt, OpenAI's CLIP TorchScript archives (read for their tensors only)
    and OpenAI / open_clip ViT state dicts, through common.load_clip with the CLIP and VisionTransformer
    of the model section every script shares (architecture read off the shapes, keys checked strictly).
    Activation: what our files record; QuickGELU for an OpenAI archive and for a bare state dict; GELU for
    an open_clip training checkpoint (a dict with "epoch"), unless its run name says quickgelu; `--act`
    overrides. Normalisation: what our files record, else CLIP's.

Protocols:
  - zero-shot classification (OpenAI's): each prompt embedding L2-normalised, averaged over the templates,
    renormalised; cosine with the L2-normalised image embedding; top-1 / top-5. ImageNet-style folders use
    OpenAI's 1000 hand-edited class names and `--templates 80` (OpenAI's), 7 (the subset SLIP and A-CLIP
    use) or 1 ("a photo of a {}."); CIFAR-10/100 the 18 templates of OpenAI's prompts.md. Images: bicubic
    resize of the shorter side, centre crop, normalisation.
  - retrieval: R@1/5/10 in both directions over a CSV of (image, caption) rows, open_clip's convention;
    rows sharing an image path are one image with several captions (Karpathy-split COCO / Flickr). An
    image->text hit is any of the image's captions in the top K.
  - zero-shot segmentation (SILC's readout): the tower's `encode_dense` patch embeddings, cosine with the
    class embeddings above, bilinear upsampling to the label's size, per-pixel argmax. Background rule
    (project choice): background prompts compete in the argmax and a pixel whose winner is one of them is
    background (built-in set: "<colour> background" for its 8 background colours, as silc.py's own
    evaluation; VOC: BACKGROUND_WORDS); `--bg-threshold t` also calls a pixel background when its highest
    class probability, softmax(100·cos) over the classes, is below t. VOC images keep their aspect
    ratio (shorter side to `--seg-size`, sides rounded to the patch). mIoU over the classes present in the
    truth or the prediction, background included; label 255 is ignored. The built-in set is shown at its
    native 64 px (at least; an 8 × 8 patch grid for the tiny model, whose input is 32 px) and is scored four
    ways from the same prediction (common.shapes_segmentation_scores): the 65-label mIoU (shape and colour
    both right), the colour mIoU (background + 8 colours: the label set that tells a trained model from an
    untrained one), the shape mIoU (background + 8 shapes) and the foreground IoU (object against
    background).
  - k-NN (DINO's): cosine similarity, the k = 20 (`--knn-k`) nearest training features vote with weight
    exp(sim / 0.07).
  - linear probe (project choice): multinomial logistic regression on cached frozen features, z-scored
    with the training statistics, fitted by full-batch L-BFGS; the L2 strength is chosen from 1e-1 ... 1e-8
    by accuracy on a held-out 20% of the training features, then refitted on all of them.
  The frozen feature is the tower's `features(x)` when it has one (MILAN: [CLS] after the final norm;
  MaskDistill: mean-pooled patch tokens), else its pooled image embedding `encode_image(x)`.
  Everything runs batched under torch.no_grad, in bf16 autocast on GPU (fp32 on CPU; the probe in fp32).
  Left out: fine-tuning, few-shot probes, sliding-window segmentation.

Run:
    python eval_zeroshot.py runs/maskclip/checkpoint.pt       # built-in held-out set, every task
    python eval_zeroshot.py ViT-B-16.pt --imagenet-val imagenet/val --cifar10 data --cifar100 data
    python eval_zeroshot.py export_ema.pt --retrieval-csv coco_karpathy_test.csv --voc VOCdevkit/VOC2012
    python eval_zeroshot.py runs/milan/checkpoint.pt --probe-train imagenet/train --probe-val imagenet/val
    torchrun --nproc_per_node=8 eval_zeroshot.py ...          # every rank takes a slice of each set
Data flags choose the datasets, `--tasks` restricts the tasks; without data flags the built-in set runs.
Results: a table on stdout and a JSON file (`--out`, default eval_<weights name>.json next to the weights).
"""
import argparse
import importlib
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common
from common import (autocast, extract_features, is_main, is_torchscript, knn_accuracy, miou, print0,
                    read_weights_file, segmentation_confusion, setup_distributed, zero_shot_accuracy,
                    zero_shot_classifier)

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("maskclip", "aclip", "silc", "milan", "maskdistill")
TASKS = ("zeroshot", "retrieval", "segmentation", "knn", "probe")
NEEDS = {"zeroshot": ("encode_image", "encode_text"), "retrieval": ("encode_image", "encode_text"),
         "segmentation": ("encode_dense", "encode_text"), "knn": (), "probe": ()}  # what a tower must have

TEMPLATES = {"80": common.OPENAI_IMAGENET_TEMPLATES, "7": common.SIMPLE_IMAGENET_TEMPLATES,
             "1": ["a photo of a {}."]}
TEMPLATE_NAMES = {"80": "OpenAI's 80 templates", "7": "the 7 templates of SLIP and A-CLIP",
                  "1": "one template ('a photo of a {}.')"}
# openai/CLIP data/prompts.md; torchvision's class order (CIFAR-100: its fine labels with "_" as a space)
CIFAR10_CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSNAMES = (
    "apple|aquarium fish|baby|bear|beaver|bed|bee|beetle|bicycle|bottle|bowl|boy|bridge|bus|butterfly|camel|can|"
    "castle|caterpillar|cattle|chair|chimpanzee|clock|cloud|cockroach|couch|crab|crocodile|cup|dinosaur|dolphin|"
    "elephant|flatfish|forest|fox|girl|hamster|house|kangaroo|keyboard|lamp|lawn mower|leopard|lion|lizard|"
    "lobster|man|maple tree|motorcycle|mountain|mouse|mushroom|oak tree|orange|orchid|otter|palm tree|pear|"
    "pickup truck|pine tree|plain|plate|poppy|porcupine|possum|rabbit|raccoon|ray|road|rocket|rose|sea|seal|"
    "shark|shrew|skunk|skyscraper|snail|snake|spider|squirrel|streetcar|sunflower|sweet pepper|table|tank|"
    "telephone|television|tiger|tractor|train|trout|tulip|turtle|wardrobe|whale|willow tree|wolf|woman|worm"
).split("|")
# Pascal VOC's 20 classes (labels 1..20 of SegmentationClass), written as words
VOC_CLASSNAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
                  "tv monitor"]
# Background prompts for VOC (project choice): things that fill VOC's background and are none of its classes
BACKGROUND_WORDS = ["background", "sky", "wall", "floor", "ceiling", "ground", "grass", "tree", "road",
                    "building", "water", "sand", "snow", "mountain", "fence", "window", "door", "curtain"]
PROBE_LAMBDAS = [10.0 ** -k for k in range(1, 9)]  # L2 strengths tried by the linear probe: 1e-1 ... 1e-8
BUILTIN_SEG_SIZE = 64  # the built-in renderer's side (common.Shapes): its segmentation runs at this size or more


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
class ImageTower(nn.Module):
    """An image-only OpenAI-layout file (no text tower): its pooled embedding is the frozen feature."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def features(self, image):
        return self.visual.ln_post(self.visual(image)[:, 0]) @ self.visual.proj


def openai_activation(path, obj, act):
    """(activation, reason) for an OpenAI-layout file whose contents are `obj`."""
    if act:
        return act, "--act"
    if isinstance(obj, dict) and obj.get("act") in ("quickgelu", "gelu"):
        return obj["act"], "recorded in the file"
    if is_torchscript(path):
        return "quickgelu", "an OpenAI TorchScript archive"
    if isinstance(obj, dict) and "epoch" in obj and "state_dict" in obj:
        name = str(obj.get("name", ""))
        if "quickgelu" in name.lower():
            return "quickgelu", f"an open_clip checkpoint of run {name!r}"
        return "gelu", "an open_clip training checkpoint; pass --act quickgelu for a -quickgelu model"
    return "quickgelu", "a bare state dict defaults to OpenAI's; pass --act gelu for an open_clip GELU model"


def load_towers(path, act=None, norm=None):
    """{name: tower} and what the evaluation needs to know about them: dict(image_size, patch_size,
    context_length, norm, act, act_reason, source)."""
    obj = read_weights_file(path)
    if isinstance(obj, dict) and "model" in obj and "method" in obj:  # a training checkpoint of ours
        method = obj["method"]
        if method not in METHODS or not os.path.isfile(os.path.join(HERE, f"{method}.py")):
            raise common.UsageError(f"{path} is a checkpoint of {method!r}, but there is no {method}.py next to "
                                    f"eval_zeroshot.py; evaluate it from a copy of the project that has it")
        cfg = dict(obj["config"], **({"act": act} if act else {}))
        towers = importlib.import_module(method).eval_towers(dict(obj, config=cfg))
        meta = dict(image_size=cfg["image_size"], patch_size=cfg.get("patch_size"),
                    context_length=obj["args"].get("context_length"), norm=norm or obj["args"]["norm"],
                    act=cfg.get("act"), act_reason="--act" if act else "recorded in the checkpoint",
                    source=f"{method} checkpoint at step {obj.get('step')}")
        return towers, meta
    act, reason = openai_activation(path, obj, act)
    shared = importlib.import_module("maskclip")  # OpenAI-layout CLIP and ViT: the model section all scripts share
    model, info = common.load_clip(path, shared.CLIP, shared.VisionTransformer, act=act, obj=obj)
    del obj
    cfg = info["config"]
    if "method" in info:
        source, name = f"{info['method']} export", info.get("weights", "model")
    else:
        source, name = ("OpenAI TorchScript archive" if is_torchscript(path) else "OpenAI-layout state dict"), "model"
    tower = model if hasattr(model, "encode_text") else ImageTower(model.visual)
    meta = dict(image_size=cfg["image_size"], patch_size=cfg["patch_size"], context_length=cfg.get("context_length"),
                norm=norm or info.get("norm") or "clip", act=act, act_reason=reason, source=source)
    return {name: tower}, meta


def can(tower, task):
    return all(hasattr(tower, f) for f in NEEDS[task])


def feature_fn(tower):
    """The frozen feature of k-NN and the linear probe."""
    return tower.features if hasattr(tower, "features") else tower.encode_image


# ----------------------------------------------------------------------------------------------------
# Datasets: items follow common.py's contract (views, target, skipped)
# ----------------------------------------------------------------------------------------------------
class Transformed(torch.utils.data.Dataset):
    """(PIL image, label) items of another dataset (torchvision's CIFAR) -> (transform(image), label, 0)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return self.transform(img.convert("RGB")), label, 0


class ImageFiles(torch.utils.data.Dataset):
    """Images by path (the images of a retrieval CSV): (transform(image), i, 0). An unreadable image is an
    error: replacing it would change the metric."""

    def __init__(self, root, paths, transform):
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = os.path.join(self.root, self.paths[i])
        try:
            img = common.open_image(path)
        except Exception as e:
            raise common.UsageError(f"retrieval image {path} cannot be read ({type(e).__name__}: {e}); fix or "
                                    f"remove its rows") from None
        return self.transform(img), i, 0


class Captions(torch.utils.data.Dataset):
    """Captions as token ids: (LongTensor[context], i, 0)."""

    def __init__(self, captions, context_length):
        self.captions, self.context_length = captions, context_length

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return common.tokenize(self.captions[i], self.context_length)[0], i, 0


class SegTransform:
    """Bicubic resize keeping the aspect ratio: the shorter side to `size`, each side rounded to a multiple
    of the patch (no crop, so that the prediction covers the whole label); normalisation."""

    def __init__(self, size, patch, mean, std):
        self.size, self.patch, self.mean, self.std = size, patch, mean, std

    def __call__(self, img):
        s = self.size / min(img.size)
        w, h = (max(self.patch, round(side * s / self.patch) * self.patch) for side in img.size)
        return common.to_normalized_tensor(img.resize((w, h), Image.BICUBIC), self.mean, self.std)


class ShapesSegmentation(torch.utils.data.Dataset):
    """The built-in held-out images with their renderer's masks: (image, LongTensor[64, 64] mask, 0);
    mask 0 = background, 1 + c = class c (c = shape * 8 + colour). Each image holds one object on a muted
    background; the task asks, per pixel, whether the text prompts put the object where it is, with its
    colour and shape (see common.shapes_segmentation_scores for the four scores)."""

    def __init__(self, length, transform):
        self.shapes, self.transform = common.Shapes("val", length=length), transform

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        img, _, _, mask = self.shapes.sample(i)
        return self.transform(img), torch.from_numpy(mask.astype(np.int64)), 0


class VOCSegmentation(torch.utils.data.Dataset):
    """Pascal VOC layout: ImageSets/Segmentation/val.txt ids, JPEGImages/<id>.jpg, SegmentationClass/<id>.png
    (palette PNG: 0 background, 1..20 classes, 255 ignored). Items (image, LongTensor[H, W] label, 0)."""

    def __init__(self, root, transform):
        self.root, self.transform = root, transform
        parts = ["JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation", "val.txt")]
        missing = [p for p in parts if not os.path.exists(os.path.join(root, p))]
        if missing:
            raise common.UsageError(f"--voc {root} has no {missing[0]}; point it at the folder holding JPEGImages/, "
                                    f"SegmentationClass/ and ImageSets/Segmentation/val.txt (e.g. VOCdevkit/VOC2012)")
        with open(os.path.join(root, parts[2])) as f:
            self.ids = [line.strip() for line in f if line.strip()]
        if not self.ids:
            raise common.UsageError(f"{os.path.join(root, parts[2])} lists no images")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        img = common.open_image(os.path.join(self.root, "JPEGImages", self.ids[i] + ".jpg"))
        label_path = os.path.join(self.root, "SegmentationClass", self.ids[i] + ".png")
        with Image.open(label_path, formats=["PNG"]) as label:
            if label.mode not in ("P", "L"):
                raise common.UsageError(f"{label_path} is a {label.mode} image; VOC labels are palette PNGs whose "
                                        f"pixel values are the class indices")
            label = torch.from_numpy(np.asarray(label, dtype=np.int64).copy())
        return self.transform(img), label, 0


# ----------------------------------------------------------------------------------------------------
# Benchmarks: the datasets of each task, built once per weights file
# ----------------------------------------------------------------------------------------------------
def check_paths(args):
    """Every path given on the command line, checked before anything is loaded."""
    folders = [("--imagenet-val", args.imagenet_val), ("--cifar10", args.cifar10), ("--cifar100", args.cifar100),
               ("--voc", args.voc), ("--probe-train", args.probe_train), ("--probe-val", args.probe_val)]
    for flag, path in folders:
        if path and not os.path.isdir(path):
            raise common.UsageError(f"{flag} {path} does not exist or is not a folder")
    for flag, path in (("--retrieval-csv", args.retrieval_csv), ("--classnames", args.classnames)):
        if path and not os.path.isfile(path):
            raise common.UsageError(f"{flag} {path} does not exist")
    if bool(args.probe_train) != bool(args.probe_val):
        raise common.UsageError("--probe-train and --probe-val go together: give both ImageFolder folders")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.access(out_dir, os.W_OK):
        raise common.UsageError(f"cannot write {args.out}; choose another file with --out")


def cifar(which, root, train, transform):
    import torchvision  # only here: importing it costs every start-up a second
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[which]
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError:
        folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[which]
        raise common.UsageError(f"--{which} {root} holds no {folder}/; download it once with torchvision.datasets."
                                f"{cls.__name__}({root!r}, download=True)") from None
    names = CIFAR10_CLASSNAMES if which == "cifar10" else CIFAR100_CLASSNAMES
    if [c.replace("_", " ") for c in ds.classes] != names:
        raise common.UsageError(f"the classes of {root}/{which} are not torchvision's {which} classes in order")
    return Transformed(ds, transform), names


def benchmarks(args, meta):
    """[(name, {task: inputs}, protocol note)] for the datasets asked for."""
    mean, std = common.NORMS[meta["norm"]]
    transform = common.EvalTransform(meta["image_size"], mean, std)
    seg_transform = SegTransform(args.seg_size or meta["image_size"], meta["patch_size"], mean, std)
    # the built-in images at their native size or larger: a patch grid fine enough for the objects
    builtin_seg = SegTransform(args.seg_size or max(meta["image_size"], BUILTIN_SEG_SIZE), meta["patch_size"], mean,
                               std)
    templates = TEMPLATES[args.templates]
    out = []
    if args.builtin:
        n = args.builtin_samples
        val = common.Shapes("val", length=n, transform=transform, target="label")
        captions = [val.sample(i)[1] for i in range(n)]
        backgrounds = [f"{b} background" for b in common.BACKGROUNDS]
        out.append(("builtin", {
            "zeroshot": (val, val.classnames, val.templates),
            "retrieval": (val, captions, list(range(n))),
            "segmentation": (ShapesSegmentation(n, builtin_seg), val.classnames, backgrounds, val.templates,
                             args.batch_size, common.shapes_segmentation_scores),
            "knn": (common.Shapes("train", length=2 * n, transform=transform, target="label"), val,
                    len(val.classnames))},
            f"built-in shapes: {n} held-out images, {2 * n} training images for k-NN / probe, "
            f"{len(val.templates)} templates"))
    if args.imagenet_val:
        ds = common.ImageFolder(args.imagenet_val, transform)
        names = common.IMAGENET_CLASSNAMES
        if args.classnames:
            with open(args.classnames) as f:
                names = [line.strip() for line in f if line.strip()]
        if len(names) != len(ds.classes):
            raise common.UsageError(f"--imagenet-val {args.imagenet_val} has {len(ds.classes)} class folders but "
                                    f"there are {len(names)} class names; point it at the 1000-class ImageNet val "
                                    f"folder, or give one name per folder with --classnames")
        name = "imagenet" if not args.classnames else os.path.basename(os.path.normpath(args.imagenet_val))
        out.append((name, {"zeroshot": (ds, names, templates)},
                    f"{len(ds)} images, {TEMPLATE_NAMES[args.templates]}, " +
                    ("class names from " + args.classnames if args.classnames else "OpenAI's 1000 class names")))
    for which in ("cifar10", "cifar100"):
        root = getattr(args, which)
        if root:
            test, names = cifar(which, root, False, transform)
            train, _ = cifar(which, root, True, transform)
            out.append((which, {"zeroshot": (test, names, common.CIFAR_TEMPLATES), "knn": (train, test, len(names))},
                        "torchvision's test split (k-NN / probe: its train split), OpenAI's 18 CIFAR templates"))
    if args.retrieval_csv:
        csv = common.CsvDataset(args.retrieval_csv, None, args.csv_img_key, args.csv_caption_key, args.csv_separator)
        paths, captions, caption_image, index = [], [], [], {}
        for i in range(len(csv)):  # rows sharing an image path: one image with several captions
            j = index.setdefault(csv.images[i], len(paths))
            if j == len(paths):
                paths.append(csv.images[i])
            for caption in csv.row_captions(i):  # several caption columns: each a caption of the image
                captions.append(caption)
                caption_image.append(j)
        name = os.path.splitext(os.path.basename(args.retrieval_csv))[0]
        out.append((name, {"retrieval": (ImageFiles(csv.root, paths, transform), captions, caption_image)},
                    f"{len(paths)} images, {len(captions)} captions"))
    if args.voc:
        out.append(("voc", {"segmentation": (VOCSegmentation(args.voc, seg_transform), VOC_CLASSNAMES,
                                             BACKGROUND_WORDS, templates, 1, None)},
                    f"VOC val, 20 classes + background, {TEMPLATE_NAMES[args.templates]}, shorter side "
                    f"{seg_transform.size}"))
    if args.probe_train:
        train, val = common.ImageFolder(args.probe_train, transform), common.ImageFolder(args.probe_val, transform)
        if train.classes != val.classes:
            raise common.UsageError(f"--probe-train has {len(train.classes)} class folders and --probe-val "
                                    f"{len(val.classes)}, not the same names; both need the same class folders")
        name = os.path.basename(os.path.dirname(os.path.abspath(args.probe_val))) or "folders"
        out.append((name, {"knn": (train, val, len(train.classes))},
                    f"{len(train)} training / {len(val)} val images, {len(train.classes)} classes"))
    for _, tasks, _ in out:
        if "knn" in tasks:
            tasks["probe"] = tasks["knn"]
    return out


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------
def loader(dataset, args, batch_size=None):
    """A loader over this rank's slice of `dataset` (common.ShardSampler)."""
    return common.eval_loader(dataset, batch_size or args.batch_size, *common.rank_world(), args.workers)


def bar(iterable, desc):
    return tqdm(iterable, desc=desc, disable=not is_main(), leave=False, dynamic_ncols=True)


def features_in_order(encode, dataset, args, desc, device):
    """encode(x) and the target of every item, gathered from the ranks and put back in dataset order (so
    that the results do not depend on the number of processes): (n, D), (n,)."""
    x, y = extract_features(encode, bar(loader(dataset, args), desc), device)
    world = common.rank_world()[1]
    gathered = torch.cat([torch.arange(r, len(dataset), world) for r in range(world)])  # ShardSampler, rank order
    back = gathered.argsort().to(x.device)
    return x[back], y[back]


@torch.no_grad()
def retrieval_recall(image_emb, text_emb, text_image, ks=(1, 5, 10), chunk=1024):
    """R@K (%) in both directions. image_emb: (n_img, E), text_emb: (n_txt, E), both L2-normalised;
    text_image: (n_txt,) the image of each caption. image->text: any of the image's captions in the top K;
    text->image: the caption's image in the top K."""
    n_img, n_txt, k = image_emb.shape[0], text_emb.shape[0], max(ks)
    hits_i2t, hits_t2i = [], []
    for i in range(0, n_img, chunk):
        top = (image_emb[i:i + chunk] @ text_emb.t()).topk(min(k, n_txt), dim=1).indices   # (b, k) captions
        own = torch.arange(i, min(i + chunk, n_img), device=top.device)
        hits_i2t.append(text_image[top] == own[:, None])                                  # (b, k)
    for i in range(0, n_txt, chunk):
        top = (text_emb[i:i + chunk] @ image_emb.t()).topk(min(k, n_img), dim=1).indices   # (b, k) images
        hits_t2i.append(top == text_image[i:i + chunk, None])                             # (b, k)
    hits_i2t, hits_t2i = torch.cat(hits_i2t), torch.cat(hits_t2i)
    out = {}
    for name, hits in (("i2t", hits_i2t), ("t2i", hits_t2i)):
        for K in ks:
            out[f"{name}_R@{K}"] = 100 * hits[:, :K].any(1).float().mean().item()
    return out


def linear_probe(train_x, train_y, val_x, val_y, num_classes, lambdas=PROBE_LAMBDAS, holdout=0.2, max_iter=1000):
    """Top-1 (%) on val of an L2-regularised logistic regression on frozen features, and the chosen L2
    strength λ: features z-scored with the training statistics; loss = mean cross-entropy + λ·‖W‖²
    (bias not regularised), minimised by full-batch L-BFGS; λ chosen on a fixed random 20% of the
    training features (the fits warm-start from the previous, stronger λ; a tie keeps the stronger), then
    refitted on all of them."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(0)).to(train_x.device)
    n_hold = max(1, int(holdout * train_x.shape[0]))
    hold, fit = perm[:n_hold], perm[n_hold:]
    W = train_x.new_zeros(train_x.shape[1], num_classes)
    b = train_x.new_zeros(num_classes)
    best_acc, best_lam = -1.0, lambdas[0]
    for lam in sorted(lambdas, reverse=True):
        W, b = fit_logistic(train_x[fit], train_y[fit], lam, W, b, max_iter)
        acc = ((train_x[hold] @ W + b).argmax(1) == train_y[hold]).float().mean().item()
        if acc > best_acc:
            best_acc, best_lam = acc, lam
    W, b = fit_logistic(train_x, train_y, best_lam, torch.zeros_like(W), torch.zeros_like(b), max_iter)
    return 100 * ((val_x @ W + b).argmax(1) == val_y).float().mean().item(), best_lam


def fit_logistic(x, y, lam, W, b, max_iter):
    """argmin over (W, b) of mean CE(x W + b, y) + λ‖W‖², from (W, b), by L-BFGS with strong Wolfe line search."""
    W, b = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-4,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + lam * W.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


# ----------------------------------------------------------------------------------------------------
# Tasks: each returns {metric: value} for one tower on one dataset
# ----------------------------------------------------------------------------------------------------
def class_embeddings(tower, names, templates, meta, device, desc):
    with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
        return zero_shot_classifier(tower.encode_text, bar(names, desc), templates, meta["context_length"], device)


def run_zeroshot(tower, inputs, meta, args, device, desc):
    dataset, names, templates = inputs
    classifier = class_embeddings(tower, names, templates, meta, device, f"{desc} class embeddings")
    top1, top5 = zero_shot_accuracy({"": (tower.encode_image, classifier)}, bar(loader(dataset, args), desc),
                                    device)[""]
    return {"zeroshot_top1": top1, "zeroshot_top5": top5}


def run_retrieval(tower, inputs, meta, args, device, desc):
    images, captions, caption_image = inputs
    image_emb, _ = features_in_order(tower.encode_image, images, args, f"{desc} images", device)
    text_emb, _ = features_in_order(tower.encode_text, Captions(captions, meta["context_length"]), args,
                                    f"{desc} captions", device)
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    return retrieval_recall(image_emb, text_emb, torch.tensor(caption_image, device=device))


def run_segmentation(tower, inputs, meta, args, device, desc):
    """{seg_mIoU, seg_pixel_acc} (%), or what `scores(confusion)` makes of the confusion counts (the built-in
    set's four scores)."""
    dataset, names, backgrounds, templates, batch_size, scores = inputs
    classifier = torch.cat([class_embeddings(tower, prompts, templates, meta, device, f"{desc} {what} embeddings")
                            for what, prompts in (("background", backgrounds), ("class", names))])
    n = 1 + len(names)
    confusion = torch.zeros(n, n, dtype=torch.long, device=device)
    for images, masks, _ in bar(loader(dataset, args, batch_size), desc):
        images, masks = images.to(device), masks.to(device)
        with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
            dense = tower.encode_dense(images)                                 # (B, N, E)
        grid = (images.shape[-2] // meta["patch_size"], images.shape[-1] // meta["patch_size"])
        confusion += segmentation_confusion(dense, classifier, len(backgrounds), grid, masks, args.bg_threshold)
    common.all_reduce(confusion)
    if scores is not None:
        return scores(confusion)
    mean_iou, pixel_acc = miou(confusion)
    return {"seg_mIoU": mean_iou, "seg_pixel_acc": pixel_acc}


def run_probe_tasks(tower, inputs, tasks, args, device, desc):
    """k-NN and linear probe share one pass of feature extraction."""
    train, val, num_classes = inputs
    encode = feature_fn(tower)
    train_x, train_y = features_in_order(encode, train, args, f"{desc} train features", device)
    val_x, val_y = features_in_order(encode, val, args, f"{desc} val features", device)
    out = {}
    if "knn" in tasks:
        out["knn_top1"] = knn_accuracy(train_x, train_y, val_x, val_y, num_classes, k=args.knn_k, temperature=0.07)
    if "probe" in tasks:
        out["probe_top1"], out["probe_lambda"] = linear_probe(train_x, train_y, val_x, val_y, num_classes)
    return out


RUNNERS = {"zeroshot": run_zeroshot, "retrieval": run_retrieval, "segmentation": run_segmentation}


@torch.no_grad()
def evaluate_tower(name, tower, benches, meta, args, device):
    """{dataset: {metric: value}} for one tower (the linear probe turns gradients on for its own fit)."""
    results = {}
    tower = tower.to(device).eval()
    for bench, tasks, _ in benches:
        todo = [t for t in TASKS if t in tasks and t in args.tasks and can(tower, t)]
        out = {}
        for task in todo:
            desc = f"{name} {bench} {task}"
            if task in RUNNERS:
                out.update(RUNNERS[task](tower, tasks[task], meta, args, device, desc))
        probe_tasks = [t for t in todo if t in ("knn", "probe")]
        if probe_tasks:
            out.update(run_probe_tasks(tower, tasks[probe_tasks[0]], probe_tasks, args, device, f"{name} {bench}"))
        if out:
            results[bench] = out
    tower.cpu()
    return results


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("weights", help="checkpoint.pt or export_*.pt of this project, an OpenAI CLIP .pt archive, or "
                                   "an OpenAI / open_clip ViT state dict")
    g = p.add_argument_group("datasets (without any, the built-in held-out set runs)")
    g.add_argument("--builtin", action="store_true", help="the built-in shapes: every task")
    g.add_argument("--builtin-samples", type=common.at_least(1, eg=2048), default=2048,
                   help="built-in held-out images (k-NN / probe train on 2x as many training images)")
    g.add_argument("--imagenet-val", help="ImageNet-style val folder (one subfolder per class): zero-shot")
    g.add_argument("--classnames", help="text file, one class name per line in sorted-folder order, for an "
                                        "--imagenet-val folder other than ImageNet's")
    g.add_argument("--templates", choices=list(TEMPLATES), default="80",
                   help="ImageNet / VOC prompt set: OpenAI's 80, the 7 of SLIP and A-CLIP, or 1")
    g.add_argument("--cifar10", help="torchvision CIFAR-10 root (cifar-10-batches-py inside): zero-shot, k-NN, probe")
    g.add_argument("--cifar100", help="torchvision CIFAR-100 root (cifar-100-python inside): zero-shot, k-NN, probe")
    g.add_argument("--retrieval-csv", help="image-caption CSV/TSV (e.g. Karpathy-split COCO / Flickr test): retrieval")
    g.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths (relative to the CSV)")
    g.add_argument("--csv-caption-key", default="title",
                   help="CSV column of captions; 'title,description': each non-empty one is a caption")
    g.add_argument("--csv-separator", default="\t", help="CSV separator")
    g.add_argument("--voc", help="Pascal VOC folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/val.txt): "
                                 "segmentation")
    g.add_argument("--seg-size", type=common.at_least(8, eg=224),
                   help="shorter image side for segmentation (default: the model's input size; for the built-in "
                        "set at least its native 64 px)")
    g.add_argument("--bg-threshold", type=common.fraction(eg=0.5), default=0.0,
                   help="segmentation: also call a pixel background when its best class probability is below this")
    g.add_argument("--probe-train", help="ImageFolder of training images: k-NN and linear probe")
    g.add_argument("--probe-val", help="ImageFolder of val images, the same classes: k-NN and linear probe")
    g = p.add_argument_group("tasks and model")
    g.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    g.add_argument("--knn-k", type=common.at_least(1, eg=20), default=20, help="neighbours of the k-NN vote")
    g.add_argument("--act", choices=["quickgelu", "gelu"], help="override the MLP activation")
    g.add_argument("--norm", choices=list(common.NORMS), help="override the pixel normalisation")
    g = p.add_argument_group("system")
    g.add_argument("--batch-size", type=common.at_least(1, eg=256), default=256, help="images per batch and rank")
    g.add_argument("--workers", type=common.at_least(0, eg=8), default=min(8, os.cpu_count() or 1),
                   help="data-loading processes per rank")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g.add_argument("--out", help="JSON file of all numbers (default: eval_<weights name>.json next to the weights)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"--tasks: unknown task {unknown[0]!r}; choose from {','.join(TASKS)}")
    if not (args.imagenet_val or args.cifar10 or args.cifar100 or args.retrieval_csv or args.voc or args.probe_train):
        args.builtin = True
    if args.out is None:
        stem = os.path.splitext(os.path.basename(args.weights))[0]
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.weights)), f"eval_{stem}.json")
    return args


def format_table(results):
    """results: {tower: {dataset: {metric: value}}} -> one row per (dataset, metric), one column per tower."""
    towers = list(results)
    rows = {}
    for tower in towers:
        for bench, metrics in results[tower].items():
            for metric in metrics:
                rows.setdefault((bench, metric), None)
    width = max([len(t) for t in towers] + [8])
    lines = [f"{'dataset':<12} {'metric':<16} " + " ".join(f"{t:>{width}}" for t in towers)]
    for bench, metric in rows:
        cells = []
        for t in towers:
            v = results[t].get(bench, {}).get(metric)
            cells.append(f"{'-':>{width}}" if v is None else f"{v:>{width}.2f}" if metric != "probe_lambda"
                         else f"{v:>{width}.0e}")
        lines.append(f"{bench:<12} {metric:<16} " + " ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except common.UsageError as e:
        print(f"error: {common._one_line(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args):
    if not os.path.isfile(args.weights):
        raise common.UsageError(f"{args.weights} does not exist; give a checkpoint or weights file")
    check_paths(args)
    _, _, device = setup_distributed(args.device)
    towers, meta = load_towers(args.weights, args.act, args.norm)
    print0(f"{args.weights}: {meta['source']}; weights {', '.join(towers)}; activation {meta['act']} "
           f"({meta['act_reason']}); normalisation {meta['norm']}; input {meta['image_size']} px")
    benches = benchmarks(args, meta)
    protocol = {name: note for name, _, note in benches}
    for name, note in protocol.items():
        print0(f"{name}: {note}")
    results = {name: evaluate_tower(name, tower, benches, meta, args, device) for name, tower in towers.items()}
    if is_main():
        print(format_table(results))
        report = {"weights": os.path.abspath(args.weights), **{k: meta[k] for k in ("source", "act", "norm",
                  "image_size")}, "tasks": args.tasks, "protocol": protocol, "knn_k": args.knn_k,
                  "bg_threshold": args.bg_threshold, "world_size": common.rank_world()[1], "results": results}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
