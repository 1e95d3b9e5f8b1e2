"""The error contract of ``bpgrad compare``: a user error is one line on stderr that names what
is wrong and what to do, exit status 2, no traceback (``--debug`` shows it); corrupt result
files and checkpoints are moved aside, kept, and the trial runs again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import toy_problem  # noqa: F401  (registers toy_blobs in this process)

from bpgrad.bench.config import ConfigError
from bpgrad.bench.results import checkpoint_path, read_records, validate_records
from bpgrad.bench.runner import TrialHooks
from bpgrad.cli import main

SMALL = ["--problem", "toy_blobs", "--epochs", "2", "--quiet", "--no-report",
         "--optimizers", "adam"]
TRIAL = Path("toy_blobs") / "adam" / "seed_0.jsonl"


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("bpgrad compare: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--epochs", "0"], ("--epochs must be a whole number >= 1, got '0'", "--epochs 3")),
        (["--epochs", "-3"], ("--epochs must be a whole number >= 1",)),
        (["--limit-train-batches", "0"], ("--limit-train-batches must be a whole number >= 1",)),
        (["--limit-train-batches", "-1"], ("--limit-train-batches",)),
        (["--batch-size", "0"], ("--batch-size must be a whole number >= 1",)),
        (["--batch-size", "-32"], ("--batch-size",)),
        (["--threads", "0"], ("--threads must be a whole number >= 1",)),
        (["--threads", "-2"], ("--threads",)),
        (["--optimizers", "bpgrad", "--set", "bpgrad.lipschitz=-5"],
         ("optimizer 'bpgrad' rejects its hyperparameters", "lipschitz must be a finite number",
          "fix the --set/--sweep value")),
        (["--problem", "nope"], ("unknown problem 'nope'", "toy_blobs", "--list")),
        (["--import", "no_such_module_here"], ("--import no_such_module_here: cannot import",
                                                "PYTHONPATH")),
    ],
)
def test_bad_values_are_one_line_and_exit_2(tmp_path: Path, capsys, argv: list[str],
                                            needles: tuple[str, ...]) -> None:
    out = tmp_path / "run"
    assert main(["compare", *SMALL, "--out", str(out), *argv]) == 2
    _one_line_error(capsys, *needles)
    assert not out.exists()  # refused before anything was written


def test_epochs_zero_in_a_config_file_is_an_error_too(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text('problem = "toy_blobs"\nepochs = 0\n')
    assert main(["compare", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, f"{config}: epochs must be a whole number >= 1")


def test_unwritable_out_folder(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["compare", *SMALL, "--out", str(blocker / "run")]) == 2
    _one_line_error(capsys, f"--out {blocker / 'run'}: cannot write there",
                    "choose a folder you can write to")


def test_changed_config_on_rerun(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["compare", *SMALL, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["compare", *SMALL, "--out", str(out), "--set", "adam.lr=0.5"]) == 2
    _one_line_error(capsys, str(out / TRIAL), "different configuration (differs in: optimizer)",
                    "use another --out folder")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--epochs must be"):
        main(["compare", *SMALL, "--out", str(tmp_path / "run"), "--epochs", "0", "--debug"])


def test_a_subprocess_sees_exit_2_and_no_traceback(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "bpgrad", "compare", "--problem", "mnist_lenet",
                          "--epochs", "0", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "bpgrad compare: error: --epochs must be a whole number >= 1, got '0' (e.g. --epochs 3)"]


def test_corrupt_data_cache_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from bpgrad.bench.data.sources import get_spec

    cache = get_spec("mnist").cache_file(tmp_path / "data")
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"this is not an npz archive")
    rc = main(["compare", "--problem", "mnist_lenet", "--optimizers", "sgd", "--epochs", "1",
               "--quiet", "--no-report", "--data-dir", str(tmp_path / "data"),
               "--out", str(tmp_path / "run")])
    assert rc == 2
    _one_line_error(capsys, str(cache), "corrupt", "bpgrad data fetch mnist")


def _stop_after_first_epoch(epoch: int) -> None:
    raise KeyboardInterrupt  # what a Ctrl-C between epochs leaves behind


def _interrupted_run(out: Path) -> Path:
    """A trial stopped after epoch 1: a result file without summary and a checkpoint."""
    from bpgrad.bench.cli import cmd_compare
    from bpgrad.cli import build_parser

    args = build_parser().parse_args(["compare", *SMALL, "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        cmd_compare(args, hooks=TrialHooks(on_epoch_end=_stop_after_first_epoch))
    path = out / TRIAL
    assert read_records(path)[-1]["kind"] == "epoch" and checkpoint_path(path).exists()
    return path


def _finished(path: Path) -> list[dict]:
    records = read_records(path)
    validate_records(records)
    assert records[-1]["kind"] == "summary" and records[-1]["status"] == "finished"
    return records


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_model", "missing_keys"])
def test_unloadable_checkpoint_is_moved_aside_and_the_trial_reruns(tmp_path: Path, capsys,
                                                                   damage: str) -> None:
    out = tmp_path / "run"
    path = _interrupted_run(out)
    ckpt = checkpoint_path(path)
    if damage == "garbage":
        ckpt.write_bytes(b"\x00not a checkpoint")
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif damage == "other_model":
        payload = torch.load(ckpt, weights_only=True)
        payload["model"] = {"weight": torch.zeros(3)}
        torch.save(payload, ckpt)
    else:
        torch.save({"epoch": 1}, ckpt)
    damaged = ckpt.read_bytes()
    capsys.readouterr()
    assert main(["compare", *SMALL, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} does not load" in err and "running the trial again" in err
    records = _finished(path)
    assert records[-1]["resumes"] == 0  # started over, not resumed
    kept = list(ckpt.parent.glob("seed_0.ckpt.pt.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    assert len(list(path.parent.glob("seed_0.jsonl.partial-*"))) == 1
    assert not ckpt.exists()


@pytest.mark.parametrize("damage", ["bad_json", "not_a_record", "bad_order", "binary"])
def test_corrupt_result_file_is_moved_aside_and_the_trial_reruns(tmp_path: Path, capsys,
                                                                 damage: str) -> None:
    out = tmp_path / "run"
    assert main(["compare", *SMALL, "--out", str(out)]) == 0
    path = out / TRIAL
    reference = _finished(path)
    lines = path.read_text().splitlines()
    if damage == "bad_json":
        lines[2] = lines[2][: len(lines[2]) // 2]  # a half-written line
        path.write_text("\n".join(lines) + "\n")
    elif damage == "not_a_record":
        path.write_text("\n".join([*lines, "[1, 2]"]) + "\n")
    elif damage == "bad_order":
        path.write_text("\n".join([lines[-1], *lines[:-1]]) + "\n")
    else:
        path.write_bytes(b"\xff\xfe\x00garbage")
    damaged = path.read_bytes()
    capsys.readouterr()
    assert main(["compare", *SMALL, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "result file unreadable" in err and "running the trial again" in err
    kept = list(path.parent.glob("seed_0.jsonl.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    again = _finished(path)
    drop = {"start_time", "end_time", "wall_time", "train_time"}

    def strip(recs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in drop and k != "final"} for r in recs]

    assert strip(again) == strip(reference)  # the rerun is the same trial
