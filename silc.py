"""SILC: Improving Vision Language Pretraining with Self-Distillation.
M. F. Naeem, Y. Xian, X. Zhai, L. Hoyer, L. Van Gool, F. Tombari. ECCV 2024, arXiv 2310.13355.
The official repository (google-research/silc) holds a README and a figure, no code, so this file is a
reference built from the paper's description, DINO (the self-distillation) and big_vision (SigLIP).

Idea. Image-text contrastive training aligns whole images with captions but says little about parts of an
image. SILC adds DINO's local-to-global self-distillation: an EMA teacher sees two global crops, the student
sees N small local crops, and the student's distribution over K prototypes on every local crop is pulled
towards the teacher's on every global crop. The teacher averages a student that the text loss also trains,
so its targets stay aligned with language; the patch features get better for dense tasks (zero-shot
segmentation is the paper's headline; `encode_dense` gives the features eval_zeroshot.py scores).

Objective (x: L2-normalised pooled image embedding, y: text embedding, B pairs, t = exp(t')):
    L = L_con + λ·L_sd                                                        λ = 1 (--lambda-sd)
    L_con = ½ (L(x^{g1}, y) + L(x^{g2}, y))     each global view against the same B captions, B×B each
    SILC-C, --loss softmax: L = -1/(2B) Σ_i [log softmax_j(t·x_i·y_j)_i + log softmax_j(t·x_j·y_i)_i]
    SILC-S, --loss sigmoid: L = -1/B Σ_i Σ_j log σ(z_ij·(t·x_i·y_j + b)), z_ij = 1 if i = j else -1
    P_t^g = softmax((h̄(f̄(x^g)) - c) / τ_t),  log P_s^v = log_softmax(h(f(x^v)) / τ_s)    h: DINO head
    L_sd = mean over (g ∈ 2 globals, v ∈ N locals) of mean_b [ -Σ_k P_t^g log P_s^v ]       2N pairs
    c ← m_c·c + (1 - m_c)·mean(h̄(f̄(x^g)))  over the teacher rows of all ranks
    θ̄ ← m·θ̄ + (1 - m)·θ  for the image tower and the DINO head, m constant
Differs from CLIP/SigLIP in "Model" (DINO head, MAP head), "Masking" (the multi-crop views), "Losses",
"Teacher" and "Training step". `--lambda-sd 0` is the CLIP (or SigLIP) baseline on two global views.
The EMA momentum is fixed: DINO anneals it to 1, which freezes the teacher late in training, while SILC's
student keeps changing under the text loss and the teacher must keep following it (`--ema-schedule cosine`
is DINO's schedule, as an ablation).

Paper values: 2 global crops at scale (0.4, 1), 8 local crops at (0.05, 0.4), the contrastive loss on each
global view with the batch unchanged, fixed EMA momentum, SigLIP's t' = log 10 and b = -10. Project choices
(spec shared/specs/silc.md, "Decisions"; SILC's values are unknown):
  - pooling (--pool auto): [CLS] + linear projection for softmax, so the model is an OpenAI-layout CLIP (E =
    the size's embed_dim, 512 for ViT-B/16); big_vision's MAP head without projection for sigmoid (E = width);
    the DINO head gets the pooled embedding before L2 normalisation;
  - text tower: the shared one, causal with end-token pooling (big_vision's has no causal mask);
  - views: globals at the model's resolution, locals at 96/224 of it in whole patches and at least a 2×2 grid
    (96 px at 224/16; 16 px for the 32 px tiny model), bicubic, horizontal flip, no photometric
    augmentation (--local-photometric adds DINO's to the locals); position embedding bicubically interpolated;
  - DINO's head and values: hidden 2048, bottleneck 256, K = 65536, weight-normalised prototypes with gain 1,
    τ_s = 0.1, τ_t 0.04 → 0.07 linearly over the LR warm-up, m_c = 0.9; distillation local → global only;
  - EMA momentum 0.996 (DINO's base value); the teacher holds the image tower, its pooling and the DINO head;
  - softmax: t starts at 1/0.07, clamped at 100 (CLIP); both losses are exact across ranks (the text
    embeddings are gathered with gradient; big_vision rotates text chunks around the ranks instead);
  - recipe (--train-data): SigLIP 2's B/16 values: batch 32768, Adam β (0.9, 0.999), lr 1e-3, decoupled wd 1e-4
    (big_vision multiplies wd by the schedule, not by the lr: PyTorch AdamW weight_decay 0.1 at lr 1e-3), grad
    clip 1, cosine to 0, 20k warm-up steps (--warmup-epochs 0.5 is that for a 1.3B-pair dataset; pass
    20000·32768/N for N pairs), 9B examples seen (275k steps), 64 text tokens; GELU, CLIP pixel constants;
  - zero-shot segmentation: patch tokens after ln_post through the pooled path's projection (none for MAP;
    --seg-readout map_value runs them through the MAP head's value path, MaskCLIP-style).

Run:
    torchrun silc.py                                        # built-in demo, CPU, a few minutes
    torchrun --nproc_per_node=8 silc.py --train-data 'datacomp/{00000..14000}.tar' --train-num-samples 1300000000
    torchrun --nproc_per_node=8 silc.py --train-data ... --loss sigmoid     # SILC-S (MAP head)
    torchrun --nproc_per_node=8 silc.py --train-data ... --lambda-sd 0      # CLIP baseline on the same views

Left out: WebLI, Cat-Seg open-vocabulary fine-tuning, few-shot probes, detection/captioning/VQA, gradient
accumulation (it would change the contrastive negatives).
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
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

METHOD = "silc"
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
# SILC's own recipe is unknown: with --train-data the defaults are SigLIP 2's ViT-B/16 values and DINO's
# self-distillation values (see the docstring for which are the paper's). steps = 9B examples / 32768; epochs
# only counts with --steps 0.
RECIPE = dict(model="ViT-B/16", batch_size=32768, steps=275_000, epochs=7, lr=1e-3, lr_start=0.0, lr_end=0.0,
              warmup_epochs=0.5, act="gelu", wd=0.1, beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=1.0, norm="clip",
              crop_scale=0.4, context_length=64, eval_every=1.0, workers=8, n_local=8, out_dim=65536,
              head_hidden=2048, head_bottleneck=256, ema_momentum=0.996)
# The built-in demo: what runs when --train-data is not given (tiny model, shapes rendered on the fly; its
# length is set by epochs, not by the recipe's steps).
DEMO = dict(model="tiny", batch_size=128, steps=None, epochs=3, lr=1e-3, lr_start=1e-6, lr_end=1e-5, warmup_epochs=0.5,
            wd=0.1, crop_scale=0.4, builtin_samples=13312, eval_every=0.0, workers=1, n_local=4, out_dim=256,
            head_hidden=256, head_bottleneck=64, ema_momentum=0.99)


def add_method_args(p):
    g = p.add_argument_group("SILC")
    g.add_argument("--loss", default="softmax", choices=["softmax", "sigmoid"],
                   help="contrastive loss: softmax = SILC-C (CLIP's InfoNCE), sigmoid = SILC-S (SigLIP)")
    g.add_argument("--pool", default="auto", choices=["auto", "cls", "map", "gap"],
                   help="image embedding: [CLS] + projection, MAP head (no projection), or mean of the patch tokens "
                        "+ projection; auto = cls for softmax, map for sigmoid")
    g.add_argument("--t-init", type=float, help="initial t = exp(t') (default: 1/0.07 for softmax, clamped at 100; "
                                                "10 for sigmoid)")
    g.add_argument("--b-init", type=float, default=-10.0, help="initial bias b of the sigmoid loss")
    g.add_argument("--contrastive-on", default="both_globals", choices=["both_globals", "first_global", "unaugmented"],
                   help="images of the contrastive loss: each global view (SILC), the first one only, or an extra "
                        "un-augmented view (SigLIP 2); ablations")
    g.add_argument("--n-local", type=int, help="local crops per image (paper 8; 0 = no self-distillation unless "
                                               "--distill-global-cross)")
    g.add_argument("--local-size", type=int, help="local crop side in pixels, a multiple of the patch (default: 96/224 "
                                                  "of the image size in whole patches, at least 2: 96 at 224/16)")
    g.add_argument("--local-scale", type=float, nargs=2, default=(0.05, 0.4), metavar=("MIN", "MAX"),
                   help="area fraction of the local crops (the global crops use --crop-scale to 1)")
    g.add_argument("--local-photometric", action="store_true",
                   help="DINO's colour jitter, grayscale and blur on the local crops")
    g.add_argument("--lambda-sd", type=float, default=1.0, help="λ, weight of L_sd (0 = no self-distillation)")
    g.add_argument("--distill-global-cross", action="store_true",
                   help="also distil student global 1 -> teacher global 2 and 2 -> 1 (DINO's cross-global pairs)")
    g.add_argument("--out-dim", type=int, help="K, prototypes of the DINO head (recipe 65536)")
    g.add_argument("--head-hidden", type=int, help="hidden width of the DINO head's MLP (recipe 2048)")
    g.add_argument("--head-bottleneck", type=int, help="bottleneck of the DINO head (recipe 256)")
    g.add_argument("--freeze-last-layer-steps", type=int, default=0,
                   help="steps at the start during which the prototypes get no gradient (DINO freezes 1 epoch)")
    g.add_argument("--student-temp", type=float, default=0.1, help="τ_s")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="τ_t at step 0")
    g.add_argument("--teacher-temp", type=float, default=0.07, help="τ_t after the warm-up")
    g.add_argument("--warmup-teacher-temp-steps", type=int,
                   help="length of the linear τ_t warm-up in steps (default: the LR warm-up's)")
    g.add_argument("--center-momentum", type=float, default=0.9, help="m_c of the teacher centre")
    g.add_argument("--ema-momentum", type=float, help="EMA momentum m of the teacher (recipe 0.996)")
    g.add_argument("--ema-schedule", default="const", choices=["const", "cosine"],
                   help="const (SILC) or DINO's cosine schedule from --ema-momentum to 1 (ablation)")
    g.add_argument("--seg-readout", default="proj", choices=["proj", "map_value"],
                   help="dense features: patch tokens through the pooled path's projection, or (MAP head) through "
                        "its value projection and MLP")


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
def resolve_pool(args):
    """--pool auto: CLS + projection for the softmax loss (CLIP), MAP head for the sigmoid loss (SigLIP)."""
    if args.pool != "auto":
        return args.pool
    return "cls" if args.loss == "softmax" else "map"


def distilling(args):
    """Whether L_sd has any term: it needs λ > 0 and a student view to distil (a local crop or the cross pairs)."""
    return args.lambda_sd > 0 and (args.n_local > 0 or args.distill_global_cross)


def local_crop_size(args, cfg):
    """The local crops' side: --local-size, else DINO's 96/224 of the image size rounded to whole patches, at least
    a 2×2 grid (96 at 224/16; 16 px, a 2×2 grid, for the 32 px tiny model)."""
    if args.local_size:
        return args.local_size
    p = cfg["patch_size"]
    return p * max(2, round(cfg["image_size"] * 96 / 224 / p))


def check_args(args, cfg):
    """One-line errors for flag values that cannot work, raised at start-up."""
    p = cfg["patch_size"]
    if args.n_local < 0:
        raise common.UsageError(f"--n-local {args.n_local} is negative; give 0 or more local crops")
    size = local_crop_size(args, cfg)
    if size < p or size % p:
        raise common.UsageError(f"--local-size {size} is not a positive multiple of the patch size {p}; "
                                f"give e.g. {2 * p}")
    lo, hi = args.local_scale
    if not 0 < lo <= hi <= 1:
        raise common.UsageError(f"--local-scale {lo} {hi} is not an area range within (0, 1]; give e.g. 0.05 0.4")
    if args.seg_readout == "map_value" and resolve_pool(args) != "map":
        raise common.UsageError(f"--seg-readout map_value reads through the MAP head, but --pool is "
                                f"{resolve_pool(args)}; add --pool map or use --seg-readout proj")
    for name in ("out_dim", "head_hidden", "head_bottleneck"):
        if getattr(args, name) < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
        if getattr(args, name) <= 0:
            raise common.UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    if args.lambda_sd < 0:
        raise common.UsageError(f"--lambda-sd {args.lambda_sd} is negative; give 0 (no self-distillation) or more")
    for name, example in (("ema_momentum", 0.996), ("center_momentum", 0.9)):
        if not 0 <= getattr(args, name) <= 1:
            raise common.UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} is outside [0, 1]; "
                                    f"give e.g. {example}")


class MAPHead(nn.Module):
    """big_vision's multi-head attention pooling: one learned probe attends over the patch tokens, then a residual
    MLP, y = a + MLP(LN(a)) with a = MHA(probe, x). (B, N, D) -> (B, D)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.empty(1, 1, dim))
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))  # q, k, v packed
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim, "gelu")
        nn.init.xavier_uniform_(self.probe.data.view(1, dim))  # Xavier as for a (1, D) kernel, as in flax
        for w in (self.in_proj_weight.data.view(3, dim, dim).unbind(0)) + (self.out_proj.weight.data,):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.out_proj.bias)

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
    """DINO's projection head: MLP J -> hidden -> hidden -> bottleneck (GELU), L2 normalisation, then K weight-
    normalised prototypes with the gain fixed at 1 (norm_last_layer), i.e. cosine logits. (..., J) -> (..., K)."""

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
        if freeze_prototypes:  # --freeze-last-layer-steps: same value, zero gradient (DDP needs the parameter used)
            w = w.detach() + 0 * w
        return F.linear(x, w)                                  # (..., K)


def pooled_embedding(tower, image):
    """(B, 3, H, W) -> (B, E): the pooled image embedding that the contrastive loss (after L2 normalisation) and
    the DINO head (before it) see. `tower` is the model or the teacher: both have visual, pool, map_head and
    gap_proj. Any input size works: the position embedding is interpolated to the input's grid."""
    x = tower.visual.ln_post(tower.visual(image))              # (B, 1+N, D), [CLS] first
    if tower.pool == "cls":
        return x[:, 0] @ tower.visual.proj                     # (B, E)
    if tower.pool == "gap":
        return tower.gap_proj(x[:, 1:].mean(1))                # (B, E)
    return tower.map_head(x[:, 1:])                            # (B, D): E = D, no projection


def dense_embedding(tower, image, readout="proj"):
    """(B, 3, H, W) -> (B, N, E): every patch token after ln_post, mapped into the joint space without
    attention pooling: through the pooled path's projection (cls, gap), as they are (map), or through the MAP
    head's value path (readout map_value). Not normalised. N = (H/patch)·(W/patch), row-major."""
    x = tower.visual.ln_post(tower.visual(image)[:, 1:])       # (B, N, D)
    if tower.pool == "cls":
        return x @ tower.visual.proj                           # (B, N, E)
    if tower.pool == "gap":
        return tower.gap_proj(x)                               # (B, N, E); its mean is the pooled embedding
    return tower.map_head.value_readout(x) if readout == "map_value" else x


class SILC(CLIP):
    """CLIP (or SigLIP) towers + the pooling head + the DINO head. With --pool cls the image and text towers are
    an OpenAI-layout CLIP; with map or gap the image tower has no `visual.proj` (the pooling is not CLIP's)."""

    def __init__(self, cfg, args):
        pool = resolve_pool(args)
        embed_dim = cfg["width"] if pool == "map" else cfg["embed_dim"]
        super().__init__(**dict(cfg, embed_dim=embed_dim))
        self.pool, self.loss_kind, self.seg_readout = pool, args.loss, args.seg_readout
        self.contrastive_on, self.cross, self.tau_s = args.contrastive_on, args.distill_global_cross, args.student_temp
        self.lambda_sd = args.lambda_sd
        width = cfg["width"]
        self.map_head = MAPHead(width, cfg["heads"]) if pool == "map" else None
        self.gap_proj = nn.Linear(width, embed_dim, bias=False) if pool == "gap" else None
        if pool == "gap":
            nn.init.normal_(self.gap_proj.weight, std=width ** -0.5)
        if pool != "cls":
            self.visual.proj = None
        t_init = args.t_init or (1 / 0.07 if args.loss == "softmax" else 10.0)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(t_init))                      # t' = log t
        self.logit_bias = nn.Parameter(torch.tensor(args.b_init)) if args.loss == "sigmoid" else None
        self.dino_head = DINOHead(embed_dim, args.out_dim, args.head_hidden, args.head_bottleneck) \
            if distilling(args) else None

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
        local_crops: (N·B, 3, s, s), view-major; unaugmented: (B, 3, S, S) for --contrastive-on unaugmented;
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
        loss_con = sum(self.contrastive(v, y) for v in x) / len(x)                 # L_con = ½ (L(x^g1, y) + L(x^g2, y))
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


def build_model(cfg, args):
    check_args(args, cfg)
    return SILC(cfg, args)


# ----------------------------------------------------------------------------------------------------
# <method> Masking
# ----------------------------------------------------------------------------------------------------
# SILC masks nothing: the student's partial views are DINO's multi-crop, built here on the host.
def dino_photometric(img, rng):
    """DINO's augmentation of its local crops: colour jitter (0.4, 0.4, 0.2, 0.1) in random order with p 0.8,
    grayscale p 0.2, Gaussian blur σ ∈ (0.1, 2) px with p 0.5. Every draw comes from `rng`."""
    if rng.random() < 0.8:
        ops = [(TF.adjust_brightness, rng.uniform(0.6, 1.4)), (TF.adjust_contrast, rng.uniform(0.6, 1.4)),
               (TF.adjust_saturation, rng.uniform(0.8, 1.2)), (TF.adjust_hue, rng.uniform(-0.1, 0.1))]
        rng.shuffle(ops)
        for op, factor in ops:
            img = op(img, factor)
    if rng.random() < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return img


class MultiCrop:
    """The views of one image (common.py's `(img, rng)` contract): 2 global crops (RandomResizedCrop to
    global_size, area scale global_scale, bicubic, horizontal flip), n_local local crops (local_size, local_scale,
    optionally DINO's photometric augmentation) and, with unaugmented=True, the image resized and centre-cropped
    to global_size. Returns a tuple of FloatTensor[3, side, side]: (global 1, global 2, local 1..n[, unaugmented])."""

    def __init__(self, global_size, local_size, n_local, global_scale, local_scale, mean, std, photometric=False,
                 unaugmented=False):
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale, self.mean, self.std = tuple(global_scale), tuple(local_scale), mean, std
        self.photometric = photometric
        self.unaugmented = common.EvalTransform(global_size, mean, std) if unaugmented else None

    def crop(self, img, rng, size, scale, photometric=False):
        left, top, w, h = common.crop_box(rng, img.width, img.height, scale)
        out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if photometric:
            out = dino_photometric(out, rng)
        return common.to_normalized_tensor(out, self.mean, self.std)

    def __call__(self, img, rng):
        views = [self.crop(img, rng, self.global_size, self.global_scale) for _ in range(2)]
        views += [self.crop(img, rng, self.local_size, self.local_scale, self.photometric) for _ in range(self.n_local)]
        if self.unaugmented is not None:
            views.append(self.unaugmented(img))
        return tuple(views)


# ----------------------------------------------------------------------------------------------------
# <method> Losses
# ----------------------------------------------------------------------------------------------------
def sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias):
    """SigLIP's loss over all ranks, -1/B Σ_i Σ_j log σ(z_ij·(t·x_i·y_j + b)) with z_ij = 1 on the positive pair
    and -1 elsewhere. image_emb, text_emb: (B, E) L2-normalised, this rank's pairs; logit_scale: t' (t = exp t');
    logit_bias: b. This rank's B images meet the texts of every rank (gathered with gradient), so the ranks' losses,
    averaged as DDP averages gradients, are the loss of one process on the whole batch."""
    all_text = all_gather_with_grad(text_emb)                                  # (world·B, E)
    B = image_emb.shape[0]
    logits = logit_scale.exp() * image_emb.float() @ all_text.float().t() + logit_bias   # (B, world·B)
    z = torch.full_like(logits, -1.0)
    z[:, dist.get_rank() * B:(dist.get_rank() + 1) * B] += 2 * torch.eye(B, device=logits.device)  # +1 on the diagonal
    return -F.logsigmoid(z * logits).sum() / B                                 # summed over texts, mean over images


def teacher_probs(teacher_logits, center, tau_t):
    """P_t = softmax((u - c) / τ_t): centring and sharpening of the raw teacher logits u (..., K)."""
    return F.softmax((teacher_logits.float() - center) / tau_t, dim=-1)


def center_update(center, teacher_logits, momentum):
    """c ← m_c·c + (1 - m_c)·mean(u), the mean over the raw teacher logits u (R, K) of all ranks."""
    batch_sum = teacher_logits.float().sum(0, keepdim=True)                    # (1, K)
    dist.all_reduce(batch_sum)
    return momentum * center + (1 - momentum) * batch_sum / (teacher_logits.shape[0] * dist.get_world_size())


def dino_loss(student_logits, teacher_p, tau_s, n_student_globals=0):
    """L_sd: the mean over pairs (teacher view g, student view v) of mean_b [ -Σ_k P_t^g log softmax(s^v / τ_s) ].
    student_logits: (V, B, K) raw DINO-head outputs, the first n_student_globals of them the two global views
    (--distill-global-cross) and the rest the local views; teacher_p: (2, B, K) centred and sharpened teacher
    probabilities of the global views. A global view is never paired with itself: 2·(V - n_student_globals)
    local pairs, plus 2 cross-global pairs when n_student_globals = 2."""
    log_p = F.log_softmax(student_logits.float() / tau_s, dim=-1)              # (V, B, K)
    ce = -torch.einsum("gbk,vbk->gv", teacher_p, log_p) / log_p.shape[1]       # (2, V): mean_b cross-entropy
    pairs = torch.ones_like(ce)
    if n_student_globals:
        pairs[0, 0] = pairs[1, 1] = 0                                          # no view with itself
    return (ce * pairs).sum() / pairs.sum()


# ----------------------------------------------------------------------------------------------------
# <method> Teacher / EMA
# ----------------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """The EMA teacher: copies of the image tower, its pooling head and the DINO head (no text tower, t or b), and
    the centre c (1, K). It starts equal to the student, gets no gradient and stays in eval mode."""

    def __init__(self, model, args):
        super().__init__()
        self.pool = model.pool
        self.visual = copy.deepcopy(model.visual)
        self.visual.transformer.grad_checkpointing = False
        self.map_head = copy.deepcopy(model.map_head)
        self.gap_proj = copy.deepcopy(model.gap_proj)
        self.dino_head = copy.deepcopy(model.dino_head)
        self.center_momentum = args.center_momentum
        self.register_buffer("center", torch.zeros(1, args.out_dim))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # always in eval mode
        return super().train(False)

    def parts(self):
        return [name for name in ("visual", "map_head", "gap_proj", "dino_head") if getattr(self, name) is not None]

    @torch.no_grad()
    def targets(self, global_crops, tau_t):
        """P_t of the global crops (2B, 3, S, S) -> (2, B, K), centred with the current c; then c is updated from
        these raw logits, all-reduced over ranks."""
        u = self.dino_head(pooled_embedding(self, global_crops)).float()      # (2B, K) raw teacher logits
        probs = teacher_probs(u, self.center, tau_t)
        self.center.copy_(center_update(self.center, u, self.center_momentum))
        return probs.view(2, -1, probs.shape[-1])                               # (2, B, K)

    @torch.no_grad()
    def update(self, model, momentum):
        """θ̄ ← m·θ̄ + (1 - m)·θ for the image tower, the pooling head and the DINO head."""
        for name in self.parts():
            ema_update(getattr(self, name), getattr(model, name), momentum)


def build_teacher(model, args):
    return Teacher(model, args) if model.dino_head is not None else None


def ema_momentum(step, total_steps, args):
    """m at `step`: constant (SILC), or DINO's cosine from --ema-momentum at step 0 to 1 at the end."""
    if args.ema_schedule == "const":
        return args.ema_momentum
    return 1 - (1 - args.ema_momentum) * (math.cos(math.pi * step / total_steps) + 1) / 2


def lr_warmup_steps(args, total_steps):
    """The shared loop's LR warm-up length, int(warmup_epochs × steps per epoch), with the steps per epoch the
    loader has: from the sample count for the built-in data and tar shards, else total_steps // epochs (exact
    unless --steps cuts the run; then give --warmup-teacher-temp-steps)."""
    if args.train_data is None:
        per_epoch = (args.builtin_samples or 100_000) // args.batch_size
    elif ".tar" in args.train_data and args.train_num_samples:
        per_epoch = args.train_num_samples // args.batch_size
    else:
        per_epoch = total_steps // args.epochs
    return int(args.warmup_epochs * per_epoch)


def teacher_temperature(step, total_steps, args):
    """τ_t at `step`: linear from --warmup-teacher-temp to --teacher-temp over the warm-up, then constant."""
    n = args.warmup_teacher_temp_steps
    n = lr_warmup_steps(args, total_steps) if n is None else n
    if step >= n:
        return args.teacher_temp
    return args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * step / n


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
def train_transform(args, cfg):
    mean, std = common.NORMS[args.norm]
    return MultiCrop(cfg["image_size"], local_crop_size(args, cfg), args.n_local if distilling(args) else 0,
                     (args.crop_scale, 1.0), args.local_scale, mean, std, args.local_photometric,
                     unaugmented=args.contrastive_on == "unaugmented")


def no_weight_decay(name, param):
    """Gains, biases, embeddings, the MAP probe, t and b: no weight decay."""
    return param.ndim < 2 or name in ("token_embedding.weight", "positional_embedding", "visual.positional_embedding",
                                      "map_head.probe")


def train_step(forward, model, teacher, batch, step, total_steps, args, device):
    """forward: the DDP-wrapped (and maybe compiled) model; model: the raw module; batch: (views, texts, skipped)
    as the loader gave it, views a tuple of (B, 3, side, side) (see MultiCrop). Returns (loss, metrics)."""
    views, text, _ = batch
    views, text = to_device((views, text), device)
    global_crops = torch.cat(views[:2])                                    # (2B, 3, S, S): view 1, then view 2
    n_local = args.n_local if teacher is not None else 0
    local_crops = torch.cat(views[2:2 + n_local]) if n_local else None     # (N·B, 3, s, s), view-major
    unaugmented = views[-1] if args.contrastive_on == "unaugmented" else None
    inputs = {}
    if teacher is not None:  # the EMA teacher on the global crops, before the one forward of the student
        inputs["teacher_probs"] = teacher.targets(global_crops, teacher_temperature(step, total_steps, args))
        inputs["freeze_prototypes"] = step < args.freeze_last_layer_steps
    return forward(global_crops, text, local_crops, unaugmented, **inputs)


def after_step(model, teacher, step, total_steps, args):
    """After each optimizer step: clamp t at 100 (softmax loss) and update the EMA teacher."""
    if model.loss_kind == "softmax":
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # ln(100): CLIP clamps the temperature's inverse at 100
    if teacher is not None:
        teacher.update(model, ema_momentum(step, total_steps, args))  # constant m: SILC keeps the teacher moving


# ----------------------------------------------------------------------------------------------------
# <method> Evaluation and export
# ----------------------------------------------------------------------------------------------------
SEG_IMAGES = 512  # built-in held-out images of the zero-shot segmentation check in evaluate()


def export_state_dicts(model_sd, teacher_sd):
    """OpenAI-layout state dicts: 'online', and 'ema' (the EMA image tower, projection included, with the online
    text tower). Only a [CLS]-pooled model is an OpenAI CLIP: a MAP- or GAP-pooled one (no `visual.proj`) exports
    nothing; its weights are in checkpoint.pt, which eval_towers (and so eval_zeroshot.py) reads."""
    if "visual.proj" not in model_sd:
        return {}
    online = {k: v for k, v in model_sd.items() if k.startswith(OPENAI_PREFIXES)}
    out = {"online": online}
    if teacher_sd is not None:
        out["ema"] = {**online, **{k: v for k, v in teacher_sd.items() if k.startswith("visual.")}}
    return out


def eval_towers(ckpt):
    """What eval_zeroshot.py evaluates in a checkpoint of this script: {name: SILC model} for the online and the
    EMA weights (the EMA image tower and pooling with the online text tower), each with encode_image(x) -> (B, E),
    encode_text(t) -> (B, E) and encode_dense(x) -> (B, N, E), for every --pool and --seg-readout."""
    args = argparse.Namespace(**ckpt["args"])
    online = build_model(ckpt["config"], args)
    load_strict(online, ckpt["model"], f"the online weights of a {METHOD} checkpoint", f"this {METHOD} model")
    towers = {"online": online.eval()}
    if ckpt.get("teacher") is not None:
        ema = build_model(ckpt["config"], args)
        sd = {**ckpt["model"], **{k: v for k, v in ckpt["teacher"].items() if k != "center"}}
        load_strict(ema, sd, f"the EMA weights of a {METHOD} checkpoint", f"this {METHOD} model")
        towers["ema"] = ema.eval()
    return towers


@torch.no_grad()
def segmentation_classifier(encode_text, context_length, device, classes=None):
    """(8 + C, E): the 8 background prompts ('a photo of a gray background.', one per background colour of the
    built-in shapes, over the shapes' templates) then the C = 64 class embeddings (`classes` if already built),
    each template-averaged."""
    backgrounds = [f"{name} background" for name in common.BACKGROUNDS]
    if classes is None:
        classes = zero_shot_classifier(encode_text, common.SHAPE_CLASSNAMES, common.SHAPE_TEMPLATES, context_length,
                                       device)
    return torch.cat([zero_shot_classifier(encode_text, backgrounds, common.SHAPE_TEMPLATES, context_length, device),
                      classes])


@torch.no_grad()
def segmentation_confusion(scores, masks, n_background):
    """scores: (b, n_background + C, h, w) patch scores; masks: (b, H, W) with 0 = background, 1 + c = class c.
    Upsamples the scores bilinearly to H × W, takes the per-pixel argmax (any background prompt -> 0) and returns
    the (1 + C, 1 + C) confusion counts, rows the truth, columns the prediction."""
    n = scores.shape[1] - n_background + 1
    up = F.interpolate(scores.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)  # (b, 8+C, H, W)
    pred = (up.argmax(1) - n_background + 1).clamp(min=0)                    # (b, H, W) in 0..C
    return torch.bincount((masks.long() * n + pred).flatten(), minlength=n * n).view(n, n)


def miou(confusion):
    """Mean IoU (%) over the classes that occur in the truth or the prediction."""
    inter = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - inter
    return (100 * (inter[union > 0] / union[union > 0]).mean()).item()


@torch.no_grad()
def zero_shot_segmentation(encode_dense, classifier, cfg, args, device, n_images=SEG_IMAGES):
    """Zero-shot segmentation mIoU (%) on the first n_images built-in held-out images (one shape each, split
    across ranks): cosine of every patch feature with the 8 background prompts and the 64 class embeddings,
    upsampled to the 64 px mask, per-pixel argmax; a pixel is background when a background prompt wins."""
    mean, std = common.NORMS[args.norm]
    transform, data = common.EvalTransform(cfg["image_size"], mean, std), common.Shapes("val", length=n_images)
    mine = list(range(dist.get_rank(), n_images, dist.get_world_size()))
    n = 1 + len(common.SHAPE_CLASSNAMES)
    confusion = torch.zeros(n, n, dtype=torch.long, device=device)
    for i in range(0, len(mine), 128):
        samples = [data.sample(j) for j in mine[i:i + 128]]
        images = torch.stack([transform(s[0]) for s in samples]).to(device)   # (b, 3, S, S)
        masks = torch.stack([torch.tensor(s[3]) for s in samples]).to(device)     # (b, 64, 64)
        with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
            feats = F.normalize(encode_dense(images).float(), dim=-1)        # (b, N, E)
        gh, gw = images.shape[-2] // cfg["patch_size"], images.shape[-1] // cfg["patch_size"]
        scores = (feats @ classifier.t()).transpose(1, 2)                     # (b, 8 + C, N)
        scores = scores.reshape(scores.shape[0], -1, gh, gw)                  # (b, 8 + C, gh, gw)
        confusion += segmentation_confusion(scores, masks, len(common.BACKGROUNDS))
    dist.all_reduce(confusion)
    return miou(confusion)


@torch.no_grad()
def evaluate(model, teacher, args, device):
    """Zero-shot top-1/top-5 of the online and the EMA towers on the held-out set and, on the built-in data,
    their zero-shot segmentation mIoU on SEG_IMAGES held-out images."""
    towers = {"online": model}
    if teacher is not None:
        towers["ema"] = teacher
    results = {}
    classifier, loader = zero_shot_setup(model.encode_text, args, device)
    for name, tower in towers.items():
        top1, top5 = zero_shot_accuracy(lambda x, t=tower: pooled_embedding(t, x), classifier, loader, device)
        results[f"{name}/top1"], results[f"{name}/top5"] = top1, top5
    if args.train_data is None:
        cfg = model_config(args)
        seg_classifier = segmentation_classifier(model.encode_text, args.context_length, device,
                                                 None if args.imagenet_val else classifier)
        for name, tower in towers.items():
            results[f"{name}/miou"] = zero_shot_segmentation(
                lambda x, t=tower: dense_embedding(t, x, args.seg_readout), seg_classifier, cfg, args, device)
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
