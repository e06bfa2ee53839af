"""benchmark.py --quality: the study end to end on a budget of seconds (every row, two seeds, two steps, a tiny
batch, few evaluation images) and the shape of what it writes; the verdict rule, the time axis, the sizing
arithmetic, the checkpoint keeper and one-line errors on their own.

The end-to-end test runs each script's and eval_zeroshot.py's main() in this process (benchmark.launch
replaced), since sixteen training runs and thirty-four evaluations as fresh Python processes would take minutes;
the scripts' own end-of-run evaluations, which the study does not read, are skipped, and eval_zeroshot.py's are
shrunk (fewer held-out images, one template, two probe strengths). Only the study's code is under test there.
test_quality_real_command_line runs the real command line on the CLIP row."""
import contextlib
import functools
import importlib
import json
import os

import pytest
import torch

from conftest import run_cli, run_clis

import benchmark
import common
import eval_zeroshot

VERDICTS = {"confirmed", "not seen (within noise)", "reversed"}
TINY = ["--quality", "5", "--study-steps", "2", "--points", "2", "--seeds", "2", "--batch-size", "8",
        "--eval-samples", "16", "--train-samples", "32", "--threads", "1", "--device", "cpu"]


@pytest.fixture
def in_process(monkeypatch):
    """benchmark.launch as a call of the script's main(argv) in this process, its output to the log file."""
    real_eval = common.eval_dataset

    def small_eval(*args, **kwargs):  # the scripts' end-of-run zero-shot / k-NN held-out set: 64 images
        ds, names, templates = real_eval(*args, **kwargs)
        return torch.utils.data.Subset(ds, range(min(64, len(ds)))), names, templates
    monkeypatch.setattr(common, "eval_dataset", small_eval)
    monkeypatch.setattr(common, "shapes_segmentation", functools.partial(common.shapes_segmentation, n_images=16))
    # and eval_zeroshot.py's cheapest settings: one prompt template per class, two L2 strengths for the probe
    first_template = lambda fn: lambda encode, names, templates, *a, **k: fn(encode, names, templates[:1], *a, **k)
    monkeypatch.setattr(common, "zero_shot_classifier", first_template(common.zero_shot_classifier))
    monkeypatch.setattr(eval_zeroshot, "zero_shot_classifier", first_template(eval_zeroshot.zero_shot_classifier))
    monkeypatch.setattr(eval_zeroshot, "linear_probe", functools.partial(eval_zeroshot.linear_probe,
                                                                         lambdas=(1e-2, 1e-5), max_iter=50))
    for script in ("maskclip", "aclip", "silc", "milan", "maskdistill"):  # the study reads none of the scripts'
        monkeypatch.setattr(importlib.import_module(script), "evaluate", lambda *a, **k: {})  # own evaluations
    calls = []

    def launch(script, argv, log_path, env):
        calls.append(script)
        extra = ["--knn-samples", "32"] if script in ("milan", "maskdistill") else []
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                importlib.import_module(script).main(list(argv) + extra)
            except SystemExit as e:
                return e.code if isinstance(e.code, int) else 1
        return 0
    monkeypatch.setattr(benchmark, "launch", launch)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def test_study_writes_every_row_seed_metric_and_verdict(tmp_path, in_process, capsys):
    out = tmp_path / "study"
    benchmark.main(TINY + ["--out-dir", str(out)])
    report = json.loads((out / "quality.json").read_text())
    info = report["info"]
    assert info["steps"] == 2 and info["images"] == 16 and info["seeds"] == [0, 1] and info["wall_s"] > 0
    assert list(report["rows"]) == benchmark.QUALITY_ROWS                      # the CLIP baseline first
    for row, r in report["rows"].items():
        assert set(r["seeds"]) == {"0", "1"}
        for seed, run in r["seeds"].items():
            script, *argv = run["argv"]
            assert script == benchmark.ROWS[row][0] and argv[argv.index("--seed") + 1] == seed
            assert argv[argv.index("--steps") + 1] == "2" and argv[argv.index("--batch-size") + 1] == "8"
            final = run["points"][-1]
            assert final["step"] == 2 and final["images"] == 16 and final["seconds"] > 0
            assert [p["step"] for p in run["points"]] == sorted({p["step"] for p in run["points"]})
            assert run["train_s"] == final["seconds"] and run["wall_s"] > run["train_s"]
            weights = final["metrics"]
            assert list(weights)[0] == ("student" if row in benchmark.STUDENTS else "online")
            assert ("ema" in weights) == (row in benchmark.EMA_ROWS)
            expected = {"knn_top1", "probe_top1"} | (set() if row in benchmark.STUDENTS else
                                                     {"zeroshot_top1", "seg_colour_mIoU", "seg_fg_IoU", "seg_mIoU"})
            assert expected <= set(weights[list(weights)[0]])
        if row in benchmark.STUDENTS:                                           # the teacher: CLIP, same seed
            assert "clip/seed" in " ".join(r["seeds"]["0"]["argv"])
        summary = report["summary"][row]["points"][-1]
        assert summary["images"] == 16 and set(summary["seconds"]) >= {"mean", "min", "max", "std"}
        assert summary["metrics"]["probe_top1"]["n"] == 2
    assert set(report["untrained"]) == {"0", "1"}
    assert all("zeroshot_top1" in u["online"] for u in report["untrained"].values())
    claims = {(v["row"], v["metric"]) for v in report["verdicts"]}
    assert claims == {(row, metric) for row, metric, *_ in benchmark.CLAIMS}
    for v in report["verdicts"]:
        assert v["verdict"] in VERDICTS and v["spread"] >= 0 and len(v["row_values"]) == 2
    assert next(v for v in report["verdicts"] if v["axis"] == "time")["time_ratio"] > 0
    md = (out / "quality.md").read_text()
    for row in benchmark.QUALITY_ROWS:
        assert f"| {benchmark.NAMES[row]} |" in md
    assert "| untrained CLIP (random init) |" in md and "| claim |" in md and "[teacher " in md
    if report["plots"]:
        assert all(os.path.isfile(p) for p in report["plots"])
        assert len(report["plots"]) == 2 * len(benchmark.METRICS)
    else:
        assert "matplotlib" in report["plots_note"] and "matplotlib" in md
    assert "results:" in capsys.readouterr().out
    # the scripts' last line reads such a file: the CLIP baseline's range, the run's row, where the run stands
    study = str(out / "quality.json")
    clip = report["summary"]["clip"]["points"][-1]["metrics"]
    line = common.versus_study("maskclip", {"dist_weight": 0.0, "mlm_weight": 0.0},
                               {"online/top1": clip["zeroshot_top1"]["max"] + 1, "online/top5": 0.0}, 99, path=study)
    assert f"zero-shot top-1 {clip['zeroshot_top1']['max'] + 1:.1f}, above the CLIP baseline's " in line
    assert "this run 99 images" in line and "16 images per run, 2 seeds" in line and "there" not in line
    line = common.versus_study("milan", {}, {"student/knn_top1": clip["knn_top1"]["min"] - 1}, 5, path=study)
    milan = report["summary"]["milan"]["points"][-1]["metrics"]["knn_top1"]
    assert f"below the CLIP baseline's {clip['knn_top1']['min']:.1f}–{clip['knn_top1']['max']:.1f} " in line
    assert f"(MILAN there {milan['min']:.1f}–{milan['max']:.1f})" in line
    line = common.versus_study("silc", {"loss": "sigmoid"}, {"online/colour_miou": clip["seg_colour_mIoU"]["min"]},
                               5, path=study)
    assert "colour mIoU" in line and "within the CLIP baseline's" in line and "(SILC-S there " in line
    assert common.versus_study("aclip", {}, {"online/top1": 1.0}, 5, path=str(tmp_path / "none.json")) == ""
    assert common.versus_study("aclip", {"train_data": "data.csv"}, {"online/top1": 1.0}, 5, path=study) == ""
    # run again: every finished run is reused, only the untrained model is evaluated anew
    in_process.clear()
    benchmark.main(TINY + ["--out-dir", str(out)])
    assert in_process == ["eval_zeroshot", "eval_zeroshot"]


def test_judge_and_verdicts_on_known_numbers():
    assert benchmark.judge("above", 2.0, 1.0) == "confirmed"
    assert benchmark.judge("above", 0.5, 1.0) == "not seen (within noise)"
    assert benchmark.judge("above", -1.5, 1.0) == "reversed"
    assert benchmark.judge("not below", -0.5, 1.0) == "confirmed"      # within the noise is not below
    assert benchmark.judge("not below", -1.5, 1.0) == "reversed"

    def run(values, seconds):  # one seed's run: points at 50 and 100 steps, zero-shot `values`
        return {"train_s": seconds[-1], "wall_s": seconds[-1] + 1,
                "points": [{"step": s, "images": 8 * s, "seconds": t, "metrics": {"online": {"zeroshot_top1": v}}}
                           for s, t, v in zip((50, 100), seconds, values)]}
    runs = {"clip": {0: run([10, 20], [5, 10]), 1: run([12, 22], [5, 10])},
            "aclip": {0: run([15, 30], [6, 12]), 1: run([16, 29], [6, 12])},
            "aclip-eff": {0: run([10, 20], [4, 8]), 1: run([11, 21], [4, 8])}}
    untrained = {0: {"online": {"zeroshot_top1": 2.0}}, 1: {"online": {"zeroshot_top1": 2.0}}}
    out = {v["row"]: v for v in benchmark.verdicts(runs, untrained, [0, 1])}
    assert set(out) == {"aclip", "aclip-eff"}                      # rows that did not run are left out
    a = out["aclip"]
    assert a["difference"] == pytest.approx(29.5 - 21) and a["spread"] == 2 and a["verdict"] == "confirmed"
    eff = out["aclip-eff"]                                          # finished at 8 s, before CLIP's 10 s: its final
    assert eff["row_values"] == [20, 21] and eff["verdict"] == "not seen (within noise)"
    assert eff["time_ratio"] == pytest.approx(0.8)


def test_interpolate_between_points_and_hold_the_last_value():
    curve = [(0.0, 2.0), (10.0, 12.0), (20.0, 14.0)]
    assert benchmark.interpolate(curve, 5.0) == pytest.approx(7.0)
    assert benchmark.interpolate(curve, 15.0) == pytest.approx(13.0)
    assert benchmark.interpolate(curve, 99.0) == 14.0


def test_train_seconds_from_the_metrics_log(tmp_path):
    lines = [{"step": 10, "images_per_s": 80.0}, {"step": 10, "eval": {}}, {"step": 30, "images_per_s": 40.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert benchmark.train_seconds(tmp_path / "metrics.jsonl", 8) == {0: 0.0, 10: 1.0, 30: 5.0}


def test_size_study_fills_the_budget_and_refuses_too_little(tmp_path):
    args = benchmark.parse_args(["--quality", "60", "--seeds", "2", "--points", "3", "--out-dir", str(tmp_path)])
    rows = ["clip", "maskclip", "milan"]
    step_s = {"clip": 0.1, "maskclip": 0.3, "milan": 0.1}
    steps, est = benchmark.size_study(args, rows, step_s, eval_s=10.0, spent_s=30.0)
    assert steps % 3 == 0 and est["evaluations"] == 2 * 3 * (1 + 2 + 1)
    assert est["predicted_total_s"] <= 3600 < est["predicted_total_s"] + 3 * 2 * 0.5 * benchmark.LOOP_FACTOR
    args.quality = 1.0
    with pytest.raises(common.UsageError, match="needs at least"):
        benchmark.size_study(args, rows, step_s, eval_s=10.0, spent_s=30.0)


def test_checkpoint_keeper_keeps_each_replaced_file(tmp_path):
    keeper = benchmark.CheckpointKeeper(str(tmp_path), str(tmp_path))
    for step in (1, 2):
        torch.save({"step": step}, tmp_path / "tmp.pt")
        os.replace(tmp_path / "tmp.pt", tmp_path / "checkpoint.pt")    # as common.save_atomic writes it
        keeper.poll()
        keeper.poll()                                                   # the same file is kept once
    assert [torch.load(p, weights_only=True)["step"] for p in keeper.kept] == [1, 2]


BAD_INPUT = [  # flags, the words of the one error line
    (["--quality", "--methods", "clip,open_clip"], "open_clip is not a row of the quality study"),
    (["--quality", "0"], "argument --quality: got 0; give a number > 0"),
    (["--quality", "--seeds", "0"], "argument --seeds: got 0"),
    (["--quality", "--model", "ViT-Z"], "--model ViT-Z is not a model size"),
]


def test_bad_quality_input_is_one_line(tmp_path):
    procs = run_clis([("benchmark.py", *flags, "--out-dir", tmp_path / f"q{i}")
                      for i, (flags, _) in enumerate(BAD_INPUT)], check=False)
    for (flags, message), proc in zip(BAD_INPUT, procs):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flags, proc.stderr)
        assert message in lines[0], (flags, lines[0])


def test_quality_real_command_line(tmp_path):
    """The real command line on the CLIP row, one seed: the training run and each evaluation a
    `python <script>.py` process."""
    out = tmp_path / "study"
    run_cli("benchmark.py", *TINY, "--methods", "clip", "--seeds", "1", "--points", "1", "--out-dir", out,
            timeout=600)
    report = json.loads((out / "quality.json").read_text())
    assert list(report["rows"]) == ["clip"] and (out / "quality.md").is_file()
    assert (out / "clip" / "seed0" / "export_online.pt").is_file()


@pytest.mark.parametrize("row", benchmark.QUALITY_ROWS)
def test_study_row_of_each_rows_flags(row):
    """A script's last line finds its row of the study from its own flags: the rows' command lines map back."""
    mod, margs = benchmark.script_args(row, benchmark.parse_args(["--batch-size", "8"]), "teacher.pt")
    assert common.study_row(mod.METHOD, vars(margs)) == row
