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

Objective (spec shared/specs/aclip.md §2-§3; names as in the code's comments):
    s_j = 1/(L·H) Σ_l Σ_h softmax(q_cls K^T / √d)^{l,h}_j       score of patch j on the EMA view (§2.2)
    a_k = align(s, box_k, box_ema); keep_k = top-k blocks of avgpool_2x2(a_k)  (§2.3-2.4), k = 1, 2
    L_itc,k = ½·[CE(s·I_k T^T) + CE(s·T I_k^T)]                 CLIP InfoNCE of view k, shared scale s
    L_ssl  = ½·[NT-Xent(h_1 -> h_2) + NT-Xent(h_2 -> h_1)]       SimCLR, τ = 0.1, h = image_mlp(cls)
    L_o2e  = 1/(2B) Σ_k Σ_i [2 - 2·cos(pred(proj(cls_k,i)), proj_ema(cls_ema,i))]   BYOL-style, no negatives
    L = 0.5·L_itc,1 + 0.5·L_itc,2 + 1·L_ssl + 2·L_o2e
    θ_ema ← m·θ_ema + (1-m)·θ,  m_t = 1 - (1 - 0.996)·(1 + cos(π t / T)) / 2, at the start of every step

Differs from CLIP in the sections "Model", "Masking", "Losses", "Teacher / EMA" and "Training step":
`--mask none --views 1 --loss-weights 1 0 0 0` is plain CLIP (with a 3-crop data pipeline).
A-CLIP-eff: `--eff` runs the EMA scorer on a view of half the image size (112 px for 224): a 7x7 map that
is aligned straight at the block grid, with the EMA position embedding interpolated (spec §4, UNVERIFIED).

Project choices where the paper is silent or the released code is wrong (spec "Decisions"):
  - masking is on (the released --mask-ratio defaults to 0, which turns it off); ⌊G·0.5⌋+1 blocks are kept
    (25 of 49 = 100 of 196 patches at 224 px), recomputed every step from the current EMA weights;
  - the EMA box really encloses both online crops, then is enlarged at random (`--no-three-crop-fix`: the
    released geometry, whose box can miss parts of the crops); SimCLR pairs view 1 with view 2
    (`--simclr-views v1_v1`: the released code's pairing of view 1 with itself);
  - alignment samples the EMA map bilinearly at the centres of the view's patches (grid_sample; 0 outside
    the EMA box), the vectorised form of the released upsample-crop-resize loop; ties in the top-k go to
    the lower block index; `--mask random` draws blocks of the same size and count;
  - the EMA covers the image encoder with its projection, the text transformer with its projection and the
    BYOL projector; the EMA text tower shares the online token and position embeddings and ln_final; both
    weight sets are evaluated zero-shot and exported; the EMA projector's BatchNorm uses batch statistics;
  - the patch-embedding conv is frozen at its random initialisation (as in the released code);
  - BatchNorm of the heads uses the global batch under DDP (GlobalBatchNorm1d: SyncBatchNorm's statistics,
    which also runs on gloo/CPU); both views pass the heads as one batch of 2B;
  - the recipe is the README's (lr 5e-4, wd 0.5, not the argparse 3e-3 / 0.1), bf16 autocast instead of
    fp16; one activation for both towers (QuickGELU; the released image tower uses GELU); the contrastive
    and SimCLR all-gathers carry the gradient, so G GPUs compute the loss of one GPU on the whole batch.

Run:
    torchrun aclip.py                                      # built-in demo, CPU, a few minutes
    torchrun --nproc_per_node=8 aclip.py --train-data yfcc15m.csv          # A-CLIP, ViT-B/16
    torchrun --nproc_per_node=8 aclip.py --train-data yfcc15m.csv --eff    # A-CLIP-eff
    torchrun aclip.py --save-masks 100                    # also write masks_<step>.png every 100 steps

Left out: gradient accumulation (it would change the negatives of the contrastive losses), the retrieval
and 26-dataset evaluations, ViT-L's recipe (use --model ViT-L/16), fp16 as the default precision.
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
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

METHOD = "aclip"
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
              warmup_epochs=1.0, act="quickgelu", wd=0.5, beta1=0.9, beta2=0.98, eps=1e-8, grad_clip=0.0,
              norm="imagenet", crop_scale=0.5, eval_every=1.0, workers=8, keep_ratio=0.5, block_size=2,
              ssl_hidden=4096, ssl_dim=256, ema_momentum=0.996, photo_aug="aclip")
# The built-in demo: what runs when --train-data is not given (tiny model, shapes rendered on the fly).
DEMO = dict(model="tiny", batch_size=128, epochs=3, lr=1e-3, lr_start=1e-6, lr_end=1e-5, warmup_epochs=0.5,
            wd=0.1, crop_scale=0.9, builtin_samples=16384, eval_every=0.0, workers=1, keep_ratio=0.5,
            block_size=1, ssl_hidden=512, ssl_dim=128, ema_momentum=0.99, photo_aug="none")


def add_method_args(p):
    g = p.add_argument_group("A-CLIP")
    g.add_argument("--mask", default="attentive", choices=["attentive", "random", "none"],
                   help="which tokens the student encodes: the most-attended blocks, random blocks, or all")
    g.add_argument("--views", type=int, default=2, choices=[1, 2], help="masked online views per image")
    g.add_argument("--keep-ratio", type=float, help="fraction of blocks kept (paper recipe 0.5)")
    g.add_argument("--keep-extra-block", action=argparse.BooleanOptionalAction, default=True,
                   help="keep ⌊G·ratio⌋+1 blocks (25 of 49, as the released code) instead of ⌊G·ratio⌋")
    g.add_argument("--block-size", type=int, help="patches per block side for the selection (paper recipe 2)")
    g.add_argument("--score-layers", default="all", choices=["all", "last"],
                   help="[CLS] attention averaged over all layers (paper) or the last layer only")
    g.add_argument("--attentive-keep", default="most", choices=["most", "least"],
                   help="keep the most-attended blocks (A-CLIP) or the least-attended ones (AttMask-style "
                        "ablation, Table 2b)")
    g.add_argument("--three-crop-fix", action=argparse.BooleanOptionalAction, default=True,
                   help="the EMA box encloses both online crops (off: the released code's geometry)")
    g.add_argument("--eff", action="store_true",
                   help="A-CLIP-eff: the EMA scorer sees a view of half the image size (112 px for 224)")
    g.add_argument("--ema-img-size", type=int, help="EMA view size in pixels (default: the model's image size; "
                                                    "half of it with --eff)")
    g.add_argument("--loss-weights", type=float, nargs=4, default=[0.5, 0.5, 1.0, 2.0],
                   metavar=("ITC1", "ITC2", "SSL", "O2E"), help="weights of L_itc,1, L_itc,2, L_ssl, L_o2e "
                                                                  "(0 for SSL or O2E: that head is not built)")
    g.add_argument("--simclr-views", default="v1_v2", choices=["v1_v2", "v1_v1"],
                   help="SimCLR pairs view 1 with view 2, or view 1 with itself (the released code's bug)")
    g.add_argument("--simclr-tau", type=float, default=0.1, help="SimCLR temperature")
    g.add_argument("--ssl-hidden", type=int, help="hidden width of the SimCLR and BYOL heads (paper recipe 4096)")
    g.add_argument("--ssl-dim", type=int, help="output width of the SimCLR and BYOL heads (paper recipe 256)")
    g.add_argument("--ema-momentum", type=float,
                   help="EMA momentum at step 0, cosine to 1 at the last step (paper recipe 0.996)")
    g.add_argument("--freeze-patch-embed", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the patch-embedding conv at its random initialisation (released code)")
    g.add_argument("--photo-aug", choices=["aclip", "none"],
                   help="photometric augmentation of the online views: colour jitter, grayscale, blur, "
                        "solarize (paper recipe 'aclip')")
    g.add_argument("--save-masks", type=int, default=0,
                   help="every N steps write masks_<step>.png to --out-dir: views with kept and dropped patches")


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
class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch over all ranks, with their
    gradient (what SyncBatchNorm does; torch's SyncBatchNorm refuses CPU tensors, this one runs on gloo
    too). Two-pass: the mean, then the mean squared deviation, each summed over ranks by a gather with
    gradient of a (1, C) row per rank. Evaluation and a world of one use plain BatchNorm1d."""

    def forward(self, x):
        world = dist.get_world_size() if dist.is_initialized() else 1
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
    """`hidden_layers` × [Linear + BatchNorm + ReLU], then a Linear to `out` (spec §3.3)."""
    layers = []
    for i in range(hidden_layers):
        layers += [nn.Linear(dim if i == 0 else hidden, hidden, bias=bias), nn.BatchNorm1d(hidden), nn.ReLU(True)]
    return nn.Sequential(*layers, nn.Linear(hidden, out, bias=bias))


class ACLIP(CLIP):
    """CLIP + SimCLR head `image_mlp` + BYOL projector `im_proj_byol` and predictor `im_pred_byol`. A head
    whose loss weight is 0 is not built. The heads read the image [CLS] after ln_post (width D), not the
    joint embedding."""

    def __init__(self, cfg, args):
        super().__init__(**cfg)
        width, self.grid = cfg["width"], cfg["image_size"] // cfg["patch_size"]
        self.views = args.views
        self.w_itc1, self.w_itc2, self.w_ssl, self.w_o2e = args.loss_weights
        self.simclr_tau, self.simclr_same_view = args.simclr_tau, args.simclr_views == "v1_v1"
        if self.w_ssl > 0:   # SimCLR: D -> hidden -> hidden -> out, biases, BN in the hidden layers
            self.image_mlp = mlp_head(width, args.ssl_hidden, args.ssl_dim, 2, bias=True)
        if self.w_o2e > 0:   # BYOL: projector D -> hidden -> out and predictor out -> hidden -> out, no biases
            self.im_proj_byol = mlp_head(width, args.ssl_hidden, args.ssl_dim, 1, bias=False)
            self.im_pred_byol = mlp_head(args.ssl_dim, args.ssl_hidden, args.ssl_dim, 1, bias=False)
        if args.freeze_patch_embed:
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


def check_args(cfg, args):
    """Flag combinations that cannot work: a one-line UsageError before any training."""
    grid = cfg["image_size"] // cfg["patch_size"]
    if args.block_size < 1 or grid % args.block_size:
        raise common.UsageError(f"--block-size {args.block_size} does not divide the {grid}x{grid} patch grid of "
                                f"{args.model}; use a divisor of {grid} (1 keeps single patches)")
    if not 0 < args.keep_ratio <= 1:
        raise common.UsageError(f"--keep-ratio {args.keep_ratio} is not a fraction in (0, 1]; e.g. 0.5")
    if min(args.loss_weights) < 0:
        raise common.UsageError(f"--loss-weights {args.loss_weights} has a negative weight; use weights >= 0")
    if args.views == 1 and (args.loss_weights[1] or args.loss_weights[2]):
        raise common.UsageError("--views 1 has no second view for L_itc,2 or L_ssl; set their weights to 0, "
                                "e.g. --loss-weights 1 0 0 0")
    if args.simclr_tau <= 0:
        raise common.UsageError(f"--simclr-tau {args.simclr_tau} must be > 0; the paper uses 0.1")
    if args.save_masks < 0:
        raise common.UsageError(f"--save-masks {args.save_masks} must be >= 0 (0 = off)")
    if (args.eff or args.ema_img_size) and not needs_ema(args):
        raise common.UsageError("--eff / --ema-img-size set the EMA view, but no EMA pass runs (--mask is not "
                                "attentive and the O2E weight is 0); drop them")
    if args.eff and args.ema_img_size:
        raise common.UsageError("--eff and --ema-img-size both set the EMA view size; give one of them")
    size = ema_image_size(cfg, args)
    if size < cfg["patch_size"] or size % cfg["patch_size"]:
        raise common.UsageError(f"the EMA view size {size} px is not a positive multiple of the patch size "
                                f"{cfg['patch_size']}; use --ema-img-size {cfg['image_size']} (or --eff)")


def needs_ema(args):
    """The EMA encoder runs when it scores the tokens or gives the L_o2e target."""
    return args.mask == "attentive" or args.loss_weights[3] > 0


def ema_image_size(cfg, args):
    """Side of the EMA view in pixels: --ema-img-size, or half the image size with --eff (A-CLIP-eff)."""
    return args.ema_img_size or (cfg["image_size"] // 2 if args.eff else cfg["image_size"])


def build_model(cfg, args):
    check_args(cfg, args)
    model = ACLIP(cfg, args)
    if dist.is_initialized() and dist.get_world_size() > 1:
        global_batchnorm(model)  # SyncBN: the heads' BatchNorm sees the global batch (spec §3.2)
    return model


# ----------------------------------------------------------------------------------------------------
# <method> Masking
# ----------------------------------------------------------------------------------------------------
def cls_attention_score(maps, layers="all"):
    """The EMA encoder's [CLS] -> patch attention. maps: (layers, B, 1+N), every block's [CLS] row averaged
    over heads (Transformer(..., cls_attention=True)). Returns (B, N): the mean over layers (or the last
    layer) of the patch columns; not renormalised after the [CLS] column is dropped (spec §2.2)."""
    rows = maps.float().mean(0) if layers == "all" else maps[-1].float()     # (B, 1+N)
    return rows[:, 1:]                                                       # s_j, (B, N)


def align_to_view(score, box_view, box_ema, size):
    """Express an EMA-view map in an online view's coordinates. score: (B, gh, gw) over the EMA view;
    box_view, box_ema: (B, 4) crop boxes (left, top, w, h) as fractions of the source image; size: the
    output grid side. Samples the map bilinearly at the centres of a size × size grid over the view box;
    cells outside the EMA box score 0 (spec §2.3). Returns (B, size, size)."""
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
    """⌊G·ratio⌋ (+1 with the extra block), at least 1 and at most G: 25 of 49 at 224 px (spec §2.4)."""
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


def save_mask_grid(path, images, ema, boxes, keep, patch, mean, std, rows=8, tile=96):
    """A PNG with one row per sample: the EMA view with the online crop boxes drawn on it (if there is an
    EMA view), then each online view with its dropped patches darkened. images: (V·B, 3, S, S) view-major;
    ema: (B, 3, Se, Se) or None; boxes: (B, V+1, 4); keep: (V·B, K) or None."""
    B = boxes.shape[0]
    V = images.shape[0] // B
    n = min(rows, B)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def to_pil(x, kept=None):
        x = (x.detach().float().cpu() * std + mean).clamp(0, 1)                  # (3, s, s) in [0, 1]
        if kept is not None:
            x = x * (0.25 + 0.75 * kept)                                         # dropped patches darkened
        return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()).resize((tile, tile), Image.NEAREST)

    cols = V + (ema is not None)
    sheet = Image.new("RGB", (cols * (tile + 4), n * (tile + 4)), (255, 255, 255))
    colours = [(255, 64, 64), (64, 160, 255)]
    grid = images.shape[-1] // patch
    for i in range(n):
        c = 0
        if ema is not None:
            img = to_pil(ema[i])
            draw = ImageDraw.Draw(img)
            e = boxes[i, -1].tolist()
            for k in range(V):
                l, t, w, h = boxes[i, k].tolist()
                x0, y0 = (l - e[0]) / e[2] * tile, (t - e[1]) / e[3] * tile
                draw.rectangle([x0, y0, x0 + w / e[2] * tile - 1, y0 + h / e[3] * tile - 1], outline=colours[k % 2])
            sheet.paste(img, (0, i * (tile + 4)))
            c = 1
        for k in range(V):
            kept = None
            if keep is not None:
                kept = torch.zeros(grid * grid)
                kept[keep[k * B + i].cpu()] = 1
                kept = kept.view(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)  # (S, S)
            sheet.paste(to_pil(images[k * B + i], kept), ((c + k) * (tile + 4), i * (tile + 4)))
    sheet.save(path)


# ----------------------------------------------------------------------------------------------------
# <method> Losses
# ----------------------------------------------------------------------------------------------------
def simclr_loss(a, b, tau):
    """L_ssl, SimCLR's NT-Xent in SLIP's form, over all ranks. a, b: (B, d) this rank's two views (not yet
    normalised). Each anchor a_i has the positive b_i and the negatives b_j and a_j (j ≠ i) of the global
    batch; the same from b's side; the two directions are averaged. Gathered with gradient, so the ranks'
    losses average to the loss of one process on the whole batch."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, all_b = all_gather_with_grad(a), all_gather_with_grad(b)           # (world·B, d)
    labels = dist.get_rank() * a.shape[0] + torch.arange(a.shape[0], device=a.device)
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
# <method> Teacher / EMA
# ----------------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """The EMA model: copies of the image encoder (with its projection), the text transformer and its
    projection, and the BYOL projector. It scores the tokens and gives the L_o2e target; its text tower is
    used only to evaluate the EMA weights, with the online token and position embeddings and ln_final.
    No gradient; its BatchNorm always uses batch statistics (the released EMA branch runs in train mode)."""

    def __init__(self, model, args):
        super().__init__()
        self.visual = copy.deepcopy(model.visual)
        self.transformer = copy.deepcopy(model.transformer)
        self.text_projection = nn.Parameter(model.text_projection.detach().clone())
        self.im_proj_byol = copy.deepcopy(model.im_proj_byol) if hasattr(model, "im_proj_byol") else None
        self.score_layers = args.score_layers
        self.requires_grad_(False)

    def train(self, mode=True):  # always in train mode: batch statistics in the projector's BatchNorm
        return super().train(True)

    @torch.no_grad()
    def score_and_target(self, image, score=True):
        """image: (B, 3, Se, Se) the unmasked EMA view. Returns (s, z): s (B, N_e) the [CLS] attention
        score (None with score=False); z (B, d) the EMA projector's output (None without a projector)."""
        out = self.visual(image, cls_attention=score)
        tokens, maps = out if score else (out, None)                           # (B, 1+N_e, D), (layers, B, 1+N_e)
        s = cls_attention_score(maps, self.score_layers) if score else None
        z = self.im_proj_byol(self.visual.ln_post(tokens[:, 0])) if self.im_proj_byol is not None else None
        return s, z

    @torch.no_grad()
    def update(self, model, momentum):
        """θ_ema ← m·θ_ema + (1-m)·θ for every EMA-covered part (spec §3.4)."""
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


def build_teacher(model, args):
    return Teacher(model, args) if needs_ema(args) else None


def ema_momentum_at(step, total_steps, base):
    """m_t = 1 - (1 - base)·(1 + cos(π t / T)) / 2: base at step 0, 1 at the last step (spec §3.4)."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * min(step / max(1, total_steps), 1.0))) / 2


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
def photometric(img, rng):
    """The online views' augmentation (SLIP's, spec §3.1), drawn from the sample's rng: ColorJitter(0.4, 0.4,
    0.2, 0.1) with p 0.8 (its four operations in random order), grayscale p 0.2, Gaussian blur σ ∈ [0.1, 2]
    p 0.1, solarize at 128 p 0.2. No flip (it would break the alignment with the EMA map)."""
    if rng.random() < 0.8:
        ops = [(TF.adjust_brightness, rng.uniform(0.6, 1.4)), (TF.adjust_contrast, rng.uniform(0.6, 1.4)),
               (TF.adjust_saturation, rng.uniform(0.8, 1.2)), (TF.adjust_hue, rng.uniform(-0.1, 0.1))]
        rng.shuffle(ops)
        for op, factor in ops:
            img = op(img, factor)
    if rng.random() < 0.2:
        img = TF.to_grayscale(img, num_output_channels=3)
    if rng.random() < 0.1:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < 0.2:
        img = ImageOps.solarize(img, 128)
    return img


def ema_box(rng, crops, width, height, fix=True):
    """The EMA view's box (left, top, w, h) in pixels from the online crops' boxes. fix=True: the union of
    the crops, each edge then moved outward uniformly at random up to the image border, so that it
    encloses every crop. fix=False: the released geometry (spec §8.4): the left edge starts at min(left_1,
    height_2), and the size is drawn from the old edges after the top-left corner moved, so the box can
    miss parts of the crops."""
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
    """The A-CLIP views of one image (spec §3.1): V online crops (RandomResizedCrop boxes drawn
    independently, bilinear, photometric augmentation) and, when an EMA pass runs, the EMA view: a box
    around the crops (`ema_box`), resized to ema_size, normalised only. Returns (online (V, 3, S, S),
    boxes (V+1, 4) as (left, top, w, h) fractions of the source image with the EMA box last, and the EMA
    view (3, Se, Se) if ema_size)."""

    def __init__(self, size, ema_size, scale, mean, std, views=2, photo=True, fix=True):
        self.size, self.ema_size, self.scale, self.mean, self.std = size, ema_size, scale, mean, std
        self.views, self.photo, self.fix = views, photo, fix

    def __call__(self, img, rng):
        W, H = img.size
        crops = [common.crop_box(rng, W, H, self.scale) for _ in range(self.views)]
        online = []
        for left, top, w, h in crops:
            view = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
            online.append(common.to_normalized_tensor(photometric(view, rng) if self.photo else view,
                                                      self.mean, self.std))
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


def no_weight_decay(name, param):
    """As the released code: no decay for parameters with fewer than 2 dimensions (gains, biases, the
    temperature), except the [CLS] embedding, which timm keeps as a 3-D tensor and so is decayed there;
    position and token embeddings are decayed."""
    return param.ndim < 2 and name != "visual.class_embedding"


def train_step(forward, model, teacher, batch, step, total_steps, args, device):
    """forward: the DDP-wrapped (and maybe compiled) model; model: the raw module; batch: ((online, boxes[,
    ema]), texts, skipped) as the loader gave it, on the host. The EMA update, the EMA pass and the token
    selection run first, without gradient; then one forward of the student. Returns (loss, metrics)."""
    views, text, _ = batch
    online, boxes, text = to_device((views[0], views[1], text), device)   # (B, V, 3, S, S), (B, V+1, 4), (B, L)
    B, V = online.shape[:2]
    images = online.transpose(0, 1).flatten(0, 1)                            # (V·B, 3, S, S), view-major
    grid, block = model.grid, args.block_size
    n_keep = n_keep_blocks((grid // block) ** 2, args.keep_ratio, args.keep_extra_block)
    keep = target = ema = None
    metrics = {}
    if teacher is not None:
        momentum = ema_momentum_at(step, total_steps, args.ema_momentum)
        teacher.update(model, momentum)                                      # θ_ema ← m·θ_ema + (1-m)·θ, first
        ema = to_device(views[2], device)                                    # (B, 3, Se, Se)
        score, target = teacher.score_and_target(ema, score=args.mask == "attentive")
        metrics["ema_momentum"] = torch.full((), momentum, device=device)       # a fill, not a host copy
        if args.mask == "attentive":
            ema_grid = ema.shape[-1] // model.visual.patch_size
            keep = attentive_keep(score, ema_grid, boxes, V, grid, block, n_keep, args.attentive_keep == "most")
    if args.mask == "random":
        keep = random_keep(V * B, grid, block, n_keep, device)
    if args.save_masks and step % args.save_masks == 0 and is_main():
        save_mask_grid(os.path.join(args.out_dir, f"masks_{step:07d}.png"), images, ema, boxes, keep,
                       model.visual.patch_size, *common.NORMS[args.norm])
    loss, model_metrics = forward(images, text, keep=keep, target=target)
    return loss, {**model_metrics, **metrics}


def after_step(model, teacher, step, total_steps, args):
    """After each optimizer step: clamp the temperature's log to [0, ln 100]. (The EMA update runs at the
    start of the next step, in train_step.)"""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


# ----------------------------------------------------------------------------------------------------
# <method> Evaluation and export
# ----------------------------------------------------------------------------------------------------
def export_state_dicts(model_sd, teacher_sd):
    """OpenAI-layout state dicts of the weights to evaluate: 'online', and 'ema' (the EMA image encoder and
    projection, the EMA text transformer and projection, the online token and position embeddings,
    ln_final and logit_scale; spec "Evaluation weights")."""
    online = {k: v for k, v in model_sd.items() if k.startswith(OPENAI_PREFIXES)}
    out = {"online": online}
    if teacher_sd is not None:
        ema = dict(online)
        ema.update({k: v for k, v in teacher_sd.items() if k.startswith(("visual.", "transformer.", "text_projection"))})
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
    """Zero-shot top-1/top-5 of the online and the EMA weights on the held-out set, all tokens."""
    towers = {"online": (model.encode_image, model.encode_text)}
    if teacher is not None:
        towers["ema"] = (teacher.encode_image, lambda text: teacher.encode_text(model, text))
    results = {}
    for name, (encode_image, encode_text) in towers.items():
        classifier, loader = zero_shot_setup(encode_text, args, device)
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
