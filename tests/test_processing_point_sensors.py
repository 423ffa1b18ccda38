"""Point clouds (resampled to a fixed count and normalised to the unit sphere) and depth / thermal / IMU loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from plyfile import PlyData, PlyElement

from ibllm.processing import MediaError, load_depth, load_imu, load_modality, load_point_cloud, load_thermal
from ibllm.processing.point import normalize_points, read_points, resample_points


def cloud(n: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) * (1.0, 2.0, 0.5) + (3.0, -1.0, 7.0)


def write_ply(path, pts: np.ndarray, binary: bool = True) -> str:
    v = np.array([tuple(p) for p in pts], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(v, "vertex")], text=not binary).write(str(path))
    return str(path)


def check_unit(x: torch.Tensor, n: int = 8192) -> None:
    assert x.shape == (n, 3) and x.dtype == torch.float32
    assert x.mean(0).abs().max() < 1e-5
    assert abs(x.norm(dim=1).max().item() - 1.0) < 1e-5


def test_formats_agree(tmp_path):
    pts = cloud(500)
    files = {
        "npy": tmp_path / "c.npy", "pt": tmp_path / "c.pt", "xyz": tmp_path / "c.xyz",
        "pts": tmp_path / "c.pts", "txt": tmp_path / "c.txt", "obj": tmp_path / "c.obj", "pcd": tmp_path / "c.pcd",
    }
    np.save(files["npy"], pts)
    torch.save(torch.from_numpy(pts).float(), files["pt"])
    np.savetxt(files["xyz"], pts)
    files["pts"].write_text(f"{len(pts)}\n" + "\n".join(" ".join(map(str, p)) + " 0 0 0" for p in pts))
    files["txt"].write_text("x,y,z\n" + "\n".join(",".join(map(str, p)) for p in pts))
    files["obj"].write_text("# obj\n" + "\n".join(f"v {p[0]} {p[1]} {p[2]}" for p in pts) + "\nf 1 2 3\n")
    files["pcd"].write_text("# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
                            f"WIDTH {len(pts)}\nHEIGHT 1\nPOINTS {len(pts)}\nDATA ascii\n"
                            + "\n".join(" ".join(map(str, p)) for p in pts))
    ref = torch.from_numpy(pts).float()
    for name in ("ply", "ply_ascii"):
        assert torch.allclose(read_points(write_ply(tmp_path / f"{name}.ply", pts, name == "ply")), ref, atol=1e-5)
    for name, p in files.items():
        got = read_points(p)
        assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-5), name
        assert torch.allclose(load_point_cloud(p), load_point_cloud(files["npy"]), atol=1e-5), name
    binary = tmp_path / "b.pcd"
    header = (f"VERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F U\nCOUNT 1 1 1 1\nWIDTH {len(pts)}\n"
              f"HEIGHT 1\nPOINTS {len(pts)}\nDATA binary\n").encode()
    rec = np.zeros(len(pts), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("rgb", "u4")])
    rec["x"], rec["y"], rec["z"] = pts.T
    binary.write_bytes(header + rec.tobytes())
    assert torch.allclose(read_points(binary), ref, atol=1e-5)


def test_resample_and_normalise(tmp_path):
    big = tmp_path / "big.npy"
    np.save(big, cloud(20000))
    x = load_point_cloud(big)
    check_unit(x)
    assert torch.equal(x, load_point_cloud(big))  # seeded: deterministic
    assert not torch.equal(x, load_point_cloud(big, seed=1))
    raw = torch.from_numpy(np.load(big)).float()
    sub = load_point_cloud(big, normalize=False)
    assert sub.shape == (8192, 3) and len({tuple(p) for p in sub.tolist()}) == 8192  # no replacement
    raw_set = {tuple(q) for q in raw.tolist()}
    assert all(p in raw_set for p in map(tuple, sub.tolist()))
    small = tmp_path / "small.npy"
    np.save(small, cloud(100))
    y = load_point_cloud(small)
    check_unit(y)
    assert len({tuple(p) for p in load_point_cloud(small, normalize=False).tolist()}) == 100  # all kept
    idx = resample_points(torch.arange(10.0)[:, None].repeat(1, 3), 25, torch.Generator().manual_seed(0))
    assert idx.shape == (25, 3) and set(idx[:, 0].tolist()) == set(range(10))


def test_normalisation_is_idempotent(tmp_path):
    x = load_point_cloud(torch.from_numpy(cloud(8192)).float())
    p = tmp_path / "norm.pt"
    torch.save(x, p)
    again = load_point_cloud(p)
    torch.testing.assert_close(again, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize_points(normalize_points(x)), x, atol=1e-6, rtol=0)
    assert torch.equal(normalize_points(torch.ones(1, 3)), torch.zeros(1, 3))  # single point: no NaN


def test_point_errors(tmp_path):
    empty = tmp_path / "empty.xyz"
    empty.write_text("\n")
    with pytest.raises(MediaError, match=r"point .*empty\.xyz.*empty point cloud"):
        load_point_cloud(empty)
    np.save(tmp_path / "e.npy", np.zeros((0, 3)))
    with pytest.raises(MediaError, match=r"point .*e\.npy.*empty"):
        load_point_cloud(tmp_path / "e.npy")
    with pytest.raises(MediaError, match=r"point .*c\.stl.*unsupported extension"):
        (tmp_path / "c.stl").write_text("solid")
        load_point_cloud(tmp_path / "c.stl")
    with pytest.raises(MediaError, match=r"point .*none\.ply.*file not found"):
        load_point_cloud(tmp_path / "none.ply")
    (tmp_path / "bad.ply").write_bytes(b"ply\ngarbage")
    with pytest.raises(MediaError, match=r"point .*bad\.ply.*cannot read"):
        load_point_cloud(tmp_path / "bad.ply")
    np.save(tmp_path / "flat.npy", np.zeros((10, 2)))
    with pytest.raises(MediaError, match=r"point item 1 .*flat\.npy.*shape"):
        load_modality("point", [torch.zeros(8192, 3), tmp_path / "flat.npy"])
    pickled = tmp_path / "evil.pt"
    torch.save({"points": object()}, pickled)
    with pytest.raises(MediaError, match=r"point .*evil\.pt"):
        load_point_cloud(pickled)  # weights_only=True refuses arbitrary objects


def test_point_batch_from_bytes(tmp_path):
    ply = write_ply(tmp_path / "c.ply", cloud(300))
    batch = load_modality("point", [open(ply, "rb").read(), ply])
    assert batch.shape == (2, 8192, 3) and torch.equal(batch[0], batch[1])


# ---------------------------------------------------------------------------------------------- sensors
def test_depth_png_mm_to_normalised_disparity(tmp_path):
    depth_mm = np.full((240, 320), 2000, np.uint16)
    depth_mm[:, :160] = 1000  # left half 1 m, right half 2 m
    depth_mm[0, 0] = 0  # invalid
    p = tmp_path / "d.png"
    Image.fromarray(depth_mm).save(p)
    x = load_depth(p)
    assert x.shape == (1, 224, 224) and x.dtype == torch.float32
    assert abs(x[0, 112, 5].item() - 1.0) < 1e-5 and abs(x[0, 112, 220].item() - 0.5) < 1e-5
    assert x.min() >= 0 and x.max() <= 1 + 1e-6
    metres = tmp_path / "d.npy"
    np.save(metres, depth_mm.astype(np.float32) / 1000)
    torch.testing.assert_close(load_depth(metres), x, atol=1e-5, rtol=0)
    disp8 = tmp_path / "disp.png"
    Image.fromarray(np.full((50, 50), 100, np.uint8)).save(disp8)
    assert torch.allclose(load_depth(disp8), torch.ones(1, 224, 224))
    assert torch.equal(load_depth(np.zeros((30, 30))), torch.zeros(1, 224, 224))  # all invalid: no NaN


def test_thermal(tmp_path):
    p = tmp_path / "t.jpg"
    Image.new("L", (640, 512), 51).save(p, quality=100)
    x = load_thermal(p)
    assert x.shape == (1, 224, 224) and torch.allclose(x, torch.full_like(x, 0.2), atol=2e-3)
    raw = np.linspace(7000, 9000, 100 * 80).reshape(80, 100).astype(np.uint16)
    p16 = tmp_path / "t16.png"
    Image.fromarray(raw).save(p16)
    y = load_thermal(p16)
    assert y.min() >= 0 and y.max() <= 1 and y.max() - y.min() > 0.5
    rgb = tmp_path / "t.png"
    Image.new("RGB", (300, 200), (100, 100, 100)).save(rgb)
    assert torch.allclose(load_thermal(rgb), torch.full((1, 224, 224), 100 / 255), atol=1e-5)
    with pytest.raises(MediaError, match=r"thermal .*t\.wav.*unsupported extension"):
        (tmp_path / "t.wav").write_bytes(b"x")
        load_thermal(tmp_path / "t.wav")


def test_imu(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 2500)).astype(np.float32)
    np.save(tmp_path / "long.npy", data)
    x = load_imu(tmp_path / "long.npy")
    assert x.shape == (6, 2000) and torch.equal(x, torch.from_numpy(data[:, :2000]))
    np.save(tmp_path / "short_t6.npy", data[:, :300].T)  # [T,6] is transposed
    y = load_imu(tmp_path / "short_t6.npy")
    assert torch.equal(y[:, :300], torch.from_numpy(data[:, :300])) and (y[:, 300:] == 0).all()
    np.savetxt(tmp_path / "imu.csv", data[:, :50].T, delimiter=",")
    assert torch.allclose(load_imu(tmp_path / "imu.csv")[:, :50], torch.from_numpy(data[:, :50]), atol=1e-6)
    np.save(tmp_path / "bad.npy", np.zeros((5, 100)))
    with pytest.raises(MediaError, match=r"imu item 0 .*bad\.npy.*\[6,T\]"):
        load_modality("imu", [tmp_path / "bad.npy"])
    batch = load_modality("imu", [tmp_path / "long.npy", torch.zeros(6, 2000)])
    assert batch.shape == (2, 6, 2000)
    for m in ("depth", "thermal"):
        b = load_modality(m, [np.ones((10, 20)), torch.zeros(1, 224, 224)])
        assert b.shape == (2, 1, 224, 224)
