"""Data sets for the comparison harness: offline sources, sha256 verification, a decoded cache.

Quick use::

    from bpgrad.bench.data import load_arrays
    arrays = load_arrays("mnist")          # fetches into the cache on first use
    arrays["x_train"].shape                # (60000, 28, 28) uint8

See ``docs/data.md`` for sources, checksums, the cache folder and the ``bpgrad data`` commands.
"""

from bpgrad.bench.data.cache import DATA_DIR_ENV, default_data_dir, resolve_data_dir
from bpgrad.bench.data.errors import (
    ChecksumError,
    DataError,
    DatasetNotCachedError,
    FormatError,
    SourceUnavailableError,
    UnsafeArchiveError,
)
from bpgrad.bench.data.formats import (
    decode_idx,
    encode_idx,
    read_cifar10_dir,
    read_cifar_batch,
    read_idx,
    safe_extract_tar,
)
from bpgrad.bench.data.sources import (
    CIFAR10,
    DATASETS,
    FASHION_MNIST,
    MNIST,
    SOURCE_NAMES,
    CacheStatus,
    DatasetSpec,
    IdxFile,
    cache_status,
    fetch,
    get_spec,
    load_arrays,
    load_cached,
    remove_cached,
)

__all__ = [
    "CIFAR10",
    "DATASETS",
    "DATA_DIR_ENV",
    "FASHION_MNIST",
    "MNIST",
    "SOURCE_NAMES",
    "CacheStatus",
    "ChecksumError",
    "DataError",
    "DatasetNotCachedError",
    "DatasetSpec",
    "FormatError",
    "IdxFile",
    "SourceUnavailableError",
    "UnsafeArchiveError",
    "cache_status",
    "decode_idx",
    "default_data_dir",
    "encode_idx",
    "fetch",
    "get_spec",
    "load_arrays",
    "load_cached",
    "read_cifar10_dir",
    "read_cifar_batch",
    "read_idx",
    "remove_cached",
    "resolve_data_dir",
    "safe_extract_tar",
]
