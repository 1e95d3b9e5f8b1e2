"""``bpgrad data fetch NAME`` and ``bpgrad data list``.

The harness's CLI module calls :func:`register` with its subparsers object.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bpgrad.bench.data.cache import DATA_DIR_ENV
from bpgrad.bench.data.errors import DataError
from bpgrad.bench.data.sources import DATASETS, SOURCE_NAMES, cache_status, fetch


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help=f"cache folder (default: ${DATA_DIR_ENV}, else $XDG_CACHE_HOME/bpgrad/data, "
             "else ~/.cache/bpgrad/data)",
    )


def _cmd_fetch(args: argparse.Namespace) -> int:
    status = 0
    for name in args.names:
        try:
            fetch(name, data_dir=args.data_dir, source=args.source, force=args.force,
                  log=lambda msg: print(msg, file=sys.stderr))
        except DataError as exc:  # one line and exit 2, as every user error
            print(f"bpgrad data fetch: error: {exc}", file=sys.stderr)
            status = 2
    return status


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [("name", "status", "size", "source", "description")]
    for name in DATASETS:
        st = cache_status(name, args.data_dir)
        rows.append((
            st.name, "cached" if st.cached else "missing",
            _human(st.size_bytes) if st.cached else "-", st.source or "-", st.description,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    if rows[1:]:
        print(f"cache folder: {cache_status(next(iter(DATASETS)), args.data_dir).path.parent}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``data`` subcommand (with ``fetch`` and ``list``) to ``subparsers``."""
    data = subparsers.add_parser("data", help="fetch, verify and list benchmark data sets")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda _args: (data.print_help(), 2)[1])

    p_fetch = sub.add_parser("fetch", help="download/unpack, verify (sha256) and cache data sets")
    p_fetch.add_argument("names", nargs="+", choices=sorted(DATASETS), metavar="NAME",
                         help=f"data set(s): {', '.join(sorted(DATASETS))}")
    p_fetch.add_argument("--source", choices=SOURCE_NAMES, default=None,
                         help="use only this source (default: try the data set's sources in order)")
    p_fetch.add_argument("--force", action="store_true", help="fetch again even if cached")
    _add_data_dir(p_fetch)
    p_fetch.set_defaults(func=_cmd_fetch)

    p_list = sub.add_parser("list", help="show each data set's cache status, size and source")
    _add_data_dir(p_list)
    p_list.set_defaults(func=_cmd_list)


def main(argv: list[str] | None = None) -> int:
    """Run ``bpgrad data`` stand-alone (``python -m bpgrad.bench.data.cli``)."""
    parser = argparse.ArgumentParser(prog="bpgrad")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
