"""benchmark.py: training-step speed, memory and MFU of every method; --quality: what each learns on one budget.

For each method (a row) at one model size, batch and precision, it times the code that trains: the method
script's own `train_one_step`, the one step its training loop runs (the learning rate of the step, the
method's `train_step` under common.autocast, backward through the GradScaler, gradient clipping where the
recipe has it, the fused AdamW step of the script's `make_optimizer`, `after_step`: EMA teachers, the
temperature clamp). Every row is built through the script's hooks as its `train()` builds it
(`parse_args`, `model_config`, `build_model` -> (model, teacher), `make_optimizer`, `Schedule`,
`train_transform`), wrapped in DistributedDataParallel (a world of one), and fed one real batch of the
built-in shapes made by its own transform and collated as its loader does. Steps are timed after a
warm-up, with the device synchronised at both ends of each timed block.

Rows: `clip` (maskclip.py with --dist-weight 0 --mlm-weight 0, the baseline every time is divided by),
maskclip, aclip, aclip-eff (--eff), silc (softmax), silc-sigmoid, milan, maskdistill (both with a frozen
CLIP teacher of the same size, written by maskclip.py's export to a temporary folder) and, when it is
installed, open_clip: the same CLIP architecture (QuickGELU or GELU as ours) through open_clip's `CLIP` and
`ClipLoss`, trained by the CLIP baseline's own `train_one_step` with the same optimiser. The paper's time
ratios (A-CLIP's table: MaskCLIP 1.56, A-CLIP 1.16, A-CLIP-eff 0.86 times CLIP) are printed beside ours.

Fairness: all rows run in one process. The rows are measured in `--rounds` rounds, each round running every
row once in turn (built afresh, warmed up, timed), so the load of a shared machine falls on all of them;
the time of a row is its median over the rounds and its time relative to CLIP the median over the rounds of
the ratio within a round.

Columns: images/s and ms per step (median); time relative to the CLIP baseline; peak memory (CUDA:
max_memory_allocated of the row, from a reset before it is built; CPU: the process's peak RSS while the row
ran, VmHWM after a reset through /proc/self/clear_refs); model FLOPs per image; achieved TFLOP/s and, on GPU,
the model FLOPs utilisation

    MFU = (3·F_trained + 1·F_frozen) · steps/s ÷ peak FLOP/s

where F_trained is the forward FLOPs of every operation autograd records (the trained towers, heads and
losses: their backward costs about twice their forward) and F_frozen the forward FLOPs of every operation
that runs without gradient (EMA and frozen teachers, scorers); a multiply-add counts as 2 FLOPs. Both are
counted with torch.utils.flop_counter.FlopCounterMode over one forward of the row's `train_step` on the
benchmark batch (matrix products, convolutions and attention; the causal text attention is counted in
full, as the published ViT FLOP figures do). Peaks (dense bf16/fp16): H100 SXM and H200 989 TFLOP/s, H100
PCIe 756, A100 312; `--peak-tflops` for another device or for fp32.

Data loading: images/s of one worker (one process, one torch thread, no DataLoader) of the built-in renderer
(render, the CLIP baseline's train transform, tokenize) and of the tar-shard reader (`common.TarShards`: read,
JPEG decode, transform, tokenize) over a tar of JPEGs written to a temporary folder, and how many such workers
the CLIP baseline's step rate needs.

Run:
    python benchmark.py                                            # CPU default: tiny model, fp32, < 5 min
    python benchmark.py --model ViT-B/16 --precision bf16 --batch-size 256 --json bench.json   # one GPU
    python benchmark.py --model ViT-B/16 --precision bf16 --batch-size 256 --compile --rounds 1
    python benchmark.py --methods clip,open_clip --rounds 5        # our CLIP baseline against open_clip
    python benchmark.py --model ViT-B/16 --batch-size 256 --methods clip --rounds 1 --profile prof   # where time goes

Hyper-parameters of the rows: the built-in demo's values (the scripts' DEMO) for the tiny model, the paper's
recipe (RECIPE, as with --train-data) for every other size; `--hparams` overrides. One process only (no
torchrun). Left out: data loading inside the timed step (the loader runs in its own workers during
training; its rate per worker is reported separately), evaluation and checkpointing time.

Quality study (`--quality [MINUTES]`): does each method do what its paper says, at equal cost?
    python benchmark.py --quality 90            # CPU: every row, 2 seeds, sized to end within 90 minutes
    python benchmark.py --quality 10 --device cuda --model small --batch-size 512 --points 1 \
        --train-samples 65536 --out-dir runs/quality-gpu   # one GPU: ViT-S width at 64 px, sized to 10 minutes
Rows: the speed rows without open_clip: clip (the baseline), maskclip, aclip, aclip-eff, silc (SILC-C),
silc-sigmoid (SILC-S), milan, maskdistill. Each is trained --seeds times (seeds --seed, --seed + 1, ...) by its
script's real command line, `python <script>.py ... --out-dir <out>/<row>/seed<k> --seed k`, one process at a
time (so that each run's wall time is its own), on the built-in data (no --train-data) with one setting for
all rows: --model, --batch-size, --study-steps and --train-samples distinct training images (the epoch). Each
method keeps its own recipe: the demo's hyper-parameters (its DEMO: learning rate, warm-up in epochs, masking,
heads, EMA). The scripts' model sizes are common.MODELS: on CPU the demo's tiny model (32 px, patch 8, 4
layers of width 128) is the only one that fits, so the study scales the demo up in images seen, not in
model size. MILAN's and MaskDistill's --teacher is the CLIP run of the same seed (its export_online.pt).

Points and tasks: each run saves a checkpoint every steps/--points steps and at the end; a thread hard-links
each one as the script replaces checkpoint.pt (CheckpointKeeper), and each goes through the same
eval_zeroshot.py tasks on --eval-samples held-out built-in images: zero-shot top-1, linear probe, k-NN (on
twice as many training images), zero-shot segmentation (colour mIoU and foreground IoU, see
common.shapes_segmentation_scores; every weight set in the file: online and EMA, the table shows the online
weights, or the student). A random-init CLIP per seed, evaluated the same way, is the floor. Axes: images
seen (step × batch) and training time (the training loop's wall time up to the checkpoint, from the images/s
of metrics.jsonl: without start-up and evaluation).

Budget: --study-steps fixes the steps of every run (MINUTES is then not used). Without it the steps are sized
to end within MINUTES: the untrained models' evaluations give the seconds of one evaluation, a probe times
three steps of each row in this process (MethodRow: the script's own train_one_step), and
    steps = (budget - time spent - runs · RUN_OVERHEAD_S - evaluations · eval seconds)
            / (seeds · Σ_rows seconds per step · LOOP_FACTOR),  rounded down to a multiple of --points.
On 2 idle CPU cores (the probe of the committed study: 2.99 s per step of batch 128 summed over the 8 rows) with
2 seeds, 3 points and 1024 evaluation images, 90 minutes come to about 420 steps of batch 128: about 54k images
per method and seed, 16 runs and 78 evaluations of about 16 s (a quarter of the time). The GPU command
above sizes itself the same way on the card; it has not been run (see the README for its estimate).

Noise and verdicts: mean and spread over seeds, spread = max - min; a difference between two rows within the
larger of their spreads is no difference. quality.md gives one verdict per claim, "confirmed", "not seen
(within noise)" or "reversed" (CLAIMS): A-CLIP above CLIP on zero-shot at equal images; A-CLIP-eff above CLIP
on zero-shot at equal training time (its value when CLIP's run ended, read off its curve from the untrained
model at 0 s); MaskCLIP above CLIP on linear probe and on zero-shot; SILC-C and SILC-S above CLIP on
zero-shot segmentation and not below it on zero-shot classification; MILAN and MaskDistill students at or
above their teacher (the CLIP run) on the linear probe.

Outputs in --out-dir: <row>/seed<k>/ (the run's files, train.log, points/eval_step<N>.json, result.json),
untrained/, plan.json (the sizing), quality.json (every number; --json for another path), quality.md (the
table, the verdicts, the curves) and, when matplotlib is installed (imported only here, only then),
<metric>_vs_images.png and <metric>_vs_time.png, one line per method. The same command run again reuses every
finished run (and the sizing of plan.json).
"""
import argparse
import contextlib
import ctypes
import gc
import importlib
import io
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import common

# row name -> (script, its flags, the paper's training time relative to CLIP: A-CLIP's README table)
ROWS = {
    "clip": ("maskclip", ["--dist-weight", "0", "--mlm-weight", "0"], 1.0),
    "maskclip": ("maskclip", [], 1.56),
    "aclip": ("aclip", [], 1.16),
    "aclip-eff": ("aclip", ["--eff"], 0.86),
    "silc": ("silc", [], None),
    "silc-sigmoid": ("silc", ["--loss", "sigmoid"], None),
    "milan": ("milan", ["--teacher", "{teacher}"], None),
    "maskdistill": ("maskdistill", ["--teacher", "{teacher}"], None),
    "open_clip": ("maskclip", ["--dist-weight", "0", "--mlm-weight", "0"], None),  # the CLIP baseline's settings
}
BASELINE = "clip"
# dense bf16/fp16 peak TFLOP/s by device name (first match wins)
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
TOTAL_STEPS = 10_000  # the run length the steps pretend to be in (schedules: learning rate, EMA momentum, τ_t)


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=",".join(ROWS),
                   help="comma-separated rows (the CLIP baseline is always run); open_clip is skipped when it is "
                        "not installed")
    p.add_argument("--model", default="tiny", help="model size (common.MODELS)")
    p.add_argument("--batch-size", type=common.at_least(1, eg=128), default=128, help="batch of one step")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast precision (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--hparams", default="auto", choices=["auto", "demo", "recipe"],
                   help="method hyper-parameters: the scripts' DEMO values or the paper's RECIPE (auto: DEMO for "
                        "the tiny model, RECIPE otherwise)")
    p.add_argument("--warmup", type=common.at_least(0, eg=2), default=2, help="untimed steps before each timed block")
    p.add_argument("--steps", type=common.at_least(1, eg=4), default=4, help="timed steps per row and round")
    p.add_argument("--rounds", type=common.at_least(1, eg=5), default=5,
                   help="rounds over all rows; times are medians over rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DDP-wrapped model, as the scripts' --compile does")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass")
    p.add_argument("--threads", type=common.at_least(1, eg=2), help="torch CPU threads (default: torch's)")
    p.add_argument("--peak-tflops", type=common.positive(989),
                   help="the device's peak TFLOP/s for the MFU (default: from the "
                        "device name for bf16/fp16; none on CPU)")
    p.add_argument("--data-samples", type=common.at_least(0, eg=256), default=256,
                   help="samples timed by each data-loading row (0 = no data-loading rows)")
    p.add_argument("--jpeg-size", type=common.at_least(8, eg=256),
                   help="side of the JPEGs of the tar-shard row (default: 8/7 of the image "
                        "size, at least 64: 256 for 224 px)")
    p.add_argument("--seed", type=common.at_least(0), default=0, help="random seed")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--profile", metavar="DIR",
                   help="also profile --steps more steps of each row (first round) with torch.profiler: the operators "
                        "by self time in DIR/<row>.txt (and on stderr), a Chrome trace in DIR/<row>.json; on CUDA the "
                        "fraction of the wall time the GPU is busy and the host-device synchronisations of one step")
    g = p.add_argument_group("quality study (--quality): what each method learns on the same budget")
    g.add_argument("--quality", nargs="?", const=90.0, type=common.positive(90), metavar="MINUTES",
                   help="run the quality study instead of the speed benchmark, sized to end within MINUTES of wall "
                        "time (90 when no number is given)")
    g.add_argument("--seeds", type=common.at_least(1, eg=2), default=2,
                   help="training runs per method, seeds --seed, --seed + 1, ...")
    g.add_argument("--study-steps", type=common.at_least(1, eg=600),
                   help="training steps of every run (default: as many as fit MINUTES, from a timing probe)")
    g.add_argument("--points", type=common.at_least(1, eg=3), default=3,
                   help="checkpoints of each run that are evaluated, evenly spaced, the last at the end")
    g.add_argument("--eval-samples", type=common.at_least(1, eg=1024), default=1024,
                   help="held-out images of each evaluation (k-NN and linear probe train on twice as many)")
    g.add_argument("--train-samples", type=common.at_least(1, eg=16384), default=16384,
                   help="built-in training images of every run (an epoch; the same images for every method)")
    g.add_argument("--workers", type=common.at_least(0, eg=8),
                   help="data-loading processes of each run and evaluation (default: on CPU the demo's 1 for "
                        "training and 0 for evaluation; on GPU min(8, CPU cores))")
    g.add_argument("--out-dir", default="runs/quality",
                   help="folder of the study: one folder per method and seed, quality.json, quality.md, plots")
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def writable_folder(flag, path):
    """Make the folder `path` of `flag`, or stop with one line saying why it cannot be used."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise common.UsageError(f"{flag} {path}: cannot make that folder ({e.strerror}); give another path") from None
    if not os.access(path, os.W_OK):
        raise common.UsageError(f"{flag} {path}: the folder is not writable; give another path")


def check_args(args):
    if args.model not in common.MODELS:
        raise common.UsageError(f"--model {args.model} is not a model size; pick one of {', '.join(common.MODELS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ROWS]
    if unknown or not methods:
        raise common.UsageError(f"--methods: unknown row {unknown[0] if unknown else '(none)'}; pick from "
                                f"{','.join(ROWS)}")
    if "open_clip" in methods and open_clip_module() is None:
        if args.methods != parse_args([]).methods:  # asked for by name
            raise common.UsageError("open_clip is not installed: pip install open_clip_torch, or drop open_clip "
                                    "from --methods")
        methods.remove("open_clip")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise common.UsageError("--device cuda was asked for but no GPU is visible; pass --device cpu")
    if args.json:  # checked now, not after minutes of timing
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise common.UsageError(f"--json {args.json}: cannot write a file there; give a file path in an existing, "
                                    f"writable folder")
    if args.profile:
        writable_folder("--profile", args.profile)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise common.UsageError("benchmark.py runs in one process: start it with python, not torchrun")
    return [BASELINE] + [m for m in dict.fromkeys(methods) if m != BASELINE]


def open_clip_module():
    try:
        return importlib.import_module("open_clip")
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------
class StepFlops:
    """Forward FLOPs of one training step, split by whether autograd records the operation. Use
    `with counter.mode():` around one forward; then `trained`, `frozen` and `model_flops` (per step)."""

    def __init__(self):
        self.trained = self.frozen = 0

    @property
    def model_flops(self):
        """3·F_trained + 1·F_frozen: forward + backward (≈ 2 × forward) of what is trained, forward only of
        the teachers."""
        return 3 * self.trained + self.frozen

    def _split(self, count):
        def counted(*args, out_val=None, **kwargs):
            n = count(*args, out_val=out_val, **kwargs)
            tensors = [a for x in args for a in (x if isinstance(x, (list, tuple)) else [x])
                       if isinstance(a, torch.Tensor)]
            if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
                self.trained += n
            else:
                self.frozen += n
            return n
        counted._get_raw = True  # FlopCounterMode passes the tensors themselves
        return counted

    def mode(self):
        registry = dict(flop_registry)
        # the CPU kernel of F.scaled_dot_product_attention is not in torch's table: same formula as flash
        cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if cpu_sdpa is not None and cpu_sdpa not in registry:
            registry[cpu_sdpa] = registry[torch.ops.aten._scaled_dot_product_flash_attention]
        return FlopCounterMode(display=False, custom_mapping={k: self._split(v) for k, v in registry.items()})


def analytic_clip_flops(cfg, batch):
    """Forward FLOPs of one CLIP step on `batch` pairs, a multiply-add = 2 FLOPs:
        per block of N tokens of width D: 24·N·D² (QKV 6ND², output 2ND², MLP 16ND²) + 4·N²·D (QKᵀ and AV)
        image: patch embedding 2·(N-1)·3P²·D, L_v blocks at N = grid² + 1, projection of [CLS] 2·D·E
        text: L_t blocks at N = context, projection of the end token 2·W·E
        loss: two B × B logit matrices, 2·2·B²·E
    ViT-B/16 at 224 px gives 35.13 (image) + 5.96 (text) = 41.09 GFLOPs per pair, the figures of open_clip's
    docs/model_profile.csv (mlfoundations/open_clip)."""
    def blocks(layers, n, d):
        return layers * (24 * n * d * d + 4 * n * n * d)
    n_img = (cfg["image_size"] // cfg["patch_size"]) ** 2
    width, text_width, embed = cfg["width"], cfg["text_width"], cfg["embed_dim"]
    image = (2 * n_img * 3 * cfg["patch_size"] ** 2 * width + blocks(cfg["layers"], n_img + 1, width)
             + 2 * width * embed)
    text = blocks(cfg["text_layers"], cfg["context_length"], text_width) + 2 * text_width * embed
    return batch * (image + text) + 4 * batch * batch * cfg["embed_dim"]


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------
def reset_peak_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the RSS is this row's
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS


def peak_memory(device):
    """Peak bytes since reset_peak_memory: CUDA allocations, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # never reset: the process's peak


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------
def script_args(row, args, teacher_path):
    """The method script's own arguments for a row."""
    script, flags, _ = ROWS[row]
    mod = importlib.import_module(script)
    recipe = args.hparams == "recipe" or (args.hparams == "auto" and args.model != "tiny")
    argv = ["--model", args.model, "--batch-size", str(args.batch_size), "--precision", args.precision,
            "--device", args.device, "--seed", str(args.seed), "--workers", "0"]
    argv += [f.format(teacher=teacher_path) for f in flags]
    argv += ["--compile"] * args.compile + ["--grad-checkpointing"] * args.grad_checkpointing
    # the recipe's values are what parse_args gives with --train-data; the benchmark feeds its own batch
    margs = mod.parse_args(argv + (["--train-data", "recipe"] if recipe else []))
    margs.train_data = None
    margs.out_dir = tempfile.gettempdir()
    return mod, margs


def make_batch(mod, margs, cfg, device):
    """One batch of the built-in shapes through the script's train transform, collated as its loader does
    (`common.make_train_loader` with no --train-data), pinned on CUDA."""
    kind = mod.DATA_KIND
    data = common.Shapes("train", length=margs.batch_size, transform=mod.train_transform(margs, cfg),
                         target="text" if kind == "image-text" else "label", context_length=cfg["context_length"],
                         seed=margs.seed)
    batch = common.collate([data[(0, i)] for i in range(margs.batch_size)])

    def pin(x):
        return x.pin_memory() if torch.is_tensor(x) else type(x)(pin(v) for v in x)
    return pin(batch) if device.type == "cuda" else batch


def schedule(mod, margs):
    """The script's Schedule for a run of TOTAL_STEPS steps over its --epochs, with the warm-up that the
    scripts' `train()` derives from --warmup-epochs."""
    steps_per_epoch = max(1, TOTAL_STEPS // margs.epochs)
    return mod.Schedule(TOTAL_STEPS, int(margs.warmup_epochs * steps_per_epoch), steps_per_epoch)


class MethodRow:
    """A method script's model, teacher, optimiser and schedule, built as its `train()` builds them, and one
    step of its training loop: the script's own `train_one_step`."""

    def __init__(self, mod, margs, batch, device):
        self.mod, self.args, self.batch, self.device = mod, margs, batch, device
        torch.manual_seed(margs.seed)  # as train(): the same initial weights in every row and round
        random.seed(margs.seed)
        model, teacher = self.build(mod, margs)
        self.model = model.to(device)
        self.teacher = teacher.to(device) if teacher is not None else None
        self.optimizer = mod.make_optimizer(self.model, margs, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=margs.precision == "fp16")
        self.sched = schedule(mod, margs)
        ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(ddp) if margs.compile else ddp
        self.sums, self.skipped = {}, 0
        self.model.train()

    def build(self, mod, margs):
        """(model, teacher) through the script's build_model, with --grad-checkpointing applied as train() does."""
        model, teacher = mod.build_model(mod.model_config(margs), margs)
        for m in model.modules():
            if isinstance(m, mod.Transformer):
                m.grad_checkpointing = margs.grad_checkpointing
        return model, teacher

    def count_flops(self, step):
        """The FLOPs of one forward of the script's train_step on the raw model (no DDP hooks counted)."""
        counter = StepFlops()
        with counter.mode(), common.autocast(self.device, self.args.precision):
            loss, _ = self.mod.train_step(self.model, self.model, self.teacher, self.batch, step, self.sched,
                                          self.args, self.device)
        del loss
        return counter

    def step(self, step):
        """One step of the script's training loop, `train_one_step`, and the loop's bookkeeping (metrics
        summed on the device, unreadable samples counted on the host, as common.MetricLog.add does),
        without the logging sync."""
        metrics = self.mod.train_one_step(self.forward, self.model, self.teacher, self.batch, self.optimizer,
                                          self.scaler, step, self.sched, self.args, self.device)
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.skipped += int(self.batch[2].sum())


class OpenClipRow(MethodRow):
    """The CLIP baseline's architecture through open_clip's CLIP and ClipLoss, in the CLIP baseline's own
    training step (maskclip.py's train_one_step with both branches off: train_step calls model(image,
    text) for (loss, metrics); after_step clamps the temperature, as open_clip's loop does), with the same
    optimiser, autocast, DDP wrapping and schedule."""

    def build(self, mod, margs):
        open_clip = open_clip_module()
        cfg = mod.model_config(margs)
        vision = open_clip.model.CLIPVisionCfg(layers=cfg["layers"], width=cfg["width"], patch_size=cfg["patch_size"],
                                               head_width=cfg["width"] // cfg["heads"], image_size=cfg["image_size"])
        text = open_clip.model.CLIPTextCfg(context_length=cfg["context_length"], vocab_size=common.VOCAB_SIZE,
                                           width=cfg["text_width"], heads=cfg["text_heads"], layers=cfg["text_layers"])

        class CLIPWithLoss(open_clip.model.CLIP):
            """open_clip's CLIP whose forward returns (ClipLoss, {}); its parameter names stay OpenAI's, so
            that make_optimizer puts the same parameters in the no-weight-decay group."""

            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.loss_fn = open_clip.loss.ClipLoss()

            def forward(self, image, text):
                image_features, text_features, logit_scale = super().forward(image, text)
                return self.loss_fn(image_features, text_features, logit_scale), {}

        model = CLIPWithLoss(cfg["embed_dim"], vision, text, quick_gelu=cfg["act"] == "quickgelu")
        if margs.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model, None


def write_teacher(folder, args):
    """A frozen CLIP image tower of the benchmark's size (random weights, QuickGELU), written as maskclip.py
    exports it, for the --teacher of milan.py and maskdistill.py."""
    mod, margs = script_args(BASELINE, args, None)
    cfg = dict(mod.model_config(margs), act="quickgelu")
    torch.manual_seed(args.seed)
    clip, _ = mod.build_model(cfg, margs)  # both branches off: exactly CLIP
    online = mod.export_state_dicts(clip.state_dict(), None)["online"]
    path = os.path.join(folder, "teacher.pt")
    common.export_weights(path, {k: v for k, v in online.items() if k.startswith("visual.")}, cfg, norm=margs.norm,
                          method=mod.METHOD, weights="online")
    return path


def time_row(row, prepared, res, first, args, device):
    """Build one row afresh, count its FLOPs (first round), warm up, time `args.steps` steps."""
    mod, margs, batch = prepared
    reset_peak_memory(device)
    runner = (OpenClipRow if row == "open_clip" else MethodRow)(mod, margs, batch, device)
    if first:
        flops = runner.count_flops(0)
        res.update(trained_flops=flops.trained, frozen_flops=flops.frozen, model_flops=flops.model_flops)
        runner.optimizer.zero_grad(set_to_none=True)
    step = 1
    for _ in range(args.warmup):
        runner.step(step)
        step += 1
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        runner.step(step)
        step += 1
    sync(device)
    res["seconds"].append((time.perf_counter() - t0) / args.steps)
    res["cpu_seconds"].append((time.process_time() - c0) / args.steps)
    res["peak_bytes"] = max(res["peak_bytes"], peak_memory(device))
    if first and args.profile:
        res["profile"] = profile_row(row, runner, step, args, device)
    if not math.isfinite(runner.sums["loss"].item()):  # one host sync per row
        raise SystemExit(f"error: non-finite loss in row {row}; its timings would not be those of training")


def run_rows(rows, args, device, teacher_path):
    """Every row once per round; returns {row: result dict}. A row that runs out of GPU memory is reported
    as such and left out of the later rounds."""
    prepared = {}
    for row in rows:
        mod, margs = script_args(row, args, teacher_path)
        prepared[row] = (mod, margs, make_batch(mod, margs, mod.model_config(margs), device))
    results = {row: {"script": ROWS[row][0], "flags": ROWS[row][1], "paper_ratio": ROWS[row][2], "seconds": [],
                     "cpu_seconds": [], "peak_bytes": 0} for row in rows}
    for r in range(args.rounds):
        for row in rows:
            res = results[row]
            if "error" in res:
                continue
            try:
                time_row(row, prepared[row], res, r == 0, args, device)
                message = f"{1000 * res['seconds'][-1]:.1f} ms/step"
            except torch.cuda.OutOfMemoryError:
                if row == BASELINE:
                    raise common.UsageError(f"the CLIP baseline does not fit in GPU memory at batch {args.batch_size}; "
                                            f"lower --batch-size or add --grad-checkpointing") from None
                res["error"] = message = f"out of GPU memory at batch {args.batch_size}"
            if args.compile:  # drop the compiled graphs: the next row compiles its own, far from the recompile limit
                torch._dynamo.reset()
            print(f"round {r + 1}/{args.rounds} {row}: {message}", file=sys.stderr, flush=True)
    base = results[BASELINE]["seconds"]
    for row, res in results.items():
        if "error" in res:
            continue
        median = statistics.median(res["seconds"])
        res["ms_per_step"] = 1000 * median
        res["images_per_s"] = args.batch_size / median
        res["relative_time"] = statistics.median(s / b for s, b in zip(res["seconds"], base))
        res["model_gflops_per_image"] = res["model_flops"] / args.batch_size / 1e9
        res["tflops_per_s"] = res["model_flops"] / median / 1e12
    return results


def profile_row(row, runner, step, args, device):
    """torch.profiler over `args.steps` steps of a warmed-up row. Writes DIR/<row>.txt (a summary and the
    operators by self device time on CUDA, self CPU time on CPU) and DIR/<row>.json (Chrome trace, for
    chrome://tracing or Perfetto). On CUDA: `device_busy`, the union of the kernels' time intervals over the
    wall time (well below 1: the host cannot keep the GPU fed), and `syncs`, the host-device
    synchronisations that torch.cuda.set_sync_debug_mode reports during one more step (the step should
    have none), with where they come from."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    os.makedirs(args.profile, exist_ok=True)
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for i in range(args.steps):
            runner.step(step + i)
        sync(device)
        wall = time.perf_counter() - t0
    summary = {"ms_per_step": 1000 * wall / args.steps}
    if cuda:
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]                  # µs
        summary["device_busy"] = union_length(kernels) / 1e6 / wall
        summary.update(count_syncs(runner, step + args.steps, device))
    lines = [f"{row}: {args.steps} steps profiled, {summary['ms_per_step']:.1f} ms/step under the profiler"]
    if cuda:
        lines.append(f"GPU busy {100 * summary['device_busy']:.0f}% of the wall time; host-device synchronisations in "
                     f"one step: {summary['syncs']}" + "".join(f"\n  at {w}" for w in summary["sync_sites"]))
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    text = "\n".join(lines)
    with open(os.path.join(args.profile, f"{row}.txt"), "w") as f:
        f.write(text + "\n")
    prof.export_chrome_trace(os.path.join(args.profile, f"{row}.json"))
    print(text, file=sys.stderr, flush=True)
    return summary


def union_length(intervals):
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, covered_to = 0, -math.inf
    for start, end in sorted(intervals):
        total += max(0, end - max(start, covered_to))
        covered_to = max(covered_to, end)
    return total


def count_syncs(runner, step, device):
    """Host-device synchronisations during one training step, as torch.cuda.set_sync_debug_mode warns of
    them, and up to 5 distinct places in the Python code that caused them."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [w for w in caught if "synchroniz" in str(w.message)]
    sites = list(dict.fromkeys(f"{os.path.basename(w.filename)}:{w.lineno}: {str(w.message).splitlines()[0]}"
                               for w in found))
    return {"syncs": len(found), "sync_sites": sites[:5]}


# ----------------------------------------------------------------------------------------------------
# Data loading
# ----------------------------------------------------------------------------------------------------
def data_rows(args, device, n):
    """Images/s of one worker: the built-in renderer and the tar-shard reader, with the CLIP baseline's
    train transform at the benchmark's image size and the tokenizer."""
    mod, margs = script_args(BASELINE, args, None)
    cfg = mod.model_config(margs)
    transform = mod.train_transform(margs, cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    out = {}
    shapes = common.Shapes("train", length=n + 8, transform=transform, context_length=margs.context_length)
    for i in range(8):  # warm-up: fonts, tokenizer cache
        shapes[(0, n + i)]
    t0 = time.perf_counter()
    for i in range(n):
        shapes[(0, i)]
    out["shapes"] = {"images_per_s": n / (time.perf_counter() - t0), "source_px": shapes.image_size}
    side = args.jpeg_size or max(64, round(cfg["image_size"] * 8 / 7))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "00000.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                img, caption, _, _ = common.render_shapes(7, i, size=side)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                for name, data in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        reader = common.TarShards([path], transform, margs.context_length, seed=args.seed)
        reader.set_epoch(0)
        it = iter(reader)
        t0 = time.perf_counter()
        for _ in range(n):  # one pass over the shard
            next(it)
        out["tar_jpeg"] = {"images_per_s": n / (time.perf_counter() - t0), "source_px": side}
        del it
    torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def cpu_name():
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores"


def peak_tflops(args, device):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda" or args.precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_TFLOPS if key in name), None)


def fmt_bytes(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def report(info, results, data, peak):
    lines = [f"device: {info['device']}; torch {info['torch']}; {info['threads']} CPU threads",
             f"model {info['model']}, batch {info['batch_size']}, {info['precision']}, hyper-parameters "
             f"{info['hparams']}, {info['warmup']} warm-up + {info['steps']} timed steps × {info['rounds']} rounds"
             + (", compiled" if info["compile"] else ""), ""]
    memory = "peak GPU memory" if info["device_type"] == "cuda" else "peak RSS"
    lines += [f"| method | images/s | ms/step | time vs CLIP | paper | {memory} | GFLOP/image | TFLOP/s | MFU |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, r in results.items():
        if "error" in r:
            lines.append(f"| {row} | {r['error']} |" + " |" * 7)
            continue
        mfu = f"{100 * r['tflops_per_s'] / peak:.1f}%" if peak else "-"
        paper = f"{r['paper_ratio']:.2f}" if r["paper_ratio"] else "-"
        lines.append(f"| {row} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['relative_time']:.2f} | "
                     f"{paper} | {fmt_bytes(r['peak_bytes'])} | {r['model_gflops_per_image']:.3g} | "
                     f"{r['tflops_per_s']:.3g} | {mfu} |")
    if "relative_time" in results.get("open_clip", {}):
        ratio = 1 / results["open_clip"]["relative_time"]
        lines += ["", f"our CLIP baseline / open_clip, time per step: {ratio:.2f} (target: at most 1.00)"]
    if data:
        clip_rate = results[BASELINE]["images_per_s"]
        lines += ["", "| data loading, one worker | source | images/s | workers to feed the CLIP baseline |",
                  "|---|---|---:|---:|"]
        names = {"shapes": "built-in shapes (render + transform)",
                 "tar_jpeg": "tar shards (read + JPEG decode + transform)"}
        for key, d in data.items():
            lines.append(f"| {names[key]} | {d['source_px']} px | {d['images_per_s']:.0f} | "
                         f"{math.ceil(clip_rate / d['images_per_s'])} |")
    lines += ["", "GFLOP/image = (3·F_trained + 1·F_frozen) / batch; "
              "MFU = (3·F_trained + 1·F_frozen) · steps/s ÷ peak"
              + (f" ({peak:g} TFLOP/s)" if peak else ": no MFU without a known peak (CPU, fp32 or an unknown GPU: "
                 "--peak-tflops)")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Quality study (--quality)
# ----------------------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
QUALITY_ROWS = [row for row in ROWS if row != "open_clip"]
NAMES = common.STUDY_NAMES  # row -> the name in the tables
STUDENTS = ("milan", "maskdistill")  # image-only students of the CLIP run of the same seed (--teacher)
EMA_ROWS = ("maskclip", "aclip", "aclip-eff", "silc", "silc-sigmoid")  # checkpoints with online and EMA weights
EVAL_TASKS = "zeroshot,knn,probe,segmentation"
# held-out metrics of the table and the plots (eval_zeroshot.py's names, built-in set)
METRICS = [("zeroshot_top1", "zero-shot top-1"), ("probe_top1", "linear probe top-1"), ("knn_top1", "k-NN top-1"),
           ("seg_colour_mIoU", "zero-shot segmentation, colour mIoU"),
           ("seg_fg_IoU", "zero-shot segmentation, foreground IoU")]
# What each paper says, as (row, metric, claim, axis, words); every row is compared with the CLIP baseline of the
# study, which is also the teacher of MILAN and MaskDistill. "above": the row's mean exceeds CLIP's by more than
# the spread; "not below": it is not below CLIP's by more than the spread. Axis "images": the final checkpoints
# (the same images seen); "time": the row's value at CLIP's training time, read off its curve.
CLAIMS = [
    ("aclip", "zeroshot_top1", "above", "images", "A-CLIP above CLIP on zero-shot at equal images"),
    ("aclip-eff", "zeroshot_top1", "above", "time", "A-CLIP-eff above CLIP on zero-shot at equal wall time"),
    ("maskclip", "probe_top1", "above", "images", "MaskCLIP above CLIP on the linear probe"),
    ("maskclip", "zeroshot_top1", "above", "images", "MaskCLIP above CLIP on zero-shot"),
    ("silc", "seg_colour_mIoU", "above", "images", "SILC-C above CLIP on zero-shot segmentation"),
    ("silc", "zeroshot_top1", "not below", "images", "SILC-C not below CLIP on zero-shot classification"),
    ("silc-sigmoid", "seg_colour_mIoU", "above", "images", "SILC-S above CLIP on zero-shot segmentation"),
    ("silc-sigmoid", "zeroshot_top1", "not below", "images", "SILC-S not below CLIP on zero-shot classification"),
    ("milan", "probe_top1", "not below", "images", "MILAN student at or above its teacher on the linear probe"),
    ("maskdistill", "probe_top1", "not below", "images",
     "MaskDistill student at or above its teacher on the linear probe"),
]
RUN_OVERHEAD_S = 20.0  # per training run, on top of its steps: start-up, the script's end-of-run evaluation, exports
LOOP_FACTOR = 1.5      # a training loop's time per step over the probe's (data worker, logging, checkpoints);
                       # measured: the committed 60-minute study's loops ran 1.49 x its probe (2,381 s for 1,594)


def quality_rows(args):
    """The study's rows, the CLIP baseline first (it is the students' teacher)."""
    if args.model not in common.MODELS:
        raise common.UsageError(f"--model {args.model} is not a model size; pick one of {', '.join(common.MODELS)}")
    methods = QUALITY_ROWS if args.methods == parse_args([]).methods else \
        [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in QUALITY_ROWS]
    if unknown or not methods:
        raise common.UsageError(f"--methods: {unknown[0] if unknown else '(none)'} is not a row of the quality study; "
                                f"pick from {','.join(QUALITY_ROWS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise common.UsageError("--device cuda was asked for but no GPU is visible; pass --device cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise common.UsageError("benchmark.py runs in one process: start it with python, not torchrun")
    writable_folder("--out-dir", args.out_dir)
    return [BASELINE] + [m for m in dict.fromkeys(methods) if m != BASELINE]


def study_args(args, seed):
    """The benchmark's arguments as script_args reads them for a row of the study: the demo's hyper-parameters."""
    return argparse.Namespace(**{**vars(args), "hparams": "demo", "seed": seed})


def launch(script, argv, log_path, env):
    """Run `python <script>.py argv` from the project's folder, its output to log_path; returns the exit status."""
    with open(log_path, "w") as log:
        return subprocess.run([sys.executable, os.path.join(HERE, f"{script}.py"), *argv], cwd=HERE, env=env,
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def child_env(args):
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def train_argv(row, args, seed, steps, run_dir, teacher):
    """The script and its command line for one run of the study: the row's flags, the study's one setting
    (model, batch, steps, training images), the seed, and checkpoints every steps/points steps."""
    script, flags, _ = ROWS[row]
    save_every = math.ceil(steps / args.points)
    argv = [f.format(teacher=teacher) for f in flags] + [
        "--model", args.model, "--batch-size", str(args.batch_size), "--steps", str(steps),
        "--builtin-samples", str(args.train_samples), "--seed", str(seed), "--out-dir", run_dir,
        "--save-every", str(save_every), "--eval-every", "0",
        "--device", args.device, "--precision", args.precision]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    elif args.device.startswith("cuda"):
        argv += ["--workers", str(min(8, os.cpu_count() or 1))]
    argv += ["--compile"] * args.compile + ["--grad-checkpointing"] * args.grad_checkpointing
    return script, argv


def eval_argv(path, args, out):
    workers = args.workers if args.workers is not None else 0 if args.device == "cpu" else min(8, os.cpu_count() or 1)
    return [path, "--tasks", EVAL_TASKS, "--builtin-samples", str(args.eval_samples), "--workers", str(workers),
            "--device", args.device, "--out", out]


class CheckpointKeeper(threading.Thread):
    """Keeps every checkpoint a run writes: the scripts replace checkpoint.pt by a rename at each --save-every
    step and at the end (common.save_atomic), and this thread hard-links each new file (a new inode) into
    `into` as it appears, polling every 20 ms. A checkpoint replaced within one poll would be missed; at the
    study's sizes saves are seconds apart. Falls back to a copy where hard links are not supported."""

    def __init__(self, run_dir, into):
        super().__init__(daemon=True)
        self.path, self.into, self.stop, self.kept, self.seen = os.path.join(run_dir, "checkpoint.pt"), into, \
            threading.Event(), [], None

    def poll(self):
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return
        if inode == self.seen:
            return
        link = os.path.join(self.into, f"point{len(self.kept)}.pt")
        try:
            os.link(self.path, link)
            inode = os.stat(link).st_ino  # the file linked: a newer one if checkpoint.pt was replaced meanwhile
        except FileNotFoundError:
            return
        except OSError:
            shutil.copyfile(self.path, link)
        self.seen = inode
        self.kept.append(link)

    def run(self):
        while not self.stop.wait(0.02):
            self.poll()
        self.poll()


def train_seconds(metrics_path, batch_size):
    """{step: seconds of the training loop up to that step} at the logged steps (every --log-every and the last),
    summed from the log lines of metrics.jsonl (each gives the images/s since the previous line); the loop's
    time, without start-up and the final evaluation."""
    seconds, total, last = {0: 0.0}, 0.0, 0
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "images_per_s" in record:
                total += (record["step"] - last) * batch_size / record["images_per_s"]
                last = record["step"]
                seconds[last] = total
    return seconds


def seconds_at(step, seconds):
    """The training time at `step`, interpolated between the logged steps of train_seconds."""
    return interpolate(sorted(seconds.items()), step)


def evaluate_checkpoint(path, args, out, env):
    """{weights: {metric: value}} of eval_zeroshot.py's built-in tasks on one checkpoint or export."""
    log = os.path.splitext(out)[0] + ".log"
    if launch("eval_zeroshot", eval_argv(path, args, out), log, env):
        raise SystemExit(f"error: eval_zeroshot.py failed on {path}: {last_line(log)} (log: {log})")
    with open(out) as f:
        return {tower: r["builtin"] for tower, r in json.load(f)["results"].items()}


def last_line(path):
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return next((line for line in reversed(lines) if line.startswith("error")), lines[-1] if lines else "(no output)")


def write_untrained(path, args, seed):
    """The CLIP baseline's model as its train() initialises it for `seed` (random weights), written as
    maskclip.py exports its online weights."""
    mod, margs = script_args(BASELINE, study_args(args, seed), None)
    cfg = mod.model_config(margs)
    torch.manual_seed(seed)
    random.seed(seed)
    clip, _ = mod.build_model(cfg, margs)
    online = mod.export_state_dicts(clip.state_dict(), None)["online"]
    common.export_weights(path, online, cfg, norm=margs.norm, method=mod.METHOD, weights="online")


def probe_step_seconds(rows, args, device):
    """Seconds per training step of each row at the study's setting, in this process (the speed benchmark's
    MethodRow: the script's own train_one_step on one batch; one warm-up step, two timed)."""
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        ns = study_args(args, args.seed)
        teacher = write_teacher(folder, ns) if set(STUDENTS) & set(rows) else None
        for row in rows:
            mod, margs = script_args(row, ns, teacher)
            runner = MethodRow(mod, margs, make_batch(mod, margs, mod.model_config(margs), device), device)
            runner.step(1)
            sync(device)
            t0 = time.perf_counter()
            for step in (2, 3):
                runner.step(step)
            sync(device)
            out[row] = (time.perf_counter() - t0) / 2
            print(f"probe {row}: {1000 * out[row]:.0f} ms/step", file=sys.stderr, flush=True)
            del runner
    return out


def size_study(args, rows, step_s, eval_s, spent_s):
    """The steps of every run that fit the --quality budget: (budget - what is spent - per-run overheads -
    evaluations) / (seeds × the rows' seconds per step × LOOP_FACTOR), a multiple of --points."""
    evals = args.seeds * args.points * sum(2 if row in EMA_ROWS else 1 for row in rows)
    fixed = args.seeds * len(rows) * RUN_OVERHEAD_S + evals * eval_s
    per_step = args.seeds * sum(step_s.values()) * LOOP_FACTOR
    budget = 60 * args.quality
    steps = int((budget - spent_s - fixed) / per_step) // args.points * args.points
    if steps < args.points:
        need = (spent_s + fixed + args.points * per_step) / 60
        raise common.UsageError(f"--quality {args.quality:g}: at this size the study needs at least {need:.0f} "
                                f"minutes ({evals} evaluations of {eval_s:.0f} s, {args.seeds * len(rows)} runs); "
                                f"give more minutes, fewer --seeds or --points, or --study-steps")
    return steps, {"budget_s": budget, "spent_before_runs_s": spent_s, "step_s": step_s, "eval_s": eval_s,
                   "evaluations": evals, "fixed_s": fixed, "train_s": steps * per_step,
                   "predicted_total_s": spent_s + fixed + steps * per_step}


def train_and_evaluate(row, args, seed, steps, run_dir, teacher, env):
    """One training run through the script's command line, then eval_zeroshot.py on each kept checkpoint.
    Returns {argv, wall_s, train_s, points: [{step, images, seconds, metrics: {weights: {metric: value}}}]}."""
    script, argv = train_argv(row, args, seed, steps, run_dir, teacher)
    done = os.path.join(run_dir, "result.json")
    if os.path.isfile(done):  # a finished run of the same command (a study that was interrupted and restarted)
        with open(done) as f:
            result = json.load(f)
        if result.get("argv") == [script, *argv]:
            print(f"{row} seed {seed}: reusing {done}", file=sys.stderr, flush=True)
            return result
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    points_dir = os.path.join(run_dir, "points")
    os.makedirs(points_dir)
    print(f"{row} seed {seed}: python {script}.py {' '.join(argv)}", file=sys.stderr, flush=True)
    keeper = CheckpointKeeper(run_dir, points_dir)
    keeper.start()
    t0 = time.perf_counter()
    try:
        rc = launch(script, argv, os.path.join(run_dir, "train.log"), env)
    finally:
        keeper.stop.set()
        keeper.join()
    wall = time.perf_counter() - t0
    if rc:
        log = os.path.join(run_dir, "train.log")
        raise SystemExit(f"error: {script}.py ({row}, seed {seed}) exited {rc}: {last_line(log)} (log: {log})")
    seconds = train_seconds(os.path.join(run_dir, "metrics.jsonl"), args.batch_size)
    points = {}
    for link in keeper.kept:
        step = int(torch.load(link, map_location="cpu", weights_only=True, mmap=True)["step"])
        if step not in points:
            out = os.path.join(points_dir, f"eval_step{step}.json")
            metrics = evaluate_checkpoint(link, args, out, env)
            points[step] = {"step": step, "images": step * args.batch_size, "seconds": seconds_at(step, seconds),
                            "metrics": metrics}
        os.remove(link)  # checkpoint.pt (the last) stays
    if steps not in points:
        raise SystemExit(f"error: {script}.py ({row}, seed {seed}) left no final checkpoint in {run_dir}")
    result = {"argv": [script, *argv], "wall_s": wall, "train_s": seconds[steps],
              "points": [points[k] for k in sorted(points)]}
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    return result


def primary(metrics):
    """The weights a row is judged by: the online weights (or the student, or the only weights in the file)."""
    return metrics.get("online") or metrics.get("student") or next(iter(metrics.values()))


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values), "values": values}


def summarise(runs, seeds):
    """Per row, per step: the mean, min, max and std over seeds of images seen, training seconds and every
    metric of the primary weights (the other weights, e.g. EMA, are in the runs' entries)."""
    out = {}
    for row, by_seed in runs.items():
        steps = sorted({p["step"] for s in seeds for p in by_seed[s]["points"]})
        rows = []
        for step in steps:
            at = [p for s in seeds for p in by_seed[s]["points"] if p["step"] == step]
            names = dict.fromkeys(k for p in at for k in primary(p["metrics"]))
            rows.append({"step": step, "images": at[0]["images"], "seconds": stats([p["seconds"] for p in at]),
                         "metrics": {k: stats([primary(p["metrics"]).get(k) for p in at]) for k in names}})
        out[row] = {"points": rows, "wall_s": stats([by_seed[s]["wall_s"] for s in seeds])}
    return out


def interpolate(curve, x):
    """Linear interpolation over (x, y) points sorted by x (a metric over training seconds, seconds over
    steps); past the last point, the last y (the run had ended there)."""
    (x0, y0) = curve[0]
    for x1, y1 in curve[1:]:
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
        x0, y0 = x1, y1
    return y0


def judge(claim, diff, spread):
    if claim == "above":
        return "confirmed" if diff > spread else "reversed" if diff < -spread else "not seen (within noise)"
    return "reversed" if diff < -spread else "confirmed"  # "not below": within the noise is not below


def verdicts(runs, untrained, seeds):
    """One entry per CLAIMS line whose rows ran: both rows' values per seed, the difference of the means and the
    spread, the larger of the two rows' ranges (max - min over seeds); a difference within the spread is no
    difference."""
    out = []
    base = runs.get(BASELINE)
    for row, metric, claim, axis, words in CLAIMS:
        if row not in runs or base is None:
            continue
        final = {s: primary(base[s]["points"][-1]["metrics"]).get(metric) for s in seeds}
        if axis == "images":
            mine = {s: primary(runs[row][s]["points"][-1]["metrics"]).get(metric) for s in seeds}
        else:  # the row's value when CLIP's run ended, its curve starting from the untrained model at 0 s
            mine = {}
            for s in seeds:
                curve = [(0.0, primary(untrained[s]).get(metric))] + [
                    (p["seconds"], primary(p["metrics"]).get(metric)) for p in runs[row][s]["points"]]
                mine[s] = interpolate(curve, base[s]["train_s"]) if all(v is not None for _, v in curve) else None
        if None in final.values() or None in mine.values():
            continue
        a, b = list(mine.values()), list(final.values())
        diff = statistics.fmean(a) - statistics.fmean(b)
        spread = max(max(a) - min(a), max(b) - min(b))
        entry = {"claim": words, "row": row, "baseline": BASELINE, "metric": metric, "direction": claim,
                 "axis": axis, "row_values": a, "baseline_values": b, "difference": diff, "spread": spread,
                 "verdict": judge(claim, diff, spread)}
        if axis == "time":
            entry["time_ratio"] = statistics.fmean(runs[row][s]["train_s"] / base[s]["train_s"] for s in seeds)
        out.append(entry)
    return out


def fmt_stat(st, digits=1):
    if st is None:
        return "-"
    if st["n"] == 1:
        return f"{st['mean']:.{digits}f}"
    return f"{st['mean']:.{digits}f} ({st['min']:.{digits}f}–{st['max']:.{digits}f})"


def quality_markdown(report):
    info, summary = report["info"], report["summary"]
    lines = ["# Quality study", "",
             f"`{info['command']}`", "",
             f"{info['device']}; torch {info['torch']}; model {info['model']} ({info['image_size']} px, patch "
             f"{info['patch_size']}), batch {info['batch_size']}, {info['steps']} steps = {info['images']} images "
             f"seen per run, {len(info['seeds'])} seeds ({', '.join(map(str, info['seeds']))}), each method's demo "
             f"hyper-parameters; evaluation on {info['eval_samples']} held-out built-in images (eval_zeroshot.py: "
             f"zero-shot top-1, linear probe, k-NN, zero-shot segmentation); study wall time "
             f"{info['wall_s'] / 60:.1f} min.", "",
             "Each cell: mean over seeds (min–max). Final checkpoints: the same images seen by every row. "
             "Training time: the training loop's wall time (without start-up and evaluation). MILAN and MaskDistill "
             "are image-only students of the CLIP run of the same seed: their teacher's numbers are CLIP's.", ""]
    head = ["method", "images seen", "training time (s)"] + [label for _, label in METRICS]
    lines += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    u = report["untrained"]
    lines.append("| untrained CLIP (random init) | 0 | 0 | " + " | ".join(
        fmt_stat(stats([primary(u[s]).get(k) for s in u])) for k, _ in METRICS) + " |")
    for row, r in summary.items():
        last = r["points"][-1]
        cells = []
        for k, _ in METRICS:
            cell = fmt_stat(last["metrics"].get(k))
            if row in STUDENTS and k in ("probe_top1", "knn_top1") and BASELINE in summary:
                cell += f" [teacher {fmt_stat(summary[BASELINE]['points'][-1]['metrics'].get(k))}]"
            cells.append(cell)
        lines.append(f"| {NAMES[row]} | {last['images']} | {fmt_stat(last['seconds'], 0)} | " + " | ".join(cells)
                     + " |")
    if report["verdicts"]:
        lines += ["", "## What the papers say, and what this study sees", "",
                  "Difference: the row's mean minus CLIP's; spread: the larger of the two rows' min–max over seeds. "
                  "A difference within the spread is no difference" + (" (one seed: no spread, so every difference "
                  "counts; run --seeds 2 or more)" if len(info["seeds"]) < 2 else "") + ".", "",
                  "| claim | metric | axis | difference | spread | verdict |", "|---|---|---|---:|---:|---|"]
        for v in report["verdicts"]:
            axis = v["axis"] if v["axis"] != "time" else f"time (its time {v['time_ratio']:.2f} × CLIP's)"
            lines.append(f"| {v['claim']} | {v['metric']} | {axis} | {v['difference']:+.1f} | {v['spread']:.1f} | "
                         f"{v['verdict']} |")
    lines += ["", "## Curves (mean over seeds at each evaluated checkpoint)", "",
              "| method | step | images | seconds | " + " | ".join(label for _, label in METRICS) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(METRICS)]
    for row, r in summary.items():
        for p in r["points"]:
            lines.append(f"| {NAMES[row]} | {p['step']} | {p['images']} | {fmt_stat(p['seconds'], 0)} | " +
                         " | ".join(fmt_stat(p["metrics"].get(k)) for k, _ in METRICS) + " |")
    if report.get("plots_note"):
        lines += ["", report["plots_note"]]
    return "\n".join(lines) + "\n"


def quality_plots(report, folder):
    """PNG plots of each held-out metric against images seen and against training time, one line per method
    (the mean over seeds, the min–max band shaded), the untrained model at 0. Returns (files, note)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (pip install matplotlib, then run the study again: " \
                   "finished runs are reused)."
    files, u = [], report["untrained"]
    for key, label in METRICS:
        for axis, xlabel in (("images", "images seen"), ("seconds", "training time (s)")):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            start = stats([primary(u[s]).get(key) for s in u])
            for row, r in report["summary"].items():
                pts = [p for p in r["points"] if p["metrics"].get(key)]
                if not pts:
                    continue
                first = [start] if start and row not in STUDENTS else []  # the untrained CLIP: the CLIP rows' 0
                xs = [0] * len(first) + [p["images"] if axis == "images" else p["seconds"]["mean"] for p in pts]
                st = first + [p["metrics"][key] for p in pts]
                ax.plot(xs, [s["mean"] for s in st], marker="o", label=NAMES[row])
                ax.fill_between(xs, [s["min"] for s in st], [s["max"] for s in st], alpha=0.15)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{label} (%)")
            info = report["info"]
            ax.set_title(f"{info['model']}, batch {info['batch_size']}, {len(info['seeds'])} seeds: mean, min–max",
                         fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            path = os.path.join(folder, f"{key}_vs_{'images' if axis == 'images' else 'time'}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            files.append(path)
    return files, None


def run_quality(args, command):
    """The quality study: untrained model, timing probe (unless --study-steps), the runs (seed by seed, the CLIP
    baseline first), the evaluations, then quality.json, quality.md and the plots in --out-dir."""
    start = time.perf_counter()
    rows = quality_rows(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = child_env(args)
    seeds = [args.seed + k for k in range(args.seeds)]
    out_dir = os.path.abspath(args.out_dir)
    untrained = {}
    t0 = time.perf_counter()
    for seed in seeds:
        folder = os.path.join(out_dir, "untrained", f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "export_online.pt")
        write_untrained(path, args, seed)
        untrained[seed] = evaluate_checkpoint(path, args, os.path.join(folder, "eval.json"), env)
    eval_s = (time.perf_counter() - t0) / len(seeds)
    estimate = None
    steps = args.study_steps
    if steps is None:  # sized once: the same command run again reads plan.json, so that its runs are reused
        plan_path = os.path.join(out_dir, "plan.json")
        key = {k: v for k, v in vars(args).items() if k not in ("json", "out_dir")} | {"rows": rows}
        plan = None
        if os.path.isfile(plan_path):
            with open(plan_path) as f:
                plan = json.load(f)
        if plan is not None and plan.get("key") == json.loads(json.dumps(key)):
            steps, estimate = plan["steps"], plan["estimate"]
        else:
            _, _, device = common.setup_distributed(args.device)
            step_s = probe_step_seconds(rows, args, device)
            steps, estimate = size_study(args, rows, step_s, eval_s, time.perf_counter() - start)
            with open(plan_path, "w") as f:
                json.dump({"key": key, "steps": steps, "estimate": estimate}, f, indent=1)
        print(f"quality study: {steps} steps of batch {args.batch_size} per run ({steps * args.batch_size} images), "
              f"{len(rows)} rows × {len(seeds)} seeds; predicted {estimate['predicted_total_s'] / 60:.0f} of "
              f"{args.quality:g} minutes", file=sys.stderr, flush=True)
    runs = {row: {} for row in rows}
    for seed in seeds:
        for row in rows:
            run_dir = os.path.join(out_dir, row, f"seed{seed}")
            teacher = os.path.join(out_dir, BASELINE, f"seed{seed}", "export_online.pt") if row in STUDENTS else None
            runs[row][seed] = train_and_evaluate(row, args, seed, steps, run_dir, teacher, env)
    cfg = common.MODELS[args.model]
    info = {"command": command, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else
            cpu_name(), "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
            "model": args.model, "image_size": cfg["image_size"], "patch_size": cfg["patch_size"],
            "batch_size": args.batch_size, "steps": steps, "images": steps * args.batch_size, "seeds": seeds,
            "points": args.points, "eval_samples": args.eval_samples, "train_samples": args.train_samples,
            "precision": args.precision, "budget_minutes": args.quality, "estimate": estimate,
            "wall_s": time.perf_counter() - start}
    report = {"info": info, "rows": {row: {"script": ROWS[row][0], "flags": ROWS[row][1], "name": NAMES[row],
                                           "seeds": {str(s): r for s, r in by_seed.items()}}
                                     for row, by_seed in runs.items()},
              "untrained": untrained, "summary": summarise(runs, seeds), "verdicts": verdicts(runs, untrained, seeds)}
    report["plots"], report["plots_note"] = quality_plots(report, out_dir)
    json_path = args.json or os.path.join(out_dir, "quality.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    md_path = os.path.join(out_dir, "quality.md")
    with open(md_path, "w") as f:
        f.write(quality_markdown(report))
    print(quality_markdown(report))
    print(f"results: {json_path}, {md_path}" + (f", {len(report['plots'])} plots in {out_dir}" if report["plots"]
                                                 else ""))


def main(argv=None):
    args = parse_args(argv)
    try:
        command = " ".join(["python benchmark.py", *(sys.argv[1:] if argv is None else argv)])
        (run if args.quality is None else run_quality)(args, command)
    except common.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, command):
    rows = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, _, device = common.setup_distributed(args.device)
    peak = peak_tflops(args, device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": args.model, "batch_size": args.batch_size, "precision": args.precision,
            "hparams": args.hparams if args.hparams != "auto" else ("demo" if args.model == "tiny" else "recipe"),
            "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "compile": args.compile,
            "peak_tflops": peak, "command": command}
    with tempfile.TemporaryDirectory() as folder:
        teacher = write_teacher(folder, args) if {"milan", "maskdistill"} & set(rows) else None
        results = run_rows(rows, args, device, teacher)
    data = data_rows(args, device, args.data_samples) if args.data_samples else {}
    mod, margs = script_args(BASELINE, args, None)
    analytic = analytic_clip_flops(mod.model_config(margs), args.batch_size)
    info["clip_forward_flops"] = {"counted": results[BASELINE]["trained_flops"] + results[BASELINE]["frozen_flops"],
                                  "analytic": analytic}
    print(report(info, results, data, peak))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": results, "data": data}, f, indent=1)


if __name__ == "__main__":
    main()
