"""The on-disk result schema: one JSON Lines file per trial, written atomically.

Layout::

    OUT/<problem>/<optimizer label>/seed_<k>.jsonl      the trial's records
    OUT/<problem>/<optimizer label>/seed_<k>.ckpt.pt    resume checkpoint (deleted when finished)
    OUT/run.json                                         how the run was started (for the report)

Every line is one JSON object with a ``kind``:

* ``config`` (first line): ``schema_version``, the resolved problem / optimizer / budget, seed,
  device, thread count, package versions, git commit, host name and start time.
* ``steps`` (one or more per epoch): parallel lists ``step``, ``loss`` and, for optimizers that
  expose them (BPGrad), ``eta`` and ``grad_norm``. Step indices are global and start at 1.
* ``eval`` (schema 2; only with ``eval_interval``): an evaluation inside an epoch, every
  ``eval_interval`` global steps: ``epoch`` (the epoch it falls in), ``step``, ``valid_loss``,
  ``valid_accuracy``, ``test_loss``, ``test_accuracy``, ``wall_time``, ``train_time``. An epoch's
  last step is evaluated by its ``epoch`` record instead, never twice.
* ``epoch``: ``epoch`` (0 = before training), ``step``, ``train_loss``, ``train_accuracy``,
  ``valid_loss``, ``valid_accuracy``, ``test_loss``, ``test_accuracy``, ``wall_time`` and
  ``train_time`` (cumulative seconds).
* ``summary`` (last line, only when the trial is over): ``status`` (``finished`` or
  ``diverged``), ``epochs_completed``, ``steps``, ``final`` (the last epoch's metrics),
  ``wall_time``, ``diverged_at_step``, ``resumes``.

Non-finite floats are stored as ``null`` (JSON has no NaN); a diverged trial says so in its
summary. The whole file is rewritten through a temporary file and :func:`os.replace`, so a reader
(or a killed writer) never sees half a line.

Versions: 2 added the ``eval`` record (and ``budget.eval_interval`` in the header when set);
version 1 files have neither and are read as they are.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
#: versions this bpgrad reads (every earlier file stays readable)
READABLE_VERSIONS = (1, 2)

RECORD_KINDS = ("config", "steps", "eval", "epoch", "summary")
STATUSES = ("finished", "diverged")
#: metric names an ``epoch`` record carries (values may be ``null``)
EPOCH_METRICS = (
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_accuracy",
    "test_loss",
    "test_accuracy",
)

_REQUIRED: dict[str, tuple[str, ...]] = {
    "config": ("schema_version", "problem", "optimizer", "seed", "budget", "environment"),
    "steps": ("epoch", "step", "loss"),
    "eval": ("epoch", "step", "wall_time", *EPOCH_METRICS[2:]),
    "epoch": ("epoch", "step", "wall_time", *EPOCH_METRICS),
    "summary": ("status", "epochs_completed", "steps", "final", "wall_time"),
}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.@=,+\-]+$")


class SchemaError(ValueError):
    """A result file does not follow the schema (wrong version, missing field, bad order)."""


def trial_dir(out: Path, problem: str, label: str) -> Path:
    """Folder holding every seed of one (problem, optimizer label) pair."""
    for part in (problem, label):
        if not _SAFE_NAME.match(part):
            raise ValueError(
                f"{part!r} cannot be used as a folder name; use letters, digits and _.@=,+-"
            )
    return Path(out) / problem / label


def trial_path(out: Path, problem: str, label: str, seed: int) -> Path:
    """``OUT/<problem>/<label>/seed_<seed>.jsonl``."""
    return trial_dir(out, problem, label) / f"seed_{seed}.jsonl"


def checkpoint_path(result_path: Path) -> Path:
    """The checkpoint that belongs to a result file (``seed_k.ckpt.pt`` next to it)."""
    return result_path.with_name(result_path.name.removesuffix(".jsonl") + ".ckpt.pt")


def clean_json(value: Any) -> Any:
    """Make ``value`` strict-JSON: non-finite floats become ``None``, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    # numpy / torch scalars and anything else with a float value
    try:
        return clean_json(float(value))
    except (TypeError, ValueError):
        return str(value)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dumps_records(records: Iterable[Mapping[str, Any]]) -> str:
    """Serialise records as JSON Lines (strict JSON, one object per line)."""
    return "".join(json.dumps(clean_json(r), allow_nan=False) + "\n" for r in records)


def write_records(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Atomically (re)write a trial file with ``records``."""
    atomic_write_text(path, dumps_records(records))


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read a trial file; raises :class:`SchemaError` on a malformed line."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SchemaError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise SchemaError(f"{path}:{lineno}: a record must be a JSON object")
            records.append(rec)
    return records


def validate_records(records: Sequence[Mapping[str, Any]], *, where: str = "") -> None:
    """Check kinds, required fields, the schema version and the record order.

    Order: one ``config`` first, then ``steps``/``epoch`` records, then at most one ``summary``
    which must be last.
    """
    prefix = f"{where}: " if where else ""
    if not records:
        raise SchemaError(f"{prefix}empty trial file")
    for i, rec in enumerate(records):
        kind = rec.get("kind")
        if kind not in RECORD_KINDS:
            raise SchemaError(f"{prefix}record {i}: unknown kind {kind!r}")
        missing = [k for k in _REQUIRED[kind] if k not in rec]
        if missing:
            raise SchemaError(f"{prefix}record {i} ({kind}): missing {', '.join(missing)}")
        if (kind == "config") != (i == 0):
            raise SchemaError(f"{prefix}the config record must be first, and only first")
        if kind == "summary" and i != len(records) - 1:
            raise SchemaError(f"{prefix}the summary record must be last")
        if kind == "summary" and rec["status"] not in STATUSES:
            raise SchemaError(f"{prefix}summary status {rec['status']!r} not in {STATUSES}")
        if kind == "steps":
            n = len(rec["step"])
            for key in ("loss", "eta", "grad_norm"):
                if key in rec and len(rec[key]) != n:
                    raise SchemaError(f"{prefix}record {i}: {key} has {len(rec[key])} != {n}")
    version = records[0]["schema_version"]
    if version not in READABLE_VERSIONS:
        raise SchemaError(
            f"{prefix}schema_version {version} is not supported (this bpgrad reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); rerun the trial or use a matching "
            "bpgrad version"
        )
    if version < 2 and any(r.get("kind") == "eval" for r in records):
        raise SchemaError(f"{prefix}eval records need schema_version 2, the file says {version}")


@dataclass
class Trial:
    """One trial file, parsed: the config, per-step series, per-epoch metrics, the evaluations
    inside epochs and the summary."""

    path: Path
    config: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)
    #: ``eval`` records (evaluations inside epochs), in step order
    evals: list[dict[str, Any]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    series: dict[str, list[float | None]] = field(default_factory=dict)
    summary: dict[str, Any] | None = None

    @property
    def problem(self) -> str:
        """Problem name."""
        return str(self.config["problem"]["name"])

    @property
    def label(self) -> str:
        """Optimizer label (folder name), e.g. ``adam@lr=0.001``."""
        return str(self.config["optimizer"]["label"])

    @property
    def base(self) -> str:
        """Registry name of the optimizer, e.g. ``adam``."""
        return str(self.config["optimizer"]["name"])

    @property
    def swept(self) -> dict[str, Any]:
        """The hyperparameters this trial's label varies (empty when not part of a sweep)."""
        return dict(self.config["optimizer"].get("swept", {}))

    @property
    def seed(self) -> int:
        """The trial's seed."""
        return int(self.config["seed"])

    @property
    def has_accuracy(self) -> bool:
        """Whether accuracy metrics are meaningful for the problem."""
        return bool(self.config["problem"].get("has_accuracy", True))

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """Every evaluation in step order: the ``epoch`` records (step 0 and each epoch's end)
        and the ``eval`` records between them; each has ``step``, ``epoch``, ``wall_time`` and
        the validation and test metrics. The test-error curve over steps reads this."""
        return sorted([*self.epochs, *self.evals], key=lambda r: (int(r["step"]),
                                                                  r["kind"] == "epoch"))

    @property
    def status(self) -> str:
        """``finished``, ``diverged`` or ``incomplete`` (no summary yet)."""
        return "incomplete" if self.summary is None else str(self.summary["status"])


def parse_trial(path: Path, records: Sequence[Mapping[str, Any]] | None = None) -> Trial:
    """Read (unless ``records`` are given), validate and parse a trial file."""
    recs = list(records) if records is not None else read_records(path)
    validate_records(recs, where=str(path))
    trial = Trial(path=Path(path), config=dict(recs[0]))
    for rec in recs[1:]:
        kind = rec["kind"]
        if kind == "steps":
            n = len(rec["step"])
            start = len(trial.steps)
            trial.steps.extend(int(s) for s in rec["step"])
            trial.loss.extend(rec["loss"])
            for key in ("eta", "grad_norm"):
                if key in rec:
                    # Pad earlier records that lacked the series so indices stay aligned.
                    values = trial.series.setdefault(key, [None] * start)
                    values.extend(rec[key])
            for values in trial.series.values():
                values.extend([None] * (start + n - len(values)))
        elif kind == "epoch":
            trial.epochs.append(dict(rec))
        elif kind == "eval":
            trial.evals.append(dict(rec))
        elif kind == "summary":
            trial.summary = dict(rec)
    return trial


def find_trial_files(run_dir: Path) -> list[Path]:
    """All ``seed_*.jsonl`` files under ``run_dir`` (sorted, so analysis is deterministic)."""
    return sorted(Path(run_dir).glob("*/*/seed_*.jsonl"))


def load_trials(run_dir: Path, *, include_incomplete: bool = False) -> list[Trial]:
    """Parse every trial under ``run_dir``; unfinished trials are left out unless asked for."""
    trials = [parse_trial(p) for p in find_trial_files(run_dir)]
    if not include_incomplete:
        trials = [t for t in trials if t.summary is not None]
    return trials


RUN_MANIFEST = "run.json"


def write_manifest(run_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``run.json``: the command and resolved configuration that produced the run."""
    atomic_write_text(Path(run_dir) / RUN_MANIFEST, json.dumps(clean_json(manifest), indent=2))


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """Read ``run.json`` if present."""
    path = Path(run_dir) / RUN_MANIFEST
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None
