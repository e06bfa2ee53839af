"""MaskDistill: masked distillation of a frozen CLIP teacher, from "A Unified View of Masked Image Modeling".
Z. Peng, L. Dong, H. Bao, Q. Ye, F. Wei. TMLR 2023, arXiv 2210.10615. The official code was never released
(microsoft/unilm `unimim/` holds a README only); the authors say it is based on BEiT v2, whose code
(microsoft/unilm `beit2/`) settles every detail the paper leaves open. This file is a reference.

Idea (Sec. 2, Fig. 1). Every masked-image-modelling method is five parts: a teacher T, a normalisation N of
its output, a student S that sees a corrupted image, a head H and a loss. MaskDistill (Sec. 3) picks
T = a frozen CLIP image encoder on the full image, N = LayerNorm without affine parameters, S = a BEiT
ViT in which a learned [MASK] token replaces ~40% of the patch embeddings (block-wise), H = one Linear
layer, and a Smooth-L1 loss at the masked patches only. No contrastive loss, no text, no EMA: the
language supervision arrives through the CLIP teacher's patch features.

Objective (Eq. 1, the unified view, with M the masked patches, |M| the same in every sample):
    L = 1/(|M|·D_t) Σ_{i∈M} Σ_c SmoothL1_β( H(S(x̃))_{i,c}, N(T(x))_{i,c} )
    x̃ = x with patch embeddings e_i ← e_i·(1 - m_i) + e_[MASK]·m_i        m_i = 1 for i ∈ M
    N(t) = (t - mean(t)) / sqrt(var(t) + 1e-5)   over the D_t channels of each teacher patch token
    T(x) = ln_post(CLIP_visual(x))[:, 1:] @ proj  project choice (BEiT v2's CLIP target; `--teacher-output`)
    β = 1                                          project choice (`--smooth-l1-beta`; the paper's value is unknown)

Differs from the CLIP baseline (maskclip.py with `--dist-weight 0 --mlm-weight 0`) in every method section:
the student is a BEiT ViT, not a CLIP, and the only loss is the regression of the teacher's features.
The teacher is read with common.load_clip, so it can be an export or checkpoint of maskclip.py, aclip.py
or silc.py, an OpenAI TorchScript archive or an OpenAI/open_clip state dict.
Read one step: train_step → Teacher.targets → gather_tokens → MaskDistill.forward (embed, encode, head)
→ regression_loss.

Project choices where the paper is silent (from BEiT v2's code, microsoft/unilm beit2/, where it has one):
  - student (modeling_pretrain.py): no absolute position embedding, one relative position bias shared by
    all blocks (zero init), q/v biases (no k bias), layer scale 0.1 (1e-5 from width 1024 on), LayerNorm
    eps 1e-6, trunc-normal init (std 0.02, cut at ±0.02), then attn.proj / mlp.c_proj of block l / sqrt(2l);
  - masking (masking_generator.py): block-wise with an exact count, 75 of 196 patches (the same fraction,
    rounded, on other grids), blocks of 16 to 75 patches (the count), aspect ratio in [0.3, 1/0.3], 10 tries
    per block, then a uniform fill up to the count; drawn per sample in the data loader;
  - teacher: the same augmented view as the student, unmasked; the student's pixels are converted on the
    device to the teacher's normalisation (the one its file records, else CLIP's); a teacher with another
    patch size gets the same crop resized to student grid × teacher patch by the data transform (BEiT v2's
    second input size) and its position embedding interpolated; any other grid mismatch is an error;
  - target: N(ln_post(·) @ proj), 512-d for CLIP-B/16 (BEiT v2's CLIP target; the paper does not say which
    CLIP output);
  - loss: Smooth-L1 with β = 1.0 (PyTorch's default; data2vec uses 2), averaged over masked tokens and channels;
  - recipe (PRETRAINING.md): 300-epoch ViT-B (batch 2048, AdamW (0.9, 0.98), lr 1.5e-3 from 0 over 10
    warm-up epochs, cosine to 1e-5, wd 0.05 (not on 1-D weights, biases, [CLS]), clip 3.0, crop scale
    0.2, colour jitter 0.4, flip), bf16 autocast instead of fp16;
  - evaluation: k-NN (k = 20, T = 0.07) of mean-pooled final patch tokens, since no [CLS] is trained,
    next to the teacher's k-NN on its CLIP embedding and on its mean-pooled target features.

Run (build a teacher first, or point --teacher at OpenAI's ViT-B-16.pt):
    torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip        # ~2 min, CPU
    torchrun maskdistill.py --teacher runs/clip/export_online.pt                   # built-in demo, CPU
    torchrun --nproc_per_node=8 maskdistill.py --train-data imagenet/train --imagenet-val imagenet/val \
        --teacher ViT-B-16.pt                       # OpenAI's file; LAION open_clip weights: add --teacher-act gelu

Left out: fine-tuning, segmentation and detection; the relative-position table copy into every block that
fine-tuning does; a layer-wise learning-rate decay (fine-tuning only).
"""
import collections
import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import common

METHOD = "maskdistill"
DATA_KIND = "image"  # what the training data must provide: image-text pairs, or images alone

# ----------------------------------------------------------------------------------------------------
# <method> Recipe and flags
# ----------------------------------------------------------------------------------------------------
# The paper's recipe: the defaults whenever --train-data is given (BEiT v2's 300-epoch ViT-B/16 ImageNet-1k
# recipe, microsoft/unilm beit2/PRETRAINING.md, which the authors say MaskDistill is based on).
RECIPE = dict(model="ViT-B/16", batch_size=2048, epochs=300, lr=1.5e-3, lr_start=0.0, lr_end=1e-5,
              warmup_epochs=10.0, act="gelu", wd=0.05, beta1=0.9, beta2=0.98, eps=1e-8, grad_clip=3.0,
              norm="imagenet", crop_scale=0.2, eval_every=10.0, workers=8, min_mask_patches_per_block=16,
              color_jitter=0.4, knn_samples=100_000)
# The built-in demo: what runs when --train-data is not given (tiny model, shapes rendered on the fly). The
# 4×4 grid holds no 16-patch block (blocks must be narrower and shorter than the grid), so blocks start at
# 2 patches; 6 of the 16 patches are masked (75/196 of them, rounded). No colour jitter: colour is half
# of the shapes' class.
DEMO = dict(model="tiny", batch_size=64, epochs=3, lr=1.5e-3, lr_start=0.0, lr_end=1e-5, warmup_epochs=0.25,
            crop_scale=0.8, builtin_samples=12288, eval_every=0.0, workers=1, min_mask_patches_per_block=2,
            color_jitter=0.0, knn_samples=4096)


def add_method_args(p):
    g = p.add_argument_group("MaskDistill")
    g.add_argument("--teacher", help="the frozen CLIP teacher (required): a checkpoint or export of maskclip.py, "
                                     "aclip.py or silc.py, an OpenAI CLIP TorchScript archive or an OpenAI/open_clip "
                                     "ViT state dict")
    g.add_argument("--teacher-act", choices=["quickgelu", "gelu"],
                   help="the teacher's MLP activation (default: what its file records, else quickgelu as in "
                        "OpenAI's weights; LAION open_clip weights need gelu)")
    g.add_argument("--teacher-norm", default="file", choices=["file", *common.NORMS],
                   help="the teacher's pixel normalisation: 'file' takes the one its file records, else CLIP's")
    g.add_argument("--smooth-l1-beta", type=common.positive(1.0), default=1.0,
                   help="β of the Smooth-L1 loss (2.0: data2vec's)")
    g.add_argument("--num-mask-patches", type=common.at_least(1, eg=75),
                   help="patches masked in every image (default: 75 of 196 at 224/16; the same fraction, rounded, "
                        "on other grids)")
    g.add_argument("--min-mask-patches-per-block", type=common.at_least(1, eg=16),
                   help="smallest block of the block-wise generator")
    g.add_argument("--max-mask-patches-per-block", type=common.at_least(1, eg=75),
                   help="largest block of the block-wise generator, in patches (default: the masked count, as BEiT "
                        "v2's max_num_patches=None)")
    g.add_argument("--layer-scale-init", type=common.at_least(0, float, 0.1),
                   help="initial layer-scale γ (default: 0.1, or 1e-5 from width 1024 on, as BEiT v2; 0 = off)")
    g.add_argument("--drop-path", type=common.fraction(hi_open=True, eg=0.1), default=0.0,
                   help="stochastic depth rate of the last block "
                        "(BEiT v2: 0 for 300 epochs, 0.1 for 1600)")
    g.add_argument("--color-jitter", type=common.at_least(0, float, 0.4),
                   help="brightness, contrast and saturation jitter")
    g.add_argument("--knn-samples", type=common.at_least(1, eg=4096),
                   help="training images whose features the k-NN evaluation votes with")
    g = p.add_argument_group("MaskDistill ablations (other choices of the unified view's parts, Sec. 2)")
    g.add_argument("--teacher-output", default="ln_post_proj", choices=["ln_post_proj", "ln_post", "pre_ln_post"],
                   help="teacher patch features to regress: after ln_post and the projection (BEiT v2's CLIP "
                        "target), after ln_post, or the last block's raw output")
    g.add_argument("--target-norm", default="layernorm", choices=["layernorm", "none"],
                   help="N: LayerNorm without affine parameters on each target token, or none")
    g.add_argument("--loss", default="smooth-l1", choices=["smooth-l1", "mse", "cosine"],
                   help="regression loss at the masked patches")
    g.add_argument("--mask-type", default="block", choices=["block", "random"],
                   help="BEiT v2's block-wise masking, or uniformly random patches (the same count)")


# ----------------------------------------------------------------------------------------------------
# <shared> Model: transformer blocks, ViT, text tower and CLIP in the OpenAI layout
# ----------------------------------------------------------------------------------------------------
class QuickGELU(nn.Module):
    """x·σ(1.702x), the activation OpenAI's CLIP weights were trained with, computed as SiLU(1.702x)/1.702:
    one fused kernel that keeps one tensor for the backward pass instead of two."""

    def forward(self, x):
        return F.silu(1.702 * x) / 1.702


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (the OpenAI CLIP layout:
    q, k, v packed in `in_proj_weight`), computed by F.scaled_dot_product_attention."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, causal=False, cls_attention=False):
        """(B, N, D) -> (B, N, D). With cls_attention=True also returns the attention probabilities of the
        first ([CLS]) query over all N keys, averaged over heads: (B, N), from the same q and k."""
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)                   # (B, N, 3D)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N, D/H)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)             # (B, H, N, D/H)
        out = self.out_proj(out.transpose(1, 2).reshape(B, N, D))                   # (B, N, D)
        if not cls_attention:
            return out
        attn = (q[:, :, :1] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5            # (B, H, 1, N)
        return out, attn.float().softmax(-1).mean(1)[:, 0]                          # (B, N, D), (B, N)


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.gelu = QuickGELU() if act == "quickgelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, dim, heads, act, mlp_ratio=4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x, causal=False, cls_attention=False):
        """(B, N, D) -> (B, N, D), and the [CLS] attention row (B, N) with cls_attention=True (see Attention)."""
        h = self.attn(self.ln_1(x), causal, cls_attention)
        h, row = h if cls_attention else (h, None)
        x = x + h
        x = x + self.mlp(self.ln_2(x))
        return (x, row) if cls_attention else x


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, act):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, act) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x, causal=False, cls_attention=0):
        """x: (B, N, D) -> (B, N, D). With cls_attention=n > 0 also returns the [CLS] attention rows of the
        last n blocks, averaged over heads: (n, B, N); the other blocks do not compute theirs."""
        maps = []
        for i, block in enumerate(self.resblocks):
            row = i >= self.layers - cls_attention
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, row, use_reentrant=False)
            else:
                x = block(x, causal, row)
            if row:
                x, r = x
                maps.append(r)
        return (x, torch.stack(maps)) if cls_attention else x


def init_transformer(tower):
    """Per-block stds of OpenAI's CLIP: attention in W^-0.5, residual outputs W^-0.5·(2L)^-0.5, MLP input (2W)^-0.5."""
    w, n = tower.width, tower.layers
    for block in tower.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=w ** -0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=w ** -0.5 * (2 * n) ** -0.5)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=w ** -0.5 * (2 * n) ** -0.5)
        for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp.c_fc.bias, block.mlp.c_proj.bias):
            nn.init.zeros_(bias)


class VisionTransformer(nn.Module):
    """ViT with OpenAI CLIP's parameter names. Returns every token, so that teachers and decoders get the
    patch features, not only the pooled [CLS]. class_token=False: no [CLS] and no ln_pre (big_vision's ViT,
    for heads that pool the patches)."""

    def __init__(self, image_size, patch_size, width, layers, heads, output_dim, act, class_token=True):
        super().__init__()
        self.patch_size, self.grid, self.n_cls = patch_size, image_size // patch_size, int(class_token)
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width)) if class_token else None
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.n_cls + self.grid ** 2, width))
        self.ln_pre = nn.LayerNorm(width) if class_token else nn.Identity()
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def pos_embed(self, gh, gw):
        """Position embedding for a gh × gw grid, [CLS] row first if any: (n_cls + gh·gw, D). Bicubically
        interpolated when the grid differs from the one the model was built for (other input sizes)."""
        if (gh, gw) == (self.grid, self.grid):
            return self.positional_embedding
        cls, patches = self.positional_embedding[:self.n_cls], self.positional_embedding[self.n_cls:]
        patches = patches.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)      # (1, D, g, g)
        patches = F.interpolate(patches.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.to(cls.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)])  # (n_cls+gh·gw, D)

    def forward(self, x, keep=None, cls_attention=0):
        """x: (B, 3, H, W); keep: (B, K) indices of the patches to encode, or None for all. Each kept patch
        carries its own position embedding. Returns the last block's tokens, before ln_post, [CLS] first
        if any: (B, n_cls+K, D) (and the last cls_attention blocks' [CLS] rows, see Transformer)."""
        x = self.conv1(x)                                          # (B, D, gh, gw)
        B, D, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)                           # (B, N, D)
        pos = self.pos_embed(gh, gw).to(x.dtype)
        x = x + pos[self.n_cls:]
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, D))     # (B, K, D)
        if self.n_cls:
            x = torch.cat([(self.class_embedding + pos[0]).to(x.dtype).expand(B, 1, D), x], dim=1)  # (B, 1+K, D)
        return self.transformer(self.ln_pre(x), cls_attention=cls_attention)


class CLIP(nn.Module):
    """Image and text towers with the parameter names of OpenAI's CLIP state dict (`visual.conv1`,
    `visual.transformer.resblocks.N.attn.in_proj_weight`, `token_embedding`, `ln_final`, `text_projection`,
    `logit_scale`, ...), so that OpenAI and open_clip ViT checkpoints load with strict checks."""

    def __init__(self, *, image_size, patch_size, width, layers, heads, context_length, text_width, text_layers,
                 text_heads, embed_dim, act="quickgelu", vocab_size=common.VOCAB_SIZE, class_token=True):
        super().__init__()
        self.visual = VisionTransformer(image_size, patch_size, width, layers, heads, embed_dim, act, class_token)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
        self.transformer = Transformer(text_width, text_layers, text_heads, act)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.empty(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # s = exp(logit_scale) starts at 1/0.07
        self.init_parameters()

    def init_parameters(self):
        """OpenAI's initialisation, applied to both towers."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.visual.transformer, self.transformer):
            init_transformer(tower)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def encode_image(self, image, keep=None):
        """(B, 3, H, W) -> (B, E): the [CLS] token after ln_post, projected. Not normalised."""
        x = self.visual(image, keep)
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj

    def encode_dense(self, image):
        """(B, 3, H, W) -> (B, N, E): every patch token after ln_post, through the same projection as [CLS]
        (the readout of zero-shot segmentation). Not normalised."""
        x = self.visual(image)
        return self.visual.ln_post(x[:, 1:]) @ self.visual.proj

    def text_tokens(self, text, causal=True):
        """(B, L) ids -> (B, L, W) after ln_final."""
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        return self.ln_final(self.transformer(x, causal=causal))

    def encode_text(self, text):
        """(B, L) ids -> (B, E), pooled at the end token, which has the largest id. Not normalised."""
        x = self.text_tokens(text)
        return x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection


# ----------------------------------------------------------------------------------------------------
# <method> Masking
# ----------------------------------------------------------------------------------------------------
class BlockMaskGenerator:
    """BEiT v2's block-wise masking with an exact count (microsoft/unilm beit2/masking_generator.py):
    rectangles of `min_block` to `max_block` patches (None: up to the count), aspect ratio log-uniform in
    [min_aspect, 1/min_aspect], each placed uniformly (10 tries), until `num_masked` patches are covered or no
    block fits; then a uniform fill of single patches up to exactly `num_masked`. Called on the host with the
    sample's random.Random (common.py's randomness contract). `random=True` draws the same number uniformly."""

    def __init__(self, grid, num_masked, min_block=16, max_block=None, min_aspect=0.3, attempts=10, random=False):
        self.gh, self.gw = grid
        n = self.gh * self.gw
        if not 0 < num_masked < n:
            raise ValueError(f"{num_masked} masked patches: must be between 1 and {n - 1} for the "
                             f"{self.gh}×{self.gw} patch grid")
        if min_block < 1:
            raise ValueError(f"the smallest block, {min_block} patches, must be at least 1")
        if max_block is not None and not min_block <= max_block <= num_masked:
            raise ValueError(f"the largest block, {max_block} patches, must be between the smallest ({min_block}) "
                             f"and the masked count ({num_masked})")
        self.num_masked, self.min_block = num_masked, min_block
        self.max_block = num_masked if max_block is None else max_block   # BEiT v2: max_num_patches=None
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.attempts, self.random = attempts, random

    def _block(self, mask, budget, rng):
        """Mask one rectangle that adds between 1 and `budget` new patches; returns how many it added (0 if
        all tries failed)."""
        for _ in range(self.attempts):
            area = rng.uniform(self.min_block, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < self.gh and w < self.gw:
                top, left = rng.randint(0, self.gh - h), rng.randint(0, self.gw - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    return new
        return 0

    def __call__(self, rng):
        """A (gh, gw) bool mask with exactly num_masked True (= masked) cells."""
        mask = np.zeros((self.gh, self.gw), dtype=bool)
        if self.random:
            mask.flat[rng.sample(range(mask.size), self.num_masked)] = True
            return mask
        count = 0
        while count < self.num_masked:
            added = self._block(mask, min(self.num_masked - count, self.max_block), rng)
            if added == 0:
                break
            count += added
        if count < self.num_masked:  # BEiT v2's fill (not in BEiT v1): uniform single patches up to the count
            free = np.flatnonzero(~mask).tolist()
            mask.flat[rng.sample(free, self.num_masked - count)] = True
        assert mask.sum() == self.num_masked
        return mask


def num_mask_patches(args, cfg):
    """--num-mask-patches, or BEiT v2's 75 of 196 patches (≈ 40%), scaled to the grid and rounded."""
    if args.num_mask_patches is not None:
        return args.num_mask_patches
    return round((cfg["image_size"] // cfg["patch_size"]) ** 2 * 75 / 196)


# ----------------------------------------------------------------------------------------------------
# <method> Losses
# ----------------------------------------------------------------------------------------------------
def normalize_targets(t, kind="layernorm"):
    """N of Eq. 1: LayerNorm without affine parameters over the channels of each token (biased variance,
    eps 1e-5), in fp32. t: (..., D_t)."""
    t = t.float()
    return F.layer_norm(t, t.shape[-1:]) if kind == "layernorm" else t


def regression_loss(pred, target, kind="smooth-l1", beta=1.0):
    """Eq. 1: the mean over masked tokens and channels of SmoothL1_β(H(S(x̃)), N(T(x))). pred, target:
    (B, N_m, D_t), the masked patches only. `mse` and `cosine` (1 - cos per token) are the loss ablations.
    The same count N_m in every sample makes the mean over the local batch, averaged over ranks by DDP,
    the mean over the global batch; no collective, so it runs without a process group."""
    pred = pred.float()
    if kind == "smooth-l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if kind == "mse":
        return F.mse_loss(pred, target)
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


# ----------------------------------------------------------------------------------------------------
# <method> Model
# ----------------------------------------------------------------------------------------------------
def trunc_normal_(tensor, std=0.02):
    """BEiT's initialisation: normal(0, std) truncated at ±std."""
    return nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)


def drop_path(x, rate, training):
    """Stochastic depth: drop a sample's whole residual branch with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - rate)    # (B, 1, 1)
    return x * keep / (1 - rate)


def gather_tokens(x, index):
    """x: (B, N, D), index: (B, K) -> (B, K, D), without boolean indexing (fixed shapes, no host sync)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class RelativePositionBias(nn.Module):
    """One learned bias per head and relative offset, shared by all blocks (BEiT v2's pre-training). The
    table has (2·gh-1)(2·gw-1) patch-to-patch offsets plus 3 entries for [CLS]→patch, patch→[CLS] and
    [CLS]→[CLS]; it starts at zero."""

    def __init__(self, gh, gw, heads):
        super().__init__()
        n_rel = (2 * gh - 1) * (2 * gw - 1) + 3
        self.table = nn.Parameter(torch.zeros(n_rel, heads))
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])                          # (2, N)
        rel = coords[:, :, None] - coords[:, None, :]                               # (2, N, N): query - key
        index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long)
        index[1:, 1:] = (rel[0] + gh - 1) * (2 * gw - 1) + rel[1] + gw - 1        # (N, N)
        index[0, :], index[:, 0], index[0, 0] = n_rel - 3, n_rel - 2, n_rel - 1
        self.register_buffer("index", index, persistent=False)                     # (1+N, 1+N)

    def forward(self):
        return self.table[self.index].permute(2, 0, 1)                             # (H, 1+N, 1+N)


class BEiTAttention(nn.Module):
    """Self-attention with a bias-free qkv Linear plus learned q and v biases (k has none), and an additive
    relative position bias, computed by F.scaled_dot_product_attention."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias):
        B, N, D = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)                               # (B, N, 3D)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N, D/H)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None].to(q.dtype))    # (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))                       # (B, N, D)


class BEiTBlock(nn.Module):
    """Pre-norm block with layer scale: x + γ1·attn(norm1(x), bias), then x + γ2·mlp(norm2(x))."""

    def __init__(self, dim, heads, act, layer_scale, drop_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = BEiTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, 4 * dim, act)
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale > 0 else None
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale > 0 else None
        self.drop_rate = drop_rate

    def forward(self, x, bias):
        h = self.attn(self.norm1(x), bias)
        x = x + drop_path(h if self.gamma_1 is None else self.gamma_1 * h, self.drop_rate, self.training)
        h = self.mlp(self.norm2(x))
        return x + drop_path(h if self.gamma_2 is None else self.gamma_2 * h, self.drop_rate, self.training)


def layer_scale_init(value, width):
    """`value` (--layer-scale-init), or BEiT v2's default for the width when None: 0.1 for base and smaller,
    1e-5 for large and huge."""
    if value is not None:
        return value
    return 0.1 if width < 1024 else 1e-5


class MaskDistill(nn.Module):
    """The student S (a BEiT ViT that takes a [MASK] token at the masked patches) and the head H (one
    Linear from the width D to the teacher's feature size D_t). The text-tower sizes of a model config
    (context_length, text_width, ...) are accepted and ignored, so that MaskDistill(**cfg, ...) works."""

    def __init__(self, *, image_size, patch_size, width, layers, heads, act, target_dim, layer_scale=0.1,
                 drop_path=0.0, loss="smooth-l1", beta=1.0, **text_tower):
        super().__init__()
        self.grid = image_size // patch_size
        self.loss_kind, self.beta = loss, beta
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.rel_pos_bias = RelativePositionBias(self.grid, self.grid, heads)
        rates = torch.linspace(0, drop_path, layers).tolist()                     # stochastic depth grows with depth
        self.blocks = nn.ModuleList([BEiTBlock(width, heads, act, layer_scale, r) for r in rates])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, target_dim)
        self.grad_checkpointing = False
        self.init_parameters()

    def init_parameters(self):
        """BEiT's: trunc-normal(0.02) tokens, Linear and Conv weights, zero biases, LayerNorm (1, 0); then the
        residual outputs of block l (1-based) divided by sqrt(2l)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.cls_token)
        trunc_normal_(self.mask_token)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2 * layer))
                block.mlp.c_proj.weight.div_(math.sqrt(2 * layer))

    def embed(self, image, masked=None):
        """The tokens entering the first block: [CLS], then the patch embeddings with the [MASK] token at the
        masked patches (x̃ of Eq. 1). masked: (B, N_m) patch indices, or None. (B, 1+N, D)."""
        x = self.patch_embed(image).flatten(2).transpose(1, 2)                     # (B, N, D)
        B, N, D = x.shape
        if masked is not None:
            m = x.new_zeros(B, N, 1).scatter_(1, masked[..., None], 1.0)           # (B, N, 1), 1 = masked
            x = x * (1 - m) + self.mask_token.to(x.dtype) * m                      # Eq. 1: e·(1 - m) + e_[MASK]·m
        return torch.cat([self.cls_token.to(x.dtype).expand(B, 1, D), x], dim=1)  # (B, 1+N, D), no abs. position

    def encode(self, image, masked=None):
        """S(x̃): every token after the blocks and the final LayerNorm, [CLS] first: (B, 1+N, D)."""
        x = self.embed(image, masked)
        bias = self.rel_pos_bias()                                                 # (H, 1+N, 1+N), every block
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
        return self.norm(x)

    def features(self, image):
        """The frozen feature for k-NN and linear probing: mean of the final patch tokens, (B, D)."""
        return self.encode(image)[:, 1:].mean(dim=1)

    def forward(self, image, masked, target):
        """One training step's loss. image: (B, 3, H, W) student view; masked: (B, N_m) masked patch indices;
        target: (B, N_m, D_t) the normalised teacher features N(T(x)) at those patches. Returns (loss, {})."""
        x = gather_tokens(self.encode(image, masked)[:, 1:], masked)              # (B, N_m, D)
        pred = self.head(x)                                                        # H: (B, N_m, D_t)
        return regression_loss(pred, target, self.loss_kind, self.beta), {}


# ----------------------------------------------------------------------------------------------------
# <method> Teacher / EMA
# ----------------------------------------------------------------------------------------------------
TEACHER_HOWTO = ("to get a teacher, run `torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip` "
                 "first (the quickest CLIP-family demo run, about 2 minutes) and pass "
                 "--teacher runs/clip/export_online.pt")


class Teacher(nn.Module):
    """T of Eq. 1: a frozen CLIP image tower (the shared VisionTransformer, OpenAI layout). It sees the
    student's augmented view unmasked, converted from `student_norm` to its own pixel normalisation
    (mean, std), at `input_size` (student grid × teacher patch; in training the transform cuts that view from
    the crop); the tower then interpolates its position embedding. `output`: the patch features to regress
    (--teacher-output); `target_norm`: N. No gradient, always in eval mode, outside DDP, and not saved in checkpoints
    (`frozen`): a resumed run reads --teacher again."""
    frozen = True

    def __init__(self, visual, *, input_size, mean, std, output="ln_post_proj", target_norm="layernorm",
                 student_norm=common.NORMS["imagenet"]):
        super().__init__()
        self.visual, self.output, self.target_norm, self.input_size = visual, output, target_norm, input_size
        s_mean, s_std = student_norm
        for name, value in (("s_mean", s_mean), ("s_std", s_std), ("t_mean", mean), ("t_std", std)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.knn_results = None  # the teacher's k-NN figures: it never changes, so they are computed once
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # always in eval mode
        return super().train(False)

    def pixels(self, image):
        """Pixels normalised with --norm -> the teacher's input: back to [0, 1], resized bicubically if not at
        input_size (evaluation images; training views come at that size), then normalised with the teacher's
        mean and std. (B, 3, S, S)."""
        x = image.float() * self.s_std + self.s_mean
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
            x = x.clamp(0, 1)
        return (x - self.t_mean) / self.t_std

    def patch_features(self, tokens):
        """The chosen output of the last block's patch tokens (B, 1+N, D) -> (B, N, D_t)."""
        x = tokens[:, 1:]
        if self.output != "pre_ln_post":
            x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.output == "ln_post_proj" else x

    @torch.no_grad()
    def targets(self, image):
        """N(T(x)) at every patch of the full image: (B, N, D_t), fp32."""
        return normalize_targets(self.patch_features(self.visual(self.pixels(image))), self.target_norm)

    @torch.no_grad()
    def knn_features(self, image):
        """For the k-NN evaluation, from one forward pass: CLIP's image embedding ln_post([CLS]) @ proj (E
        channels) next to the mean over patches of the targets N(T(x)) (D_t channels): (B, E + D_t)."""
        tokens = self.visual(self.pixels(image))                                   # (B, 1+N, D)
        clip_emb = self.visual.ln_post(tokens[:, 0]) @ self.visual.proj            # (B, E)
        pooled = normalize_targets(self.patch_features(tokens), self.target_norm).mean(dim=1)  # (B, D_t)
        return torch.cat([clip_emb.float(), pooled], dim=-1)


def teacher_spec(sd, info, args, cfg):
    """What the student needs to know about the --teacher weights `sd` (and what its file says, `info`): the
    target size D_t, and the Teacher's input_size (student grid × teacher patch), mean and std. Checks at
    start-up that the grids align (common.openai_state_dict has checked that it is a CLIP ViT image tower)."""
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    teacher_grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    grid = cfg["image_size"] // cfg["patch_size"]
    if patch == cfg["patch_size"] and teacher_grid != grid:
        raise common.UsageError(
            f"--teacher {args.teacher} has a {teacher_grid}×{teacher_grid} grid of {patch}-px patches "
            f"({teacher_grid * patch} px), the {args.model} student a {grid}×{grid} grid of the same patches; "
            f"the grids must match: pick a --model at {teacher_grid * patch} px or a teacher at {cfg['image_size']} px")
    norm = args.teacher_norm if args.teacher_norm != "file" else info.get("norm")
    mean, std = common.NORMS[norm if norm in common.NORMS else "clip"]
    target_dim = sd["visual.proj"].shape[1] if args.teacher_output == "ln_post_proj" else width
    return target_dim, dict(input_size=grid * patch, mean=mean, std=std)


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
def build_model(cfg, args):
    """(student and head, frozen teacher). The --teacher file is read once; it and the evaluation data are
    checked first, so that a missing or wrong teacher fails before anything is built. Records the teacher's
    input size in args.teacher_size."""
    def teacher_error(e):
        return common.UsageError(f"--teacher: {e}; {TEACHER_HOWTO}")
    if not args.teacher:
        raise common.UsageError(f"MaskDistill distils a frozen CLIP image tower given by --teacher PATH; "
                                f"{TEACHER_HOWTO}")
    try:
        obj = common.read_weights_file(args.teacher)
        sd, info = common.openai_state_dict(args.teacher, obj)
    except common.UsageError as e:
        raise teacher_error(e) from None
    target_dim, spec = teacher_spec(sd, info, args, cfg)
    common.check_knn_data(args.train_data, args.imagenet_val)
    model = MaskDistill(**cfg, target_dim=target_dim, layer_scale=layer_scale_init(args.layer_scale_init, cfg["width"]),
                        drop_path=args.drop_path, loss=args.loss, beta=args.smooth_l1_beta)
    model.grad_checkpointing = args.grad_checkpointing
    try:  # after the student: its initialisation draws the same random numbers as without a teacher
        clip, _ = common.load_clip(args.teacher, CLIP, VisionTransformer, act=args.teacher_act, obj=obj)
    except common.UsageError as e:
        raise teacher_error(e) from None
    teacher = Teacher(clip.visual, **spec, output=args.teacher_output, target_norm=args.target_norm,
                      student_norm=common.NORMS[args.norm])
    args.teacher_size = spec["input_size"]  # for train_transform, which cuts the teacher's view (and args.json)
    return model, teacher


class MaskedView:
    """The training transform, on the host: colour jitter, `crop` (common.TrainCrop: RandomResizedCrop,
    bicubic, flip, normalisation), and the sample's mask from `masks` (a BlockMaskGenerator). (img, rng) ->
    (image (3, S, S), masked (N_m,) indices of the masked patches in row-major order). The teacher gets the
    same view, unmasked. `teacher_crop`: for a teacher that needs another size S_t, a TrainCrop of that size
    replaying the crop's draws, so that the same box of the original image (same flip) is resized once to
    S_t, as BEiT v2's RandomResizedCropAndInterpolationWithTwoPic does; then (image, masked, teacher image)."""

    def __init__(self, *, crop, masks, color_jitter=0.0, teacher_crop=None):
        self.crop, self.masks, self.jitter, self.teacher_crop = crop, masks, color_jitter, teacher_crop

    def __call__(self, img, rng):
        if self.jitter > 0:  # torchvision's ColorJitter(b, c, s): the three factors, in a random order
            ops = [common.TF.adjust_brightness, common.TF.adjust_contrast, common.TF.adjust_saturation]
            rng.shuffle(ops)
            for op in ops:
                img = op(img, rng.uniform(max(0.0, 1 - self.jitter), 1 + self.jitter))
        replay = random.Random()
        replay.setstate(rng.getstate())                                             # the crop's draws, twice
        image = self.crop(img, rng)
        masked = torch.from_numpy(np.flatnonzero(self.masks(rng)))                  # (3, S, S), (N_m,)
        return (image, masked) if self.teacher_crop is None else (image, masked, self.teacher_crop(img, replay))


def train_transform(args, cfg):
    grid = cfg["image_size"] // cfg["patch_size"]
    try:
        masks = BlockMaskGenerator((grid, grid), num_mask_patches(args, cfg), args.min_mask_patches_per_block,
                                   args.max_mask_patches_per_block, random=args.mask_type == "random")
    except ValueError as e:
        raise common.UsageError(f"--num-mask-patches / --min- / --max-mask-patches-per-block: {e}") from None
    mean, std = common.NORMS[args.norm]
    crop = common.TrainCrop(cfg["image_size"], (args.crop_scale, 1.0), mean, std, flip=True)
    size = getattr(args, "teacher_size", cfg["image_size"])     # build_model's, from the teacher file
    teacher_crop = common.TrainCrop(size, crop.scale, mean, std, flip=True) if size != cfg["image_size"] else None
    return MaskedView(crop=crop, masks=masks, color_jitter=args.color_jitter, teacher_crop=teacher_crop)


def no_weight_decay(name, param):
    """BEiT v2's groups (microsoft/unilm beit2/optim_factory.py): no weight decay for 1-D weights (LayerNorm,
    layer scale, q/v biases), biases and the [CLS] token; the [MASK] token and the relative position table
    are decayed."""
    return param.ndim < 2 or name.endswith(".bias") or name == "cls_token"


def train_step(ddp, model, teacher, batch, step, sched, args, device):
    """ddp: the DDP-wrapped (and maybe compiled) model; batch: ((images, masked[, teacher images]), labels,
    skipped) on the host, the masks (and a teacher of another size's view) made by the transform. The
    teacher's pass runs first, without gradient."""
    image, masked, *teacher_view = common.to_device(batch[0], device)
    target = gather_tokens(teacher.targets(teacher_view[0] if teacher_view else image), masked)  # (B, N_m, D_t)
    return ddp(image, masked, target)


def after_step(model, teacher, step, sched, args):
    """Nothing: the teacher is frozen and there is no temperature to clamp."""


# ----------------------------------------------------------------------------------------------------
# <shared> Training: contrastive loss across ranks, optimiser, schedule, one step, the loop
# ----------------------------------------------------------------------------------------------------
# The loop calls the method through these hooks, defined in the method sections above (benchmark.py and
# eval_zeroshot.py use the same ones):
#   RECIPE, DEMO, add_method_args(p)          the paper's defaults, the demo's, the method's flags
#   build_model(cfg, args) -> (model, teacher)  teacher: an EMA copy, a frozen network (`.frozen = True`) or None
#   train_transform(args, cfg)                the loader's (img, rng) -> views transform
#   no_weight_decay(name, param) -> bool      AdamW's groups
#   train_step(ddp, model, teacher, batch, step, sched, args, device) -> (loss, {name: scalar})
#   after_step(model, teacher, step, sched, args)      after each optimiser step (EMA, clamps)
#   export_state_dicts(model_sd, teacher_sd) -> {name: OpenAI-layout state dict}
#   evaluate(model, teacher, args, device) -> {metric: float};  eval_towers(ckpt) -> {name: tower}
Schedule = collections.namedtuple("Schedule", "total warmup steps_per_epoch")  # in optimiser steps


def rank_world():
    """(rank, world size); (0, 1) without a process group, so that the losses also run in a plain program."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the sum over ranks of the gradient w.r.t. its slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every slice
        b = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * b:(dist.get_rank() + 1) * b]


def all_gather_with_grad(x):
    """(B, ...) on each rank -> (world·B, ...) in rank order, with gradient. Each rank scores its own rows
    against all gathered columns (the "local loss"); only when the gather carries gradient do the ranks'
    local losses add up to the loss of one process on the whole batch (open_clip #616, SLIP #31)."""
    return x if rank_world()[1] == 1 else _AllGatherWithGrad.apply(x)


def contrastive_loss(image_emb, text_emb, logit_scale):
    """CLIP's InfoNCE over all ranks. image_emb, text_emb: (B, E) L2-normalised, this rank's pairs;
    logit_scale: the log of the temperature's inverse s. Each rank builds B × (world·B) logits (local
    loss, gather with gradient); labels are rank·B + arange(B). Returns the two directions (L_I, L_T),
    each a mean over this rank's B rows. Computed in fp32, also under autocast."""
    with torch.autocast(image_emb.device.type, enabled=False):
        image_emb, text_emb = image_emb.float(), text_emb.float()
        all_image, all_text = all_gather_with_grad(image_emb), all_gather_with_grad(text_emb)  # (world·B, E)
        s = logit_scale.float().exp()
        labels = rank_world()[0] * image_emb.shape[0] + torch.arange(image_emb.shape[0], device=image_emb.device)
        loss_i = F.cross_entropy(s * image_emb @ all_text.t(), labels)    # image -> text, (B, world·B) logits
        loss_t = F.cross_entropy(s * text_emb @ all_image.t(), labels)    # text -> image
    return loss_i, loss_t


@torch.no_grad()
def ema_update(ema, model, momentum):
    """θ_ema ← m·θ_ema + (1-m)·θ for every parameter, in one multi-tensor kernel (torch._foreach_lerp_, as
    the optimisers' foreach paths use) rather than one per parameter; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - momentum)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def make_optimizer(model, args, device):
    """AdamW; no weight decay where no_weight_decay(name, p) says so. Fused (one multi-tensor kernel for
    the whole update) on CUDA and CPU: on CPU it is 8× faster than the per-parameter loop."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                             fused=device.type in ("cuda", "cpu"))


def lr_at(step, total_steps, warmup_steps, lr, lr_start, lr_end):
    """Per-step schedule: linear warm-up from lr_start to lr, then half-cosine from lr to lr_end."""
    if step < warmup_steps:
        return lr_start + (lr - lr_start) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * min(t, 1.0)))


def train_one_step(ddp, model, teacher, batch, optimizer, scaler, step, sched, args, device):
    """One optimiser step, as the loop and benchmark.py run it: the learning rate of this step, the method's
    forward (train_step) under autocast, the backward pass (scaled for fp16), clipping of the global
    gradient norm when --grad-clip > 0, AdamW, the scaler's update, after_step. ddp: the DDP-wrapped (and
    maybe compiled) model; model: the raw one. Returns {name: device scalar}, the loss first (no host sync)."""
    lr = lr_at(step, sched.total, sched.warmup, args.lr, args.lr_start, args.lr_end)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with common.autocast(device, args.precision):
        loss, metrics = train_step(ddp, model, teacher, batch, step, sched, args, device)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    after_step(model, teacher, step, sched, args)
    return {"loss": loss, **metrics}


def model_config(args):
    size = common.model_size(METHOD, args.model)
    return dict(size, act=args.act, context_length=getattr(args, "context_length", None) or size["context_length"])


def parse_args(argv=None):
    """The shared flags (common.make_parser) and the method's; RECIPE's defaults with --train-data, DEMO's without."""
    p = common.make_parser(__doc__.split("\n")[0], METHOD, DATA_KIND)
    add_method_args(p)
    return common.parse_with_defaults(p, argv, RECIPE, DEMO)


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except common.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        common.close_run()


def train(args):
    rank, world, device = common.setup_distributed(args.device)
    cfg = model_config(args)
    ckpt_path, ckpt = common.open_run(args, METHOD, cfg, world)   # start-up checks; the checkpoint with --resume
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    random.seed(args.seed)
    model, teacher = build_model(cfg, args)
    model, teacher = model.to(device), teacher.to(device) if teacher is not None else None
    for m in model.modules():
        if isinstance(m, Transformer):
            m.grad_checkpointing = args.grad_checkpointing
    data = common.train_loader(args, transform=train_transform(args, cfg), kind=DATA_KIND, rank=rank, world_size=world)
    spe = data.steps_per_epoch
    sched = Schedule(args.steps or args.epochs * spe, int(args.warmup_epochs * spe), spe)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step = common.restore(ckpt, ckpt_path, method=METHOD, model=model, teacher=teacher, optimizer=optimizer,
                          scaler=scaler, rank=rank, world=world, seed=args.seed)   # then per-rank random states
    del ckpt
    if common.is_main():
        common.write_provenance(args.out_dir, args, world, __file__)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(ddp) if args.compile else ddp
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    common.print0(f"{METHOD}: {args.model}, {n_params / 1e6:.1f}M trained parameters, {world} process(es) on "
                  f"{device}, global batch {args.batch_size}, {spe} steps/epoch, {sched.total} steps, lr {args.lr:g} "
                  f"({args.precision}); data: {args.train_data or 'built-in shapes'}; out: {args.out_dir}")
    log = common.MetricLog(args.out_dir, METHOD, world=world, device=device, data=data, total=sched.total,
                           step=step, ckpt_path=ckpt_path, scaler=scaler)
    eval_every = round(args.eval_every * spe) if args.eval_every else 0
    epoch, skip = divmod(step, spe)
    batches = data.batches(epoch, skip)
    model.train()
    while step < sched.total:
        batch = next(batches, None)
        if batch is None:
            epoch += 1
            batches = data.batches(epoch)
            continue
        log.add(train_one_step(fwd, model, teacher, batch, optimizer, scaler, step, sched, args, device), batch[2])
        step += 1
        if step % args.log_every == 0 or step == sched.total:
            log.flush(step, optimizer.param_groups[0]["lr"], model)   # one host sync; stops on a non-finite loss
        if eval_every and step % eval_every == 0 and step < sched.total:
            model.eval()
            log.eval(step, evaluate(model, teacher, args, device))
            model.train()
        if (step % args.save_every == 0 and step < sched.total) or log.stopping:
            common.save_checkpoint(ckpt_path, method=METHOD, cfg=cfg, args=args, step=step, model=model,
                                   teacher=teacher, optimizer=optimizer, scaler=scaler, log=log)
        if log.stopping:
            common.print0(f"SIGTERM: checkpoint saved at step {step} in {ckpt_path}; continue with --resume")
            break
    log.close()
    if log.stopping:
        return
    common.save_checkpoint(ckpt_path, method=METHOD, cfg=cfg, args=args, step=step, model=model, teacher=teacher,
                           optimizer=optimizer, scaler=scaler, log=log)
    exports = export_state_dicts(model.state_dict(), teacher.state_dict() if common.trained(teacher) else None)
    paths = common.write_exports(exports, args.out_dir, cfg, norm=args.norm, method=METHOD)
    model.eval()
    results = evaluate(model, teacher, args, device)
    log.eval(step, results)
    common.print0(common.done_message(step, log.skipped_all, results, ckpt_path, paths, method=METHOD, args=vars(args),
                                      images=step * args.batch_size))


# ----------------------------------------------------------------------------------------------------
# <method> Evaluation and export
# ----------------------------------------------------------------------------------------------------
def export_state_dicts(model_sd, teacher_sd):
    """Nothing in OpenAI layout: the student is a BEiT ViT, not a CLIP (eval_towers reads the checkpoint)."""
    return {}


def eval_towers(ckpt):
    """What eval_zeroshot.py evaluates in a checkpoint of this script: {"student": MaskDistill}, whose
    features(x) -> (B, D) is the mean-pooled final patch tokens."""
    cfg = ckpt["config"]
    model = MaskDistill(**cfg, target_dim=ckpt["model"]["head.weight"].shape[0],
                        layer_scale=layer_scale_init(ckpt["args"].get("layer_scale_init"), cfg["width"]))
    common.load_strict(model, ckpt["model"], f"the student of a {METHOD} checkpoint", f"a {METHOD} student")
    return {"student": model.eval()}


@torch.no_grad()
def evaluate(model, teacher, args, device):
    """k-NN top-1 (cosine, k = 20, T = 0.07) of the student's mean-pooled patch tokens on the held-out set,
    next to the frozen teacher's, with CLIP's image embedding and with its mean-pooled targets N(T(x))."""
    knn_train, test, num_classes = common.knn_datasets(
        image_size=model_config(args)["image_size"], norm=args.norm, train_data=args.train_data,
        imagenet_val=args.imagenet_val, samples=args.knn_samples)
    rank, world = rank_world()
    loaders = [common.eval_loader(ds, 256, rank, world, args.workers) for ds in (knn_train, test)]

    def features(encode):  # train_x, train_y, test_x, test_y
        return [t for loader in loaders for t in common.extract_features(encode, loader, device)]

    results = {"student/knn_top1": common.knn_accuracy(*features(model.features), num_classes)}
    if teacher.knn_results is None:
        train_x, train_y, test_x, test_y = features(teacher.knn_features)
        e = teacher.visual.proj.shape[1]
        teacher.knn_results = {
            "teacher/knn_top1": common.knn_accuracy(train_x[:, :e], train_y, test_x[:, :e], test_y, num_classes),
            "teacher_targets/knn_top1": common.knn_accuracy(train_x[:, e:], train_y, test_x[:, e:], test_y,
                                                            num_classes)}
    return {**results, **teacher.knn_results}


if __name__ == "__main__":
    main()
