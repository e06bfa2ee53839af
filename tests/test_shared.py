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
    assert len(first) >= 2
    for script, order in orders.items():
        assert order == first, f"{script}.py has shared sections {order}, {PRESENT[0]}.py has {first}"


@pytest.mark.parametrize("script", PRESENT[1:])
def test_shared_sections_are_identical_text(script):
    ref, other = sections(PRESENT[0]), sections(script)
    for key, body in ref.items():
        if key[0] == "shared":
            assert other[key] == body, f"shared section '{key[1]}' differs between {PRESENT[0]}.py and {script}.py"


def flags_and_reads(script):
    """The flags of the script's real parser (common.make_parser's shared flags and add_method_args), and the
    names read as `args.<name>` in the script or in common.py (which reads the shared data flags)."""
    sys.path.insert(0, ROOT)
    module = __import__(script)
    import common
    p = common.make_parser("", module.METHOD, module.DATA_KIND)
    module.add_method_args(p)
    dests = {a.dest for a in p._actions if a.option_strings and a.dest != "help"}
    reads = set()
    for path in (os.path.join(ROOT, f"{script}.py"), os.path.join(ROOT, "common.py")):
        tree = ast.parse(open(path).read())
        reads |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                  and n.value.id == "args"}
    return dests, reads, module


@pytest.mark.parametrize("script", PRESENT)
def test_no_dead_flags(script):
    dests, reads, _ = flags_and_reads(script)
    dead = sorted(d for d in dests if d not in reads)
    assert not dead, f"{script}.py defines flags that nothing reads: {dead}"


@pytest.mark.parametrize("script", PRESENT)
def test_recipe_and_demo_name_real_flags(script):
    dests, _, module = flags_and_reads(script)
    for table in ("RECIPE", "DEMO"):
        unknown = set(getattr(module, table)) - dests
        assert not unknown, f"{script}.{table} sets {unknown}, which are not flags"


@pytest.mark.parametrize("script", PRESENT)
def test_image_only_scripts_show_no_text_flags(script):
    dests, _, module = flags_and_reads(script)
    text_flags = {"context_length", "csv_img_key", "csv_caption_key", "csv_separator", "train_num_samples",
                  "dataset_resampled"}
    if module.DATA_KIND == "image":
        assert not dests & text_flags, f"{script}.py shows image-text flags it cannot use: {dests & text_flags}"
    else:
        assert text_flags <= dests


@pytest.mark.parametrize("script", PRESENT)
def test_help_shows_the_defaults_that_apply(script):
    """`--help` shows the demo's values; `--train-data x --help` the paper's; no flag says "(default: None)"."""
    sys.path.insert(0, ROOT)
    module = __import__(script)
    cases = (([], {**module.RECIPE, **module.DEMO}), (["--train-data", "x"], module.RECIPE))
    procs = [subprocess.Popen([sys.executable, f"{script}.py", *extra, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, COLUMNS="200"))
             for extra, _ in cases]  # both at once
    for (extra, table), proc in zip(cases, procs):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "--train-data" in stdout, stderr
        text = " ".join(stdout.split())
        assert "(default: None)" not in text
        for key in ("lr", "batch_size", "epochs", "model"):
            assert f"(default: {table[key]})" in text, \
                f"{script}.py {' '.join(extra)} --help: --{key} does not show {table[key]}"


HOOKS = {"add_method_args": ["p"], "build_model": ["cfg", "args"], "train_transform": ["args", "cfg"],
         "no_weight_decay": ["name", "param"],
         "train_step": ["ddp", "model", "teacher", "batch", "step", "sched", "args", "device"],
         "after_step": ["model", "teacher", "step", "sched", "args"],
         "export_state_dicts": ["model_sd", "teacher_sd"], "evaluate": ["model", "teacher", "args", "device"],
         "eval_towers": ["ckpt"], "train_one_step": ["ddp", "model", "teacher", "batch", "optimizer", "scaler",
                                                     "step", "sched", "args", "device"]}


@pytest.mark.parametrize("script", PRESENT)
def test_every_script_defines_the_hooks_with_one_signature(script):
    import inspect
    sys.path.insert(0, ROOT)
    module = __import__(script)
    for name, params in HOOKS.items():
        assert list(inspect.signature(getattr(module, name)).parameters) == params, f"{script}.{name}"
    assert isinstance(module.RECIPE, dict) and isinstance(module.DEMO, dict)
    assert module.DATA_KIND in ("image-text", "image")


BUDGET = {"maskclip": 50_000}


@pytest.mark.parametrize("script", PRESENT)
def test_script_budget(script):
    """Minimal scripts: at most 50k characters (maskclip) or 60k (the others), the `# <method>` sections at
    least 45% of the file, no line over 120 columns."""
    text = open(os.path.join(ROOT, f"{script}.py")).read()
    method = sum(len(body) for (kind, _), body in sections(script).items() if kind == "method")
    assert len(text) <= BUDGET.get(script, 60_000), f"{script}.py has {len(text)} characters"
    assert method >= 0.45 * len(text), f"{script}.py: method sections {method / len(text):.0%} of the file"
    wide = [i + 1 for i, line in enumerate(text.splitlines()) if len(line) > 120]
    assert not wide, f"{script}.py lines over 120 columns: {wide[:5]}"


@pytest.mark.parametrize("script", PRESENT)
def test_import_has_no_side_effects(script):
    code = (f"import sys; sys.argv = ['x', '--bogus']; import torch.distributed as d; import {script}; "
            f"assert not d.is_initialized(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


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
    optional = {"benchmark": {"matplotlib"}}.get(script, set())  # imported in a function, only when there
    top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names} | {
        node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    bad = sorted(m for m in mods if m not in ALLOWED | optional and m not in sys.stdlib_module_names
                 and m not in methods)
    assert not bad and not top & optional, f"{script}.py imports {bad or sorted(top & optional)}"
    if script in methods:
        assert not (mods & methods - {script}), f"{script}.py imports another method script"
