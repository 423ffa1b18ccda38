"""Point-Bind point encoder: the ``point_trunk`` of ``imagebind_w3D.pth``.

``pts [B, N, 3]`` -> farthest-point-sampled centres -> kNN groups -> mini-PointNet tokens -> transformer
(positional embedding re-added before every block) -> ``concat[CLS, max over groups] @ pc_projection``
``[B, projection_dim]``. ImageBind's ``modality_heads.point`` and postprocessor follow (see encoder.py).

Determinism: the official FPS starts from a random point (``randint(0, N, (B,))``), so unseeded
embeddings change between calls. Pass ``seed=`` or ``generator=`` to ``forward`` (or set
``fps_seed`` on the trunk) to draw the start index from a private generator and get repeatable output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibllm.config import PointBindConfig
from ibllm.models.imagebind.trunk import DropPath, Mlp

POINT_LN_EPS = 1e-5


def _start_indices(b: int, n: int, device: torch.device, seed: int | None,
                   generator: torch.Generator | None) -> Tensor:
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    if generator is None:
        return torch.randint(0, n, (b,), device=device)
    return torch.randint(0, n, (b,), generator=generator, device=generator.device).to(device)


def farthest_point_sample(xyz: Tensor, npoint: int, seed: int | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """Indices ``[B, npoint]`` (int64) of farthest-point samples of ``xyz`` ``[B, N, 3]``.

    One start index per sample is drawn as ``randint(0, N, (B,))`` (from ``generator``, or a CPU
    generator seeded with ``seed``, else the global RNG); the running min squared distance starts at 1e10,
    is updated with a strict ``<`` and the next centre is its arg-max (first on ties).
    """
    b, n, _ = xyz.shape
    if npoint > n:
        raise ValueError(f"cannot sample {npoint} centres from {n} points")
    pts = xyz.float()
    out = torch.empty(b, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), 1e10, device=xyz.device)
    batch = torch.arange(b, device=xyz.device)
    farthest = _start_indices(b, n, xyz.device, seed, generator)
    for i in range(npoint):
        out[:, i] = farthest
        d = (pts - pts[batch, farthest].unsqueeze(1)).pow(2).sum(-1)
        dist = torch.where(d < dist, d, dist)
        farthest = dist.max(dim=-1)[1]
    return out


def knn_indices(xyz: Tensor, centers: Tensor, k: int) -> Tensor:
    """For each centre ``[B, G, 3]`` the indices ``[B, G, k]`` of its ``k`` nearest points in ``xyz [B, N, 3]``.

    Squared Euclidean distance in the expanded ``|c|^2 + |x|^2 - 2 c.x`` form; neighbours are unsorted.
    """
    d = (centers.pow(2).sum(-1, keepdim=True) + xyz.pow(2).sum(-1).unsqueeze(1)
         - 2 * centers @ xyz.transpose(1, 2))
    return d.topk(k, dim=-1, largest=False, sorted=False).indices


def gather_points(xyz: Tensor, idx: Tensor) -> Tensor:
    """``xyz [B, N, C]`` gathered at ``idx [B, ...]`` -> ``[B, ..., C]``."""
    b = xyz.shape[0]
    flat = idx.reshape(b, -1)
    out = torch.gather(xyz, 1, flat.unsqueeze(-1).expand(-1, -1, xyz.shape[-1]))
    return out.reshape(*idx.shape, xyz.shape[-1])


def group_points(xyz: Tensor, num_group: int, group_size: int, seed: int | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """FPS centres + kNN groups: returns ``(neighborhood [B, G, k, 3] relative to centres, centers [B, G, 3])``."""
    centers = gather_points(xyz, farthest_point_sample(xyz, num_group, seed, generator))
    neighborhood = gather_points(xyz, knn_indices(xyz, centers, group_size))
    return neighborhood - centers.unsqueeze(2), centers


class MiniPointNet(nn.Module):
    """Per-group PointNet: ``[B, G, k, 3]`` -> ``[B, G, out_dim]`` (1x1 convs, BN, two max-pools)."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, out_dim, 1))
        self.out_dim = out_dim

    def forward(self, groups: Tensor) -> Tensor:
        """``groups [B, G, k, 3]`` (centre-relative) -> ``[B, G, out_dim]``."""
        b, g, k, _ = groups.shape
        x = self.first_conv(groups.reshape(b * g, k, 3).transpose(1, 2))  # [BG, 256, k]
        pooled = x.max(dim=2, keepdim=True)[0]
        x = torch.cat([pooled.expand(-1, -1, k), x], dim=1)  # [BG, 512, k]
        x = self.second_conv(x).max(dim=2)[0]
        return x.reshape(b, g, self.out_dim)


class PointAttention(nn.Module):
    """Self-attention with a bias-free ``qkv`` and a biased ``proj`` (scale ``head_dim ** -0.5``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, L, D]`` -> ``[B, L, D]``."""
        b, length, dim = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class PointBlock(nn.Module):
    """Pre-LN block (LN eps 1e-5): ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, with drop-path."""

    def __init__(self, dim: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=POINT_LN_EPS)
        self.attn = PointAttention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=POINT_LN_EPS)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PointTransformerBlocks(nn.Module):
    """``blocks.{j}`` (hence the doubled ``blocks.blocks`` key); the positional term is re-added per block."""

    def __init__(self, dim: int, depth: int, num_heads: int, drop_path_rate: float) -> None:
        super().__init__()
        rates = torch.linspace(0.0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(PointBlock(dim, num_heads, r) for r in rates)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """``x``, ``pos`` ``[B, 1 + G, D]`` -> ``[B, 1 + G, D]``."""
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointTransformer(nn.Module):
    """``point_encoder``: grouping, mini-PointNet, transformer; returns ``concat[CLS, max] [B, 2 * trans_dim]``."""

    def __init__(self, cfg: PointBindConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.trans_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = MiniPointNet(cfg.encoder_dims)
        self.reduce_dim = nn.Linear(cfg.encoder_dims, dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = PointTransformerBlocks(dim, cfg.depth, cfg.num_heads, cfg.drop_path_rate)
        self.norm = nn.LayerNorm(dim, eps=POINT_LN_EPS)
        self.apply(_init_point_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def forward(self, pts: Tensor, seed: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``pts [B, N, 3]`` -> ``[B, 2 * trans_dim]``."""
        neighborhood, centers = group_points(pts, self.cfg.num_group, self.cfg.group_size, seed, generator)
        tokens = self.reduce_dim(self.encoder(neighborhood))
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(centers)], dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].max(dim=1)[0]], dim=-1)


class PointBindTrunk(nn.Module):
    """``point_trunk``: ``point_encoder`` then ``@ pc_projection [2 * trans_dim, projection_dim]``.

    ``fps_seed`` (default None = official random start) fixes the FPS start when no per-call
    ``seed``/``generator`` is given.
    """

    def __init__(self, cfg: PointBindConfig, fps_seed: int | None = None) -> None:
        super().__init__()
        self.point_encoder = PointTransformer(cfg)
        self.pc_projection = nn.Parameter(torch.empty(2 * cfg.trans_dim, cfg.projection_dim))
        nn.init.normal_(self.pc_projection, std=cfg.projection_dim ** -0.5)
        self.fps_seed = fps_seed

    def forward(self, pts: Tensor, seed: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``pts [B, N, 3]`` -> ``[B, projection_dim]``."""
        if pts.ndim != 3 or pts.shape[-1] != 3:
            raise ValueError(f"point clouds must be [B, N, 3], got {tuple(pts.shape)}")
        if seed is None and generator is None:
            seed = self.fps_seed
        pts = pts.to(self.pc_projection.dtype)
        return self.point_encoder(pts, seed, generator) @ self.pc_projection


def _init_point_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
