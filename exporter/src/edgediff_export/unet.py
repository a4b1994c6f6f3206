"""The classic DDPM noise-prediction U-Net (Ho et al. 2020), sized by a small config.

Sinusoidal time embedding, residual blocks conditioned on time, a down path and an up path
joined by skip connections, optional self-attention at chosen resolutions. The network takes
`sample [N, C, H, W]` and `timestep [N]` (any numeric dtype: the integer index of the discrete
schedule, or a continuous time scaled by the caller) and returns a tensor shaped like `sample`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class UNetConfig:
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (7,)
    image_size: int = 28
    dropout: float = 0.0
    num_groups: int = 8
    num_classes: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["attention_resolutions"] = tuple(d["attention_resolutions"])
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of a (possibly fractional) time value."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention, as in the DDPM reference network."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        self.scale = 1.0 / math.sqrt(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) * self.scale, dim=-1)
        out = torch.einsum("nqk,nck->ncq", attn, v).reshape(n, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, g = cfg.base_channels, cfg.num_groups
        t_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        # Index num_classes is the "null" label used for classifier-free guidance.
        self.label_emb = (
            nn.Embedding(cfg.num_classes + 1, t_dim) if cfg.num_classes is not None else None
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        c, res = ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = nn.ModuleList([ResBlock(c, ch * mult, t_dim, g, cfg.dropout)])
                c = ch * mult
                if res in cfg.attention_resolutions:
                    blocks.append(AttnBlock(c, g))
                self.down.append(blocks)
                skips.append(c)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
                res //= 2

        self.mid1 = ResBlock(c, c, t_dim, g, cfg.dropout)
        self.mid_attn = AttnBlock(c, g)
        self.mid2 = ResBlock(c, c, t_dim, g, cfg.dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(c + skips.pop(), ch * mult, t_dim, g, cfg.dropout)])
                c = ch * mult
                if res in cfg.attention_resolutions:
                    blocks.append(AttnBlock(c, g))
                self.up.append(blocks)
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2.0, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
                res *= 2

        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(timestep, self.cfg.base_channels))
        if self.label_emb is not None:
            if class_labels is None:
                class_labels = torch.full_like(timestep, self.cfg.num_classes, dtype=torch.long)
            temb = temb + self.label_emb(class_labels)
        h = self.conv_in(sample)
        hs = [h]
        for blocks in self.down:
            h = self._run_blocks(blocks, h, temb)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_blocks(blocks, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _run_blocks(blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        return h


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
