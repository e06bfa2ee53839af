"""MILAN: Masked Image Pretraining on Language Assisted Representation.
Z. Hou, F. Sun, Y.-K. Chen, Y. Xie, S.-Y. Kung. arXiv 2208.06049 (2022); ICASSP 2025.
Official code: github.com/zejiangh/MILAN, an MAE fork (models_milan.py, engine_pretrain.py, PRETRAIN.sh).

Idea. MAE, with a frozen CLIP image tower in three roles: (1) target: the student regresses CLIP's
per-token outputs (all 1+N tokens after ln_post and the projection into the joint space) instead of
pixels; (2) semantic-aware masking: CLIP's last-block [CLS]->patch attention, averaged over heads,
weights the patches, which are drawn without replacement; the first K drawn are visible, so salient
patches are kept more often; (3) prompting decoder: the encoder's CLS and visible tokens are fixed
prompts that no decoder block updates; only the mask tokens are queries.

Equations (the paper's method, labelled by this file; N patches, K = int(N·(1 - r)) visible, M = N - K masked):
  (T) T = ln_post(CLIP(x)) @ proj                  (B, 1+N, C_t) targets: every output token of the teacher
  (W) w = A_last[:, 0, 1:]                         (B, N) last block's [CLS] attention to each patch, head mean
  (S) P(next = i) = w_i / Σ_{j not yet drawn} w_j  all N patches drawn in turn; the first K drawn are visible
  (P) P = decoder_embed(Enc([cls; x_keep])) + pos  (B, 1+K, Dd) prompts, never updated by the decoder
  (D) z ← z + Attn(q = LN1(z), kv = [P; LN1(z)]);  z ← z + MLP(LN2(z))     mask tokens z only, every block
  (Y) pred = decoder_pred(decoder_norm([P; z]))    (B, 1+N, C_t) in the original token order
  (L) L = mean_{b, t ∈ 0..N} (2 − 2·cos(pred_bt, T_bt))   all tokens (official code); --loss-on masked

Differs from CLIP: nothing is contrastive and no text is read; CLIP is a frozen teacher, loaded with
--teacher from any CLIP file (our exports of maskclip.py/aclip.py/silc.py, OpenAI TorchScript, OpenAI/
open_clip state dicts). The student is an MAE ViT: fixed 2-D sin-cos positions, no ln_pre, a final
LayerNorm (eps 1e-6), GELU, Xavier init; it encodes the visible patches only.
Read one step: train_step → CLIPTeacher.forward → semantic_masking → MILAN.forward → decode → milan_loss.

Project choices (the paper is silent, or the official code is not followed):
  - the teacher reads the student's crop re-normalised with --teacher-norm (ImageNet, as the official
    code does, whatever the teacher was trained with); its patch grid must equal the student's;
  - sampling without replacement is Gumbel-top-k (the distribution of the official
    torch.multinomial(w, N, replacement=False), without its host sync); w gets + 1e-12; the data transform
    draws each sample's Gumbel keys (common.py's randomness contract), so masks do not depend on the ranks;
  - the cosine uses F.normalize(eps=1e-6); the evaluation is k-NN top-1 (cosine, k = 20, T = 0.07) of the
    encoder's [CLS] after the final norm, and of the teacher's [CLS] embedding for comparison;
  - --target pixels (the MAE ablation) regresses per-patch normalised pixels (MAE's norm_pix_loss);
  - cls_token and mask_token are weight-decayed as in the official code (only 1-D tensors are exempt);
  - bf16 autocast on CUDA instead of fp16 + GradScaler (--precision fp16 restores the latter);
  - unlike the official code, the teacher is per-token (not the 1000-way head of its build_clip_model) and
    not DDP-wrapped, the MAE-decoder ablation predicts C_t and honours --mask, and no dead options remain.

Run:
    torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip        # a demo CLIP teacher
    torchrun milan.py --teacher runs/clip/export_online.pt                          # built-in demo, CPU
    torchrun --nproc_per_node=8 milan.py --train-data imagenet/train --imagenet-val imagenet/val \
        --teacher ViT-B-16.pt                  # OpenAI's CLIP ViT-B/16, the official teacher; global batch 4096
    ablations: --mask random, --decoder mae, --target pixels (all three: plain MAE, no teacher)

Left out: the fine-tuning, linear-probe, detection and segmentation recipes, gradient accumulation
(the official 4096 batch is 256 × 8 GPUs × 2 accumulation steps; here --batch-size is the global batch
of one step), and the SLIP/DINO teachers of the official repository.
"""
import collections
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

METHOD = "milan"
DATA_KIND = "image"  # what the training data must provide: image-text pairs, or images alone

# ----------------------------------------------------------------------------------------------------
# <method> Recipe and flags
# ----------------------------------------------------------------------------------------------------
# The official recipe (PRETRAIN.sh): the defaults whenever --train-data is given (ViT-B/16, ImageNet-1k).
# lr = blr · batch / 256 unless --lr is given (main_pretrain.py); RECIPE's and DEMO's lr (what --help shows) are
# what their blr gives at their batch: 2.4e-3 = 1.5e-4 · 4096 / 256. 40 warm-up epochs from 0, cosine to 0, no clip.
RECIPE = dict(model="ViT-B/16", batch_size=4096, epochs=400, blr=1.5e-4, lr=2.4e-3, lr_start=0.0, lr_end=0.0,
              warmup_epochs=40.0, act="gelu", wd=0.05, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=0.0,
              norm="imagenet", crop_scale=0.2, eval_every=0.0, workers=10, dec_width=512, dec_depth=8,
              dec_heads=16, knn_samples=100_000)
# The built-in demo: tiny student (32 px, 4×4 patches) on the shapes, behind the demo CLIP teacher.
DEMO = dict(model="tiny", batch_size=128, epochs=3, blr=3e-3, lr=1.5e-3, warmup_epochs=0.25, lr_end=1e-5,
            crop_scale=0.5, builtin_samples=16384, workers=1, dec_width=128, dec_depth=2, dec_heads=4,
            knn_samples=4096)

TEACHER_HOWTO = ("to get a teacher, run `torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip` "
                 "first (the quickest CLIP-family demo run, about 2 minutes) and pass "
                 "--teacher runs/clip/export_online.pt")


def add_method_args(p):
    g = p.add_argument_group("MILAN")
    g.add_argument("--teacher", help="frozen CLIP teacher (required unless --target pixels --mask random): an export "
                                     "or checkpoint of maskclip.py/aclip.py/silc.py, an OpenAI CLIP TorchScript "
                                     "archive or an OpenAI/open_clip ViT state dict (paper: OpenAI CLIP ViT-B/16); "
                                     "its patch grid must equal the student's")
    g.add_argument("--teacher-act", choices=["quickgelu", "gelu"],
                   help="the teacher's MLP activation (default: what its file records, else quickgelu as in "
                        "OpenAI's weights; LAION open_clip weights need gelu)")
    g.add_argument("--teacher-norm", default="imagenet", choices=["file", *common.NORMS],
                   help="the teacher's pixel normalisation, converted from --norm on the device (official code: "
                        "imagenet, whatever the teacher was trained with; 'file': the one its file records, else "
                        "CLIP's)")
    g.add_argument("--blr", type=common.positive(1.5e-4),
                   help="base learning rate: unless --lr is given, lr = blr · --batch-size / 256 "
                        "(main_pretrain.py), so --lr's default holds at the default --batch-size")
    g.add_argument("--mask-ratio", type=common.fraction(lo_open=True, hi_open=True, eg=0.75), default=0.75,
                   help="fraction of patches masked")
    g.add_argument("--dec-depth", type=common.at_least(1, eg=8), help="decoder blocks (paper recipe 8)")
    g.add_argument("--dec-width", type=common.at_least(4, eg=512), help="decoder width (paper recipe 512)")
    g.add_argument("--dec-heads", type=common.at_least(1, eg=16), help="decoder heads (paper recipe 16)")
    g.add_argument("--knn-samples", type=common.at_least(1, eg=4096),
                   help="training images whose features the k-NN evaluation votes with")
    g.add_argument("--save-masks", type=common.at_least(0, eg=100), default=0,
                   help="every this many steps write a PNG of the masks (crop, teacher attention, visible "
                        "patches) to OUT_DIR/masks (0 = never)")
    g = p.add_argument_group("MILAN ablations (the paper's and MAE's alternatives, the official code's choices)")
    g.add_argument("--mask", default="semantic", choices=["semantic", "random"],
                   help="semantic: patches drawn without replacement with the teacher's [CLS] attention as "
                        "weights, the first K visible (paper); random: MAE's uniform masking")
    g.add_argument("--decoder", default="prompting", choices=["prompting", "mae"],
                   help="prompting: CLS and visible tokens are fixed prompts, only mask tokens are updated "
                        "(paper); mae: MAE's self-attention decoder over all tokens")
    g.add_argument("--target", default="clip", choices=["clip", "pixels"],
                   help="clip: the teacher's output tokens (paper); pixels: per-patch normalised pixels (MAE's "
                        "target; plain MAE with --mask random --decoder mae)")
    g.add_argument("--loss-on", choices=["all", "masked"],
                   help="tokens the loss averages over (default: all 1+N tokens for --target clip, as the "
                        "official code; masked patches for --target pixels, as MAE)")


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
def num_visible(num_patches, mask_ratio):
    """K = int(N·(1 - r)): 49 of 196 patches at r = 0.75 (the official code's rounding)."""
    return int(num_patches * (1 - mask_ratio))


def gumbel_keys(rng, num_patches):
    """One sample's masking noise, drawn on the host by the data transform from the sample's random.Random
    (common.py's randomness contract), so that a sample gets the same mask on any number of ranks:
    g_i = -log(-log u_i), u_i ~ U[0, 1) in float64, i.i.d. Gumbel(0, 1). (N,) fp32."""
    u = torch.tensor([rng.random() for _ in range(num_patches)], dtype=torch.float64)
    return (-(-u.log()).log()).float()


def semantic_masking(weights, mask_ratio, gumbel):
    """Semantic-aware masking (S). weights: (B, N) non-negative, the teacher's [CLS] attention to each
    patch; gumbel: (B, N) i.i.d. Gumbel(0, 1) keys (gumbel_keys). Draws all N patches without replacement
    with P(next = i) ∝ w_i among those left (Plackett-Luce, what torch.multinomial(w, N, replacement=False)
    does in models_milan.py's attention_masking); the first K drawn are visible, so high-attention patches
    are kept more often. Drawn as Gumbel-top-k: sorting log w_i + g_i in decreasing order gives that same
    distribution without a host sync. Returns (keep, masked): keep (B, K) and masked (B, N - K) indices."""
    w = weights.float() + 1e-12                                      # no zero weight
    order = (w.log() + gumbel.float()).argsort(dim=1, descending=True)   # (S): (B, N) a Plackett-Luce permutation
    k = num_visible(w.shape[1], mask_ratio)
    return order[:, :k], order[:, k:]


def random_masking(gumbel, mask_ratio):
    """MAE's random masking, the ablation: the argsort of i.i.d. noise (here the same per-sample keys as
    semantic masking, a uniformly random order). gumbel: (B, N). Returns (keep (B, K), masked (B, N - K))."""
    order = gumbel.argsort(dim=1, descending=True)                   # (B, N)
    k = num_visible(gumbel.shape[1], mask_ratio)
    return order[:, :k], order[:, k:]


def make_masks(attn, gumbel, args):
    """(keep (B, K), masked (B, M)) for the step from the batch's keys gumbel (B, N): semantic-aware from the
    teacher's attention, or random."""
    if args.mask == "semantic":
        return semantic_masking(attn, args.mask_ratio, gumbel)
    return random_masking(gumbel, args.mask_ratio)


@torch.no_grad()
def save_mask_grid(path, image, weights, keep, grid, norm, rows=8):
    """A PNG with one row per image: the crop, the teacher's [CLS] attention over the patches (white =
    highest; black without a teacher) and the crop with its masked patches grey. Host copies: only
    every --save-masks steps."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in common.NORMS[norm])
    img = (image[:rows].float().cpu() * std + mean).clamp(0, 1)                  # (n, 3, H, W)
    n, _, H, W = img.shape
    p = H // grid

    def upsample(x):  # (n, grid²) -> (n, 3, H, W), each patch a p × p block
        return x.view(n, 1, grid, grid).repeat_interleave(p, 2).repeat_interleave(p, 3).expand(-1, 3, -1, -1)

    visible = upsample(torch.zeros(n, grid * grid).scatter(1, keep[:rows].cpu(), 1.0))
    heat = torch.zeros(n, grid * grid) if weights is None else weights[:rows].float().cpu()
    heat = upsample(heat / heat.amax(dim=1, keepdim=True).clamp(min=1e-12))
    sheet = torch.cat([img, heat, img * visible + 0.5 * (1 - visible)], dim=3)   # (n, 3, H, 3W)
    sheet = torch.cat(list(sheet), dim=1)                                       # (3, n·H, 3W)
    pil = Image.fromarray((sheet * 255).round().byte().permute(1, 2, 0).numpy())
    scale = max(1, 96 // H)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


# ----------------------------------------------------------------------------------------------------
# <method> Losses
# ----------------------------------------------------------------------------------------------------
def milan_loss(pred, target, masked=None):
    """(L) mean over tokens of 2 − 2·cos(pred, T) = ‖p̂ − t̂‖² (models_milan.py's forward_loss). pred,
    target: (B, 1+N, C), [CLS] first. masked=None averages over all B×(1+N) tokens, [CLS] and visible
    included (the official code); masked: (B, M) patch indices averages over the masked patches only
    (--loss-on masked). Returns (loss, per-token distances (B, 1+N))."""
    p = F.normalize(pred.float(), dim=-1, eps=1e-6)                  # p̂ = p / ‖p‖
    t = F.normalize(target.float(), dim=-1, eps=1e-6)                # t̂ = T / ‖T‖
    per_token = 2 - 2 * (p * t).sum(-1)                              # (L): (B, 1+N) 2 − 2·cos
    if masked is None:
        return per_token.mean(), per_token
    return per_token[:, 1:].gather(1, masked).mean(), per_token


def patchify(image, patch):
    """(B, 3, H, W) -> (B, N, p·p·3), patches in row-major order, each flattened as (row, column, channel)."""
    B, C, H, W = image.shape
    x = image.reshape(B, C, H // patch, patch, W // patch, patch)   # (B, 3, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def pixel_loss(pred, image, patch, masked=None):
    """MAE's loss (the --target pixels ablation): per-patch mean squared error against the patch's pixels
    normalised by their own mean and variance (norm_pix_loss). pred: (B, N, p·p·3); masked: (B, M)
    patch indices, or None for all patches. Returns (loss, per-patch errors (B, N))."""
    target = patchify(image.float(), patch)                          # (B, N, p·p·3)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(-1)              # (B, N)
    if masked is None:
        return per_patch.mean(), per_patch
    return per_patch.gather(1, masked).mean(), per_patch


# ----------------------------------------------------------------------------------------------------
# <method> Model
# ----------------------------------------------------------------------------------------------------
def mae_init(module):
    """MAE's initialisation (models_mae.py's initialize_weights): Xavier-uniform for every Linear (q, k, v
    packed as one matrix, as timm's fused qkv) and for the patch embedding seen as a Linear, zero Linear
    biases, LayerNorm (1, 0). The patch embedding's bias keeps PyTorch's default init, which MAE leaves."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, Attention):
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.data.view(m.weight.shape[0], -1))
        elif isinstance(m, nn.LayerNorm):
            m.eps = 1e-6  # timm's norm_layer = partial(nn.LayerNorm, eps=1e-6)
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def encoder_config(cfg):
    """The student's keyword arguments from a model config (common.MODELS' entries, plus act)."""
    return {k: cfg[k] for k in ("image_size", "patch_size", "width", "layers", "heads", "act")}


class MAEEncoder(nn.Module):
    """The student: MAE's ViT (pre-norm blocks with qkv bias and GELU, no ln_pre, a final LayerNorm,
    fixed sin-cos positions, [CLS] token). It encodes the [CLS] token and the visible patches only."""

    def __init__(self, *, image_size, patch_size, width, layers, heads, act):
        super().__init__()
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", common.sincos_2d(self.grid, width), persistent=False)   # (1+N, D), fixed
        self.blocks = Transformer(width, layers, heads, act)
        self.norm = nn.LayerNorm(width)
        mae_init(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, image, keep=None):
        """image: (B, 3, H, W); keep: (B, K) visible patch indices, or None for all. Returns the tokens
        after the final norm, [CLS] first: (B, 1+K, D)."""
        x = self.patch_embed(image).flatten(2).transpose(1, 2)      # (B, N, D)
        B, N, D = x.shape
        pos = self.pos_embed.to(x.dtype)
        x = x + pos[1:]                                              # positions before the gather
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, D))       # (B, K, D)
        cls = (self.cls_token + pos[0]).to(x.dtype).expand(B, 1, D)
        return self.norm(self.blocks(torch.cat([cls, x], dim=1)))  # (B, 1+K, D)

    def features(self, image):
        """The frozen feature of k-NN and linear probing (MAE's protocol): [CLS] after the final norm, (B, D)."""
        return self(image)[:, 0]


class PromptingBlock(ResidualAttentionBlock):
    """One block of the prompting decoder (D) (models_milan.py's Block_fordecoder), with the parameters of a
    shared block. Queries come from the mask tokens only; keys and values from [prompts; LN1(mask tokens)],
    the prompts raw (no LayerNorm); the residual and MLP update the mask tokens only. The prompts are read,
    never written."""

    def forward(self, z, prompts):
        """z: (B, M, D) mask-token states; prompts: (B, 1+K, D). Returns the new z: (B, M, D)."""
        B, M, D = z.shape
        H = self.attn.heads
        h = self.ln_1(z)                                                       # LN on mask tokens only
        kv_in = torch.cat([prompts, h], dim=1)                                 # (D): (B, 1+K+M, D), raw prompts
        w_q, w_kv = self.attn.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.attn.in_proj_bias.split([D, 2 * D])
        q = F.linear(h, w_q, b_q).view(B, M, H, D // H).transpose(1, 2)        # (B, H, M, D/H)
        k, v = F.linear(kv_in, w_kv, b_kv).view(B, -1, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 × (B, H, 1+K+M, D/H)
        a = F.scaled_dot_product_attention(q, k, v)                            # (B, H, M, D/H), no attention mask
        z = z + self.attn.out_proj(a.transpose(1, 2).reshape(B, M, D))         # residual, mask tokens only
        return z + self.mlp(self.ln_2(z))


class MILAN(nn.Module):
    """MAE encoder + decoder (prompting or MAE) + prediction head to the target width. `forward` runs the
    whole training computation of a step and returns (loss, metrics). image_size ... act: the encoder's
    (MAEEncoder); target_dim: the teacher's width C_t (target 'clip'); loss_on None: 'all' for target
    'clip' (official code), 'masked' for 'pixels' (MAE)."""

    def __init__(self, *, image_size, patch_size, width, layers, heads, act, target_dim=None, target="clip",
                 decoder="prompting", loss_on=None, dec_width=512, dec_depth=8, dec_heads=16):
        super().__init__()
        self.encoder = MAEEncoder(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                                  heads=heads, act=act)
        self.grid, self.patch_size = self.encoder.grid, patch_size
        self.decoder_kind, self.target = decoder, target
        self.loss_on = loss_on or ("all" if target == "clip" else "masked")
        if dec_width % dec_heads:
            raise ValueError(f"the decoder width {dec_width} is not divisible by its {dec_heads} heads")
        self.decoder_embed = nn.Linear(width, dec_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_width))
        self.register_buffer("decoder_pos", common.sincos_2d(self.grid, dec_width), persistent=False)   # (1+N, Dd)
        block = PromptingBlock if decoder == "prompting" else ResidualAttentionBlock
        self.decoder_blocks = nn.ModuleList([block(dec_width, dec_heads, act) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dec_width)
        self.decoder_pred = nn.Linear(dec_width, target_dim if target == "clip" else 3 * patch_size ** 2)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            mae_init(part)
        if decoder == "prompting":  # q and kv are two Linears in the official code, each Xavier'd
            for b in self.decoder_blocks:
                nn.init.xavier_uniform_(b.attn.in_proj_weight.data[:dec_width])
                nn.init.xavier_uniform_(b.attn.in_proj_weight.data[dec_width:])
        nn.init.normal_(self.mask_token, std=0.02)

    def decode(self, latent, keep, masked):
        """latent: (B, 1+K, D) encoder output; keep: (B, K), masked: (B, M) patch indices. Returns the
        decoder's states in the original token order, [CLS] first: (B, 1+N, Dd)."""
        x = self.decoder_embed(latent)                                         # (B, 1+K, Dd)
        B, _, Dd = x.shape
        pos = self.decoder_pos.to(x.dtype)                                     # (1+N, Dd)
        N = pos.shape[0] - 1
        prompts = torch.cat([x[:, :1] + pos[0], x[:, 1:] + pos[1:][keep]], dim=1)   # (P): (B, 1+K, Dd)
        z = self.mask_token.to(x.dtype) + pos[1:][masked]                      # (B, M, Dd)
        if self.decoder_kind == "prompting":
            for block in self.decoder_blocks:
                z = block(z, prompts)                                          # (D); prompts stay as they are
            visible = prompts[:, 1:]
        else:  # MAE: one sequence, every token updated by every block
            seq = torch.cat([prompts, z], dim=1)                               # (B, 1+K+M, Dd)
            for block in self.decoder_blocks:
                seq = block(seq)
            prompts, visible, z = seq[:, :1], seq[:, 1:1 + keep.shape[1]], seq[:, 1 + keep.shape[1]:]
        out = x.new_zeros(B, N, Dd)
        out = out.scatter(1, keep[..., None].expand(-1, -1, Dd), visible)      # (B, N, Dd), original order
        out = out.scatter(1, masked[..., None].expand(-1, -1, Dd), z)
        return torch.cat([prompts[:, :1], out], dim=1)                         # (B, 1+N, Dd)

    def predict(self, image, keep, masked):
        """pred = decoder_pred(decoder_norm(decoder states)): (B, 1+N, C) in the original token order."""
        return self.decoder_pred(  # (Y)
            self.decoder_norm(self.decode(self.encoder(image, keep), keep, masked)))

    def forward(self, image, keep, masked, targets=None):
        """image: (B, 3, H, W); keep: (B, K), masked: (B, M) patch indices; targets: (B, 1+N, C_t) the
        teacher's tokens (target 'clip'). Returns (loss, metrics)."""
        pred = self.predict(image, keep, masked)
        on = masked if self.loss_on == "masked" else None
        if self.target == "clip":
            loss, per_token = milan_loss(pred, targets, on)
            patches = per_token[:, 1:].detach()                                # (B, N)
        else:
            loss, patches = pixel_loss(pred[:, 1:], image, self.patch_size, on)
            patches = patches.detach()                                         # (B, N)
        metrics = {"loss_masked": patches.gather(1, masked).mean(), "loss_visible": patches.gather(1, keep).mean()}
        return loss, metrics


# ----------------------------------------------------------------------------------------------------
# <method> Teacher (a frozen CLIP image tower; no EMA)
# ----------------------------------------------------------------------------------------------------
class CLIPTeacher(nn.Module):
    """The frozen CLIP image tower (engine_pretrain.py runs it under no_grad before the student): fp32
    weights, eval mode for good, no gradient, not in the optimiser, not wrapped in DDP, not saved in
    checkpoints (`frozen`: it is read from --teacher again on resume). It reads the student's unmasked
    crop, re-normalised from the student's normalisation to the teacher's: x_t = (x·σ_s + μ_s - μ_t) / σ_t.
    visual: a VisionTransformer; student_norm, teacher_norm: (mean, std) pairs."""
    frozen = True

    def __init__(self, *, visual, student_norm, teacher_norm):
        super().__init__()
        self.visual, self.embed_dim = visual.float(), visual.proj.shape[1]
        self.visual.transformer.grad_checkpointing = False
        (mean_s, std_s), (mean_t, std_t) = (torch.tensor(n).view(2, 3, 1, 1) for n in (student_norm, teacher_norm))
        self.register_buffer("scale", std_s / std_t, persistent=False)             # (3, 1, 1)
        self.register_buffer("shift", (mean_s - mean_t) / std_t, persistent=False)  # (3, 1, 1)
        self.knn_results = None  # the teacher's k-NN figures: it never changes, so they are computed once
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # always in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, image):
        """image: (B, 3, H, W) normalised as the student's. Returns the targets T = ln_post(tokens) @ proj,
        every token, [CLS] first: (B, 1+N, C_t), and w = A[:, 0, 1:], the last block's [CLS] attention to
        each patch, averaged over heads: (B, N) (sums to less than 1: the [CLS] key is dropped)."""
        x = image * self.scale.to(image.dtype) + self.shift.to(image.dtype)
        tokens, attn = self.visual(x, cls_attention=1)              # (B, 1+N, W), (1, B, 1+N): last block only
        targets = self.visual.ln_post(tokens) @ self.visual.proj    # (T): (B, 1+N, C_t)
        return targets, attn[-1, :, 1:]                             # (W): (B, N), the last block's row

    @torch.no_grad()
    def features(self, image):
        """The teacher's image embedding ([CLS] after ln_post, projected), for the comparison k-NN: (B, C_t)."""
        x = image * self.scale.to(image.dtype) + self.shift.to(image.dtype)
        return self.visual.ln_post(self.visual(x)[:, 0]) @ self.visual.proj


def load_teacher(args, cfg):
    """The CLIPTeacher of --teacher (None when nothing needs one: --target pixels --mask random), read once
    and loaded with strict checks by common.load_clip; every failure is one line that says how to get one.
    A file without a ViT image tower (a ResNet CLIP such as RN50) fails before the loader reads its shapes."""
    if args.target != "clip" and args.mask != "semantic":
        return None
    if not args.teacher:
        raise common.UsageError(f"MILAN needs a frozen CLIP image tower as teacher (--teacher PATH); {TEACHER_HOWTO}")
    try:
        clip, info = common.load_clip(args.teacher, CLIP, VisionTransformer, act=args.teacher_act)
    except common.UsageError as e:  # e.g. a ResNet CLIP: not a ViT image tower (common.openai_state_dict)
        raise common.UsageError(f"--teacher: {e}; {TEACHER_HOWTO}") from None
    v, grid = clip.visual, cfg["image_size"] // cfg["patch_size"]
    if (v.patch_size, v.grid) != (cfg["patch_size"], grid):
        raise common.UsageError(
            f"--teacher {args.teacher} has a {v.grid}×{v.grid} grid of {v.patch_size}-px patches "
            f"({v.grid * v.patch_size} px), the {args.model} student a {grid}×{grid} grid of {cfg['patch_size']}-px "
            f"patches; MILAN needs the same patches: pick a --model of the teacher's image and patch size, or "
            f"another teacher; {TEACHER_HOWTO}")
    norm = args.teacher_norm
    if norm == "file":
        norm = info.get("norm") if info.get("norm") in common.NORMS else "clip"
    return CLIPTeacher(visual=v, student_norm=common.NORMS[args.norm], teacher_norm=common.NORMS[norm])


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
def build_model(cfg, args):
    """(MILAN student, its frozen CLIPTeacher or None). The teacher is loaded first: its output width C_t
    sets decoder_pred's. It stays outside the student's modules (in neither its state dict nor DDP). A bad
    flag, teacher or evaluation folder fails here, at start-up."""
    common.check_knn_data(args.train_data, args.imagenet_val)
    n = (cfg["image_size"] // cfg["patch_size"]) ** 2
    if not 0 < num_visible(n, args.mask_ratio) < n:
        raise common.UsageError(f"--mask-ratio {args.mask_ratio} leaves {num_visible(n, args.mask_ratio)} of {n} "
                                f"patches visible; it must leave at least one visible and one masked")
    teacher = load_teacher(args, cfg)
    try:
        model = MILAN(**encoder_config(cfg), target_dim=teacher.embed_dim if teacher is not None else None,
                      target=args.target, decoder=args.decoder, loss_on=args.loss_on, dec_width=args.dec_width,
                      dec_depth=args.dec_depth, dec_heads=args.dec_heads)
    except ValueError as e:
        raise common.UsageError(f"--dec-width {args.dec_width}, --dec-heads {args.dec_heads}: {e}") from None
    return model, teacher


class CropAndKeys:
    """The training transform: `crop` (common.TrainCrop), then the sample's masking keys (gumbel_keys) from
    the same generator. (img, rng) -> (image (3, S, S), gumbel (N,))."""

    def __init__(self, crop, num_patches):
        self.crop, self.num_patches = crop, num_patches

    def __call__(self, img, rng):
        return self.crop(img, rng), gumbel_keys(rng, self.num_patches)


def train_transform(args, cfg):
    """RandomResizedCrop(scale (crop_scale, 1), bicubic) + horizontal flip + normalisation (MAE's), and the
    masking keys."""
    mean, std = common.NORMS[args.norm]
    crop = common.TrainCrop(cfg["image_size"], (args.crop_scale, 1.0), mean, std, flip=True)
    return CropAndKeys(crop, (cfg["image_size"] // cfg["patch_size"]) ** 2)


def no_weight_decay(name, param):
    """Biases and LayerNorm gains (1-D) only: cls_token and mask_token, (1, 1, D), are decayed, as in
    the official code (timm 0.3.2's add_weight_decay). The position embeddings are fixed buffers."""
    return param.ndim < 2


def train_step(ddp, model, teacher, batch, step, sched, args, device):
    """ddp: the DDP-wrapped (and maybe compiled) model; model: the raw module; batch: ((images, gumbel keys),
    labels, skipped) on the host; the labels are not used. The frozen teacher runs first, under no_grad;
    then one call of ddp. Returns (loss, metrics)."""
    image, gumbel = common.to_device(batch[0], device)             # (B, 3, H, W), (B, N)
    targets = attn = None
    if teacher is not None:
        targets, attn = teacher(image)                             # (B, 1+N, C_t), (B, N)
    keep, masked = make_masks(attn, gumbel, args)
    if args.save_masks and step % args.save_masks == 0 and common.is_main():
        save_mask_grid(os.path.join(args.out_dir, "masks", f"step{step:07d}.png"), image, attn, keep,
                       model.grid, args.norm)
    return ddp(image, keep, masked, targets if args.target == "clip" else None)


def after_step(model, teacher, step, sched, args):
    """Nothing to do: the teacher is frozen and there is no temperature to clamp."""


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
    """None: the student is an MAE ViT, not a CLIP (eval_towers reads it from the checkpoint)."""
    return {}


def eval_towers(ckpt):
    """{'student': MAEEncoder} from a checkpoint of this script; `features(x)` is the [CLS] token after
    the final norm, (B, D), the feature of k-NN and linear probing."""
    encoder = MAEEncoder(**encoder_config(ckpt["config"]))
    sd = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    common.load_strict(encoder, sd, f"the encoder of a {METHOD} checkpoint", "an MAE ViT encoder")
    return {"student": encoder.eval()}


@torch.no_grad()
def evaluate(model, teacher, args, device):
    """k-NN top-1 (cosine, k = 20, T = 0.07) of the student's [CLS] feature on the held-out set, next to
    the frozen teacher's with its CLIP image embedding (computed once: the teacher never changes). On the
    first call both towers read each image in the same pass."""
    train_set, test_set, num_classes = common.knn_datasets(
        image_size=model_config(args)["image_size"], norm=args.norm, train_data=args.train_data,
        imagenet_val=args.imagenet_val, samples=args.knn_samples)
    width = model.encoder.cls_token.shape[-1]
    with_teacher = teacher is not None and teacher.knn_results is None

    def encode(x):  # (B, D) student [CLS], then (B, C_t) teacher embedding on the first call
        feats = [model.encoder.features(x).float()]
        if with_teacher:
            feats.append(teacher.features(x).float())
        return torch.cat(feats, dim=1)

    rank, world = rank_world()
    loaders = [common.eval_loader(ds, 256, rank, world, args.workers) for ds in (train_set, test_set)]
    (train_x, train_y), (test_x, test_y) = (common.extract_features(encode, loader, device) for loader in loaders)
    knn = common.knn_accuracy
    results = {"student/knn_top1": knn(train_x[:, :width], train_y, test_x[:, :width], test_y, num_classes)}
    if with_teacher:
        teacher.knn_results = {"teacher/knn_top1": knn(train_x[:, width:], train_y, test_x[:, width:], test_y,
                                                       num_classes)}
    return {**results, **(teacher.knn_results if teacher is not None else {})}


if __name__ == "__main__":
    main()
