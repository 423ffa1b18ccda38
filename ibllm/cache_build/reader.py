"""Reader: the shard list and this rank's share of it."""

from __future__ import annotations

from typing import Any

from ibllm.processing.shards import expand_urls, rank_shards, shard_name


def shard_share(shards: Any, rank: int, world_size: int) -> tuple[list[str], list[str]]:
    """``(all shard urls, this rank's urls)``; ``shards`` is anything ``expand_urls`` takes. Names must be unique."""
    urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"no shards match {shards!r}")
    seen: dict[str, str] = {}
    for url in urls:
        name = shard_name(url)
        if name in seen:
            raise ValueError(f"shards {seen[name]!r} and {url!r} have the same file name {name!r}; "
                             f"cache parts are named after shards, so names must be unique")
        seen[name] = url
    return urls, rank_shards(urls, rank, world_size)
