"""Reliability of a run, through the real command line: the non-finite guard (no checkpoint ever holds a NaN
or an inf; fp16's skipped steps are not errors), the out-dir lock (one run per folder; a dead owner's lock
and half-written files do not block), --resume auto and a real torchrun restart, start-up errors that
train nothing and lose nothing, and the count of unreadable samples (each bad file once).

Failures are injected by a wrapper written into the test's folder, which imports maskclip, replaces its
train_step / train_one_step hooks (and, to save time, `evaluate`, which runs after the last checkpoint) in
that process only and calls maskclip.main with the command line: nothing in the repository carries a test
hook."""
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time

import torch
from PIL import Image

from conftest import ROOT, run_cli

import common

TINY = ["--model", "tiny", "--workers", "0", "--batch-size", "8", "--builtin-samples", "32", "--quant-k", "16",
        "--dec-width", "64", "--dec-heads", "1", "--text-dec-depth", "1", "--log-every", "1", "--eval-every", "0"]
CLIP = [*TINY, "--dist-weight", "0", "--mlm-weight", "0"]  # the CLIP baseline: cheaper, where the method is moot
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")

WRAPPER = """import os, sys
sys.path.insert(0, {root!r})
import maskclip

INF_AT, FAIL_AT = (int(os.environ.get(k, "-1")) for k in ("TEST_INF_LOSS_AT", "TEST_FAIL_AT"))
train_step, train_one_step = maskclip.train_step, maskclip.train_one_step


def poisoned_step(ddp, model, teacher, batch, step, sched, args, device):
    loss, metrics = train_step(ddp, model, teacher, batch, step, sched, args, device)
    return (loss * float("inf") if step == INF_AT else loss), metrics


def failing_step(ddp, model, teacher, batch, optimizer, scaler, step, sched, args, device):
    if step == FAIL_AT and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        raise RuntimeError(f"injected failure in step {{step + 1}} of the first round")
    return train_one_step(ddp, model, teacher, batch, optimizer, scaler, step, sched, args, device)


maskclip.train_step, maskclip.train_one_step = poisoned_step, failing_step
if os.environ.get("TEST_NO_EVAL"):  # the held-out evaluation after the last checkpoint: time these tests skip
    maskclip.evaluate = lambda model, teacher, args, device: {{}}
maskclip.main(sys.argv[1:])
"""


def wrapper(tmp_path):
    path = tmp_path / "wrapped_maskclip.py"
    path.write_text(WRAPPER.format(root=ROOT))
    return str(path)


def error_line(proc):
    """The last line of stderr (the progress bar ends its own line before an error)."""
    return proc.stderr.strip().splitlines()[-1]


def load(path):
    return torch.load(path, weights_only=True)


def nonfinite(ckpt):
    return int(common.count_nonfinite(common._tensors([ckpt["model"], ckpt["teacher"] or {},
                                                       ckpt["optimizer"]["state"]])))


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def lock_owner(folder):
    try:
        return json.loads((folder / "run.lock").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- non-finite guard
def test_diverging_run_never_saves_a_non_finite_checkpoint(tmp_path):
    """The issue's run: lr 1e12 turns the weights into NaN within a few steps. The guard, checked before every
    save (every 5 steps) and not only at the log steps (every 20), stops it naming what it kept."""
    out = tmp_path / "nan"
    proc = run_cli("maskclip.py", *TINY, "--lr", "1e12", "--steps", "30", "--save-every", "5", "--log-every", "20",
                   "--out-dir", out, check=False)
    stop = re.fullmatch(r"error: non-finite (?:loss|weights) at step (\d+)(?: \(\d+ tensors\))?; (.*)\. "
                        r"To avoid it: lower --lr, or set --grad-clip\.", error_line(proc))
    assert proc.returncode == 1 and stop, proc.stderr[-2000:]
    if stop[2] == "no checkpoint was kept (none had been saved)":
        assert not (out / "checkpoint.pt").exists() and int(stop[1]) <= 5
    else:
        step = int(re.fullmatch(r"the last good checkpoint, of step (\d+), is kept in .*", stop[2])[1])
        assert load(out / "checkpoint.pt")["step"] == step and nonfinite(load(out / "checkpoint.pt")) == 0
    assert not [n for n in os.listdir(out) if ".tmp" in n or n.startswith("export")]


def test_inf_loss_stops_before_the_save_and_the_kept_checkpoint_resumes(tmp_path):
    """An inf loss in step 4 (fp32): the save after it is refused, the step-3 checkpoint is named, kept intact,
    and resumes (plain command line, no injection) to the end."""
    out = tmp_path / "inf"
    proc = subprocess.run([sys.executable, wrapper(tmp_path), *CLIP, "--steps", "6", "--save-every", "1",
                           "--log-every", "20", "--out-dir", str(out)], cwd=ROOT, env=dict(ENV, TEST_INF_LOSS_AT="3"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and error_line(proc) == (
        f"error: non-finite loss at step 4; the last good checkpoint, of step 3, is kept in {out / 'checkpoint.pt'} "
        f"(continue with --resume). To avoid it: lower --lr, or set --grad-clip."), proc.stderr[-2000:]
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["step"] == 3 and nonfinite(ckpt) == 0
    assert not [n for n in os.listdir(out) if ".tmp" in n or n.startswith("export") or "lock" in n]
    proc = run_cli("maskclip.py", *CLIP, "--steps", "6", "--save-every", "1", "--out-dir", out, "--resume")
    assert "done: 6 steps" in proc.stdout and load(out / "checkpoint.pt")["step"] == 6


def test_fp16_step_skipped_for_an_inf_loss_is_not_an_error(tmp_path):
    """Under fp16 the GradScaler skips a step whose loss (so whose gradients) is not finite: the weights stay
    as they were, and the run goes on, saves and ends."""
    env = dict(ENV, TEST_INF_LOSS_AT="1", TEST_NO_EVAL="1")  # the second step's loss is inf
    out = tmp_path / "fp16"
    proc = subprocess.run([sys.executable, wrapper(tmp_path), *CLIP, "--precision", "fp16", "--steps", "3",
                           "--save-every", "1", "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "done: 3 steps" in proc.stdout, proc.stderr[-2000:]
    losses = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert losses[1] == float("inf") and losses[0] < 10 and losses[2] < 10  # logged as it was: step 2 was skipped
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["step"] == 3 and nonfinite(ckpt) == 0 and not (out / "run.lock").exists()
    applied = int(next(iter(ckpt["optimizer"]["state"].values()))["step"])
    skipped = round(math.log2(2.0 ** 16 / ckpt["scaler"]["scale"]))  # every skip halves the scale, from 2^16
    assert skipped >= 1 and applied + skipped == 3


# ---------------------------------------------------------------------------------------------- lock
def test_one_run_per_out_dir_and_a_dead_owner_does_not_block(tmp_path):
    out, host = tmp_path / "run", platform.node()
    long_run = [sys.executable, "maskclip.py", *CLIP, "--steps", "100000", "--out-dir", str(out)]
    first = subprocess.Popen([*long_run, "--save-every", "2"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "checkpoint.pt").exists(), first)
        owner = lock_owner(out)
        assert (owner["pid"], owner["host"]) == (first.pid, host)
        # a second run into the same folder, two processes under torchrun: both stop at once, no rank hangs
        second = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "maskclip.py", *CLIP, "--steps", "3", "--resume", "--out-dir", str(out)],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
        assert second.returncode != 0 and first.poll() is None
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert errors and set(errors) == {f"error: --out-dir {out} is in use by another run (host {host}, pid "
                                          f"{first.pid}, since {owner['since']}); wait for it to end or stop it, or "
                                          f"give another --out-dir"}, second.stderr[-3000:]
    finally:
        first.kill()  # kill -9: the lock stays, naming a dead process
        first.wait()
    assert lock_owner(out) == owner
    step, logged = load(out / "checkpoint.pt")["step"], len((out / "metrics.jsonl").read_text().splitlines())
    (out / f"checkpoint.pt.tmp{first.pid}").write_bytes(b"half a checkpoint")  # as a kill during a save leaves
    third = subprocess.Popen([*long_run, "--save-every", "100000", "--resume", "auto"], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def trained_on():  # has logged a step of its own
            return len((out / "metrics.jsonl").read_text().splitlines()) > logged
        wait_for(trained_on, third)
        third.send_signal(signal.SIGTERM)  # it saves, then ends, and its lock goes with it
        stdout, stderr = third.communicate(timeout=120)
    finally:
        third.kill()
    text = stdout + stderr
    assert third.returncode == 0, text[-3000:]
    assert f"--out-dir {out}: removed the lock of a run that has ended (host {host}, pid {first.pid})" in text
    assert f"removed {out / f'checkpoint.pt.tmp{first.pid}'}, left by a process killed while it saved" in text
    assert f"--resume auto: continuing from step {step} of {out / 'checkpoint.pt'}" in text
    saved = int(re.search(r"SIGTERM: checkpoint saved at step (\d+)", text)[1])
    assert saved > step and load(out / "checkpoint.pt")["step"] == saved
    assert not [n for n in os.listdir(out) if "lock" in n or ".tmp" in n]


# ---------------------------------------------------------------------------------------------- restarts
def test_torchrun_restart_continues_from_the_checkpoint_and_ends_where_an_unbroken_run_ends(tmp_path):
    """A real torchrun restart: the worker raises in step 5 of the first round (checkpoint at step 3, in the
    middle of the first epoch); the second round (TORCHELASTIC_RESTART_COUNT=1) continues from it without
    --resume and ends at the parameters of a run that never failed."""
    args, env = [wrapper(tmp_path), *TINY, "--steps", "7", "--save-every", "3"], dict(ENV, TEST_NO_EVAL="1")
    straight = subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path / "straight")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "1",
                           "--nproc_per_node", "1", *args, "--out-dir", str(tmp_path / "restarted")],
                          cwd=ROOT, env=dict(env, TEST_FAIL_AT="4"), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "injected failure in step 5 of the first round" in text
    assert f"restart 1 of this job: continuing from step 3 of {tmp_path / 'restarted' / 'checkpoint.pt'}" in text
    assert "done: 7 steps" in text
    a, b = (load(tmp_path / d / "checkpoint.pt") for d in ("straight", "restarted"))
    assert a["step"] == b["step"] == 7
    for part in ("model", "teacher"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-7, msg=f"{part} {k}")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-7)
    # SLURM's requeue: the same command continues (here from the end, so it trains nothing); another command
    # is refused in one line and the checkpoint is left as it was
    slurm = dict(env, SLURM_RESTART_COUNT="1")
    again = subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path / "straight")], cwd=ROOT, env=slurm,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    path = tmp_path / "straight" / "checkpoint.pt"
    assert f"restart 1 of this job: continuing from step 7 of {path}" in again.stdout
    saved = path.read_bytes()
    other = subprocess.run([sys.executable, *args, "--lr", "0.002", "--out-dir", str(tmp_path / "straight")],
                           cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and error_line(other) == (
        f"error: {path} was saved by another command (--lr differs), so restart 1 does not continue it; pass "
        f"--resume to continue it or --out-dir for a new run"), other.stderr[-3000:]
    assert path.read_bytes() == saved


# ---------------------------------------------------------------------------------------------- start-up errors
def test_start_up_errors_train_nothing_and_touch_nothing(tmp_path):
    (tmp_path / "afile").write_text("precious\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
    cases = {  # the flags, and the one line that must name the problem (the parser's words for the ranges)
        "file": (["--out-dir", tmp_path / "afile"], re.escape(f"error: --out-dir {tmp_path / 'afile'} is a file; "
                                                              f"give a folder")),
        "epochs": (["--epochs", "0", "--out-dir", tmp_path / "new"], r"error: .*--epochs.* 0\b.*"),
        "steps": (["--steps", "0", "--resume", "--out-dir", tmp_path / "old"], r"error: .*--steps.* 0\b.*"),
    }
    procs = {name: subprocess.Popen([sys.executable, "maskclip.py", *TINY, *map(str, argv)], cwd=ROOT, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 2 and re.fullmatch(cases[name][1], stderr.strip()) and not stdout, (name, stderr)
    assert (tmp_path / "afile").read_text() == "precious\n"
    assert not (tmp_path / "new").exists()
    assert os.listdir(tmp_path / "old") == ["checkpoint.pt"]
    assert (tmp_path / "old" / "checkpoint.pt").read_bytes() == b"an earlier run's checkpoint"


# ---------------------------------------------------------------------------------------------- unreadable samples
def test_each_unreadable_file_is_counted_once(tmp_path):
    """204 rows, 2 missing and 2 truncated images, each pair adjacent (so a bad row's replacement is bad too),
    over an epoch and a step with two workers: the run reports 4, not the 6 (and more) of the raw per-item counts."""
    rows = ["filepath\ttitle"]
    for i in range(204):
        if i not in (60, 61):
            Image.new("RGB", (40, 40), (i, 255 - i, (7 * i) % 256)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\ta shape number {i}")
    for i in (140, 141):
        data = (tmp_path / f"{i}.png").read_bytes()
        (tmp_path / f"{i}.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    proc = run_cli("maskclip.py", *CLIP, "--train-data", tmp_path / "data.csv", "--csv-caption-key", "title",
                   "--batch-size", "68", "--workers", "2", "--steps", "4", "--log-every", "2", "--resume", "auto",
                   "--out-dir", tmp_path / "run")
    assert f"--resume auto: no checkpoint in {tmp_path / 'run'}, starting a new run" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("done: 4 steps, 4 unreadable samples skipped. ")
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    counts = [r["skipped_samples"] for r in records]
    assert counts == sorted(counts) and counts[-1] == 4 and not (tmp_path / "run" / "run.lock").exists()
