"""eval_zeroshot.py: parity with open_clip (QuickGELU and GELU), each metric on inputs whose answer is known
by construction, a MaskCLIP checkpoint and its export evaluated end to end, and one-line errors."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import PRESENT, ROOT, run_cli, run_distributed

import common
import eval_zeroshot as ez
import maskclip

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread, so that OpenMP workers do not spin against other processes on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# Loading: open_clip parity, activation rules, TorchScript archives, image-only files
# ----------------------------------------------------------------------------------------------------
def open_clip_model(quick_gelu):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    vision = open_clip.model.CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=common.VOCAB_SIZE, width=128, heads=2, layers=2)
    model = open_clip.model.CLIP(64, vision, text, quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # every weight random (open_clip starts biases at 0 and LayerNorm gains at 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_parity(tmp_path, quick_gelu):
    ref = open_clip_model(quick_gelu)
    path = str(tmp_path / "weights.pt")
    if quick_gelu:   # a bare state dict: QuickGELU unless told otherwise
        torch.save(ref.state_dict(), path)
    else:            # open_clip's training checkpoint (DDP prefixes): GELU
        torch.save({"epoch": 3, "name": "run-ViT-tiny", "state_dict": {f"module.{k}": v for k, v in
                                                                       ref.state_dict().items()}}, path)
    towers, meta = ez.load_towers(path)
    assert meta["act"] == ("quickgelu" if quick_gelu else "gelu") and meta["norm"] == "clip"
    tower = towers["model"]
    images = torch.randn(4, 3, 32, 32)
    tokens = common.tokenize(["a photo of a cat.", "a red square", "", "two shapes: a ring and a star"], 16)
    with torch.no_grad():
        assert max_diff(tower.encode_image(images), ref.encode_image(images)) < 1e-5
        assert max_diff(tower.encode_text(tokens), ref.encode_text(tokens)) < 1e-5
        # the other activation gives other embeddings: the check above can fail
        wrong, _ = ez.load_towers(path, act="gelu" if quick_gelu else "quickgelu")
        assert max_diff(wrong["model"].encode_image(images), ref.encode_image(images)) > 1e-3


def test_activation_rules(tmp_path):
    sd = {"visual.conv1.weight": torch.zeros(1)}
    assert ez.openai_activation("x", sd, None)[0] == "quickgelu"
    assert ez.openai_activation("x", sd, "gelu") == ("gelu", "--act")
    assert ez.openai_activation("x", {"epoch": 1, "state_dict": sd}, None)[0] == "gelu"
    assert ez.openai_activation("x", {"epoch": 1, "name": "b_ViT-B-32-quickgelu", "state_dict": sd}, None)[0] == \
        "quickgelu"
    assert ez.openai_activation("x", {"state_dict": sd, "act": "gelu"}, None)[0] == "gelu"


def test_torchscript_archive_loads_as_quickgelu(tmp_path):
    torch.manual_seed(0)
    ref = maskclip.CLIP(**dict(common.MODELS["tiny"], act="quickgelu")).eval()
    images = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / "ViT-tiny.pt")
    torch.jit.trace_module(ref, {"encode_image": images}, check_trace=False).save(path)
    towers, meta = ez.load_towers(path)
    assert (meta["act"], meta["source"]) == ("quickgelu", "OpenAI TorchScript archive")
    with torch.no_grad():
        assert max_diff(towers["model"].encode_image(images), ref.encode_image(images)) < 1e-5


def test_image_only_weights_get_knn_and_probe_only(tmp_path, world1):
    clip = maskclip.CLIP(**dict(common.MODELS["tiny"], act="quickgelu"))
    torch.save({k: v for k, v in clip.state_dict().items() if k.startswith("visual.")}, tmp_path / "visual.pt")
    towers, meta = ez.load_towers(str(tmp_path / "visual.pt"))
    tower = towers["model"]
    assert not ez.can(tower, "zeroshot") and tower.features(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    args = ez.parse_args([str(tmp_path / "visual.pt"), "--builtin-samples", "16", "--workers", "0", "--device", "cpu"])
    results = ez.evaluate_tower("model", tower, ez.benchmarks(args, meta), meta, args, CPU)
    assert set(results["builtin"]) == {"knn_top1", "probe_top1", "probe_lambda"}


# ----------------------------------------------------------------------------------------------------
# Metrics on inputs whose answer is known by construction
# ----------------------------------------------------------------------------------------------------
WORDS = ["cat", "dog", "bird", "fish", "cow", "pig"]   # six classes, each one BPE token
BACKGROUND = ["sky"]


class FakeTower(nn.Module):
    """Text: one-hot of the class word (or background word) in the prompt. Image: pixel [0, 0, 0] holds the
    label, pixel [0, 0, 1] the rank the true class must get. Dense: channel 0 holds a class per pixel
    (-1 = background), read at each patch's top-left pixel."""

    def __init__(self, patch=8):
        super().__init__()
        self.patch, self.dim = patch, len(WORDS) + 1
        self.ids = {int(common.tokenize(w)[0, 1]): i for i, w in enumerate(WORDS + BACKGROUND)}
        assert len(self.ids) == self.dim and all(common.tokenize(w)[0, 2] == common.EOT_ID for w in WORDS)

    def encode_text(self, tokens):
        emb = torch.zeros(tokens.shape[0], self.dim)
        for token, dim in self.ids.items():
            emb[:, dim] = (tokens == token).any(1).float()
        return emb

    def encode_image(self, x):
        C = len(WORDS)
        out = torch.zeros(x.shape[0], self.dim)
        for b, (label, rank) in enumerate(x[:, 0, 0, :2].long().tolist()):
            order = [c for c in range(C) if c != label]
            order.insert(rank, label)                       # the true class at position `rank`
            for pos, c in enumerate(order):
                out[b, c] = C - pos
        return out

    def encode_dense(self, x):
        cls = x[:, 0, ::self.patch, ::self.patch].long().flatten(1)   # (B, N) row-major patches
        return F.one_hot(torch.where(cls < 0, len(WORDS), cls), self.dim).float()


def args_for(*extra):
    return ez.parse_args(["weights.pt", "--workers", "0", "--device", "cpu", "--batch-size", "4", *extra])


def test_zero_shot_top1_top5_known(world1):
    ranks = [0, 0, 0, 0, 2, 2, 4, 4, 5, 1]                  # top-1: 4 of 10; top-5: 9 of 10 (rank < 5)
    data = []
    for i, r in enumerate(ranks):
        x = torch.zeros(3, 4, 4)
        x[0, 0, 0], x[0, 0, 1] = i % len(WORDS), r
        data.append((x, i % len(WORDS), 0))
    meta = {"context_length": 16}
    out = ez.run_zeroshot(FakeTower(), (data, WORDS, ["a photo of a {}.", "a {}."]), meta, args_for(), CPU, "t")
    assert out == pytest.approx({"zeroshot_top1": 40.0, "zeroshot_top5": 90.0})


def patch_image(layout, patch=8):
    """(3, H, W) image and (H, W) label of a grid of classes (-1 = background), `patch` pixels per cell."""
    cls = torch.tensor(layout).repeat_interleave(patch, 0).repeat_interleave(patch, 1)   # (H, W)
    return torch.stack([cls.float()] * 3), cls + 1


def test_segmentation_known_miou(world1):
    layout = [[0, 1, 2], [3, -1, 4]]   # 2 x 3 grid, no class twice: every pixel's nearest patch wins
    image, label = patch_image(layout)
    ignored = label.clone()
    ignored[:3, :5] = 255              # ignored pixels leave the score unchanged
    wrong = label.clone()
    wrong[8:, 16:] = 1                 # the truth says class 0 where the image shows class 4
    meta = {"context_length": 16, "patch_size": 8}
    for truth, expected in ((label, (100.0, 100.0)), (ignored, (100.0, 100.0)),
                            # IoU: background 1, class 0 64/128, classes 1-3 1, class 4 0/64 -> 4.5/6
                            (wrong, (75.0, 100 * 320 / 384))):
        inputs = ([(image, truth, 0)] * 2, WORDS, BACKGROUND, ["a photo of a {}."], 2, None)
        out = ez.run_segmentation(FakeTower(), inputs, meta, args_for(), CPU, "t")
        assert (out["seg_mIoU"], out["seg_pixel_acc"]) == pytest.approx(expected)


def test_segmentation_background_threshold():
    dense = torch.tensor([0.0, 1.0, 1.0]).expand(1, 4, 3)  # every patch equally close to both classes
    classifier = torch.eye(3)                              # background prompt, class 0, class 1
    masks = torch.ones(1, 4, 4, dtype=torch.long)          # all class 0
    plain = common.segmentation_confusion(dense, classifier, 1, (2, 2), masks)
    assert plain[1, 0] == 0                                 # a class wins without the threshold
    strict = common.segmentation_confusion(dense, classifier, 1, (2, 2), masks, bg_threshold=0.6)
    assert strict[1, 0] == 16                               # best probability 0.5 < 0.6: all background


def confusion_of(truth, pred, n=65):
    """(n, n) confusion counts of label arrays, rows truth."""
    return torch.bincount((truth.long() * n + pred.long()).flatten(), minlength=n * n).view(n, n)


@pytest.fixture(scope="module")
def shapes_masks():
    """The masks of 24 built-in held-out images, as the segmentation task scores them."""
    ds = ez.ShapesSegmentation(24, lambda img: torch.zeros(1))
    return torch.stack([ds[i][1] for i in range(len(ds))])


def test_collapse_confusion_by_hand():
    confusion = torch.tensor([[5, 1, 2], [0, 3, 4], [6, 0, 7]])
    merged = common.collapse_confusion(confusion, [0, 1, 1])       # labels 1 and 2 become one label
    assert merged.tolist() == [[5, 3], [6, 14]]
    assert common.collapse_confusion(confusion, [0, 1, 2]).equal(confusion)


def test_shapes_scores_perfect_and_constant_predictors(shapes_masks):
    """The four built-in scores on the real held-out masks: 100 for a perfect predictor; for constant ones the
    value each definition implies, computed here from the pixel counts."""
    truth = shapes_masks
    perfect = common.shapes_segmentation_scores(confusion_of(truth, truth))
    assert perfect == pytest.approx({k: 100.0 for k in perfect})
    assert set(perfect) == {"seg_mIoU", "seg_pixel_acc", "seg_colour_mIoU", "seg_shape_mIoU", "seg_fg_IoU"}
    bg_frac, fg_frac = (truth == 0).float().mean().item(), (truth > 0).float().mean().item()
    colours = {1 + (c - 1) % 8 for c in truth.unique().tolist() if c}
    shapes = {1 + (c - 1) // 8 for c in truth.unique().tolist() if c}
    background = common.shapes_segmentation_scores(confusion_of(truth, torch.zeros_like(truth)))
    assert background["seg_fg_IoU"] == 0 and background["seg_pixel_acc"] == pytest.approx(100 * bg_frac)
    assert background["seg_colour_mIoU"] == pytest.approx(100 * bg_frac / (1 + len(colours)))
    assert background["seg_shape_mIoU"] == pytest.approx(100 * bg_frac / (1 + len(shapes)))
    assert background["seg_mIoU"] == pytest.approx(100 * bg_frac / (1 + len(truth.unique()) - 1))
    red_circle = 1 + common.SHAPE_CLASSNAMES.index("red circle")   # one object label everywhere
    constant = common.shapes_segmentation_scores(confusion_of(truth, torch.full_like(truth, red_circle)))
    assert constant["seg_fg_IoU"] == pytest.approx(100 * fg_frac)
    red = ((truth > 0) & ((truth - 1) % 8 == common.COLOUR_NAMES.index("red"))).float().mean().item()
    present = len(colours | {1 + common.COLOUR_NAMES.index("red")}) + 1       # + background (in the truth)
    assert constant["seg_colour_mIoU"] == pytest.approx(100 * red / present)
    # right object, wrong colour: the shape mIoU is perfect, the colour mIoU is not
    recoloured = torch.where(truth > 0, (truth - 1) // 8 * 8 + ((truth - 1) % 8 + 1) % 8 + 1, 0)
    shifted = common.shapes_segmentation_scores(confusion_of(truth, recoloured))
    assert shifted["seg_shape_mIoU"] == pytest.approx(100) and shifted["seg_fg_IoU"] == pytest.approx(100)
    wrong = colours | {1 + (c - 1) % 8 for c in recoloured.unique().tolist() if c}   # truth's and predicted
    assert shifted["seg_colour_mIoU"] == pytest.approx(100 / (1 + len(wrong)))         # background alone right


def test_builtin_segmentation_gives_the_four_scores(world1):
    """eval_zeroshot's built-in segmentation (at 64 px, 8 × 8 patches for the tiny model) and
    common.shapes_segmentation agree on the same images, and the plain call still returns the 65-label mIoU."""
    torch.manual_seed(0)
    clip = maskclip.CLIP(**dict(common.MODELS["tiny"], act="quickgelu")).eval()
    meta = {"image_size": 32, "patch_size": 8, "norm": "clip", "context_length": 24}
    args = args_for("--builtin-samples", "8", "--tasks", "segmentation")
    inputs = dict(ez.benchmarks(args, meta)[0][1])["segmentation"]
    assert inputs[0][0][0].shape == (3, 64, 64)
    out = ez.run_segmentation(clip, inputs, meta, args, CPU, "t")
    classifier = common.shapes_segmentation_classifier(clip.encode_text, 24, CPU)
    kwargs = dict(image_size=32, patch_size=8, norm="clip", device=CPU, n_images=8, seg_size=64)
    assert common.shapes_segmentation(clip.encode_dense, classifier, scores=True, **kwargs) == pytest.approx(out)
    assert common.shapes_segmentation(clip.encode_dense, classifier, **kwargs) == pytest.approx(out["seg_mIoU"])
    assert all(0 <= v <= 100 for v in out.values())


def test_miou_by_hand():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])   # class 2 absent: left out of the mean
    assert common.miou(confusion) == pytest.approx(((3 / 4 + 2 / 3) / 2 * 100, 5 / 6 * 100))


def naive_recall(image_emb, text_emb, text_image, k):
    sim = image_emb @ text_emb.t()
    i2t = np.mean([any(text_image[j] == i for j in sim[i].argsort(descending=True)[:k].tolist())
                   for i in range(sim.shape[0])])
    t2i = np.mean([text_image[t] in sim[:, t].argsort(descending=True)[:k].tolist() for t in range(sim.shape[1])])
    return 100 * i2t, 100 * t2i


def test_retrieval_recall():
    torch.manual_seed(0)
    text_image = [i for i in range(30) for _ in range(1 + i % 3)]     # 1 to 3 captions per image
    image_emb = F.normalize(torch.randn(30, 8), dim=-1)
    exact = ez.retrieval_recall(image_emb, image_emb[text_image], torch.tensor(text_image), chunk=7)
    assert all(v == 100.0 for v in exact.values())
    text_emb = F.normalize(image_emb[text_image] + 0.6 * torch.randn(len(text_image), 8), dim=-1)
    out = ez.retrieval_recall(image_emb, text_emb, torch.tensor(text_image), chunk=7)
    for k in (1, 5, 10):
        i2t, t2i = naive_recall(image_emb, text_emb, text_image, k)
        assert (out[f"i2t_R@{k}"], out[f"t2i_R@{k}"]) == pytest.approx((i2t, t2i))
    assert out["i2t_R@1"] < 100 and out["t2i_R@1"] < out["t2i_R@10"]


def test_knn_temperature_weighting():
    test = torch.tensor([[1.0, 0.0]])
    c, s = 0.5, (1 - 0.5 ** 2) ** 0.5
    train = torch.tensor([[c, s], [c, -s], [0.9, (1 - 0.81) ** 0.5]])   # cosines 0.5, 0.5, 0.9
    labels = torch.tensor([0, 0, 1])
    # T = 0.07: 2·exp(0.5/0.07) < exp(0.9/0.07), the close neighbour wins; T = 10: two votes beat one
    assert common.knn_accuracy(train, labels, test, torch.tensor([1]), 2, k=3, temperature=0.07) == 100
    assert common.knn_accuracy(train, labels, test, torch.tensor([0]), 2, k=3, temperature=10.0) == 100


def test_linear_probe_separable_and_optimal():
    torch.manual_seed(0)
    centres = 3 * torch.randn(5, 16)
    y_train, y_val = torch.randint(0, 5, (400,)), torch.randint(0, 5, (100,))
    x_train, x_val = centres[y_train] + torch.randn(400, 16), centres[y_val] + torch.randn(100, 16)
    top1, lam = ez.linear_probe(x_train, y_train, x_val, y_val, 5)
    assert top1 == 100.0 and lam in ez.PROBE_LAMBDAS
    # the fit reaches the optimum: the gradient of the regularised objective vanishes there
    x = (x_train - x_train.mean(0)) / x_train.std(0)
    W, b = ez.fit_logistic(x, y_train, 1e-2, torch.zeros(16, 5), torch.zeros(5), 1000)
    W, b = W.requires_grad_(), b.requires_grad_()
    loss = F.cross_entropy(x @ W + b, y_train) + 1e-2 * W.pow(2).sum()
    assert max(g.abs().max().item() for g in torch.autograd.grad(loss, (W, b))) <= 1e-4
    # labels unrelated to the features: no better than chance on val, with room for noise
    shuffled, _ = ez.linear_probe(x_train, y_train[torch.randperm(400)], x_val, y_val, 5)
    assert shuffled < 50


# ----------------------------------------------------------------------------------------------------
# End to end: a MaskCLIP checkpoint and its export through the CLI
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("maskclip")
    run_cli("maskclip.py", "--model", "tiny", "--steps", "1", "--batch-size", "8", "--builtin-samples", "16",
            "--workers", "0", "--eval-every", "0", "--out-dir", out)
    return out


def run_eval_cli(*args):
    """`python eval_zeroshot.py <args>` on the CPU with one thread (see one_thread)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval_zeroshot.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


ALL_METRICS = {"zeroshot_top1", "zeroshot_top5", "seg_mIoU", "seg_pixel_acc", "seg_colour_mIoU", "seg_shape_mIoU",
               "seg_fg_IoU", "knn_top1", "probe_top1", "probe_lambda"} | {f"{d}_R@{k}" for d in ("i2t", "t2i")
                                                                          for k in (1, 5, 10)}


def test_checkpoint_and_export_end_to_end(run_dir):
    ckpt_json, export_json = run_dir / "ckpt.json", run_dir / "export.json"
    proc = run_eval_cli(run_dir / "checkpoint.pt", "--builtin-samples", "48", "--workers", "0", "--out", ckpt_json)
    assert "activation quickgelu (recorded in the checkpoint)" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("dataset"))
    assert header.split()[-2:] == ["online", "ema"]
    report = json.loads(ckpt_json.read_text())
    assert set(report["results"]) == {"online", "ema"}
    for name in ("online", "ema"):
        metrics = report["results"][name]["builtin"]
        assert set(metrics) == ALL_METRICS
        assert all(0 <= v <= 100 for k, v in metrics.items() if k != "probe_lambda")
    # the export holds the same online weights: the same numbers
    ez.main([str(run_dir / "export_online.pt"), "--builtin-samples", "48", "--workers", "0", "--device", "cpu",
             "--out", str(export_json)])
    exported = json.loads(export_json.read_text())["results"]
    assert list(exported) == ["online"]
    assert exported["online"]["builtin"] == pytest.approx(report["results"]["online"]["builtin"], abs=1e-6)


def test_zero_shot_equals_the_training_evaluation(run_dir):
    """maskclip.py's final evaluation and this tool agree on the same 2048 held-out images."""
    out = run_dir / "zeroshot.json"
    ez.main([str(run_dir / "checkpoint.pt"), "--tasks", "zeroshot", "--workers", "0", "--device", "cpu",
             "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    trained = [r["eval"] for r in lines if "eval" in r][-1]
    for name in ("online", "ema"):
        assert results[name]["builtin"]["zeroshot_top1"] == pytest.approx(trained[f"{name}/top1"], abs=1e-4)
        assert results[name]["builtin"]["zeroshot_top5"] == pytest.approx(trained[f"{name}/top5"], abs=1e-4)


@pytest.mark.parametrize("script", PRESENT)
def test_every_script_checkpoint_loads_through_eval_towers(script, tmp_path, world1):
    """A checkpoint of each method script (untrained tiny model, saved as save_checkpoint saves it) gives
    towers of the documented interface, with the online and EMA weights where the script has an EMA."""
    module = importlib.import_module(script)
    argv = ["--model", "tiny", "--out-dir", str(tmp_path)]
    if module.DATA_KIND == "image":   # MILAN and MaskDistill learn from a frozen CLIP teacher
        torch.save(maskclip.CLIP(**dict(common.MODELS["tiny"], act="quickgelu")).state_dict(), tmp_path / "t.pt")
        argv += ["--teacher", str(tmp_path / "t.pt")]
    args = module.parse_args(argv)
    cfg = module.model_config(args)
    model, teacher = module.build_model(cfg, args)
    common.save_checkpoint(str(tmp_path / "checkpoint.pt"), method=module.METHOD, cfg=cfg, args=args, step=0,
                           model=model, teacher=teacher, optimizer=module.make_optimizer(model, args, CPU),
                           scaler=torch.amp.GradScaler("cpu", enabled=False))
    towers, meta = ez.load_towers(str(tmp_path / "checkpoint.pt"))
    assert meta["source"] == f"{script} checkpoint at step 0" and meta["image_size"] == 32
    if common.trained(teacher):
        assert {"online", "ema"} <= set(towers)
    images = torch.randn(2, 3, 32, 32)
    for tower in towers.values():
        tower.eval()
        with torch.no_grad():
            if module.DATA_KIND == "image-text":
                assert all(ez.can(tower, t) for t in ez.TASKS)
                tokens = common.tokenize(["a red circle", "a blue star"], meta["context_length"])
                e = tower.encode_image(images).shape[1]
                assert tower.encode_text(tokens).shape == (2, e) and tower.encode_dense(images).shape == (2, 16, e)
            else:
                assert not ez.can(tower, "zeroshot") and ez.feature_fn(tower)(images).shape[0] == 2


def evaluate_builtin(rank, world, weights):
    args = ez.parse_args([weights, "--builtin-samples", "21", "--workers", "0", "--device", "cpu"])
    towers, meta = ez.load_towers(weights)
    return ez.evaluate_tower("online", towers["online"], ez.benchmarks(args, meta), meta, args, CPU)


def test_two_processes_give_the_numbers_of_one(run_dir, tmp_path, world1):
    """Each rank takes a slice (11 and 10 images) and the results are reduced: the same numbers as one process."""
    weights = str(run_dir / "export_online.pt")
    one = evaluate_builtin(0, 1, weights)["builtin"]
    two = run_distributed(evaluate_builtin, 2, tmp_path, weights)
    assert two[0] == two[1]
    assert two[0]["builtin"] == pytest.approx(one, abs=1e-3)


def test_retrieval_csv_groups_captions_by_image(run_dir, tmp_path):
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows = ["filepath\ttitle", "0.png\ta red circle", "1.png\ta blue star", "0.png\ta circle in red",
            "2.png\tgray", "1.png\ta star", "0.png\tred"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    ez.main([str(run_dir / "export_ema.pt"), "--retrieval-csv", str(tmp_path / "pairs.csv"), "--workers", "0",
             "--device", "cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["protocol"]["pairs"] == "3 images, 6 captions"
    metrics = report["results"]["ema"]["pairs"]
    assert set(metrics) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert metrics["t2i_R@5"] == metrics["i2t_R@10"] == 100.0   # 3 images, 6 captions: all in the top 5 / 10


def test_voc_and_image_folders(run_dir, tmp_path):
    """A Pascal VOC-layout folder (palette labels, 255 ignored, images of two sizes), an ImageFolder pair for
    k-NN / probe and a class-folder val set with its own class names, in one run."""
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(voc / sub)
    for i, (w, h) in enumerate([(40, 30), (24, 36)]):
        pixels = np.random.RandomState(i).randint(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / f"JPEGImages/{i}.jpg")
        label = np.zeros((h, w), dtype=np.uint8)
        label[5:15, 5:15], label[0, :] = 1 + 7 * i, 255
        png = Image.fromarray(label, mode="P")
        png.putpalette([0, 0, 0] * 256)
        png.save(voc / f"SegmentationClass/{i}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("0\n1\n")
    for split in ("train", "val"):
        for c, colour in enumerate(("red", "blue")):
            os.makedirs(tmp_path / split / colour)
            for k in range(3):
                rgb = [(200, 20, 20), (20, 20, 200)][c]
                Image.new("RGB", (20, 20), rgb).save(tmp_path / split / colour / f"{k}.png")
    (tmp_path / "names.txt").write_text("red\nblue\n")
    out = tmp_path / "r.json"
    ez.main([str(run_dir / "export_online.pt"), "--voc", str(voc), "--probe-train", str(tmp_path / "train"),
             "--probe-val", str(tmp_path / "val"), "--imagenet-val", str(tmp_path / "val"), "--classnames",
             str(tmp_path / "names.txt"), "--templates", "1", "--workers", "0", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())["results"]["online"]
    assert set(results) == {"voc", "val", os.path.basename(tmp_path)}
    assert set(results["voc"]) == {"seg_mIoU", "seg_pixel_acc"}
    assert set(results["val"]) == {"zeroshot_top1", "zeroshot_top5"}
    assert results[os.path.basename(tmp_path)]["knn_top1"] == 100.0   # two flat colours: nearest neighbours agree


# ----------------------------------------------------------------------------------------------------
# Bad input: one line each, exit status 2
# ----------------------------------------------------------------------------------------------------
def error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        ez.main([*argv, "--workers", "0", "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_one_line_each(run_dir, tmp_path, capsys):
    weights = str(run_dir / "export_online.pt")
    assert "--imagenet-val" in error_line(capsys, [weights, "--imagenet-val", str(tmp_path / "nowhere")])
    assert "does not exist" in error_line(capsys, [str(tmp_path / "missing.pt")])
    (tmp_path / "notes.pt").write_text("not weights\n")
    assert "expected" in error_line(capsys, [str(tmp_path / "notes.pt")])
    torch.save({"method": "bogus", "model": {}}, tmp_path / "bogus.pt")
    assert "bogus" in error_line(capsys, [str(tmp_path / "bogus.pt")])
    for name in ("a", "b", "c"):
        os.makedirs(tmp_path / "val" / name)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / name / "x.png")
    assert "3 class folders but there are 1000 class names" in \
        error_line(capsys, [weights, "--imagenet-val", str(tmp_path / "val")])
    assert "--probe-val" in error_line(capsys, [weights, "--probe-train", str(tmp_path / "val")])
    assert "JPEGImages" in error_line(capsys, [weights, "--voc", str(tmp_path / "val")])
    assert "cifar-10-batches-py" in error_line(capsys, [weights, "--cifar10", str(tmp_path)])
