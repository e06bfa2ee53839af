"""Every numeric flag of every script and tool has its range written next to it (a common.Range type), and a
value outside that range is a one-line error naming the flag, the value, the range and an example, before
anything is read or written."""
import argparse
import importlib
import math

import pytest

from conftest import PRESENT, run_clis

import common

TOOLS = ["eval_zeroshot", "benchmark"]


def parser_of(name):
    """The real parser of a script or tool, built the way its parse_args builds it."""
    mod = importlib.import_module(name)
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["p"] = self
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            mod.parse_args(["weights.pt"] if name == "eval_zeroshot" else [])
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["p"]


def numeric_actions(p):
    """Flags that take a number (those with a fixed set of choices are checked by argparse itself)."""
    return [a for a in p._actions if a.option_strings and not a.choices
            and (a.type in (int, float) or isinstance(a.type, common.Range))]


def outside(r):
    """Values outside Range r: below, above, not finite, not a number."""
    out = ["nan", "inf", "x"]
    if r.lo is not None:
        out.append(str(r.lo if r.lo_open else r.lo - 1))
    if r.hi is not None:
        out.append(str(r.hi if r.hi_open else r.hi + 1))
    if r.kind is int:
        out.append("1.5")
    return out


@pytest.mark.parametrize("name", PRESENT + TOOLS)
def test_every_numeric_flag_has_a_range_and_rejects_values_outside_it(name, capsys):
    p = parser_of(name)
    actions = numeric_actions(p)
    assert actions
    plain = [a.option_strings[0] for a in actions if not isinstance(a.type, common.Range)]
    assert not plain, f"{name}: numeric flags without a range: {plain}"
    for a in actions:
        r, flag = a.type, a.option_strings[0]
        assert r(str(r.eg)) == r.kind(r.eg), f"{name} {flag}: the example {r.eg} is outside {r!r}"
        for bad in outside(r):
            argv = (["weights.pt"] if name == "eval_zeroshot" else []) + [flag] + [bad] * (a.nargs or 1
                                                                                    if isinstance(a.nargs, int) else 1)
            with pytest.raises(SystemExit) as e:
                p.parse_args(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.count("\n") == 1, (name, flag, bad, err)
            assert err.startswith(f"error: argument {flag}") and f"got {bad}" in err and repr(r) in err \
                and f"e.g. {r.eg}" in err, err


def test_range_descriptions_and_bounds():
    assert repr(common.Range(int, 1)) == "an integer >= 1"
    assert repr(common.fraction(lo_open=True)) == "a number in (0, 1]"
    assert repr(common.positive(0.1)) == "a number > 0"
    assert common.Range(float, 0, 1, hi_open=True)("0") == 0.0
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.Range(float, 0, 1, hi_open=True)(bad)
    assert math.isfinite(common.Range(float)("-10"))


CLI_CASES = [  # the real command line: one line naming the flag, the value and the valid range
    (["--batch-size", "0"], "argument --batch-size: got 0; give an integer >= 1, e.g. 256"),
    (["--lr", "-1"], "argument --lr: got -1; give a number > 0"),
    (["--context-length", "0"], "argument --context-length: got 0; give an integer >= 2"),
    (["--workers", "-1"], "argument --workers: got -1; give an integer >= 0"),
    (["--epochs", "0"], "argument --epochs: got 0; give an integer >= 1"),
    (["--mask-ratio", "1.0"], "argument --mask-ratio: got 1.0; give a number in [0, 1)"),
    (["--mask-ratio", "0.97"], "--mask-ratio 0.97 leaves none of the 16 patches visible"),
    (["--imagenet-val", "/nonexistent"], "--imagenet-val /nonexistent is not a folder"),
    (["--resume", "sometimes"], "argument --resume: invalid choice: 'sometimes'"),
]


def test_cli_out_of_range_is_one_line_and_writes_nothing(tmp_path):
    outs = [tmp_path / f"run{i}" for i in range(len(CLI_CASES))]
    procs = run_clis([("maskclip.py", "--model", "tiny", *flags, "--out-dir", out)
                      for (flags, _), out in zip(CLI_CASES, outs)], check=False)
    for (flags, words), proc, out in zip(CLI_CASES, procs, outs):
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, (flags, proc.stderr)
        assert not out.exists(), flags
