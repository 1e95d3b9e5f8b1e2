"""Issue 12's wider suite: segmentation (mean IU), character LSTM, tabular, teacher–student.

Data-backed problems load small synthetic arrays (the data layer is replaced), except the
``*_real_data`` tests, which read the verified caches (CI fetches them first).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bpgrad.bench.data.formats import (
    FORTUNE_END,
    FORTUNE_OTHER,
    FORTUNE_VOCAB,
    decode_fortunes,
    encode_fortune_text,
    split_fortunes,
)
from bpgrad.bench.optimizers import get_optimizer_spec, resolve_optimizer
from bpgrad.bench.problems import Problem, Splits, get_problem
from bpgrad.bench.problems import _common as common
from bpgrad.bench.problems import mnist_canvas_fcn as canvas
from bpgrad.bench.problems import teacher_student as ts
from bpgrad.bench.runner import Budget, RunOptions, run_trial

NEW = ["fortunes_lstm", "mnist_canvas_fcn", "segment_mlp", "teacher_student"]
POLYAK = ["momo", "momo_adam", "momsps", "sps_safe"]


def fake_arrays(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "mnist":
        return {"x_train": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                "y_train": (np.arange(40) % 10).astype(np.uint8),
                "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
                "y_test": (np.arange(10) % 10).astype(np.uint8)}
    if name == "river_segment":
        return {"x_train": rng.normal(size=(60, 18)) * 50 + 3, "y_train": np.arange(60) % 7,
                "x_test": rng.normal(size=(14, 18)), "y_test": np.arange(14) % 7}
    if name == "fortunes":
        return {"x_train": rng.integers(0, FORTUNE_VOCAB, 2000).astype(np.uint8),
                "y_train": np.array([0], np.int64),
                "x_test": rng.integers(0, FORTUNE_VOCAB, 700).astype(np.uint8),
                "y_test": np.array([0], np.int64)}
    raise KeyError(name)


def load_fake(problem: Problem, monkeypatch: pytest.MonkeyPatch, validation_size: int = 4,
              seed: int = 0) -> Splits:
    monkeypatch.setattr(common, "load_arrays",
                        lambda name, *, data_dir, download: fake_arrays(name))
    return problem.load(data_dir=Path("/nonexistent"), validation_size=validation_size, seed=seed)


def test_new_problems_are_registered_with_a_contract() -> None:
    for name in NEW:
        p = get_problem(name)
        assert p.name == name and p.description and p.reference and p.evaluation
    assert get_problem("mnist_canvas_fcn").metric_names()[-2:] == ("valid_mean_iu",
                                                                    "test_mean_iu")
    assert "valid_reached_global" in get_problem("teacher_student").metric_names()


# --------------------------------------------------------------------------- mean IU


def test_mean_iu_on_a_hand_made_case() -> None:
    truth = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    tp, fp, fn = canvas.confusion_counts(pred, truth, 3)
    assert tp.tolist() == [1, 2, 0] and fp.tolist() == [0, 1, 0] and fn.tolist() == [1, 0, 0]
    # class 0: 1 / (1 + 0 + 1); class 1: 2 / (2 + 1 + 0); class 2 absent from both: excluded
    assert canvas.mean_iu(tp, fp, fn) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_mean_iu_counts_a_class_seen_only_in_the_prediction_as_zero() -> None:
    truth = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 0, 2])
    tp, fp, fn = canvas.confusion_counts(pred, truth, 3)
    assert canvas.mean_iu(tp, fp, fn) == pytest.approx((3 / 4 + 0.0) / 2)
    assert canvas.mean_iu([5, 7], [0, 0], [0, 0]) == 1.0
    assert math.isnan(canvas.mean_iu([0, 0], [0, 0], [0, 0]))


def test_mean_iu_is_over_the_whole_split_not_a_mean_of_batches() -> None:
    p = get_problem("mnist_canvas_fcn")
    torch.manual_seed(0)
    logits = torch.randn(6, canvas.NUM_CLASSES, 5, 5)
    labels = torch.randint(0, 3, (6, 5, 5))
    whole = p.batch_metrics(logits, labels)
    sums: dict[str, float] = {}
    for part in (slice(0, 1), slice(1, 6)):  # uneven batches, summed as the runner does
        for k, v in p.batch_metrics(logits[part], labels[part]).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    expected = canvas.mean_iu(*canvas.confusion_counts(logits.argmax(1), labels, 11))
    assert p.split_metrics(sums)["mean_iu"] == pytest.approx(expected)
    assert p.split_metrics({k: float(v) for k, v in whole.items()})["mean_iu"] == pytest.approx(
        expected)
    assert whole["count"].item() == 150 and whole["correct"].item() == (
        (logits.argmax(1) == labels).sum().item())


def test_canvas_labels_come_from_the_ink() -> None:
    images = np.zeros((3, 28, 28), np.uint8)
    images[0, canvas.CROP, canvas.CROP] = 200  # digit 3, strong ink over its whole crop
    images[1, canvas.CROP, canvas.CROP] = 150  # digit 7, weaker ink
    images[2, canvas.CROP, canvas.CROP] = 100  # digit 5, below the threshold: background
    labels = np.array([3, 7, 5])
    rng = np.random.default_rng(1)
    ink, classes = canvas.compose_canvases(images[:2], labels[:2], 1, rng)
    assert ink.shape == classes.shape == (1, 40, 40)
    assert (classes[ink == 0] == 0).all()
    assert (classes == 4).sum() == 400  # the stronger digit owns every pixel it inks
    assert (classes == 8).sum() == (ink == 150).sum() > 0  # the weaker one keeps the rest
    ink, classes = canvas.compose_canvases(images[1:], labels[1:], 1, np.random.default_rng(2))
    assert (classes == 6).sum() == 0 and (classes == 8).sum() == 400
    with pytest.raises(ValueError, match="need 4 digits"):
        canvas.compose_canvases(images, labels, 2, rng)


# --------------------------------------------------------------------------- teacher–student


@pytest.mark.parametrize(("loss", "reached"), [
    (0.0, True), (9.99e-5, True), (1e-4, False), (0.3, False), (None, False),
    (float("nan"), False), (float("inf"), False), (-1.0, False),
])
def test_reached_global_criterion(loss: float | None, reached: bool) -> None:
    assert ts.reached_global(loss) is reached


def test_teacher_is_realizable_so_the_global_minimum_is_zero() -> None:
    p = get_problem("teacher_student")
    s = p.load()
    assert s.valid is s.train and len(s.train) == ts.N_TRAIN and len(s.test) == ts.N_TEST
    assert 0.05 < float(s.train.targets.pow(2).mean()) < 0.2  # the documented scale (~0.10)
    student = p.make_model(3)
    start = float(p.loss(student(s.train.inputs), s.train.targets).detach())
    assert start > 1e-2
    ts.embed_teacher(student, ts.make_teacher())
    with torch.no_grad():
        out = student(s.train.inputs)
    m = {k: float(v) for k, v in p.batch_metrics(out, s.train.targets).items()}
    assert m["loss_sum"] / m["count"] < 1e-12
    assert p.split_metrics(m) == {"reached_global": 1.0}
    with torch.no_grad():
        student[2].bias.add_(0.02)  # off the minimum by 0.02 everywhere: loss 4e-4
    m = {k: float(v) for k, v in p.batch_metrics(student(s.train.inputs).detach(),
                                                 s.train.targets).items()}
    assert p.split_metrics(m) == {"reached_global": 0.0}
    narrow = torch.nn.Sequential(torch.nn.Linear(8, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="not realizable"):
        ts.embed_teacher(narrow, ts.make_teacher())


def test_teacher_student_data_are_fixed_and_the_seed_changes_only_the_student() -> None:
    p = get_problem("teacher_student")
    a, b = p.load(seed=0), p.load(seed=5)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.targets,
                                                                       b.test.targets)
    w0, w1 = (p.make_model(k).state_dict()["0.weight"] for k in (0, 1))
    assert not torch.equal(w0, w1)


def test_runner_records_the_split_metrics(tmp_path: Path) -> None:
    p = get_problem("teacher_student")
    out = run_trial(p, resolve_optimizer("adam"), 0, Budget(2, limit_train_batches=3),
                    out=tmp_path, options=RunOptions(quiet=True))
    records = [json_line for json_line in _read(out.path) if json_line["kind"] == "epoch"]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records:
        assert r["valid_reached_global"] == 0.0 and r["test_reached_global"] == 0.0
        assert r["valid_loss"] > 1e-3


def _read(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- text and tabular


def test_fortune_parsing_and_alphabet() -> None:
    raw = b"first line\nsecond\n%\n\n%\nthird\xc3\xa9\n%\n"
    assert split_fortunes(raw) == ["first line\nsecond", "third\u00e9"]
    codes = encode_fortune_text("A ~\n\u00e9")
    assert codes.tolist() == [ord("A") - 30, 2, 96, 1, FORTUNE_OTHER]
    files = {"b": b"x\n%\ny\n%\nzz", "a": b"w"}
    out = decode_fortunes(files, test_fraction=0.25, seed=0)
    assert out["y_train"].size == 3 and out["y_test"].size == 1
    stream = out["x_train"]
    assert (stream[out["y_train"][1:] - 1] == FORTUNE_END).all() and stream[-1] == FORTUNE_END
    total = out["x_train"].size + out["x_test"].size
    assert total == sum(len(t) + 1 for t in ("w", "x", "y", "zz"))


def test_fortunes_windows_predict_the_next_character(monkeypatch: pytest.MonkeyPatch) -> None:
    p = get_problem("fortunes_lstm")
    s = load_fake(p, monkeypatch)
    stream = fake_arrays("fortunes")["x_train"].astype(np.int64)
    x, y = s.train.inputs, s.train.targets
    assert x.shape[1] == y.shape[1] == 64 and x.dtype == y.dtype == torch.int64
    assert len(s.train) + len(s.valid) == (2000 - 1) // 64 and len(s.test) == (700 - 1) // 64
    first = int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(stream, 64)
                                == x[0].numpy()).all(1))[0])
    assert torch.equal(y[0], torch.from_numpy(stream[first + 1:first + 65]))


def test_segment_features_are_standardised_on_the_training_part(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_fake(get_problem("segment_mlp"), monkeypatch, validation_size=10)
    torch.testing.assert_close(s.train.inputs.mean(0), torch.zeros(18), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.train.inputs.std(0), torch.ones(18), atol=1e-5, rtol=0)
    assert s.valid.inputs.abs().mean() < 3 and len(s.valid) == 10 and len(s.test) == 14


# --------------------------------------------------------------------------- every new optimizer
# takes a step on every problem family (driven as the runner drives it)


#: one problem per family: the new four, an image convnet and the noisy quadratic
FAMILIES = [*NEW, "mnist_lenet", "quadratic_deep"]


@pytest.mark.parametrize("problem_name", FAMILIES)
def test_every_problem_family_takes_a_step_with_every_new_optimizer(
        problem_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    p = get_problem(problem_name)
    no_data = problem_name in ("teacher_student", "quadratic_deep")
    s = p.load(validation_size=4) if no_data else load_fake(p, monkeypatch)
    x, y = s.train.inputs[:4], s.train.targets[:4]
    for opt_name in POLYAK:
        spec = get_optimizer_spec(opt_name)
        pytest.importorskip(spec.module)
        model = p.make_model(0)
        before = [t.detach().clone() for t in model.parameters()]
        opt = resolve_optimizer(opt_name).build(model.parameters())
        out = model(x)
        loss = p.loss(out, y)
        assert loss.ndim == 0 and torch.isfinite(loss)
        m = p.batch_metrics(out.detach(), y)
        assert m["loss_sum"].item() == pytest.approx(m["count"].item() * loss.item(), rel=1e-5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert spec.needs_loss
        opt.step(loss=loss.detach())
        after = list(model.parameters())
        assert all(torch.isfinite(a).all() for a in after), opt_name
        assert any(not torch.equal(a.detach(), b) for a, b in zip(after, before, strict=True)), (
            opt_name)


# --------------------------------------------------------------------------- real data


def _need_cache(name: str) -> None:
    from bpgrad.bench.data import cache_status

    if not cache_status(name).cached:
        message = f"{name} not cached; run `bpgrad data fetch {name}`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_river_segment_real_data() -> None:
    _need_cache("river_segment")
    s = get_problem("segment_mlp").load(seed=0)
    assert (len(s.train), len(s.valid), len(s.test)) == (1548, 300, 462)
    assert torch.bincount(s.test.targets).tolist() == [66] * 7


def test_fortunes_real_data() -> None:
    _need_cache("fortunes")
    s = get_problem("fortunes_lstm").load(seed=0)
    assert (len(s.train), len(s.valid), len(s.test)) == (7852, 500, 977)
    assert int(s.train.inputs.max()) < FORTUNE_VOCAB


def test_mnist_canvases_real_data() -> None:
    _need_cache("mnist")
    s = get_problem("mnist_canvas_fcn").load(seed=0)
    assert (len(s.train), len(s.valid), len(s.test)) == (3500, 500, 1000)
    assert s.train.inputs.shape[1:] == (1, 40, 40) and s.train.targets.dtype == torch.uint8
    share = torch.bincount(s.test.targets.flatten().long(), minlength=11).double()
    share /= share.sum()
    assert 0.8 < share[0] < 0.97 and (share[1:] > 0).all()  # background dominates, every digit


def test_mean_iu_counts_are_summed_over_ranks_even_from_a_rank_without_examples() -> None:
    # Under several processes the runner all-reduces a fixed vector of sums; mean IU's confusion
    # counts must be part of it, also on a rank whose shard was empty (it has no keys at all).
    from bpgrad.bench.runner import _reduce_sums

    class TwoRanks:  # sum_ as two ranks would: this rank's counts plus an empty rank's zeros
        def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
            return tensor

    problem = get_problem("mnist_canvas_fcn")
    sums = {"loss_sum": torch.tensor(3.0), "count": torch.tensor(2.0),
            "correct": torch.tensor(1.0)}
    sums.update({k: torch.tensor(float(i + 1)) for i, k in enumerate(problem.split_sum_keys)})
    mine = _reduce_sums(problem, sums, TwoRanks(), torch.device("cpu"))  # type: ignore[arg-type]
    empty = _reduce_sums(problem, {}, TwoRanks(), torch.device("cpu"))  # type: ignore[arg-type]
    assert list(mine) == list(empty)  # the same vector layout on every rank
    totals = {k: float(mine[k] + empty[k]) for k in mine}
    metrics = problem.split_metrics(totals)
    assert set(metrics) == {"mean_iu"} and 0.0 < metrics["mean_iu"] <= 1.0
