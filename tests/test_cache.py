"""The visual cache: enhancement of queries, index choice / recall, loading, errors, building from shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ibllm.build import build_model
from ibllm.cache import CacheError, VisualCache, load_cache
from ibllm.cache_build.index import build_index, choose_index, exact_knn, recall_at_k
from ibllm.cache_build.mapper import ImageEmbedder
from ibllm.cli import main as cli_main
from ibllm.cli.cache import main as cache_main
from ibllm.checkpoints import save_atomic
from ibllm.models.imagebind import build_imagebind
from ibllm.processing.image import load_image


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """FAISS's OpenMP training crawls on a shared 2-core machine (PQ: 20 s with 2 threads, 1 s with 1)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    """Normalised points around random unit centres (structure like image embeddings, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    labels = rng.integers(0, clusters, n)
    return unit(centres[labels] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim) * 4)


def reference_enhance(v: np.ndarray, db: np.ndarray, k: int, t: float, w: float) -> np.ndarray:
    """The cache enhancement written out row by row, with brute-force search: softmax(t * top-k scores)
    weights the neighbours, their normalised average is blended with weight w, and the result renormalised."""
    out = []
    for row in v.astype(np.float64):
        s = db.astype(np.float64) @ row
        top = np.argsort(-s)[:k]
        a = np.exp(t * s[top] - np.max(t * s[top]))
        a /= a.sum()
        c = (a[:, None] * db[top].astype(np.float64)).sum(0)
        c /= np.linalg.norm(c)
        mixed = (1 - w) * row + w * c
        out.append(mixed / np.linalg.norm(mixed))
    return np.array(out)


class CountingIndex:
    """Wraps a FAISS index and counts the calls the cache makes."""

    def __init__(self, index) -> None:
        self.inner, self.calls = index, {"search": 0, "reconstruct_batch": 0, "reconstruct": 0}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def search(self, x, k):
        self.calls["search"] += 1
        return self.inner.search(x, k)

    def reconstruct_batch(self, ids):
        self.calls["reconstruct_batch"] += 1
        return self.inner.reconstruct_batch(ids)

    def reconstruct(self, i):
        self.calls["reconstruct"] += 1
        return self.inner.reconstruct(i)


@pytest.fixture(scope="module")
def small() -> dict:
    db = clustered(300, 16, 6, seed=1)
    index = faiss.IndexFlatIP(16)
    index.add(db)
    rng = np.random.default_rng(2)
    # an un-renormalised two-modality mix, as ImageBindLLM.encode produces
    v = 0.6 * unit(rng.standard_normal((7, 16))) + 0.4 * unit(rng.standard_normal((7, 16)))
    return {"db": db, "index": index, "v": (v / (1 + 1e-6)).astype(np.float32)}


# ---- enhance -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k,t,w", [(10, 20.0, 0.5), (3, 5.0, 0.8), (1, 20.0, 0.2)])
def test_enhance_equals_spec_reference(small, k, t, w):
    cache = VisualCache(small["index"], k=k, temperature=t, weight=w)
    got = cache.enhance(torch.from_numpy(small["v"]))
    assert got.shape == (7, 16) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference_enhance(small["v"], small["db"], k, t, w), atol=1e-5)


def test_values_memmap_gives_the_same_result(small, tmp_path):
    np.save(tmp_path / "values.npy", small["db"])
    values = np.load(tmp_path / "values.npy", mmap_mode="r")
    a = VisualCache(small["index"]).enhance(torch.from_numpy(small["v"]))
    b = VisualCache(small["index"], values=values).enhance(torch.from_numpy(small["v"]))
    torch.testing.assert_close(a, b)


def test_batch_is_one_search_and_one_gather_and_matches_rows(small):
    counting = CountingIndex(small["index"])
    cache = VisualCache(counting)
    batch = cache.enhance(torch.from_numpy(small["v"]))
    assert counting.calls == {"search": 1, "reconstruct_batch": 1, "reconstruct": 0}
    rows = torch.cat([cache.enhance(torch.from_numpy(small["v"][i:i + 1])) for i in range(len(small["v"]))])
    torch.testing.assert_close(batch, rows)


def test_settings_and_dtype(small):
    cache = VisualCache(small["index"])
    v = torch.from_numpy(small["v"])
    assert (cache.k, cache.temperature, cache.weight) == (10, 20.0, 0.5)
    cache.weight = 0.0
    torch.testing.assert_close(cache.enhance(v), torch.nn.functional.normalize(v, dim=-1))
    cache.weight, cache.k = 0.5, 4
    assert cache.enhance(v.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="at least 1"):
        cache.k = 0


def test_neighbours_name_samples(small):
    ids = [f"shard:{i:04d}" for i in range(300)]
    cache = VisualCache(small["index"], ids=ids)
    found = cache.neighbours(small["db"][:2], k=3)
    assert found[0][0][0] == "shard:0000" and found[1][0][0] == "shard:0001" and len(found[0]) == 3


# ---- index choice and recall -------------------------------------------------------------------
def test_index_choice_switches_by_size_and_budget():
    assert choose_index(10_000, 1024).kind == "flat"
    big = choose_index(1_000_000, 1024)
    assert big.kind == "ivf" and big.factory == "IVF1024,Flat"
    pq = choose_index(1_000_000, 1024, memory_budget=1 << 30)
    assert pq.kind == "ivfpq" and pq.estimated_bytes <= 1 << 30 and not pq.exact_values
    small_budget = [choose_index(n, 1024, memory_budget=1 << 29).pq_m for n in (1_000_000, 3_000_000)]
    assert small_budget[1] < small_budget[0]  # more vectors in the same budget -> smaller codes
    assert choose_index(10_000, 1024, memory_budget=10 << 20).kind == "ivfpq"  # small but over budget
    assert choose_index(1_000_000, 1024, index_type="hnsw").factory.startswith("HNSW")
    with pytest.raises(CacheError, match="budget"):
        choose_index(1_000_000, 1024, memory_budget=1 << 20)


@pytest.fixture(scope="module")
def ivf_cache(tmp_path_factory) -> dict:
    data = clustered(6000, 32, 40, seed=3)
    out = tmp_path_factory.mktemp("ivf")
    ids = [f"s:{i}" for i in range(len(data))]
    result = build_index(data, ids, out, exact_max=1000, recall_target=0.9, n_queries=200,
                         model={"preset": "synthetic"}, show_progress=False)
    return {"data": data, "out": out, "result": result}


def test_recall_reaches_target_on_clustered_data(ivf_cache):
    result, data = ivf_cache["result"], ivf_cache["data"]
    assert result.choice.kind == "ivf" and result.recall >= 0.9
    nprobe = result.search_params["nprobe"]
    assert 1 <= nprobe < result.choice.nlist  # tuned, not exhaustive
    # fresh queries from the same distribution, not in the index
    queries = unit(data[:150] + 0.05 * np.random.default_rng(9).standard_normal((150, 32)))
    cache = load_cache(ivf_cache["out"])
    found = cache.search(queries, 10)[1]
    assert recall_at_k(found, exact_knn(queries, data, 10), 10) >= 0.85


def test_cache_folder_metadata_and_reconstruct(ivf_cache):
    meta = json.loads((ivf_cache["out"] / "cache.json").read_text())
    assert meta["count"] == 6000 and meta["dim"] == 32 and meta["metric"] == "inner_product"
    assert meta["index_type"].startswith("IVF") and meta["recall_at_10"] >= 0.9
    assert meta["embedding_model"] == {"preset": "synthetic"} and meta["values_file"] is None
    cache = load_cache(ivf_cache["out"], k=5)
    assert cache.ids[7] == "s:7" and cache.k == 5 and cache.meta["search_params"]
    np.testing.assert_allclose(cache.gather(np.array([[3, 9]])), ivf_cache["data"][[3, 9]][None], atol=1e-6)


def test_pq_under_budget_keeps_values_beside(tmp_path):
    data = clustered(4000, 32, 20, seed=4)
    result = build_index(data, None, tmp_path, memory_budget=200_000, exact_max=100, recall_target=0.99,
                         n_queries=100, show_progress=False)
    assert result.choice.kind == "ivfpq" and (tmp_path / "values.npy").is_file()
    cache = load_cache(tmp_path)
    assert cache.values is not None and cache.values.dtype == np.float16
    np.testing.assert_allclose(cache.gather(np.array([5])), data[[5]], atol=2e-3)


# ---- loading: official-style bare index, errors --------------------------------------------------
def test_official_style_bare_index_loads_and_reconstructs(small, tmp_path):
    faiss.write_index(small["index"], str(tmp_path / "knn.index"))
    for path in (tmp_path / "knn.index", tmp_path):
        cache = load_cache(path, dim=16)
        assert len(cache) == 300 and cache.meta == {} and cache.values is None
        np.testing.assert_allclose(cache.gather(np.array([0, 299])), small["db"][[0, 299]])
        np.testing.assert_allclose(cache.enhance(torch.from_numpy(small["v"])).numpy(),
                                   reference_enhance(small["v"], small["db"], 10, 20.0, 0.5), atol=1e-5)


def test_bare_ivf_without_direct_map_gets_one(tmp_path):
    data = clustered(2000, 16, 8, seed=5)
    index = faiss.index_factory(16, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(data)
    index.add(data)
    faiss.write_index(index, str(tmp_path / "knn.index"))
    np.testing.assert_allclose(load_cache(tmp_path / "knn.index").gather(np.array([11])), data[[11]])


def test_errors_name_the_file(small, tmp_path):
    missing = tmp_path / "nowhere" / "knn.index"
    with pytest.raises(CacheError, match=str(missing)):
        load_cache(missing)
    corrupt = tmp_path / "corrupt.index"
    corrupt.write_bytes(b"this is not faiss" * 10)
    with pytest.raises(CacheError, match=f"{corrupt}.*not a readable FAISS index"):
        load_cache(corrupt)
    good = tmp_path / "good.index"
    faiss.write_index(small["index"], str(good))
    with pytest.raises(CacheError, match=f"{good}.*16-d.*1024-d"):
        load_cache(good, dim=1024)
    with pytest.raises(CacheError, match=f"{good}.*16-d"):
        load_cache(good).enhance(torch.zeros(2, 1024))
    l2 = tmp_path / "l2.index"
    faiss.write_index(faiss.IndexFlatL2(16), str(l2))
    with pytest.raises(CacheError, match=str(l2)):
        load_cache(l2)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CacheError, match=str(empty_dir)):
        load_cache(empty_dir)


# ---- building from shards over ranks -------------------------------------------------------------
PER_SHARD = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cache_shards")
    rng = np.random.default_rng(0)
    images = {}
    for s in range(2):
        with wds.TarWriter(str(root / f"{s:06d}.tar")) as sink:
            for i in range(PER_SHARD):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
                key = f"{s}_{i:04d}"
                images[f"{s:06d}.tar:{key}"] = buf.getvalue()
                sink.write({"__key__": key, "png": buf.getvalue(), "txt": "a square"})
    torch.manual_seed(7)
    weights = root / "vision.safetensors"
    save_atomic(build_imagebind("tiny", ["vision"]).state_dict(), weights)
    return {"root": root, "pattern": str(root / "{000000..000001}.tar"), "weights": str(weights), "images": images}


def test_command_builds_over_two_ranks_and_the_model_uses_it(shards, monkeypatch, capsys):
    encoded: list[str] = []
    original = ImageEmbedder.embed_shard
    monkeypatch.setattr(ImageEmbedder, "embed_shard", lambda self, url, progress=None: (
        encoded.append(Path(url).name), original(self, url, progress))[1])
    out = shards["root"] / "cache"
    common = ["cache", "--shards", shards["pattern"], "--out", str(out), "--imagebind", "tiny",
              "--imagebind-weights", shards["weights"], "--batch-size", "3", "--device", "cpu",
              "--world-size", "2", "--no-progress", "--wait-timeout", "5"]
    cli_main([*common, "--rank", "1"])  # rank 1 first: writes its part, builds nothing
    assert encoded == ["000001.tar"] and not (out / "knn.index").exists()
    assert sorted(p.name for p in (out / "parts").glob("*.npy")) == ["000001.tar.npy"]
    cli_main([*common, "--rank", "0"])  # rank 0: its own shard only, then merges both parts
    assert encoded == ["000001.tar", "000000.tar"]
    summary = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert summary["rank"] == 0 and summary["shards_encoded"] == 1 and summary["index"]["count"] == 2 * PER_SHARD

    cache = load_cache(out)
    assert cache.ids == sorted(shards["images"]) and cache.meta["index_type"] == "Flat"
    assert cache.meta["embedding_model"]["preset"] == "tiny" and len(cache.meta["embedding_model"]["sha256"]) == 64
    model = build_model("tiny", "pretrain", "tiny", shards["weights"])
    image = torch.stack([load_image(shards["images"]["000001.tar:1_0002"], train=False, size=224)])
    raw = model.encode_branch("vision", image)
    np.testing.assert_allclose(cache.gather(np.array([6]))[0], unit(raw.numpy())[0], atol=1e-5)
    plain = model.encode({"image": image})
    enhanced = model.encode({"image": image}, cache=cache)
    assert enhanced.shape == (1, 32) and torch.allclose(enhanced.norm(dim=-1), torch.ones(1))
    assert cache.neighbours(plain, k=1)[0][0][0] == "000001.tar:1_0002"  # an image finds itself
    expected = reference_enhance(plain.numpy(), cache.gather(np.arange(len(cache))), 8, 20.0, 0.5)
    np.testing.assert_allclose(enhanced.numpy(), expected, atol=1e-5)

    encoded.clear()  # rerun: complete parts of the same encoder are reused
    cli_main([*common, "--rank", "1"])
    assert encoded == []


def test_rank0_waits_for_missing_ranks(shards, tmp_path):
    with pytest.raises(SystemExit, match="ranks \\[1\\] of 2 did not finish"):
        cache_main(["--shards", shards["pattern"], "--out", str(tmp_path / "c"), "--imagebind", "tiny",
              "--imagebind-weights", shards["weights"], "--device", "cpu", "--rank", "0", "--world-size", "2",
              "--no-progress", "--wait-timeout", "0"])
