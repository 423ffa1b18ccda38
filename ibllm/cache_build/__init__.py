"""Building the visual cache from image shards, in clip-retrieval's shape (one concern per file).

* :mod:`.reader` — which shards exist and which are this rank's (``shards[rank::world_size]``).
* :mod:`.mapper` — the frozen ImageBind vision tower: shard -> (sample ids, L2-normalised embeddings).
* :mod:`.writer` — one part per shard (``parts/NAME.npy`` + ``NAME.ids.txt``) and a marker per rank.
* :mod:`.distributor` — runs the above on every rank, waits at a barrier, then rank 0 merges the parts
  in shard order and builds one FAISS index (:func:`ibllm.cache.build_index`).
* :mod:`.command` — ``python -m ibllm cache``; :class:`callbacks.cache_builder.CacheBuilder` is the
  Lightning callback doing the same when training finishes.
"""

from ibllm.cache_build.distributor import build_cache_from_shards

__all__ = ["build_cache_from_shards"]
