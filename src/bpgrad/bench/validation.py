"""Range checks on result files: refuse, naming file and line, what no trial can have written.

:func:`bpgrad.bench.results.validate_records` checks the *shape* of a trial file (kinds, required
fields, order, schema version). This module checks the *values* against what the runner can
produce, because a report computed from an edited or damaged file is worse than no report: a
test accuracy of 1.5 would be printed as 150 %. Every problem is reported as one line
``PATH:LINE: what is wrong; what to do`` through :class:`RecordError`, a
:class:`~bpgrad.bench.results.SchemaError`, so the command line turns it into exit status 2.

The rules, per field name wherever it occurs (``epoch`` and ``eval`` records, a summary's
``final``):

=====================================================  ==========================================
field                                                  allowed
=====================================================  ==========================================
``*_accuracy``                                         ``null`` or a number in [0, 1] (a fraction)
``*_loss``, ``loss``, ``eta``, ``grad_norm``            ``null`` or a finite number >= 0
``wall_time``, ``train_time``, ``replica_spread``       ``null`` or a finite number >= 0
``epoch``, ``step``, ``steps``, ``epochs_completed``,   an integer >= 0 (``diverged_at_step`` may
``resumes``, ``diverged_at_step``                       be ``null``)
=====================================================  ==========================================

``null`` is how the schema stores a non-finite value (a diverged trial) or a metric the problem
does not have; a bare ``NaN`` or ``Infinity`` is not strict JSON and is refused. Across records,
global step indices must increase, and the config must match the file's place in the run folder
(``<problem>/<label>/seed_<k>.jsonl``) so that a moved or copied file cannot be reported under
another optimizer's name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bpgrad.bench import results
from bpgrad.bench.results import (
    _REQUIRED,
    RECORD_KINDS,
    SCHEMA_VERSION,
    STATUSES,
    SchemaError,
)

#: schema versions the reader accepts (older files stay readable when the schema grows)
_READABLE: tuple[int, ...] = tuple(getattr(results, "READABLE_VERSIONS", (SCHEMA_VERSION,)))

_ADVICE = "fix or delete the file (`bpgrad compare` reruns a missing trial)"


class RecordError(SchemaError):
    """A result file holds a value no trial can have produced; the message names file and line."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fraction(value: Any) -> str | None:
    if value is None:
        return None
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        return "must be null or a fraction in [0, 1] (accuracies are stored as fractions, not %)"
    return None


def _nonnegative(value: Any) -> str | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        return "must be null or a finite number >= 0"
    return None


def _count(value: Any) -> str | None:
    if not _is_int(value) or value < 0:
        return "must be an integer >= 0"
    return None


def _optional_count(value: Any) -> str | None:
    return None if value is None else _count(value)


def _rule(key: str) -> Callable[[Any], str | None] | None:
    """The check for a metric or counter ``key`` (None: the key is not range-checked)."""
    if key.endswith("_accuracy"):
        return _fraction
    if key.endswith("_loss") or key in ("loss", "wall_time", "train_time", "replica_spread"):
        return _nonnegative
    if key in ("epoch", "step", "steps", "epochs_completed", "resumes"):
        return _count
    if key == "diverged_at_step":
        return _optional_count
    return None


#: per-step series with a known sign; any other series only has to hold numbers or nulls
_STEP_SERIES_NONNEGATIVE = ("loss", "eta", "grad_norm")


class _FileChecker:
    """Checks one trial file record by record, remembering what order checks need."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_step = 0
        self.last_eval_step = 0
        self.summary_seen = False
        self.line = 0

    def fail(self, message: str) -> RecordError:
        return RecordError(f"{self.path}:{self.line}: {message}; {_ADVICE}")

    def fields(self, rec: Mapping[str, Any], *, where: str = "") -> None:
        for key, value in rec.items():
            rule = _rule(key)
            problem = rule(value) if rule is not None else None
            if problem is not None:
                raise self.fail(f"{where}{key} = {json.dumps(value)} {problem}")

    def config(self, rec: Mapping[str, Any]) -> None:
        version = rec.get("schema_version")
        if not _is_int(version) or version not in _READABLE:
            raise RecordError(
                f"{self.path}:{self.line}: schema_version {json.dumps(version)} is not one this "
                f"bpgrad reads ({', '.join(map(str, _READABLE))}); report it with the bpgrad "
                "version that wrote it, or rerun the trial"
            )
        for key in ("problem", "optimizer", "budget", "environment"):
            if not isinstance(rec.get(key), dict):
                raise self.fail(f"config field {key!r} must be a JSON object")
        names = {"problem name": rec["problem"].get("name"),
                 "optimizer name": rec["optimizer"].get("name"),
                 "optimizer label": rec["optimizer"].get("label")}
        for what, value in names.items():
            if not isinstance(value, str) or not value:
                raise self.fail(f"the {what} must be a non-empty string")
        if not _is_int(rec.get("seed")):
            raise self.fail(f"seed = {json.dumps(rec.get('seed'))} must be an integer")
        for key in ("epochs", "steps_per_epoch", "batch_size"):
            value = rec["budget"].get(key)
            if value is not None and (not _is_int(value) or value < 1):
                raise self.fail(f"budget {key} = {json.dumps(value)} must be an integer >= 1")
        # The layout is OUT/<problem>/<label>/seed_<k>.jsonl: a file whose config disagrees with
        # its place would be reported under the wrong problem, optimizer or seed.
        place = (self.path.parent.parent.name, self.path.parent.name, self.path.name)
        written = (names["problem name"], names["optimizer label"], f"seed_{rec['seed']}.jsonl")
        if place != written:
            raise self.fail(
                f"the config says problem {written[0]!r}, optimizer {written[1]!r}, seed "
                f"{rec['seed']} but the file lies at {'/'.join(place)}"
            )

    def steps(self, rec: Mapping[str, Any]) -> None:
        steps = rec.get("step")
        if not isinstance(steps, list):
            raise self.fail("a steps record's 'step' must be a list")
        for key, values in rec.items():
            if key in ("kind", "epoch", "step") or not isinstance(values, list):
                continue
            if len(values) != len(steps):
                raise self.fail(f"{key} has {len(values)} values for {len(steps)} steps")
            check = _nonnegative if key in _STEP_SERIES_NONNEGATIVE else _finite_or_null
            for i, value in enumerate(values):
                problem = check(value)
                if problem is not None:
                    raise self.fail(f"{key}[{i}] = {json.dumps(value)} {problem}")
        for step in steps:
            if _count(step) is not None:
                raise self.fail(f"step {json.dumps(step)} must be an integer >= 0")
            if step <= self.last_step:
                raise self.fail(f"step {step} comes after step {self.last_step}; steps must "
                                "increase")
            self.last_step = step

    def record(self, rec: dict[str, Any], index: int) -> None:
        kind = rec.get("kind")
        if kind not in RECORD_KINDS:
            raise self.fail(f"unknown record kind {json.dumps(kind)} (known: "
                            f"{', '.join(RECORD_KINDS)})")
        if (kind == "config") != (index == 0):
            raise self.fail("the config record must be the first record, and only the first")
        if self.summary_seen:
            raise self.fail("a record follows the summary, which must be the last record")
        self.summary_seen = kind == "summary"
        missing = [key for key in _REQUIRED[kind] if key not in rec]
        if missing:
            raise self.fail(f"the {kind} record lacks {', '.join(missing)}")
        # A steps record's fields are parallel lists, checked element-wise by steps().
        self.fields({"epoch": rec["epoch"]} if kind == "steps" else rec)
        if kind == "config":
            self.config(rec)
        elif kind == "steps":
            self.steps(rec)
        elif kind in ("epoch", "eval"):
            # Evaluations (at epoch ends and, with an evaluation interval, inside epochs) are
            # written in the order they ran. Where they stand relative to the steps records is
            # the runner's business: the step log is flushed in batches.
            if rec["step"] < self.last_eval_step:
                raise self.fail(f"evaluation at step {rec['step']} follows one at step "
                                f"{self.last_eval_step}; evaluations must not go back in time")
            self.last_eval_step = rec["step"]
        elif kind == "summary":
            if rec.get("status") not in STATUSES:
                raise self.fail(f"summary status {json.dumps(rec.get('status'))} is not one "
                                f"of {', '.join(STATUSES)}")
            final = rec.get("final")
            if not isinstance(final, dict):
                raise self.fail("the summary's 'final' must be a JSON object")
            self.fields(final, where="final ")


def _finite_or_null(value: Any) -> str | None:
    if value is None or (_is_number(value) and math.isfinite(value)):
        return None
    return "must be null or a finite number"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON (the schema stores non-finite values as null)")


def read_checked(path: Path) -> list[dict[str, Any]]:
    """Read a trial file and check every record's values; raises :class:`RecordError`.

    Returns the records (blank lines skipped), ready for
    :func:`bpgrad.bench.results.parse_trial`, which then checks the schema's shape.

    Example::

        >>> parse_trial(path, read_checked(path))  # doctest: +SKIP
    """
    path = Path(path)
    checker = _FileChecker(path)
    records: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path}: not UTF-8 text (byte {exc.start}); {_ADVICE}") from None
    except OSError as exc:
        raise RecordError(f"{path}: cannot be read ({exc.strerror}); check its permissions"
                          ) from None
    for lineno, line in enumerate(text.splitlines(), 1):
        checker.line = lineno
        if not line.strip():
            continue
        try:
            rec = json.loads(line, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise checker.fail(f"not valid JSON ({exc.msg}, column {exc.colno})") from None
        except ValueError as exc:
            raise checker.fail(str(exc)) from None
        if not isinstance(rec, dict):
            raise checker.fail("a record must be a JSON object")
        checker.record(rec, len(records))
        records.append(rec)
    if not records:
        raise RecordError(f"{path}: the file is empty; {_ADVICE}")
    return records
