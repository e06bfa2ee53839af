"""The variant matrix: every choice of every choice flag and every switch that a method script defines runs
for three optimiser steps through the DDP-wrapped train_one_step the loop uses (so that a parameter built but
left without a gradient stops the run, as DDP does at step 2), and each changes the losses of those steps
against the same flags without it (a flag that leaves them bit-identical is dead)."""
import argparse
import importlib
import math
import random

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from conftest import PRESENT

import common

CPU = torch.device("cpu")
SIZES = ["--model", "tiny", "--workers", "0", "--batch-size", "4", "--builtin-samples", "8", "--eval-every", "0"]
BASE = {
    "maskclip": ["--quant-k", "16", "--dec-width", "64", "--dec-heads", "1", "--text-dec-depth", "1"],
    "aclip": ["--ssl-hidden", "32", "--ssl-dim", "16"],
    "silc": ["--n-local", "2", "--out-dim", "32", "--head-hidden", "32", "--head-bottleneck", "16"],
    "milan": ["--dec-width", "32", "--dec-depth", "1", "--dec-heads", "2", "--knn-samples", "64"],
    "maskdistill": ["--knn-samples", "64"],
}
# Flags that change what a run writes or how it is read, not what it computes.
NOT_VARIANTS = {"--save-masks"}
# A variant that needs other flags to be valid: (flag, value) -> companions, given to both runs compared.
COMPANIONS = {
    ("silc", "--seg-readout", "map_value"): ["--pool", "map"],
    ("aclip", "--views", "1"): ["--loss-weights", "1", "0", "0", "2"],
}
# Choices equal to what the default resolves to here (the tiny teacher file is a QuickGELU CLIP with CLIP's
# normalisation; --pool auto is cls for the softmax loss; --loss-on's default is all for --target clip):
# they run, and must compute exactly the default's losses.
RESOLVED_DEFAULT = {("milan", "--teacher-act", "quickgelu"), ("maskdistill", "--teacher-act", "quickgelu"),
                    ("maskdistill", "--teacher-norm", "clip"), ("silc", "--pool", "cls"), ("milan", "--loss-on", "all")}
# Flags of the evaluation readout: they must change the dense features, not the training losses.
READOUT = {("silc", "--seg-readout")}
# Documented variants that are not a single flag: the CLIP baseline rows and the headline ablations.
EXTRA = {
    "maskclip": [["--dist-weight", "0", "--mlm-weight", "0"], ["--dist-weight", "0"], ["--mlm-weight", "0"]],
    "aclip": [["--mask", "none", "--views", "1", "--loss-weights", "1", "0", "0", "0"]],
    "silc": [["--lambda-sd", "0"], ["--freeze-last-layer-steps", "2"], ["--loss", "sigmoid", "--pool", "cls"]],
    "milan": [["--target", "pixels", "--mask", "random", "--decoder", "mae"]],
    "maskdistill": [],
}


def tiny_teacher(path):
    """A tiny OpenAI-layout CLIP state dict: the frozen teacher of MILAN and MaskDistill."""
    mod = importlib.import_module("maskclip")
    torch.manual_seed(0)
    torch.save(mod.CLIP(**dict(common.MODELS["tiny"], act="quickgelu")).state_dict(), path)
    return str(path)


def method_actions(mod):
    """The flags add_method_args defines (not the shared ones of common.make_parser)."""
    p = common.make_parser("", mod.METHOD, mod.DATA_KIND)
    shared = set(p._option_string_actions)
    mod.add_method_args(p)
    return [a for s, a in p._option_string_actions.items() if s not in shared and s.startswith("--")
            and not s.startswith("--no-")]


def variants(script):
    """[flags] for every non-default choice and every switch flipped, plus the documented combinations."""
    mod = importlib.import_module(script)
    defaults = mod.parse_args(SIZES + BASE[script])
    out = []
    for a in method_actions(mod):
        flag, default = a.option_strings[0], getattr(defaults, a.dest)
        if flag in NOT_VARIANTS:
            continue
        if isinstance(a, argparse.BooleanOptionalAction):
            values = [[f"--no-{flag[2:]}" if default else flag]]
        elif isinstance(a, argparse._StoreTrueAction):
            values = [[flag]]
        elif a.choices:
            values = [[flag, str(c)] for c in a.choices if c != default]
        else:
            continue
        for v in values:
            out.append((v, COMPANIONS.get((script, *v), [])))
    return out + [(v, []) for v in EXTRA[script]]


MATRIX = [(s, v, base) for s in PRESENT for v, base in variants(s)]


def three_steps(script, flags, teacher):
    """The losses of the first three optimiser steps, as the loop runs them (DDP in a world of one), and
    the model's dense features of a fixed input after them (for readout flags)."""
    mod = importlib.import_module(script)
    args = mod.parse_args(SIZES + BASE[script] + (["--teacher", teacher] if script in ("milan", "maskdistill")
                                                  else []) + flags)
    torch.manual_seed(0)
    random.seed(0)
    cfg = mod.model_config(args)
    model, teacher = mod.build_model(cfg, args)
    data = common.train_loader(args, transform=mod.train_transform(args, cfg), kind=mod.DATA_KIND, rank=0,
                               world_size=1)
    sched = mod.Schedule(total=3, warmup=0, steps_per_epoch=data.steps_per_epoch)
    optimizer = mod.make_optimizer(model, args, CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ddp = DistributedDataParallel(model)
    torch.manual_seed(1)
    batches = data.batches(0)
    losses = []
    for step in range(3):
        batch = next(batches, None) or next(data.batches(1))
        metrics = mod.train_one_step(ddp, model, teacher, batch, optimizer, scaler, step, sched, args, CPU)
        losses.append(metrics["loss"].item())
    assert all(math.isfinite(v) for v in losses), (script, flags, losses)
    dense = None
    if hasattr(model, "encode_dense"):
        with torch.no_grad():
            dense = model.eval().encode_dense(torch.randn(2, 3, cfg["image_size"], cfg["image_size"],
                                                          generator=torch.Generator().manual_seed(0)))
    return losses, dense


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "clip.pt")


@pytest.fixture(scope="module")
def baselines():
    return {}


def test_the_matrix_covers_the_documented_switches():
    """The enumeration finds what it should: e.g. MaskCLIP's --masked-encoding, A-CLIP's --eff."""
    flat = {(s, f) for s, v, _ in MATRIX for f in v}
    for s, f in [("maskclip", "--masked-encoding"), ("aclip", "--eff"), ("aclip", "--no-three-crop-fix"),
                 ("silc", "--loss"), ("milan", "--mask"), ("maskdistill", "--loss")]:
        assert s not in PRESENT or (s, f) in flat, (s, f)


@pytest.mark.parametrize("script,flags,base", MATRIX, ids=[f"{s}:{' '.join(v)}" for s, v, _ in MATRIX])
def test_variant_runs_three_ddp_steps_and_changes_the_loss(world1, teacher, baselines, script, flags, base):
    key = (script, *base)
    if key not in baselines:
        baselines[key] = three_steps(script, base, teacher)
    (ref, ref_dense), (losses, dense) = baselines[key], three_steps(script, base + flags, teacher)
    what = f"{script} {' '.join(flags)}" + (f" (with {' '.join(base)})" if base else "")
    if (script, *flags) in RESOLVED_DEFAULT:
        assert losses == ref, f"{what} is the resolved default, yet computes {losses}, not {ref}"
    elif (script, flags[0]) in READOUT:
        assert losses == ref and not torch.equal(dense, ref_dense), f"{what} does not change the dense readout"
    else:
        assert losses != ref, f"{what} computes the losses without it: {losses}"
