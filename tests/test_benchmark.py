"""benchmark.py: the real CLI over a few rows (table and JSON), the FLOP count against the analytic formula
and the published ViT-B/16 figure, the trained / frozen split of the FLOPs, the peak-RSS reset, one-line
errors. No timing is asserted."""
import json
import math
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, run_cli, run_clis

import benchmark
import common


def test_cli_runs_rows_and_writes_numbers(tmp_path):
    rows = ["clip", "aclip-eff", "maskdistill"] + (["open_clip"] if benchmark.open_clip_module() else [])
    out = tmp_path / "bench.json"
    proc = run_cli("benchmark.py", "--methods", ",".join(rows[1:]), "--batch-size", 4, "--warmup", 1, "--steps", 1,
                   "--rounds", 1, "--data-samples", 4, "--threads", 1, "--json", out)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in table]
    for row in rows:  # the CLIP baseline runs although --methods did not name it
        assert row in names, proc.stdout
    assert "tar shards" in proc.stdout and "built-in shapes" in proc.stdout
    assert ("our CLIP baseline / open_clip" in proc.stdout) == ("open_clip" in rows)
    result = json.loads(out.read_text())
    assert list(result["rows"]) == rows
    for row, r in result["rows"].items():
        for key in ("images_per_s", "ms_per_step", "relative_time", "model_flops", "tflops_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (row, key, r[key])
        assert r["peak_bytes"] > 0
    assert result["rows"]["clip"]["relative_time"] == 1.0
    assert result["rows"]["aclip-eff"]["paper_ratio"] == 0.86
    assert result["rows"]["maskdistill"]["frozen_flops"] > 0  # the frozen teacher's forward
    assert result["info"]["clip_forward_flops"]["counted"] == pytest.approx(
        result["info"]["clip_forward_flops"]["analytic"], rel=0.02)
    for d in result["data"].values():
        assert d["images_per_s"] > 0


def test_profile_writes_the_operator_table_and_a_trace(tmp_path):
    proc = run_cli("benchmark.py", "--methods", "clip", "--batch-size", 4, "--warmup", 1, "--steps", 1, "--rounds", 1,
                   "--data-samples", 0, "--threads", 1, "--profile", tmp_path / "prof", "--json", tmp_path / "b.json")
    text = (tmp_path / "prof" / "clip.txt").read_text()
    assert text.startswith("clip: 1 steps profiled") and "aten::mm" in text and "Self CPU" in text, text
    trace = json.loads((tmp_path / "prof" / "clip.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert json.loads((tmp_path / "b.json").read_text())["rows"]["clip"]["profile"]["ms_per_step"] > 0
    assert "steps profiled" in proc.stderr


def test_union_length_counts_overlaps_once():
    assert benchmark.union_length([]) == 0
    assert benchmark.union_length([(5, 7), (0, 2), (1, 3), (6, 6.5), (10, 11)]) == 3 + 2 + 1
    assert benchmark.union_length([(0, 10), (2, 3)]) == 10


def tiny_row(row, world1, batch=4):
    args = benchmark.parse_args(["--batch-size", str(batch), "--device", "cpu"])
    mod, margs = benchmark.script_args(row, args, None)
    cfg = mod.model_config(margs)
    device = torch.device("cpu")
    return mod, margs, cfg, benchmark.MethodRow(mod, margs, benchmark.make_batch(mod, margs, cfg, device), device)


def test_clip_flops_match_the_analytic_formula(world1):
    mod, margs, cfg, runner = tiny_row("clip", world1, batch=6)
    flops = runner.count_flops(0)
    assert flops.frozen == 0
    assert flops.trained == pytest.approx(benchmark.analytic_clip_flops(cfg, 6), rel=0.02)
    assert flops.model_flops == 3 * flops.trained


def test_analytic_formula_gives_the_published_vit_b16_figure():
    """open_clip's docs/model_profile.csv: ViT-B-16 35.13 image + 5.96 text = 41.09 GFLOPs per pair."""
    cfg = common.MODELS["ViT-B/16"]
    per_pair = benchmark.analytic_clip_flops(cfg, 1) - 4 * cfg["embed_dim"]  # without the 1 × 1 logits
    assert per_pair / 1e9 == pytest.approx(41.09, abs=0.01)


def test_maskclip_teacher_flops_are_counted_once(world1):
    """The EMA teacher's forward (full image + quantizer on every patch) is the frozen part, exactly."""
    mod, margs, cfg, runner = tiny_row("maskclip", world1, batch=4)
    flops = runner.count_flops(0)
    n, d, p = (cfg["image_size"] // cfg["patch_size"]) ** 2, cfg["width"], cfg["patch_size"]
    tower = 2 * n * 3 * p * p * d + cfg["layers"] * (24 * (n + 1) * d * d + 4 * (n + 1) ** 2 * d)
    quantizer = 2 * n * d * margs.quant_k
    assert flops.frozen == 4 * (tower + quantizer)
    assert flops.trained > benchmark.analytic_clip_flops(cfg, 4)  # CLIP + the masked and MLM branches


# Operators that make the host wait for the device on a GPU: .item()/int()/bool() of a tensor, the
# operators whose output size depends on the data, and torch.tensor(host data) (lift_fresh), which on a GPU
# is a blocking copy.
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "repeat_interleave", "lift_fresh"}
HOST_SIDE = {("maskclip.py", "mlm_masking")}  # runs on the loader's host batch, before it moves to the device


class SyncOps(TorchDispatchMode):
    """Records (file, function, operator) of every SYNC_OPS operator, by the innermost project frame."""

    def __init__(self):
        super().__init__()
        self.found = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func._schema.name.split("::")[-1]
        if op in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            op = "boolean-mask indexing"  # a data-dependent size: a nonzero() inside the kernel
        if op in SYNC_OPS or op == "boolean-mask indexing":
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(ROOT) and "tests" not in f.filename]
            where = (os.path.basename(frames[-1].filename), frames[-1].name) if frames else ("?", "?")
            self.found.add((*where, op))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("row", ["clip", "maskclip", "aclip", "aclip-eff", "silc", "silc-sigmoid", "milan",
                                 "maskdistill"])
def test_training_step_has_no_host_syncs(row, world1, tmp_path):
    """The whole step, the script's train_one_step (train_step, backward, optimiser, after_step), runs no
    operator that would make the host wait for a GPU, except on the host's own batch."""
    args = benchmark.parse_args(["--batch-size", "4", "--device", "cpu"])
    teacher = benchmark.write_teacher(str(tmp_path), args) if row in ("milan", "maskdistill") else None
    mod, margs = benchmark.script_args(row, args, teacher)
    device = torch.device("cpu")
    runner = benchmark.MethodRow(mod, margs, benchmark.make_batch(mod, margs, mod.model_config(margs), device), device)
    runner.step(1)
    recorder = SyncOps()
    with recorder:
        metrics = mod.train_one_step(runner.forward, runner.model, runner.teacher, runner.batch, runner.optimizer,
                                     runner.scaler, 2, mod.Schedule(100, 10, 50), margs, device)
    assert {f for f in recorder.found if f[:2] not in HOST_SIDE} == set()
    assert list(metrics)[0] == "loss" and all(torch.isfinite(v) for v in metrics.values())


def test_sync_recorder_sees_item_and_boolean_masks():
    recorder = SyncOps()
    x = torch.randn(5)
    with recorder:
        x.sum().item()
        x[x > 0]
        x[x > 0] = 0
        x.nonzero()
        torch.tensor(1.0)
    assert {op for *_, op in recorder.found} == {"_local_scalar_dense", "boolean-mask indexing", "nonzero",
                                                 "lift_fresh"}


def test_peak_rss_is_reset():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("no /proc/self/clear_refs")
    cpu = torch.device("cpu")
    benchmark.reset_peak_memory(cpu)
    before = benchmark.peak_memory(cpu)
    x = torch.ones(64 << 20)  # 256 MiB, touched
    high = benchmark.peak_memory(cpu)
    assert high - before >= 200 << 20
    del x
    benchmark.reset_peak_memory(cpu)
    assert benchmark.peak_memory(cpu) < high - (200 << 20)


BAD_INPUT = [  # flags, the words of the one error line
    (["--methods", "clip,bogus"], "--methods: unknown row bogus"),
    (["--model", "ViT-Z"], "--model ViT-Z is not a model size"),
    (["--steps", "0"], "argument --steps: got 0; give an integer >= 1"),
    (["--json", "/nonexistent-folder/bench.json"], "--json /nonexistent-folder/bench.json: cannot write"),
    (["--profile", os.path.join(ROOT, "README.md")], "cannot make that folder"),
]


def test_bad_input_is_one_line():
    procs = run_clis([("benchmark.py", *flags) for flags, _ in BAD_INPUT], check=False)
    for (flags, message), proc in zip(BAD_INPUT, procs):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flags, proc.stderr)
        assert message in lines[0], (flags, lines[0])
