"""The Vision Transformer of DINO, with the official (and timm's) state-dict key names.

Shapes: an image batch ``B x 3 x H x W`` (H, W multiples of the patch size p) becomes
``T = 1 + (H/p)(W/p)`` tokens of width D; the [CLS] token comes first. Position embeddings
are learned for ``img_size`` and interpolated bicubically for any other size, square or not.
Attention goes through ``scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPU); on a CPU it is written out (two matmuls around a softmax) for short sequences, where that
is faster (``_explicit_attention``), and whenever the attention map itself is asked for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

VIT_SIZES = {  # name: (embed_dim, depth, num_heads)
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor, cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q`` (``B x heads x T_q x d_head``, ``T_q`` = 1 with ``cls_only``: token 0's query
        alone), ``k`` and ``v`` (``B x heads x T x d_head``)."""
        b, t, d = x.shape
        heads = (self.num_heads, d // self.num_heads)
        if cls_only:
            q = F.linear(x[:, :1], self.qkv.weight[:d], self.qkv.bias[:d]).view(b, 1, *heads).transpose(1, 2)
            k, v = (part.transpose(1, 2) for part in
                    F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).view(b, t, 2, *heads).unbind(2))
            return q, k, v
        qkv = self.qkv(x).view(b, t, 3, *heads)
        # unbind + transpose views: their backward stacks the three gradients straight into the
        # layout of qkv's output (indexing qkv[i] would zero-fill and add three full-size copies)
        q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))
        return q, k, v

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """``B x T x D`` -> ``B x T x D``; with ``cls_only``, token 0's output alone, ``B x 1 x D``
        (its attention over all tokens; no query, projection or output for the others)."""
        q, k, v = self._qkv(x, cls_only)
        if _explicit_attention(q):
            out = self._weights(q, k).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights, ``B x heads x T x T`` (rows sum to 1)."""
        q, k, _ = self._qkv(x)
        return self._weights(q, k)

    @staticmethod
    def _weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d_head))``, the softmax in fp32: ``B x heads x T x T``."""
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).float().softmax(dim=-1)


#: Longest sequence for which bf16 attention on a CPU is faster written out than through
#: ``scaled_dot_product_attention``, whose CPU flash kernel is 2.5-10x slower in bf16 at
#: 17-197 tokens (forward + backward, 2 threads) and faster at 785.
CPU_BF16_EXPLICIT_MAX_TOKENS = 256
#: The same for float32 attention that is trained through (forward + backward): the flash
#: kernel's backward is the slow part, 1.1-1.5x the time of the written-out one at 17-145 tokens
#: (2 threads); its forward alone is faster, so attention without gradient always uses it.
CPU_FP32_TRAINING_EXPLICIT_MAX_TOKENS = 128


def _explicit_attention(q: torch.Tensor) -> bool:
    """Whether to write the attention out instead of calling the fused kernel: on a CPU, in bf16
    (autocast) up to ``CPU_BF16_EXPLICIT_MAX_TOKENS`` tokens, and in float32 when gradients flow
    through it, up to ``CPU_FP32_TRAINING_EXPLICIT_MAX_TOKENS`` tokens."""
    if q.device.type != "cpu":
        return False
    if q.dtype == torch.bfloat16:
        return q.shape[-2] <= CPU_BF16_EXPLICIT_MAX_TOKENS
    return q.requires_grad and q.shape[-2] <= CPU_FP32_TRAINING_EXPLICIT_MAX_TOKENS


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(attn(norm1(x)))``, then the same with the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """``B x T x D`` -> ``B x T x D``; with ``cls_only``, the output of token 0 ([CLS]) alone,
        ``B x 1 x D``: the same values as ``forward(x)[:, :1]`` for about ``1/6`` of the compute
        (the keys and values of all tokens), and the same random draws for stochastic depth."""
        drop_path = self.drop_path if self.training else 0.0
        attended = self.attn(self.norm1(x), cls_only)
        x = add_residual(x[:, :1] if cls_only else x, attended, drop_path)
        return add_residual(x, self.mlp(self.norm2(x)), drop_path)


def add_residual(x: torch.Tensor, branch: torch.Tensor, drop_path: float) -> torch.Tensor:
    """``x + branch`` with stochastic depth: each sample's branch (``B x ...``) is dropped with
    probability ``drop_path`` and kept ones are scaled by ``1 / (1 - drop_path)``, in one pass
    (``addcmul``; masking then adding would make one more tensor the size of ``x``). The mask is
    drawn as torchvision's ``stochastic_depth(branch, drop_path, "row")`` draws it."""
    if drop_path == 0.0:
        return x + branch
    keep = 1.0 - drop_path
    scale = torch.empty((branch.shape[0],) + (1,) * (branch.ndim - 1), dtype=branch.dtype, device=branch.device)
    return torch.addcmul(x, branch, scale.bernoulli_(keep).div_(keep))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x 3 x H x W -> B x N x D
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT backbone; ``forward`` returns the [CLS] feature after the final LayerNorm (not
    L2-normalised), ``B x D``.

    Args:
        img_size: side in pixels the position embeddings are made for.
        patch_size: side of a patch in pixels.
        drop_path_rate: stochastic depth of the last block; it rises linearly from 0 over depth.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, in_chans: int = 3) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be at least 1 pixel, got {patch_size}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(patch_size, embed_dim, in_chans)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing (timm's name for it): while gradients are recorded, each block
        keeps only its input (``B x T x D``) for the backward pass and runs its forward again
        there, instead of keeping its ~20 activations of that size and the attention maps. Same
        values, gradients and stochastic-depth draws; about a third more compute in the blocks."""
        self.grad_checkpointing = enable

    def _block(self, block: Block, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, cls_only, use_reentrant=False)
        return block(x, cls_only)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a ``height x width`` patch grid: ``1 x (1 + h*w) x D``."""
        n_stored = self.pos_embed.shape[1] - 1
        side = math.isqrt(n_stored)
        if side * side != n_stored:
            raise ValueError(f"pos_embed holds {n_stored} patches, not a square grid")
        if (height, width) == (side, side):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
        patch_pos = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, height * width, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``B x 3 x H x W`` (float, normalised) -> tokens ``B x T x D`` with [CLS] and
        positions; ``ValueError`` for any other shape or an integer dtype."""
        channels = self.patch_embed.proj.in_channels
        if x.ndim != 4 or x.shape[1] != channels:
            one_image = " (one image? add the batch dimension: x[None])" if x.ndim == 3 else ""
            raise ValueError(f"images must be B x {channels} x H x W, got shape {tuple(x.shape)}{one_image}")
        check_floating_images(x)
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        return tokens + self.interpolate_pos_encoding(h // p, w // p)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm, ``B x T x D``."""
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = self._block(block, x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The [CLS] feature after the final LayerNorm, ``B x D``: ``forward_features(x)[:, 0]``,
        with the last block run for [CLS] alone (its outputs at the other tokens would be thrown
        away), which saves ~5/6 of that block's compute (~7% of a 12-block ViT)."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = self._block(block, x)
        return self.norm(self._block(self.blocks[-1], x, cls_only=True))[:, 0]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Outputs of the last ``n`` blocks, each through the final norm: ``n`` tensors ``B x T x D``."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, ``B x heads x T x T``; [CLS] is token 0."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        return last.attn.attention_map(last.norm1(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def check_floating_images(x: torch.Tensor) -> None:
    """``ValueError`` unless the images ``x`` are floating point (what every backbone takes)."""
    if not x.is_floating_point():
        raise ValueError(f"images must be floating point, normalised (NormalizeImages converts uint8 "
                         f"ones), got {x.dtype}")


def vit(name: str, **kwargs) -> VisionTransformer:
    """``vit("vit_small", patch_size=8)``: a ViT of a named size."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {name!r}; known: {', '.join(VIT_SIZES)}")
    dim, depth, heads = VIT_SIZES[name]
    return VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads, **kwargs)
