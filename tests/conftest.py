"""Shared test helpers: the repository on sys.path, a one-process gloo group, the real CLI in a subprocess,
and N gloo processes for distributed-equivalence tests."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
METHODS = ["maskclip", "aclip", "silc", "milan", "maskdistill"]
PRESENT = [m for m in METHODS if os.path.exists(os.path.join(ROOT, f"{m}.py"))]


@pytest.fixture
def world1():
    """A world of one (gloo), as setup_distributed makes for plain `python script.py`."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def run_cli(script, *args, timeout=300, check=True):
    """Run `python <script> <args>` from the repository root on the CPU; returns the CompletedProcess."""
    return run_clis([(script, *args)], timeout=timeout, check=check)[0]


def run_clis(commands, timeout=300, check=True):
    """Run independent commands [(script, *args), ...] at the same time; returns one CompletedProcess each, in
    order. check: every one must exit 0. For commands that stop at start-up (their imports overlap), not for
    training runs, which would compete for the same cores."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    argvs = [[sys.executable, os.path.join(ROOT, script), *map(str, args)] for script, *args in commands]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    done = []
    for argv, proc in zip(argvs, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv[1:])} exited {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return done


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world, tmp_path, *args):
    """Run fn(rank, world, *args) in `world` gloo processes (fn must be a module-level function);
    returns the list of what each rank returned."""
    os.makedirs(tmp_path, exist_ok=True)
    mp.start_processes(_worker, args=(world, free_port(), fn, args, str(tmp_path)), nprocs=world,
                       start_method="spawn", join=True)
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(world)]
