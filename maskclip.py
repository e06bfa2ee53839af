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

Differs from the CLIP baseline in the sections "Model", "Masking", "Losses", "Teacher" and "Training
step". `--dist-weight 0 --mlm-weight 0` turns this file into the plain CLIP baseline that the other
methods and benchmark.py compare against.

Project choices where the paper is silent (spec: shared/specs/maskclip.md, "Decisions"):
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
    RandomResizedCrop scale (0.5, 1), ImageNet normalisation), bf16 autocast instead of fp16;
  - the contrastive all-gather carries the gradient (SLIP's does not), so G GPUs give the gradients of
    one GPU on the whole batch.

Run:
    torchrun maskclip.py                                   # built-in demo, CPU, a few minutes
    torchrun --nproc_per_node=8 maskclip.py --train-data 'cc3m/{00000..00331}.tar' --train-num-samples 2800000
    torchrun --nproc_per_node=8 maskclip.py --train-data yfcc15m.csv --dist-weight 0 --mlm-weight 0   # CLIP

Left out: gradient accumulation (it would change the negatives of the contrastive loss), the downstream
fine-tuning, detection and segmentation recipes, and the 80/10/10 default (it is a flag).
"""
import argparse
import contextlib
import copy
import json
import math
import os
import pickle
import platform
import random
import signal
import subprocess
import sys
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

METHOD = "maskclip"
DATA_KIND = "image-text"  # what the training data must provide: image-text pairs, or images alone

# ----------------------------------------------------------------------------------------------------
# <shared> Model sizes
# ----------------------------------------------------------------------------------------------------
# Image tower: image size, patch, width, layers, heads. Text tower: context, width, layers, heads.
# embed_dim: the joint embedding. Every head is 64 wide except ViT-H's image heads (80), as in open_clip.
MODELS = {
    "tiny": dict(image_size=32, patch_size=8, width=128, layers=4, heads=2,
                 context_length=24, text_width=128, text_layers=2, text_heads=2, embed_dim=128),
    "ViT-S/16": dict(image_size=224, patch_size=16, width=384, layers=12, heads=6,
                     context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-B/16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12,
                     context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-B/32": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12,
                     context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-L/14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16,
                     context_length=77, text_width=768, text_layers=12, text_heads=12, embed_dim=768),
    "ViT-L/16": dict(image_size=224, patch_size=16, width=1024, layers=24, heads=16,
                     context_length=77, text_width=768, text_layers=12, text_heads=12, embed_dim=768),
    "ViT-H/14": dict(image_size=224, patch_size=14, width=1280, layers=32, heads=16,
                     context_length=77, text_width=1024, text_layers=24, text_heads=16, embed_dim=1024),
}

# ----------------------------------------------------------------------------------------------------
# <method> Arguments
# ----------------------------------------------------------------------------------------------------
# The paper's recipe: the defaults whenever --train-data is given (ViT-B/16, YFCC-15M, 25 epochs).
RECIPE = dict(model="ViT-B/16", batch_size=4096, epochs=25, lr=5e-4, lr_start=1e-6, lr_end=1e-5,
              warmup_epochs=1.0, act="quickgelu", wd=0.5, beta1=0.9, beta2=0.98, eps=1e-8, grad_clip=0.0, norm="imagenet",
              crop_scale=0.5, eval_every=1.0, workers=8, quant_k=8192, dec_width=768, dec_heads=12, text_dec_depth=4,
              ema_momentum=0.999)
# The built-in demo: what runs when --train-data is not given (tiny model, shapes rendered on the fly).
DEMO = dict(model="tiny", batch_size=128, epochs=3, lr=1e-3, lr_start=1e-6, lr_end=1e-5, warmup_epochs=0.5,
            wd=0.1, crop_scale=0.9, builtin_samples=16384, eval_every=0.0, workers=1, quant_k=32, dec_width=128,
            dec_heads=2, text_dec_depth=1, ema_momentum=0.99)


def add_method_args(p):
    g = p.add_argument_group("MaskCLIP")
    g.add_argument("--dist-weight", type=float, default=0.05, help="λ, weight of L_Dist (paper 0.05; 0 = off)")
    g.add_argument("--mlm-weight", type=float, default=0.05, help="β, weight of L_MLM (paper 0.05; 0 = off)")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches masked for the student")
    g.add_argument("--masked-encoding", default="visible", choices=["visible", "mask-token"],
                   help="visible: the student encodes the visible patches only (MAE); mask-token: all patches, "
                        "masked ones replaced by a learned token (BEiT)")
    g.add_argument("--dec-depth", type=int, default=1, help="image decoder blocks")
    g.add_argument("--dec-width", type=int, help="image decoder width (paper recipe 768)")
    g.add_argument("--dec-heads", type=int, help="image decoder heads (paper recipe 12)")
    g.add_argument("--quant-k", type=int, help="number of codewords K of the online quantizer (paper recipe 8192)")
    g.add_argument("--tau-s", type=float, default=0.1, help="student softmax temperature")
    g.add_argument("--tau-t", type=float, default=0.04, help="teacher softmax temperature")
    g.add_argument("--quant-center", action="store_true",
                   help="iBOT-style teacher centring: c ← 0.9·c + 0.1·mean(teacher logits), subtracted before softmax")
    g.add_argument("--quant-mlp", action="store_true",
                   help="iBOT's 3-layer MLP (hidden 2048, bottleneck 256) before the codewords")
    g.add_argument("--ema-momentum", type=float, help="constant EMA momentum α of the teacher (paper recipe 0.999)")
    g.add_argument("--mlm-ratio", type=float, default=0.2, help="fraction of caption word tokens masked")
    g.add_argument("--mlm-80-10-10", action="store_true",
                   help="BERT's rule: 80%% [MASK], 10%% random token, 10%% unchanged (default: all [MASK])")
    g.add_argument("--text-dec-depth", type=int, help="MLM text decoder blocks (paper recipe 4; 0 = predict "
                                                       "from the text encoder's output)")
    g.add_argument("--mlm-bidir-encoder", action="store_true",
                   help="run the text encoder without its causal mask in the MLM pass")
    g.add_argument("--tie-vocab", action="store_true", help="tie the MLM vocabulary head to the token embedding")


# ----------------------------------------------------------------------------------------------------
# <shared> Arguments
# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    """Flat arguments. Flags whose default is None take the paper's recipe (RECIPE) when --train-data is
    given, and the built-in demo's values (DEMO) otherwise; an explicit flag always wins."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train-data", help="image-text CSV/TSV, tar shards ('dir/{00000..00099}.tar', several "
                                        "sources joined by '::') or an ImageFolder; default: the built-in shapes")
    g.add_argument("--train-num-samples", type=int, help="samples per epoch of tar shards (required for tar)")
    g.add_argument("--dataset-resampled", action="store_true", help="draw tar shards with replacement")
    g.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths")
    g.add_argument("--csv-caption-key", default="title", help="CSV column of captions")
    g.add_argument("--csv-separator", default="\t", help="CSV separator")
    g.add_argument("--builtin-samples", type=int, help="samples per epoch of the built-in data")
    g.add_argument("--imagenet-val", help="ImageNet-style val folder for the periodic evaluation "
                                          "(default: the built-in held-out set)")
    g.add_argument("--workers", type=int, help="data-loading processes per rank")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(MODELS), help="model size")
    g.add_argument("--act", choices=["quickgelu", "gelu"], help="MLP activation")
    g.add_argument("--context-length", type=int, help="text tokens (default: the model size's)")
    g.add_argument("--norm", choices=list(common.NORMS), help="pixel normalisation constants")
    g.add_argument("--crop-scale", type=float, help="smallest area fraction of the random training crop")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="epochs")
    g.add_argument("--steps", type=int, help="stop after this many steps in all (default: epochs × steps per epoch)")
    g.add_argument("--batch-size", type=int, help="global batch over all ranks")
    g.add_argument("--lr", type=float, help="peak learning rate (for the global batch, no scaling)")
    g.add_argument("--lr-start", type=float, help="learning rate at the start of the linear warm-up")
    g.add_argument("--lr-end", type=float, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length, per step")
    g.add_argument("--wd", type=float, help="AdamW weight decay")
    g.add_argument("--beta1", type=float, help="AdamW β1")
    g.add_argument("--beta2", type=float, help="AdamW β2")
    g.add_argument("--eps", type=float, help="AdamW ε")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0 = off)")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default=f"runs/{METHOD}", help="output folder: checkpoint, exports, logs")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast precision (default: bf16 on CUDA, fp32 on CPU); fp16 uses a GradScaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass")
    g.add_argument("--log-every", type=int, default=20, help="steps between log lines (and host syncs)")
    g.add_argument("--eval-every", type=float, help="epochs between evaluations (0 = only at the end)")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (and at the end)")
    add_method_args(p)
    args = p.parse_args(argv)
    for key, value in (RECIPE if args.train_data else {**RECIPE, **DEMO}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.context_length is None:
        args.context_length = MODELS[args.model]["context_length"]
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


# ----------------------------------------------------------------------------------------------------
# <shared> Distributed set-up
# ----------------------------------------------------------------------------------------------------
def setup_distributed(device):
    """One process group in every case: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR are
    set, one or many nodes) and as plain `python script.py` (a world of one). Collectives then need no
    `if distributed` branches. gloo on CPU, nccl on CUDA. Returns (rank, world size, device)."""
    rank, world, local = (int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    world = max(world, 1)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise common.UsageError("--device cuda was asked for but no GPU is visible; pass --device cpu")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), dev


def is_main():
    return dist.get_rank() == 0


def print0(*args):
    """print on the global rank 0 only (builtins.print is left alone)."""
    if is_main():
        tqdm.write(" ".join(str(a) for a in args))


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
    return x if dist.get_world_size() == 1 else _AllGatherWithGrad.apply(x)


# ----------------------------------------------------------------------------------------------------
# <shared> Transformer
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

    def forward(self, x, causal=False, cls_attention=False):
        """x: (B, N, D) -> (B, N, D). With cls_attention=True also returns every block's [CLS] attention
        row, averaged over heads: (layers, B, N)."""
        maps = []
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, cls_attention, use_reentrant=False)
            else:
                x = block(x, causal, cls_attention)
            if cls_attention:
                x, row = x
                maps.append(row)
        return (x, torch.stack(maps)) if cls_attention else x


# ----------------------------------------------------------------------------------------------------
# <shared> Towers
# ----------------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """ViT with OpenAI CLIP's parameter names. Returns every token, so that teachers and decoders get the
    patch features, not only the pooled [CLS]."""

    def __init__(self, image_size, patch_size, width, layers, heads, output_dim, act):
        super().__init__()
        self.patch_size, self.grid = patch_size, image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def pos_embed(self, gh, gw):
        """Position embedding for a gh × gw grid, [CLS] row first: (1 + gh·gw, D). Bicubically interpolated
        when the grid differs from the one the model was built for (other input sizes)."""
        if (gh, gw) == (self.grid, self.grid):
            return self.positional_embedding
        cls, patches = self.positional_embedding[:1], self.positional_embedding[1:]
        patches = patches.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)      # (1, D, g, g)
        patches = F.interpolate(patches.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.to(cls.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)])  # (1+gh·gw, D)

    def forward(self, x, keep=None, cls_attention=False):
        """x: (B, 3, H, W); keep: (B, K) indices of the patches to encode, or None for all. Each kept patch
        carries its own position embedding. Returns the last block's tokens, before ln_post, [CLS]
        first: (B, 1+K, D) (and the [CLS] attention maps with cls_attention=True, see Transformer)."""
        x = self.conv1(x)                                          # (B, D, gh, gw)
        B, D, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)                           # (B, N, D)
        pos = self.pos_embed(gh, gw).to(x.dtype)
        x = x + pos[1:]
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, D))     # (B, K, D)
        cls = (self.class_embedding + pos[0]).to(x.dtype).expand(B, 1, D)
        x = self.ln_pre(torch.cat([cls, x], dim=1))                # (B, 1+K, D)
        return self.transformer(x, cls_attention=cls_attention)


class CLIP(nn.Module):
    """Image and text towers with the parameter names of OpenAI's CLIP state dict (`visual.conv1`,
    `visual.transformer.resblocks.N.attn.in_proj_weight`, `token_embedding`, `ln_final`, `text_projection`,
    `logit_scale`, ...), so that OpenAI and open_clip ViT checkpoints load with strict checks."""

    def __init__(self, image_size, patch_size, width, layers, heads, context_length, text_width, text_layers,
                 text_heads, embed_dim, act="quickgelu", vocab_size=common.VOCAB_SIZE):
        super().__init__()
        self.visual = VisionTransformer(image_size, patch_size, width, layers, heads, embed_dim, act)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
        self.transformer = Transformer(text_width, text_layers, text_heads, act)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.empty(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # s = exp(logit_scale) starts at 1/0.07
        self.init_parameters()

    def init_parameters(self):
        """OpenAI's (and SLIP's) initialisation, applied to both towers."""
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


# ----------------------------------------------------------------------------------------------------
# <shared> Contrastive loss
# ----------------------------------------------------------------------------------------------------
def contrastive_loss(image_emb, text_emb, logit_scale):
    """CLIP's InfoNCE over all ranks. image_emb, text_emb: (B, E) L2-normalised, this rank's pairs;
    logit_scale: the log of the temperature's inverse s. Each rank builds B × (world·B) logits (local
    loss, gather with gradient); labels are rank·B + arange(B). Returns the two directions (L_I, L_T),
    each a mean over this rank's B rows."""
    all_image, all_text = all_gather_with_grad(image_emb), all_gather_with_grad(text_emb)   # (world·B, E)
    s = logit_scale.exp()
    labels = dist.get_rank() * image_emb.shape[0] + torch.arange(image_emb.shape[0], device=image_emb.device)
    loss_i = F.cross_entropy(s * image_emb @ all_text.t(), labels)    # image -> text, (B, world·B) logits
    loss_t = F.cross_entropy(s * text_emb @ all_image.t(), labels)    # text -> image
    return loss_i, loss_t


# ----------------------------------------------------------------------------------------------------
# <method> Model
# ----------------------------------------------------------------------------------------------------
def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding (MAE), with an all-zero [CLS] row first: (1 + grid², dim)."""
    assert dim % 4 == 0, "the sin-cos embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))   # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out_x, out_y = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega                 # (grid², dim/4)
    emb = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)         # (grid², dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


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
    (L_MLM). A branch whose weight is 0 is not built, so `--dist-weight 0 --mlm-weight 0` is exactly CLIP."""

    def __init__(self, cfg, args):
        super().__init__(**cfg)
        width, self.grid = cfg["width"], cfg["image_size"] // cfg["patch_size"]
        self.dist_weight, self.mlm_weight = args.dist_weight, args.mlm_weight
        self.tau_s, self.masked_encoding = args.tau_s, args.masked_encoding
        if args.dist_weight > 0:
            if args.masked_encoding == "mask-token":  # BEiT-style: the encoder sees every position
                self.encoder_mask_token = nn.Parameter(torch.zeros(width))
                nn.init.normal_(self.encoder_mask_token, std=0.02)
            self.decoder_embed = nn.Linear(width, args.dec_width)
            self.mask_token = nn.Parameter(torch.zeros(args.dec_width))
            nn.init.normal_(self.mask_token, std=0.02)
            self.register_buffer("decoder_pos", sincos_2d(self.grid, args.dec_width), persistent=False)
            self.decoder = Transformer(args.dec_width, args.dec_depth, args.dec_heads, cfg["act"])
            init_transformer(self.decoder)
            self.decoder_norm = nn.LayerNorm(args.dec_width)
            self.decoder_pred = nn.Linear(args.dec_width, width) if args.dec_width != width else nn.Identity()
            self.quantizer = Quantizer(width, args.quant_k, args.quant_mlp)
        if args.mlm_weight > 0:
            text_width = cfg["text_width"]
            self.mlm_mask_embedding = nn.Parameter(torch.randn(text_width) * 0.02)  # the [MASK] token, id 49408
            self.mlm_bidir_encoder = args.mlm_bidir_encoder
            self.text_decoder = Transformer(text_width, args.text_dec_depth, cfg["text_heads"], cfg["act"])
            init_transformer(self.text_decoder)
            self.text_decoder_norm = nn.LayerNorm(text_width)
            self.vocab_head = None if args.tie_vocab else nn.Linear(text_width, common.VOCAB_SIZE)
            self.vocab_bias = nn.Parameter(torch.zeros(common.VOCAB_SIZE)) if args.tie_vocab else None

    def forward(self, image, text, keep=None, teacher_probs=None, mlm_input=None, mlm_positions=None,
                mlm_targets=None):
        """One training step's losses. image: (B, 3, H, W); text: (B, L) ids; keep: (B, K) visible patches;
        teacher_probs: (B, N_m, K) teacher soft codewords at the masked patches; mlm_input: (B, L) ids with
        -1 at [MASK]; mlm_positions / mlm_targets: (T,) flat positions and ids of the masked tokens.
        Returns (loss, metrics)."""
        # (a) contrastive loss on the full image and the full caption
        image_emb = F.normalize(self.encode_image(image), dim=-1)
        text_emb = F.normalize(self.encode_text(text), dim=-1)
        loss_i, loss_t = contrastive_loss(image_emb, text_emb, self.logit_scale)
        loss = loss_i + loss_t                                            # Eq. 8: L_I + L_T, summed
        metrics = {"loss_i2t": loss_i, "loss_t2i": loss_t}
        if self.dist_weight > 0:
            loss_dist = distillation_loss(self.predict_masked(image, keep), teacher_probs, self.tau_s)
            loss = loss + self.dist_weight * loss_dist                    # Eq. 8: + λ·L_Dist
            metrics["loss_dist"] = loss_dist
        if self.mlm_weight > 0:
            loss_mlm = mlm_loss(self.mlm_logits(mlm_input, mlm_positions), mlm_targets)
            loss = loss + self.mlm_weight * loss_mlm                      # Eq. 8: + β·L_MLM
            metrics["loss_mlm"] = loss_mlm
        return loss, metrics

    def predict_masked(self, image, keep):
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
        masked = masked_indices(keep, N)                                    # (B, N_m)
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


def build_model(cfg, args):
    return MaskCLIP(cfg, args)


# ----------------------------------------------------------------------------------------------------
# <method> Masking
# ----------------------------------------------------------------------------------------------------
def random_masking(batch, num_patches, mask_ratio, device):
    """MAE's random masking, independently per sample. Returns `keep`: (B, K) indices of the visible
    patches, K = int(N·(1 - mask_ratio)), in random order. The masked patches are the others."""
    noise = torch.rand(batch, num_patches, device=device)
    return noise.argsort(dim=1)[:, : int(num_patches * (1 - mask_ratio))]


def masked_indices(keep, num_patches):
    """(B, K) visible indices -> (B, N - K) masked indices, in increasing order."""
    B = keep.shape[0]
    visible = torch.zeros(B, num_patches, dtype=torch.bool, device=keep.device).scatter(1, keep, True)
    order = visible.to(torch.int8).argsort(dim=1, stable=True)              # masked (False) positions first
    return order[:, : num_patches - keep.shape[1]]


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
    """L_Dist = -1/|M| Σ_{k∈M} h̄(f̄_k)ᵀ log h(f″_k): cross-entropy between the teacher's soft codewords
    and the student's, averaged over the masked patches only. student_logits: (B, N_m, K) cosine logits;
    teacher_probs: (B, N_m, K), rows summing to 1."""
    log_p = F.log_softmax(student_logits.float() / tau_s, dim=-1)
    return -(teacher_probs * log_p).sum(-1).mean()


def mlm_loss(logits, targets):
    """L_MLM: cross-entropy of the vocabulary logits (T, V) against the original ids (T,) of the masked
    tokens, averaged over the masked tokens of the global batch. The count is summed over ranks, and the
    local sum scaled by the world size, so that the ranks' losses, averaged as DDP averages gradients,
    equal the loss of one process on the whole batch."""
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = torch.full((), float(targets.numel()), device=logits.device)  # a fill: no host-to-device copy, no sync
    dist.all_reduce(count)
    return total * dist.get_world_size() / count.clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# <method> Teacher / EMA
# ----------------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """The mean teacher: EMA copies of the image encoder Ē_I and the quantizer h̄, and the optional
    iBOT centre. It starts as an exact copy, gets no gradient and stays in eval mode."""

    def __init__(self, model, args):
        super().__init__()
        self.visual = copy.deepcopy(model.visual)
        self.quantizer = copy.deepcopy(model.quantizer)
        self.visual.transformer.grad_checkpointing = False
        self.tau_t, self.center_on = args.tau_t, args.quant_center
        self.register_buffer("center", torch.zeros(args.quant_k))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # always in eval mode
        return super().train(False)

    @torch.no_grad()
    def targets(self, image, keep):
        """Soft codewords h̄(f̄) of the full image at the masked patches: (B, N_m, K)."""
        f = self.visual.ln_post(self.visual(image))[:, 1:]                 # (B, N, D), full image
        logits = self.quantizer(f).float()                                  # (B, N, K)
        if self.center_on:
            probs = F.softmax((logits - self.center) / self.tau_t, dim=-1)
            batch_mean = logits.mean(dim=(0, 1))
            dist.all_reduce(batch_mean)
            self.center.mul_(0.9).add_(0.1 * batch_mean / dist.get_world_size())
        else:
            probs = F.softmax(logits / self.tau_t, dim=-1)
        masked = masked_indices(keep, f.shape[1])
        return probs.gather(1, masked[..., None].expand(-1, -1, probs.shape[-1]))  # (B, N_m, K)

    @torch.no_grad()
    def update(self, model, momentum):
        """θ̄ ← α·θ̄ + (1-α)·θ for the image encoder and the quantizer."""
        ema_update(self.visual, model.visual, momentum)
        ema_update(self.quantizer, model.quantizer, momentum)


def build_teacher(model, args):
    return Teacher(model, args) if args.dist_weight > 0 else None


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
def train_transform(args, cfg):
    mean, std = common.NORMS[args.norm]
    return common.TrainCrop(cfg["image_size"], (args.crop_scale, 1.0), mean, std)


def no_weight_decay(name, param):
    """Gains, biases, embeddings and the temperature: no weight decay."""
    return param.ndim < 2 or name in ("token_embedding.weight", "positional_embedding", "visual.positional_embedding")


def train_step(forward, model, teacher, batch, step, total_steps, args, device):
    """forward: the DDP-wrapped (and maybe compiled) model; model: the raw module; batch: (images, texts,
    skipped) as the loader gave it, on the host. Returns (loss, metrics)."""
    image, text, _ = batch
    inputs = {}
    if args.mlm_weight > 0:  # on the host: the number of masked tokens is then known without a sync
        mlm_input, positions, targets = to_device(mlm_masking(text, args.mlm_ratio, args.mlm_80_10_10), device)
        inputs.update(mlm_input=mlm_input, mlm_positions=positions, mlm_targets=targets)
    image, text = to_device((image, text), device)
    if args.dist_weight > 0:
        keep = random_masking(image.shape[0], model.grid ** 2, args.mask_ratio, device)
        inputs.update(keep=keep, teacher_probs=teacher.targets(image, keep))
    return forward(image, text, **inputs)


def after_step(model, teacher, step, total_steps, args):
    """After each optimizer step: clamp the temperature at 100 and update the EMA teacher."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))  # ln(100): CLIP clamps the temperature's inverse at 100
    if teacher is not None:
        teacher.update(model, args.ema_momentum)    # constant α: spec §2.3


# ----------------------------------------------------------------------------------------------------
# <method> Evaluation and export
# ----------------------------------------------------------------------------------------------------
def export_state_dicts(model_sd, teacher_sd):
    """OpenAI-layout state dicts of the weights to evaluate: 'online', and 'ema' (the EMA image encoder
    with the online projection and text tower, spec "Evaluation weights")."""
    online = {k: v for k, v in model_sd.items() if k.startswith(OPENAI_PREFIXES)}
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
        load_strict(towers[name], sd, f"the {name} weights of a {METHOD} checkpoint", "a CLIP ViT")
    return towers


@torch.no_grad()
def evaluate(model, teacher, args, device):
    """Zero-shot top-1/top-5 of the online and the EMA weights on the held-out set."""
    towers = {"online": model.visual}
    if teacher is not None:
        towers["ema"] = teacher.visual
    text_encoder = model.encode_text
    results = {}
    classifier, loader = zero_shot_setup(text_encoder, args, device)
    for name, visual in towers.items():
        def encode_image(x, visual=visual):
            return visual.ln_post(visual(x)[:, 0]) @ model.visual.proj
        top1, top5 = zero_shot_accuracy(encode_image, classifier, loader, device)
        results[f"{name}/top1"], results[f"{name}/top5"] = top1, top5
    return results


# ----------------------------------------------------------------------------------------------------
# <shared> Evaluation helpers
# ----------------------------------------------------------------------------------------------------
def eval_dataset(args, cfg, target="label"):
    """The held-out set: --imagenet-val if given, else the built-in shapes' held-out split."""
    mean, std = common.NORMS[args.norm]
    transform = common.EvalTransform(cfg["image_size"], mean, std)
    if args.imagenet_val:
        return common.ImageFolder(args.imagenet_val, transform), common.IMAGENET_CLASSNAMES, \
            common.OPENAI_IMAGENET_TEMPLATES
    ds = common.Shapes("val", length=2048, transform=transform, target=target)
    return ds, ds.classnames, ds.templates


def zero_shot_setup(encode_text, args, device):
    cfg = model_config(args)
    dataset, classnames, templates = eval_dataset(args, cfg)
    if len(classnames) != len(getattr(dataset, "classes", classnames)):
        raise common.UsageError(f"{args.imagenet_val} has {len(dataset.classes)} class folders but there are "
                                f"{len(classnames)} class names; point --imagenet-val at a 1000-class val folder")
    classifier = zero_shot_classifier(encode_text, classnames, templates, args.context_length, device)
    loader = common.eval_loader(dataset, 256, dist.get_rank(), dist.get_world_size(), args.workers)
    return classifier, loader


@torch.no_grad()
def zero_shot_classifier(encode_text, classnames, templates, context_length, device):
    """(C, E) class embeddings: for each class, normalise each template's text embedding, average over the
    templates, renormalise (OpenAI's protocol)."""
    weights = []
    for name in classnames:
        tokens = common.tokenize([t.format(name) for t in templates], context_length).to(device)
        emb = F.normalize(encode_text(tokens).float(), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=0))
    return torch.stack(weights)


@torch.no_grad()
def zero_shot_accuracy(encode_image, classifier, loader, device):
    """Top-1 and top-5 accuracy (%) over an evaluation set split across ranks; counts are all-reduced."""
    counts = torch.zeros(3, device=device)  # correct@1, correct@5, total
    for images, labels, _ in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
            logits = F.normalize(encode_image(images).float(), dim=-1) @ classifier.t()
        top5 = logits.topk(min(5, logits.shape[1]), dim=-1).indices
        counts += torch.stack([(top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(-1).sum(),
                               torch.tensor(labels.numel(), device=device)]).float()
    dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


@torch.no_grad()
def extract_features(encode, loader, device):
    """Features and labels of an evaluation set split across ranks, gathered on every rank: (n, D), (n,)."""
    feats, labels = [], []
    for images, y, _ in loader:
        with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
            feats.append(encode(images.to(device)).float())
        labels.append(y.to(device))
    return gather_uneven(torch.cat(feats)), gather_uneven(torch.cat(labels))


def gather_uneven(x):
    """all_gather for tensors whose first dimension differs between ranks (no gradient)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = max(int(s) for s in sizes)
    padded = torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=20, temperature=0.07):
    """DINO's weighted k-NN: cosine similarity, the k nearest training features vote for their class with
    weight exp(sim / T). Returns top-1 (%)."""
    train_feats, test_feats = F.normalize(train_feats, dim=-1), F.normalize(test_feats, dim=-1)
    correct = 0
    for i in range(0, test_feats.shape[0], 256):
        sim = test_feats[i:i + 256] @ train_feats.t()                        # (b, n_train)
        top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=-1)            # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(-1) == test_labels[i:i + 256]).sum().item()
    return 100 * correct / test_feats.shape[0]


# ----------------------------------------------------------------------------------------------------
# <shared> Optimisation
# ----------------------------------------------------------------------------------------------------
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


def backward_and_step(loss, model, optimizer, scaler, grad_clip):
    """The backward pass and optimiser step of one training step: gradients (scaled for fp16), clipping of
    the global gradient norm when grad_clip > 0, AdamW, the fp16 scaler's update."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def to_device(batch, device):
    """Tensors, possibly nested in tuples or lists, to the device (asynchronously from pinned memory)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(x, device) for x in batch)


def autocast(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ----------------------------------------------------------------------------------------------------
# <shared> Checkpoints and weights
# ----------------------------------------------------------------------------------------------------
OPENAI_PREFIXES = ("visual.", "token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                   "text_projection", "logit_scale")
ACCEPTED = ("a checkpoint.pt or export written by maskclip.py, aclip.py or silc.py, an OpenAI CLIP "
            "TorchScript archive, or an OpenAI/open_clip ViT state dict")


def model_config(args):
    cfg = dict(MODELS[args.model], act=args.act, context_length=args.context_length)
    return cfg


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    """This process's random states as tensors and plain lists (loadable with weights_only=True)."""
    v, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": [v, list(state), gauss]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def save_checkpoint(path, model, teacher, optimizer, scaler, step, args, cfg):
    """Everything needed to continue exactly: weights (of the unwrapped model), EMA teacher, optimizer,
    grad scaler, step (which fixes the data position), every rank's RNG states, arguments and config.
    Only tensors and plain Python types, so that it loads with torch.load(weights_only=True)."""
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())  # between our own processes
    if not is_main():
        return
    save_atomic({"method": METHOD, "config": cfg, "args": plain(vars(args)), "step": step,
                 "model": model.state_dict(), "teacher": teacher.state_dict() if trained(teacher) else None,
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "rng": states, "world_size": dist.get_world_size()}, path)


def trained(teacher):
    """An EMA teacher changes during training and is saved; a frozen one (`frozen = True`, a CLIP loaded
    from --teacher) is read from its file again on resume."""
    return teacher is not None and not getattr(teacher, "frozen", False)


def plain(obj):
    """Arguments as plain JSON-able types (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


def load_checkpoint(path):
    """Our checkpoint, read with weights_only=True (no code runs). A bad file is a one-line UsageError."""
    ckpt = read_weights_file(path)
    if not (isinstance(ckpt, dict) and "model" in ckpt and "method" in ckpt):
        raise common.UsageError(f"{path} is not a training checkpoint of this project; expected {ACCEPTED}")
    return ckpt


def read_weights_file(path):
    """torch.load(weights_only=True) for pickled checkpoints; OpenAI's TorchScript archives are read for
    their tensors only by read_torchscript_tensors (no TorchScript code is compiled or run)."""
    if not os.path.isfile(path):
        raise common.UsageError(f"{path} does not exist; expected {ACCEPTED}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("/code/") or "/code/" in n for n in z.namelist()):
                return read_torchscript_tensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, a pickle of arbitrary objects, not a torch file at all
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise common.UsageError(f"{path} is not a readable checkpoint ({reason}); expected {ACCEPTED}") from None


STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


class _ScriptObject:
    """Stands in for every TorchScript module class while unpickling: keeps the attributes, runs nothing."""
    state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def read_torchscript_tensors(path):
    """The parameters and buffers of a TorchScript archive (OpenAI's CLIP .pt files) as a flat state dict.
    Only `data.pkl` is unpickled, by an unpickler that resolves nothing but tensor rebuilding and stands
    in a plain object for every module class; the archive's code/ folder is never read or executed."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        root = names[0].split("/")[0]
        data_pkl = next((n for n in names if n == f"{root}/data.pkl"), None)
        if data_pkl is None:
            raise common.UsageError(f"{path} is a zip without data.pkl; expected {ACCEPTED}")

        def storage(key, dtype):
            raw = bytearray(z.read(f"{root}/data/{key}"))
            return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if module.startswith("__torch__"):
                    return _ScriptObject
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor
                if (module, name) == ("torch._utils", "_rebuild_parameter"):
                    return lambda data, *unused: data
                if (module, name) == ("collections", "OrderedDict"):
                    return dict
                if module == "torch" and name in STORAGE_DTYPES:
                    return STORAGE_DTYPES[name]
                if module == "torch.jit._pickle" and (name == "restore_type_tag" or name.startswith("build_")):
                    return lambda value, *unused: value  # type tags and list wrappers: plain data
                raise pickle.UnpicklingError(f"refusing {module}.{name}")

            def persistent_load(self, pid):  # ('storage', dtype from find_class, key, location, numel)
                return storage(pid[2], pid[1])

        try:
            obj = Unpickler(z.open(data_pkl)).load()
        except Exception as e:
            raise common.UsageError(f"{path}: cannot read its tensors ({e}); expected {ACCEPTED}") from None
    out = {}

    def walk(o, prefix):
        for k, v in (o.state if isinstance(o, _ScriptObject) else {}).items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v
            elif isinstance(v, _ScriptObject):
                walk(v, prefix + k + ".")
    walk(obj, "")
    return out


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return torch.as_strided(storage, size, stride, offset).clone()


def openai_state_dict(path):
    """An OpenAI-layout CLIP state dict from any accepted file, plus whatever the file says about itself
    (architecture, activation, normalisation). Returns (state_dict, info)."""
    obj = read_weights_file(path)
    info = {}
    if isinstance(obj, dict) and "model" in obj and "method" in obj:        # our training checkpoint
        info = {"config": obj["config"], "method": obj["method"], "norm": obj["args"].get("norm")}
        obj = {k: v for k, v in obj["model"].items() if k.startswith(OPENAI_PREFIXES)}
    elif isinstance(obj, dict) and "state_dict" in obj:                     # our export, or open_clip's
        info = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise common.UsageError(f"{path} holds no state dict of tensors; expected {ACCEPTED}")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    for extra in ("input_resolution", "context_length", "vocab_size"):      # entries of OpenAI's archives
        sd.pop(extra, None)
    sd = {k: v for k, v in sd.items() if k.split(".")[-1] != "attn_mask"}   # causal masks saved by TorchScript
    if "visual.conv1.weight" not in sd:
        raise common.UsageError(f"{path} has no CLIP ViT image tower (no visual.conv1.weight); expected {ACCEPTED}")
    return sd, info


def clip_config_from_state_dict(sd, act="quickgelu"):
    """The architecture, read off the tensor shapes as OpenAI's build_model does. Heads are width / 64
    (width / 80 for a 1280-wide ViT-H image tower, as in open_clip)."""
    def count(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    cfg = dict(image_size=grid * patch, patch_size=patch, width=width, layers=count("visual.transformer.resblocks"),
               heads=width // (80 if width == 1280 else 64), act=act)
    if "token_embedding.weight" in sd:
        text_width = sd["ln_final.weight"].shape[0]
        cfg.update(context_length=sd["positional_embedding"].shape[0], text_width=text_width,
                   text_layers=count("transformer.resblocks"), text_heads=text_width // 64,
                   embed_dim=sd["text_projection"].shape[1])
    return cfg


def load_clip(path, act=None, device="cpu"):
    """A CLIP (or, for an image-only file, its VisionTransformer) from any accepted file, with strict key
    and shape checks. Returns (module, info)."""
    sd, info = openai_state_dict(path)
    cfg = info.get("config") or clip_config_from_state_dict(sd, act or info.get("act", "quickgelu"))
    cfg = dict(cfg, act=act or cfg.get("act", "quickgelu"))
    if "token_embedding.weight" in sd:
        model = CLIP(**cfg)
    else:
        model = nn.Module()
        model.visual = VisionTransformer(cfg["image_size"], cfg["patch_size"], cfg["width"], cfg["layers"],
                                         cfg["heads"], sd["visual.proj"].shape[1], cfg["act"])
    load_strict(model, sd, path, "a CLIP ViT")
    return model.to(device).eval(), dict(info, config=cfg)


def load_strict(module, sd, path, what):
    """load_state_dict(strict=True), with a one-line UsageError naming what does not match."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise common.UsageError(f"{path} does not match {what} ({len(missing)} missing keys, e.g. {missing[:2]}; "
                                f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}; {len(wrong)} of another "
                                f"shape, e.g. {wrong[:2]}); use the flags it was made with, or another file")
    module.load_state_dict(sd, strict=True)


def export_weights(path, sd, cfg, args, weights):
    """An OpenAI-layout state dict, under 'state_dict' (open_clip's loader reads that key) with what the
    file needs to describe itself: the architecture, activation and pixel normalisation."""
    mean, std = common.NORMS[args.norm]
    save_atomic({"state_dict": sd, "config": cfg, "act": cfg["act"], "image_mean": list(mean),
                 "image_std": list(std), "norm": args.norm, "method": METHOD, "weights": weights}, path)


# ----------------------------------------------------------------------------------------------------
# <shared> Main
# ----------------------------------------------------------------------------------------------------
def write_provenance(out_dir, args, world):
    """The resolved arguments, the code, the git revision and the environment of this run."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except Exception:
            return ""
    with open(os.path.join(out_dir, "args.json"), "w") as f:
        json.dump(plain(vars(args)), f, indent=1)
    env = {"git_revision": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
           "command": " ".join(sys.argv), "python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "world_size": world, "host": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(out_dir, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    os.makedirs(os.path.join(out_dir, "code"), exist_ok=True)
    for src in (os.path.abspath(__file__), os.path.abspath(common.__file__)):
        with open(src) as f_in, open(os.path.join(out_dir, "code", os.path.basename(src)), "w") as f_out:
            f_out.write(f_in.read())


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except common.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args):
    rank, world, device = setup_distributed(args.device)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    if args.batch_size % world:
        raise common.UsageError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if args.resume and not os.path.exists(ckpt_path):
        raise common.UsageError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
    if not args.resume and os.path.exists(ckpt_path):
        raise common.UsageError(f"{ckpt_path} exists; pass --resume to continue that run or --out-dir for a new one")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    cfg = model_config(args)
    if ckpt is not None and (ckpt["method"], ckpt["config"]) != (METHOD, plain(cfg)):
        raise common.UsageError(f"{ckpt_path} is a {ckpt['method']} checkpoint of {ckpt['config']}, not {METHOD} "
                                f"of {cfg}; resume with the same --model and flags, or use another --out-dir")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    random.seed(args.seed)
    model = build_model(cfg, args).to(device)
    if args.grad_checkpointing:
        for m in model.modules():
            if isinstance(m, Transformer):
                m.grad_checkpointing = True
    teacher = build_teacher(model, args)
    teacher = teacher.to(device) if teacher is not None else None
    data = common.make_train_loader(
        args.train_data, transform=train_transform(args, cfg), kind=DATA_KIND, batch_size=args.batch_size // world,
        rank=rank, world_size=world, seed=args.seed, num_workers=args.workers, context_length=args.context_length,
        csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator,
        num_samples=args.train_num_samples, resampled=args.dataset_resampled,
        builtin_length=args.builtin_samples or 100_000)
    steps_per_epoch = data.steps_per_epoch
    total_steps = args.steps or args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step = 0
    if ckpt is not None:
        load_strict(model, ckpt["model"], ckpt_path, f"this {METHOD} model")
        if trained(teacher):
            load_strict(teacher, ckpt["teacher"] or {}, ckpt_path, f"this {METHOD} teacher")
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        if ckpt["world_size"] == world:
            set_rng_state(ckpt["rng"][rank])
        else:
            print0(f"resuming on {world} processes from {ckpt['world_size']}: random states start afresh")
            torch.manual_seed(args.seed + 1000 * step + rank)
        del ckpt
    else:
        torch.manual_seed(args.seed + rank)  # per-rank randomness (masks) from here on
    os.makedirs(args.out_dir, exist_ok=True)
    if is_main():
        write_provenance(args.out_dir, args, world)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(ddp) if args.compile else ddp
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{METHOD}: {args.model}, {n_params / 1e6:.1f}M trained parameters, {world} process(es) on {device}, "
           f"global batch {args.batch_size}, {steps_per_epoch} steps/epoch, {total_steps} steps, "
           f"lr {args.lr:g} ({args.precision}); data: {args.train_data or 'built-in shapes'}; out: {args.out_dir}")

    stop = {"signal": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    log_path = os.path.join(args.out_dir, "metrics.jsonl")
    eval_every = round(args.eval_every * steps_per_epoch) if args.eval_every else 0
    pbar = tqdm(total=total_steps, initial=step, disable=not is_main(), dynamic_ncols=True, desc=METHOD)
    sums, last_time, last_step, stopping = {}, time.time(), step, False
    skipped, skipped_all = 0, 0  # unreadable samples: this rank's (counted on the host), all ranks' (at each log)
    epoch, skip = divmod(step, steps_per_epoch)
    batches = data.batches(epoch, skip)
    model.train()
    while step < total_steps:
        batch = next(batches, None)
        if batch is None:
            epoch += 1
            batches = data.batches(epoch)
            continue
        lr = lr_at(step, total_steps, warmup_steps, args.lr, args.lr_start, args.lr_end)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, args.precision):
            loss, metrics = train_step(fwd, model, teacher, batch, step, total_steps, args, device)
        backward_and_step(loss, model, optimizer, scaler, args.grad_clip)
        after_step(model, teacher, step, total_steps, args)
        step += 1
        for k, v in {"loss": loss, **metrics}.items():  # summed on the device: no host sync per step
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        skipped += int(batch[2].sum())  # a host tensor: no copy to the device, no sync

        if step % args.log_every == 0 or step == total_steps:
            keys = sorted(sums)
            host = torch.tensor([float(skipped), float(stop["signal"])], device=device)
            values = torch.cat([torch.stack([sums[k] for k in keys]), host])
            dist.all_reduce(values)  # one host sync per log interval
            values = values.tolist()
            n = (step - last_step) * world
            record = {k: v / n for k, v in zip(keys, values)}
            finite = all(math.isfinite(v) for v in record.values())
            stopping = values[-1] > 0  # agreed by every rank
            skipped_all = int(values[-2])
            now = time.time()
            record.update(step=step, epoch=step / steps_per_epoch, lr=lr, logit_scale=model.logit_scale.exp().item()
                          if hasattr(model, "logit_scale") else None, skipped_samples=skipped_all,
                          images_per_s=(step - last_step) * args.batch_size / (now - last_time))
            if is_main():
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                pbar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.0f}")
                pbar.update(step - last_step)
            sums, last_time, last_step = {}, now, step
            if not finite:
                raise SystemExit(f"error: non-finite loss at step {step} ({record}); the last good checkpoint "
                                 f"{ckpt_path} is kept. Lower --lr, or use --precision bf16 instead of fp16.")
        if eval_every and step % eval_every == 0 and step < total_steps:
            model.eval()
            results = evaluate(model, teacher, args, device)
            model.train()
            log_eval(log_path, step, results)
        if (step % args.save_every == 0 and step < total_steps) or stopping:
            save_checkpoint(ckpt_path, model, teacher, optimizer, scaler, step, args, cfg)
        if stopping:
            print0(f"SIGTERM: checkpoint saved at step {step} in {ckpt_path}; continue with --resume")
            break
    pbar.close()
    signal.signal(signal.SIGTERM, previous_handler)
    if stopping:
        return
    save_checkpoint(ckpt_path, model, teacher, optimizer, scaler, step, args, cfg)
    exports = export_state_dicts(model.state_dict(), teacher.state_dict() if trained(teacher) else None)
    if is_main():
        for name, sd in exports.items():
            export_weights(os.path.join(args.out_dir, f"export_{name}.pt"), sd, cfg, args, name)
    model.eval()
    results = evaluate(model, teacher, args, device)
    log_eval(log_path, step, results)
    print0(f"done: {step} steps" + (f", {skipped_all} unreadable samples skipped" if skipped_all else "") +
           f". Held-out evaluation: " + ", ".join(f"{k} {v:.1f}" for k, v in results.items()) +
           f". Checkpoint: {ckpt_path}" + "".join(f"; {n} weights (OpenAI layout): " +
                                                   os.path.join(args.out_dir, f"export_{n}.pt") for n in exports))


def log_eval(log_path, step, results):
    if is_main():
        print0(f"eval at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "eval": results}) + "\n")


if __name__ == "__main__":
    main()
