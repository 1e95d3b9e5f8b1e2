"""Result schema: validation, strict JSON, atomic writes, parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bpgrad.bench.results import (
    SCHEMA_VERSION,
    SchemaError,
    checkpoint_path,
    clean_json,
    parse_trial,
    read_records,
    trial_path,
    validate_records,
    write_records,
)

FIXTURES = Path(__file__).parent / "fixtures" / "run_small" / "fixture_problem"


def _valid() -> list[dict]:
    return read_records(FIXTURES / "alpha" / "seed_0.jsonl")


def test_fixture_files_follow_the_schema() -> None:
    for path in sorted(FIXTURES.glob("*/seed_*.jsonl")):
        validate_records(read_records(path), where=str(path))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[0].update(schema_version=SCHEMA_VERSION + 1), "not supported"),
        (lambda r: r[1].pop("test_accuracy"), "missing test_accuracy"),
        (lambda r: r.insert(2, r.pop()), "summary record must be last"),
        (lambda r: r.insert(1, dict(r[0])), "config record must be first"),
        (lambda r: r[-1].update(status="crashed"), "summary status"),
        (lambda r: r[2].update(loss=[1.0]), "loss has 1 != 3"),
        (lambda r: r[1].update(kind="metrics"), "unknown kind"),
    ],
)
def test_schema_violations_are_reported(mutate, message: str) -> None:
    records = _valid()
    mutate(records)
    with pytest.raises(SchemaError, match=message):
        validate_records(records)


def test_non_finite_values_become_null_and_file_is_strict_json(tmp_path: Path) -> None:
    assert clean_json({"a": (1.0, math.nan), "b": math.inf}) == {"a": [1.0, None], "b": None}
    path = tmp_path / "t.jsonl"
    records = _valid()
    records[2]["loss"] = [math.nan, math.inf, 1.0]
    write_records(path, records)
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert read_records(path)[2]["loss"] == [None, None, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]  # no temporary left behind


def test_paths_and_unsafe_names(tmp_path: Path) -> None:
    path = trial_path(tmp_path, "mnist_lenet", "adam@lr=0.001", 3)
    assert path == tmp_path / "mnist_lenet" / "adam@lr=0.001" / "seed_3.jsonl"
    assert checkpoint_path(path).name == "seed_3.ckpt.pt"
    with pytest.raises(ValueError, match="folder name"):
        trial_path(tmp_path, "mnist", "../evil", 0)


def test_parse_trial_aligns_series() -> None:
    trial = parse_trial(FIXTURES / "delta" / "seed_0.jsonl")
    assert trial.steps == [1, 2, 3, 4, 5, 6]
    assert len(trial.series["eta"]) == 6 and trial.series["eta"][0] == pytest.approx(0.01)
    assert trial.status == "finished" and trial.label == "delta" and trial.seed == 0
    diverged = parse_trial(FIXTURES / "gamma" / "seed_1.jsonl")
    assert diverged.status == "diverged" and diverged.loss[2] is None
