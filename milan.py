"""MILAN: Masked Image Pretraining on Language Assisted Representation.
Z. Hou, F. Sun, Y.-K. Chen, Y. Xie, S.-Y. Kung. arXiv 2208.06049 (2022); ICASSP 2025.
Official code: github.com/zejiangh/MILAN (an MAE fork); spec: shared/specs/milan.md.

Idea. MAE, with a frozen CLIP image tower in three roles: (1) target: the student regresses CLIP's
per-token outputs (all 1+N tokens after ln_post and the projection into the joint space) instead of
pixels; (2) semantic-aware masking: CLIP's last-block [CLS]->patch attention, averaged over heads,
weights the patches, which are drawn without replacement; the first K drawn are visible, so salient
patches are kept more often; (3) prompting decoder: the encoder's CLS and visible tokens are fixed
prompts that no decoder block updates; only the mask tokens are queries.

Equations (spec §3-§7; N patches, K = int(N·(1 - r)) visible, M = N - K masked; the paper's own
equation numbers were not available, so the code cites these labels):
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

Project choices (the paper is silent or the official code is wrong; spec "Decisions"):
  - the teacher reads the student's crop re-normalised with --teacher-norm (ImageNet, as the official
    code does, whatever the teacher was trained with); its grid must equal the student's;
  - sampling without replacement is Gumbel-top-k (argsort of log w + Gumbel noise; the same
    distribution as torch.multinomial(w, N, replacement=False), which syncs the host); w gets + 1e-12;
  - the cosine uses F.normalize(eps=1e-6); k-NN top-1 (cosine, k = 20, T = 0.07) of the encoder's [CLS]
    after the final norm is the evaluation; the teacher's [CLS] embedding gets the same k-NN for comparison;
  - --target pixels (the MAE ablation) regresses per-patch normalised pixels (MAE's norm_pix_loss);
  - cls_token and mask_token are weight-decayed as in the official code (only 1-D tensors are exempt);
  - bf16 autocast on CUDA instead of fp16 + GradScaler (--precision fp16 restores the latter).
Official-code bugs not reproduced (spec §11): the teacher is per-token (ln_post on every token, then
proj), not the 1000-way head that `build_clip_model(sd, 'base')` builds; the teacher is not DDP-wrapped
and one process works; the MAE-decoder ablation predicts C_t and honours --mask; no dead options
(--norm_pix_loss, --average_targets, --cluster_loss, --use_ablation_model, the sample index, the
prototype loss); no hard-coded teacher path; no undefined DropPath.

Run:
    torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip        # a demo CLIP teacher
    torchrun milan.py --teacher runs/clip/export_online.pt                          # built-in demo, CPU
    torchrun --nproc_per_node=8 milan.py --train-data imagenet/train --imagenet-val imagenet/val \
        --teacher ViT-B-16.pt                  # OpenAI's CLIP ViT-B/16, the official teacher; global batch 4096
    ablations: --mask random, --decoder mae, --target pixels (with --mask random: plain MAE, no teacher)

Left out: the fine-tuning, linear-probe, detection and segmentation recipes, gradient accumulation
(the official 4096 batch is 256 × 8 GPUs × 2 accumulation steps; here --batch-size is the global batch
of one step), and the SLIP/DINO teachers of the official repository.
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

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from PIL import Image
from tqdm import tqdm

import common

METHOD = "milan"
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
# The official recipe (PRETRAIN.sh, spec §9.1): the defaults whenever --train-data is given.
# lr 2.4e-3 = base lr 1.5e-4 · 4096 / 256; 40 warm-up epochs from 0, cosine to 0; no gradient clipping.
RECIPE = dict(model="ViT-B/16", batch_size=4096, epochs=400, lr=2.4e-3, lr_start=0.0, lr_end=0.0,
              warmup_epochs=40.0, act="gelu", wd=0.05, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=0.0,
              norm="imagenet", crop_scale=0.2, eval_every=0.0, workers=10, dec_width=512, dec_depth=8,
              dec_heads=16, knn_samples=100_000)
# The built-in demo: tiny student (32 px, 4×4 patches) on the shapes, behind the demo CLIP teacher.
DEMO = dict(model="tiny", batch_size=128, epochs=3, lr=1.5e-3, warmup_epochs=0.25, lr_end=1e-5,
            crop_scale=0.5, builtin_samples=16384, workers=1, dec_width=128, dec_depth=2, dec_heads=4,
            knn_samples=4096)

TEACHER_HOWTO = ("to get a teacher, run `torchrun maskclip.py --dist-weight 0 --mlm-weight 0 --out-dir runs/clip` "
                 "first (the quickest CLIP-family demo run, about 2 minutes) and pass "
                 "--teacher runs/clip/export_online.pt")


def add_method_args(p):
    g = p.add_argument_group("MILAN")
    g.add_argument("--teacher", help="frozen CLIP teacher: an export or checkpoint of maskclip.py/aclip.py/silc.py, "
                                     "an OpenAI CLIP TorchScript archive or an OpenAI/open_clip ViT state dict "
                                     "(paper: OpenAI CLIP ViT-B/16); its patch grid must equal the student's")
    g.add_argument("--teacher-act", choices=["quickgelu", "gelu"],
                   help="the teacher's MLP activation (default: what its file records, else quickgelu as in "
                        "OpenAI's weights; LAION open_clip weights need gelu)")
    g.add_argument("--teacher-norm", default="imagenet", choices=["file", *common.NORMS],
                   help="the teacher's pixel normalisation, converted from --norm on the device (official code: "
                        "imagenet, whatever the teacher was trained with; 'file': the one its file records, else "
                        "CLIP's)")
    g.add_argument("--mask", default="semantic", choices=["semantic", "random"],
                   help="semantic: patches drawn without replacement with the teacher's [CLS] attention as "
                        "weights, the first K visible (paper); random: MAE's uniform masking (ablation)")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches masked")
    g.add_argument("--decoder", default="prompting", choices=["prompting", "mae"],
                   help="prompting: CLS and visible tokens are fixed prompts, only mask tokens are updated "
                        "(paper); mae: MAE's self-attention decoder over all tokens (ablation)")
    g.add_argument("--target", default="clip", choices=["clip", "pixels"],
                   help="clip: the teacher's output tokens (paper); pixels: per-patch normalised pixels (MAE)")
    g.add_argument("--loss-on", choices=["all", "masked"],
                   help="tokens the loss averages over (default: all 1+N tokens for --target clip, as the "
                        "official code; masked patches for --target pixels, as MAE)")
    g.add_argument("--dec-depth", type=int, help="decoder blocks (paper recipe 8)")
    g.add_argument("--dec-width", type=int, help="decoder width (paper recipe 512)")
    g.add_argument("--dec-heads", type=int, help="decoder heads (paper recipe 16)")
    g.add_argument("--knn-samples", type=int, help="training images whose features the k-NN evaluation votes with")
    g.add_argument("--save-masks", type=int, default=0,
                   help="every this many steps write a PNG of the masks (crop, teacher attention, visible "
                        "patches) to OUT_DIR/masks (0 = never)")


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
    """MAE's fixed 2-D sin-cos position embedding, with an all-zero [CLS] row first: (1 + grid², dim).
    The first half of the channels encodes the column, the second half the row."""
    if dim % 4:
        raise common.UsageError(f"the sin-cos position embedding needs a width divisible by 4, not {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))   # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out_x, out_y = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega                 # (grid², dim/4)
    emb = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)         # (grid², dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


def mae_init(module):
    """MAE's initialisation: Xavier-uniform for every Linear (q, k, v packed as one matrix, as timm's
    fused qkv) and for the patch embedding seen as a Linear, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, Attention):
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.data.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            m.eps = 1e-6  # timm's norm_layer = partial(nn.LayerNorm, eps=1e-6)
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MAEEncoder(nn.Module):
    """The student: MAE's ViT (pre-norm blocks with qkv bias and GELU, no ln_pre, a final LayerNorm,
    fixed sin-cos positions, [CLS] token). It encodes the [CLS] token and the visible patches only."""

    def __init__(self, cfg):
        super().__init__()
        width, self.patch_size = cfg["width"], cfg["patch_size"]
        self.grid = cfg["image_size"] // cfg["patch_size"]
        self.patch_embed = nn.Conv2d(3, width, self.patch_size, self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_2d(self.grid, width), persistent=False)   # (1+N, D), fixed
        self.blocks = Transformer(width, cfg["layers"], cfg["heads"], cfg["act"])
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
    """One block of the prompting decoder (spec §6.2), with the parameters of a shared block. Queries
    come from the mask tokens only; keys and values from [prompts; LN1(mask tokens)], the prompts raw
    (no LayerNorm); the residual and MLP update the mask tokens only. The prompts are read, never written."""

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
    whole training computation of a step and returns (loss, metrics)."""

    def __init__(self, cfg, args, target_dim):
        super().__init__()
        self.encoder = MAEEncoder(cfg)
        self.grid, self.patch_size = self.encoder.grid, cfg["patch_size"]
        self.decoder_kind, self.target = args.decoder, args.target
        self.loss_on = args.loss_on or ("all" if args.target == "clip" else "masked")
        dw, n = args.dec_width, self.grid ** 2
        if not 0 < num_visible(n, args.mask_ratio) < n:
            raise common.UsageError(f"--mask-ratio {args.mask_ratio} leaves {num_visible(n, args.mask_ratio)} of {n} "
                                    f"patches visible; it must leave at least one visible and one masked")
        if dw % args.dec_heads:
            raise common.UsageError(f"--dec-width {dw} is not divisible by --dec-heads {args.dec_heads}")
        self.decoder_embed = nn.Linear(cfg["width"], dw)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dw))
        self.register_buffer("decoder_pos", sincos_2d(self.grid, dw), persistent=False)   # (1+N, Dd), fixed
        block = PromptingBlock if args.decoder == "prompting" else ResidualAttentionBlock
        self.decoder_blocks = nn.ModuleList([block(dw, args.dec_heads, cfg["act"]) for _ in range(args.dec_depth)])
        self.decoder_norm = nn.LayerNorm(dw)
        out = target_dim if args.target == "clip" else 3 * self.patch_size ** 2
        self.decoder_pred = nn.Linear(dw, out)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            mae_init(part)
        if args.decoder == "prompting":  # q and kv are two Linears in the official code, each Xavier'd
            for b in self.decoder_blocks:
                nn.init.xavier_uniform_(b.attn.in_proj_weight.data[:dw])
                nn.init.xavier_uniform_(b.attn.in_proj_weight.data[dw:])
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
        teacher's tokens (--target clip). Returns (loss, metrics)."""
        pred = self.predict(image, keep, masked)
        if self.target == "clip":
            loss, per_token = milan_loss(pred, targets, masked if self.loss_on == "masked" else None)
            patches = per_token[:, 1:].detach()                                # (B, N)
        else:
            loss, patches = pixel_loss(pred[:, 1:], image, self.patch_size,
                                       masked if self.loss_on == "masked" else None)
            patches = patches.detach()                                         # (B, N)
        metrics = {"loss_masked": patches.gather(1, masked).mean(), "loss_visible": patches.gather(1, keep).mean()}
        return loss, metrics


def build_model(cfg, args):
    """The student. The frozen teacher is loaded first, at start-up, because its output width C_t sets
    decoder_pred's; build_teacher hands it on. It is kept outside the model's modules, so that it is in
    neither the state dict nor DDP. A missing or wrong teacher or evaluation folder fails here, first."""
    check_knn_data(args)
    teacher = load_teacher(args, cfg)
    model = MILAN(cfg, args, teacher.embed_dim if teacher is not None else 0)
    model.__dict__["loaded_teacher"] = teacher
    return model


# ----------------------------------------------------------------------------------------------------
# <method> Masking
# ----------------------------------------------------------------------------------------------------
def num_visible(num_patches, mask_ratio):
    """K = int(N·(1 - r)): 49 of 196 patches at r = 0.75 (the official code's rounding)."""
    return int(num_patches * (1 - mask_ratio))


def semantic_masking(weights, mask_ratio, generator=None):
    """Semantic-aware masking (spec §4). weights: (B, N) non-negative, the teacher's [CLS] attention to
    each patch. Draws all N patches without replacement with P(next = i) ∝ w_i among those left
    (Plackett-Luce, what torch.multinomial(w, N, replacement=False) does); the first K drawn are visible,
    so high-attention patches are kept more often. Drawn as Gumbel-top-k: sorting log w_i + g_i,
    g_i ~ Gumbel(0, 1), in decreasing order gives that same distribution without a host sync.
    Returns keep (B, K) and masked (B, N - K) patch indices."""
    w = weights.float() + 1e-12                                      # no zero weight (spec: safety margin)
    gumbel = -torch.empty_like(w).exponential_(generator=generator).log()        # (B, N), -log Exp(1)
    order = (w.log() + gumbel).argsort(dim=1, descending=True)      # (S): (B, N) a Plackett-Luce permutation
    k = num_visible(w.shape[1], mask_ratio)
    return order[:, :k], order[:, k:]


def random_masking(batch, num_patches, mask_ratio, device, generator=None):
    """MAE's random masking, the ablation: argsort of uniform noise. Returns keep (B, K), masked (B, N - K)."""
    order = torch.rand(batch, num_patches, device=device, generator=generator).argsort(dim=1)   # (B, N)
    k = num_visible(num_patches, mask_ratio)
    return order[:, :k], order[:, k:]


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
    """L = mean over tokens of 2 − 2·cos(pred, T) = ‖p̂ − t̂‖² (spec §7). pred, target: (B, 1+N, C),
    [CLS] first. masked=None averages over all B×(1+N) tokens, [CLS] and visible included (the official
    code); masked: (B, M) patch indices averages over the masked patches only (--loss-on masked).
    Returns (loss, per-token distances (B, 1+N))."""
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
# <method> Teacher / EMA
# ----------------------------------------------------------------------------------------------------
# (no EMA: MILAN's teacher is a frozen CLIP image tower, read from --teacher)
class CLIPTeacher(nn.Module):
    """The frozen CLIP image tower (spec §3): fp32 weights, eval mode for good, no gradient, not in the
    optimiser, not wrapped in DDP, not saved in checkpoints (`frozen`; it is read from --teacher again
    on resume). It reads the student's unmasked crop, re-normalised from the student's normalisation
    to the teacher's on the device: x_t = (x·σ_s + μ_s - μ_t) / σ_t."""
    frozen = True

    def __init__(self, visual, student_norm, teacher_norm):
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
        tokens, attn = self.visual(x, cls_attention=True)           # (B, 1+N, W), (layers, B, 1+N)
        targets = self.visual.ln_post(tokens) @ self.visual.proj    # (T): (B, 1+N, C_t)
        return targets, attn[-1, :, 1:]                             # (W): (B, N), the last block's row

    @torch.no_grad()
    def features(self, image):
        """The teacher's image embedding ([CLS] after ln_post, projected), for the comparison k-NN: (B, C_t)."""
        x = image * self.scale.to(image.dtype) + self.shift.to(image.dtype)
        return self.visual.ln_post(self.visual(x)[:, 0]) @ self.visual.proj


def needs_teacher(args):
    """Only plain MAE (--target pixels --mask random) runs without a teacher."""
    return args.target == "clip" or args.mask == "semantic"


def load_teacher(args, cfg):
    """The CLIPTeacher of --teacher, loaded with strict checks by the shared load_clip and checked at
    start-up: every failure is one line that says how to get a teacher."""
    if not needs_teacher(args):
        return None
    if not args.teacher:
        raise common.UsageError(f"MILAN needs a frozen CLIP image tower as teacher (--teacher PATH); {TEACHER_HOWTO}")
    try:
        clip, info = load_clip(args.teacher, act=args.teacher_act)
    except common.UsageError as e:
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
    return CLIPTeacher(v, common.NORMS[args.norm], common.NORMS[norm])


def build_teacher(model, args):
    return model.__dict__.pop("loaded_teacher", None)


# ----------------------------------------------------------------------------------------------------
# <method> Training step
# ----------------------------------------------------------------------------------------------------
def train_transform(args, cfg):
    """RandomResizedCrop(scale (crop_scale, 1), bicubic) + horizontal flip + normalisation (MAE's)."""
    mean, std = common.NORMS[args.norm]
    return common.TrainCrop(cfg["image_size"], (args.crop_scale, 1.0), mean, std, flip=True)


def no_weight_decay(name, param):
    """Biases and LayerNorm gains (1-D) only: cls_token and mask_token, (1, 1, D), are decayed, as in
    the official code (timm 0.3.2's add_weight_decay). The position embeddings are fixed buffers."""
    return param.ndim < 2


def make_masks(attn, batch, num_patches, args, device):
    """(keep (B, K), masked (B, M)) for the step: semantic-aware from the teacher's attention, or random."""
    if args.mask == "semantic":
        return semantic_masking(attn, args.mask_ratio)
    return random_masking(batch, num_patches, args.mask_ratio, device)


def train_step(forward, model, teacher, batch, step, total_steps, args, device):
    """forward: the DDP-wrapped model; batch: (images, labels, skipped) on the host; the labels are not
    used. The frozen teacher runs first, under no_grad; then one call of forward. Returns (loss, metrics)."""
    image = to_device(batch[0], device)                            # (B, 3, H, W)
    targets = attn = None
    if teacher is not None:
        targets, attn = teacher(image)                             # (B, 1+N, C_t), (B, N)
    keep, masked = make_masks(attn, image.shape[0], model.grid ** 2, args, device)
    if args.save_masks and step % args.save_masks == 0 and is_main():
        save_mask_grid(os.path.join(args.out_dir, "masks", f"step{step:07d}.png"), image, attn, keep,
                       model.grid, args.norm)
    return forward(image, keep, masked, targets if args.target == "clip" else None)


def after_step(model, teacher, step, total_steps, args):
    """Nothing to do: the teacher is frozen and there is no temperature to clamp."""


# ----------------------------------------------------------------------------------------------------
# <method> Evaluation and export
# ----------------------------------------------------------------------------------------------------
def export_state_dicts(model_sd, teacher_sd):
    """None: the student is an MAE ViT, not a CLIP (eval_towers reads it from the checkpoint)."""
    return {}


def eval_towers(ckpt):
    """{'student': MAEEncoder} from a checkpoint of this script; `features(x)` is the [CLS] token after
    the final norm, (B, D), the feature of k-NN and linear probing."""
    encoder = MAEEncoder(ckpt["config"])
    sd = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    load_strict(encoder, sd, f"the encoder of a {METHOD} checkpoint", "an MAE ViT encoder")
    return {"student": encoder.eval()}


def knn_datasets(args, cfg):
    """The k-NN's training set (--knn-samples images), held-out set and number of classes: the built-in
    shapes' train and held-out splits, or, with --imagenet-val, evenly spaced images of the --train-data
    ImageFolder against the --imagenet-val folder."""
    mean, std = common.NORMS[args.norm]
    transform = common.EvalTransform(cfg["image_size"], mean, std)
    test, classnames, _ = eval_dataset(args, cfg)
    if not args.imagenet_val:
        return common.Shapes("train", length=args.knn_samples, transform=transform, target="label"), test, \
            len(classnames)
    full = common.ImageFolder(args.train_data, transform)
    if full.classes != test.classes:
        raise common.UsageError(f"--train-data {args.train_data} and --imagenet-val {args.imagenet_val} have "
                                f"different class folders; the k-NN needs the same classes in both")
    index = torch.linspace(0, len(full) - 1, min(args.knn_samples, len(full))).round().long().unique()
    return torch.utils.data.Subset(full, index.tolist()), test, len(test.classes)


def check_knn_data(args):
    """At start-up: --imagenet-val needs an ImageFolder --train-data with the same classes for the k-NN."""
    if args.imagenet_val and not (args.train_data and os.path.isdir(args.train_data)):
        raise common.UsageError(f"--imagenet-val {args.imagenet_val}: the k-NN evaluation takes its training "
                                f"features from an ImageFolder --train-data with the same classes; give one, or "
                                f"drop --imagenet-val")
    if args.imagenet_val and not os.path.isdir(args.imagenet_val):
        raise common.UsageError(f"--imagenet-val {args.imagenet_val} is not a folder; give an ImageFolder "
                                f"(root/<class>/<image>) of held-out images")


@torch.no_grad()
def evaluate(model, teacher, args, device):
    """k-NN top-1 (cosine, k = 20, T = 0.07) of the student's [CLS] feature on the held-out set, next to
    the frozen teacher's with its CLIP image embedding (computed once: the teacher never changes). On the
    first call both towers read each image in the same pass."""
    train, test, num_classes = knn_datasets(args, model_config(args))
    width = model.encoder.cls_token.shape[-1]
    with_teacher = teacher is not None and teacher.knn_results is None

    def encode(x):  # (B, D) student [CLS], then (B, C_t) teacher embedding on the first call
        feats = [model.encoder.features(x).float()]
        if with_teacher:
            feats.append(teacher.features(x).float())
        return torch.cat(feats, dim=1)

    rank, world = dist.get_rank(), dist.get_world_size()
    loaders = [common.eval_loader(ds, 256, rank, world, args.workers) for ds in (train, test)]
    (train_x, train_y), (test_x, test_y) = (extract_features(encode, loader, device) for loader in loaders)
    results = {"student/knn_top1": knn_accuracy(train_x[:, :width], train_y, test_x[:, :width], test_y, num_classes)}
    if with_teacher:
        teacher.knn_results = {"teacher/knn_top1": knn_accuracy(train_x[:, width:], train_y, test_x[:, width:],
                                                                test_y, num_classes)}
    return {**results, **(teacher.knn_results if teacher is not None else {})}


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
