"""SILC: the multi-crop views (the demo's global crops unflipped), both contrastive losses and the DINO loss against
naive references (forward and gradients; centring and the teacher-temperature schedule included) and in fp32 under
bf16 autocast, τ_t's warm-up in the real loop for every data source, the losses without a process group, the EMA
teacher, the DINO head (frozen prototypes untouched by AdamW), the MAP head against big_vision's, the [CLS]-free
map/gap towers, the dense features and the segmentation metric, exports and eval_towers, distributed equivalence
in two gloo processes, and the real CLI (smoke runs of SILC-C and SILC-S, bad input)."""
import io
import json
import math
import random
import tarfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from conftest import run_cli, run_distributed

import common
import silc

SMALL = ["--n-local", "2", "--out-dim", "16", "--head-hidden", "32", "--head-bottleneck", "8", "--ema-momentum", "0.9"]
TINY = ["--model", "tiny", "--workers", "0", "--batch-size", "8", "--builtin-samples", "16", "--n-local", "2",
        "--out-dim", "32", "--head-hidden", "32", "--head-bottleneck", "16", "--log-every", "1", "--eval-every", "0"]


def small_model(*extra, seed=0):
    torch.manual_seed(seed)
    args = silc.parse_args([*SMALL, *extra])
    cfg = silc.model_config(args)
    model, teacher = silc.build_model(cfg, args)
    return model, teacher, args


def views(n=4, n_local=2, seed=0):
    """Random global crops (2n, 3, 32, 32), local crops (n_local·n, 3, 16, 16) and n captions."""
    g = torch.Generator().manual_seed(seed)
    texts = common.tokenize([common.render_shapes(seed, i, 32)[1] for i in range(n)], 24)
    return (torch.randn(2 * n, 3, 32, 32, generator=g), torch.randn(n_local * n, 3, 16, 16, generator=g), texts)


# ---------------------------------------------------------------------------------------------- views
def test_multicrop_counts_shapes_scales_and_determinism(monkeypatch):
    args = silc.parse_args([])
    cfg = silc.model_config(args)
    assert silc.local_crop_size(args, cfg) == 16                     # 32 px tiny model: a 2×2 local grid
    big = silc.parse_args(["--train-data", "x.csv"])
    assert silc.local_crop_size(big, silc.model_config(big)) == 96    # DINO's 96 px at 224/16
    calls = []
    real = common.crop_box
    monkeypatch.setattr(common, "crop_box",
                        lambda rng, w, h, scale: calls.append(tuple(scale)) or real(rng, w, h, scale))
    args.n_local = 8
    transform = silc.train_transform(args, cfg)
    img = common.render_shapes(0, 3)[0]
    out = transform(img, random.Random(5))
    assert isinstance(out, tuple) and len(out) == 2 + 8
    assert [tuple(v.shape) for v in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 8
    assert calls == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 8             # demo global scale (0.4, 1), local (0.05, 0.4)
    again = transform(img, random.Random(5))
    assert all(torch.equal(a, b) for a, b in zip(out, again))        # the (img, rng) randomness contract
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[2], out[3])
    # through the built-in dataset and the loader's collate: a tuple of stacked views
    ds = common.Shapes("train", length=4, transform=transform, context_length=24)
    batch = common.collate([ds[(0, i)] for i in range(4)])
    assert len(batch[0]) == 10 and batch[0][0].shape == (4, 3, 32, 32) and batch[0][9].shape == (4, 3, 16, 16)
    # the ablation views: + one un-augmented image; no local crops when nothing is distilled
    args.contrastive_on, args.local_photometric = "unaugmented", True
    out = silc.train_transform(args, cfg)(img, random.Random(1))
    assert len(out) == 11 and torch.equal(out[-1], common.EvalTransform(32, *common.NORMS[args.norm])(img))
    args.lambda_sd = 0
    assert len(silc.train_transform(args, cfg)(img, random.Random(1))) == 3


def test_builtin_global_crops_are_never_flipped(monkeypatch):
    """The built-in captions say left or right, so the demo's global crops (which meet the captions) are never
    flipped; its local crops, and the global crops of real data, are flipped about half of the time."""
    monkeypatch.setattr(common, "crop_box", lambda rng, w, h, scale: (0, 0, w, h))   # whole-image crops
    img = Image.new("RGB", (64, 64))
    img.paste((255, 255, 255), (32, 0, 64, 64))                       # dark left half, bright right half

    def flipped(v):
        return bool(v[:, :, :v.shape[2] // 2].mean() > v[:, :, v.shape[2] // 2:].mean())
    for flags, globals_flip in (([], {False}), (["--train-data", "x.csv", "--model", "tiny"], {False, True})):
        args = silc.parse_args(flags)
        args.n_local = 2
        transform = silc.train_transform(args, silc.model_config(args))
        out = [transform(img, random.Random(seed)) for seed in range(12)]
        assert {flipped(v) for views in out for v in views[:2]} == globals_flip
        assert {flipped(v) for views in out for v in views[2:]} == {False, True}
    sides = [w for i in range(100) for w in common.render_shapes(0, i)[1].split() if w in ("left", "right")]
    assert len(sides) > 10                                           # why: many built-in captions name a side


def test_local_crops_run_through_the_interpolated_position_embedding(world1):
    model, _, _ = small_model()
    _, local, _ = views()
    assert model.encode_image(local).shape == (8, 128)
    # at the global size the interpolation is the identity
    v = model.visual
    same = F.interpolate(v.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(4, 4),
                         mode="bicubic", align_corners=False)
    torch.testing.assert_close(same.permute(0, 2, 3, 1).reshape(16, -1), v.positional_embedding[1:])
    small = v.pos_embed(2, 2)
    assert small.shape == (5, 128) and torch.equal(small[0], v.positional_embedding[0])


# ---------------------------------------------------------------------------------------------- losses
def naive_sigmoid(img, txt, t, b):
    """-1/B Σ_i Σ_j log σ(z_ij (t·x_i·y_j + b)), z_ij = 1 if i = j else -1: a double loop."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (t * img[i] @ txt[j] + b)))
    return total / n


def naive_softmax(img, txt, t):
    """-1/(2B) Σ_i [log softmax_j(t·x_i·y_j)_i + log softmax_j(t·x_j·y_i)_i]."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        total = total - torch.log(torch.exp(t * img[i] @ txt[i])
                                  / sum(torch.exp(t * img[i] @ txt[j]) for j in range(n)))
        total = total - torch.log(torch.exp(t * img[i] @ txt[i])
                                  / sum(torch.exp(t * img[j] @ txt[i]) for j in range(n)))
    return total / (2 * n)


def embeddings(n=6, dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1), F.normalize(torch.randn(n, dim, generator=g), dim=-1)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_contrastive_losses_match_naive_forward_and_backward(world1, kind):
    img, txt = (e.requires_grad_() for e in embeddings())
    t, b = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    if kind == "softmax":
        loss = sum(silc.contrastive_loss(img, txt, t)) / 2
    else:
        loss = silc.sigmoid_loss(img, txt, t, b)
    loss.backward()
    leaves = [x.detach().clone().requires_grad_() for x in (img, txt, t, b)]
    ref = naive_softmax(*leaves[:2], leaves[2].exp()) if kind == "softmax" else \
        naive_sigmoid(leaves[0], leaves[1], leaves[2].exp(), leaves[3])
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for mine, theirs in zip((img, txt, t) + ((b,) if kind == "sigmoid" else ()), leaves):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_sigmoid_loss_starts_close_to_its_prior(world1):
    """t = 10, b = -10, orthogonal embeddings: each positive costs softplus(10) ≈ 10, each negative softplus(-10)."""
    e = torch.eye(8)                                                     # 4 images and 4 texts, all orthogonal
    loss = silc.sigmoid_loss(e[:4], e[4:], torch.tensor(math.log(10.0)), torch.tensor(-10.0))
    assert loss.item() == pytest.approx(F.softplus(torch.tensor(10.0)).item()
                                        + 3 * F.softplus(torch.tensor(-10.0)).item())


def test_losses_are_fp32_under_bf16_autocast(world1):
    """The sigmoid loss, the DINO cross-entropy and the softmax loss computed under CPU bf16 autocast equal their fp32
    values, and so do their gradients (backward outside autocast, as in train_one_step): autocast is off around the
    loss math, where a .float() would not stop bf16 matmuls."""
    img, txt = embeddings(16, 32, seed=2)
    g = torch.Generator().manual_seed(4)
    student, raw, center = (torch.randn(*shape, generator=g) for shape in ((3, 16, 64), (2, 16, 64), (1, 64)))

    def losses(autocast):
        leaves = [x.clone().requires_grad_() for x in (img, txt, student, torch.tensor(math.log(10.0)),
                                                       torch.tensor(-10.0))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = [silc.sigmoid_loss(leaves[0], leaves[1], leaves[3], leaves[4]),
                   sum(silc.contrastive_loss(leaves[0], leaves[1], leaves[3])) / 2,
                   silc.dino_loss(leaves[2], silc.teacher_probs(raw, center, 0.04), 0.1)]
        return out + list(torch.autograd.grad(sum(out), leaves))
    for mine, ref in zip(losses(True), losses(False)):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flags", [[], ["--loss", "sigmoid"]])
def test_contrastive_loss_is_one_BxB_problem_per_global_view(world1, flags):
    model, _, _ = small_model("--lambda-sd", "0", *flags)
    g, _, texts = views()
    _, metrics = model(g, texts)
    x = F.normalize(model.encode_image(g), dim=-1).view(2, 4, -1)
    y = F.normalize(model.encode_text(texts), dim=-1)
    per_view = [model.contrastive(x[v], y) for v in range(2)]
    torch.testing.assert_close(metrics["loss_con"], (per_view[0] + per_view[1]) / 2)
    model.contrastive_on = "first_global"
    torch.testing.assert_close(model(g, texts)[1]["loss_con"], per_view[0])


def naive_dino(student, teacher_raw, center, tau_s, tau_t, cross):
    """A loop over (teacher global g, student view v) pairs and samples; student: list of (B, K) logits, the
    first two the global views when cross; teacher_raw: 2 × (B, K) raw teacher logits."""
    total, pairs = 0.0, 0
    for g in range(2):
        for v in range(len(student)):
            if cross and v == g:
                continue
            pairs += 1
            for b in range(student[v].shape[0]):
                p = torch.softmax((teacher_raw[g][b] - center[0]) / tau_t, dim=-1)
                total = total - (p * torch.log_softmax(student[v][b] / tau_s, dim=-1)).sum()
    return total / (pairs * student[0].shape[0])


@pytest.mark.parametrize("cross", [False, True])
def test_dino_loss_matches_naive_forward_and_backward(cross):
    g = torch.Generator().manual_seed(3)
    v = 4 if cross else 3
    student = torch.randn(v, 5, 7, generator=g, requires_grad=True)
    raw, center = torch.randn(2, 5, 7, generator=g), torch.randn(1, 7, generator=g)
    loss = silc.dino_loss(student, silc.teacher_probs(raw, center, 0.05), 0.1, 2 if cross else 0)
    loss.backward()
    s2 = student.detach().clone().requires_grad_()
    ref = naive_dino(list(s2), list(raw), center, 0.1, 0.05, cross)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(student.grad, s2.grad)


def test_teacher_targets_centring_and_temperature_schedule_match_naive(world1):
    model, teacher, args = small_model("--warmup-teacher-temp-steps", "4", "--center-momentum", "0.8")
    temps = [silc.teacher_temperature(s, 4, 0.04, 0.07) for s in range(7)]
    assert temps[:5] == pytest.approx([0.04, 0.0475, 0.055, 0.0625, 0.07]) and temps[6] == 0.07
    c = torch.zeros(1, 16)
    for step in (0, 1, 2, 5):
        g, local, texts = views(seed=step)
        tau_t = silc.teacher_temperature(step, 4, args.warmup_teacher_temp, args.teacher_temp)
        with torch.no_grad():
            raw = teacher.dino_head(silc.pooled_embedding(teacher, g))       # (2B, K) raw teacher logits
        probs = teacher.targets(g, tau_t)                                    # (2, B, K), centred with c, then c moves
        naive = torch.stack([torch.softmax((raw[i] - c[0]) / tau_t, -1) for i in range(8)]).view(2, 4, 16)
        torch.testing.assert_close(probs, naive)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4))
        # the model's L_sd on these targets equals the naive loop over the 2 × n_local (teacher, student) pairs
        loss, metrics = model(g, texts, local, teacher_probs=probs)
        student = model.dino_head(model.encode_image(local)).view(2, 4, 16)
        torch.testing.assert_close(metrics["loss_sd"],
                                   naive_dino(list(student), list(raw.view(2, 4, 16)), c, 0.1, tau_t, False))
        torch.testing.assert_close(loss, metrics["loss_con"] + metrics["loss_sd"])
        c = 0.8 * c + 0.2 * raw.mean(0, keepdim=True)                        # from the raw logits
        torch.testing.assert_close(teacher.center, c)


def test_teacher_temperature_warms_up_over_the_lr_warm_up(world1, monkeypatch):
    """train_step takes τ_t's warm-up length from sched.warmup (the LR warm-up's) unless
    --warmup-teacher-temp-steps is given. For the demo that is 9728 built-in samples / 128 per batch × 0.5
    epochs = 38 steps."""
    demo = silc.parse_args([])
    data = common.train_loader(demo, transform=None, kind="image-text", rank=0, world_size=1)
    assert int(demo.warmup_epochs * data.steps_per_epoch) == 38
    model, teacher, args = small_model()
    taus = []
    real = teacher.targets
    monkeypatch.setattr(teacher, "targets", lambda crops, tau_t: taus.append(tau_t) or real(crops, tau_t))
    g, local, texts = views()
    batch = ((*g.view(2, 4, 3, 32, 32), *local.view(2, 4, 3, 16, 16)), texts, torch.zeros(4))
    sched = silc.Schedule(312, 52, 104)
    for step in (0, 26, 51, 52, 300):
        silc.train_step(model, model, teacher, batch, step, sched, args, torch.device("cpu"))
    assert taus[:3] == pytest.approx([0.04, 0.055, 0.04 + 0.03 * 51 / 52]) and taus[3:] == [0.07, 0.07]
    args.warmup_teacher_temp_steps = 2
    silc.train_step(model, model, teacher, batch, 1, sched, args, torch.device("cpu"))
    assert taus[-1] == pytest.approx(0.055)


def _image_text_files(tmp_path, n_csv=16, n_tar=24):
    """Built-in shapes as a CSV of PNG files (n_csv rows) and as one tar shard (n_tar samples)."""
    rows = ["filepath\ttitle"]
    with tarfile.open(tmp_path / "0.tar", "w") as tar:
        for i in range(max(n_csv, n_tar)):
            img, caption = common.render_shapes(3, i)[:2]
            buf = io.BytesIO()
            img.save(buf, "PNG")
            if i < n_csv:
                (tmp_path / f"{i}.png").write_bytes(buf.getvalue())
                rows.append(f"{tmp_path / f'{i}.png'}\t{caption}")
            for ext, data in (("png", buf.getvalue()), ("txt", caption.encode())) if i < n_tar else ():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "data.csv"), str(tmp_path / "0.tar")


def test_teacher_temperature_warm_up_is_the_lr_warm_up_for_every_data_source(tmp_path, monkeypatch):
    """The real loop on the built-in data and a CSV (2 steps per epoch) and tar shards (3 steps per epoch): in every
    step τ_t's warm-up length is the learning rate's, --warmup-epochs × steps per epoch."""
    csv, tar = _image_text_files(tmp_path)
    seen = {"lr": set(), "tau": set()}
    lr_at, temperature = silc.lr_at, silc.teacher_temperature
    monkeypatch.setattr(silc, "lr_at", lambda step, total, n, *a: seen["lr"].add(n) or lr_at(step, total, n, *a))
    monkeypatch.setattr(silc, "teacher_temperature", lambda step, n, *a: seen["tau"].add(n) or temperature(step, n, *a))
    monkeypatch.setattr(silc, "evaluate", lambda *a: {})
    for name, flags, warmup in (("builtin", [], 3), ("csv", ["--train-data", csv], 3),
                                ("tar", ["--train-data", tar, "--train-num-samples", "24"], 4)):
        seen["lr"].clear(), seen["tau"].clear()
        silc.main([*TINY, *flags, "--steps", "1", "--warmup-epochs", "1.5", "--out-dir", str(tmp_path / name)])
        assert seen["lr"] == seen["tau"] == {warmup}, name


def test_losses_and_a_step_run_without_a_process_group():
    """The losses, the centre update and a whole forward with the teacher in a plain program (no
    init_process_group), with SILC and Teacher built from keywords as a copy in another program would."""
    assert not dist.is_initialized()
    img, txt = embeddings()
    t, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    torch.testing.assert_close(sum(silc.contrastive_loss(img, txt, t)) / 2, naive_softmax(img, txt, t.exp()))
    torch.testing.assert_close(silc.sigmoid_loss(img, txt, t, b), naive_sigmoid(img, txt, t.exp(), b))
    u = torch.randn(6, 5)
    torch.testing.assert_close(silc.center_update(torch.ones(1, 5), u, 0.9), 0.9 + 0.1 * u.mean(0, keepdim=True))
    for loss, pool in (("softmax", "cls"), ("sigmoid", "map")):
        torch.manual_seed(0)
        model = silc.SILC(**common.MODELS["tiny"], act="gelu", loss=loss, pool=pool, out_dim=16, head_hidden=32,
                          head_bottleneck=8, distill_global_cross=True)
        teacher = silc.Teacher(model, center_momentum=0.8)
        g, local, texts = views()
        total, metrics = model(g, texts, local, teacher_probs=teacher.targets(g, 0.04))
        torch.testing.assert_close(total, metrics["loss_con"] + metrics["loss_sd"])
        assert teacher.center.abs().sum() > 0 and torch.isfinite(total)
    with pytest.raises(ValueError, match="pool"):
        silc.SILC(**common.MODELS["tiny"], pool="auto")


# ---------------------------------------------------------------------------------------------- teacher, heads
def test_teacher_starts_equal_gets_no_grad_and_ema_is_exact_and_fixed(world1):
    model, teacher, args = small_model()
    assert teacher.parts() == ["visual", "dino_head"]
    for name in teacher.parts():
        for (n, p), (_, q) in zip(getattr(model, name).named_parameters(), getattr(teacher, name).named_parameters()):
            assert torch.equal(p, q), n
    assert not any(k.startswith(("transformer.", "token_embedding", "text_projection", "logit", "ln_final"))
                   for k in teacher.state_dict())                                      # no text tower, t or b
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    teacher.train()
    assert not teacher.training
    g, local, texts = views()
    batch = ((*g.view(2, 4, 3, 32, 32), *local.view(2, 4, 3, 16, 16)), texts, torch.zeros(4))
    sched = silc.Schedule(10, 0, 10)
    loss, _ = silc.train_step(model, model, teacher, batch, 0, sched, args, torch.device("cpu"))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in model.parameters())                          # every trained part is reached
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    silc.after_step(model, teacher, 0, sched, args)                                      # constant m = 0.9
    for name in teacher.parts():
        for n, p in getattr(model, name).named_parameters():
            key = f"{name}.{n}"
            torch.testing.assert_close(teacher.state_dict()[key], 0.9 * before[key] + 0.1 * p.detach(), msg=key)
    assert all(silc.ema_momentum(s, 10, args.ema_momentum) == 0.9 for s in range(10))   # never annealed to 1
    cosine = [silc.ema_momentum(s, 10, 0.9, "cosine") for s in (0, 5, 10)]
    assert cosine == pytest.approx([0.9, 0.95, 1.0])


def test_map_and_gap_teachers_copy_their_pooling(world1):
    for pool, part in (("map", "map_head"), ("gap", "gap_proj")):
        model, teacher, _ = small_model("--pool", pool)
        assert part in teacher.parts() and model.visual.proj is None
        g, _, _ = views()
        torch.testing.assert_close(silc.pooled_embedding(teacher, g), model.encode_image(g))


def one_step_setup(model, args):
    """A DDP wrapper, AdamW, a disabled scaler and one batch of views for train_one_step."""
    g, local, texts = views()
    batch = ((*g.view(2, 4, 3, 32, 32), *local.view(2, 4, 3, 16, 16)), texts, torch.zeros(4))
    return (torch.nn.parallel.DistributedDataParallel(model), silc.make_optimizer(model, args, torch.device("cpu")),
            torch.amp.GradScaler("cpu", enabled=False), batch)


@pytest.mark.parametrize("pool", ["map", "gap"])
def test_map_and_gap_towers_have_no_cls_token_and_train_and_evaluate(world1, pool):
    """big_vision adds a [CLS] token only for `tok` pooling: with map or gap the image towers (student and teacher)
    have no class_embedding or ln_pre and grid² position rows; they train a step and reload (the whole evaluation
    of a map model runs in tests/test_quality.py's study, silc-sigmoid row)."""
    model, teacher, args = small_model("--pool", pool)
    assert not [k for k in [*model.state_dict(), *teacher.state_dict()] if "class_embedding" in k or "ln_pre" in k]
    assert model.visual.n_cls == 0 and model.visual.positional_embedding.shape == (16, 128)
    g, local, _ = views()
    assert model.visual(g).shape == (8, 16, 128) and teacher.visual(local).shape == (8, 4, 128)
    ddp, optimizer, scaler, batch = one_step_setup(model, args)
    cpu = torch.device("cpu")
    metrics = silc.train_one_step(ddp, model, teacher, batch, optimizer, scaler, 0, silc.Schedule(10, 0, 10), args, cpu)
    assert torch.isfinite(metrics["loss"]) and torch.isfinite(metrics["loss_sd"])
    model.eval()
    towers = silc.eval_towers(checkpoint_of(model, teacher, args))
    torch.testing.assert_close(towers["ema"].encode_dense(g), silc.dense_embedding(teacher, g))
    torch.testing.assert_close(towers["online"].encode_image(g), model.encode_image(g))


def test_prototypes_are_unit_rows_and_can_be_frozen(world1):
    model, _, _ = small_model()
    head = model.dino_head
    x = torch.randn(5, 128)
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), z @ (head.prototypes / head.prototypes.norm(dim=1, keepdim=True)).t())
    with torch.no_grad():
        head.prototypes.mul_(3.0)                      # the gain is fixed at 1: rescaling v changes nothing
    torch.testing.assert_close(head(x), z @ F.normalize(head.prototypes, dim=-1).t())
    head(x, freeze_prototypes=True).sum().backward()
    assert torch.count_nonzero(head.prototypes.grad) == 0 and torch.count_nonzero(head.mlp[0].weight.grad) > 0


def test_frozen_prototypes_get_no_adamw_update(world1):
    """--freeze-last-layer-steps: at the optimizer step the prototypes' gradient is None (DINO's
    cancel_gradients_last_layer), so with weight decay > 0 they stay bit-identical and AdamW keeps no moments."""
    model, teacher, args = small_model("--freeze-last-layer-steps", "1")
    ddp, optimizer, scaler, batch = one_step_setup(model, args)
    protos, mlp = model.dino_head.prototypes, model.dino_head.mlp[0].weight
    before, mlp_before = protos.detach().clone(), mlp.detach().clone()
    assert args.wd > 0 and any(protos is p for p in optimizer.param_groups[0]["params"])   # decayed when trained
    sched, cpu = silc.Schedule(10, 0, 10), torch.device("cpu")
    silc.train_one_step(ddp, model, teacher, batch, optimizer, scaler, 0, sched, args, cpu)
    assert torch.equal(protos, before) and protos not in optimizer.state and not torch.equal(mlp, mlp_before)
    silc.train_one_step(ddp, model, teacher, batch, optimizer, scaler, 1, sched, args, cpu)   # not frozen
    assert not torch.equal(protos, before) and optimizer.state[protos]["step"] == 1


def test_map_head_matches_big_vision(world1):
    """MAPHead as big_vision's: y = a + MlpBlock(LN(a)), a = MHA(probe, x), with tanh-GELU, LayerNorm eps 1e-6,
    Xavier-uniform kernels and normal(1e-6) MLP biases (zero attention biases)."""
    torch.manual_seed(0)
    head, x = silc.MAPHead(64, 4), torch.randn(3, 5, 64)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    mha.load_state_dict({k: v for k, v in head.state_dict().items() if k.startswith(("in_proj", "out_proj"))})
    a = mha(head.probe.expand(3, 1, 64), x, x, need_weights=False)[0]
    m = head.mlp
    hidden = F.gelu(F.linear(F.layer_norm(a, (64,), head.ln.weight, head.ln.bias, 1e-6), m.c_fc.weight, m.c_fc.bias),
                    approximate="tanh")
    torch.testing.assert_close(head(x), (a + F.linear(hidden, m.c_proj.weight, m.c_proj.bias))[:, 0])
    for w in (*head.in_proj_weight.view(3, 64, 64), head.out_proj.weight, m.c_fc.weight, m.c_proj.weight):
        bound = math.sqrt(6 / sum(w.shape))                              # Xavier-uniform: U(-bound, bound)
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert 0 < m.c_fc.bias.abs().max() < 1e-5 and 0 < m.c_proj.bias.abs().max() < 1e-5
    assert not head.in_proj_bias.any() and not head.out_proj.bias.any()


@pytest.mark.parametrize("pool,readout", [("cls", "proj"), ("gap", "proj"), ("map", "proj"), ("map", "map_value")])
def test_dense_features(world1, pool, readout):
    model, _, _ = small_model("--pool", pool, "--seg-readout", readout)
    g, _, _ = views()
    dense = model.encode_dense(g)
    assert dense.shape == (8, 16, 128)                                   # (B, N, E), N = (32 / 8)²
    tokens = model.visual.ln_post(model.visual(g)[:, model.visual.n_cls:])   # no [CLS] with map and gap
    if pool == "cls":
        torch.testing.assert_close(dense, silc.CLIP.encode_dense(model, g))   # the shared CLIP readout
    elif pool == "gap":
        torch.testing.assert_close(dense.mean(1), model.encode_image(g))      # linear: mean of dense = pooled
    elif readout == "proj":
        torch.testing.assert_close(dense, tokens)                              # MAP, no projection
    else:  # each token through the value path = the MAP head attending over that token alone
        torch.testing.assert_close(dense[:, 3], model.map_head(tokens[:, 3:4]))


def _as_dense(scores):
    """Score maps (b, 8 + 64, h, w) as patch embeddings (b, h·w, 72) against the one-hot classifier eye(72), so
    that common.segmentation_confusion's cosines are the scores divided by their norm over the prompts."""
    return scores.flatten(2).transpose(1, 2), torch.eye(scores.shape[1])


def test_segmentation_confusion_and_background_rule():
    """The segmentation metric of evaluate() (common.segmentation_confusion and common.miou) on hand-made scores."""
    n_bg, C = 8, 64
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[0, :4, :4] = 1 + 5                                             # class 5 in the top-left quarter
    masks[1, 4:, 4:] = 1 + 63
    scores = torch.zeros(2, n_bg + C, 2, 2)
    scores[:, 2] = 1.0                                                   # a background prompt wins everywhere ...
    scores[0, n_bg + 5, 0, 0] = 2.0                                      # ... except on the objects' patches
    scores[1, n_bg + 63, 1, 1] = 2.0
    conf = common.segmentation_confusion(*_as_dense(scores), n_bg, (2, 2), masks)
    assert conf.shape == (65, 65) and conf.sum() == 128
    cos = scores / scores.norm(dim=1, keepdim=True)
    up = F.interpolate(cos, size=(8, 8), mode="bilinear", align_corners=False).argmax(1)
    pred = (up - n_bg + 1).clamp(min=0)
    ious = []
    for k in (0, 6, 64):
        inter, union = ((pred == k) & (masks == k)).sum(), ((pred == k) | (masks == k)).sum()
        ious.append(inter / union)
        assert conf[k, k] == inter
    assert common.miou(conf)[0] == pytest.approx(100 * sum(ious).item() / 3)
    assert common.miou(common.segmentation_confusion(*_as_dense(_oracle(masks)), n_bg, (8, 8), masks))[0] == 100


def _oracle(masks):
    """Per-pixel scores (b, 8 + 64, H, W) that put the truth first (background on prompt 0)."""
    idx = torch.where(masks > 0, masks + 7, 0)
    return F.one_hot(idx, 72).permute(0, 3, 1, 2).float()


# ---------------------------------------------------------------------------------------------- weights
def checkpoint_of(model, teacher, args):
    cfg = silc.model_config(args)
    return {"method": "silc", "config": cfg, "args": common.plain(vars(args)), "model": model.state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else None}


def test_cls_model_exports_openai_layout_and_eval_towers(world1, tmp_path):
    model, teacher, args = small_model()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))                           # an EMA that differs from the student
    exports = silc.export_state_dicts(model.state_dict(), teacher.state_dict())
    assert set(exports) == {"online", "ema"} and all(k.startswith(common.OPENAI_PREFIXES) for k in exports["online"])
    g, _, texts = views()
    for name, sd in exports.items():
        common.export_weights(tmp_path / f"{name}.pt", sd, silc.model_config(args), norm=args.norm, method="silc",
                              weights=name)
    clip, _ = common.load_clip(str(tmp_path / "online.pt"), silc.CLIP, silc.VisionTransformer)
    torch.testing.assert_close(clip.encode_image(g), model.encode_image(g))
    torch.testing.assert_close(clip.encode_text(texts), model.encode_text(texts))
    ema, _ = common.load_clip(str(tmp_path / "ema.pt"), silc.CLIP, silc.VisionTransformer)
    torch.testing.assert_close(ema.encode_image(g), silc.pooled_embedding(teacher, g))
    towers = silc.eval_towers(checkpoint_of(model, teacher, args))
    torch.testing.assert_close(towers["ema"].encode_image(g), silc.pooled_embedding(teacher, g))
    torch.testing.assert_close(towers["ema"].encode_dense(g), silc.dense_embedding(teacher, g))
    torch.testing.assert_close(towers["online"].encode_dense(g), model.encode_dense(g))


def test_map_model_exports_nothing_and_eval_towers_gives_its_towers(world1):
    model, teacher, args = small_model("--loss", "sigmoid", "--seg-readout", "map_value")
    assert model.pool == "map" and silc.export_state_dicts(model.state_dict(), teacher.state_dict()) == {}
    towers = silc.eval_towers(checkpoint_of(model, teacher, args))
    g, _, texts = views()
    for name, tower in towers.items():
        src = model if name == "online" else teacher
        torch.testing.assert_close(tower.encode_image(g), silc.pooled_embedding(src, g))
        torch.testing.assert_close(tower.encode_dense(g), silc.dense_embedding(src, g, "map_value"))
        torch.testing.assert_close(tower.encode_text(texts), model.encode_text(texts))


# ---------------------------------------------------------------------------------------------- distributed
def _one_step(rank, world, emb_img, emb_txt, global_crops, local_crops, texts):
    """On this rank's slice of fixed global batches: (1) both contrastive losses on embeddings, with their
    gradients; (2) one DDP step of SILC-C and SILC-S with the teacher (loss, gradients, centre)."""
    out = {}
    b = emb_img.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    for kind in ("softmax", "sigmoid"):
        img, txt = emb_img[sl].clone().requires_grad_(), emb_txt[sl].clone().requires_grad_()
        t, bias = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        loss = sum(silc.contrastive_loss(img, txt, t)) / 2 if kind == "softmax" else \
            silc.sigmoid_loss(img, txt, t, bias)
        loss.backward()
        out[kind] = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "t": t.grad, "b": bias.grad}
    n = texts.shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    for flags in ((), ("--loss", "sigmoid", "--distill-global-cross")):
        model, teacher, _ = small_model(*flags)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        g = global_crops[:, rows].flatten(0, 1)                          # (2n, 3, 32, 32), view-major
        local = local_crops[:, rows].flatten(0, 1)                       # (2n, 3, 16, 16)
        probs = teacher.targets(g, 0.05)
        loss, _ = ddp(g, texts[rows], local, teacher_probs=probs)
        loss.backward()
        out[flags] = {"loss": loss.detach(), "center": teacher.center.clone(),
                      "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
                      "params": {k for k, _ in model.named_parameters()}}
    return out


def test_two_gloo_processes_match_one_process_and_the_naive_losses(tmp_path):
    emb_img, emb_txt = embeddings(8, 8, seed=4)
    g = torch.Generator().manual_seed(5)
    global_crops, local_crops = torch.randn(2, 4, 3, 32, 32, generator=g), torch.randn(2, 4, 3, 16, 16, generator=g)
    texts = common.tokenize([common.render_shapes(2, i, 32)[1] for i in range(4)], 24)
    inputs = (emb_img, emb_txt, global_crops, local_crops, texts)
    one = run_distributed(_one_step, 1, tmp_path / "one", *inputs)
    two = run_distributed(_one_step, 2, tmp_path / "two", *inputs)
    # (1) the contrastive losses against the naive full-batch loss: the ranks' mean loss, and the gradients once
    # DDP averages them (each rank's own rows; t and b averaged over the ranks)
    for kind in ("softmax", "sigmoid"):
        leaves = [x.clone().requires_grad_()
                  for x in (emb_img, emb_txt, torch.tensor(math.log(10.0)), torch.tensor(-10.0))]
        ref = naive_softmax(*leaves[:2], leaves[2].exp()) if kind == "softmax" else \
            naive_sigmoid(leaves[0], leaves[1], leaves[2].exp(), leaves[3])
        ref.backward()
        for runs in (one, two):
            w = len(runs)
            torch.testing.assert_close(sum(r[kind]["loss"] for r in runs) / w, ref.detach())
            torch.testing.assert_close(torch.cat([r[kind]["img"] for r in runs]) / w, leaves[0].grad)
            torch.testing.assert_close(torch.cat([r[kind]["txt"] for r in runs]) / w, leaves[1].grad)
            torch.testing.assert_close(sum(r[kind]["t"] for r in runs) / w, leaves[2].grad)
            if kind == "sigmoid":
                torch.testing.assert_close(sum(r[kind]["b"] for r in runs) / w, leaves[3].grad)
    # (2) the whole SILC step: two processes give the loss, gradients and centre of one process
    for flags in ((), ("--loss", "sigmoid", "--distill-global-cross")):
        ref = one[0][flags]
        assert set(ref["grads"]) == ref["params"]                        # every trained parameter gets a gradient
        torch.testing.assert_close((two[0][flags]["loss"] + two[1][flags]["loss"]) / 2, ref["loss"],
                                   rtol=1e-5, atol=1e-5)
        for r in two:
            torch.testing.assert_close(r[flags]["center"], ref["center"])
            for name, grad in ref["grads"].items():
                # summation order differs between one and two processes: an element far below the tensor's
                # scale may differ by more than rtol; the error is bounded relative to the tensor's largest entry
                torch.testing.assert_close(r[flags]["grads"][name], grad, rtol=1e-4,
                                           atol=max(1e-6, 1e-4 * grad.abs().max().item()),
                                           msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_smoke_run_exports_and_eval_towers(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("silc.py", *TINY, "--steps", "2", "--out-dir", out)
    assert "done: 2 steps" in proc.stdout + proc.stderr
    for name in ("checkpoint.pt", "export_online.pt", "export_ema.pt", "args.json", "metrics.jsonl", "code/silc.py"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and "loss_sd" in records[0]
    assert {"online/top1", "ema/top1", "online/colour_miou", "ema/colour_miou"} <= set(records[-1]["eval"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    towers = silc.eval_towers(ckpt)
    clip, _ = common.load_clip(str(out / "export_ema.pt"), silc.CLIP, silc.VisionTransformer)
    g, _, _ = views()
    torch.testing.assert_close(towers["ema"].encode_image(g), clip.encode_image(g))
    assert ckpt["teacher"]["center"].abs().sum() > 0                    # the centre moved and is saved


def test_map_model_segmentation_path(world1):
    """The MAP model's dense readouts through the evaluation's segmentation path (cheap: 16 images)."""
    model, teacher, args = small_model("--loss", "sigmoid", "--seg-readout", "map_value")
    classifier = common.shapes_segmentation_classifier(model.encode_text, args.context_length, torch.device("cpu"))
    assert classifier.shape == (8 + 64, 128)
    for tower in (model, teacher):
        value = common.shapes_segmentation(lambda x: silc.dense_embedding(tower, x, "map_value"), classifier,
                                           image_size=32, patch_size=8, norm=args.norm, device=torch.device("cpu"),
                                           n_images=16)
        assert 0 <= value <= 100


@pytest.mark.parametrize("flags,words", [(["--seg-readout", "map_value"], "--pool map"),
                                         (["--local-size", "12"], "multiple of the patch"),
                                         (["--n-local", "-1"], "--n-local")])
def test_bad_flags_fail_at_start_with_one_line(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        silc.main([*TINY, *flags, "--out-dir", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and words in err and err.startswith("error: ") and err.strip().count("\n") == 0
    assert not (tmp_path / "bad").exists()                              # nothing trained, nothing written
