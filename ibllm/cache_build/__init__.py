"""Building the visual cache from image shards, in clip-retrieval's shape (one concern per file).

* :mod:`.reader` — which shards exist and which are this rank's (``shards[rank::world_size]``).
* :mod:`.mapper` — the frozen ImageBind vision tower: shard -> (sample ids, L2-normalised embeddings).
* :mod:`.writer` — one part per shard (``parts/NAME.npy`` + ``NAME.ids.txt``) and a marker per rank.
* :mod:`.index` — choosing, building, tuning and saving the FAISS index (:func:`.index.build_index`).
* :mod:`.distributor` — runs the above on every rank, waits at a barrier, then rank 0 merges the parts
  in shard order and builds one index.

``python -m ibllm cache`` (:mod:`ibllm.cli.cache`) and the Lightning callback
``callbacks.cache_builder.CacheBuilder`` (the same when training finishes) drive it.
"""

from ibllm.cache_build.distributor import build_cache_from_shards

__all__ = ["build_cache_from_shards"]
