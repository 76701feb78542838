"""tarproc: fast, dependable processing of datasets stored as sharded tar files.

The core (sample streams, storage URLs, shard patterns, the per-sample runner) imports no Dask, so
the `tarproc` command starts fast; everything here is loaded on first use.

    import tarproc
    for sample in tarproc.iter_samples("data/imagenet_train-{0000..0003}.tgz"):
        ...
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use)
_EXPORTS = {
    "TarprocError": "errors", "FormatError": "errors", "StorageError": "errors",
    "PatternError": "errors", "SampleFailed": "errors", "DuplicateKeyError": "errors",
    "expand": "shards", "expand_inputs": "shards",
    "iter_samples": "streams", "SampleWriter": "streams", "ShardWriter": "streams",
    "write_samples": "streams",
    "open_read": "storage", "open_write": "storage",
    "process_stream": "processing",
    "map_shards": "jobs.shardmap", "extract": "jobs.shardmap", "count_values": "jobs.shardmap",
    "list_shards": "jobs.shardmap", "JobFailed": "jobs.shardmap",
    "shuffle": "jobs.twophase", "sort": "jobs.twophase",
    "upload": "jobs.upload_job",
    "run_items": "jobs.driver", "JobResult": "jobs.driver",
    "Cluster": "jobs.cluster",
    "MapReduce": "mapreduce",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tarproc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
