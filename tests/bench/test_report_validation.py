"""`bpgrad report` refuses result files no trial can have written: one line, file:line, exit 2.

Each case edits one line of a copy of the committed fixture run (``alpha/seed_0.jsonl``, whose
lines are: 1 config, 2 epoch 0, 3 steps of epoch 1, 4 epoch 1, 5 steps of epoch 2, 6 epoch 2,
7 summary) the way a hand edit or a damaged disk would, and runs the real command line.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bpgrad.bench.analysis import analyse
from bpgrad.bench.validation import RecordError, read_checked
from bpgrad.cli import main

RUN = Path(__file__).parent / "fixtures" / "run_small"
ALPHA = Path("fixture_problem") / "alpha" / "seed_0.jsonl"

Edit = Callable[[list[str]], list[str]]


def _set(line: int, **changes: Any) -> Edit:
    """Replace fields of the record on ``line`` (1-based); json writes NaN/Infinity as such."""
    def edit(lines: list[str]) -> list[str]:
        rec = json.loads(lines[line - 1])
        rec.update(changes)
        lines[line - 1] = json.dumps(rec)
        return lines
    return edit


def _set_final(**changes: Any) -> Edit:
    def edit(lines: list[str]) -> list[str]:
        rec = json.loads(lines[6])
        rec["final"].update(changes)
        lines[6] = json.dumps(rec)
        return lines
    return edit


def _drop(line: int, key: str) -> Edit:
    def edit(lines: list[str]) -> list[str]:
        rec = json.loads(lines[line - 1])
        del rec[key]
        lines[line - 1] = json.dumps(rec)
        return lines
    return edit


def _raw(line: int, text: str) -> Edit:
    def edit(lines: list[str]) -> list[str]:
        lines[line - 1] = text
        return lines
    return edit


def _config(**changes: Any) -> Edit:
    def edit(lines: list[str]) -> list[str]:
        rec = json.loads(lines[0])
        for dotted, value in changes.items():
            *parents, key = dotted.split("__")
            target = rec
            for p in parents:
                target = target[p]
            target[key] = value
        lines[0] = json.dumps(rec)
        return lines
    return edit


# (case id, edit, line named in the message, what the message says)
CASES: list[tuple[str, Edit, int, str]] = [
    ("accuracy as percent", _set(6, test_accuracy=150.0), 6,
     "test_accuracy = 150.0 must be null or a fraction in [0, 1]"),
    ("accuracy above one", _set(4, valid_accuracy=1.0001), 4, "valid_accuracy = 1.0001"),
    ("negative accuracy", _set(6, train_accuracy=-0.1), 6, "train_accuracy = -0.1"),
    ("accuracy as a string", _set(6, test_accuracy="0.9"), 6, 'test_accuracy = "0.9"'),
    ("negative loss", _set(4, train_loss=-1.0), 4, "train_loss = -1.0 must be null or a finite"),
    ("NaN literal", _set(6, test_loss=float("nan")), 6, "NaN is not strict JSON"),
    ("Infinity literal", _set(4, valid_loss=float("inf")), 4, "Infinity is not strict JSON"),
    ("huge loss overflows to inf", _raw(4, json.dumps({
        **json.loads((RUN / ALPHA).read_text().splitlines()[3]), "test_loss": 1e308,
    }).replace("1e+308", "1e999")), 4, "test_loss = Infinity must be null or a finite"),
    ("negative step loss", _set(3, loss=[2.0, -1.5, 1.0]), 3, "loss[1] = -1.5"),
    ("bool step loss", _set(3, loss=[2.0, True, 1.0]), 3, "loss[1] = true"),
    ("negative eta", _set(3, eta=[0.1, 0.1, -0.1]), 3, "eta[2] = -0.1"),
    ("series length", _set(3, loss=[2.0, 1.5]), 3, "loss has 2 values for 3 steps"),
    ("steps go back", _set(5, step=[3, 4, 5]), 5, "step 3 comes after step 3"),
    ("fractional step", _set(5, step=[4, 5.5, 6]), 5, "step 5.5 must be an integer >= 0"),
    ("negative epoch", _set(4, epoch=-1), 4, "epoch = -1 must be an integer >= 0"),
    ("fractional epoch", _set(4, epoch=1.5), 4, "epoch = 1.5 must be an integer >= 0"),
    ("bool step", _set(4, step=True), 4, "step = true must be an integer >= 0"),
    ("negative wall time", _set(4, wall_time=-3.0), 4, "wall_time = -3.0"),
    ("evaluation goes back", _set(6, step=2), 6, "evaluation at step 2 follows one at step 3"),
    ("negative epochs completed", _set(7, epochs_completed=-1), 7, "epochs_completed = -1"),
    ("summary steps", _set(7, steps=-6), 7, "steps = -6 must be an integer >= 0"),
    ("final accuracy", _set_final(test_accuracy=2), 7, "final test_accuracy = 2"),
    ("summary status", _set(7, status="great"), 7, 'summary status "great" is not one of'),
    ("summary final type", _set(7, final=[0.9]), 7, "the summary's 'final' must be a JSON obj"),
    ("schema version", _config(schema_version=99), 1, "schema_version 99 is not one this bpgrad"),
    ("schema version as text", _config(schema_version="1"), 1, 'schema_version "1" is not'),
    ("missing required field", _drop(4, "test_loss"), 4, "the epoch record lacks test_loss"),
    ("missing seed", _drop(1, "seed"), 1, "the config record lacks seed"),
    ("unknown kind", _set(4, kind="epochs"), 4, 'unknown record kind "epochs"'),
    ("config not first", lambda lines: [lines[1], lines[0], *lines[2:]], 1,
     "the config record must be the first record"),
    ("record after summary", lambda lines: [*lines, lines[5]], 8,
     "a record follows the summary"),
    ("truncated line", _raw(4, '{"kind": "epoch", "epoch": 1, "st'), 4, "not valid JSON"),
    ("not an object", _raw(4, "[1, 2]"), 4, "a record must be a JSON object"),
    ("label of another folder", _config(optimizer__label="gamma"), 1,
     "the config says problem 'fixture_problem', optimizer 'gamma', seed 0 but the file lies at "
     "fixture_problem/alpha/seed_0.jsonl"),
    ("seed of another file", _config(seed=3), 1, "seed 3 but the file lies at"),
    ("zero epochs budget", _config(budget__epochs=0), 1, "budget epochs = 0 must be an integer"),
    ("problem not an object", _config(problem="fixture_problem"), 1,
     "config field 'problem' must be a JSON object"),
]


def _edited_run(tmp_path: Path, edit: Edit) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    path = run / ALPHA
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    return run, path


def _refusal(capsys: pytest.CaptureFixture[str], run: Path) -> str:
    rc = main(["report", str(run), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no traceback
    assert not (run / "report.md").exists() and not (run / "report.html").exists()
    return lines[0]


@pytest.mark.parametrize(("edit", "line", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_report_refuses_impossible_records(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           edit: Edit, line: int, message: str) -> None:
    run, path = _edited_run(tmp_path, edit)
    err = _refusal(capsys, run)
    assert err.startswith(f"bpgrad report: error: {path}:{line}: "), err
    assert message in err, err
    if "schema_version" not in message:
        assert err.endswith("fix or delete the file (`bpgrad compare` reruns a missing trial)")


def test_unedited_fixture_and_an_unfinished_trial_are_accepted(tmp_path: Path) -> None:
    # The same edits' starting point passes; so do nulls (epoch 0's train loss, a diverged seed's
    # losses) and a trial still running (no summary yet).
    run, path = _edited_run(tmp_path, lambda lines: lines[:5])
    an = analyse(run)
    (alpha,) = [r for r in an.rows if r.label == "alpha"]
    assert alpha.n_incomplete == 1 and alpha.final_test_accuracy.n == 1
    assert len(read_checked(path)) == 5


@pytest.mark.parametrize(("content", "message"), [
    (b"", "the file is empty"),
    (b"\xff\xfe\x00garbage\n", "not UTF-8 text"),
])
def test_empty_or_binary_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         content: bytes, message: str) -> None:
    run, path = _edited_run(tmp_path, lambda lines: lines)
    path.write_bytes(content)
    err = _refusal(capsys, run)
    assert err.startswith(f"bpgrad report: error: {path}: {message}"), err


def test_corrupt_run_manifest_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    run, _ = _edited_run(tmp_path, lambda lines: lines)
    (run / "run.json").write_text('{"command": "bpgrad compare')
    err = _refusal(capsys, run)
    assert f"{run / 'run.json'}: not valid JSON" in err and "delete it" in err


def test_record_error_is_a_schema_error() -> None:
    # The command line (and anything else catching SchemaError) treats both the same way.
    from bpgrad.bench.results import SchemaError

    assert issubclass(RecordError, SchemaError)
