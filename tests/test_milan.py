"""MILAN: semantic-aware masking (exact counts, bias towards high attention, the [CLS] row, random mode),
the prompting decoder (prompts bit-identical through every block, weights that cannot touch them,
gradient routing, order invariance, the block formula), the losses against naive references (forward
and gradients), the frozen teacher (no gradient, loaded from an OpenAI-layout state dict, normalisation,
one-line errors, a ResNet CLIP refused), per-sample mask keys, the base-lr rule, the keyword constructors,
the losses without a process group, distributed equivalence and the real CLI."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_cli, run_distributed

import common
import milan

SCHED, CPU = milan.Schedule(total=10, warmup=0, steps_per_epoch=10), torch.device("cpu")
HOWTO = "torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip"
TINY = ["--model", "tiny", "--workers", "0", "--batch-size", "8", "--builtin-samples", "32", "--dec-width", "32",
        "--dec-depth", "2", "--dec-heads", "4", "--knn-samples", "64", "--log-every", "1", "--eval-every", "0"]


def tiny_clip(seed=0, **over):
    """A tiny CLIP of the shared class (4×4 grid of 8-px patches at 32 px, as the tiny student)."""
    torch.manual_seed(seed)
    return milan.CLIP(**dict(common.MODELS["tiny"], act="quickgelu", **over))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """An OpenAI-layout state dict (plain `CLIP.state_dict()`, no config: the size is inferred)."""
    path = tmp_path_factory.mktemp("teacher") / "clip.pt"
    torch.save(tiny_clip().state_dict(), path)
    return str(path)


def small_args(teacher_file, *extra):
    return milan.parse_args(["--teacher", teacher_file, "--dec-width", "32", "--dec-depth", "2", "--dec-heads", "4",
                             *extra])


def small_model(teacher_file, *extra, seed=0):
    args = small_args(teacher_file, *extra)
    torch.manual_seed(seed)
    model, teacher = milan.build_model(milan.model_config(args), args)
    return model, teacher, args


def images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def fixed_masks(n=4, seed=0, N=16, K=4):
    order = torch.rand(n, N, generator=torch.Generator().manual_seed(seed)).argsort(1)
    return order[:, :K], order[:, K:]


def gumbel(n, N=16, g=None):
    """(n, N) i.i.d. Gumbel(0, 1) keys from a torch generator (what gumbel_keys draws per sample)."""
    return -torch.empty(n, N).exponential_(generator=g or torch.Generator().manual_seed(0)).log()


def batch_of(x):
    """A training batch ((images, keys), labels, skipped) for images x, with each sample's keys drawn by the
    real transform's rule from its own generator."""
    keys = torch.stack([milan.gumbel_keys(common.sample_rng(0, 0, i), 16) for i in range(x.shape[0])])
    return (x, keys), torch.zeros(x.shape[0]), torch.zeros(x.shape[0])


# ---------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("N,ratio", [(16, 0.75), (196, 0.75), (64, 0.5), (49, 0.9)])
def test_masks_have_exact_counts_and_partition_the_patches(N, ratio):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(5, N, generator=g) ** 4
    for keep, masked in (milan.semantic_masking(w, ratio, gumbel(5, N, g)),
                         milan.random_masking(gumbel(5, N, g), ratio)):
        K = int(N * (1 - ratio))
        assert keep.shape == (5, K) and masked.shape == (5, N - K)
        assert torch.equal(torch.cat([keep, masked], 1).sort(1).values, torch.arange(N).expand(5, N))


def test_semantic_masking_keeps_high_attention_patches():
    g = torch.Generator().manual_seed(0)
    # 4 patches with weight 1e6, K = 4: they are the visible set in (essentially) every draw
    w = torch.ones(500, 16)
    w[:, [1, 6, 11, 12]] = 1e6
    keep, _ = milan.semantic_masking(w, 0.75, gumbel(500, 16, g))
    hits = (keep.sort(1).values == torch.tensor([1, 6, 11, 12])).all(1).float().mean()
    assert hits > 0.99
    # graded weights: the empirical keep frequency is monotone in the weight (64 patches, 2000 draws)
    w = torch.linspace(0.01, 1.0, 64).expand(2000, 64)
    keep, _ = milan.semantic_masking(w, 0.75, gumbel(2000, 64, g))
    freq = torch.zeros(64).scatter_add_(0, keep.flatten(), torch.ones(keep.numel())) / 2000
    assert freq[48:].mean() > 2 * freq[:16].mean()
    ranks = freq.argsort().argsort().float()
    assert torch.corrcoef(torch.stack([ranks, torch.arange(64.0)]))[0, 1] > 0.95
    # same keep-set marginals as torch.multinomial(w, N, replacement=False), the official sampler
    ref = torch.multinomial(w, 64, replacement=False, generator=g)[:, :16]
    freq_ref = torch.zeros(64).scatter_add_(0, ref.flatten(), torch.ones(ref.numel())) / 2000
    sigma = (freq_ref * (1 - freq_ref) / 2000).sqrt() * 2 ** 0.5
    assert ((freq - freq_ref).abs() < 5 * sigma + 1e-3).all()
    # uniform weights: every patch kept with frequency K / N
    keep, _ = milan.semantic_masking(torch.ones(2000, 64), 0.75, gumbel(2000, 64, g))
    freq = torch.zeros(64).scatter_add_(0, keep.flatten(), torch.ones(keep.numel())) / 2000
    assert (freq - 0.25).abs().max() < 0.05


def test_random_mode_ignores_the_weights_and_semantic_mode_follows_them(teacher_file):
    args_r = small_args(teacher_file, "--mask", "random")
    args_s = small_args(teacher_file)
    w1 = torch.rand(64, 16, generator=torch.Generator().manual_seed(1))
    w2 = torch.zeros(64, 16).index_fill_(1, torch.tensor([0, 1, 2, 3]), 1.0)
    out = {}
    for name, args in (("random", args_r), ("semantic", args_s)):
        for i, w in enumerate((w1, w2)):
            out[name, i] = milan.make_masks(w, gumbel(64), args)
    assert torch.equal(out["random", 0][0], out["random", 1][0])
    assert not torch.equal(out["semantic", 0][0], out["semantic", 1][0])
    assert (out["semantic", 1][0].sort(1).values == torch.arange(4)).all()  # zero weights are never drawn first


def test_teacher_attention_is_the_last_blocks_cls_row_averaged_over_heads(teacher_file):
    _, teacher, _ = small_model(teacher_file)
    x = images()
    targets, w = teacher(x)
    v = teacher.visual
    # by hand: tokens entering the last block, its ln_1, softmax(q kᵀ / √d) per head, row 0, mean over heads
    h = v.ln_pre(torch.cat([(v.class_embedding + v.positional_embedding[0]).expand(4, 1, -1),
                            v.conv1(x).flatten(2).transpose(1, 2) + v.positional_embedding[1:]], 1))
    for block in v.transformer.resblocks[:-1]:
        h = block(h)
    last = v.transformer.resblocks[-1]
    q, k, _ = F.linear(last.ln_1(h), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, -1)
    H = last.attn.heads
    q, k = (t.view(4, 17, H, -1).transpose(1, 2) for t in (q, k))              # (B, H, 17, d)
    A = ((q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5).softmax(-1).mean(1)  # (B, 17, 17)
    torch.testing.assert_close(w, A[:, 0, 1:])
    assert (w.sum(1) < 1).all() and (w > 0).all()
    # targets: every token after ln_post, projected
    torch.testing.assert_close(targets, v.ln_post(last(h)) @ v.proj)


def test_teacher_computes_only_the_last_blocks_attention_row(teacher_file, monkeypatch):
    """cls_attention=1: the teacher asks for one [CLS] row, (1, B, 1+N), the last block's; the other blocks compute
    none. Its targets and weights are bit-identical to those taken from every block's rows."""
    _, teacher, _ = small_model(teacher_file)
    calls, forward = [], milan.Attention.forward
    monkeypatch.setattr(milan.Attention, "forward", lambda self, x, causal=False, cls_attention=False:
                        calls.append(bool(cls_attention)) or forward(self, x, causal, cls_attention))
    x = images()
    targets, w = teacher(x)
    layers = teacher.visual.transformer.layers
    assert layers > 1 and calls == [False] * (layers - 1) + [True]
    with torch.no_grad():
        x_t = x * teacher.scale + teacher.shift
        assert teacher.visual(x_t, cls_attention=1)[1].shape == (1, 4, 17)
        calls.clear()
        tokens, rows = teacher.visual(x_t, cls_attention=layers)                # every block's row
    assert rows.shape == (layers, 4, 17) and calls == [True] * layers
    assert torch.equal(w, rows[-1, :, 1:])
    assert torch.equal(targets, teacher.visual.ln_post(tokens) @ teacher.visual.proj)


def test_each_sample_draws_its_own_keys_so_masks_do_not_depend_on_the_batch(teacher_file):
    """The transform draws a sample's Gumbel keys from the sample's generator after its crop: the same sample
    gets the same keys, and so the same mask, alone or in any batch (any rank's share of the global batch)."""
    args = small_args(teacher_file)
    transform = milan.train_transform(args, milan.model_config(args))
    img = common.render_shapes(0, 3)[0]
    x, keys = transform(img, common.sample_rng(0, 0, 3))
    x2, keys2 = transform(img, common.sample_rng(0, 0, 3))
    assert x.shape == (3, 32, 32) and keys.shape == (16,) and keys.dtype == torch.float32
    assert torch.equal(x, x2) and torch.equal(keys, keys2)
    assert not torch.equal(keys, transform(img, common.sample_rng(0, 0, 4))[1])
    crop = common.TrainCrop(32, (args.crop_scale, 1.0), *common.NORMS[args.norm], flip=True)
    assert torch.equal(x, crop(img, common.sample_rng(0, 0, 3)))          # the crop draws first, as without keys
    w = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    keys = torch.stack([milan.gumbel_keys(common.sample_rng(0, 0, i), 16) for i in range(8)])
    for mode in ("semantic", "random"):
        mode_args = small_args(teacher_file, "--mask", mode)
        whole, half = milan.make_masks(w, keys, mode_args), milan.make_masks(w[4:], keys[4:], mode_args)
        assert torch.equal(whole[0][4:], half[0]) and torch.equal(whole[1][4:], half[1])
    many = torch.cat([milan.gumbel_keys(random.Random(i), 196) for i in range(100)])   # Gumbel(0, 1)
    assert abs(many.mean() - 0.5772) < 0.03 and abs(many.var() - math.pi ** 2 / 6) < 0.1 and torch.isfinite(many).all()


# ---------------------------------------------------------------------------------------------- losses
def naive_cosine_loss(pred, target, masked=None):
    """Token by token: 2 − 2·⟨p, t⟩ / (‖p‖‖t‖), averaged over every token or over the masked patches."""
    terms = []
    for b in range(pred.shape[0]):
        tokens = range(pred.shape[1]) if masked is None else [1 + int(i) for i in masked[b]]
        for t in tokens:
            p, q = pred[b, t], target[b, t]
            terms.append(2 - 2 * (p * q).sum() / (torch.sqrt((p * p).sum()) * torch.sqrt((q * q).sum())))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("masked_only", [False, True])
def test_milan_loss_matches_naive_forward_and_backward(masked_only):
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(3, 17, 8, generator=g, requires_grad=True)
    target = torch.randn(3, 17, 8, generator=g)
    _, masked = fixed_masks(3)
    loss, per_token = milan.milan_loss(pred, target, masked if masked_only else None)
    loss.backward()
    grad = pred.grad.clone()
    pred2 = pred.detach().clone().requires_grad_()
    ref = naive_cosine_loss(pred2, target, masked if masked_only else None)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, pred2.grad)
    assert per_token.shape == (3, 17)


def test_milan_loss_properties():
    t = torch.randn(2, 17, 8)
    assert milan.milan_loss(3.0 * t, t)[0].abs() < 1e-6                      # scale invariant, 0 at pred = α·T
    p = t.clone()
    p[1, 0] = torch.linalg.svd(t[1, :1]).Vh[-1]                              # orthogonal to T at one [CLS] token
    torch.testing.assert_close(milan.milan_loss(p, t)[0], torch.tensor(2 / (2 * 17)), atol=1e-5, rtol=0)
    loss = milan.milan_loss(torch.randn(2, 17, 8), t)[0]
    assert 0 <= loss <= 4


def test_pixel_loss_matches_naive():
    g = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 16, 16, generator=g)
    pred = torch.randn(2, 4, 8 * 8 * 3, generator=g, requires_grad=True)
    masked = torch.tensor([[0, 3, 2], [1, 2, 0]])
    loss, _ = milan.pixel_loss(pred, image, 8, masked)
    loss.backward()
    pred2 = pred.detach().clone().requires_grad_()
    terms = []
    for b in range(2):
        for i in masked[b].tolist():
            r, c = divmod(i, 2)
            patch = image[b, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8].permute(1, 2, 0).reshape(-1)   # (row, col, ch)
            patch = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
            terms.append(((pred2[b, i] - patch) ** 2).mean())
    ref = sum(terms) / len(terms)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pred.grad, pred2.grad)


def test_losses_and_a_training_step_run_without_a_process_group(teacher_file):
    """Copied into a program that never calls init_process_group, the losses and the step still run."""
    import torch.distributed as dist
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 17, 8, generator=g), torch.randn(2, 17, 8, generator=g)
    torch.testing.assert_close(milan.milan_loss(pred, target)[0], naive_cosine_loss(pred, target))
    assert torch.isfinite(milan.pixel_loss(torch.randn(2, 4, 192, generator=g), torch.randn(2, 3, 16, 16), 8)[0])
    model, teacher, args = small_model(teacher_file)
    loss, metrics = milan.train_step(model, model, teacher, batch_of(images()), 0, SCHED, args, CPU)
    loss.backward()
    assert torch.isfinite(loss) and set(metrics) == {"loss_masked", "loss_visible"}


# ---------------------------------------------------------------------------------------------- decoder
def test_prompts_are_bit_identical_through_every_block_and_no_decoder_weight_touches_them(teacher_file):
    model, _, _ = small_model(teacher_file)
    x, (keep, masked) = images(), fixed_masks()
    before, after = [], []
    hooks = [h for b in model.decoder_blocks for h in (
        b.register_forward_pre_hook(lambda m, inp: before.append((inp[1], inp[1].clone()))),
        b.register_forward_hook(lambda m, inp, out: after.append((inp[1], inp[1].clone()))))]
    with torch.no_grad():
        pred = model.predict(x, keep, masked)
    for h in hooks:
        h.remove()
    assert len(before) == len(after) == len(model.decoder_blocks) == 2
    first, reference = before[0]
    for prompts, copy in before + after:  # the same tensor enters every block and leaves it unchanged
        assert prompts.data_ptr() == first.data_ptr() and torch.equal(copy, reference)
    # prompts = decoder_embed(encoder output) + position: the [CLS] and visible predictions bypass the blocks
    with torch.no_grad():
        P = model.decoder_embed(model.encoder(x, keep))
        P = torch.cat([P[:, :1] + model.decoder_pos[0], P[:, 1:] + model.decoder_pos[1:][keep]], 1)
        direct = model.decoder_pred(model.decoder_norm(P))
    rows = torch.cat([torch.zeros(4, 1, dtype=torch.long), 1 + keep], 1)
    visible_pred = pred.gather(1, rows[..., None].expand(-1, -1, pred.shape[-1]))
    torch.testing.assert_close(visible_pred, direct, rtol=0, atol=1e-6)
    # re-randomise every weight of every decoder block and the mask token
    with torch.no_grad():
        for p in [*model.decoder_blocks.parameters(), model.mask_token]:
            p.copy_(torch.randn_like(p))
        pred2 = model.predict(x, keep, masked)
    assert torch.equal(pred2.gather(1, rows[..., None].expand(-1, -1, pred.shape[-1])), visible_pred)
    mrows = (1 + masked)[..., None].expand(-1, -1, pred.shape[-1])
    assert not torch.allclose(pred2.gather(1, mrows), pred.gather(1, mrows))


def test_prompting_block_formula_with_raw_prompts():
    torch.manual_seed(0)
    block = milan.PromptingBlock(16, 4, "gelu")
    milan.mae_init(block)
    block.double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z, P = torch.randn(2, 5, 16).double(), 10 * torch.randn(2, 3, 16).double()  # prompts at a large scale
    out = block(z, P)

    def reference(z, P, ln_prompts):
        w_q, w_k, w_v = block.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = block.attn.in_proj_bias.chunk(3)
        h = F.layer_norm(z, (16,), block.ln_1.weight, block.ln_1.bias, 1e-6)
        kv = torch.cat([F.layer_norm(P, (16,), block.ln_1.weight, block.ln_1.bias, 1e-6) if ln_prompts else P, h], 1)
        heads = []
        for i in range(4):
            s = slice(4 * i, 4 * i + 4)
            q, k, v = h @ w_q[s].T + b_q[s], kv @ w_k[s].T + b_k[s], kv @ w_v[s].T + b_v[s]
            heads.append(torch.softmax(q @ k.transpose(1, 2) / 2.0, -1) @ v)
        z = z + block.attn.out_proj(torch.cat(heads, -1))
        return z + block.mlp.c_proj(F.gelu(block.mlp.c_fc(F.layer_norm(z, (16,), block.ln_2.weight,
                                                                         block.ln_2.bias, 1e-6))))
    torch.testing.assert_close(out, reference(z, P, False))
    assert not torch.allclose(out, reference(z, P, True), atol=1e-3)
    # mask tokens read each other: changing one changes the others
    z2 = z.clone()
    z2[:, 0] += torch.randn(16).double()  # (a constant shift would vanish in LN1)
    assert (block(z2, P / 10)[:, 1:] - block(z, P / 10)[:, 1:]).abs().amin(-1).min() > 1e-4


def test_gradient_routing(teacher_file):
    model, teacher, _ = small_model(teacher_file)
    x, (keep, masked) = images(), fixed_masks()
    pred = model.predict(x, keep, masked)
    rows = torch.cat([torch.zeros(4, 1, dtype=torch.long), 1 + keep], 1)
    pred.gather(1, rows[..., None].expand(-1, -1, pred.shape[-1])).square().sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert not any(n.startswith("decoder_blocks") or n == "mask_token" for n in grads)
    assert {"encoder.patch_embed.weight", "encoder.cls_token", "decoder_embed.weight", "decoder_norm.weight",
            "decoder_pred.weight"} <= grads
    model.zero_grad()
    pred = model.predict(x, keep, masked)
    pred.gather(1, (1 + masked)[..., None].expand(-1, -1, pred.shape[-1])).square().sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"decoder_blocks.0.attn.in_proj_weight", "decoder_blocks.1.mlp.c_fc.weight", "mask_token",
            "encoder.patch_embed.weight"} <= grads


def test_encoder_never_sees_masked_patches_and_order_does_not_matter(teacher_file):
    model, _, _ = small_model(teacher_file)
    x, (keep, masked) = images(), fixed_masks()
    with torch.no_grad():
        pred = model.predict(x, keep, masked)
        x2 = x.clone()
        for b in range(4):  # scribble over every masked patch
            for i in masked[b].tolist():
                x2[b, :, 8 * (i // 4):8 * (i // 4) + 8, 8 * (i % 4):8 * (i % 4) + 8] = 5.0
        assert torch.equal(model.predict(x2, keep, masked), pred)
        perm_k, perm_m = torch.randperm(4), torch.randperm(12)
        torch.testing.assert_close(model.predict(x, keep[:, perm_k], masked[:, perm_m]), pred, rtol=0, atol=1e-5)
    assert pred.shape == (4, 17, 128)


def test_mae_decoder_ablation_updates_visible_tokens(teacher_file):
    model, teacher, _ = small_model(teacher_file, "--decoder", "mae")
    x, (keep, masked) = images(), fixed_masks()
    with torch.no_grad():
        pred = model.predict(x, keep, masked)
        assert pred.shape == (4, 17, teacher.embed_dim)  # predicts C_t (the official ablation predicted 768)
        for p in model.decoder_blocks.parameters():
            p.add_(torch.randn_like(p))
        rows = (1 + keep)[..., None].expand(-1, -1, pred.shape[-1])
        assert not torch.allclose(model.predict(x, keep, masked).gather(1, rows), pred.gather(1, rows))


def test_patch_embedding_keeps_pytorchs_default_bias_as_mae():
    """MAE's initialize_weights sets the patch embedding's weight (Xavier, as a Linear) but not its bias."""
    torch.manual_seed(0)
    embed = milan.MAEEncoder(image_size=32, patch_size=8, width=128, layers=1, heads=2, act="gelu").patch_embed
    bound = (3 * 8 * 8) ** -0.5                                                  # Conv2d's default: U(±1/√fan_in)
    assert 0.5 * bound < embed.bias.abs().max() <= bound
    assert embed.weight.abs().max() <= (6 / (128 + 3 * 8 * 8)) ** 0.5              # Xavier-uniform on (D, 3·p·p)


def test_keyword_constructors_and_value_errors(teacher_file):
    cfg = milan.encoder_config(milan.model_config(small_args(teacher_file)))
    torch.manual_seed(0)
    model = milan.MILAN(**cfg, target_dim=8, dec_width=32, dec_depth=1, dec_heads=4)
    assert model.loss_on == "all" and model.decoder_pred.out_features == 8
    assert milan.MILAN(**cfg, target="pixels", dec_width=32, dec_depth=1, dec_heads=4).loss_on == "masked"
    with pytest.raises(ValueError, match="not divisible"):
        milan.MILAN(**cfg, target_dim=8, dec_width=32, dec_depth=1, dec_heads=3)
    with pytest.raises(ValueError, match="divisible by 4"):
        common.sincos_2d(4, 30)
    with pytest.raises(TypeError):
        milan.MAEEncoder(32, 8, 128, 4, 2, "gelu")  # keywords only
    teacher = milan.CLIPTeacher(visual=tiny_clip().visual, student_norm=common.NORMS["clip"],
                                teacher_norm=common.NORMS["clip"])
    assert teacher.embed_dim == 128 and torch.equal(teacher.scale, torch.ones(3, 1, 1))


# ---------------------------------------------------------------------------------------------- teacher
def test_teacher_loads_openai_state_dict_is_frozen_and_gets_no_gradient(teacher_file, world1):
    clip = tiny_clip()
    model, teacher, args = small_model(teacher_file)
    loaded = teacher.visual.state_dict()
    for name, p in clip.visual.state_dict().items():
        assert torch.equal(loaded[name], p) and loaded[name].dtype == torch.float32
    assert teacher.frozen and not any(p.requires_grad for p in teacher.parameters())
    model.train()
    teacher.train()
    assert not teacher.training
    assert not any(k.startswith("visual.") for k in model.state_dict())     # not part of the student
    assert model.decoder_pred.out_features == clip.visual.proj.shape[1]
    x = images()
    with torch.no_grad():
        expected = clip.visual.ln_post(clip.visual(x)) @ clip.visual.proj   # --norm = --teacher-norm: no conversion
    torch.testing.assert_close(teacher(x)[0], expected)
    loss, metrics = milan.train_step(model, model, teacher, batch_of(x), 0, SCHED, args, CPU)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.encoder.patch_embed.weight.grad is not None
    assert {"loss_masked", "loss_visible"} <= set(metrics)
    # the student's crop is re-normalised for the teacher: the same pixels give the same targets
    _, teacher_c, _ = small_model(teacher_file, "--norm", "clip")
    pixels = torch.rand(2, 3, 32, 32)
    as_imagenet, as_clip = ((pixels - torch.tensor(m).view(3, 1, 1)) / torch.tensor(s).view(3, 1, 1)
                            for m, s in (common.NORMS["imagenet"], common.NORMS["clip"]))
    torch.testing.assert_close(teacher_c(as_clip)[0], teacher(as_imagenet)[0], rtol=1e-4, atol=1e-4)
    # 'file': the normalisation the file records, else CLIP's (a bare state dict records none)
    _, teacher_f, _ = small_model(teacher_file, "--norm", "clip", "--teacher-norm", "file")
    assert torch.equal(teacher_f.scale, torch.ones(3, 1, 1)) and torch.equal(teacher_f.shift, torch.zeros(3, 1, 1))


def test_bad_teachers_fail_with_one_line_that_says_how_to_get_one(teacher_file, tmp_path):
    big_patch = tmp_path / "patch16.pt"
    torch.save(tiny_clip(patch_size=16).state_dict(), big_patch)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    text_only = tmp_path / "text.pt"
    torch.save({k: v for k, v in tiny_clip().state_dict().items() if not k.startswith("visual.")}, text_only)
    for flags, words in (([], "--teacher PATH"), (["--teacher", str(tmp_path / "missing.pt")], "does not exist"),
                         (["--teacher", str(garbage)], "not a readable checkpoint"),
                         (["--teacher", str(text_only)], "not a CLIP ViT image tower"),
                         (["--teacher", str(big_patch)], "same patches")):
        args = milan.parse_args(flags)
        with pytest.raises(common.UsageError) as e:
            milan.build_model(milan.model_config(args), args)
        assert words in str(e.value) and HOWTO in str(e.value) and "\n" not in str(e.value)
    for flags, words in ((["--mask-ratio", "0.95"], "at least one visible"),  # int(16 · 0.05) = 0 visible
                         (["--imagenet-val", str(tmp_path)], "ImageFolder --train-data")):
        args = small_args(teacher_file, *flags)
        with pytest.raises(common.UsageError, match=words):
            milan.build_model(milan.model_config(args), args)
    # plain MAE (pixels, random masking) needs no teacher
    args = milan.parse_args(["--target", "pixels", "--mask", "random"])
    model, teacher = milan.build_model(milan.model_config(args), args)
    assert teacher is None and model.loss_on == "masked"
    loss, _ = milan.train_step(model, model, None, batch_of(images()), 0, SCHED, args, CPU)
    assert torch.isfinite(loss)
    # a decoder width the heads do not divide: ValueError in the class, a one-line UsageError at start-up
    with pytest.raises(common.UsageError, match="--dec-heads 3"):
        milan.build_model(milan.model_config(args), milan.parse_args(["--target", "pixels", "--mask", "random",
                                                                      "--dec-heads", "3"]))


def test_lr_is_the_base_lr_scaled_by_the_global_batch_unless_given():
    """main_pretrain.py's rule, lr = blr · batch / 256; an explicit --lr wins, even one equal to the default. RECIPE's
    and DEMO's lr (what --help shows) are what their blr gives at their batch."""
    recipe = ["--train-data", "imagenet/train"]
    assert milan.parse_args(recipe + ["--batch-size", "256"]).lr == pytest.approx(1.5e-4)
    assert milan.parse_args(recipe + ["--batch-size", "4096"]).lr == pytest.approx(2.4e-3)
    assert milan.parse_args(recipe + ["--blr", "1e-3", "--batch-size", "512"]).lr == pytest.approx(2e-3)
    assert milan.parse_args(recipe + ["--batch-size", "256", "--lr", "1e-3"]).lr == 1e-3
    assert milan.parse_args(recipe + ["--lr=2.4e-3", "--batch-size", "256"]).lr == 2.4e-3
    for table in (milan.RECIPE, {**milan.RECIPE, **milan.DEMO}):
        assert table["lr"] == pytest.approx(table["blr"] * table["batch_size"] / 256)
    assert milan.parse_args([]).lr == pytest.approx(milan.DEMO["lr"]) and milan.parse_args(recipe).blr == 1.5e-4


def test_recipe_defaults_and_weight_decay(teacher_file):
    args = milan.parse_args(["--train-data", "imagenet/train"])
    assert (args.model, args.epochs, args.batch_size, args.lr, args.wd, args.beta1, args.beta2) == \
        ("ViT-B/16", 400, 4096, 2.4e-3, 0.05, 0.9, 0.95)
    assert (args.warmup_epochs, args.lr_start, args.lr_end, args.grad_clip, args.crop_scale, args.norm) == \
        (40, 0, 0, 0, 0.2, "imagenet")
    assert (args.mask, args.mask_ratio, args.decoder, args.target, args.dec_width, args.dec_depth,
            args.dec_heads) == ("semantic", 0.75, "prompting", "clip", 512, 8, 16)
    for flag in ("--csv-img-key", "--context-length", "--train-num-samples"):  # image-only: no caption flags
        with pytest.raises(SystemExit):
            milan.parse_args([flag, "1"])
    model, _, args = small_model(teacher_file)
    opt = milan.make_optimizer(model, args, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    assert {"encoder.cls_token", "mask_token", "encoder.patch_embed.weight", "decoder_pred.weight"} <= decay
    assert not any(n.endswith("bias") or "ln_" in n or "norm" in n for n in decay)


# ---------------------------------------------------------------------------------------------- distributed
def _grads_one_step(rank, world, teacher_file, full_images):
    """Loss and gradients of one train_step with DDP on this rank's slice of a fixed global batch, each
    sample's mask drawn from its own keys (as the transform draws them): the same masks on any number of ranks."""
    model, teacher, args = small_model(teacher_file, "--dec-depth", "1")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    (x, keys), labels, skipped = batch_of(full_images)
    b = x.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    loss, _ = milan.train_step(ddp, model, teacher, ((x[sl], keys[sl]), labels[sl], skipped[sl]), 0, SCHED, args, CPU)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def test_two_gloo_processes_match_one_process(teacher_file, tmp_path):
    """Masks, loss and gradients: 2 ranks on halves of the batch equal 1 process on all of it, up to summation
    order (measured: gradients 9e-9 apart; before the per-sample keys the ranks drew other masks)."""
    x = images(8, seed=5)
    one = run_distributed(_grads_one_step, 1, tmp_path / "one", teacher_file, x)
    two = run_distributed(_grads_one_step, 2, tmp_path / "two", teacher_file, x)
    torch.testing.assert_close((two[0]["loss"] + two[1]["loss"]) / 2, one[0]["loss"], rtol=1e-6, atol=1e-7)
    for name, g in one[0]["grads"].items():
        torch.testing.assert_close(two[0]["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(two[1]["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_without_arguments_prints_the_teacher_howto(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "milan.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and HOWTO in proc.stderr and "export_online.pt" in proc.stderr
    assert not (tmp_path / "runs").exists()  # failed before anything was written


def test_cli_resnet_clip_teacher_fails_in_maskdistills_one_line_and_writes_nothing(tmp_path):
    """An open_clip ResNet CLIP (RN50's layout: visual.layer1..., visual.attnpool...; tiny here) is no ViT
    teacher: milan.py and maskdistill.py stop with the same one line, before the out-dir is touched."""
    open_clip = pytest.importorskip("open_clip")
    vision = open_clip.model.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=common.VOCAB_SIZE, width=16, heads=1, layers=1)
    torch.save(open_clip.model.CLIP(16, vision, text).state_dict(), tmp_path / "rn.pt")
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("an earlier run's")
    errors = {}
    for script in ("milan.py", "maskdistill.py"):
        proc = run_cli(script, "--teacher", tmp_path / "rn.pt", "--out-dir", out, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        errors[script] = proc.stderr.strip()
    assert errors["milan.py"] == errors["maskdistill.py"]
    assert errors["milan.py"].startswith(f"error: --teacher: {tmp_path / 'rn.pt'} lacks "
                                         f"['visual.positional_embedding', 'visual.proj'], "
                                         f"so it is not a CLIP ViT image tower")
    assert errors["milan.py"].endswith(milan.TEACHER_HOWTO)
    assert os.listdir(out) == ["args.json"] and (out / "args.json").read_text() == "an earlier run's"


def test_cli_smoke_run_masks_and_eval_towers(teacher_file, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("milan.py", *TINY, "--teacher", teacher_file, "--steps", "3", "--save-masks", "2",
                   "--out-dir", out)
    assert "done: 3 steps" in proc.stdout + proc.stderr
    assert "global batch 8," in proc.stdout and "lr 9.375e-05 " in proc.stdout   # the demo's blr 3e-3 · 8 / 256
    for name in ("checkpoint.pt", "args.json", "env.json", "metrics.jsonl", "masks/step0000000.png",
                 "masks/step0000002.png"):
        assert (out / name).exists(), name
    assert not list(out.glob("export_*.pt"))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert {"student/knn_top1", "teacher/knn_top1"} <= set(records[-1]["eval"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["teacher"] is None and not any(k.startswith("visual.") for k in ckpt["model"])
    tower = milan.eval_towers(ckpt)["student"]
    assert tower.features(images(2)).shape == (2, 128)
    from PIL import Image
    assert Image.open(out / "masks/step0000000.png").size[1] == 8 * 96  # one row per image, 8 rows
