"""Reader: the shard list and this rank's share of it."""

from __future__ import annotations

import os
from typing import Any

from ibllm.features import output_path, rank_shards


def shard_share(shards: Any, rank: int, world_size: int) -> tuple[list[str], list[str]]:
    """``(all shard urls, this rank's urls)``; ``shards`` is anything ``expand_urls`` takes. Names must be unique."""
    from datamodules.shards import expand_urls

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


def shard_name(url: str) -> str:
    """The file name of a shard url (``a/b/000001.tar`` -> ``000001.tar``)."""
    return os.path.basename(output_path(url, "."))
