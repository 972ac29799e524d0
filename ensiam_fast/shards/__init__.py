"""The on-disk shard format and conversion.

* ``format``: names, the tar writer, safe file writing (the contract: ``shards/README.md``)
* ``index``: the DALI index of a tar (reading, scanning a tar, writing)
* ``manifest``: ``manifest.json``
* ``verify``: checking converted shards
* ``convert``: the conversion engine (``cli``: ``tools/make_shards.py``'s command line); ``plan`` (what to
  write, resuming) and ``encode`` (one sample's bytes) are its parts
* ``sources``: one reader per source layout

The names most code needs are re-exported here (``from ensiam_fast.shards import read_manifest``).
"""

from ensiam_fast.shards.format import MANIFEST, ShardFormatError, index_name, shard_bounds, shard_name, write_shard
from ensiam_fast.shards.manifest import Manifest, SplitInfo, read_manifest, shard_paths, write_manifest

__all__ = [
    "MANIFEST",
    "Manifest",
    "ShardFormatError",
    "SplitInfo",
    "index_name",
    "read_manifest",
    "shard_bounds",
    "shard_name",
    "shard_paths",
    "write_manifest",
    "write_shard",
]
