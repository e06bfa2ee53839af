"""A-CLIP: Attentive Mask CLIP, and A-CLIP-eff.
Y. Yang, W. Huang, Y. Wei, H. Peng, X. Jiang, H. Jiang, F. Wei, Y. Wang, H. Hu, L. Qiu, Y. Yang. ICCV 2023,
arXiv 2212.08653. Official code: microsoft/A-CLIP (read for the algorithm; its bugs are not reproduced).

Idea. CLIP on masked images: each image gives two online views, and the student encodes only about half of
their patch tokens, so a step costs little more than CLIP's. Which tokens stay is decided by attention, not
at random: an EMA copy of the image encoder looks at a third, unmasked view that encloses both crops; its
[CLS]->patch attention, averaged over all layers and heads, is aligned to each view's crop box, pooled into
2x2-patch blocks, and the most-attended blocks are kept (deterministic top-k; the caption plays no part).
Two self-supervised losses come almost for free: SimCLR between the two masked views, and a BYOL-style loss
from each masked view to the EMA encoder's projection of the full EMA view.

Objective (released code: models.py ACLIP, get_mask, get_att_mask; losses.py ACLIPLoss):
    s_j = 1/(L·H) Σ_l Σ_h softmax(q_cls K^T / √d)^{l,h}_j       score of patch j on the EMA view
    a_k = align(s, box_k, box_ema); keep_k = top-k blocks of avgpool_2x2(a_k),   k = 1, 2
    L_itc,k = ½·[CE(s·I_k T^T) + CE(s·T I_k^T)]                 CLIP InfoNCE of view k, shared scale s
    L_ssl  = ½·[NT-Xent(h_1 -> h_2) + NT-Xent(h_2 -> h_1)]       SimCLR, τ = 0.1, h = image_mlp(cls)
    L_o2e  = 1/(2B) Σ_k Σ_i [2 - 2·cos(pred(proj(cls_k,i)), proj_ema(cls_ema,i))]   BYOL-style, no negatives
    L = 0.5·L_itc,1 + 0.5·L_itc,2 + 1·L_ssl + 2·L_o2e
    θ_ema ← m·θ_ema + (1-m)·θ,  m_t = 1 - (1 - 0.996)·(1 + cos(π t / T)) / 2, at the start of every step

Differs from CLIP in the `# <method>` sections only: `--mask none --views 1 --loss-weights 1 0 0 0
--photo-aug none` is SLIP's plain CLIP; `--mask` and `--views` give the rows of the paper's Table 2a.
A-CLIP-eff (`--eff`; the released code has no such switch, our reading of the paper): the EMA scorer sees
a view of half the image size (112 px for 224), a 7x7 map aligned straight at the block grid. It counts
1.08 × CLIP's FLOPs per image, so the paper's 0.86 × is not expected from it.
Read one step: train_step → Teacher.update → Teacher.score_and_target → attentive_keep → ACLIP.forward.

Project choices where the paper is silent or the released code is wrong:
  - masking is on (the released --mask-ratio defaults to 0, which turns it off); ⌊G·0.5⌋+1 blocks are kept
    (25 of 49 = 100 of 196 patches at 224 px), recomputed every step from the current EMA weights;
  - the EMA box really encloses both online crops, then is enlarged at random (`--no-three-crop-fix`: the
    released geometry); SimCLR pairs view 1 with view 2 (`--simclr-views v1_v1`: the released pairing of
    view 1 with itself, fixed by its PR #4);
  - alignment samples the EMA map bilinearly at the centres of the view's patches (0 outside the EMA box),
    the vectorised form of the released upsample-crop-resize loop; top-k ties go to the lower block index;
  - the EMA covers the image encoder and projection, the text transformer and projection and the BYOL
    projector (its BatchNorm on batch statistics); the EMA text tower shares the online embeddings and
    ln_final; both weight sets are evaluated zero-shot and exported; the patch conv stays frozen at its
    random initialisation (released code); the heads' BatchNorm sees the global batch of both views;
  - the README's recipe (lr 5e-4, wd 0.5, not the argparse 3e-3 / 0.1), bf16 autocast instead of fp16,
    QuickGELU in both towers (the released image tower uses GELU); the contrastive and SimCLR all-gathers
    carry the gradient, so G GPUs compute the loss of one GPU on the whole batch.

Run:
    torchrun aclip.py                                      # built-in demo, CPU, a few minutes
    torchrun --nproc_per_node=8 aclip.py --train-data yfcc15m.csv          # A-CLIP, ViT-B/16
    torchrun --nproc_per_node=8 aclip.py --train-data yfcc15m.csv --eff    # A-CLIP-eff
    torchrun aclip.py --save-masks 100                    # also write masks_<step>.png every 100 steps

Left out: gradient accumulation (it would change the negatives of the contrastive losses), the retrieval
and 26-dataset evaluations, ViT-L's recipe (use --model ViT-L/16), fp16 as the default precision.
"""
import argparse
import collections
import copy
import math
import os
import random
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import common

METHOD = "aclip"
DATA_KIND = "image-text"  # what the training data must provide: image-text pairs, or images alone

# ----------------------------------------------------------------------------------------------------
# <method> Recipe and flags
# ----------------------------------------------------------------------------------------------------
# The paper's recipe: the defaults whenever --train-data is given (ViT-B/16, YFCC-15M, 25 epochs).
RECIPE = dict(model="ViT-B/16", batch_size=4096, epochs=25, lr=5e-4, lr_start=1e-6, lr_end=1e-5,
              warmup_epochs=1.0, act="quickgelu", wd=0.5, beta1=0.9, beta2=0.98, eps=1e-8, grad_clip=0.0,
              norm="imagenet", crop_scale=0.5, eval_every=1.0, workers=8, keep_ratio=0.5, block_size=2,
              ssl_hidden=4096, ssl_dim=256, ema_momentum=0.996, photo_aug="aclip",
              csv_caption_key="title,description")
# The built-in demo: what runs when --train-data is not given (tiny model, shapes rendered on the fly).
DEMO = dict(model="tiny", batch_size=128, epochs=3, lr=1e-3, lr_start=1e-6, lr_end=1e-5, warmup_epochs=0.5,
            wd=0.1, crop_scale=0.9, builtin_samples=16384, eval_every=0.0, workers=1, keep_ratio=0.5,
            block_size=1, ssl_hidden=512, ssl_dim=128, ema_momentum=0.99, photo_aug="none")


def add_method_args(p):
    g = p.add_argument_group("A-CLIP")
    g.add_argument("--keep-ratio", type=common.fraction(lo_open=True),
                   help="fraction of blocks kept (paper recipe 0.5)")
    g.add_argument("--block-size", type=common.at_least(1, eg=2),
                   help="patches per block side for the selection (paper recipe 2)")
    g.add_argument("--loss-weights", type=common.at_least(0, float, 1), nargs=4, default=[0.5, 0.5, 1.0, 2.0],
                   metavar=("ITC1", "ITC2", "SSL", "O2E"), help="weights of L_itc,1, L_itc,2, L_ssl, L_o2e "
                                                                  "(0 for SSL or O2E: that head is not built)")
    g.add_argument("--simclr-tau", type=common.positive(0.1), default=0.1, help="SimCLR temperature")
    g.add_argument("--ssl-hidden", type=common.at_least(1, eg=4096),
                   help="hidden width of the SimCLR and BYOL heads (paper recipe 4096)")
    g.add_argument("--ssl-dim", type=common.at_least(1, eg=256),
                   help="output width of the SimCLR and BYOL heads (paper recipe 256)")
    g.add_argument("--ema-momentum", type=common.fraction(eg=0.996),
                   help="EMA momentum at step 0, cosine to 1 at the last step (paper recipe 0.996)")
    g.add_argument("--photo-aug", choices=["aclip", "none"],
                   help="photometric augmentation of the online views: colour jitter, grayscale, blur, "
                        "solarize (paper recipe 'aclip')")
    g.add_argument("--save-masks", type=common.at_least(0, eg=100), default=0,
                   help="every N steps write masks_<step>.png to --out-dir: views with kept and dropped patches")
    g = p.add_argument_group("A-CLIP ablations (Table 2a/2b rows, A-CLIP-eff, the released code's behaviour)")
    g.add_argument("--mask", default="attentive", choices=["attentive", "random", "none"],
                   help="which tokens the student encodes: the most-attended blocks, random blocks, or all")
    g.add_argument("--views", type=int, default=2, choices=[1, 2], help="masked online views per image")
    g.add_argument("--attentive-keep", default="most", choices=["most", "least"],
                   help="keep the most-attended blocks (A-CLIP) or the least-attended ones (AttMask-style, Table 2b)")
    g.add_argument("--score-layers", default="all", choices=["all", "last"],
                   help="[CLS] attention averaged over all layers (paper) or the last layer only")
    g.add_argument("--eff", action="store_true",
                   help="A-CLIP-eff: the EMA scorer sees a view of half the image size (112 px for 224)")
    g.add_argument("--ema-img-size", type=common.at_least(1, eg=112),
                   help="EMA view size in pixels (default: the model's image size; "
                        "half of it with --eff)")
    g.add_argument("--keep-extra-block", action=argparse.BooleanOptionalAction, default=True,
                   help="keep ⌊G·ratio⌋+1 blocks (25 of 49, as the released code) instead of ⌊G·ratio⌋")
    g.add_argument("--three-crop-fix", action=argparse.BooleanOptionalAction, default=True,
                   help="the EMA box encloses both online crops (off: the released code's geometry)")
    g.add_argument("--simclr-views", default="v1_v2", choices=["v1_v2", "v1_v1"],
                   help="SimCLR pairs view 1 with view 2, or view 1 with itself (the released code's bug)")
    g.add_argument("--freeze-patch-embed", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the patch-embedding conv at its random initialisation (released code)")


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
def cls_attention_score(maps, layers="all"):
    """The EMA encoder's [CLS] -> patch attention. maps: (n, B, 1+N), the [CLS] rows of the last n blocks
    averaged over heads (Transformer(..., cls_attention=n): all blocks, or the last one). Returns (B, N): the
    mean over layers (or the last layer) of the patch columns, not renormalised after the [CLS] column is
    dropped (models.py forward_features)."""
    rows = maps.float().mean(0) if layers == "all" else maps[-1].float()     # (B, 1+N)
    return rows[:, 1:]                                                       # s_j, (B, N)


def align_to_view(score, box_view, box_ema, size):
    """Express an EMA-view map in an online view's coordinates (models.py get_mask). score: (B, gh, gw)
    over the EMA view; box_view, box_ema: (B, 4) crop boxes (left, top, w, h) as fractions of the source
    image; size: the output grid side. Samples the map bilinearly at the centres of a size × size grid over
    the view box; cells outside the EMA box score 0. Returns (B, size, size)."""
    B = score.shape[0]
    centres = (torch.arange(size, device=score.device, dtype=torch.float32) + 0.5) / size   # (size,)
    x = box_view[:, :1] + centres * box_view[:, 2:3]                         # (B, size), source fractions
    y = box_view[:, 1:2] + centres * box_view[:, 3:4]
    u = 2 * (x - box_ema[:, :1]) / box_ema[:, 2:3] - 1                       # (B, size), [-1, 1] on the EMA view
    v = 2 * (y - box_ema[:, 1:2]) / box_ema[:, 3:4] - 1
    grid = torch.stack([u[:, None, :].expand(B, size, size), v[:, :, None].expand(B, size, size)], -1)  # (B, s, s, 2)
    out = F.grid_sample(score[:, None].float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)[:, 0]                           # (B, size, size)
    inside = ((u.abs() <= 1 + 1e-6)[:, None, :] & (v.abs() <= 1 + 1e-6)[:, :, None])
    return out * inside


def n_keep_blocks(num_blocks, keep_ratio, extra=True):
    """⌊G·ratio⌋ (+1 with the extra block), at least 1 and at most G: 25 of 49 at 224 px (get_att_mask)."""
    return max(1, min(num_blocks, int(num_blocks * keep_ratio) + int(extra)))


def select_blocks(block_score, n_keep, most=True):
    """Deterministic top-k: (B, G) block scores -> (B, n_keep) block indices, highest first (lowest first
    with most=False); a stable sort gives ties to the lower index."""
    return block_score.sort(dim=1, descending=most, stable=True).indices[:, :n_keep]


def blocks_to_patches(blocks, grid, block):
    """(B, k) block indices on the (grid/block)² block grid -> (B, k·block²) patch indices on the grid² patch
    grid, in increasing order: each block expands to its block × block patches."""
    gb = grid // block
    d = torch.arange(block, device=blocks.device)
    offsets = (d[:, None] * grid + d[None, :]).flatten()                     # (block²,) within a block
    corner = (blocks // gb) * block * grid + (blocks % gb) * block           # (B, k) top-left patch
    return (corner[..., None] + offsets).flatten(1).sort(dim=1).values       # (B, k·block²)


def attentive_keep(score, ema_grid, boxes, views, grid, block, n_keep, most=True):
    """The kept patches of every online view. score: (B, ema_grid²) EMA attention; boxes: (B, V+1, 4), the EMA
    box last. At the online resolution the map is aligned at the patch grid and 2x2-average-pooled into
    blocks (the released code's bilinear 14->7 resize is exactly that); a coarser EMA map (A-CLIP-eff) is
    aligned straight at the block grid. Returns (V·B, n_keep·block²), view-major."""
    B, gb = score.shape[0], grid // block
    score = score.view(B, ema_grid, ema_grid)                                # (B, ge, ge)
    keeps = []
    for k in range(views):
        if ema_grid >= grid:
            a = align_to_view(score, boxes[:, k], boxes[:, -1], grid)        # a_k, (B, grid, grid)
            a = F.avg_pool2d(a[:, None], block)[:, 0]                        # (B, gb, gb)
        else:
            a = align_to_view(score, boxes[:, k], boxes[:, -1], gb)          # (B, gb, gb)
        keeps.append(blocks_to_patches(select_blocks(a.flatten(1), n_keep, most), grid, block))
    return torch.cat(keeps)                                                  # (V·B, K)


def random_keep(n, grid, block, n_keep, device):
    """`--mask random`: n_keep blocks drawn uniformly per sample, as patch indices (n, n_keep·block²)."""
    blocks = torch.rand(n, (grid // block) ** 2, device=device).argsort(dim=1)[:, :n_keep]
    return blocks_to_patches(blocks, grid, block)


# ----------------------------------------------------------------------------------------------------
# <method> Views
# ----------------------------------------------------------------------------------------------------
def ema_box(rng, crops, width, height, fix=True):
    """The EMA view's box (left, top, w, h) in pixels from the online crops' boxes. fix=True: the union of
    the crops, each edge then moved outward uniformly at random up to the image border, so that it
    encloses every crop. fix=False: the released geometry (datasets.py GetThreeRandomResizedCrop): the
    left edge starts at min(left_1, height_2), and the size is drawn from the old edges after the
    top-left corner moved, so the box can miss parts of the crops."""
    if fix:
        left, top = min(c[0] for c in crops), min(c[1] for c in crops)
        right, bottom = max(c[0] + c[2] for c in crops), max(c[1] + c[3] for c in crops)
        left, top = rng.randint(0, left), rng.randint(0, top)
        right, bottom = rng.randint(right, width), rng.randint(bottom, height)
        return left, top, right - left, bottom - top
    (l1, t1, w1, h1), (l2, t2, w2, h2) = crops[0], crops[-1]
    top, left = min(t1, t2), min(l1, h2)                                      # sic: h2 where l2 was meant
    h, w = max(t1 + h1, t2 + h2) - top, max(l1 + w1, l2 + w2) - left
    top, left = rng.randint(0, top), rng.randint(0, left)
    h = rng.randint(h, height - top) if h < height else h                    # from the old edges
    w = rng.randint(w, width - left) if w < width else w
    return left, top, w, h


class ThreeCrop:
    """The views of one image (datasets.py GetThreeRandomResizedCrop): V online crops (independent
    RandomResizedCrop boxes, bilinear, SLIP's photometric augmentation with blur p 0.1 and solarize p 0.2;
    no flip: it would break the alignment with the EMA map) and, when an EMA pass runs, the EMA view: the
    `ema_box` around the crops, resized to ema_size, normalised only. Returns (online (V, 3, S, S), boxes
    (V+1, 4) as (left, top, w, h) fractions of the image, the EMA box last[, EMA view (3, Se, Se)])."""

    def __init__(self, size, ema_size, scale, mean, std, views=2, photo=True, fix=True):
        self.size, self.ema_size, self.scale, self.mean, self.std = size, ema_size, scale, mean, std
        self.views, self.photo, self.fix = views, photo, fix

    def __call__(self, img, rng):
        W, H = img.size
        crops = [common.crop_box(rng, W, H, self.scale) for _ in range(self.views)]
        online = []
        for left, top, w, h in crops:
            view = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
            view = common.photometric(view, rng, blur=0.1, solarize=0.2) if self.photo else view
            online.append(common.to_normalized_tensor(view, self.mean, self.std))
        box = ema_box(rng, crops, W, H, self.fix) if self.ema_size else (0, 0, W, H)
        boxes = torch.tensor([[l / W, t / H, w / W, h / H] for l, t, w, h in crops + [box]])   # (V+1, 4)
        if not self.ema_size:
            return torch.stack(online), boxes
        left, top, w, h = box
        ema = img.resize((self.ema_size, self.ema_size), Image.BILINEAR, box=(left, top, left + w, top + h))
        return torch.stack(online), boxes, common.to_normalized_tensor(ema, self.mean, self.std)


def train_transform(args, cfg):
    mean, std = common.NORMS[args.norm]
    return ThreeCrop(cfg["image_size"], ema_image_size(cfg, args) if needs_ema(args) else None,
                     (args.crop_scale, 1.0), mean, std, args.views, args.photo_aug == "aclip", args.three_crop_fix)


# ----------------------------------------------------------------------------------------------------
# <method> Losses
# ----------------------------------------------------------------------------------------------------
def simclr_loss(a, b, tau):
    """L_ssl, SimCLR's NT-Xent in SLIP's form (losses.py SIMCLRLoss), over all ranks. a, b: (B, d) this rank's
    two views (not yet normalised). Each anchor a_i has the positive b_i and the negatives b_j and a_j
    (j ≠ i) of the global batch; the same from b's side; the two directions are averaged. Gathered with
    gradient, so the ranks' losses average to the loss of one process on the whole batch."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, all_b = all_gather_with_grad(a), all_gather_with_grad(b)           # (world·B, d)
    labels = rank_world()[0] * a.shape[0] + torch.arange(a.shape[0], device=a.device)
    self_mask = torch.zeros(a.shape[0], all_a.shape[0], device=a.device).scatter_(1, labels[:, None], 1e9)
    logits_ab, logits_aa = a @ all_b.t() / tau, a @ all_a.t() / tau - self_mask   # (B, world·B), no i·i in aa
    logits_ba, logits_bb = b @ all_a.t() / tau, b @ all_b.t() / tau - self_mask
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)    # NT-Xent(a -> b)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)    # NT-Xent(b -> a)
    return (loss_a + loss_b) / 2


def byol_loss(pred, target):
    """L_o2e = mean over rows of 2 - 2·cos(pred, target): (n, d), (n, d) -> scalar in [0, 4]. The target is
    the EMA branch's, computed without gradient."""
    return (2 - 2 * F.cosine_similarity(pred.float(), target.detach().float(), dim=-1)).mean()


# ----------------------------------------------------------------------------------------------------
# <method> Model
# ----------------------------------------------------------------------------------------------------
class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch over all ranks, with their
    gradient (what SyncBatchNorm does; torch's SyncBatchNorm refuses CPU tensors, this one runs on gloo
    too). Two-pass: the mean, then the mean squared deviation, each summed over ranks by a gather with
    gradient of a (1, C) row per rank. Evaluation and a world of one use plain BatchNorm1d."""

    def forward(self, x):
        world = rank_world()[1]
        if not self.training or world == 1:
            return super().forward(x)
        xf = x.float()                                                          # (b, C)
        n = xf.shape[0] * world
        mean = all_gather_with_grad(xf.sum(0, keepdim=True)).sum(0) / n         # (C,)
        var = all_gather_with_grad(((xf - mean) ** 2).sum(0, keepdim=True)).sum(0) / n   # (C,), biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)  # unbiased, as BatchNorm
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def global_batchnorm(module):
    """Every BatchNorm1d inside `module` becomes a GlobalBatchNorm1d with the same parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            global_batchnorm(child)
    return module


def mlp_head(dim, hidden, out, hidden_layers, bias):
    """`hidden_layers` × [Linear + BatchNorm + ReLU], then a Linear to `out` (models.py _build_mlp*)."""
    layers = []
    for i in range(hidden_layers):
        layers += [nn.Linear(dim if i == 0 else hidden, hidden, bias=bias), nn.BatchNorm1d(hidden), nn.ReLU(True)]
    return nn.Sequential(*layers, nn.Linear(hidden, out, bias=bias))


class ACLIP(CLIP):
    """CLIP + SimCLR head `image_mlp` + BYOL projector `im_proj_byol` and predictor `im_pred_byol`. A head
    whose loss weight is 0 is not built. The heads read the image [CLS] after ln_post (width D), not the
    joint embedding. cfg: CLIP's keyword arguments (image_size, patch_size, width, ...)."""

    def __init__(self, *, views=2, loss_weights=(0.5, 0.5, 1.0, 2.0), simclr_tau=0.1, simclr_same_view=False,
                 ssl_hidden=4096, ssl_dim=256, freeze_patch_embed=True, **cfg):
        super().__init__(**cfg)
        width, self.grid = cfg["width"], cfg["image_size"] // cfg["patch_size"]
        self.views, self.simclr_tau, self.simclr_same_view = views, simclr_tau, simclr_same_view
        self.w_itc1, self.w_itc2, self.w_ssl, self.w_o2e = loss_weights
        if self.w_ssl > 0:   # SimCLR: D -> hidden -> hidden -> out, biases, BN in the hidden layers
            self.image_mlp = mlp_head(width, ssl_hidden, ssl_dim, 2, bias=True)
        if self.w_o2e > 0:   # BYOL: projector D -> hidden -> out and predictor out -> hidden -> out, no biases
            self.im_proj_byol = mlp_head(width, ssl_hidden, ssl_dim, 1, bias=False)
            self.im_pred_byol = mlp_head(ssl_dim, ssl_hidden, ssl_dim, 1, bias=False)
        if freeze_patch_embed:
            self.visual.conv1.requires_grad_(False)

    def forward(self, images, text, keep=None, target=None):
        """One training step's losses. images: (V·B, 3, S, S), the V online views, view-major (all of view
        1, then all of view 2); text: (B, L) ids; keep: (V·B, K) kept patch indices, or None for all (eval
        mode always uses all); target: (B, d) EMA projection of the EMA view (for L_o2e). Returns
        (loss, metrics)."""
        if not self.training:
            keep = None
        B = text.shape[0]
        cls = self.visual.ln_post(self.visual(images, keep)[:, 0])            # (V·B, D)
        image_emb = F.normalize(cls @ self.visual.proj, dim=-1)               # (V·B, E)
        text_emb = F.normalize(self.encode_text(text), dim=-1)                # (B, E)
        loss, metrics = 0.0, {}
        for k, weight in enumerate((self.w_itc1, self.w_itc2)[: self.views]):
            loss_i, loss_t = contrastive_loss(image_emb[k * B:(k + 1) * B], text_emb, self.logit_scale)
            loss_itc = (loss_i + loss_t) / 2                                  # L_itc,k: mean of both directions
            loss = loss + weight * loss_itc                                   # L: + 0.5·L_itc,k
            metrics[f"loss_itc{k + 1}"] = loss_itc
        if self.w_ssl > 0:
            h = self.image_mlp(cls)                                           # (2B, d), both views in one BN batch
            loss_ssl = simclr_loss(h[:B], h[:B] if self.simclr_same_view else h[B:], self.simclr_tau)  # L_ssl
            loss = loss + self.w_ssl * loss_ssl                               # L: + 1·L_ssl
            metrics["loss_ssl"] = loss_ssl
        if self.w_o2e > 0:
            pred = self.im_pred_byol(self.im_proj_byol(cls))                  # (V·B, d)
            loss_o2e = byol_loss(pred, target.repeat(self.views, 1))          # L_o2e: row k·B+i -> target i
            loss = loss + self.w_o2e * loss_o2e                               # L: + 2·L_o2e
            metrics["loss_o2e"] = loss_o2e
        return loss, metrics


# ----------------------------------------------------------------------------------------------------
# <method> Teacher / EMA
# ----------------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """The EMA model: copies of the image encoder (with its projection), the text transformer and its
    projection, and the BYOL projector. It scores the tokens and gives the L_o2e target; its text tower is
    used only to evaluate the EMA weights, with the online token and position embeddings and ln_final.
    No gradient; its BatchNorm always uses batch statistics (the released EMA branch runs in train mode)."""

    def __init__(self, model, *, score_layers="all"):
        super().__init__()
        self.visual = copy.deepcopy(model.visual)
        self.transformer = copy.deepcopy(model.transformer)
        self.text_projection = nn.Parameter(model.text_projection.detach().clone())
        self.im_proj_byol = copy.deepcopy(model.im_proj_byol) if hasattr(model, "im_proj_byol") else None
        for m in self.modules():  # batch statistics only: no running statistics to keep or to copy
            if isinstance(m, nn.BatchNorm1d):
                m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
        self.score_layers = score_layers
        self.requires_grad_(False)

    def train(self, mode=True):  # always in train mode: batch statistics in the projector's BatchNorm
        return super().train(True)

    @torch.no_grad()
    def score_and_target(self, image, score=True):
        """image: (B, 3, Se, Se) the unmasked EMA view. Returns (s, z): s (B, N_e) the [CLS] attention
        score (None with score=False); z (B, d) the EMA projector's output (None without a projector)."""
        n = (self.visual.transformer.layers if self.score_layers == "all" else 1) if score else 0
        out = self.visual(image, cls_attention=n)
        tokens, maps = out if score else (out, None)                           # (B, 1+N_e, D), (n, B, 1+N_e)
        s = cls_attention_score(maps, self.score_layers) if score else None
        z = self.im_proj_byol(self.visual.ln_post(tokens[:, 0])) if self.im_proj_byol is not None else None
        return s, z

    @torch.no_grad()
    def update(self, model, momentum):
        """θ_ema ← m·θ_ema + (1-m)·θ for every EMA-covered part (models.py _update_momentum_encoder)."""
        ema_update(self.visual, model.visual, momentum)
        ema_update(self.transformer, model.transformer, momentum)
        self.text_projection.lerp_(model.text_projection.detach(), 1 - momentum)
        if self.im_proj_byol is not None:
            ema_update(self.im_proj_byol, model.im_proj_byol, momentum)

    def encode_image(self, image):
        """(B, 3, H, W) -> (B, E) with the EMA image encoder and projection. Not normalised."""
        return self.visual.ln_post(self.visual(image)[:, 0]) @ self.visual.proj

    def encode_text(self, model, text):
        """(B, L) -> (B, E): the online token and position embeddings and ln_final, the EMA transformer and
        projection. Not normalised."""
        x = model.token_embedding(text) + model.positional_embedding[: text.shape[1]]
        x = model.ln_final(self.transformer(x, causal=True))
        return x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection


def ema_momentum_at(step, total_steps, base):
    """m_t = 1 - (1 - base)·(1 + cos(π t / T)) / 2: base at step 0, 1 at the last step (utils.py cosine_scheduler)."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * min(step / max(1, total_steps), 1.0))) / 2


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
def needs_ema(args):
    """The EMA encoder runs when it scores the tokens or gives the L_o2e target."""
    return args.mask == "attentive" or args.loss_weights[3] > 0


def ema_image_size(cfg, args):
    """Side of the EMA view in pixels: --ema-img-size, or half the image size with --eff (A-CLIP-eff)."""
    return args.ema_img_size or (cfg["image_size"] // 2 if args.eff else cfg["image_size"])


def check_args(cfg, args):
    """Flag combinations that cannot work: a one-line UsageError at start-up."""
    grid, size, patch, w = cfg["image_size"] // cfg["patch_size"], ema_image_size(cfg, args), cfg["patch_size"], \
        args.loss_weights
    for bad, msg in [
            (grid % args.block_size,
             f"--block-size {args.block_size} does not divide the {grid}x{grid} patch grid of {args.model}"),
            (args.views == 1 and (w[1] or w[2]), "--views 1 has no second view for L_itc,2 or L_ssl; set their "
                                                 "weights to 0, e.g. --loss-weights 1 0 0 0"),
            ((args.eff or args.ema_img_size) and not needs_ema(args),
             "--eff / --ema-img-size set the EMA view, but no EMA pass runs (no attentive mask, O2E weight 0)"),
            (args.eff and args.ema_img_size, "--eff and --ema-img-size both set the EMA view size; give one of them"),
            (size < patch or size % patch, f"the EMA view size {size} px is not a positive multiple of the patch "
                                           f"size {patch}")]:
        if bad:
            raise common.UsageError(msg)


def build_model(cfg, args):
    """(ACLIP, its EMA Teacher or None when no EMA pass runs). Under DDP the heads' BatchNorm becomes
    GlobalBatchNorm1d (the released code's SyncBatchNorm, main.py), in the teacher's copy too."""
    check_args(cfg, args)
    model = ACLIP(**cfg, views=args.views, loss_weights=args.loss_weights, simclr_tau=args.simclr_tau,
                  simclr_same_view=args.simclr_views == "v1_v1", ssl_hidden=args.ssl_hidden, ssl_dim=args.ssl_dim,
                  freeze_patch_embed=args.freeze_patch_embed)
    if rank_world()[1] > 1:
        global_batchnorm(model)
    return model, Teacher(model, score_layers=args.score_layers) if needs_ema(args) else None


def no_weight_decay(name, param):
    """As the released code: no decay for parameters with fewer than 2 dimensions (gains, biases, the
    temperature), except the [CLS] embedding, which timm keeps as a 3-D tensor and so is decayed there;
    position and token embeddings are decayed."""
    return param.ndim < 2 and name != "visual.class_embedding"


def train_step(ddp, model, teacher, batch, step, sched, args, device):
    """ddp: the DDP-wrapped (and maybe compiled) model; model: the raw module; batch: ((online, boxes[, ema]),
    texts, skipped) from the loader, on the host. Without gradient: the EMA update, the EMA pass, the token
    selection; then one forward of the student. Returns (loss, metrics). The EMA update runs here, first,
    not in after_step, as in the released code (models.py ACLIP.forward): step t's teacher gets momentum
    m_t and the weights after step t-1, and a checkpoint holds the teacher one update behind."""
    views, text, _ = batch
    online, boxes, text = common.to_device((views[0], views[1], text), device)  # (B, V, 3, S, S), (B, V+1, 4), (B, L)
    B, V = online.shape[:2]
    images = online.transpose(0, 1).flatten(0, 1)                            # (V·B, 3, S, S), view-major
    grid, block = model.grid, args.block_size
    n_keep = n_keep_blocks((grid // block) ** 2, args.keep_ratio, args.keep_extra_block)
    keep = target = ema = None
    metrics = {}
    if teacher is not None:
        momentum = ema_momentum_at(step, sched.total, args.ema_momentum)
        teacher.update(model, momentum)                                      # θ_ema ← m·θ_ema + (1-m)·θ, first
        ema = common.to_device(views[2], device)                             # (B, 3, Se, Se)
        score, target = teacher.score_and_target(ema, score=args.mask == "attentive")
        metrics["ema_momentum"] = torch.full((), momentum, device=device)       # a fill, not a host copy
        if args.mask == "attentive":
            ema_grid = ema.shape[-1] // model.visual.patch_size
            keep = attentive_keep(score, ema_grid, boxes, V, grid, block, n_keep, args.attentive_keep == "most")
    if args.mask == "random":
        keep = random_keep(V * B, grid, block, n_keep, device)
    if args.save_masks and step % args.save_masks == 0 and common.is_main():
        common.save_mask_grid(os.path.join(args.out_dir, f"masks_{step:07d}.png"), images, ema, boxes, keep,
                       model.visual.patch_size, *common.NORMS[args.norm])
    loss, model_metrics = ddp(images, text, keep=keep, target=target)
    return loss, {**model_metrics, **metrics}


def after_step(model, teacher, step, sched, args):
    """After each optimizer step: clamp the temperature's log to [0, ln 100] (the EMA update is in train_step)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


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
    """OpenAI-layout state dicts of the weights to evaluate: 'online', and 'ema' (the EMA image encoder and
    projection, the EMA text transformer and projection, the online token and position embeddings,
    ln_final and logit_scale, as the released main.py validate_zeroshot pairs them)."""
    online = {k: v for k, v in model_sd.items() if k.startswith(common.OPENAI_PREFIXES)}
    out = {"online": online}
    if teacher_sd is not None:
        ema = dict(online)
        ema.update({k: v for k, v in teacher_sd.items() if k.startswith(("visual.", "transformer.", "text_proj"))})
        out["ema"] = ema
    return out


def eval_towers(ckpt):
    """What eval_zeroshot.py evaluates in a checkpoint of this script: {name: CLIP} for the online and
    the EMA weights."""
    towers = {}
    for name, sd in export_state_dicts(ckpt["model"], ckpt["teacher"]).items():
        towers[name] = CLIP(**ckpt["config"])
        common.load_strict(towers[name], sd, f"the {name} weights of a {METHOD} checkpoint", "a CLIP ViT")
    return towers


@torch.no_grad()
def evaluate(model, teacher, args, device):
    """Zero-shot top-1/top-5 of the online and the EMA weights on the held-out set, all tokens; ImageNet with
    the 7 templates SLIP and A-CLIP report with (main.py validate_zeroshot)."""
    towers = {"online": (model.encode_image, model.encode_text)}
    if teacher is not None:
        towers["ema"] = (teacher.encode_image, lambda text: teacher.encode_text(model, text))
    results, encoders = {}, {}
    for name, (encode_image, encode_text) in towers.items():
        classifier, loader = common.zero_shot_setup(
            encode_text, image_size=model.visual.grid * model.visual.patch_size, norm=args.norm,
            imagenet_val=args.imagenet_val, context_length=args.context_length, workers=args.workers, device=device,
            imagenet_templates=common.SIMPLE_IMAGENET_TEMPLATES)
        encoders[name] = (encode_image, classifier)
    for name, (top1, top5) in common.zero_shot_accuracy(encoders, loader, device).items():
        results[f"{name}/top1"], results[f"{name}/top5"] = top1, top5
    return results


if __name__ == "__main__":
    main()
