"""MaskDistill: the block-mask generator (and --max-mask-patches-per-block), the [MASK] token, the student's
attention and relative position bias, the regression loss against a naive reference (forward and gradients),
the frozen teacher (loading from OpenAI-layout files built here, pixel conversion, grid alignment, the crop
resized for a teacher of another size, no gradient), the one-line teacher errors, the teacher file read once,
the losses without a process group, distributed equivalence, and the real CLI (smoke run, resume, no
arguments, no image-text flags)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import random
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import ROOT, run_cli, run_distributed

import common
import maskdistill as md

TINY_TEACHER = dict(image_size=32, patch_size=8, width=64, layers=1, heads=1, context_length=8, text_width=64,
                    text_layers=1, text_heads=1, embed_dim=48)
CLI = ["--workers", "0", "--batch-size", "8", "--builtin-samples", "32", "--knn-samples", "64", "--log-every", "1",
       "--eval-every", "0"]
SCHED, CPU = md.Schedule(total=10, warmup=0, steps_per_epoch=10), torch.device("cpu")


def save_clip(path, seed=0, export=False, visual_only=False, **overrides):
    """A tiny CLIP built with the shared class, saved as a plain OpenAI-layout state dict (as OpenAI's and
    open_clip's files hold), as an image-only state dict, or as our export (with its normalisation)."""
    torch.manual_seed(seed)
    cfg = dict(TINY_TEACHER, **overrides)
    clip = md.CLIP(**cfg, act="quickgelu")
    sd = clip.state_dict()
    if visual_only:
        sd = {k: v for k, v in sd.items() if k.startswith("visual.")}
    if export:
        common.export_weights(str(path), sd, dict(cfg, act="quickgelu"), norm="imagenet", method=md.METHOD,
                              weights="online")
    else:
        torch.save(sd, path)
    return clip


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "clip.pt"
    save_clip(path)
    return str(path)


def small(teacher_file, *extra, seed=0):
    args = md.parse_args(["--teacher", teacher_file, *extra])
    cfg = md.model_config(args)
    torch.manual_seed(seed)
    model, teacher = md.build_model(cfg, args)
    return model, teacher, args


def images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def random_masked(n, num_patches=16, count=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_patches, generator=g)[:count].sort().values for _ in range(n)])


# ---------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("grid,count,min_block,draws", [((14, 14), 75, 16, 300), ((8, 8), 25, 4, 1000),
                                                        ((4, 4), 6, 2, 1000)])
def test_block_masks_have_the_exact_count(grid, count, min_block, draws):
    gen = md.BlockMaskGenerator(grid, count, min_block)
    rng = random.Random(0)
    for _ in range(draws):
        mask = gen(rng)
        assert mask.shape == grid and mask.dtype == bool and mask.sum() == count


def test_fill_path_reaches_the_count_when_no_block_fits():
    # an 8 × 1 grid: a block needs w < 1, impossible, so all patches come from the uniform fill
    gen = md.BlockMaskGenerator((8, 1), 3, 1)
    rng = random.Random(0)
    assert gen._block(np.zeros((8, 1), dtype=bool), 3, rng) == 0
    masks = [gen(rng) for _ in range(200)]
    assert all(m.sum() == 3 for m in masks)
    assert len({m.tobytes() for m in masks}) > 10  # the fill is random


def test_one_block_is_a_rectangle_within_the_aspect_bounds():
    gen = md.BlockMaskGenerator((14, 14), 75, 16)
    rng = random.Random(1)
    for _ in range(500):
        mask = np.zeros((14, 14), dtype=bool)
        added = gen._block(mask, 75, rng)
        if added == 0:
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert mask.sum() == added == h * w                      # one filled rectangle
        assert h < 14 and w < 14 and 11 <= added <= 75      # area drawn in [16, 75], sides rounded
        # h = round(sqrt(a·r)), w = round(sqrt(a/r)) with r in [0.3, 1/0.3]: h/w within the bounds up to rounding
        assert (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3


def test_block_masks_are_blocky_and_deterministic():
    def components(mask):
        seen, n = np.zeros_like(mask), 0
        for start in zip(*np.nonzero(mask)):
            if seen[start]:
                continue
            n, stack = n + 1, [start]
            while stack:
                i, j = stack.pop()
                if 0 <= i < mask.shape[0] and 0 <= j < mask.shape[1] and mask[i, j] and not seen[i, j]:
                    seen[i, j] = True
                    stack += [(i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)]
        return n
    block, rand = md.BlockMaskGenerator((8, 8), 25, 4), md.BlockMaskGenerator((8, 8), 25, 4, random=True)
    rng = random.Random(0)
    block_mean = np.mean([components(block(rng)) for _ in range(200)])
    rand_masks = [rand(rng) for _ in range(200)]
    assert all(m.sum() == 25 for m in rand_masks)
    assert block_mean < 0.5 * np.mean([components(m) for m in rand_masks])
    a, b = block(random.Random(5)), block(random.Random(5))
    assert np.array_equal(a, b) and not np.array_equal(a, block(random.Random(6)))


def test_bad_mask_counts_are_value_errors_and_one_line_usage_errors_at_start_up(teacher_file):
    with pytest.raises(ValueError, match="between 1 and 15"):
        md.BlockMaskGenerator((4, 4), 16, 2)
    with pytest.raises(ValueError, match="at least 1"):
        md.BlockMaskGenerator((4, 4), 6, 0)
    with pytest.raises(SystemExit):  # out of its range: an argparse error (tests/test_flags.py)
        md.parse_args(["--teacher", teacher_file, "--min-mask-patches-per-block", "0"])
    for flags, what in ((["--num-mask-patches", "16"], "between 1 and 15"),):
        args = md.parse_args(["--teacher", teacher_file, *flags])
        with pytest.raises(common.UsageError, match=what) as e:
            md.train_transform(args, md.model_config(args))
        assert "\n" not in str(e.value) and "--num-mask-patches" in str(e.value)


def test_max_block_flag_bounds_the_blocks_and_is_range_checked(teacher_file):
    """--max-mask-patches-per-block (BEiT v2's max_mask_patches_per_block, default None = the count): smaller
    blocks give other, more scattered masks with the same count; values outside [min, count] are errors."""
    default, small = md.BlockMaskGenerator((14, 14), 75, 16), md.BlockMaskGenerator((14, 14), 75, 16, max_block=16)
    assert default.max_block == 75 and md.BlockMaskGenerator((14, 14), 75, 16, max_block=75).max_block == 75
    masks = [(default(random.Random(i)), small(random.Random(i))) for i in range(50)]
    assert all(a.sum() == b.sum() == 75 for a, b in masks) and sum(not np.array_equal(a, b) for a, b in masks) > 40
    rng = random.Random(0)
    for _ in range(200):  # every block the small generator places adds at most 16 patches
        assert small._block(np.zeros((14, 14), dtype=bool), min(75, small.max_block), rng) <= 16
    for bad in (15, 76):
        with pytest.raises(ValueError, match="between the smallest"):
            md.BlockMaskGenerator((14, 14), 75, 16, max_block=bad)
    args = md.parse_args(["--teacher", teacher_file, "--max-mask-patches-per-block", "1"])  # demo: blocks from 2
    assert md.parse_args([]).max_mask_patches_per_block is None
    with pytest.raises(common.UsageError, match="--max-mask-patches-per-block: the largest block, 1 patches") as e:
        md.train_transform(args, md.model_config(args))
    assert "\n" not in str(e.value)
    args = md.parse_args(["--teacher", teacher_file, "--max-mask-patches-per-block", "2"])
    view = md.train_transform(args, md.model_config(args))
    assert view.masks.max_block == 2
    assert view(common.render_shapes(0, 3)[0], common.sample_rng(0, 0, 3))[1].shape == (6,)


def test_default_mask_count_is_75_of_196_scaled():
    args = md.parse_args(["--train-data", "x"])
    assert md.num_mask_patches(args, md.model_config(args)) == 75 and args.min_mask_patches_per_block == 16
    demo = md.parse_args([])
    assert md.num_mask_patches(demo, md.model_config(demo)) == 6
    assert md.num_mask_patches(md.parse_args(["--train-data", "x", "--model", "ViT-H/14"]),
                               md.model_config(md.parse_args(["--model", "ViT-H/14"]))) == 98


def test_transform_returns_the_view_and_sorted_masked_indices(teacher_file):
    args = md.parse_args(["--teacher", teacher_file, "--color-jitter", "0.4"])
    transform = md.train_transform(args, md.model_config(args))
    img = common.render_shapes(0, 3)[0]
    x, masked = transform(img, common.sample_rng(0, 0, 3))
    assert x.shape == (3, 32, 32) and masked.dtype == torch.long and masked.shape == (6,)
    assert masked.tolist() == sorted(set(masked.tolist())) and 0 <= masked.min() and masked.max() < 16
    x2, masked2 = transform(img, common.sample_rng(0, 0, 3))
    assert torch.equal(x, x2) and torch.equal(masked, masked2)


# ---------------------------------------------------------------------------------------------- student
def test_masked_positions_carry_the_mask_token(world1, teacher_file):
    model, _, _ = small(teacher_file)
    x, masked = images(), random_masked(4)
    tokens = model.embed(x, masked)                                      # (B, 1+N, D)
    patches = model.patch_embed(x).flatten(2).transpose(1, 2)
    is_masked = torch.zeros(4, 16, dtype=torch.bool).scatter(1, masked, True)
    assert tokens.shape == (4, 17, 128)
    assert torch.equal(tokens[:, 0], model.cls_token[0].expand(4, -1))
    assert torch.equal(tokens[:, 1:][is_masked], model.mask_token.reshape(1, -1).expand(24, -1))
    assert torch.equal(tokens[:, 1:][~is_masked], patches[~is_masked])
    # pixels inside masked patches do not matter; pixels of a visible patch do
    b, p = 0, masked[0, 0].item()
    y = x.clone()
    y[b, :, (p // 4) * 8:(p // 4) * 8 + 8, (p % 4) * 8:(p % 4) * 8 + 8] += 5
    assert torch.equal(model.encode(y, masked), model.encode(x, masked))
    v = int((~is_masked[0]).nonzero()[0])
    y[b, :, (v // 4) * 8:(v // 4) * 8 + 8, (v % 4) * 8:(v % 4) * 8 + 8] += 5
    assert not torch.equal(model.encode(y, masked)[0], model.encode(x, masked)[0])


def test_relative_position_bias_matches_a_naive_index_and_is_shared(world1, teacher_file):
    rpb = md.RelativePositionBias(3, 3, 2)
    with torch.no_grad():
        rpb.table.copy_(torch.randn_like(rpb.table))
    bias = rpb()
    assert bias.shape == (2, 10, 10)
    n_rel = 5 * 5 + 3
    for i in range(10):
        for j in range(10):
            if i == 0 and j == 0:
                k = n_rel - 1
            elif i == 0:
                k = n_rel - 3
            elif j == 0:
                k = n_rel - 2
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, 3), divmod(j - 1, 3)
                k = (yi - yj + 2) * 5 + (xi - xj + 2)
            torch.testing.assert_close(bias[:, i, j], rpb.table[k])
    model, _, _ = small(teacher_file)
    assert sum(isinstance(m, md.RelativePositionBias) for m in model.modules()) == 1
    assert model.rel_pos_bias.table.shape == (7 * 7 + 3, 2) and (model.rel_pos_bias.table == 0).all()
    assert not hasattr(model, "pos_embed") and \
        not any("pos" in n and "rel_pos" not in n for n, _ in model.named_parameters())


def test_attention_matches_naive_with_q_v_biases_and_relative_bias():
    torch.manual_seed(0)
    attn = md.BEiTAttention(8, 2)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x, bias = torch.randn(3, 5, 8), torch.randn(2, 5, 5)
    out = attn(x, bias)
    w = attn.qkv.weight
    q, k, v = x @ w[:8].t() + attn.q_bias, x @ w[8:16].t(), x @ w[16:].t() + attn.v_bias   # k: no bias
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        a = (q[..., s] @ k[..., s].transpose(1, 2) / 2.0 + bias[h]).softmax(-1)
        heads.append(a @ v[..., s])
    torch.testing.assert_close(out, attn.proj(torch.cat(heads, -1)), rtol=1e-5, atol=1e-5)


def test_init_layer_scale_and_residual_rescaling(world1, teacher_file):
    model, _, args = small(teacher_file, "--model", "ViT-S/16", "--num-mask-patches", "75")
    for block in model.blocks:
        assert torch.equal(block.gamma_1, torch.full((384,), 0.1)) and \
            torch.equal(block.gamma_2, torch.full((384,), 0.1))
        assert block.attn.qkv.bias is None and (block.attn.q_bias == 0).all() and (block.attn.v_bias == 0).all()
        assert block.norm1.eps == 1e-6
    # trunc-normal(0.02) cut at ±0.02 has std 0.02·0.5399…; block l's residual outputs are divided by sqrt(2l)
    base = 0.02 * math.sqrt(1 - 2 * 0.24197 / 0.68269)
    for layer in (1, 6, 12):
        block = model.blocks[layer - 1]
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(base / math.sqrt(2 * layer), rel=0.03)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(base, rel=0.03)
        assert block.mlp.c_proj.weight.abs().max() <= 0.02 / math.sqrt(2 * layer)
    large = md.MaskDistill(**common.MODELS["tiny"] | {"act": "gelu", "width": 1024, "heads": 16, "layers": 1},
                           target_dim=8, layer_scale=md.layer_scale_init(args.layer_scale_init, 1024))
    assert (large.blocks[0].gamma_1 == 1e-5).all()
    off = md.MaskDistill(**common.MODELS["tiny"], act="gelu", target_dim=8, layer_scale=0.0)
    assert off.blocks[0].gamma_1 is None
    assert md.layer_scale_init(None, 768) == 0.1 and md.layer_scale_init(0.5, 1024) == 0.5


def test_no_weight_decay_groups(world1, teacher_file):
    model, _, args = small(teacher_file)
    opt = md.make_optimizer(model, args, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert {"cls_token", "blocks.0.gamma_1", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.norm1.weight",
            "head.bias", "patch_embed.bias"} <= no_decay
    assert {"mask_token", "rel_pos_bias.table", "patch_embed.weight", "blocks.0.attn.qkv.weight",
            "head.weight"} <= decay


# ---------------------------------------------------------------------------------------------- loss
def naive_smooth_l1(pred, target, beta):
    total = 0.0
    for p, t in zip(pred.flatten().unbind(), target.flatten().unbind()):
        d = (p - t).abs()
        total = total + (0.5 * d ** 2 / beta if d < beta else d - 0.5 * beta)
    return total / pred.numel()


@pytest.mark.parametrize("kind,beta", [("smooth-l1", 1.0), ("smooth-l1", 2.0), ("mse", 1.0), ("cosine", 1.0)])
def test_regression_loss_matches_naive(kind, beta):
    g = torch.Generator().manual_seed(0)
    pred = (2 * torch.randn(2, 3, 5, generator=g)).requires_grad_()
    target = torch.randn(2, 3, 5, generator=g)
    loss = md.regression_loss(pred, target, kind, beta)
    loss.backward()
    p2 = pred.detach().clone().requires_grad_()
    if kind == "smooth-l1":
        ref = naive_smooth_l1(p2, target, beta)
    elif kind == "mse":
        ref = sum(((p2[b, i] - target[b, i]) ** 2).sum() for b in range(2) for i in range(3)) / 30
    else:
        ref = sum(1 - (p2[b, i] @ target[b, i]) / (p2[b, i].norm() * target[b, i].norm())
                  for b in range(2) for i in range(3)) / 6
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pred.grad, p2.grad)


def test_target_normalisation_is_layernorm_without_affine():
    t = 3 + 5 * torch.randn(4, 7, 32)
    n = md.normalize_targets(t)
    mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(n, (t - mean) / torch.sqrt(var + 1e-5))
    assert torch.equal(md.normalize_targets(t, "none"), t)


def test_model_loss_covers_masked_patches_only_forward_and_gradients(world1, teacher_file):
    model, teacher, _ = small(teacher_file, "--smooth-l1-beta", "0.5")
    x, masked = images(), random_masked(4)
    full_target = teacher.targets(x)                                      # (B, N, D_t)
    loss, _ = model(x, masked, md.gather_tokens(full_target, masked))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # naive: boolean selection of the masked patches, a loop over them, Smooth-L1 written out
    is_masked = torch.zeros(4, 16, dtype=torch.bool).scatter(1, masked, True)
    tokens = model.encode(x, masked)[:, 1:]
    pred = torch.stack([model.head(tokens[b, i]) for b in range(4) for i in range(16) if is_masked[b, i]])
    target = torch.stack([full_target[b, i] for b in range(4) for i in range(16) if is_masked[b, i]])
    ref = naive_smooth_l1(pred, target, 0.5)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    # targets at visible patches never enter: changing them leaves the loss as it is
    changed = full_target.clone()
    changed[~is_masked] += 10
    torch.testing.assert_close(model(x, masked, md.gather_tokens(changed, masked))[0], loss)
    changed[is_masked] += 1
    assert not torch.allclose(model(x, masked, md.gather_tokens(changed, masked))[0], loss)


@pytest.mark.parametrize("flags", [["--loss", "mse", "--target-norm", "none"],
                                   ["--loss", "cosine", "--mask-type", "random"],
                                   ["--teacher-output", "pre_ln_post", "--drop-path", "0.1", "--grad-checkpointing"],
                                   ["--teacher-output", "ln_post", "--layer-scale-init", "0"]])
def test_variant_flags_run(world1, teacher_file, flags):
    model, teacher, args = small(teacher_file, *flags)
    transform = md.train_transform(args, md.model_config(args))
    items = [common.Shapes("train", 8, transform, target="label")[i] for i in range(4)]
    loss, _ = md.train_step(model, model, teacher, common.collate(items), 0, SCHED, args, CPU)
    loss.backward()
    assert math.isfinite(loss.item())
    assert model.head.out_features == (48 if args.teacher_output == "ln_post_proj" else 64)


def test_a_few_steps_on_one_batch_reduce_the_loss(world1, teacher_file):
    model, teacher, args = small(teacher_file)
    opt = md.make_optimizer(model, args, torch.device("cpu"))
    x, masked = images(8), random_masked(8)
    batch = ((x, masked), torch.zeros(8), torch.zeros(8))
    losses = []
    for step in range(15):
        loss, _ = md.train_step(model, model, teacher, batch, step, SCHED, args, CPU)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------------------------------------- teacher
def test_teacher_gets_no_gradient_and_stays_frozen(world1, teacher_file):
    model, teacher, args = small(teacher_file)
    assert teacher.frozen and not common.trained(teacher)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    teacher.train()
    assert not teacher.training
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = md.make_optimizer(model, args, torch.device("cpu"))
    batch = ((images(), random_masked(4)), torch.zeros(4), torch.zeros(4))
    loss, _ = md.train_step(model, model, teacher, batch, 0, SCHED, args, CPU)
    loss.backward()
    opt.step()
    md.after_step(model, teacher, 0, SCHED, args)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("layout", ["plain", "visual_only", "export"])
def test_teacher_from_an_openai_layout_file(world1, tmp_path, layout):
    path = tmp_path / "t.pt"
    clip = save_clip(path, seed=3, export=layout == "export", visual_only=layout == "visual_only")
    model, teacher, args = small(str(path))
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(teacher.visual.state_dict()[k], v), k
    # the student's ImageNet-normalised pixels, converted to the teacher's normalisation: CLIP's for OpenAI and
    # open_clip files, the recorded one (ImageNet here) for our exports
    t_mean, t_std = common.NORMS["imagenet" if layout == "export" else "clip"]
    x = images(2)
    pixels = x * torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1) + \
        torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
    pixels = (pixels - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher.pixels(x), pixels)
    with torch.no_grad():
        ref = clip.visual.ln_post(clip.visual(pixels)[:, 1:]) @ clip.visual.proj      # ln_post_proj
    ref = F.layer_norm(ref, (48,))
    targets = teacher.targets(x)
    torch.testing.assert_close(targets, ref)
    assert targets.shape == (2, 16, 48) and model.head.out_features == 48
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    # the teacher sees the full image, whatever the student's mask
    feats = teacher.knn_features(x)
    assert feats.shape == (2, 48 + 48)


def test_teacher_with_another_patch_size_gets_a_resized_input(world1, tmp_path):
    path = tmp_path / "p16.pt"
    clip = save_clip(path, image_size=224, patch_size=16)          # 14 × 14 grid; the tiny student has 4 × 4 of 8 px
    _, teacher, _ = small(str(path))
    assert teacher.input_size == 64
    x = images(2)
    pixels = teacher.pixels(x)
    assert pixels.shape == (2, 3, 64, 64)
    targets = teacher.targets(x)
    assert targets.shape == (2, 16, 48)
    with torch.no_grad():  # the shared tower interpolates its 14 × 14 position embedding to 4 × 4
        ref = F.layer_norm(clip.visual.ln_post(clip.visual(pixels)[:, 1:]) @ clip.visual.proj, (48,))
    torch.testing.assert_close(targets, ref)


def test_teacher_of_another_size_gets_the_crop_resized_not_the_student_view(world1, tmp_path):
    """BEiT v2's two-size crop: the teacher's view is the same box (and flip) of the original image resized once
    to its size, made by the transform; train_step feeds it to the teacher as is (no second resize)."""
    save_clip(tmp_path / "p16.pt", image_size=224, patch_size=16)              # needs 4 × 16 = 64 px
    _, teacher, args = small(str(tmp_path / "p16.pt"))
    assert args.teacher_size == teacher.input_size == 64
    transform = md.train_transform(args, md.model_config(args))
    mean, std = common.NORMS[args.norm]
    samples = [transform(common.render_shapes(0, i)[0], common.sample_rng(0, 0, i)) for i in range(4)]
    for i, (x, masked, x_t) in enumerate(samples):
        img, rng = common.render_shapes(0, i)[0], common.sample_rng(0, 0, i)
        assert torch.equal(x, common.TrainCrop(32, (args.crop_scale, 1.0), mean, std, flip=True)(img, rng))
        rng = common.sample_rng(0, 0, i)
        assert torch.equal(x_t, common.TrainCrop(64, (args.crop_scale, 1.0), mean, std, flip=True)(img, rng))
        assert masked.shape == (6,)
    x, masked, x_t = (torch.stack(v) for v in zip(*samples))
    again = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False)
    assert (again - x_t).abs().mean() > 0.02                                    # not the 32-px view resized
    seen = []
    pixels = teacher.pixels
    teacher.pixels = lambda image: seen.append(image.shape) or pixels(image)
    model, _, _ = small(str(tmp_path / "p16.pt"))
    loss, _ = md.train_step(model, model, teacher, ((x, masked, x_t), torch.zeros(4), torch.zeros(4)), 0, SCHED,
                            args, CPU)
    assert seen == [(4, 3, 64, 64)] and torch.isfinite(loss)


def test_teacher_errors_are_one_line_and_say_how_to_get_a_teacher(world1, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    save_clip(tmp_path / "grid.pt", image_size=64, patch_size=8)           # 8 × 8 grid of 8 px vs the student's 4 × 4
    cases = {None: "needs|--teacher PATH", str(tmp_path / "missing.pt"): "does not exist",
             str(tmp_path / "garbage.pt"): "not a readable checkpoint", str(tmp_path / "other.pt"): "not a CLIP ViT",
             str(tmp_path / "grid.pt"): "grids must match"}
    for path, what in cases.items():
        args = md.parse_args(["--out-dir", str(tmp_path / "run")] + (["--teacher", path] if path else []))
        with pytest.raises(common.UsageError) as e:
            md.build_model(md.model_config(args), args)
        message = str(e.value)
        assert "\n" not in message and any(w in message for w in what.split("|")), message
        if path != str(tmp_path / "grid.pt"):
            assert "torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip" in message
            assert "--teacher runs/clip/export_online.pt" in message
    # a state dict whose shapes say CLIP but whose keys do not match fails in the strict loader, also in one line
    sd = torch.load(tmp_path / "grid.pt", weights_only=True)
    sd["visual.positional_embedding"] = sd["visual.positional_embedding"][:17]
    sd.pop("visual.ln_post.weight")
    torch.save(sd, tmp_path / "broken.pt")
    args = md.parse_args(["--teacher", str(tmp_path / "broken.pt")])
    with pytest.raises(common.UsageError, match="does not match a CLIP ViT.*runs/clip/export_online.pt"):
        md.build_model(md.model_config(args), args)


def test_teacher_file_is_read_once_and_the_student_init_does_not_depend_on_it(tmp_path, monkeypatch):
    reads = []
    read = common.read_weights_file
    monkeypatch.setattr(common, "read_weights_file", lambda path: reads.append(path) or read(path))
    for name in ("export.pt", "plain.pt"):
        save_clip(tmp_path / name, seed=1, export=name == "export.pt")
        args = md.parse_args(["--teacher", str(tmp_path / name)])
        torch.manual_seed(0)
        model, teacher = md.build_model(md.model_config(args), args)
        assert reads == [str(tmp_path / name)]
        reads.clear()
        # the student is built before the teacher's CLIP: its weights are those of the seed alone
        torch.manual_seed(0)
        alone = md.MaskDistill(**md.model_config(args), target_dim=48, layer_scale=0.1)
        assert all(torch.equal(v, alone.state_dict()[k]) for k, v in model.state_dict().items())
    assert isinstance(teacher, md.Teacher) and teacher.frozen and teacher.input_size == 32


def test_losses_and_a_step_run_without_a_process_group(teacher_file):
    assert not dist.is_initialized()
    model, teacher, args = small(teacher_file)
    batch = ((images(), random_masked(4)), torch.zeros(4), torch.zeros(4))
    loss, metrics = md.train_step(model, model, teacher, batch, 0, SCHED, args, CPU)
    loss.backward()
    assert math.isfinite(loss.item()) and metrics == {}
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    for kind in ("smooth-l1", "mse", "cosine"):
        assert math.isfinite(md.regression_loss(pred, target, kind).item())


# ---------------------------------------------------------------------------------------------- distributed
def _loss_and_grads(rank, world, teacher_path, full_images, full_masked):
    """Loss and gradients of one DDP step on this rank's slice of a fixed global batch."""
    args = md.parse_args(["--teacher", teacher_path])
    torch.manual_seed(0)
    model, teacher = md.build_model(md.model_config(args), args)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    b = full_images.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    batch = ((full_images[sl], full_masked[sl]), torch.zeros(b), torch.zeros(b))
    loss, _ = md.train_step(ddp, model, teacher, batch, 0, SCHED, args, CPU)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def test_two_gloo_processes_match_one_process(tmp_path, teacher_file):
    x, masked = images(8, seed=4), random_masked(8, seed=4)
    one = run_distributed(_loss_and_grads, 1, tmp_path / "one", teacher_file, x, masked)
    two = run_distributed(_loss_and_grads, 2, tmp_path / "two", teacher_file, x, masked)
    torch.testing.assert_close((two[0]["loss"] + two[1]["loss"]) / 2, one[0]["loss"], rtol=1e-5, atol=1e-6)
    assert set(two[0]["grads"]) == set(one[0]["grads"])
    for name, g in one[0]["grads"].items():
        torch.testing.assert_close(two[0]["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(two[1]["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_smoke_run_resume_and_eval_towers(tmp_path):
    teacher = tmp_path / "export_online.pt"
    save_clip(teacher, export=True)
    out = tmp_path / "run"
    proc = run_cli("maskdistill.py", "--teacher", teacher, *CLI, "--steps", "2", "--out-dir", out)
    assert "done: 2 steps" in proc.stdout + proc.stderr
    for name in ("checkpoint.pt", "args.json", "env.json", "metrics.jsonl", "code/maskdistill.py"):
        assert (out / name).exists(), name
    assert not list(out.glob("export_*.pt"))                      # the student is not a CLIP: nothing to export
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    results = records[-1]["eval"]
    assert {"student/knn_top1", "teacher/knn_top1", "teacher_targets/knn_top1"} == set(results)
    assert all(0 <= v <= 100 for v in results.values())
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["method"] == "maskdistill" and ckpt["teacher"] is None
    # the frozen teacher is read from --teacher again on resume
    run_cli("maskdistill.py", "--teacher", teacher, *CLI, "--steps", "3", "--out-dir", out, "--resume")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    student = md.eval_towers(ckpt)["student"]
    x = images(2)
    with torch.no_grad():
        assert student.features(x).shape == (2, 128)
        torch.testing.assert_close(student.features(x), student.encode(x)[:, 1:].mean(1))


def test_cli_without_arguments_prints_how_to_get_a_teacher(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "maskdistill.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip" in proc.stderr
    assert "--teacher runs/clip/export_online.pt" in proc.stderr
    assert not (tmp_path / "runs").exists()                        # failed before writing anything


def test_image_only_flags(capsys):
    """An image-only script has no caption, CSV, tar or context-length flags."""
    for flag in ("--csv-img-key", "--csv-caption-key", "--csv-separator", "--train-num-samples",
                 "--dataset-resampled", "--context-length"):
        with pytest.raises(SystemExit):
            md.parse_args([flag, "1"])
    assert "unrecognized arguments" in capsys.readouterr().err
    args = md.parse_args([])
    assert not hasattr(args, "context_length") and md.model_config(args)["context_length"] == 24
