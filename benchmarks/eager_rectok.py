"""The eager baseline of the tokenizer training step: RecTok written the straightforward way.

Plain PyTorch in the style of the official code (one module per piece, ``torch.gather`` masking,
``torch.cat`` mask tokens, RoPE as ``x·cos + rot(x)·sin``, SDPA attention, ``F.cosine_similarity``),
fp32 weights under bf16 autocast, ``torch.optim.AdamW`` with its defaults.  No rectok_fast code is
used, so the end-to-end benchmark compares the library against what a user would otherwise run.
Also holds the ViT-L/16-sized teacher with random weights that both sides of the benchmark use.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_table(head_dim: int, grid: int) -> torch.Tensor:
    """method §1 tokenizer 2D RoPE table (N, 2·head_dim) = [cos, sin]."""
    q = head_dim // 4
    j = torch.arange(q, dtype=torch.float64)
    f = 7.0 * (7.0 / 7e-4) ** (-j / (q - 1))
    F_ = torch.cat([f, f])
    lin = torch.linspace(0, 1, grid, dtype=torch.float64)
    u = lin[:, None].expand(grid, grid).reshape(-1)
    v = lin[None, :].expand(grid, grid).reshape(-1)
    ang = torch.cat([2 * math.pi * u[:, None] * F_, 2 * math.pi * v[:, None] * F_], dim=1)
    return torch.cat([ang.cos(), ang.sin()], dim=1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rot = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return x * cos + rot * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos=None, sin=None):
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cos is not None:
            q, k = apply_rope(q, cos, sin).type_as(v), apply_rope(k, cos, sin).type_as(v)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        h = int(2 / 3 * dim * 4)
        self.w12 = nn.Linear(dim, 2 * h)
        self.w3 = nn.Linear(h, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = RMSNorm(dim), SwiGLU(dim)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class Trunk(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, grid: int):
        super().__init__()
        self.ln_pre = RMSNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln_post = RMSNorm(dim)
        self.register_buffer("rope", rope_table(dim // heads, grid), persistent=False)

    def run(self, x, rope):
        cos, sin = rope.unsqueeze(1).chunk(2, dim=-1)  # (B|1, 1, L, hd) each
        x = self.ln_pre(x)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.ln_post(x)


class EagerEncoder(Trunk):
    def __init__(self, dim, depth, heads, grid, patch, channels):
        super().__init__(dim, depth, heads, grid)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(dim**-0.5 * torch.randn(1, grid * grid, dim))
        self.latent_head = nn.Linear(dim, 2 * channels)

    def forward(self, x, ids_keep):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        D = x.shape[-1]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        rope = torch.gather(
            self.rope.unsqueeze(0).expand(x.shape[0], -1, -1),
            1,
            ids_keep.unsqueeze(-1).expand(-1, -1, self.rope.shape[-1]),
        )
        return self.latent_head(self.run(x, rope))


class EagerDecoder(Trunk):
    def __init__(self, dim, depth, heads, grid, channels, out_dim=None, patch=16):
        super().__init__(dim, depth, heads, grid)
        self.grid, self.patch = grid, patch
        self.embed = nn.Linear(channels, dim)
        self.mask_token = nn.Parameter(dim**-0.5 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(dim**-0.5 * torch.randn(1, grid * grid, dim))
        self.pixel = out_dim is None
        if self.pixel:
            self.ffn = nn.Conv2d(dim, patch * patch * 3, 1)
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        else:
            self.out = nn.Linear(dim, out_dim)

    def forward(self, z, ids_restore):
        x = self.embed(z)
        B, K, D = x.shape
        N = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(B, N - K, D).to(x.dtype)], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D)) + self.pos_embed
        x = self.run(x, self.rope.unsqueeze(0))
        if not self.pixel:
            return self.out(x)
        g, p = self.grid, self.patch
        x = self.ffn(x.transpose(1, 2).reshape(B, D, g, g))  # (B, p·p·3, g, g)
        x = x.reshape(B, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2).reshape(B, 3, g * p, g * p)
        return self.conv_out(x)


class EagerRecTok(nn.Module):
    """ViT-B encoder / pixel decoder, tiny semantic decoder for one teacher (method §2); smaller sizes
    for dry runs through the arguments."""

    def __init__(
        self,
        img=256,
        patch=16,
        channels=128,
        width=768,
        depth=12,
        heads=12,
        teacher_width=1024,
        mask_ratio=(-0.1, 0.4),
        sem=(192, 3, 4),
    ):
        super().__init__()
        g = img // patch
        self.N, self.C, self.grid = g * g, channels, g
        self.mask_ratio = mask_ratio
        self.encoder = EagerEncoder(width, depth, heads, g, patch, channels)
        self.decoder = EagerDecoder(width, depth, heads, g, channels, patch=patch)
        self.sem_decoder = EagerDecoder(*sem, g, channels, out_dim=teacher_width)  # (width, depth, heads)
        self.shift = math.sqrt(self.N * channels / 4096)
        self.rng = random.Random(0)

    def sample_mask(self, B, device):
        lo, hi = self.mask_ratio
        r = max(0.0, self.rng.uniform(lo, hi))
        K = int(math.ceil(self.N * (1 - r)))
        ids_shuffle = torch.argsort(torch.rand(B, self.N, device=device), dim=1)
        return ids_shuffle[:, :K], torch.argsort(ids_shuffle, dim=1)

    def forward(self, images, teacher_feats):
        B = images.shape[0]
        ids_keep, ids_restore = self.sample_mask(B, images.device)
        moments = self.encoder(images, ids_keep)
        mean, logvar = moments.chunk(2, dim=-1)
        logvar = logvar.clamp(-30.0, 20.0)
        std = torch.exp(0.5 * logvar)
        z = mean + std * torch.randn_like(mean)
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum(dim=[1, 2]).mean()
        u = torch.rand(B, device=images.device)
        t = (self.shift * u / (1 + (self.shift - 1) * u)).view(B, 1, 1)
        z_t = (1 - t) * z + t * torch.randn_like(z)
        recon = self.decoder(z_t, ids_restore)
        sem = self.sem_decoder(z_t, ids_restore)
        rec_loss = F.mse_loss((recon.float() + 1) / 2, (images.float() + 1) / 2)
        sem_loss = (1 - F.cosine_similarity(sem.float(), teacher_feats.float(), dim=-1)).mean()
        return rec_loss + 1e-6 * kl + sem_loss


class ViTTeacher(nn.Module):
    """A DINOv3 ViT-L/16-sized feature extractor with random weights (24 × 1024, 16 heads, CLS + 4
    registers, LayerNorm + GELU MLP): ``forward(images in [-1, 1]) -> (B, N, 1024)`` patch features."""

    def __init__(self, img=256, patch=16, width=1024, depth=24, heads=16, registers=4):
        super().__init__()
        self.width, self.heads, self.extra = width, heads, 1 + registers
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.tokens = nn.Parameter(0.02 * torch.randn(1, self.extra, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (img // patch) ** 2, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = ((images + 1) / 2 - self.mean) / self.std
        x = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2) + self.pos_embed
        x = torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, self.extra :]
