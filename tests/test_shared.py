"""Repository checks over every method script present: the shared sections are the same text in every
file, no flag is dead, RECIPE/DEMO only name real flags, scripts import without side effects, and the
runtime imports stay within the allowed packages."""
import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import PRESENT, ROOT

HEADER = re.compile(r"^# <(shared|method)> (.+)$", re.M)


def sections(script):
    """{(kind, title): text} of a script, each section running from its header to the next header's rule."""
    text = open(os.path.join(ROOT, f"{script}.py")).read()
    heads = list(HEADER.finditer(text))
    out = {}
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        body = text[h.end():end]
        body = body[: body.rfind("# ----")] if i + 1 < len(heads) else body  # drop the next section's rule
        out[(h.group(1), h.group(2))] = body
    return out


def test_every_script_has_the_same_shared_sections_in_the_same_order():
    orders = {s: [t for k, t in sections(s) if k == "shared"] for s in PRESENT}
    first = orders[PRESENT[0]]
    assert len(first) >= 8
    for script, order in orders.items():
        assert order == first, f"{script}.py has shared sections {order}, {PRESENT[0]}.py has {first}"


@pytest.mark.parametrize("script", PRESENT[1:])
def test_shared_sections_are_identical_text(script):
    ref, other = sections(PRESENT[0]), sections(script)
    for key, body in ref.items():
        if key[0] == "shared":
            assert other[key] == body, f"shared section '{key[1]}' differs between {PRESENT[0]}.py and {script}.py"


def flags_and_reads(script):
    src = open(os.path.join(ROOT, f"{script}.py")).read()
    tree = ast.parse(src)
    dests = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
            if names:
                dests.add(names[0][2:].replace("-", "_"))
    reads = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
             and n.value.id == "args"}
    return dests, reads, src


@pytest.mark.parametrize("script", PRESENT)
def test_no_dead_flags(script):
    dests, reads, _ = flags_and_reads(script)
    dead = sorted(d for d in dests if d not in reads)
    assert not dead, f"{script}.py defines flags that nothing reads: {dead}"


@pytest.mark.parametrize("script", PRESENT)
def test_recipe_and_demo_name_real_flags(script):
    sys.path.insert(0, ROOT)
    module = __import__(script)
    dests, _, _ = flags_and_reads(script)
    for table in ("RECIPE", "DEMO"):
        unknown = set(getattr(module, table)) - dests
        assert not unknown, f"{script}.{table} sets {unknown}, which are not flags"


@pytest.mark.parametrize("script", PRESENT)
def test_import_has_no_side_effects_and_help_works(script):
    code = (f"import sys; sys.argv = ['x', '--bogus']; import torch.distributed as d; import {script}; "
            f"assert not d.is_initialized(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr
    proc = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--train-data" in proc.stdout


ALLOWED = {"torch", "torchvision", "numpy", "PIL", "ftfy", "regex", "tqdm", "common"}


@pytest.mark.parametrize("script", PRESENT + ["common"] +
                         [s for s in ("eval_zeroshot", "benchmark") if os.path.exists(os.path.join(ROOT, f"{s}.py"))])
def test_runtime_imports_are_allowed(script):
    tree = ast.parse(open(os.path.join(ROOT, f"{script}.py")).read())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    methods = {"maskclip", "aclip", "silc", "milan", "maskdistill"}
    bad = sorted(m for m in mods if m not in ALLOWED and m not in sys.stdlib_module_names and m not in methods)
    assert not bad, f"{script}.py imports {bad}"
    if script in methods:
        assert not (mods & methods - {script}), f"{script}.py imports another method script"
