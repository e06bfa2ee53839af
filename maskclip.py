"""MaskCLIP: Masked Self-Distillation Advances Contrastive Language-Image Pretraining.
X. Dong, J. Bao, Y. Zheng, T. Zhang, D. Chen, H. Yang, M. Zeng, W. Zhang, L. Yuan, D. Chen, F. Wen,
N. Yu. CVPR 2023, arXiv 2208.12262. (Not the training-free dense-label "MaskCLIP" of Zhou et al., ECCV 2022.)
No official code exists (the authors' repository holds only a README), so this file is a reference.

Idea. CLIP learns global image-text alignment. MaskCLIP adds two local objectives: (1) masked
self-distillation: an EMA copy of the image encoder (the "mean teacher") sees the full image, the
student sees it with 75% of its patches masked, and a small decoder predicts the teacher's patch
features as soft codeword distributions from an "online quantizer"; since the teacher is itself trained
by the language loss, its patch targets carry language semantics; (2) BERT-style masked language
modelling on the caption alone, through the text encoder and a small text decoder.

Objective (paper Eq. 8; the two contrastive directions are summed, not averaged):
    L = L_I + L_T + λ·L_Dist + β·L_MLM,   λ = β = 0.05
    L_I = -1/B Σ_i log softmax_j(s · e^I_i · e^T_j)_i        L_T: the same with I and T exchanged
    L_Dist = -1/|M| Σ_{k∈M} h̄(f̄_k)ᵀ log h(f″_k)              f̄: teacher on the full image, f″: decoder output
    h(f) = softmax(cos(f, C) / τ_s), h̄(f) = softmax(cos(f, C̄) / τ_t)    codewords C ∈ R^{K×D}, C̄ = EMA(C)
    L_MLM = -1/|M_T| Σ_{k∈M_T} log p(t_k | masked caption)
    θ̄ ← α·θ̄ + (1-α)·θ  for the image encoder and the quantizer

Differs from the CLIP baseline in the `# <method>` sections only. `--dist-weight 0 --mlm-weight 0` turns
this file into the plain CLIP baseline that the other methods and benchmark.py compare against.
Read one step: train_step → random_masking → Teacher.targets → MaskCLIP.forward → predict_masked → losses.

Project choices where the paper is silent:
  - the student encodes the visible tokens only (MAE-style); `--masked-encoding mask-token` is BEiT-style;
  - decoder: Linear(width→768) + 1 block of width 768, 12 heads, a learned mask token, fixed 2-D sin-cos
    position embedding, [CLS] included; its output goes through LayerNorm (and a Linear back to the
    encoder width if the widths differ) before the quantizer;
  - quantizer: cosine logits against K = 8192 learned codewords, τ_s = 0.1, τ_t = 0.04, no centring;
  - EMA teacher: constant α = 0.999; it covers the image encoder and the quantizer; the teacher sees the
    same augmented view as the student; evaluation of the EMA weights pairs the EMA image encoder with
    the online projection and text tower;
  - MLM: 20% of the word tokens of each caption (at least one; never SOT, EOT or padding) are replaced by
    a learned [MASK] embedding (equivalent to a new id 49408); the text encoder keeps its causal mask;
    the 4-block text decoder is bidirectional and its vocabulary head is untied;
  - the recipe is SLIP's CLIP ViT-B/16 recipe (lr 5e-4, wd 0.5, betas (0.9, 0.98), 1 warm-up epoch,
    RandomResizedCrop scale (0.5, 1), bilinear, ImageNet normalisation, SLIP's weight-decay groups), bf16
    autocast instead of fp16; both towers take OpenAI's init stds (SLIP's initialize_parameters sets only
    the text tower's; its timm image tower keeps timm's init);
  - YFCC-15M captions: title or description, drawn per sample (SLIP's loader);
  - the contrastive all-gather carries the gradient (SLIP's does not), so G GPUs give the gradients of
    one GPU on the whole batch.

Run:
    torchrun maskclip.py                                   # built-in demo, CPU, a few minutes
    torchrun --nproc_per_node=8 maskclip.py --train-data 'cc3m/{00000..00331}.tar' --train-num-samples 2800000
    torchrun --nproc_per_node=8 maskclip.py --train-data yfcc15m.csv --dist-weight 0 --mlm-weight 0   # CLIP

Left out: gradient accumulation (it would change the negatives of the contrastive loss), the downstream
fine-tuning, detection and segmentation recipes, and the 80/10/10 default (it is a flag).
"""
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

METHOD = "maskclip"
DATA_KIND = "image-text"  # what the training data must provide: image-text pairs, or images alone

# ----------------------------------------------------------------------------------------------------
# <method> Recipe and flags
# ----------------------------------------------------------------------------------------------------
# The paper's recipe: the defaults whenever --train-data is given (ViT-B/16, YFCC-15M, 25 epochs).
RECIPE = dict(model="ViT-B/16", batch_size=4096, epochs=25, lr=5e-4, lr_start=1e-6, lr_end=1e-5,
              warmup_epochs=1.0, act="quickgelu", wd=0.5, beta1=0.9, beta2=0.98, eps=1e-8, grad_clip=0.0,
              norm="imagenet", crop_scale=0.5, eval_every=1.0, workers=8, quant_k=8192, dec_width=768,
              dec_heads=12, text_dec_depth=4, ema_momentum=0.999,
              csv_caption_key="title,description")
# The built-in demo: what runs when --train-data is not given (tiny model, shapes rendered on the fly).
DEMO = dict(model="tiny", batch_size=128, epochs=3, lr=1e-3, lr_start=1e-6, lr_end=1e-5, warmup_epochs=0.5,
            wd=0.1, crop_scale=0.9, builtin_samples=13824, eval_every=0.0, workers=1, quant_k=32, dec_width=128,
            dec_heads=2, text_dec_depth=1, ema_momentum=0.99)


def add_method_args(p):
    g = p.add_argument_group("MaskCLIP")
    g.add_argument("--dist-weight", type=common.at_least(0, float, 0.05), default=0.05,
                   help="λ, weight of L_Dist (paper 0.05; 0 = off)")
    g.add_argument("--mlm-weight", type=common.at_least(0, float, 0.05), default=0.05,
                   help="β, weight of L_MLM (paper 0.05; 0 = off)")
    g.add_argument("--mask-ratio", type=common.fraction(hi_open=True, eg=0.75), default=0.75,
                   help="fraction of patches masked for the student")
    g.add_argument("--dec-depth", type=common.at_least(1), default=1, help="image decoder blocks")
    g.add_argument("--dec-width", type=common.at_least(4, eg=768), help="image decoder width (paper recipe 768)")
    g.add_argument("--dec-heads", type=common.at_least(1, eg=12), help="image decoder heads (paper recipe 12)")
    g.add_argument("--quant-k", type=common.at_least(2, eg=8192),
                   help="number of codewords K of the online quantizer (paper recipe 8192)")
    g.add_argument("--tau-s", type=common.positive(0.1), default=0.1, help="student softmax temperature")
    g.add_argument("--tau-t", type=common.positive(0.04), default=0.04, help="teacher softmax temperature")
    g.add_argument("--ema-momentum", type=common.fraction(eg=0.999),
                   help="constant EMA momentum α of the teacher (paper recipe 0.999)")
    g.add_argument("--mlm-ratio", type=common.fraction(lo_open=True, eg=0.2), default=0.2,
                   help="fraction of caption word tokens masked")
    g.add_argument("--text-dec-depth", type=common.at_least(0, eg=4),
                   help="MLM text decoder blocks (paper recipe 4; 0 = predict from the text encoder's output)")
    g = p.add_argument_group("MaskCLIP ablations (alternative designs the paper leaves open)")
    g.add_argument("--masked-encoding", default="visible", choices=["visible", "mask-token"],
                   help="visible: the student encodes the visible patches only (MAE); mask-token: all patches, "
                        "masked ones replaced by a learned token (BEiT)")
    g.add_argument("--quant-center", action="store_true",
                   help="iBOT-style teacher centring: c ← 0.9·c + 0.1·mean(teacher logits), subtracted before softmax")
    g.add_argument("--quant-mlp", action="store_true",
                   help="iBOT's 3-layer MLP (hidden 2048, bottleneck 256) before the codewords")
    g.add_argument("--mlm-80-10-10", action="store_true",
                   help="BERT's rule: 80%% [MASK], 10%% random token, 10%% unchanged (default: all [MASK])")
    g.add_argument("--mlm-bidir-encoder", action="store_true",
                   help="run the text encoder without its causal mask in the MLM pass")
    g.add_argument("--tie-vocab", action="store_true", help="tie the MLM vocabulary head to the token embedding")


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
def masked_indices(keep, num_patches):
    """(B, K) visible indices -> (B, N - K) masked indices, in increasing order."""
    B = keep.shape[0]
    visible = torch.zeros(B, num_patches, dtype=torch.bool, device=keep.device).scatter(1, keep, True)
    order = visible.to(torch.int8).argsort(dim=1, stable=True)              # masked (False) positions first
    return order[:, : num_patches - keep.shape[1]]


def random_masking(batch, num_patches, mask_ratio, device):
    """MAE's random masking, independently per sample. Returns (keep, masked): keep (B, K) the visible
    patches, K = int(N·(1 - mask_ratio)), in random order; masked (B, N - K) the others, in increasing order."""
    noise = torch.rand(batch, num_patches, device=device)
    keep = noise.argsort(dim=1)[:, : int(num_patches * (1 - mask_ratio))]
    return keep, masked_indices(keep, num_patches)


def mlm_masking(text, ratio, rule_80_10_10=False):
    """BERT-style masking of the word tokens of the captions (never padding, SOT or EOT), run on the
    host before the batch moves to the device, so that the number of masked tokens T is known without a
    device sync. text: (B, L) ids. A caption with w word tokens gets max(1, round(ratio·w)) of them
    masked. Returns (mlm_input, positions, targets): mlm_input is text with -1 where the [MASK] embedding
    goes; positions: (T,) flat indices into B·L of the masked tokens; targets: (T,) their original ids."""
    B, L = text.shape
    words = (text != 0) & (text != common.SOT_ID) & (text != common.EOT_ID)             # (B, L)
    noise = torch.rand(B, L).masked_fill(~words, 2.0)                                   # words sort first
    rank = noise.argsort(dim=1).argsort(dim=1)                                          # (B, L) rank of each token
    n_masked = (words.sum(1) * ratio).round().clamp(min=1).minimum(words.sum(1))        # (B,)
    masked = rank < n_masked[:, None]                                                   # (B, L)
    positions = masked.flatten().nonzero()[:, 0]                                        # (T,)
    targets = text.flatten()[positions]
    replace = torch.full_like(targets, -1)                                              # -1 = [MASK]
    if rule_80_10_10:
        r = torch.rand(targets.shape)
        random_ids = torch.randint(1, common.SOT_ID, targets.shape)
        replace = torch.where(r < 0.8, replace, torch.where(r < 0.9, random_ids, targets))
    mlm_input = text.flatten().index_put((positions,), replace).view(B, L)
    return mlm_input, positions, targets


# ----------------------------------------------------------------------------------------------------
# <method> Losses
# ----------------------------------------------------------------------------------------------------
def distillation_loss(student_logits, teacher_probs, tau_s):
    """L_Dist = -1/|M| Σ_{k∈M} h̄(f̄_k)ᵀ log h(f″_k) (Eq. 8): cross-entropy between the teacher's soft
    codewords and the student's, averaged over the masked patches only. student_logits: (B, N_m, K) cosine
    logits; teacher_probs: (B, N_m, K), rows summing to 1."""
    log_p = F.log_softmax(student_logits.float() / tau_s, dim=-1)
    return -(teacher_probs * log_p).sum(-1).mean()


def mlm_loss(logits, targets):
    """L_MLM (Eq. 8): cross-entropy of the vocabulary logits (T, V) against the original ids (T,) of the
    masked tokens, averaged over the masked tokens of the global batch. The count is summed over ranks, and
    the local sum scaled by the world size, so that the ranks' losses, averaged as DDP averages gradients,
    equal the loss of one process on the whole batch."""
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = torch.full((), float(targets.numel()), device=logits.device)  # a fill: no host-to-device copy, no sync
    world = rank_world()[1]
    if world > 1:
        dist.all_reduce(count)
    return total * world / count.clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# <method> Model
# ----------------------------------------------------------------------------------------------------
class Quantizer(nn.Module):
    """The online quantizer h: cosine similarity of each feature with K learned codewords, cos(f, C),
    optionally after iBOT's 3-layer MLP. The softmax with its temperature is taken by the loss."""

    def __init__(self, dim, k, mlp=False):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(),
                                 nn.Linear(2048, 256)) if mlp else None
        self.codewords = nn.Parameter(torch.randn(k, 256 if mlp else dim) * 0.02)

    def forward(self, x):
        """(..., D) -> (..., K) cosine logits."""
        if self.mlp is not None:
            x = self.mlp(x)
        return F.normalize(x, dim=-1) @ F.normalize(self.codewords, dim=-1).t()


class MaskCLIP(CLIP):
    """CLIP + image decoder and quantizer (L_Dist) + [MASK] embedding, text decoder and vocabulary head
    (L_MLM). A branch whose weight is 0 is not built, so `dist_weight=0, mlm_weight=0` is exactly CLIP.
    cfg: CLIP's keyword arguments (image_size, patch_size, width, ...)."""

    def __init__(self, *, dist_weight=0.05, mlm_weight=0.05, tau_s=0.1, masked_encoding="visible", dec_width=768,
                 dec_depth=1, dec_heads=12, quant_k=8192, quant_mlp=False, text_dec_depth=4, mlm_bidir_encoder=False,
                 tie_vocab=False, **cfg):
        super().__init__(**cfg)
        width, self.grid = cfg["width"], cfg["image_size"] // cfg["patch_size"]
        self.dist_weight, self.mlm_weight, self.tau_s, self.masked_encoding = dist_weight, mlm_weight, tau_s, \
            masked_encoding
        if dist_weight > 0:
            if masked_encoding == "mask-token":  # BEiT-style: the encoder sees every position
                self.encoder_mask_token = nn.Parameter(torch.zeros(width))
                nn.init.normal_(self.encoder_mask_token, std=0.02)
            else:  # MAE-style: the decoder fills the masked positions (only then is a decoder mask token used)
                self.mask_token = nn.Parameter(torch.zeros(dec_width))
                nn.init.normal_(self.mask_token, std=0.02)
            self.decoder_embed = nn.Linear(width, dec_width)
            self.register_buffer("decoder_pos", common.sincos_2d(self.grid, dec_width), persistent=False)
            self.decoder = Transformer(dec_width, dec_depth, dec_heads, cfg["act"])
            init_transformer(self.decoder)
            self.decoder_norm = nn.LayerNorm(dec_width)
            self.decoder_pred = nn.Linear(dec_width, width) if dec_width != width else nn.Identity()
            self.quantizer = Quantizer(width, quant_k, quant_mlp)
        if mlm_weight > 0:
            text_width = cfg["text_width"]
            self.mlm_mask_embedding = nn.Parameter(torch.randn(text_width) * 0.02)  # the [MASK] token, id 49408
            self.mlm_bidir_encoder = mlm_bidir_encoder
            self.text_decoder = Transformer(text_width, text_dec_depth, cfg["text_heads"], cfg["act"])
            init_transformer(self.text_decoder)
            self.text_decoder_norm = nn.LayerNorm(text_width)
            self.vocab_head = None if tie_vocab else nn.Linear(text_width, common.VOCAB_SIZE)
            self.vocab_bias = nn.Parameter(torch.zeros(common.VOCAB_SIZE)) if tie_vocab else None

    def forward(self, image, text, keep=None, masked=None, teacher_probs=None, mlm_input=None, mlm_positions=None,
                mlm_targets=None):
        """One training step's losses. image: (B, 3, H, W); text: (B, L) ids; keep / masked: (B, K) / (B, N_m)
        visible and masked patches; teacher_probs: (B, N_m, K) teacher soft codewords at the masked patches;
        mlm_input: (B, L) ids with -1 at [MASK]; mlm_positions / mlm_targets: (T,) flat positions and ids of
        the masked tokens. Returns (loss, metrics)."""
        # (a) contrastive loss on the full image and the full caption
        image_emb = F.normalize(self.encode_image(image), dim=-1)
        text_emb = F.normalize(self.encode_text(text), dim=-1)
        loss_i, loss_t = contrastive_loss(image_emb, text_emb, self.logit_scale)
        loss = loss_i + loss_t                                            # Eq. 8: L_I + L_T, summed
        metrics = {"loss_i2t": loss_i, "loss_t2i": loss_t}
        if self.dist_weight > 0:
            loss_dist = distillation_loss(self.predict_masked(image, keep, masked), teacher_probs, self.tau_s)
            loss = loss + self.dist_weight * loss_dist                    # Eq. 8: + λ·L_Dist
            metrics["loss_dist"] = loss_dist
        if self.mlm_weight > 0:
            loss_mlm = mlm_loss(self.mlm_logits(mlm_input, mlm_positions), mlm_targets)
            loss = loss + self.mlm_weight * loss_mlm                      # Eq. 8: + β·L_MLM
            metrics["loss_mlm"] = loss_mlm
        return loss, metrics

    def predict_masked(self, image, keep, masked):
        """Student + decoder + quantizer h at the masked patches: (B, N_m, K) cosine logits."""
        B, K = keep.shape
        N = self.grid ** 2
        if self.masked_encoding == "visible":
            tokens = self.visual.ln_post(self.visual(image, keep))          # (B, 1+K, D)
            x = self.decoder_embed(tokens)                                  # (B, 1+K, Dd)
            Dd = x.shape[-1]
            full = self.mask_token.to(x.dtype).expand(B, N, Dd)
            full = full.scatter(1, keep[..., None].expand(-1, -1, Dd), x[:, 1:])  # visible tokens back in place
            x = torch.cat([x[:, :1], full], dim=1)                          # (B, 1+N, Dd)
        else:
            x = self.decoder_embed(self.visual.ln_post(self.encode_with_mask_tokens(image, keep)))  # (B, 1+N, Dd)
        x = self.decoder(x + self.decoder_pos.to(x.dtype))                  # (B, 1+N, Dd)
        x = self.decoder_pred(self.decoder_norm(x[:, 1:]))                  # (B, N, D)
        x = x.gather(1, masked[..., None].expand(-1, -1, x.shape[-1]))      # (B, N_m, D)
        return self.quantizer(x)                                            # (B, N_m, K)

    def encode_with_mask_tokens(self, image, keep):
        """BEiT-style student: every patch enters the encoder, masked ones as a learned token. (B, 1+N, D)."""
        v = self.visual
        x = v.conv1(image).flatten(2).transpose(1, 2)                       # (B, N, D)
        B, N, D = x.shape
        visible = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter(1, keep, True)
        x = torch.where(visible[..., None], x, self.encoder_mask_token.to(x.dtype))
        x = x + v.positional_embedding[1:].to(x.dtype)
        cls = (v.class_embedding + v.positional_embedding[0]).to(x.dtype).expand(B, 1, D)
        return v.transformer(v.ln_pre(torch.cat([cls, x], dim=1)))

    def mlm_logits(self, mlm_input, positions):
        """Masked caption -> text encoder -> text decoder -> vocabulary logits at the masked tokens: (T, V)."""
        is_mask = mlm_input < 0
        x = self.token_embedding(mlm_input.clamp(min=0))                    # (B, L, W)
        x = torch.where(is_mask[..., None], self.mlm_mask_embedding.to(x.dtype), x)
        x = x + self.positional_embedding[: x.shape[1]]
        x = self.ln_final(self.transformer(x, causal=not self.mlm_bidir_encoder))
        x = self.text_decoder_norm(self.text_decoder(x))                    # bidirectional, (B, L, W)
        x = x.flatten(0, 1)[positions]                                      # (T, W)
        if self.vocab_head is not None:
            return self.vocab_head(x)                                       # (T, V)
        return F.linear(x, self.token_embedding.weight, self.vocab_bias)


# ----------------------------------------------------------------------------------------------------
# <method> Teacher / EMA
# ----------------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """The mean teacher: EMA copies of the image encoder Ē_I and the quantizer h̄, and the optional
    iBOT centre. It starts as an exact copy, gets no gradient and stays in eval mode."""

    def __init__(self, model, *, tau_t=0.04, center=False):
        super().__init__()
        self.visual = copy.deepcopy(model.visual)
        self.quantizer = copy.deepcopy(model.quantizer)
        self.visual.transformer.grad_checkpointing = False
        self.tau_t, self.center_on = tau_t, center
        self.register_buffer("center", torch.zeros(model.quantizer.codewords.shape[0]))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # always in eval mode
        return super().train(False)

    @torch.no_grad()
    def targets(self, image, masked):
        """Soft codewords h̄(f̄) of the full image at the masked patches (B, N_m): (B, N_m, K)."""
        f = self.visual.ln_post(self.visual(image))[:, 1:]                 # (B, N, D), full image
        logits = self.quantizer(f).float()                                  # (B, N, K)
        if self.center_on:
            probs = F.softmax((logits - self.center) / self.tau_t, dim=-1)
            batch_mean = logits.mean(dim=(0, 1))
            world = rank_world()[1]
            if world > 1:
                dist.all_reduce(batch_mean)
            self.center.mul_(0.9).add_(0.1 * batch_mean / world)
        else:
            probs = F.softmax(logits / self.tau_t, dim=-1)
        return probs.gather(1, masked[..., None].expand(-1, -1, probs.shape[-1]))  # (B, N_m, K)

    @torch.no_grad()
    def update(self, model, momentum):
        """θ̄ ← α·θ̄ + (1-α)·θ for the image encoder and the quantizer."""
        ema_update(self.visual, model.visual, momentum)
        ema_update(self.quantizer, model.quantizer, momentum)


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
def build_model(cfg, args):
    """(MaskCLIP, its EMA teacher or None when L_Dist is off)."""
    n, w = (cfg["image_size"] // cfg["patch_size"]) ** 2, args.dec_width
    for bad, msg in [(args.dist_weight > 0 and int(n * (1 - args.mask_ratio)) < 1,
                      f"--mask-ratio {args.mask_ratio} leaves none of the {n} patches visible; e.g. 0.75"),
                     (args.dist_weight > 0 and (w % 4 or w % args.dec_heads),
                      f"--dec-width {w} must be a multiple of 4 and of --dec-heads {args.dec_heads}; e.g. 768 and 12")]:
        if bad:
            raise common.UsageError(msg)
    model = MaskCLIP(**cfg, dist_weight=args.dist_weight, mlm_weight=args.mlm_weight, tau_s=args.tau_s,
                     masked_encoding=args.masked_encoding, dec_width=args.dec_width, dec_depth=args.dec_depth,
                     dec_heads=args.dec_heads, quant_k=args.quant_k, quant_mlp=args.quant_mlp,
                     text_dec_depth=args.text_dec_depth, mlm_bidir_encoder=args.mlm_bidir_encoder,
                     tie_vocab=args.tie_vocab)
    teacher = Teacher(model, tau_t=args.tau_t, center=args.quant_center) if args.dist_weight > 0 else None
    return model, teacher


def train_transform(args, cfg):
    mean, std = common.NORMS[args.norm]
    return common.TrainCrop(cfg["image_size"], (args.crop_scale, 1.0), mean, std, resample=Image.BILINEAR)  # SLIP


def no_weight_decay(name, param):
    """SLIP's rule (main.py): no decay for gains, biases and the temperature (ndim < 2, or 'bias', 'ln' or
    'bn' in the name), except the [CLS] embedding, which timm keeps 3-D and so decays; the token and
    position embeddings are decayed."""
    return (param.ndim < 2 and name != "visual.class_embedding") or any(k in name for k in ("bias", "ln", "bn"))


def train_step(ddp, model, teacher, batch, step, sched, args, device):
    """ddp: the DDP-wrapped (and maybe compiled) model; model: the raw module; batch: (images, texts,
    skipped) as the loader gave it, on the host. Returns (loss, metrics)."""
    image, text, _ = batch
    inputs = {}
    if args.mlm_weight > 0:  # on the host: the number of masked tokens is then known without a sync
        mlm_input, positions, targets = common.to_device(mlm_masking(text, args.mlm_ratio, args.mlm_80_10_10), device)
        inputs.update(mlm_input=mlm_input, mlm_positions=positions, mlm_targets=targets)
    image, text = common.to_device((image, text), device)
    if args.dist_weight > 0:
        keep, masked = random_masking(image.shape[0], model.grid ** 2, args.mask_ratio, device)
        inputs.update(keep=keep, masked=masked, teacher_probs=teacher.targets(image, masked))
    return ddp(image, text, **inputs)


def after_step(model, teacher, step, sched, args):
    """After each optimizer step: clamp the temperature at 100 and update the EMA teacher (constant α)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))  # ln(100): CLIP clamps the temperature's inverse at 100
    if teacher is not None:
        teacher.update(model, args.ema_momentum)


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
    """OpenAI-layout state dicts of the weights to evaluate: 'online', and 'ema' (the EMA image encoder
    with the online projection and text tower)."""
    online = {k: v for k, v in model_sd.items() if k.startswith(common.OPENAI_PREFIXES)}
    out = {"online": online}
    if teacher_sd is not None:
        ema = dict(online)
        ema.update({"visual." + k[len("visual."):]: v for k, v in teacher_sd.items() if k.startswith("visual.")})
        ema["visual.proj"] = online["visual.proj"]
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
    """Zero-shot top-1/top-5 of the online and the EMA weights on the held-out set."""
    towers = {"online": model.visual}
    if teacher is not None:
        towers["ema"] = teacher.visual
    results = {}
    classifier, loader = common.zero_shot_setup(
        model.encode_text, image_size=model.visual.grid * model.visual.patch_size, norm=args.norm,
        imagenet_val=args.imagenet_val, context_length=args.context_length, workers=args.workers, device=device)
    encoders = {name: (lambda x, v=visual: v.ln_post(v(x)[:, 0]) @ model.visual.proj, classifier)
                for name, visual in towers.items()}
    for name, (top1, top5) in common.zero_shot_accuracy(encoders, loader, device).items():
        results[f"{name}/top1"], results[f"{name}/top5"] = top1, top5
    return results


if __name__ == "__main__":
    main()
