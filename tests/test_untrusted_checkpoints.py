"""Checkpoints and weights from untrusted sources never run code: a pickle whose __reduce__ calls os.system,
a truncated file, an empty file, a file that is no checkpoint, a checkpoint of another method or model
size. OpenAI's TorchScript archives are read for their tensors only (their code is never compiled)."""
import importlib
import io
import os
import pickle
import zipfile

import pytest
import torch

from conftest import PRESENT, ROOT, run_cli

import common


class Evil:
    """Unpickling this runs `touch <marker>` in any loader that executes pickled callables."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(path, marker):
    torch.save({"model": {"w": torch.zeros(1)}, "method": "maskclip", "payload": Evil(marker)}, path)


@pytest.fixture(params=PRESENT)
def script(request):
    return importlib.import_module(request.param)


def load_clip(script, path):
    """common.load_clip with the script's own CLIP and VisionTransformer (its shared model section)."""
    return common.load_clip(path, script.CLIP, script.VisionTransformer)


def assert_one_line(err, *words):
    msg = str(err.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_malicious_pickle_does_not_run(script, tmp_path):
    marker = tmp_path / "pwned"
    evil_checkpoint(tmp_path / "evil.pt", marker)
    for loader in (common.read_weights_file, common.load_checkpoint, lambda path: load_clip(script, path)):
        with pytest.raises(common.UsageError) as err:
            loader(str(tmp_path / "evil.pt"))
        assert_one_line(err, "evil.pt")
    assert not marker.exists()


def test_truncated_empty_and_non_checkpoint_files(script, tmp_path, world1):
    cfg = dict(common.MODELS["tiny"], act="quickgelu")
    torch.save(script.CLIP(**cfg).state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    for name in ("truncated.pt", "empty.pt", "text.pt"):
        with pytest.raises(common.UsageError) as err:
            load_clip(script, str(tmp_path / name))
        assert_one_line(err, name, "expected")
    with pytest.raises(common.UsageError) as err:
        load_clip(script, str(tmp_path / "missing.pt"))
    assert_one_line(err, "missing.pt", "does not exist")
    clip, _ = load_clip(script, str(tmp_path / "good.pt"))  # the intact file loads
    assert clip.visual.grid == 4


def test_state_dict_of_another_architecture(script, tmp_path):
    cfg = dict(common.MODELS["tiny"], act="quickgelu")
    sd = script.CLIP(**cfg).state_dict()
    del sd["visual.ln_post.weight"]
    sd["visual.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(common.UsageError) as err:
        load_clip(script, str(tmp_path / "odd.pt"))
    assert_one_line(err, "odd.pt", "missing", "unexpected")
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pt")
    with pytest.raises(common.UsageError) as err:
        load_clip(script, str(tmp_path / "resnet.pt"))
    assert_one_line(err, "resnet.pt", "visual.conv1.weight")


def test_torchscript_archive_is_read_for_tensors_only(script, tmp_path, world1):
    torch.manual_seed(0)
    cfg = dict(common.MODELS["tiny"], act="quickgelu")

    class Traceable(script.CLIP):
        def forward(self, image, text):
            return self.encode_image(image), self.encode_text(text)

    model = Traceable(**cfg).eval()
    images, texts = torch.randn(2, 3, 32, 32), common.tokenize(["a red circle", "a blue star"], 24)
    traced = torch.jit.trace(model, (images, texts), check_trace=False)
    traced.save(str(tmp_path / "openai.pt"))
    # replace the archive's TorchScript code by text that cannot compile: reading must not touch it
    with zipfile.ZipFile(tmp_path / "openai.pt") as src, zipfile.ZipFile(tmp_path / "poisoned.pt", "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if "/code/" in item.filename and item.filename.endswith(".py"):
                data = b"import os\nos.system('touch " + str(tmp_path / "pwned").encode() + b"')\n"
            dst.writestr(item, data)
    with pytest.raises(Exception):
        torch.jit.load(str(tmp_path / "poisoned.pt"))  # what running the code would do: it does not compile
    sd = common.read_torchscript_tensors(str(tmp_path / "poisoned.pt"))
    ref = model.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    clip, info = load_clip(script, str(tmp_path / "poisoned.pt"))
    torch.testing.assert_close(clip.encode_image(images), model.encode_image(images))
    assert not (tmp_path / "pwned").exists()


def test_torchscript_reader_refuses_foreign_globals(script, tmp_path):
    """A data.pkl that asks for anything but tensor rebuilding (here os.system) is refused."""
    payload = pickle.dumps(Evil(tmp_path / "pwned"), protocol=2)
    with zipfile.ZipFile(tmp_path / "fake.pt", "w") as z:
        z.writestr("fake/data.pkl", payload)
        z.writestr("fake/code/__torch__/m.py", "def forward(): pass\n")
    with pytest.raises(common.UsageError) as err:
        load_clip(script, str(tmp_path / "fake.pt"))
    assert_one_line(err, "fake.pt")
    assert not (tmp_path / "pwned").exists()


def test_our_checkpoints_load_with_weights_only(tmp_path):
    """A real training checkpoint holds only tensors and plain types: torch.load(weights_only=True) reads it."""
    run_cli("maskclip.py", "--model", "tiny", "--steps", "1", "--batch-size", "8", "--builtin-samples", "16",
            "--workers", "0", "--eval-every", "0", "--quant-k", "16", "--out-dir", tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    allowed = (torch.Tensor, dict, list, tuple, str, int, float, bool, type(None))

    def walk(o, path="ckpt"):
        assert isinstance(o, allowed), f"{path} is a {type(o).__name__}"
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]")
    walk(ckpt)
    assert isinstance(ckpt["args"], dict) and isinstance(ckpt["rng"][0]["python"], list)
    export = torch.load(tmp_path / "run" / "export_online.pt", weights_only=True)
    walk(export, "export")


def test_cli_refuses_malicious_and_foreign_checkpoints(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil").mkdir()
    evil_checkpoint(tmp_path / "evil" / "checkpoint.pt", marker)
    proc = run_cli("maskclip.py", "--out-dir", tmp_path / "evil", "--resume", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "\n" not in proc.stderr.strip()
    assert not marker.exists()
    # a checkpoint of another model size
    tiny = ["--batch-size", "8", "--builtin-samples", "16", "--workers", "0", "--eval-every", "0", "--quant-k", "16"]
    run_cli("maskclip.py", "--model", "tiny", "--steps", "1", *tiny, "--out-dir", tmp_path / "size")
    proc = run_cli("maskclip.py", "--model", "ViT-S/16", "--steps", "2", *tiny, "--out-dir", tmp_path / "size",
                   "--resume", check=False)
    assert proc.returncode == 2 and "resume with the same --model" in proc.stderr
    assert "\n" not in proc.stderr.strip()
    # a checkpoint of another method
    others = [m for m in PRESENT if m != "maskclip"]
    if others:
        proc = run_cli(f"{others[0]}.py", "--model", "tiny", "--steps", "2", "--out-dir", tmp_path / "size",
                       "--resume", check=False)
        assert proc.returncode == 2 and "maskclip checkpoint" in proc.stderr and "\n" not in proc.stderr.strip()
