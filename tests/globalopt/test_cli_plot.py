"""The ``bpgrad minimize`` subcommand and the 2-D run picture."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from bpgrad.globalopt import minimize
from bpgrad.globalopt.cli import load_function, parse_bounds_text, register

FUNCS = """
import numpy as np

def bowl(x):
    return float(np.sum((np.asarray(x) - 0.25) ** 2))
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpgrad")
    register(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture
def funcs(tmp_path: Path) -> Path:
    path = tmp_path / "funcs.py"
    path.write_text(FUNCS)
    return path


def test_parse_bounds_text_forms() -> None:
    assert parse_bounds_text(["-4,10", "0.5:15"]) == [(-4.0, 10.0), (0.5, 15.0)]
    assert parse_bounds_text(["-1,1*3"]) == [(-1.0, 1.0)] * 3
    assert parse_bounds_text(["-1,1; 0,2"]) == [(-1.0, 1.0), (0.0, 2.0)]
    with pytest.raises(ValueError, match="LOW,HIGH"):
        parse_bounds_text(["1,2,3"])


def test_load_function_errors(funcs: Path) -> None:
    assert load_function(f"{funcs}:bowl")(np.array([0.25])) == 0.0
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        load_function("no_colon")
    with pytest.raises(AttributeError):
        load_function(f"{funcs}:missing")


def test_cli_prints_json_result_and_negative_bounds(
    funcs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parser().parse_args(
        ["minimize", f"{funcs}:bowl", "--bounds", "-1,2", "-2,1", "--maxfev", "200", "--json"]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert np.allclose(out["x"], 0.25, atol=1e-4) and out["nfev"] <= 200


def test_cli_writes_plot(funcs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    args = _parser().parse_args(
        [
            "minimize",
            f"{funcs}:bowl",
            "--bounds",
            "-1,2*2",
            "--maxfev",
            "80",
            "--lipschitz",
            "10",
            "--plot",
            str(png),
        ]
    )
    assert args.func(args) == 0
    assert png.stat().st_size > 1000
    assert "lower_bound" in capsys.readouterr().out


def test_cli_bad_function_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["minimize", "no_such_module_xyz:f", "--bounds", "0,1"])
    assert args.func(args) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_plot_run_svg_and_rejects_3d(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bpgrad.globalopt.plot import plot_run

    def f(x: np.ndarray) -> float:
        return float(np.sum(np.sin(3 * x) + 0.1 * x**2))

    res = minimize(f, [(-2, 3), (-3, 2)], lipschitz=4.0, maxfev=60)
    svg = tmp_path / "run.svg"
    fig = plot_run(f, [(-2, 3), (-3, 2)], res, path=svg, grid=30)
    assert svg.read_text().lstrip().startswith("<?xml") and fig is not None
    res3 = minimize(f, [(0, 1)] * 3, maxfev=30)
    with pytest.raises(ValueError, match="2-D"):
        plot_run(f, [(0, 1)] * 3, res3)


def test_cli_strategy_is_passed_on_and_checked(
    funcs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["minimize", f"{funcs}:bowl", "--bounds", "-1,2", "-2,1", "--maxfev", "60", "--json"]
    for strategy in ("hull", "bound"):
        args = _parser().parse_args([*base, "--strategy", strategy])
        assert args.func(args) == 0
        out = json.loads(capsys.readouterr().out)
        ref = minimize(load_function(f"{funcs}:bowl"), [(-1, 2), (-2, 1)], maxfev=60,
                       strategy=strategy)
        assert out["nit"] == ref.nit and np.allclose(out["x"], ref.x)
    with pytest.raises(SystemExit):
        _parser().parse_args([*base, "--strategy", "random"])


FAILING = """
def broken(x):
    raise ZeroDivisionError("inside the user's function")
"""


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--bounds", "5,1"], "strictly below"),  # checked by minimize, before any call
        (["--bounds", "0,1", "--maxfev", "0"], "maxfev must be a positive integer"),
        (["--bounds", "0,1", "--tol", "-1"], "tol must be"),
        (["--bounds", "0,1e-300"], "Rescale"),
        (["--bounds", "0,1*x"], "whole number D"),
        (["--bounds", "0,1*0"], "whole number D"),
        (["--bounds", "a,b"], "two numbers"),
    ],
)
def test_cli_bad_options_exit_2_with_a_message_not_a_traceback(
    funcs: Path, capsys: pytest.CaptureFixture[str], options: list[str], said: str
) -> None:
    args = _parser().parse_args(["minimize", f"{funcs}:bowl", *options])
    assert args.func(args) == 2
    assert said in capsys.readouterr().err


def test_cli_lipschitz_auto_and_errors_from_the_function_propagate(
    funcs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["minimize", f"{funcs}:bowl", "--bounds", "-1,2", "--maxfev", "40", "--json"]
    args = _parser().parse_args([*base, "--lipschitz", "auto"])
    assert args.lipschitz is None and args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["lipschitz_estimated"] is True
    with pytest.raises(SystemExit):
        _parser().parse_args([*base, "--lipschitz", "fast"])
    # an error raised by the user's function is theirs to read: not turned into exit status 2
    broken = tmp_path / "broken.py"
    broken.write_text(FAILING)
    args = _parser().parse_args(["minimize", f"{broken}:broken", "--bounds", "0,1"])
    with pytest.raises(ZeroDivisionError, match="user's function"):
        args.func(args)
