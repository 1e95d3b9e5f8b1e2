"""Exception types of the data layer.

Every error names the file involved and says what to do, because a data problem found late (after
hours of training on a truncated file) is far more expensive than a loud failure at load time.
"""

from __future__ import annotations


class DataError(RuntimeError):
    """Base class of every error raised by :mod:`bpgrad.bench.data`."""


class ChecksumError(DataError):
    """A file or decoded array does not match its pinned sha256 (corrupt, truncated or changed)."""


class FormatError(DataError):
    """A file is not in the expected format (bad idx header, wrong size, bad CIFAR pickle)."""


class UnsafeArchiveError(DataError):
    """An archive member would escape the extraction folder or is a link/device."""


class SourceUnavailableError(DataError):
    """A source could not deliver the data set (no npm/apt, no network, HTTP error)."""


class DatasetNotCachedError(DataError):
    """The data set is not in the cache and fetching was not allowed."""
