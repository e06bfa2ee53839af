"""SILC: Improving Vision Language Pretraining with Self-Distillation.
M. F. Naeem, Y. Xian, X. Zhai, L. Hoyer, L. Van Gool, F. Tombari. ECCV 2024, arXiv 2310.13355.
The official repository (google-research/silc) has a README and a figure, no code: this file follows the
paper's description, DINO (the self-distillation) and big_vision (SigLIP).

Idea. Image-text contrastive training aligns whole images with captions but says little about their parts.
SILC adds DINO's local-to-global self-distillation: an EMA teacher sees two global crops, the student sees N
small local crops, and the student's distribution over K prototypes on every local crop is pulled towards the
teacher's on every global crop. The teacher averages a student that the text loss also trains, so its targets
stay aligned with language, and the patch features get better for dense tasks (zero-shot segmentation, the
paper's headline, reads `encode_dense`).

Objective (x: L2-normalised pooled image embedding, y: text embedding, B pairs, t = exp(t')):
    L = L_con + λ·L_sd                                         λ = 1 (--lambda-sd, project choice)
    L_con = ½ (L(x^{g1}, y) + L(x^{g2}, y))     each global view against the same B captions, B×B each
    SILC-C, --loss softmax: L = -1/(2B) Σ_i [log softmax_j(t·x_i·y_j)_i + log softmax_j(t·x_j·y_i)_i]
    SILC-S, --loss sigmoid: L = -1/B Σ_i Σ_j log σ(z_ij·(t·x_i·y_j + b)), z_ij = 1 if i = j else -1
    P_t^g = softmax((h̄(f̄(x^g)) - c) / τ_t),  log P_s^v = log_softmax(h(f(x^v)) / τ_s)    h: DINO head
    L_sd = mean over (g ∈ 2 globals, v ∈ N locals) of mean_b [ -Σ_k P_t^g log P_s^v ]       2N pairs
    c ← m_c·c + (1 - m_c)·mean(h̄(f̄(x^g)))  over the teacher rows of all ranks
    θ̄ ← m·θ̄ + (1 - m)·θ  for the image tower and the DINO head, m constant
Differs from CLIP/SigLIP in the `# <method>` sections only; `--lambda-sd 0` is the CLIP (or SigLIP) baseline
on two global views. The EMA momentum is fixed: DINO's anneals to 1 (`--ema-schedule cosine`), which freezes
the teacher while the text loss still changes the student.
Read one step: train_step → Teacher.targets → SILC.forward → contrastive / sigmoid_loss → dino_loss.

Paper: CLIP's or SigLIP's loss, 2 global crops at scale (0.4, 1), 8 local crops at (0.05, 0.4), the contrastive
loss on each global view with the batch unchanged, a fixed EMA momentum. SigLIP: t' = log 10, b = -10. Project
choices where the paper is silent, with the source they follow:
  - pooling (--pool auto): softmax: [CLS] + linear projection, an OpenAI-layout CLIP (E = embed_dim); sigmoid:
    big_vision's MAP head, no projection (E = width), no [CLS] or ln_pre (also --pool gap); the DINO head gets
    the pooled embedding before L2 normalisation;
  - text tower: the shared one, causal with end-token pooling (big_vision's has no causal mask);
  - views: globals at the model's resolution, locals at 96/224 of it (DINO's 96 px at 224) in whole patches, at
    least 2×2, bicubic; horizontal flip, except the built-in data's global crops, whose captions say left and
    right; no photometric augmentation (--local-photometric: DINO's on the locals); positions interpolated;
  - DINO's head and values: hidden 2048, bottleneck 256, K = 65536, weight-normalised prototypes with gain 1,
    τ_s = 0.1, τ_t 0.04 → 0.07 linearly over the LR warm-up, m_c = 0.9, EMA momentum 0.996 (the base value);
    --freeze-last-layer-steps as DINO's (the prototypes' gradient is None); the teacher: image tower, pooling
    and DINO head. Distillation local → global only (the paper's figure);
  - softmax: t starts at 1/0.07, clamped at 100 (CLIP); both losses are exact across ranks (text embeddings
    gathered with gradient; big_vision rotates text chunks instead) and run in fp32;
  - recipe (--train-data): SigLIP 2's B/16 values: batch 32768, Adam β (0.9, 0.999), lr 1e-3, decoupled wd
    1e-4 (PyTorch AdamW weight_decay 0.1 at lr 1e-3), grad clip 1, cosine to 0, 20k warm-up steps
    (--warmup-epochs 0.5 for 1.3B pairs; pass 20000·32768/N for N), 9B examples seen (275k steps), 64 text
    tokens, GELU, CLIP pixel constants;
  - zero-shot segmentation: patch tokens after ln_post through the pooled path's projection (MAP: none, or
    --seg-readout map_value, MaskCLIP-style: the readout that aligns a MAP tower's tokens in the demo's runs).

Run:
    torchrun silc.py      # built-in demo, CPU, a few minutes
    torchrun --nproc_per_node=8 silc.py --train-data 'datacomp/{00000..14000}.tar' --train-num-samples 1300000000
    torchrun --nproc_per_node=8 silc.py --train-data ... --loss sigmoid     # SILC-S (MAP head)
    torchrun --nproc_per_node=8 silc.py --train-data ... --lambda-sd 0      # CLIP baseline on the same views

Left out: WebLI, Cat-Seg open-vocabulary fine-tuning, few-shot probes, detection/captioning/VQA, gradient
accumulation (it would change the contrastive negatives).
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

METHOD = "silc"
DATA_KIND = "image-text"  # what the training data must provide: image-text pairs, or images alone

# ----------------------------------------------------------------------------------------------------
# <method> Recipe and flags
# ----------------------------------------------------------------------------------------------------
# SILC's recipe is unknown: SigLIP 2's ViT-B/16 and DINO's values (docstring); steps = 9B examples / 32768.
RECIPE = dict(model="ViT-B/16", batch_size=32768, steps=275_000, epochs=7, lr=1e-3, lr_start=0.0, lr_end=0.0,
              warmup_epochs=0.5, act="gelu", wd=0.1, beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=1.0, norm="clip",
              crop_scale=0.4, context_length=64, eval_every=1.0, workers=8, n_local=8, out_dim=65536,
              head_hidden=2048, head_bottleneck=256, ema_momentum=0.996)
# Without --train-data: the built-in demo (tiny model, shapes rendered on the fly, length set by epochs).
DEMO = dict(model="tiny", batch_size=128, steps=None, epochs=3, lr=1e-3, lr_start=1e-6, lr_end=1e-5,
            warmup_epochs=0.5, wd=0.1, crop_scale=0.4, builtin_samples=9728, eval_every=0.0, workers=1, n_local=4,
            out_dim=256, head_hidden=256, head_bottleneck=64, ema_momentum=0.99)


def add_method_args(p):
    g = p.add_argument_group("SILC")
    g.add_argument("--loss", default="softmax", choices=["softmax", "sigmoid"],
                   help="contrastive loss: softmax = SILC-C (CLIP's InfoNCE), sigmoid = SILC-S (SigLIP)")
    g.add_argument("--t-init", type=common.positive(10.0),
                   help="initial t = exp(t') (default: 1/0.07 for softmax, clamped at 100; "
                                                "10 for sigmoid)")
    g.add_argument("--b-init", type=common.Range(float, eg=-10.0), default=-10.0,
                   help="initial bias b of the sigmoid loss")
    g.add_argument("--n-local", type=common.at_least(0, eg=8),
                   help="local crops per image (paper 8; 0 = no self-distillation unless "
                                               "--distill-global-cross)")
    g.add_argument("--local-size", type=common.at_least(1, eg=96),
                   help="local crop side in pixels, a multiple of the patch (default: "
                        "96/224 of the image size in whole patches, at least 2)")
    g.add_argument("--local-scale", type=common.fraction(lo_open=True, eg=0.4), nargs=2, default=(0.05, 0.4),
                   metavar=("MIN", "MAX"),
                   help="area fraction of the local crops (the global crops use --crop-scale to 1)")
    g.add_argument("--lambda-sd", type=common.at_least(0, float, 1.0), default=1.0,
                   help="λ, weight of L_sd (0 = no self-distillation)")
    g.add_argument("--out-dim", type=common.at_least(1, eg=65536), help="K, prototypes of the DINO head (recipe 65536)")
    g.add_argument("--head-hidden", type=common.at_least(1, eg=2048),
                   help="hidden width of the DINO head's MLP (recipe 2048)")
    g.add_argument("--head-bottleneck", type=common.at_least(1, eg=256),
                   help="bottleneck of the DINO head (recipe 256)")
    g.add_argument("--student-temp", type=common.positive(0.1), default=0.1, help="τ_s")
    g.add_argument("--warmup-teacher-temp", type=common.positive(0.04), default=0.04, help="τ_t at step 0")
    g.add_argument("--teacher-temp", type=common.positive(0.07), default=0.07, help="τ_t after the warm-up")
    g.add_argument("--warmup-teacher-temp-steps", type=common.at_least(0, eg=1000),
                   help="steps of the linear τ_t warm-up (default: equal to the LR warm-up, --warmup-epochs × "
                        "steps per epoch, for every data source)")
    g.add_argument("--center-momentum", type=common.fraction(eg=0.9), default=0.9, help="m_c of the teacher centre")
    g.add_argument("--ema-momentum", type=common.fraction(eg=0.996),
                   help="EMA momentum m of the teacher (recipe 0.996)")
    g = p.add_argument_group("SILC ablations (alternative designs the paper leaves open)")
    g.add_argument("--pool", default="auto", choices=["auto", "cls", "map", "gap"],
                   help="image embedding: [CLS] + projection, MAP head (no projection), or mean of the patch tokens "
                        "+ projection; auto = cls for softmax, map for sigmoid")
    g.add_argument("--contrastive-on", default="both_globals", choices=["both_globals", "first_global", "unaugmented"],
                   help="images of the contrastive loss: each global view (SILC), the first one only, or an extra "
                        "un-augmented view (SigLIP 2)")
    g.add_argument("--local-photometric", action="store_true",
                   help="DINO's colour jitter, grayscale and blur on the local crops")
    g.add_argument("--distill-global-cross", action="store_true",
                   help="also distil student global 1 -> teacher global 2 and 2 -> 1 (DINO's cross-global pairs)")
    g.add_argument("--freeze-last-layer-steps", type=common.at_least(0, eg=1250), default=0,
                   help="first steps in which the prototypes get no gradient, no decay, no Adam moments (DINO: 1 "
                        "epoch)")
    g.add_argument("--ema-schedule", default="const", choices=["const", "cosine"],
                   help="const (SILC) or DINO's cosine schedule from --ema-momentum to 1")
    g.add_argument("--seg-readout", default="proj", choices=["proj", "map_value"],
                   help="dense features: patch tokens through the pooled path's projection, or (MAP head) through "
                        "its value projection and MLP")


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
# <method> Views
# ----------------------------------------------------------------------------------------------------
# The student's partial views: DINO's multi-crop (facebookresearch/dino, main_dino.py, DataAugmentationDINO),
# built by the loader's workers.
class MultiCrop:
    """The views of one image (common.py's `(img, rng)` contract): 2 global crops (RandomResizedCrop to
    global_size, area scale global_scale, bicubic, horizontal flip unless flip_globals=False), n_local local
    crops (local_size, local_scale, flip, optionally DINO's photometric augmentation) and, with unaugmented=True,
    the image resized and centre-cropped to global_size. Returns FloatTensor[3, side, side] views: (global 1,
    global 2, local 1..n[, unaugmented])."""

    def __init__(self, global_size, local_size, n_local, global_scale, local_scale, mean, std, photometric=False,
                 unaugmented=False, flip_globals=True):
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale, self.mean, self.std = tuple(global_scale), tuple(local_scale), mean, std
        self.photometric, self.flip_globals = photometric, flip_globals
        self.unaugmented = common.EvalTransform(global_size, mean, std) if unaugmented else None

    def crop(self, img, rng, size, scale, photometric=False, flip=True):
        left, top, w, h = common.crop_box(rng, img.width, img.height, scale)
        out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5 and flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if photometric:
            out = common.photometric(out, rng, blur=0.5)  # DINO's local crops: blur p 0.5, no solarisation
        return common.to_normalized_tensor(out, self.mean, self.std)

    def __call__(self, img, rng):
        views = [self.crop(img, rng, self.global_size, self.global_scale, flip=self.flip_globals) for _ in range(2)]
        views += [self.crop(img, rng, self.local_size, self.local_scale, self.photometric) for _ in range(self.n_local)]
        if self.unaugmented is not None:
            views.append(self.unaugmented(img))
        return tuple(views)


# ----------------------------------------------------------------------------------------------------
# <method> Losses
# ----------------------------------------------------------------------------------------------------
def sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias):
    """SigLIP's loss over all ranks, -1/B Σ_i Σ_j log σ(z_ij·(t·x_i·y_j + b)), z_ij = 1 on the positive pair and
    -1 elsewhere. image_emb, text_emb: (B, E) L2-normalised, this rank's pairs; logit_scale: t' (t = exp t');
    logit_bias: b. The ranks' losses (B images against all ranks' texts, gathered with gradient), averaged as DDP
    averages gradients, equal one process's on the whole batch. fp32 under autocast."""
    with torch.autocast(image_emb.device.type, enabled=False):
        all_text = all_gather_with_grad(text_emb.float())                      # (world·B, E)
        B, rank = image_emb.shape[0], rank_world()[0]
        logits = logit_scale.float().exp() * image_emb.float() @ all_text.t() + logit_bias.float()  # L_sig: t·x·y + b
        z = torch.full_like(logits, -1.0)                                      # (B, world·B)
        z[:, rank * B:(rank + 1) * B] += 2 * torch.eye(B, device=logits.device)   # +1 on the diagonal
        return -F.logsigmoid(z * logits).sum() / B                             # L_sig: sum over texts, mean over images


def teacher_probs(teacher_logits, center, tau_t):
    """P_t = softmax((u - c) / τ_t): centring and sharpening of the raw teacher logits u (..., K)."""
    return F.softmax((teacher_logits.float() - center) / tau_t, dim=-1)


def center_update(center, teacher_logits, momentum):
    """c ← m_c·c + (1 - m_c)·mean(u), the mean over the raw teacher logits u (R, K) of all ranks."""
    batch_sum = common.all_reduce(teacher_logits.float().sum(0, keepdim=True))   # (1, K)
    return momentum * center + (1 - momentum) * batch_sum / (teacher_logits.shape[0] * rank_world()[1])


def dino_loss(student_logits, teacher_p, tau_s, n_student_globals=0):
    """L_sd: the mean over pairs (teacher view g, student view v) of mean_b [ -Σ_k P_t^g log softmax(s^v / τ_s) ].
    student_logits: (V, B, K) raw DINO-head outputs, the first n_student_globals of them the two global views
    (--distill-global-cross), the rest the local views; teacher_p: (2, B, K) centred and sharpened teacher
    probabilities of the global views. A global view is never paired with itself (DINO's DINOLoss):
    2·(V - n_student_globals) local pairs, plus 2 cross-global pairs if n_student_globals = 2. fp32 under autocast."""
    with torch.autocast(student_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_logits.float() / tau_s, dim=-1)          # (V, B, K): log P_s^v
        ce = -torch.einsum("gbk,vbk->gv", teacher_p.float(), log_p) / log_p.shape[1]  # (2, V): -Σ_k P_t log P_s
        pairs = torch.ones_like(ce)
        if n_student_globals:
            pairs[0, 0] = pairs[1, 1] = 0                                      # no view with itself
        return (ce * pairs).sum() / pairs.sum()                                # L_sd: mean over the pairs


# ----------------------------------------------------------------------------------------------------
# <method> Model
# ----------------------------------------------------------------------------------------------------
class MAPHead(nn.Module):
    """big_vision's multi-head attention pooling (big_vision/models/vit.py, MAPHead): one learned probe attends
    over the patch tokens, then a residual MLP, y = a + MLP(LN(a)) with a = MHA(probe, x). (B, N, D) -> (B, D).
    As big_vision: Xavier kernels, zero attention biases, MlpBlock's tanh-GELU and normal(1e-6) biases, eps 1e-6."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.empty(1, 1, dim))
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))  # q, k, v packed
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, 4 * dim, "gelu")
        self.mlp.gelu = nn.GELU(approximate="tanh")            # flax's nn.gelu
        nn.init.xavier_uniform_(self.probe.data.view(1, dim))  # Xavier as for a (1, D) kernel, as in flax
        for w in (*self.in_proj_weight.data.view(3, dim, dim), self.out_proj.weight, self.mlp.c_fc.weight,
                  self.mlp.c_proj.weight):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.out_proj.bias)
        for b in (self.mlp.c_fc.bias, self.mlp.c_proj.bias):
            nn.init.normal_(b, std=1e-6)

    def forward(self, x):
        B, N, D = x.shape
        H = self.heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(self.probe, w_q, b_q).view(1, 1, H, D // H).transpose(1, 2).expand(B, H, 1, D // H)
        k = F.linear(x, w_k, b_k).view(B, N, H, D // H).transpose(1, 2)               # (B, H, N, D/H)
        v = F.linear(x, w_v, b_v).view(B, N, H, D // H).transpose(1, 2)               # (B, H, N, D/H)
        a = F.scaled_dot_product_attention(q, k, v)                                     # (B, H, 1, D/H)
        a = self.out_proj(a.transpose(1, 2).reshape(B, 1, D))                           # (B, 1, D)
        return (a + self.mlp(self.ln(a)))[:, 0]                                         # (B, D)

    def value_readout(self, x):
        """MaskCLIP-style dense readout: every token through the value and output projections and the MLP, i.e.
        what the head returns when that token is the only key. (B, N, D) -> (B, N, D)."""
        a = self.out_proj(F.linear(x, self.in_proj_weight.chunk(3)[2], self.in_proj_bias.chunk(3)[2]))
        return a + self.mlp(self.ln(a))


class DINOHead(nn.Module):
    """DINO's projection head (facebookresearch/dino, vision_transformer.py, DINOHead): MLP J -> hidden -> hidden
    -> bottleneck (GELU), L2 normalisation, then K weight-normalised prototypes with the gain fixed at 1
    (norm_last_layer), i.e. cosine logits. (..., J) -> (..., K)."""

    def __init__(self, in_dim, out_dim, hidden, bottleneck):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))  # weight_v of the weight-normed layer
        nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))         # nn.Linear's default, as in DINO

    def forward(self, x, freeze_prototypes=False):
        x = F.normalize(self.mlp(x), dim=-1)                   # (..., bottleneck) on the unit sphere
        w = F.normalize(self.prototypes, dim=-1)               # weight norm, gain g = 1: unit rows, (K, bottleneck)
        if freeze_prototypes:  # zero gradient, out of the clipped norm (DDP needs the parameter used); see hold_grad
            w = w.detach() + 0 * w
        return F.linear(x, w)                                  # (..., K)


def pooled_embedding(tower, image):
    """(B, 3, H, W) -> (B, E): the pooled image embedding that the contrastive loss (after L2 normalisation) and
    the DINO head (before it) see. `tower`: the model or the teacher. Any input size (interpolated positions)."""
    x = tower.visual.ln_post(tower.visual(image))              # (B, N, D); (B, 1+N, D), [CLS] first, for cls
    if tower.pool == "cls":
        return x[:, 0] @ tower.visual.proj                     # (B, E)
    if tower.pool == "gap":
        return tower.gap_proj(x.mean(1))                       # (B, E)
    return tower.map_head(x)                                   # (B, D): E = D, no projection


def dense_embedding(tower, image, readout="proj"):
    """(B, 3, H, W) -> (B, N, E): every patch token after ln_post, mapped into the joint space without attention
    pooling: through the pooled path's projection (cls, gap), as they are (map), or through the MAP head's value
    path (readout map_value). Not normalised. N = (H/patch)·(W/patch), row-major."""
    x = tower.visual.ln_post(tower.visual(image)[:, tower.visual.n_cls:])   # (B, N, D), no [CLS]
    if tower.pool == "cls":
        return x @ tower.visual.proj                           # (B, N, E)
    if tower.pool == "gap":
        return tower.gap_proj(x)                               # (B, N, E); its mean is the pooled embedding
    return tower.map_head.value_readout(x) if readout == "map_value" else x


class SILC(CLIP):
    """CLIP (or SigLIP) towers + the pooling head + the DINO head (built when `distill`). With pool "cls" the
    towers are an OpenAI-layout CLIP; with "map" or "gap" the image tower has no [CLS], ln_pre or `visual.proj`.
    cfg: CLIP's keyword arguments (image_size, patch_size, width, ...)."""

    def __init__(self, *, loss="softmax", pool="cls", t_init=None, b_init=-10.0, contrastive_on="both_globals",
                 distill=True, distill_global_cross=False, lambda_sd=1.0, student_temp=0.1, out_dim=65536,
                 head_hidden=2048, head_bottleneck=256, seg_readout="proj", **cfg):
        if pool not in ("cls", "map", "gap"):
            raise ValueError(f"pool must be 'cls', 'map' or 'gap', not {pool!r}")
        embed_dim = cfg["width"] if pool == "map" else cfg["embed_dim"]
        super().__init__(**dict(cfg, embed_dim=embed_dim, class_token=pool == "cls"))
        self.pool, self.loss_kind, self.seg_readout = pool, loss, seg_readout
        self.contrastive_on, self.cross, self.tau_s, self.lambda_sd = contrastive_on, distill_global_cross, \
            student_temp, lambda_sd
        width = cfg["width"]
        self.map_head = MAPHead(width, cfg["heads"]) if pool == "map" else None
        self.gap_proj = nn.Linear(width, embed_dim, bias=False) if pool == "gap" else None
        if pool == "gap":
            nn.init.normal_(self.gap_proj.weight, std=width ** -0.5)
        if pool != "cls":
            self.visual.proj = None
        with torch.no_grad():
            self.logit_scale.fill_(math.log(t_init or (1 / 0.07 if loss == "softmax" else 10.0)))   # t' = log t
        self.logit_bias = nn.Parameter(torch.tensor(b_init)) if loss == "sigmoid" else None
        self.dino_head = DINOHead(embed_dim, out_dim, head_hidden, head_bottleneck) if distill else None

    def encode_image(self, image):
        """(B, 3, H, W) -> (B, E), not normalised."""
        return pooled_embedding(self, image)

    def encode_dense(self, image):
        """(B, 3, H, W) -> (B, N, E) patch features in the joint space, not normalised (zero-shot segmentation)."""
        return dense_embedding(self, image, self.seg_readout)

    def contrastive(self, image_emb, text_emb):
        """One B×B image-text problem (this rank's rows against all ranks' columns): SILC-C or SILC-S."""
        if self.loss_kind == "softmax":
            loss_i, loss_t = contrastive_loss(image_emb, text_emb, self.logit_scale)
            return (loss_i + loss_t) / 2                                 # L_soft: mean of the two directions
        return sigmoid_loss(image_emb, text_emb, self.logit_scale, self.logit_bias)

    def forward(self, global_crops, text, local_crops=None, unaugmented=None, teacher_probs=None,
                freeze_prototypes=False):
        """One training step's losses. global_crops: (2B, 3, S, S), view 1 then view 2; text: (B, L) ids;
        local_crops: (N·B, 3, s, s), view-major; unaugmented: (B, 3, S, S) for contrastive_on "unaugmented";
        teacher_probs: (2, B, K) the teacher's P_t on the global crops. Returns (loss, metrics)."""
        B = text.shape[0]
        y = F.normalize(self.encode_text(text), dim=-1, eps=1e-8)                 # (B, E)
        e_g = None
        if self.contrastive_on == "both_globals" or self.cross:
            e_g = self.encode_image(global_crops)                                  # (2B, E), not normalised
        if self.contrastive_on == "unaugmented":
            con_views = self.encode_image(unaugmented)[None]                       # (1, B, E)
        elif self.contrastive_on == "first_global":
            con_views = (e_g[:B] if e_g is not None else self.encode_image(global_crops[:B]))[None]  # (1, B, E)
        else:
            con_views = e_g.view(2, B, -1)                                         # (2, B, E)
        x = F.normalize(con_views, dim=-1, eps=1e-8)
        loss_con = sum(self.contrastive(v, y) for v in x) / len(x)             # L_con = ½ (L(x^g1, y) + L(x^g2, y))
        metrics = {"loss_con": loss_con}
        loss = loss_con
        if self.dino_head is not None:
            student = [e_g] if self.cross else []
            if local_crops is not None:
                student.append(self.encode_image(local_crops))                     # (N·B, E), grid interpolated
            logits = self.dino_head(torch.cat(student), freeze_prototypes)         # (V·B, K), globals first
            logits = logits.view(-1, B, logits.shape[-1])                          # (V, B, K)
            loss_sd = dino_loss(logits, teacher_probs, self.tau_s, 2 if self.cross else 0)
            loss = loss + self.lambda_sd * loss_sd                                 # L = L_con + λ·L_sd
            metrics["loss_sd"] = loss_sd
        if self.logit_bias is not None:
            metrics["logit_bias"] = self.logit_bias.detach()
        return loss, metrics


# ----------------------------------------------------------------------------------------------------
# <method> Teacher / EMA
# ----------------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """The EMA teacher: copies of the image tower, its pooling head and the DINO head (no text tower, t or b), and
    the centre c (1, K). It starts equal to the student, gets no gradient and stays in eval mode."""

    def __init__(self, model, *, center_momentum=0.9):
        super().__init__()
        self.pool = model.pool
        self.visual = copy.deepcopy(model.visual)
        self.visual.transformer.grad_checkpointing = False
        for name in ("map_head", "gap_proj", "dino_head"):
            setattr(self, name, copy.deepcopy(getattr(model, name)))
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, model.dino_head.prototypes.shape[0]))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # always in eval mode
        return super().train(False)

    def parts(self):
        return [name for name in ("visual", "map_head", "gap_proj", "dino_head") if getattr(self, name) is not None]

    @torch.no_grad()
    def targets(self, global_crops, tau_t):
        """P_t of the global crops (2B, 3, S, S) -> (2, B, K), centred with the current c; then c is updated from
        these raw logits, summed over ranks."""
        u = self.dino_head(pooled_embedding(self, global_crops)).float()      # (2B, K) raw teacher logits
        probs = teacher_probs(u, self.center, tau_t)
        self.center.copy_(center_update(self.center, u, self.center_momentum))
        return probs.view(2, -1, probs.shape[-1])                               # (2, B, K)

    @torch.no_grad()
    def update(self, model, momentum):
        """θ̄ ← m·θ̄ + (1 - m)·θ for the image tower, the pooling head and the DINO head."""
        for name in self.parts():
            ema_update(getattr(self, name), getattr(model, name), momentum)


def ema_momentum(step, total_steps, base, schedule="const"):
    """m at `step`: constant (SILC), or DINO's cosine from `base` at step 0 to 1 at the end (main_dino.py)."""
    if schedule == "const":
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


def teacher_temperature(step, warmup_steps, start, end):
    """τ_t at `step`: linear from `start` to `end` over warmup_steps, then `end` (DINO's warmup_teacher_temp)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
def resolve_pool(args):
    """--pool auto: CLS + projection for the softmax loss (CLIP), MAP head for the sigmoid loss (SigLIP)."""
    return args.pool if args.pool != "auto" else "cls" if args.loss == "softmax" else "map"


def distilling(args):
    """Whether L_sd has any term: it needs λ > 0 and a student view to distil (a local crop or the cross pairs)."""
    return args.lambda_sd > 0 and (args.n_local > 0 or args.distill_global_cross)


def local_crop_size(args, cfg):
    """--local-size, else DINO's 96/224 of the image size in whole patches, at least a 2×2 grid."""
    if args.local_size:
        return args.local_size
    p = cfg["patch_size"]
    return p * max(2, round(cfg["image_size"] * 96 / 224 / p))


def check_args(args, cfg):
    """One-line errors for flag values that cannot work, raised at start-up."""
    def bad(message):
        raise common.UsageError(message)
    p, size, (lo, hi) = cfg["patch_size"], local_crop_size(args, cfg), args.local_scale
    if size < p or size % p:
        bad(f"--local-size {size} is not a positive multiple of the patch size {p}; give e.g. {2 * p}")
    if lo > hi:
        bad(f"--local-scale {lo} {hi} is not an area range (MIN <= MAX); give e.g. 0.05 0.4")
    if args.seg_readout == "map_value" and resolve_pool(args) != "map":
        bad(f"--seg-readout map_value reads through the MAP head, but --pool is {resolve_pool(args)}; add --pool "
            f"map or use --seg-readout proj")


def build_model(cfg, args):
    """(SILC, its EMA teacher or None when nothing is distilled), after the start-up checks."""
    check_args(args, cfg)
    model = SILC(**cfg, loss=args.loss, pool=resolve_pool(args), t_init=args.t_init, b_init=args.b_init,
                 contrastive_on=args.contrastive_on, distill=distilling(args),
                 distill_global_cross=args.distill_global_cross, lambda_sd=args.lambda_sd,
                 student_temp=args.student_temp, out_dim=args.out_dim, head_hidden=args.head_hidden,
                 head_bottleneck=args.head_bottleneck, seg_readout=args.seg_readout)
    teacher = Teacher(model, center_momentum=args.center_momentum) if model.dino_head is not None else None
    return model, teacher


def train_transform(args, cfg):
    mean, std = common.NORMS[args.norm]
    return MultiCrop(cfg["image_size"], local_crop_size(args, cfg), args.n_local if distilling(args) else 0,
                     (args.crop_scale, 1.0), args.local_scale, mean, std, args.local_photometric,
                     unaugmented=args.contrastive_on == "unaugmented", flip_globals=args.train_data is not None)


def no_weight_decay(name, param):
    """Gains, biases, embeddings, the MAP probe, t and b: no weight decay."""
    return param.ndim < 2 or name in ("token_embedding.weight", "positional_embedding", "visual.positional_embedding",
                                      "map_head.probe")


def train_step(ddp, model, teacher, batch, step, sched, args, device):
    """ddp: the DDP-wrapped (maybe compiled) model; model: the raw one; batch: (views, texts, skipped) from the
    loader, views MultiCrop's, each (B, 3, side, side). Returns (loss, metrics)."""
    views, text, _ = batch
    views, text = common.to_device((views, text), device)
    global_crops = torch.cat(views[:2])                                    # (2B, 3, S, S): view 1, then view 2
    n_local = args.n_local if teacher is not None else 0
    local_crops = torch.cat(views[2:2 + n_local]) if n_local else None     # (N·B, 3, s, s), view-major
    unaugmented = views[-1] if args.contrastive_on == "unaugmented" else None
    inputs = {}
    if teacher is not None:  # the EMA teacher on the global crops, before the one forward of the student
        n = sched.warmup if args.warmup_teacher_temp_steps is None else args.warmup_teacher_temp_steps
        tau_t = teacher_temperature(step, n, args.warmup_teacher_temp, args.teacher_temp)
        frozen = step < args.freeze_last_layer_steps
        if frozen:
            hold_grad(model.dino_head.prototypes)
        inputs = dict(teacher_probs=teacher.targets(global_crops, tau_t), freeze_prototypes=frozen)
    return ddp(global_crops, text, local_crops, unaugmented, **inputs)


def hold_grad(param):
    """DINO's cancel_gradients_last_layer: param.grad = None at the next optimizer step (no decay, no moments) by a
    one-shot pre-hook: DDP gives every parameter a gradient."""
    def hook(*_):
        param.grad = None
        handle.remove()
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(hook)


def after_step(model, teacher, step, sched, args):
    """After each optimizer step: clamp t at 100 (softmax loss) and update the EMA teacher."""
    if model.loss_kind == "softmax":
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # ln(100): CLIP clamps the temperature's inverse at 100
    if teacher is not None:  # constant m by default: SILC keeps the teacher moving
        teacher.update(model, ema_momentum(step, sched.total, args.ema_momentum, args.ema_schedule))


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
    """OpenAI-layout state dicts: 'online', and 'ema' (the EMA image tower with the online text tower). A MAP- or
    GAP-pooled model (no [CLS], no `visual.proj`) is no OpenAI CLIP and exports nothing: eval_towers reads it."""
    if "visual.proj" not in model_sd:
        return {}
    online = {k: v for k, v in model_sd.items() if k.startswith(common.OPENAI_PREFIXES)}
    out = {"online": online}
    if teacher_sd is not None:
        out["ema"] = {**online, **{k: v for k, v in teacher_sd.items() if k.startswith("visual.")}}
    return out


def eval_towers(ckpt):
    """{name: SILC model} of a checkpoint, for eval_zeroshot.py: the online and the EMA weights (EMA image tower
    and pooling, online text tower), with encode_image, encode_text and encode_dense, for every --pool."""
    args = argparse.Namespace(**ckpt["args"])
    weights = {"online": ckpt["model"]}
    if ckpt.get("teacher") is not None:
        weights["ema"] = {**ckpt["model"], **{k: v for k, v in ckpt["teacher"].items() if k != "center"}}
    towers = {}
    for name, sd in weights.items():
        towers[name] = build_model(ckpt["config"], args)[0]
        common.load_strict(towers[name], sd, f"the {name} weights of a {METHOD} checkpoint", f"this {METHOD} model")
        towers[name].eval()
    return towers


@torch.no_grad()
def evaluate(model, teacher, args, device):
    """Zero-shot top-1/top-5 of the online and the EMA towers on the held-out set and, on the built-in data,
    their zero-shot segmentation colour mIoU on 512 held-out images (common.shapes_segmentation_scores)."""
    towers = {"online": model}
    if teacher is not None:
        towers["ema"] = teacher
    size, patch = model.visual.grid * model.visual.patch_size, model.visual.patch_size
    classifier, loader = common.zero_shot_setup(
        model.encode_text, image_size=size, norm=args.norm, imagenet_val=args.imagenet_val,
        context_length=args.context_length, workers=args.workers, device=device)
    results = {}
    encoders = {name: (lambda x, t=tower: pooled_embedding(t, x), classifier) for name, tower in towers.items()}
    for name, (top1, top5) in common.zero_shot_accuracy(encoders, loader, device).items():
        results[f"{name}/top1"], results[f"{name}/top5"] = top1, top5
    if args.train_data is None:
        seg_classifier = common.shapes_segmentation_classifier(model.encode_text, args.context_length, device,
                                                               None if args.imagenet_val else classifier)
        for name, tower in towers.items():
            results[f"{name}/colour_miou"] = common.shapes_segmentation(   # at 64 px, as eval_zeroshot.py
                lambda x, t=tower: dense_embedding(t, x, args.seg_readout), seg_classifier, image_size=size,
                patch_size=patch, norm=args.norm, device=device, seg_size=max(64, size), scores=True)["seg_colour_mIoU"]
    return results


if __name__ == "__main__":
    main()
