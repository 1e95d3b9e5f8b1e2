"""Problems: registry, shapes, loss/metrics, seeded determinism, and the documented structure.

Data-backed problems are loaded from small synthetic arrays (the data layer is replaced), so no
test needs the real data sets or a full epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bpgrad.bench.problems import Problem, Splits, get_problem, problem_names
from bpgrad.bench.problems import _common as common
from bpgrad.bench.problems.quadratic_deep import deep_hessian

ALL = ["cifar10_quick", "fmnist_2c2d", "mnist_lenet", "mnist_logreg", "mnist_mlp",
       "quadratic_deep"]
IMAGE_SHAPE = {
    "cifar10_quick": (3, 32, 32),
    "fmnist_2c2d": (1, 28, 28),
    "mnist_lenet": (1, 28, 28),
    "mnist_logreg": (1, 28, 28),
    "mnist_mlp": (1, 28, 28),
}
PARAMS = {"cifar10_quick": 145_578, "fmnist_2c2d": 3_274_634, "mnist_lenet": 431_080,
          "mnist_logreg": 7_850, "mnist_mlp": 1_336_610, "quadratic_deep": 100}
DEFAULTS = {  # (batch, epochs): the paper's / MatConvNet's / DeepOBS's
    "cifar10_quick": (100, 100), "mnist_lenet": (100, 20), "fmnist_2c2d": (128, 100),
    "mnist_logreg": (128, 50), "mnist_mlp": (128, 100), "quadratic_deep": (128, 100),
}


def fake_arrays(shape: tuple[int, ...], n_train: int = 60, n_test: int = 20
                ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    img = shape if shape[0] == 3 else shape[1:]
    return {
        "x_train": rng.integers(0, 256, (n_train, *img), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, *img), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def load_fake(problem: Problem, monkeypatch: pytest.MonkeyPatch, validation_size: int,
              seed: int) -> Splits:
    if problem.name == "quadratic_deep":
        return problem.load(validation_size=validation_size, seed=seed)
    arrays = fake_arrays(IMAGE_SHAPE[problem.name])
    seen: list[object] = []

    def fake_load_arrays(name: str, *, data_dir: Path | None, download: bool
                         ) -> dict[str, np.ndarray]:
        seen.append((name, data_dir, download))
        return arrays

    monkeypatch.setattr(common, "load_arrays", fake_load_arrays)
    splits = problem.load(data_dir=Path("/nonexistent"), validation_size=validation_size,
                          seed=seed)
    assert seen and seen[0][1] == Path("/nonexistent")
    return splits


def test_registry_lists_every_problem() -> None:
    # tests/bench/toy_problem.py adds the synthetic toy_blobs when a test imports it.
    # issue 12's suite is tested in test_problems_suite.py
    suite = ["fortunes_lstm", "mnist_canvas_fcn", "segment_mlp", "teacher_student"]
    assert [name for name in problem_names() if name != "toy_blobs"] == sorted(ALL + suite)
    with pytest.raises(KeyError, match="known problems: cifar10_quick"):
        get_problem("nope")


@pytest.mark.parametrize("name", ALL)
def test_declared_contract(name: str) -> None:
    p = get_problem(name)
    assert p.name == name and p.description and p.reference and p.evaluation
    assert (p.batch_size, p.epochs) == DEFAULTS[name]
    assert p.has_accuracy == (name != "quadratic_deep")
    names = p.metric_names()
    assert "train_loss" in names and "test_loss" in names
    assert ("test_accuracy" in names) == p.has_accuracy


@pytest.mark.parametrize("name", ALL)
def test_splits_shapes_and_dtypes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    p = get_problem(name)
    s = load_fake(p, monkeypatch, validation_size=10, seed=0)
    for split in (s.train, s.valid, s.test):
        assert split.inputs.dtype == torch.float32
        assert split.targets.dtype == torch.int64
    assert len(s.valid) == 10
    if name == "quadratic_deep":
        assert (len(s.train), len(s.test)) == (1000, 1000)
        assert s.train.inputs.shape[1:] == (100,)
    else:
        assert (len(s.train), len(s.test)) == (50, 20)
        assert tuple(s.train.inputs.shape[1:]) == IMAGE_SHAPE[name]


@pytest.mark.parametrize("name", ALL)
def test_validation_split_is_seeded_and_disjoint(name: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p = get_problem(name)
    a = load_fake(p, monkeypatch, validation_size=10, seed=1)
    b = load_fake(p, monkeypatch, validation_size=10, seed=1)
    torch.testing.assert_close(a.valid.inputs, b.valid.inputs, rtol=0, atol=0)
    torch.testing.assert_close(a.train.inputs, b.train.inputs, rtol=0, atol=0)
    if name != "quadratic_deep":  # its data are fixed draws by design
        c = load_fake(p, monkeypatch, validation_size=10, seed=2)
        assert not torch.equal(a.valid.inputs, c.valid.inputs)
        rows = {tuple(r.flatten()[:40].tolist()) for r in a.train.inputs}
        assert not any(tuple(r.flatten()[:40].tolist()) in rows for r in a.valid.inputs)


@pytest.mark.parametrize("name", ALL)
def test_model_forward_loss_and_metrics(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    p = get_problem(name)
    s = load_fake(p, monkeypatch, validation_size=0, seed=0)
    model = p.make_model(0)
    assert sum(t.numel() for t in model.parameters()) == PARAMS[name]
    x, y = s.train.inputs[:7], s.train.targets[:7]
    out = model(x)
    loss = p.loss(out, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(t.grad is not None for t in model.parameters())
    m = p.batch_metrics(out.detach(), y)
    assert m["count"].item() == 7
    assert m["loss_sum"].item() == pytest.approx(7 * loss.item(), rel=1e-5)
    if p.has_accuracy:
        assert out.shape == (7, 10)
        assert 0 <= m["correct"].item() <= 7
    else:
        assert "correct" not in m


@pytest.mark.parametrize("name", ALL)
def test_make_model_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    p = get_problem(name)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = p.make_model(7)
    after = torch.rand(3)
    torch.testing.assert_close(after, expected_next, rtol=0, atol=0)
    b = p.make_model(7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = p.make_model(8)
    same = all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(),
                                                    c.state_dict().values(), strict=True))
    # logistic regression starts at zero and the quadratic at ones, whatever the seed (DeepOBS)
    assert same == (name in ("mnist_logreg", "quadratic_deep"))


def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_cifar10_quick_init_and_layer_order() -> None:
    model = get_problem("cifar10_quick").make_model(0)
    stds = [w.std().item() for w in conv_weights(model)]
    assert stds[0] == pytest.approx(0.01, rel=0.1)
    assert all(s == pytest.approx(0.05, rel=0.1) for s in stds[1:])
    assert all(torch.all(m.bias == 0) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d))
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[:3] == ["Conv2d", "_PadBottomRightPool", "ReLU"]  # pool before ReLU in layer 1
    assert kinds[3:6] == ["Conv2d", "ReLU", "_PadBottomRightPool"]
    x = torch.randn(2, 3, 32, 32)
    sizes = []
    for layer in model.features:
        x = layer(x)
        sizes.append(x.shape[-1])
    assert sizes[1] == 16 and sizes[5] == 8 and sizes[8] == 4 and sizes[-1] == 1


def test_cifar_avg_pool_ignores_padding() -> None:
    from bpgrad.bench.problems.cifar10_quick import _PadBottomRightPool

    out = _PadBottomRightPool("avg")(torch.ones(1, 1, 4, 4))
    torch.testing.assert_close(out, torch.ones(1, 1, 2, 2))
    mx = _PadBottomRightPool("max")(-torch.ones(1, 1, 4, 4))
    torch.testing.assert_close(mx, -torch.ones(1, 1, 2, 2))


def test_cifar_augment_flips_whole_batch_deterministically() -> None:
    p = get_problem("cifar10_quick")
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    outs = [p.augment(x, torch.Generator().manual_seed(s)) for s in range(20)]
    flips = [torch.equal(o, x.flip(-1)) for o in outs]
    assert all(f or torch.equal(o, x) for f, o in zip(flips, outs, strict=True))
    assert 0 < sum(flips) < 20
    again = p.augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(again, outs[3])


def test_mnist_lenet_init_and_structure() -> None:
    model = get_problem("mnist_lenet").make_model(0)
    ws = conv_weights(model)
    assert [tuple(w.shape) for w in ws] == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 50, 4, 4),
                                           (10, 500, 1, 1)]
    assert all(w.std().item() == pytest.approx(0.01, rel=0.1) for w in ws)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Conv2d", "ReLU", "Conv2d"]


def test_deepobs_inits() -> None:
    net = get_problem("fmnist_2c2d").make_model(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.all(m.bias == 0.05)
            assert m.weight.abs().max().item() <= 0.1 + 1e-6  # truncated at 2 std
    mlp = get_problem("mnist_mlp").make_model(0)
    first = next(m for m in mlp.modules() if isinstance(m, torch.nn.Linear))
    assert first.weight.abs().max().item() <= 0.06 + 1e-6
    assert torch.all(first.bias == 0)


def test_quadratic_deep_matches_its_definition() -> None:
    q = deep_hessian()
    np.testing.assert_allclose(q, q.T)
    eig = np.sort(np.linalg.eigvalsh(q))
    assert np.all((eig[:90] > 0) & (eig[:90] < 1))
    assert np.all((eig[90:] > 30) & (eig[90:] < 60))
    p = get_problem("quadratic_deep")
    s = p.load()
    assert s.train.inputs.std().item() == pytest.approx(0.6, rel=0.02)
    model = p.make_model(0)
    x = s.train.inputs[:5].double()
    theta = torch.ones(100, dtype=torch.float64)
    manual = torch.stack([0.5 * (theta - xi) @ torch.from_numpy(q) @ (theta - xi) for xi in x])
    torch.testing.assert_close(model(s.train.inputs[:5]).double(), manual, rtol=1e-4, atol=1e-3)
    loss = p.loss(model(s.train.inputs[:5]), s.train.targets[:5])
    loss.backward()
    grad = torch.from_numpy(q) @ (theta - x.mean(0))  # gradient of the batch mean
    torch.testing.assert_close(model.theta.grad.double(), grad, rtol=1e-4, atol=1e-3)
    assert not torch.equal(s.train.inputs, s.test.inputs)


def test_real_mnist_if_cached() -> None:
    from bpgrad.bench.data import cache_status

    if not cache_status("mnist").cached:
        # CI fetches the real data first (.ci/run), so there a missing cache is a failure.
        message = "MNIST not cached; run `bpgrad data fetch mnist`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    s = get_problem("mnist_logreg").load(validation_size=10000, seed=0)
    assert (len(s.train), len(s.valid), len(s.test)) == (50000, 10000, 10000)
    assert s.train.inputs.shape[1:] == (1, 28, 28)
    assert 0.0 <= s.train.inputs.min().item() and s.train.inputs.max().item() <= 1.0
    counts = torch.bincount(torch.cat([s.train.targets, s.valid.targets]), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
