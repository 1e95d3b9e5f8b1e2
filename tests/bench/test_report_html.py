"""report.html: the data function, a self-contained page, and the page in a real headless Chromium.

The browser tests use Debian's ``chromium`` (``.ci/run`` installs it): once with ``--dump-dom``
(the DOM after the page's script ran: every optimizer's curve is an SVG path, and errors are
recorded in the page), once driven over the DevTools protocol on a pipe (hover, legend and axis
buttons, console messages and exceptions). Without chromium they skip locally and fail in CI.
"""

from __future__ import annotations

import fcntl
import html
import json
import math
import os
import re
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from bpgrad.bench.analysis import Curve, analyse
from bpgrad.bench.html_report import chart_data, downsample, inline, write_html
from bpgrad.bench.report import render_markdown, report_blocks

RUN = Path(__file__).parent / "fixtures" / "run_small"
REAL_RUN = Path(__file__).parent / "fixtures" / "run_mnist_eval"
LABELS = ["alpha", "beta@lr=0.01", "delta", "gamma"]  # selected rows, in table order


def _write(run: Path) -> Path:
    """report.md (without its matplotlib plots, which test_report.py covers) and report.html."""
    an = analyse(run)
    blocks = report_blocks(an)
    (run / "report.md").write_text(render_markdown(blocks, lambda problem: []))
    return write_html(run / "report.html", f"bpgrad comparison: {run.name}", blocks, an)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("html") / "run"
    shutil.copytree(RUN, run)
    return _write(run)


# ---------------------------------------------------------------------------------------------
# The data and the page, without a browser


def test_chart_data_holds_every_curve_as_strict_json() -> None:
    data = chart_data(analyse(RUN))
    json.dumps(data, allow_nan=False)  # strict JSON: NaN must have become null
    (problem,) = data["problems"]
    assert problem["name"] == "fixture_problem" and problem["labels"] == LABELS
    charts = {c["metric"]: c for c in problem["charts"]}
    assert list(charts) == ["train_loss", "test_error", "test_loss", "eta"]
    for metric in ("train_loss", "test_error", "test_loss"):
        assert [s["label"] for s in charts[metric]["series"]] == LABELS
    loss = {s["label"]: s for s in charts["train_loss"]["series"]}
    assert loss["alpha"]["x"] == [1, 2, 3, 4, 5, 6]
    assert loss["alpha"]["mean"] == [2.0, 1.5, 1.0, 0.9, 0.8, 0.7]
    assert loss["alpha"]["n_seeds"] == 2 and loss["alpha"]["std"][0] == 0.0
    # gamma's seed 1 diverged (nulls): the mean is seed 0's value, not null
    assert loss["gamma"]["mean"][2] == 1.0 and loss["gamma"]["mean"][4] == 0.8
    err = {s["label"]: s for s in charts["test_error"]["series"]}
    assert charts["test_error"]["x_label"] == "epoch" and err["alpha"]["x"] == [0, 1, 2]
    assert err["alpha"]["mean"] == pytest.approx([0.9, 0.19, 0.15])
    assert err["alpha"]["std"][2] == pytest.approx(math.sqrt(0.005), rel=1e-5)
    assert charts["train_loss"]["y_log"] and not charts["test_error"]["y_log"]
    assert [s["label"] for s in charts["eta"]["series"]] == ["delta"]


def test_long_series_are_bucket_averaged() -> None:
    x = [float(i) for i in range(1, 11)]
    mean = [1.0, 2.0, 3.0, 4.0, math.nan, 6.0, math.nan, math.nan, math.nan, 10.0]
    curve = Curve("a", x, mean, [0.0] * 10, 2)
    small, k = downsample(curve, 4)
    assert k == 3 and small.x == [3.0, 6.0, 9.0, 10.0]
    assert small.mean[:2] == [2.0, 5.0] and math.isnan(small.mean[2]) and small.mean[3] == 10.0
    assert downsample(curve, 10) == (curve, 1)
    with pytest.raises(ValueError, match="max_points"):
        downsample(curve, 0)
    data = chart_data(analyse(RUN), max_points=4)
    train = data["problems"][0]["charts"][0]
    assert train["series"][0]["x"] == [2, 4, 6]
    assert train["note"].startswith("mean of 2 consecutive steps per point")


def test_page_is_self_contained(report: Path) -> None:
    page = report.read_text()
    # The only URL is the SVG namespace, an identifier that is never fetched.
    assert set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", page)) == {
        "http://www.w3.org/2000/svg"}
    assert not re.search(r"<link\b|<img\b|<iframe\b|\bsrc\s*=|@import|@font-face|url\((?!#)",
                         page)
    assert "<script>" in page and "<style>" in page


class _Tables(HTMLParser):
    """Collects the text of every table cell, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def test_page_has_the_same_tables_and_text_as_the_markdown(report: Path) -> None:
    md = (report.parent / "report.md").read_text()
    md_rows = [[c.strip().replace("`", "") for c in line.strip("|").split("|")]
               for line in md.splitlines() if line.startswith("| ")]
    parser = _Tables()
    parser.feed(report.read_text())
    assert parser.rows == md_rows and len(md_rows) > 15
    assert "85.00 ± 7.07" in report.read_text()
    for phrase in ("Sweeps: selection on the validation split", "1 of 2 seed(s) diverged",
                   f"bpgrad report {report.parent}"):
        assert phrase in md and html.escape(phrase, quote=False) in report.read_text()


def test_embedded_data_round_trips_and_text_cannot_break_out(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    evil = "</script><script>window.pwned=1</script> & <b>"
    for path in run.glob("*/*/seed_*.jsonl"):
        lines = path.read_text().splitlines()
        config = json.loads(lines[0])
        config["problem"]["description"] = evil
        path.write_text("\n".join([json.dumps(config), *lines[1:]]) + "\n")
    page = _write(run).read_text()
    assert evil not in page and html.escape(evil, quote=False) in page
    blob = re.search(r'<script id="bpgrad-data" type="application/json">(.*?)</script>', page,
                     re.S)
    assert blob is not None and json.loads(blob.group(1)) == chart_data(analyse(run))


def test_inline_markdown() -> None:
    assert inline("*a* **b** `c*d*<e>` <x>") == (
        "<em>a</em> <strong>b</strong> <code>c*d*&lt;e&gt;</code> &lt;x&gt;")


# ---------------------------------------------------------------------------------------------
# In a real browser


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-extensions", "--mute-audio", "--hide-scrollbars"]


def chromium() -> str:
    """The browser binary: $BPGRAD_CHROMIUM, else chromium on PATH (skip locally, fail in CI)."""
    found = os.environ.get("BPGRAD_CHROMIUM") or next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
    if found and os.access(found, os.X_OK):
        return found
    message = (f"chromium not found ({found or 'not on PATH'}): report.html is tested in a real "
               "headless browser; install it with `apt-get install -y chromium` (.ci/run does) "
               "or set BPGRAD_CHROMIUM")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def dump_dom(page: Path, profile: Path) -> tuple[str, str]:
    """The DOM after the page's scripts ran, and the browser's log (console lines included)."""
    proc = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def _body(dom: str) -> dict[str, str]:
    match = re.search(r"</head>\s*<body([^>]*)>", dom)
    assert match is not None
    return dict(re.findall(r'([\w-]+)="([^"]*)"', match.group(1)))


def _assert_loads_and_draws_every_curve(report: Path, profile: Path) -> dict[str, Any]:
    """Load ``report`` in chromium; no errors, and every series of every chart is a path."""
    dom, log = dump_dom(report, profile)
    body = _body(dom)
    assert body.get("data-status") == "ready" and "data-js-errors" not in body, body
    assert '<pre id="js-errors" hidden=""></pre>' in dom
    assert [line for line in log.splitlines() if ":CONSOLE" in line] == []
    data = chart_data(analyse(report.parent))
    charts = {c["id"]: c for p in data["problems"] for c in p["charts"]}
    for ident, chart in charts.items():
        svg = re.search(rf'<svg [^>]*data-chart="{re.escape(ident)}"[^>]*>(.*?)</svg>', dom, re.S)
        assert svg is not None, ident
        paths = re.findall(r'<path class="curve" d="([^"]+)"[^>]*data-optimizer="([^"]+)"'
                           r'[^>]*data-points="(\d+)"', svg.group(1))
        assert [p[1] for p in paths] == [s["label"] for s in chart["series"]], ident
        for d, label, points in paths:
            expected = sum(v is not None for v in
                           next(s for s in chart["series"] if s["label"] == label)["mean"])
            assert int(points) == expected and d.count("L") == expected - 1, (ident, label)
    assert body["data-curves"] == str(sum(len(c["series"]) for c in charts.values()))
    return data


def test_page_loads_without_errors_and_draws_every_optimizer(report: Path, tmp_path: Path
                                                             ) -> None:
    data = _assert_loads_and_draws_every_curve(report, tmp_path / "profile")
    assert len(data["problems"][0]["charts"]) == 4


def test_real_run_evaluated_inside_epochs(tmp_path: Path) -> None:
    # A real run (committed result files): MNIST LeNet, the paper's six solvers, 2 seeds, 80
    # steps with --eval-interval 20 (schema 2 eval records): test curves over steps, 5 points.
    run = tmp_path / "run"
    shutil.copytree(REAL_RUN, run)
    data = _assert_loads_and_draws_every_curve(_write(run), tmp_path / "profile")
    (problem,) = data["problems"]
    assert problem["labels"] == ["bpgrad", "sgd", "adam", "adagrad", "adadelta", "rmsprop"]
    error = next(c for c in problem["charts"] if c["metric"] == "test_error")
    assert error["x_label"] == "step"
    assert {tuple(s["x"]) for s in error["series"]} == {(0, 20, 40, 60, 80)}
    assert all(s["n_seeds"] == 2 for s in error["series"])


def test_a_script_error_is_caught_and_shown(report: Path, tmp_path: Path) -> None:
    # The detector itself: a page whose data cannot be parsed must report the failure.
    broken = tmp_path / "broken.html"
    page = report.read_text()
    broken.write_text(re.sub(r'(<script id="bpgrad-data" type="application/json">).*?(</script>)',
                             r"\1{not json\2", page, count=1, flags=re.S))
    dom, _ = dump_dom(broken, tmp_path / "profile")
    body = _body(dom)
    assert body.get("data-status") == "failed" and body.get("data-js-errors") == "1"
    assert "SyntaxError" in dom and '<pre id="js-errors" hidden' not in dom


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``.

    Chromium reads commands on fd 3 and writes replies and events on fd 4, each a JSON object
    ended by a NUL byte. Console calls and uncaught exceptions are collected from the events.
    """

    def __init__(self, profile: Path) -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Copies above 9 so that the dup2 onto 3 and 4 in the child cannot clobber each other.
        high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)

        def child() -> None:
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "--window-size=1280,900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child, pass_fds=(3, 4))
        for fd in (to_browser_r, from_browser_w, high_r, high_w):
            os.close(fd)
        self.write_fd, self.read_fd = to_browser_w, from_browser_r
        self.buffer = b""
        self.next_id = 0
        self.session: str | None = None
        self.events: list[dict[str, Any]] = []

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.read_fd], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                raise ConnectionError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def send(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._message(deadline))

    def open(self, url: str) -> None:
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"],
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=1280, height=900,
                  deviceScaleFactor=1, mobile=False)
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                          awaitPromise=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def mouse(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def problems(self) -> list[str]:
        """Console messages and uncaught exceptions seen so far (the page logs nothing)."""
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.consoleAPICalled":
                out.append(f"console.{e['params']['type']}: {e['params'].get('args')}")
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(f"exception: {e['params']['exceptionDetails']}")
            elif e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error":
                out.append(f"log: {e['params']['entry']}")
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError, ConnectionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.write_fd)
        os.close(self.read_fd)


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    chromium()  # skip or fail before starting anything
    tools = DevTools(tmp_path / "profile")
    try:
        yield tools
    finally:
        tools.close()


def test_hover_legend_and_axis_buttons_work(report: Path, browser: DevTools) -> None:
    browser.open(report.as_uri())
    assert browser.js("document.body.dataset.status") == "ready"
    chart = 'document.querySelector(\'figure[data-chart="fixture_problem-test_error"]\')'

    # Hover: the pointer over the middle of the test-error chart (epoch 1) lists every optimizer.
    box = browser.js(f"(() => {{ const r = {chart}.querySelector('svg').getBoundingClientRect();"
                     " return [r.left, r.top, r.width, r.height]; })()")
    browser.js(f"{chart}.scrollIntoView()")
    box = browser.js(f"(() => {{ const r = {chart}.querySelector('svg').getBoundingClientRect();"
                     " return [r.left, r.top, r.width, r.height]; })()")
    left, top, width, height = box
    # Plot area: x from 70 to 622 of 640 viewBox units; epoch 1 is its middle.
    browser.mouse(left + width * (70 + 552 / 2) / 640, top + height * 0.5)
    tip = browser.js(f"(() => {{ const t = {chart}.querySelector('.tooltip'); return [t.hidden,"
                     " t.dataset.x, [...t.querySelectorAll('.tip-row')].map(r => r.textContent)]"
                     "; })()")
    hidden, x, rows = tip
    assert not hidden and x == "1"
    assert sorted(r.split(":")[0] for r in rows) == sorted(LABELS)
    assert "gamma: 0.6 ± 0.1414" in rows and "delta: 0.12" in rows
    browser.mouse(1, 1)
    assert browser.js(f"{chart}.querySelector('.tooltip').hidden") is True

    # Legend: clicking alpha hides it in every chart of the problem, clicking again shows it.
    def alpha_hidden() -> list[Any]:
        return browser.js("[...document.querySelectorAll('path.curve[data-optimizer=\"alpha\"]')]"
                          ".map(p => p.closest('g.series').getAttribute('display'))")
    assert alpha_hidden() == [None, None, None]
    browser.js(f"{chart}.querySelector('.legend-item[data-optimizer=\"alpha\"]').click()")
    assert alpha_hidden() == ["none", "none", "none"]
    assert browser.js("[...document.querySelectorAll('.legend-item[data-optimizer=\"alpha\"]')]"
                      ".map(b => b.getAttribute('aria-pressed'))") == ["false"] * 3
    browser.js(f"{chart}.querySelector('.legend-item[data-optimizer=\"alpha\"]').click()")
    assert alpha_hidden() == [None, None, None]

    # Axes: y to log changes the scale and its ticks; x to log drops epoch 0 (not > 0).
    def state() -> list[Any]:
        return browser.js(f"(() => {{ const s = {chart}.querySelector('svg'); return [s.dataset."
                          "yScale, s.dataset.xScale, [...s.querySelectorAll('.axes text')].map("
                          "t => t.textContent), s.querySelector('path.curve[data-optimizer="
                          "\"alpha\"]').dataset.points]; })()")
    y0, x0, ticks0, points0 = state()
    assert (y0, x0, points0) == ("linear", "linear", "3")
    browser.js(f"{chart}.querySelector('.axis-toggle[data-axis=\"y\"]').click()")
    y1, _, ticks1, _ = state()
    assert y1 == "log" and ticks1 != ticks0
    browser.js(f"{chart}.querySelector('.axis-toggle[data-axis=\"x\"]').click()")
    _, x2, _, points2 = state()
    assert x2 == "log" and points2 == "2"
    assert browser.js("document.body.dataset.jsErrors") is None
    assert browser.problems() == []
