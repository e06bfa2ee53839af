"""MaskCLIP: each loss against a naive reference (forward and gradients), the masking invariants, the EMA
teacher, gradient routing, OpenAI-layout round trip, distributed equivalence, and the real CLI (smoke run,
exact resume, bad input, SIGTERM, non-finite loss)."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT, run_cli, run_clis, run_distributed

import common
import maskclip

TINY = ["--model", "tiny", "--workers", "0", "--batch-size", "8", "--builtin-samples", "32", "--quant-k", "16",
        "--dec-width", "64", "--dec-heads", "1", "--text-dec-depth", "1", "--log-every", "1", "--eval-every", "0"]


SCHED, CPU = maskclip.Schedule(total=10, warmup=0, steps_per_epoch=10), torch.device("cpu")


def small_args(*extra):
    return maskclip.parse_args(["--dist-weight", "1", "--mlm-weight", "1", "--quant-k", "16", "--dec-width", "64",
                                "--dec-heads", "1", "--ema-momentum", "0.9", *extra])


def small_model(*extra, seed=0):
    torch.manual_seed(seed)
    args = small_args(*extra)
    cfg = maskclip.model_config(args)
    model, teacher = maskclip.build_model(cfg, args)
    return model, teacher, args


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = common.tokenize([common.render_shapes(seed, i, 32)[1] for i in range(n)], 24)
    return images, texts


# ---------------------------------------------------------------------------------------------- losses
def naive_clip_losses(img, txt, scale):
    """Double loop over pairs: L_I = mean_i -log(e^{s·i_i·t_i} / Σ_j e^{s·i_i·t_j}), L_T likewise."""
    n = img.shape[0]
    li = lt = 0.0
    for i in range(n):
        li = li - torch.log(torch.exp(scale * img[i] @ txt[i])
                            / sum(torch.exp(scale * img[i] @ txt[j]) for j in range(n)))
        lt = lt - torch.log(torch.exp(scale * txt[i] @ img[i])
                            / sum(torch.exp(scale * txt[i] @ img[j]) for j in range(n)))
    return li / n, lt / n


def test_contrastive_loss_matches_naive_forward_and_backward(world1):
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    li, lt = maskclip.contrastive_loss(img, txt, scale)
    (li + lt).backward()
    grads = [t.grad.clone() for t in (img, txt, scale)]
    img2, txt2, scale2 = (t.detach().clone().requires_grad_() for t in (img, txt, scale))
    ri, rt = naive_clip_losses(img2, txt2, scale2.exp())
    (ri + rt).backward()
    torch.testing.assert_close(li, ri)
    torch.testing.assert_close(lt, rt)
    for a, b in zip(grads, (img2.grad, txt2.grad, scale2.grad)):
        torch.testing.assert_close(a, b)
    # symmetric: swapping the towers swaps the two directions
    li_s, lt_s = maskclip.contrastive_loss(txt.detach(), img.detach(), scale.detach())
    torch.testing.assert_close((li_s, lt_s), (lt.detach(), li.detach()))


def test_distillation_loss_matches_naive():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 5, generator=g).softmax(-1)
    loss = maskclip.distillation_loss(student, teacher, 0.1)
    loss.backward()
    s2 = student.detach().clone().requires_grad_()
    ref = 0.0
    for b in range(2):
        for k in range(3):
            logp = s2[b, k] / 0.1 - torch.logsumexp(s2[b, k] / 0.1, 0)
            ref = ref - (teacher[b, k] * logp).sum()
    ref = ref / 6
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(student.grad, s2.grad)


def test_mlm_loss_matches_naive(world1):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 11, generator=g, requires_grad=True)
    targets = torch.tensor([1, 4, 4, 0, 10])
    loss = maskclip.mlm_loss(logits, targets)
    loss.backward()
    l2 = logits.detach().clone().requires_grad_()
    ref = sum(-(l2[i, targets[i]] - torch.logsumexp(l2[i], 0)) for i in range(5)) / 5
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits.grad, l2.grad)


def test_losses_run_without_a_process_group():
    """Copied into a program that never calls init_process_group, the losses are those of a world of one."""
    import torch.distributed as dist
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(3)
    img, txt = (F.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(2))
    li, lt = maskclip.contrastive_loss(img, txt, torch.tensor(0.0))
    torch.testing.assert_close((li, lt), naive_clip_losses(img, txt, torch.tensor(1.0)))
    logits, targets = torch.randn(5, 11, generator=g), torch.randint(0, 11, (5,), generator=g)
    torch.testing.assert_close(maskclip.mlm_loss(logits, targets), F.cross_entropy(logits, targets))
    model, teacher, args = small_model("--quant-center")
    keep, masked = maskclip.random_masking(4, 16, 0.75, "cpu")
    assert teacher.targets(batch()[0], masked).shape == (4, 12, 16)


def test_total_loss_is_the_sum_of_eq8(world1):
    model, teacher, args = small_model("--dist-weight", "0.3", "--mlm-weight", "0.7")
    images, texts = batch()
    torch.manual_seed(5)
    loss, m = maskclip.train_step(model, model, teacher, (images, texts, torch.zeros(4)), 0, SCHED, args, CPU)
    expected = m["loss_i2t"] + m["loss_t2i"] + 0.3 * m["loss_dist"] + 0.7 * m["loss_mlm"]
    torch.testing.assert_close(loss, expected)
    # both weights 0: plain CLIP, with none of the extra modules
    clip, clip_teacher, clip_args = small_model("--dist-weight", "0", "--mlm-weight", "0")
    assert clip_teacher is None and not hasattr(clip, "decoder") and not hasattr(clip, "text_decoder")
    loss, m = maskclip.train_step(clip, clip, None, (images, texts, torch.zeros(4)), 0, SCHED, clip_args, CPU)
    torch.testing.assert_close(loss, m["loss_i2t"] + m["loss_t2i"])


# ---------------------------------------------------------------------------------------------- masking
def test_random_masking_counts_and_complement():
    torch.manual_seed(0)
    keep, masked = maskclip.random_masking(64, 16, 0.75, "cpu")
    assert keep.shape == (64, 4)
    assert masked.shape == (64, 12)
    assert torch.equal(masked, maskclip.masked_indices(keep, 16))  # the masked patches in increasing order
    for k, m in zip(keep, masked):
        assert len(set(k.tolist())) == 4
        assert sorted(k.tolist() + m.tolist()) == list(range(16))
    assert len({tuple(sorted(k.tolist())) for k in keep}) > 1  # differs between samples
    assert maskclip.random_masking(2, 196, 0.75, "cpu")[0].shape == (2, 49)  # int(196 · 0.25)


def test_mlm_masking_never_masks_special_tokens_and_counts():
    torch.manual_seed(0)
    texts = common.tokenize(["a red circle", "there is a large blue star and a green square in the corner", ""], 24)
    for rule in (False, True):
        mlm_input, positions, targets = maskclip.mlm_masking(texts, 0.2, rule)
        masked = torch.zeros(texts.numel(), dtype=torch.bool)
        masked[positions] = True
        masked = masked.view(texts.shape)
        assert not (masked & ((texts == 0) | (texts == common.SOT_ID) | (texts == common.EOT_ID))).any()
        words = ((texts != 0) & (texts != common.SOT_ID) & (texts != common.EOT_ID)).sum(1)
        assert masked.sum(1).tolist() == [max(1, round(0.2 * w)) if w else 0 for w in words.tolist()]
        torch.testing.assert_close(targets, texts.flatten()[positions])
        assert (mlm_input[~masked] == texts[~masked]).all()  # only masked positions change
        if not rule:
            assert (mlm_input[masked] == -1).all()


def test_mlm_80_10_10_proportions():
    torch.manual_seed(0)
    texts = torch.randint(1, 1000, (4000, 12))
    texts[:, 0], texts[:, -1] = common.SOT_ID, common.EOT_ID
    mlm_input, positions, targets = maskclip.mlm_masking(texts, 0.2, True)
    replaced = mlm_input.flatten()[positions]
    frac_mask = (replaced == -1).float().mean().item()
    frac_same = (replaced == targets).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.02


def test_eot_pooling_uses_the_unmasked_caption(world1):
    model, teacher, args = small_model()
    _, texts = batch()
    mlm_input, _, _ = maskclip.mlm_masking(texts, 0.5)
    pooled = model.encode_text(texts)
    x = model.text_tokens(texts)
    torch.testing.assert_close(pooled,
                               x[torch.arange(4), (texts == common.EOT_ID).int().argmax(1)] @ model.text_projection)
    assert (mlm_input.argmax(-1) == texts.argmax(-1)).all()  # [MASK] is -1 < EOT: argmax still finds EOT


# ---------------------------------------------------------------------------------------------- teacher
def test_teacher_starts_equal_gets_no_grad_and_ema_update_is_exact(world1):
    model, teacher, args = small_model()
    for (n, p), (_, q) in zip(model.visual.named_parameters(), teacher.visual.named_parameters()):
        assert torch.equal(p, q), n
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    teacher.train()
    assert not teacher.training  # stays in eval mode
    images, texts = batch()
    loss, _ = maskclip.train_step(model, model, teacher, (images, texts, torch.zeros(4)), 0, SCHED, args, CPU)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.update(model, 0.9)
    for name, p in list(model.visual.named_parameters()):
        torch.testing.assert_close(teacher.state_dict()["visual." + name],
                                   0.9 * before["visual." + name] + 0.1 * p.detach())
    for name, p in list(model.quantizer.named_parameters()):
        torch.testing.assert_close(teacher.state_dict()["quantizer." + name],
                                   0.9 * before["quantizer." + name] + 0.1 * p.detach())


def test_teacher_sees_the_full_image_and_targets_masked_positions(world1):
    model, teacher, args = small_model()
    images, _ = batch()
    keep, masked = maskclip.random_masking(4, 16, 0.75, "cpu")
    probs = teacher.targets(images, masked)
    assert probs.shape == (4, 12, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 12))
    full = F.softmax(teacher.quantizer(teacher.visual.ln_post(teacher.visual(images))[:, 1:]) / args.tau_t, -1)
    torch.testing.assert_close(probs, full.gather(1, masked[..., None].expand(-1, -1, 16)))
    # the teacher's input is the unmasked image: changing a visible patch's pixels changes the targets
    images2 = images.clone()
    b, k = 0, keep[0, 0].item()
    images2[b, :, (k // 4) * 8:(k // 4) * 8 + 8, (k % 4) * 8:(k % 4) * 8 + 8] += 3
    assert not torch.allclose(teacher.targets(images2, masked)[0], probs[0])


def test_gradient_routing(world1):
    model, teacher, args = small_model()
    images, texts = batch()
    keep, masked = maskclip.random_masking(4, 16, 0.75, "cpu")
    dist_loss = maskclip.distillation_loss(model.predict_masked(images, keep, masked), teacher.targets(images, masked),
                                           0.1)
    dist_loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"visual.conv1.weight", "decoder_embed.weight", "mask_token", "quantizer.codewords"} <= grads
    assert not any(n.startswith(("transformer.", "token_embedding", "text_", "ln_final", "mlm_", "vocab"))
                   for n in grads)
    model.zero_grad()
    mlm_input, positions, targets = maskclip.mlm_masking(texts, 0.2)
    maskclip.mlm_loss(model.mlm_logits(mlm_input, positions), targets).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"transformer.resblocks.0.attn.in_proj_weight", "text_decoder.resblocks.0.mlp.c_fc.weight",
            "mlm_mask_embedding", "vocab_head.weight"} <= grads
    assert not any(n.startswith(("visual.", "decoder", "quantizer", "mask_token")) for n in grads)
    model.zero_grad()
    li, lt = maskclip.contrastive_loss(F.normalize(model.encode_image(images), dim=-1),
                                       F.normalize(model.encode_text(texts), dim=-1), model.logit_scale)
    (li + lt).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"visual.proj", "text_projection", "logit_scale", "visual.conv1.weight", "token_embedding.weight"} <= grads


@pytest.mark.parametrize("flags", [["--masked-encoding", "mask-token"], ["--quant-center"], ["--quant-mlp"],
                                   ["--mlm-bidir-encoder", "--tie-vocab", "--mlm-80-10-10"], ["--text-dec-depth", "0"]])
def test_mode_flags_run_and_give_finite_losses(world1, flags):
    model, teacher, args = small_model(*flags)
    images, texts = batch()
    loss, metrics = maskclip.train_step(model, model, teacher, (images, texts, torch.zeros(4)), 0, SCHED, args, CPU)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v.item()) for v in metrics.values())


def test_logit_scale_clamped_after_step(world1):
    model, teacher, args = small_model()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    maskclip.after_step(model, teacher, 0, SCHED, args)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_lr_schedule():
    lr = [maskclip.lr_at(s, 100, 10, 1.0, 0.1, 0.01) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[10] == pytest.approx(1.0) and lr[100] == pytest.approx(0.01)
    assert lr[5] == pytest.approx(0.55) and lr[55] == pytest.approx(0.01 + 0.99 * 0.5)


def test_no_weight_decay_groups(world1):
    model, _, args = small_model()
    opt = maskclip.make_optimizer(model, args, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    # SLIP's rule: ndim < 2, or 'bias' / 'ln' / 'bn' in the name; the embeddings (the [CLS] one too, 3-D in timm)
    # are decayed
    assert {"logit_scale", "visual.ln_pre.weight", "ln_final.bias",
            "visual.transformer.resblocks.0.attn.in_proj_bias", "mask_token"} <= no_decay
    assert {"visual.conv1.weight", "visual.proj", "text_projection", "transformer.resblocks.0.mlp.c_fc.weight",
            "token_embedding.weight", "positional_embedding", "visual.positional_embedding",
            "visual.class_embedding"} <= decay
    assert decay.isdisjoint(no_decay) and decay | no_decay == set(names.values())


def test_training_crops_are_bilinear_as_slip():
    crop = maskclip.train_transform(small_model()[2], {"image_size": 32})
    noise = random.Random(0)
    img = Image.frombytes("RGB", (64, 48), bytes(noise.randrange(256) for _ in range(64 * 48 * 3)))
    assert crop.resample == Image.BILINEAR
    a = crop(img, random.Random(0))
    crop.resample = Image.BICUBIC
    assert not torch.equal(a, crop(img, random.Random(0)))


# ---------------------------------------------------------------------------------------------- weights
def load_clip(path):
    return common.load_clip(str(path), maskclip.CLIP, maskclip.VisionTransformer)


def test_openai_layout_round_trip(world1, tmp_path):
    model, teacher, args = small_model()
    exports = maskclip.export_state_dicts(model.state_dict(), teacher.state_dict())
    cfg = maskclip.model_config(args)
    for name, sd in exports.items():
        assert all(k.startswith(common.OPENAI_PREFIXES) for k in sd)
        common.export_weights(tmp_path / f"{name}.pt", sd, cfg, norm=args.norm, method="maskclip", weights=name)
    clip, info = load_clip(tmp_path / "online.pt")
    images, texts = batch()
    torch.testing.assert_close(clip.encode_image(images), model.encode_image(images))
    torch.testing.assert_close(clip.encode_text(texts), model.encode_text(texts))
    ema, _ = load_clip(tmp_path / "ema.pt")
    with torch.no_grad():
        expected = teacher.visual.ln_post(teacher.visual(images)[:, 0]) @ model.visual.proj
    torch.testing.assert_close(ema.encode_image(images), expected)
    # a plain OpenAI-named state dict (no config), architecture inferred from the shapes
    plain = {k: v for k, v in exports["online"].items()}
    torch.save(plain, tmp_path / "plain.pt")
    inferred, _ = load_clip(tmp_path / "plain.pt")
    assert inferred.visual.transformer.layers == 4 and inferred.transformer.layers == 2
    torch.testing.assert_close(inferred.encode_text(texts), model.encode_text(texts))


# ---------------------------------------------------------------------------------------------- distributed
def _grads_one_step(rank, world, full_images, full_texts, keep, mlm_masked_flat, mlm_input):
    """Loss and gradients of one step with DDP on this rank's slice of a fixed global batch."""
    torch.manual_seed(0)
    args = small_args("--quant-center")
    cfg = maskclip.model_config(args)
    model, teacher = maskclip.build_model(cfg, args)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    b = full_images.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    images, texts = full_images[sl], full_texts[sl]
    masked = mlm_masked_flat.view(full_texts.shape)[sl].flatten()
    positions = masked.nonzero()[:, 0]
    masked_patches = maskclip.masked_indices(keep[sl], 16)
    loss, metrics = ddp(images, texts, keep=keep[sl], masked=masked_patches,
                        teacher_probs=teacher.targets(images, masked_patches),
                        mlm_input=mlm_input[sl], mlm_positions=positions, mlm_targets=texts.flatten()[positions])
    loss.backward()
    return {"loss": loss.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "center": teacher.center.clone()}


def test_two_gloo_processes_match_one_process(tmp_path):
    torch.manual_seed(1)
    images, texts = batch(8, seed=3)
    keep, masked_patches = maskclip.random_masking(8, 16, 0.75, "cpu")
    mlm_input, positions, _ = maskclip.mlm_masking(texts, 0.3)
    masked = torch.zeros(texts.numel(), dtype=torch.bool)
    masked[positions] = True
    one = run_distributed(_grads_one_step, 1, tmp_path / "one", images, texts, keep, masked, mlm_input)
    two = run_distributed(_grads_one_step, 2, tmp_path / "two", images, texts, keep, masked, mlm_input)
    torch.testing.assert_close((two[0]["loss"] + two[1]["loss"]) / 2, one[0]["loss"], rtol=1e-5, atol=1e-5)
    assert set(two[0]["grads"]) == set(one[0]["grads"])
    for name, g in one[0]["grads"].items():
        torch.testing.assert_close(two[0]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(two[1]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(two[0]["center"], one[0]["center"])



# ---------------------------------------------------------------------------------------------- CLI
def test_cli_smoke_run_and_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("maskclip.py", *TINY, "--steps", "3", "--out-dir", out)
    assert "done: 3 steps" in proc.stdout + proc.stderr
    for name in ("checkpoint.pt", "export_online.pt", "export_ema.pt", "args.json", "env.json", "metrics.jsonl",
                 "code/maskclip.py", "code/common.py"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert {"online/top1", "ema/top1"} <= set(records[-1]["eval"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["method"] == "maskclip"
    # running again into the same folder without --resume must not overwrite it
    again = run_cli("maskclip.py", *TINY, "--steps", "3", "--out-dir", out, check=False)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "--resume" in again.stderr


def test_cli_two_processes_under_torchrun_then_resume_on_one(tmp_path):
    """The real main loop with DDP over two gloo processes (torchrun), and its checkpoint resumed by one."""
    out = tmp_path / "two"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "maskclip.py", *TINY, "--steps", "2", "--out-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout + proc.stderr and "done: 2 steps" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # written once, by rank 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    proc = run_cli("maskclip.py", *TINY, "--steps", "3", "--out-dir", out, "--resume")
    assert "resuming on 1 processes from 2" in proc.stdout + proc.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_cli_exact_resume(tmp_path):
    """3 steps, stop, resume 3 more (crossing an epoch boundary: 4 steps per epoch) equals 6 straight steps."""
    args = [*TINY, "--save-every", "100"]
    run_cli("maskclip.py", *args, "--steps", "6", "--out-dir", tmp_path / "straight", "--workers", "1")
    run_cli("maskclip.py", *args, "--steps", "3", "--out-dir", tmp_path / "split")
    run_cli("maskclip.py", *args, "--steps", "6", "--out-dir", tmp_path / "split", "--resume")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)
    for k in a["teacher"]:
        torch.testing.assert_close(a["teacher"][k], b["teacher"][k], rtol=0, atol=1e-6, msg=k)


def test_cli_bad_resume_and_foreign_checkpoint(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"")
    none, made, empty = run_clis([("maskclip.py", *TINY, "--out-dir", tmp_path / "none", "--resume"),
                                  ("maskclip.py", *TINY, "--steps", "1", "--out-dir", tmp_path / "a"),
                                  ("maskclip.py", *TINY, "--out-dir", tmp_path / "b", "--resume")], check=False)
    assert none.returncode == 2 and "no checkpoint" in none.stderr and none.stderr.strip().count("\n") == 0
    assert made.returncode == 0, made.stderr[-3000:]
    assert empty.returncode == 2 and "not a readable checkpoint" in empty.stderr
    assert empty.stderr.strip().count("\n") == 0
    proc = run_cli("maskclip.py", *TINY, "--steps", "2", "--out-dir", tmp_path / "a", "--resume",
                   "--dist-weight", "0", check=False)  # another architecture: no decoder, no teacher
    assert proc.returncode != 0 and "error" in proc.stderr


def test_cli_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run_cli("maskclip.py", *TINY, "--steps", "50", "--out-dir", out, "--lr", "1e30", "--warmup-epochs", "0",
                   "--save-every", "1", check=False)
    assert proc.returncode != 0 and "non-finite loss" in proc.stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_cli_sigterm_saves_then_exits(tmp_path):
    out = tmp_path / "term"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "maskclip.py"), *TINY, "--steps", "100000",
                             "--out-dir", str(out), "--save-every", "100000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM" in stdout + stderr
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 100000
