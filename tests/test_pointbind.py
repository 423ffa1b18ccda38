"""Point-Bind point encoder: FPS, kNN grouping, determinism, layout."""

from __future__ import annotations

import pytest
import torch

from ibllm.config import PointBindConfig, imagebind_preset
from ibllm.models.imagebind import build_imagebind
from ibllm.models.pointbind import PointBindTrunk, farthest_point_sample, group_points, knn_indices


def cloud(batch: int = 2, n: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, n, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_fps(xyz: torch.Tensor, npoint: int, start: int) -> list[int]:
    """Textbook FPS for one cloud ``[N, 3]`` from a given start index."""
    chosen = [start]
    best = torch.full((xyz.shape[0],), 1e10)
    for _ in range(npoint - 1):
        best = torch.minimum(best, ((xyz - xyz[chosen[-1]]) ** 2).sum(-1))
        chosen.append(int(best.argmax()))
    return chosen


def test_fps_matches_reference_and_seed() -> None:
    xyz = cloud()
    idx = farthest_point_sample(xyz, 16, seed=7)
    starts = torch.randint(0, 256, (2,), generator=torch.Generator().manual_seed(7))
    assert idx.dtype == torch.int64 and idx.shape == (2, 16)
    for b in range(2):
        assert idx[b].tolist() == reference_fps(xyz[b], 16, int(starts[b]))
        assert len(set(idx[b].tolist())) == 16
    assert torch.equal(idx, farthest_point_sample(xyz, 16, seed=7))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(idx, farthest_point_sample(xyz, 16, generator=g))


def test_fps_unseeded_uses_global_rng() -> None:
    xyz = cloud(batch=4)
    draws = {tuple(farthest_point_sample(xyz, 8).flatten().tolist()) for _ in range(4)}
    assert len(draws) > 1
    torch.manual_seed(5)
    a = farthest_point_sample(xyz, 8)
    torch.manual_seed(5)
    assert torch.equal(a, farthest_point_sample(xyz, 8))


def test_knn_and_grouping() -> None:
    xyz = cloud()
    centers = xyz[:, :5]
    idx = knn_indices(xyz, centers, 8)
    brute = torch.cdist(centers, xyz).argsort(dim=-1)[..., :8]
    assert torch.equal(idx.sort(-1).values, brute.sort(-1).values)
    neigh, ctr = group_points(xyz, 16, 8, seed=0)
    assert neigh.shape == (2, 16, 8, 3) and ctr.shape == (2, 16, 3)
    assert neigh.norm(dim=-1).min(dim=-1).values.max() < 1e-6  # each centre is in its own group


def test_point_trunk_layout_and_shape() -> None:
    with torch.device("meta"):
        trunk = PointBindTrunk(PointBindConfig())
    keys = trunk.state_dict()
    assert len(keys) == 161
    assert tuple(keys["point_encoder.blocks.blocks.7.attn.qkv.weight"].shape) == (1152, 384)
    small = PointBindTrunk(imagebind_preset("tiny").point).eval()
    out = small(cloud(), seed=1)
    assert out.shape == (2, 32)


def test_point_embedding_deterministic_with_seed() -> None:
    model = build_imagebind("tiny", ["point"])
    pts = cloud()
    a = model({"point": pts}, point_seed=11)["point"]
    b = model({"point": pts}, point_seed=11)["point"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2), rtol=1e-5, atol=1e-5)
    unseeded = {tuple(model({"point": pts})["point"].flatten().tolist()) for _ in range(4)}
    assert len(unseeded) > 1
    model.point_trunk.fps_seed = 3
    torch.testing.assert_close(model({"point": pts})["point"], model({"point": pts})["point"], rtol=0, atol=0)


def test_point_batchnorm_and_drop_path_eval() -> None:
    model = build_imagebind("tiny", ["point"])
    trunk = model.point_trunk
    assert not any(m.training for m in trunk.modules())
    rates = [b.drop_path.p for b in trunk.point_encoder.blocks.blocks]
    assert rates == pytest.approx([0.0])
    a, b, c = cloud(batch=3).unbind(0)
    # same seed and batch size -> same FPS starts; BN on running statistics -> no cross-sample leakage
    ab = model({"point": torch.stack([a, b])}, point_seed=0)["point"]
    ac = model({"point": torch.stack([a, c])}, point_seed=0)["point"]
    torch.testing.assert_close(ab[0], ac[0], rtol=0, atol=1e-6)
    assert not torch.allclose(ab[1], ac[1])
    with pytest.raises(ValueError, match="B, N, 3"):
        model({"point": torch.zeros(2, 10)})
