"""MaskDistill: masked distillation of a frozen CLIP teacher, from "A Unified View of Masked Image Modeling".
Z. Peng, L. Dong, H. Bao, Q. Ye, F. Wei. TMLR 2023, arXiv 2210.10615. The official code was never released
(microsoft/unilm `unimim/` holds a README only); the authors say it is based on BEiT v2, whose code
(microsoft/unilm `beit2/`) settles every detail the paper leaves open. This file is a reference.

Idea. The paper writes every masked-image-modelling method as five parts: a teacher T, a normalisation N
of the teacher's output, a student S that sees a corrupted image, a head H and a loss. MaskDistill picks
T = a frozen CLIP image encoder on the full image, N = LayerNorm without affine parameters, S = a BEiT
ViT in which a learned [MASK] token replaces ~40% of the patch embeddings (block-wise), H = one Linear
layer, and a Smooth-L1 loss at the masked patches only. No contrastive loss, no text, no EMA: the
language supervision arrives through the CLIP teacher's patch features.

Objective (Eq. 1, the unified view, with M the masked patches, |M| the same in every sample):
    L = 1/(|M|·D_t) Σ_{i∈M} Σ_c SmoothL1_β( H(S(x̃))_{i,c}, N(T(x))_{i,c} )
    x̃ = x with patch embeddings e_i ← e_i·(1 - m_i) + e_[MASK]·m_i        m_i = 1 for i ∈ M
    N(t) = (t - mean(t)) / sqrt(var(t) + 1e-5)   over the D_t channels of each teacher patch token
    T(x) = ln_post(CLIP_visual(x))[:, 1:] @ proj  (`--teacher-output`, default ln_post_proj)

Differs from the CLIP baseline (maskclip.py with `--dist-weight 0 --mlm-weight 0`) in every method section:
the student is a BEiT ViT, not a CLIP, and the only loss is the regression of the teacher's features.
The teacher is read with the shared `load_clip`, so it can be an export or checkpoint of maskclip.py,
aclip.py or silc.py, an OpenAI TorchScript archive or an OpenAI/open_clip state dict.

Project choices where the paper is silent (spec: shared/specs/maskdistill.md, "Decisions"; BEiT v2's code):
  - student: no absolute position embedding, one relative position bias shared by all blocks (zero init),
    q/v biases (no k bias), layer scale 0.1 (1e-5 from width 1024 on), LayerNorm eps 1e-6, trunc-normal
    init (std 0.02, cut at ±0.02) then attn.proj / mlp.c_proj of block l divided by sqrt(2l);
  - masking: BEiT v2's block-wise generator with an exact count, 75 of 196 patches (the same fraction,
    rounded, on other grids), blocks of at least 16 patches, aspect ratio in [0.3, 1/0.3], 10 tries per
    block, then a uniform fill up to the count; drawn per sample in the data loader;
  - teacher: the same augmented view as the student, unmasked; the student's pixels are converted on the
    device to the teacher's normalisation (the one its file records, else CLIP's); a teacher with another
    patch size gets its input resized to student grid × teacher patch and its position embedding
    interpolated; any other grid mismatch is an error. Target N(ln_post(·) @ proj), 512-d for CLIP-B/16;
  - loss: Smooth-L1 with β = 1.0, averaged over masked tokens and channels;
  - recipe: BEiT v2's 300-epoch ViT-B recipe (batch 2048, AdamW (0.9, 0.98), lr 1.5e-3 from 0 over 10
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
import argparse
import contextlib
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

METHOD = "maskdistill"
DATA_KIND = "image"  # what the training data must provide: image-text pairs, or images alone

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
# The paper's recipe: the defaults whenever --train-data is given (BEiT v2's 300-epoch ViT-B/16 ImageNet-1k
# recipe, which the authors say MaskDistill is based on; spec "Training recipe").
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

TEACHER_OUTPUTS = ["ln_post_proj", "ln_post", "pre_ln_post"]


def add_method_args(p):
    g = p.add_argument_group("MaskDistill")
    g.add_argument("--teacher", help="the frozen CLIP teacher: a checkpoint or export of maskclip.py, aclip.py or "
                                     "silc.py, an OpenAI CLIP TorchScript archive or an OpenAI/open_clip ViT state dict "
                                     "(required)")
    g.add_argument("--teacher-output", default="ln_post_proj", choices=TEACHER_OUTPUTS,
                   help="teacher patch features to regress: after ln_post and the projection (BEiT v2's CLIP "
                        "target), after ln_post, or the last block's raw output")
    g.add_argument("--teacher-act", choices=["quickgelu", "gelu"],
                   help="the teacher's MLP activation (default: what its file records, else quickgelu as in "
                        "OpenAI's weights; LAION open_clip weights need gelu)")
    g.add_argument("--teacher-norm", default="file", choices=["file", *common.NORMS],
                   help="the teacher's pixel normalisation: 'file' takes the one its file records, else CLIP's")
    g.add_argument("--target-norm", default="layernorm", choices=["layernorm", "none"],
                   help="N of the unified view: LayerNorm without affine parameters on each target token, or none")
    g.add_argument("--loss", default="smooth-l1", choices=["smooth-l1", "mse", "cosine"],
                   help="regression loss at the masked patches")
    g.add_argument("--smooth-l1-beta", type=float, default=1.0, help="β of the Smooth-L1 loss (2.0: data2vec's)")
    g.add_argument("--mask-type", default="block", choices=["block", "random"],
                   help="BEiT v2's block-wise masking, or uniformly random patches (the same count)")
    g.add_argument("--num-mask-patches", type=int,
                   help="patches masked in every image (default: 75 of 196 at 224/16; the same fraction, rounded, "
                        "on other grids)")
    g.add_argument("--min-mask-patches-per-block", type=int, help="smallest block of the block-wise generator "
                                                                  "(recipe 16)")
    g.add_argument("--layer-scale-init", type=float,
                   help="initial layer-scale γ (default 0.1, or 1e-5 from width 1024 on, as BEiT v2; 0 = off)")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block "
                                                                "(BEiT v2: 0 for 300 epochs, 0.1 for 1600)")
    g.add_argument("--color-jitter", type=float, help="brightness, contrast and saturation jitter (recipe 0.4)")
    g.add_argument("--knn-samples", type=int, help="training images whose features the k-NN evaluation votes with")


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
def trunc_normal_(tensor, std=0.02):
    """BEiT's initialisation: normal(0, std) truncated at ±std."""
    return nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)


def drop_path(x, rate, training):
    """Stochastic depth: drop a sample's whole residual branch with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - rate)    # (B, 1, 1)
    return x * keep / (1 - rate)


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


class MaskDistill(nn.Module):
    """The student S (a BEiT ViT that takes a [MASK] token at the masked patches) and the head H (one
    Linear from the width D to the teacher's feature size D_t)."""

    def __init__(self, cfg, target_dim, layer_scale, drop_path_rate=0.0, loss="smooth-l1", beta=1.0):
        super().__init__()
        width, heads, layers, patch = cfg["width"], cfg["heads"], cfg["layers"], cfg["patch_size"]
        self.grid = cfg["image_size"] // patch
        self.loss_kind, self.beta = loss, beta
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.rel_pos_bias = RelativePositionBias(self.grid, self.grid, heads)
        rates = torch.linspace(0, drop_path_rate, layers).tolist()                 # stochastic depth grows with depth
        self.blocks = nn.ModuleList([BEiTBlock(width, heads, cfg["act"], layer_scale, r) for r in rates])
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


def gather_tokens(x, index):
    """x: (B, N, D), index: (B, K) -> (B, K, D), without boolean indexing (fixed shapes, no host sync)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def layer_scale_init(args, cfg):
    """--layer-scale-init, or BEiT v2's default for the width: 0.1 for base and smaller, 1e-5 for large and huge."""
    if args.layer_scale_init is not None:
        return args.layer_scale_init
    return 0.1 if cfg["width"] < 1024 else 1e-5


def build_model(cfg, args):
    """The student and head. The head's output size is the teacher's feature size, read from --teacher, which
    is checked here with the evaluation data: a missing or wrong teacher fails before anything else is built."""
    spec = teacher_spec(*read_teacher(args), args, cfg)
    check_knn_data(args)
    model = MaskDistill(cfg, spec["target_dim"], layer_scale_init(args, cfg), args.drop_path, args.loss,
                        args.smooth_l1_beta)
    model.grad_checkpointing = args.grad_checkpointing
    return model


# ----------------------------------------------------------------------------------------------------
# <method> Masking
# ----------------------------------------------------------------------------------------------------
class BlockMaskGenerator:
    """BEiT v2's block-wise masking with an exact count: rectangles of at least `min_block` patches, aspect
    ratio log-uniform in [min_aspect, 1/min_aspect], each placed uniformly (10 tries), until `num_masked`
    patches are covered or no block fits; then a uniform fill of single patches up to exactly `num_masked`.
    Called on the host with the sample's random.Random (common.py's randomness contract).
    `random=True` draws the same number of patches uniformly instead (the random-masking ablation)."""

    def __init__(self, grid, num_masked, min_block=16, max_block=None, min_aspect=0.3, attempts=10, random=False):
        self.gh, self.gw = grid
        n = self.gh * self.gw
        if not 0 < num_masked < n:
            raise common.UsageError(f"--num-mask-patches {num_masked} must be between 1 and {n - 1} for the "
                                    f"{self.gh}×{self.gw} patch grid")
        if min_block < 1:
            raise common.UsageError(f"--min-mask-patches-per-block {min_block} must be at least 1")
        self.num_masked, self.min_block = num_masked, min_block
        self.max_block = max_block or num_masked
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
    the mean over the global batch."""
    pred = pred.float()
    if kind == "smooth-l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if kind == "mse":
        return F.mse_loss(pred, target)
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


# ----------------------------------------------------------------------------------------------------
# <method> Teacher / EMA
# ----------------------------------------------------------------------------------------------------
TEACHER_HOWTO = ("to get a teacher, run `torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip` "
                 "first (the quickest CLIP-family demo run, about 2 minutes) and pass --teacher runs/clip/export_online.pt")


class Teacher(nn.Module):
    """T of Eq. 1: a frozen CLIP image tower (the shared VisionTransformer, OpenAI layout). It sees the
    student's augmented view unmasked, converted to its own pixel normalisation and, for another patch size,
    resized to student grid × teacher patch (its position embedding is then interpolated). No gradient,
    always in eval mode, outside DDP, and not saved in checkpoints (`frozen`): a resumed run reads --teacher
    again."""
    frozen = True

    def __init__(self, visual, spec, output="ln_post_proj", target_norm="layernorm", student_norm=None):
        super().__init__()
        self.visual, self.output, self.target_norm = visual, output, target_norm
        self.input_size = spec["input_size"]
        s_mean, s_std = student_norm or common.NORMS["imagenet"]
        for name, value in (("s_mean", s_mean), ("s_std", s_std), ("t_mean", spec["mean"]), ("t_std", spec["std"])):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.knn_results = None  # the teacher's k-NN figures: it never changes, so they are computed once
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # always in eval mode
        return super().train(False)

    def pixels(self, image):
        """Student pixels (normalised with --norm) -> the teacher's input: back to [0, 1], resized bicubically
        if the teacher needs another size, then normalised with the teacher's mean and std. (B, 3, S, S)."""
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


def teacher_path(args):
    if not args.teacher:
        raise common.UsageError(f"MaskDistill distils a frozen CLIP image tower given by --teacher PATH; {TEACHER_HOWTO}")
    return args.teacher


def read_teacher(args):
    """The teacher file's OpenAI-layout state dict and what it says about itself; one line on any problem."""
    teacher_path(args)
    try:
        return openai_state_dict(args.teacher)
    except common.UsageError as e:
        raise common.UsageError(f"--teacher: {e}; {TEACHER_HOWTO}") from None


def teacher_spec(sd, info, args, cfg):
    """What the student needs to know about the teacher, read off its weights: the target size D_t, the
    input size (student grid × teacher patch) and the pixel normalisation. Checks the grid alignment."""
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj"]
    if any(k not in sd for k in needed):
        raise common.UsageError(f"--teacher {args.teacher} lacks {[k for k in needed if k not in sd]}, so it is not "
                                f"a CLIP ViT image tower; {TEACHER_HOWTO}")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    teacher_grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    grid = cfg["image_size"] // cfg["patch_size"]
    if patch == cfg["patch_size"] and teacher_grid != grid:
        raise common.UsageError(
            f"--teacher {args.teacher} has a {teacher_grid}×{teacher_grid} grid of {patch}-px patches "
            f"({teacher_grid * patch} px), the {args.model} student a {grid}×{grid} grid of the same patches; "
            f"the grids must match: pick a --model at {teacher_grid * patch} px or a teacher at {cfg['image_size']} px")
    if args.teacher_norm != "file":
        mean, std = common.NORMS[args.teacher_norm]
    else:
        mean, std = common.NORMS[info.get("norm") if info.get("norm") in common.NORMS else "clip"]
    target_dim = sd["visual.proj"].shape[1] if args.teacher_output == "ln_post_proj" else width
    return dict(target_dim=target_dim, input_size=grid * patch, mean=mean, std=std)


def build_teacher(model, args):
    """The frozen CLIP image tower of --teacher, loaded with strict checks by the shared load_clip."""
    cfg = model_config(args)
    try:
        clip, info = load_clip(teacher_path(args), act=args.teacher_act)
    except common.UsageError as e:
        raise common.UsageError(f"--teacher: {e}; {TEACHER_HOWTO}") from None
    spec = teacher_spec(clip.state_dict(), info, args, cfg)
    visual = clip.visual
    visual.transformer.grad_checkpointing = False
    return Teacher(visual, spec, args.teacher_output, args.target_norm, common.NORMS[args.norm])


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
class MaskedView:
    """The training transform, on the host: colour jitter, RandomResizedCrop (bicubic) + flip, normalisation,
    and the sample's mask. (img, rng) -> (image (3, S, S), masked (N_m,) indices of the masked patches in
    row-major order). The teacher gets the same view, unmasked."""

    def __init__(self, args, cfg):
        mean, std = common.NORMS[args.norm]
        self.crop = common.TrainCrop(cfg["image_size"], (args.crop_scale, 1.0), mean, std, flip=True)
        self.jitter = args.color_jitter
        grid = cfg["image_size"] // cfg["patch_size"]
        self.masks = BlockMaskGenerator((grid, grid), num_mask_patches(args, cfg), args.min_mask_patches_per_block,
                                        random=args.mask_type == "random")

    def __call__(self, img, rng):
        if self.jitter > 0:  # torchvision's ColorJitter(b, c, s): the three factors, in a random order
            ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
            rng.shuffle(ops)
            for op in ops:
                img = op(img, rng.uniform(max(0.0, 1 - self.jitter), 1 + self.jitter))
        image = self.crop(img, rng)
        return image, torch.from_numpy(np.flatnonzero(self.masks(rng)))           # (3, S, S), (N_m,)


def train_transform(args, cfg):
    return MaskedView(args, cfg)


def no_weight_decay(name, param):
    """BEiT v2's groups: no weight decay for 1-D weights (LayerNorm, layer scale, q/v biases), biases and the
    [CLS] token; the [MASK] token and the relative position table are decayed."""
    return param.ndim < 2 or name.endswith(".bias") or name == "cls_token"


def train_step(forward, model, teacher, batch, step, total_steps, args, device):
    """forward: the DDP-wrapped (and maybe compiled) model; batch: ((images, masked), labels, skipped) on the
    host, the masks drawn by the transform. The teacher's pass runs before, without gradient."""
    (image, masked), _, _ = batch
    image, masked = to_device((image, masked), device)
    target = gather_tokens(teacher.targets(image), masked)                        # N(T(x)) at M: (B, N_m, D_t)
    return forward(image, masked, target)


def after_step(model, teacher, step, total_steps, args):
    """Nothing: the teacher is frozen and there is no temperature to clamp."""


# ----------------------------------------------------------------------------------------------------
# <method> Evaluation and export
# ----------------------------------------------------------------------------------------------------
def export_state_dicts(model_sd, teacher_sd):
    """Nothing to export in OpenAI layout: the student is a BEiT ViT, not a CLIP (its weights are in the
    checkpoint; eval_towers reads them)."""
    return {}


def eval_towers(ckpt):
    """What eval_zeroshot.py evaluates in a checkpoint of this script: {"student": MaskDistill}, whose
    features(x) -> (B, D) is the mean-pooled final patch tokens."""
    args = argparse.Namespace(**ckpt["args"])
    model = MaskDistill(ckpt["config"], ckpt["model"]["head.weight"].shape[0], layer_scale_init(args, ckpt["config"]))
    load_strict(model, ckpt["model"], f"the student of a {METHOD} checkpoint", f"a {METHOD} student")
    return {"student": model.eval()}


def knn_datasets(args, cfg):
    """The k-NN's training set (args.knn_samples images) and held-out set, and the number of classes: the
    built-in shapes' train and held-out splits, or, with --imagenet-val, evenly spaced images of the
    --train-data ImageFolder and the --imagenet-val folder."""
    mean, std = common.NORMS[args.norm]
    transform = common.EvalTransform(cfg["image_size"], mean, std)
    test, classnames, _ = eval_dataset(args, cfg)
    if not args.imagenet_val:
        train = common.Shapes("train", length=args.knn_samples, transform=transform, target="label")
        return train, test, len(classnames)
    check_knn_data(args)
    full = common.ImageFolder(args.train_data, transform)
    if full.classes != test.classes:
        raise common.UsageError(f"--train-data {args.train_data} and --imagenet-val {args.imagenet_val} have "
                                f"different class folders; the k-NN needs the same classes in both")
    index = torch.linspace(0, len(full) - 1, min(args.knn_samples, len(full))).round().long().unique().tolist()
    return torch.utils.data.Subset(full, index), test, len(test.classes)


def check_knn_data(args):
    """At start-up: --imagenet-val needs an ImageFolder --train-data with the same classes for the k-NN."""
    if args.imagenet_val and not (args.train_data and os.path.isdir(args.train_data)):
        raise common.UsageError(f"--imagenet-val {args.imagenet_val}: the k-NN evaluation takes its training features "
                                f"from an ImageFolder --train-data with the same classes; give one, or drop --imagenet-val")
    if args.imagenet_val and not os.path.isdir(args.imagenet_val):
        raise common.UsageError(f"--imagenet-val {args.imagenet_val} is not a folder; give an ImageFolder "
                                f"(root/<class>/<image>) of held-out images")


@torch.no_grad()
def evaluate(model, teacher, args, device):
    """k-NN top-1 (cosine, k = 20, T = 0.07) of the student's mean-pooled patch tokens on the held-out set,
    next to the frozen teacher's, with CLIP's image embedding and with its mean-pooled targets N(T(x))."""
    cfg = model_config(args)
    train, test, num_classes = knn_datasets(args, cfg)
    loaders = [common.eval_loader(ds, 256, dist.get_rank(), dist.get_world_size(), args.workers) for ds in (train, test)]

    def knn(encode):
        (train_x, train_y), (test_x, test_y) = (extract_features(encode, loader, device) for loader in loaders)
        return train_x, train_y, test_x, test_y

    results = {"student/knn_top1": knn_accuracy(*knn(model.features), num_classes)}
    if teacher.knn_results is None:
        train_x, train_y, test_x, test_y = knn(teacher.knn_features)
        e = teacher.visual.proj.shape[1]
        teacher.knn_results = {
            "teacher/knn_top1": knn_accuracy(train_x[:, :e], train_y, test_x[:, :e], test_y, num_classes),
            "teacher_targets/knn_top1": knn_accuracy(train_x[:, e:], train_y, test_x[:, e:], test_y, num_classes)}
    return {**results, **teacher.knn_results}


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
