"""A-CLIP: the attention score against a hand computation, alignment, block selection, the kept-token ViT,
the three-crop geometry, the EMA, each loss against a naive reference (forward and gradients), the losses
without a process group, gradient routing, the OpenAI-layout exports, distributed equivalence (SimCLR,
global BatchNorm and a whole DDP step in two gloo processes) and the real CLI (smoke run with exports and
--save-masks, bad input)."""
import json
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from conftest import run_cli, run_distributed

import aclip
import common

TINY = ["--model", "tiny", "--workers", "0", "--batch-size", "8", "--builtin-samples", "32", "--ssl-hidden", "32",
        "--ssl-dim", "16", "--log-every", "1", "--eval-every", "0"]


def small_args(*extra):
    return aclip.parse_args(["--model", "tiny", "--ssl-hidden", "32", "--ssl-dim", "16", *extra])


SCHED = aclip.Schedule(total=10, warmup=0, steps_per_epoch=10)


def small_model(*extra, seed=0):
    torch.manual_seed(seed)
    args = small_args(*extra)
    model, teacher = aclip.build_model(aclip.model_config(args), args)
    return model, teacher, args


def loader_batch(args, n=4, seed=0):
    """A batch as the training loader gives it: ((online, boxes[, ema]), texts, skipped), through the real
    three-crop transform on the built-in shapes."""
    cfg = aclip.model_config(args)
    ds = common.Shapes("train", length=64, transform=aclip.train_transform(args, cfg), context_length=24, seed=seed)
    return common.collate([ds[(0, i)] for i in range(n)])


def grads_of(module):
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


# ---------------------------------------------------------------------------------------------- score
def hand_cls_rows(visual, image):
    """Every layer's and head's softmax [CLS] row, computed by hand from the block weights: (L·H, B, 1+N)."""
    x = visual.conv1(image).flatten(2).transpose(1, 2) + visual.positional_embedding[1:]
    cls = (visual.class_embedding + visual.positional_embedding[0]).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], 1))
    rows = []
    for block in visual.transformer.resblocks:
        h = block.ln_1(x)
        q, k, _ = (h @ block.attn.in_proj_weight.t() + block.attn.in_proj_bias).chunk(3, dim=-1)
        heads = block.attn.heads
        d = q.shape[-1] // heads
        for i in range(heads):
            qi, ki = q[..., i * d:(i + 1) * d], k[..., i * d:(i + 1) * d]
            rows.append(torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(d), dim=-1)[:, 0])
        x = block(x)
    return torch.stack(rows)


def test_score_is_the_mean_of_the_softmax_cls_rows(world1):
    model, teacher, args = small_model()
    image = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        rows = hand_cls_rows(teacher.visual, image)                     # (layers·heads, B, 17)
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]))  # each full row sums to 1
    score, _ = teacher.score_and_target(image)
    assert score.shape == (3, 16) and (score >= 0).all()
    torch.testing.assert_close(score, rows.mean(0)[:, 1:])              # not renormalised after dropping [CLS]
    assert (score.sum(-1) < 1).all()
    teacher.score_layers = "last"
    heads = teacher.visual.transformer.resblocks[0].attn.heads
    torch.testing.assert_close(teacher.score_and_target(image)[0], rows[-heads:].mean(0)[:, 1:])


# ---------------------------------------------------------------------------------------------- alignment
def test_alignment_is_identity_on_the_ema_box_and_shifts_with_the_crop():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(2, 4, 4, generator=g)
    ema = torch.tensor([[0.1, 0.2, 0.6, 0.5]] * 2)
    torch.testing.assert_close(aclip.align_to_view(score, ema, ema, 4), score)
    right = ema + torch.tensor([0.6 / 4, 0, 0, 0])                      # one patch to the right
    a = aclip.align_to_view(score, right, ema, 4)
    torch.testing.assert_close(a[:, :, :3], score[:, :, 1:])
    assert (a[:, :, 3] == 0).all()                                      # outside the EMA box: 0
    down = ema + torch.tensor([0, 0.5 / 4, 0, 0])                       # one patch down
    a = aclip.align_to_view(score, down, ema, 4)
    torch.testing.assert_close(a[:, :3], score[:, 1:])
    assert (a[:, 3] == 0).all()
    quarter = torch.tensor([[0.1 + 0.3, 0.2, 0.3, 0.25]] * 2)          # top-right quarter of the EMA box
    torch.testing.assert_close(aclip.align_to_view(score, quarter, ema, 2), score[:, :2, 2:])


# ---------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("extra,blocks", [(True, 9), (False, 8)])
def test_keep_count_is_exact_and_the_kept_blocks_are_the_top_k(extra, blocks):
    assert aclip.n_keep_blocks(16, 0.5, extra) == blocks
    g = torch.Generator().manual_seed(1)
    score = torch.rand(6, 8 * 8, generator=g)                            # an 8x8 EMA map, the view = the EMA box
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)[None].expand(6, 2, 4)
    keep = aclip.attentive_keep(score, 8, boxes, 1, 8, 2, blocks)
    assert keep.shape == (6, blocks * 4)
    pooled = F.avg_pool2d(score.view(6, 1, 8, 8), 2).flatten(1)          # (6, 16) block scores
    for b in range(6):
        kept = set(keep[b].tolist())
        assert len(kept) == blocks * 4
        kept_blocks = {(p // 8 // 2) * 4 + (p % 8) // 2 for p in kept}
        assert len(kept_blocks) == blocks
        for blk in kept_blocks:                                          # every block kept whole: its 2x2 patches
            r, c = divmod(blk, 4)
            assert {(2 * r + dr) * 8 + 2 * c + dc for dr in (0, 1) for dc in (0, 1)} <= kept
        top = set(pooled[b].argsort(descending=True)[:blocks].tolist())
        assert kept_blocks == top
        assert pooled[b, list(kept_blocks)].min() > pooled[b, [i for i in range(16) if i not in kept_blocks]].max()
    least = aclip.attentive_keep(score, 8, boxes, 1, 8, 2, blocks, most=False)
    assert {(p // 8 // 2) * 4 + (p % 8) // 2 for p in least[0].tolist()} == \
        set(pooled[0].argsort()[:blocks].tolist())


def test_selection_ties_pooling_and_the_224_px_grid():
    ties = torch.zeros(2, 16)
    assert aclip.select_blocks(ties, 5).tolist() == [[0, 1, 2, 3, 4]] * 2   # ties go to the lower index
    assert aclip.blocks_to_patches(torch.tensor([[0, 3]]), 4, 2).tolist() == [[0, 1, 4, 5, 10, 11, 14, 15]]
    # 224 px, patch 16: 14x14 patches, 7x7 blocks, 25 blocks = 100 patches kept
    n = aclip.n_keep_blocks(49, 0.5)
    assert n == 25
    keep = aclip.random_keep(3, 14, 2, n, "cpu")
    assert keep.shape == (3, 100) and all(len(set(k.tolist())) == 100 for k in keep)
    assert (keep.max() < 196) and not torch.equal(keep[0], keep[1])
    # a 7x7 patch grid does not split into 2x2 blocks: a one-line error
    args = aclip.parse_args(["--train-data", "x.csv", "--model", "ViT-B/32"])
    with pytest.raises(common.UsageError, match="--block-size 2 does not divide the 7x7"):
        aclip.check_args(aclip.model_config(args), args)


# ---------------------------------------------------------------------------------------------- ViT
def test_kept_token_vit_order_invariance_and_full_equivalence(world1):
    model, _, args = small_model()
    image = torch.randn(2, 3, 32, 32)
    full = model.visual(image)
    torch.testing.assert_close(model.visual(image, torch.arange(16).expand(2, 16)), full)  # empty mask
    keep = torch.tensor([[0, 3, 5, 6, 9, 15], [1, 2, 4, 8, 12, 13]])
    out = model.visual(image, keep)
    assert out.shape == (2, 7, 128)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    out_p = model.visual(image, keep[:, perm])
    torch.testing.assert_close(out_p[:, 0], out[:, 0])                  # [CLS] does not see the order
    torch.testing.assert_close(out_p[:, 1:], out[:, 1:][:, perm])
    assert not torch.allclose(out[:, 0], full[:, 0])
    # eval mode ignores the mask: the model's loss is that of the full views
    batch = loader_batch(args)
    model.eval()
    images = batch[0][0].transpose(0, 1).flatten(0, 1)
    target = torch.randn(4, 16)
    with torch.no_grad():
        masked = model(images, batch[1], keep=aclip.random_keep(8, 4, 1, 9, "cpu"), target=target)[0]
        torch.testing.assert_close(masked, model(images, batch[1], keep=None, target=target)[0])


# ---------------------------------------------------------------------------------------------- three crops
def test_three_crop_fix_encloses_both_crops_and_the_released_geometry_does_not():
    rng = random.Random(0)
    missed = 0
    for _ in range(500):
        W, H = rng.randint(40, 300), rng.randint(40, 300)
        crops = [common.crop_box(rng, W, H, (0.2, 1.0)) for _ in range(2)]
        l, t, w, h = aclip.ema_box(rng, crops, W, H, fix=True)
        assert 0 <= l and 0 <= t and l + w <= W and t + h <= H
        for cl, ct, cw, ch in crops:
            assert l <= cl and t <= ct and cl + cw <= l + w and ct + ch <= t + h
        l, t, w, h = aclip.ema_box(rng, crops, W, H, fix=False)
        assert 0 <= l and 0 <= t and l + w <= W and t + h <= H
        missed += any(not (l <= cl and t <= ct and cl + cw <= l + w and ct + ch <= t + h) for cl, ct, cw, ch in crops)
    assert missed > 0


def test_three_crop_transform_outputs():
    img = Image.new("RGB", (80, 96), (10, 200, 30))
    mean, std = common.NORMS["imagenet"]
    online, boxes, ema = aclip.ThreeCrop(64, 32, (0.5, 1.0), mean, std)(img, random.Random(3))
    assert online.shape == (2, 3, 64, 64) and boxes.shape == (3, 4) and ema.shape == (3, 32, 32)
    e = boxes[2]
    for b in boxes[:2]:  # boxes as fractions: the EMA box encloses both crops
        assert e[0] <= b[0] + 1e-6 and e[1] <= b[1] + 1e-6 and b[0] + b[2] <= e[0] + e[2] + 1e-6
        assert b[1] + b[3] <= e[1] + e[3] + 1e-6
    out = aclip.ThreeCrop(64, None, (0.5, 1.0), mean, std, views=1)(img, random.Random(3))
    assert len(out) == 2 and out[0].shape == (1, 3, 64, 64) and out[1][-1].tolist() == [0, 0, 1, 1]
    # the photometric augmentation changes colours of the online views only, reproducibly from the rng
    a = aclip.ThreeCrop(64, 32, (0.5, 1.0), mean, std, photo=True)(img, random.Random(5))
    b = aclip.ThreeCrop(64, 32, (0.5, 1.0), mean, std, photo=True)(img, random.Random(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    plain = aclip.ThreeCrop(64, 32, (0.5, 1.0), mean, std, photo=False)(img, random.Random(5))
    torch.testing.assert_close(a[2], plain[2])


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_covers_the_released_parts_update_is_exact_and_schedule_endpoints(world1):
    model, teacher, args = small_model()
    prefixes = {k.split(".")[0] for k in teacher.state_dict()}
    assert prefixes == {"visual", "transformer", "text_projection", "im_proj_byol"}
    for name, p in teacher.visual.named_parameters():
        assert torch.equal(p, model.visual.get_parameter(name)), name
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    teacher.update(model, 0.9)
    online = dict(model.named_parameters())
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * online[name].detach(), msg=name)
    assert aclip.ema_momentum_at(0, 100, 0.996) == pytest.approx(0.996)
    assert aclip.ema_momentum_at(50, 100, 0.996) == pytest.approx(0.998)
    assert aclip.ema_momentum_at(100, 100, 0.996) == pytest.approx(1.0)
    ms = [aclip.ema_momentum_at(s, 100, 0.996) for s in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))


def test_ema_text_tower_shares_embeddings_and_exports_round_trip(world1, tmp_path):
    model, teacher, args = small_model()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exports = aclip.export_state_dicts(model.state_dict(), teacher.state_dict())
    assert set(exports) == {"online", "ema"}
    cfg = aclip.model_config(args)
    for name, sd in exports.items():
        assert all(k.startswith(common.OPENAI_PREFIXES) for k in sd)
        common.export_weights(tmp_path / f"{name}.pt", sd, cfg, norm=args.norm, method="aclip", weights=name)
    ema = exports["ema"]
    for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "logit_scale"):
        assert ema[k] is exports["online"][k]                             # shared with the online model
    images, texts = torch.randn(2, 3, 32, 32), common.tokenize(["a red circle", "a blue star"], 24)
    clip, _ = common.load_clip(str(tmp_path / "online.pt"), aclip.CLIP, aclip.VisionTransformer)
    torch.testing.assert_close(clip.encode_image(images), model.encode_image(images))
    torch.testing.assert_close(clip.encode_text(texts), model.encode_text(texts))
    clip_ema, _ = common.load_clip(str(tmp_path / "ema.pt"), aclip.CLIP, aclip.VisionTransformer)
    with torch.no_grad():
        torch.testing.assert_close(clip_ema.encode_image(images), teacher.encode_image(images))
        torch.testing.assert_close(clip_ema.encode_text(texts), teacher.encode_text(model, texts))
    assert not torch.allclose(clip_ema.encode_text(texts), clip.encode_text(texts))
    towers = aclip.eval_towers({"model": model.state_dict(), "teacher": teacher.state_dict(), "config": cfg})
    torch.testing.assert_close(towers["ema"].encode_image(images), clip_ema.encode_image(images))


# ---------------------------------------------------------------------------------------------- losses
def naive_simclr(a, b, tau):
    """NT-Xent over the 2N normalised rows z = [a; b]: anchor i's positive is its other view, every other
    row is a negative; the mean over the 2N anchors."""
    z = F.normalize(torch.cat([a, b]), dim=-1)
    n = a.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(torch.exp(z[i] @ z[j] / tau) for j in range(2 * n) if j != i)
        total = total - torch.log(torch.exp(z[i] @ z[pos] / tau) / denom)
    return total / (2 * n)


def naive_clip(img, txt, scale):
    n = img.shape[0]
    li = sum(-torch.log(torch.exp(scale * img[i] @ txt[i]) / sum(torch.exp(scale * img[i] @ txt[j]) for j in range(n)))
             for i in range(n)) / n
    lt = sum(-torch.log(torch.exp(scale * txt[i] @ img[i]) / sum(torch.exp(scale * txt[i] @ img[j]) for j in range(n)))
             for i in range(n)) / n
    return (li + lt) / 2


def test_simclr_matches_naive_forward_and_backward(world1):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 7, generator=g, requires_grad=True), torch.randn(5, 7, generator=g, requires_grad=True)
    loss = aclip.simclr_loss(a, b, 0.1)
    loss.backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = naive_simclr(a2, b2, 0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    same = aclip.simclr_loss(a.detach(), a.detach(), 0.1)               # the released pairing: view 1 with itself
    torch.testing.assert_close(same, naive_simclr(a.detach(), a.detach(), 0.1))
    assert not torch.allclose(same, loss.detach())


def test_byol_loss_matches_naive_and_its_range():
    g = torch.Generator().manual_seed(3)
    p, z = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(6, 4, generator=g)
    loss = aclip.byol_loss(p, z)
    loss.backward()
    p2 = p.detach().clone().requires_grad_()
    ref = sum(2 - 2 * (p2[i] @ z[i]) / (p2[i].norm() * z[i].norm()) for i in range(6)) / 6
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(p.grad, p2.grad)
    assert 0 <= loss.item() <= 4
    assert aclip.byol_loss(z, 3 * z).item() == pytest.approx(0, abs=1e-6)
    assert aclip.byol_loss(z, -z).item() == pytest.approx(4, abs=1e-6)


def test_losses_and_a_whole_forward_run_without_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is left over from another test")
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    torch.testing.assert_close(aclip.simclr_loss(a, b, 0.1), naive_simclr(a, b, 0.1))
    assert 0 <= aclip.byol_loss(a, b).item() <= 4
    img, txt = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    loss_i, loss_t = aclip.contrastive_loss(img, txt, torch.tensor(math.log(10.0)))
    torch.testing.assert_close((loss_i + loss_t) / 2, naive_clip(img, txt, 10.0))
    bn, gbn = torch.nn.BatchNorm1d(7), aclip.GlobalBatchNorm1d(7)
    torch.testing.assert_close(gbn(a), bn(a))
    # keyword constructors: the copyable model and teacher, no argparse Namespace, no process group
    cfg = dict(common.MODELS["tiny"], act="quickgelu")
    torch.manual_seed(0)
    model = aclip.ACLIP(**cfg, views=2, loss_weights=(0.5, 0.5, 1.0, 2.0), ssl_hidden=32, ssl_dim=16)
    teacher = aclip.Teacher(model, score_layers="all")
    assert not any(isinstance(m, aclip.GlobalBatchNorm1d) for m in model.modules())
    images, texts = torch.randn(8, 3, 32, 32), common.tokenize(["a red circle", "a blue star"] * 2, 24)
    score, target = teacher.score_and_target(images[:4])
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)[None].expand(4, 3, 4)
    keep = aclip.attentive_keep(score, 4, boxes, 2, 4, 1, aclip.n_keep_blocks(16, 0.5))
    loss, metrics = model(images, texts, keep=keep, target=target)
    assert set(metrics) == {"loss_itc1", "loss_itc2", "loss_ssl", "loss_o2e"} and math.isfinite(loss.item())
    byol_only = aclip.ACLIP(**cfg, views=1, loss_weights=(1.0, 0.0, 0.0, 2.0), ssl_hidden=32, ssl_dim=16,
                            freeze_patch_embed=False)
    assert not hasattr(byol_only, "image_mlp") and hasattr(byol_only, "im_pred_byol")
    assert byol_only.visual.conv1.weight.requires_grad
    assert aclip.Teacher(byol_only, score_layers="last").score_layers == "last"


def test_total_loss_parts_against_naive_and_gradient_routing(world1):
    model, teacher, args = small_model("--loss-weights", "0.3", "0.7", "1.5", "2.5")
    batch = loader_batch(args)
    torch.manual_seed(4)
    loss, m = aclip.train_step(model, model, teacher, batch, 0, SCHED, args, torch.device("cpu"))
    torch.testing.assert_close(loss, 0.3 * m["loss_itc1"] + 0.7 * m["loss_itc2"] + 1.5 * m["loss_ssl"]
                               + 2.5 * m["loss_o2e"])
    # recompute every part by hand from the same kept tokens
    (online, boxes, ema), texts, _ = batch
    with torch.no_grad():
        score, target = teacher.score_and_target(ema)
    keep = aclip.attentive_keep(score, 4, boxes, 2, 4, 1, 9)
    assert keep.shape == (8, 9)
    images = online.transpose(0, 1).flatten(0, 1)
    cls = model.visual.ln_post(model.visual(images, keep)[:, 0])
    img = F.normalize(cls @ model.visual.proj, dim=-1)
    txt = F.normalize(model.encode_text(texts), dim=-1)
    s = model.logit_scale.exp()
    torch.testing.assert_close(m["loss_itc1"], naive_clip(img[:4], txt, s))
    torch.testing.assert_close(m["loss_itc2"], naive_clip(img[4:], txt, s))
    h = model.image_mlp(cls)
    torch.testing.assert_close(m["loss_ssl"], naive_simclr(h[:4], h[4:], 0.1))
    pred = model.im_pred_byol(model.im_proj_byol(cls))
    ref_o2e = sum(2 - 2 * F.cosine_similarity(pred[i], target[i % 4], dim=0) for i in range(8)) / 8
    torch.testing.assert_close(m["loss_o2e"], ref_o2e)
    # gradients: every trained part, not the frozen patch conv, not the EMA
    loss.backward()
    grads = grads_of(model)
    for name in ("visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj", "visual.positional_embedding",
                 "transformer.resblocks.0.mlp.c_fc.weight", "text_projection", "token_embedding.weight",
                 "logit_scale", "image_mlp.0.weight", "image_mlp.6.weight", "im_proj_byol.0.weight",
                 "im_pred_byol.3.weight"):
        assert name in grads, name
    assert model.visual.conv1.weight.grad is None and not model.visual.conv1.weight.requires_grad
    assert all(p.grad is None for p in teacher.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    opt = aclip.make_optimizer(model, args, torch.device("cpu"))
    assert "visual.conv1.weight" not in {names[id(p)] for g in opt.param_groups for p in g["params"]}
    assert {"logit_scale", "visual.ln_pre.weight", "image_mlp.1.weight"} <= \
        {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert {"visual.class_embedding", "visual.positional_embedding", "token_embedding.weight"} <= \
        {names[id(p)] for p in opt.param_groups[0]["params"]}


def test_ssl_losses_only_on_their_paths(world1):
    model, teacher, args = small_model()
    batch = loader_batch(args)
    (online, boxes, ema), texts, _ = batch
    images = online.transpose(0, 1).flatten(0, 1)
    cls = model.visual.ln_post(model.visual(images)[:, 0])
    h = model.image_mlp(cls)
    aclip.simclr_loss(h[:4], h[4:], 0.1).backward()
    grads = grads_of(model)
    assert "image_mlp.0.weight" in grads and "visual.transformer.resblocks.0.attn.in_proj_weight" in grads
    assert not any(n.startswith(("transformer.", "text_projection", "im_proj_byol", "im_pred_byol", "visual.proj"))
                   for n in grads)
    # the released pairing (view 1 with itself) gives view 2 no SimCLR gradient
    model.zero_grad()
    x = images.clone().requires_grad_()
    cls = model.visual.ln_post(model.visual(x)[:, 0])
    model.train(False)                                                   # BN on running stats: rows independent
    aclip.simclr_loss(model.image_mlp(cls)[:4], model.image_mlp(cls)[:4], 0.1).backward()
    assert x.grad[:4].abs().sum() > 0 and x.grad[4:].abs().sum() == 0


@pytest.mark.parametrize("flags", [["--mask", "random"],
                                   ["--mask", "none", "--views", "1", "--loss-weights", "1", "0", "0", "0"],
                                   ["--views", "1", "--loss-weights", "1", "0", "0", "2"],
                                   ["--simclr-views", "v1_v1", "--no-three-crop-fix", "--photo-aug", "aclip"],
                                   ["--score-layers", "last", "--attentive-keep", "least", "--no-keep-extra-block"],
                                   ["--eff", "--block-size", "2"], ["--eff", "--no-freeze-patch-embed"]])
def test_variants_run_one_step(world1, flags):
    model, teacher, args = small_model(*flags)
    batch = loader_batch(args)
    opt = aclip.make_optimizer(model, args, torch.device("cpu"))
    loss, metrics = aclip.train_step(model, model, teacher, batch, 1, SCHED, args, torch.device("cpu"))
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    aclip.after_step(model, teacher, 1, SCHED, args)
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    assert math.isfinite(loss.item()) and all(math.isfinite(v.item()) for v in metrics.values())
    if args.mask == "none" and args.loss_weights[3] == 0:
        assert teacher is None and len(batch[0]) == 2 and not hasattr(model, "image_mlp")
        assert set(metrics) == {"loss_itc1"}
    if args.eff:
        assert batch[0][2].shape[-1] == 16                                 # half of 32 px: a 2x2 EMA map
        with torch.no_grad():
            score, _ = teacher.score_and_target(batch[0][2])
        assert score.shape == (4, 4)
        n = aclip.n_keep_blocks((4 // args.block_size) ** 2, 0.5)
        keep = aclip.attentive_keep(score, 2, batch[0][1], 2, 4, args.block_size, n)
        assert keep.shape == (8, n * args.block_size ** 2)
    assert model.visual.conv1.weight.requires_grad == (not args.freeze_patch_embed)


def test_bad_flag_combinations_are_one_line_errors():
    for flags, match in [(["--views", "1"], "--views 1 has no second view"),
                         (["--eff", "--ema-img-size", "16"], "give one of them"),
                         (["--ema-img-size", "12"], "not a positive multiple of the patch size"),
                         (["--mask", "none", "--loss-weights", ".5", ".5", "1", "0", "--eff"], "no EMA pass runs")]:
        args = small_args(*flags)
        with pytest.raises(common.UsageError, match=match) as e:
            aclip.check_args(aclip.model_config(args), args)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- distributed
def _step_on_slice(rank, world, batch, vectors):
    """One DDP step of the default model (both SSL heads, their BatchNorm, the EMA target) on this rank's
    slice of a fixed global batch, and SimCLR alone on a slice of fixed vectors."""
    torch.manual_seed(0)
    args = small_args("--block-size", "2")
    model, teacher = aclip.build_model(aclip.model_config(args), args)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    (online, boxes, ema), texts, _ = batch
    b = texts.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    loss, metrics = aclip.train_step(ddp, model, teacher, ((online[sl], boxes[sl], ema[sl]), texts[sl], None),
                                     3, SCHED, args, torch.device("cpu"))
    loss.backward()
    a, c = (v[sl].clone().requires_grad_() for v in vectors)
    ssl = aclip.simclr_loss(a, c, 0.1)
    ssl.backward()
    return {"loss": loss.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "bn": sorted({type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__}),
            "ssl": ssl.detach(), "ssl_grads": (a.grad, c.grad),
            "running_var": model.image_mlp[1].running_var.clone()}


def test_two_gloo_processes_match_one_process(world1, tmp_path):
    args = small_args("--block-size", "2")
    batch = loader_batch(args, n=8, seed=3)
    g = torch.Generator().manual_seed(5)
    vectors = (torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g))
    one = _step_on_slice(0, 1, batch, vectors)                            # this process, a world of one
    ref = naive_simclr(*(v.clone().requires_grad_() for v in vectors), 0.1)
    torch.testing.assert_close(one["ssl"], ref)
    two = run_distributed(_step_on_slice, 2, tmp_path / "two", batch, vectors)
    assert one["bn"] == ["BatchNorm1d"] and two[0]["bn"] == ["GlobalBatchNorm1d"]   # converted under DDP only
    torch.testing.assert_close((two[0]["loss"] + two[1]["loss"]) / 2, one["loss"], rtol=1e-5, atol=1e-5)
    assert set(two[0]["grads"]) == set(one["grads"])
    for name, grad in one["grads"].items():
        for r in range(2):
            torch.testing.assert_close(two[r]["grads"][name], grad, rtol=1e-4, atol=2e-6, msg=name)
    torch.testing.assert_close(two[0]["running_var"], one["running_var"], rtol=1e-4, atol=1e-6)
    # SimCLR alone: the ranks' losses average to the full-batch loss; each rank's input gradient is
    # world × the full-batch loss's gradient on its rows (DDP then averages parameter gradients)
    torch.testing.assert_close((two[0]["ssl"] + two[1]["ssl"]) / 2, one["ssl"])
    for r in range(2):
        for got, full in zip(two[r]["ssl_grads"], one["ssl_grads"]):
            torch.testing.assert_close(got / 2, full[r * 4:(r + 1) * 4])


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_smoke_run_exports_and_masks(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("aclip.py", *TINY, "--steps", "2", "--save-masks", "2", "--out-dir", out)
    assert "done: 2 steps" in proc.stdout + proc.stderr
    for name in ("checkpoint.pt", "export_online.pt", "export_ema.pt", "metrics.jsonl", "masks_0000000.png"):
        assert (out / name).exists(), name
    assert not (out / "masks_0000001.png").exists()
    sheet = Image.open(out / "masks_0000000.png")
    assert sheet.size == (3 * 100, 8 * 100)                               # EMA view + 2 views, 8 samples
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert {"loss_itc1", "loss_itc2", "loss_ssl", "loss_o2e", "ema_momentum"} <= set(records[0])
    assert {"online/top1", "ema/top1"} <= set(records[-1]["eval"])
    for name in ("online", "ema"):
        export = torch.load(out / f"export_{name}.pt", weights_only=True)
        assert export["weights"] == name and "visual.conv1.weight" in export["state_dict"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["method"] == "aclip" and "im_proj_byol.0.weight" in ckpt["teacher"]


def test_cli_bad_flags_fail_at_start_up(tmp_path):
    proc = run_cli("aclip.py", *TINY, "--views", "1", "--out-dir", tmp_path / "v", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: --views 1 has no second view")
    assert not (tmp_path / "v").exists()


def test_cli_resume_mid_schedule_is_bit_exact(tmp_path):
    """A 4-step run that stops after its step-2 checkpoint (a failure raised inside the third step), resumed
    with the same command and --resume, ends bit-identical to the straight run: model, EMA teacher and
    optimizer. (A first leg run with --steps 2 is another run: the EMA momentum's cosine and the learning
    rate's follow the total number of steps.)"""
    wrapper = tmp_path / "fail_at_step_2.py"
    wrapper.write_text(
        "import sys\nsys.path.insert(0, sys.argv.pop(1))\nimport aclip\nafter = aclip.after_step\n\n\n"
        "def after_step(model, teacher, step, sched, args):\n    after(model, teacher, step, sched, args)\n"
        "    if step == 2:\n        raise SystemExit('stopped in step 2')\n\n\n"
        "aclip.after_step = after_step\naclip.main(sys.argv[1:])\n")
    args = [*TINY, "--steps", "4", "--save-every", "2"]
    run_cli("aclip.py", *args, "--out-dir", tmp_path / "straight")
    failed = run_cli(str(wrapper), common.__file__.rsplit("/", 1)[0], *args, "--out-dir", tmp_path / "split",
                     check=False)
    assert failed.returncode != 0 and "stopped in step 2" in failed.stderr
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"] == 2
    run_cli("aclip.py", *args, "--out-dir", tmp_path / "split", "--resume")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "split"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "teacher"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_released_model_sizes_and_seven_imagenet_templates(world1, monkeypatch):
    """ViT-L/16 keeps the 512-wide, 8-head text tower and 512-d joint space; ViT-S/16 has 12 heads
    (models.py ACLIP_VITL16, ACLIP_VITS16); the ImageNet zero-shot uses the 7 templates of SLIP and A-CLIP."""
    large = aclip.model_config(aclip.parse_args(["--model", "ViT-L/16", "--train-data", "x.csv"]))
    assert (large["width"], large["text_width"], large["text_heads"], large["embed_dim"]) == (1024, 512, 8, 512)
    assert aclip.model_config(aclip.parse_args(["--model", "ViT-S/16", "--train-data", "x.csv"]))["heads"] == 12
    assert common.model_size("maskclip", "ViT-L/16")["text_width"] == 768
    seen = []

    def setup(encode_text, **kw):
        seen.append(kw["imagenet_templates"])
        raise StopIteration
    monkeypatch.setattr(common, "zero_shot_setup", setup)
    model, teacher, args = small_model()
    with pytest.raises(StopIteration):
        aclip.evaluate(model, teacher, args, torch.device("cpu"))
    assert seen == [common.SIMPLE_IMAGENET_TEMPLATES] and len(seen[0]) == 7


def test_ema_projector_keeps_no_running_statistics(world1):
    model, teacher, _ = small_model()
    assert list(teacher.buffers()) == [] and any(True for _ in model.im_proj_byol.buffers())
