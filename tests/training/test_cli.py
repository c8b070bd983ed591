"""`python -m training` as a user runs it: mistakes are one line on stderr with exit code 2, never a traceback;
a run ends by saying where its checkpoint is and what to run next; a log gets no progress-bar updates."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cli_run import one_line_error, run_module
from training import data as datasets
from training.__main__ import main


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_module("training", *args, env=env)


@pytest.fixture
def no_fashion_mnist(monkeypatch, tmp_path):
    """A machine without the data set: no variable, and Debian's directory pointed at an empty one."""
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setitem(datasets.DEFAULT_DIRS, "fashion-mnist", ("FASHION_MNIST_DIR", str(tmp_path / "none")))


def test_a_config_key_typo_suggests_the_key():
    assert "did you mean epochs?" in one_line_error(cli("train", "epoch=1"))


def test_a_bad_value_is_refused_before_any_data_loads():
    # The data directory does not exist either: the value's error comes first, so nothing was loaded.
    line = one_line_error(cli("train", "epochs=abc", "data_dir=/nonexistent"))
    assert line == "error: epochs='abc': expected an integer"
    assert "choose one of sgd, adam, adamw" in one_line_error(cli("train", "optimizer=sgdd"))
    assert "auto, cpu, cuda or cuda:N" in one_line_error(cli("train", "device=gpu"))


def test_export_of_a_missing_checkpoint_is_one_line():
    assert "nonexist.pt: no such checkpoint" in one_line_error(cli("export", "nonexist.pt"))


def test_the_data_error_suggests_what_train_accepts(no_fashion_mnist, capsys):
    assert main(["train", "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "data_dir=DIR" in err and "download=true" in err and "--download" not in err


def test_train_help_lists_the_config_keys():
    text = cli("train", "--help").stdout
    for key in ("epochs", "lr_scaling", "augment.hflip", "progress"):
        assert f"\n  {key} " in text
    assert "sgd | adam | adamw" in text


def test_models_shows_parameters_and_cam():
    lines = {line.split()[0]: line.split() for line in cli("models").stdout.splitlines()[1:]}
    assert lines["small_fmnist"][1:] == ["small", "93,546", "yes"]
    assert lines["vgg16"][-1] == "no" and lines["resnet152"][2] == "58,155,466"


@pytest.fixture(scope="module")
def trained(tiny_fmnist, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("run")
    result = cli("train", "model=small_fmnist", "dataset=mnist", f"data_dir={tiny_fmnist}", "verify_checksums=false",
                 "epochs=1", "batch_size=32", "warmup_epochs=0", f"out_dir={out}", "max_train_samples=128",
                 "model_args={widths: [4, 4, 4, 4]}")
    return result, out


def test_train_ends_with_the_checkpoint_and_the_next_command(trained):
    result, out = trained
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == f"checkpoint: {out / 'checkpoint.pt'}"
    assert lines[-1] == f"next: python -m training export {out / 'checkpoint.pt'} --model-repository model_repository"


def test_progress_is_off_when_output_is_not_a_terminal(trained):
    result, _ = trained
    assert "\r" not in result.stdout + result.stderr  # captured output is a pipe: no bar updates in a log


def test_export_old_repository_flag_warns_and_parity_names_its_data(trained, tmp_path, no_fashion_mnist, capsys):
    _, out = trained
    assert main(["export", str(out / "checkpoint.pt"), "--repository", str(tmp_path / "repo"), "--name", "m"]) == 0
    captured = capsys.readouterr()
    assert "warning: --repository is deprecated; use --model-repository" in captured.err
    assert "on 64 images of random pixels (no Fashion-MNIST test set found" in captured.out
    meta = json.loads((tmp_path / "repo" / "m" / "1" / "metadata.json").read_text())
    assert meta["parity_data"].startswith("64 images of random pixels")


@pytest.mark.parametrize("flags", [["--quantize", "dynamic"], ["--quantize", "static"], ["--fp16"]])
def test_reduced_precision_without_test_data_writes_nothing(trained, tmp_path, no_fashion_mnist, capsys, flags):
    """Without the test set a reduced-precision version would be served unmeasured (latest 1): refused."""
    _, out = trained
    repo = tmp_path / "repo"
    assert main(["export", str(out / "checkpoint.pt"), "--model-repository", str(repo), *flags]) == 2
    err = capsys.readouterr().err
    assert "needs the test set to measure the reduced-precision version against FP32" in err
    assert "Nothing was written" in err and not repo.exists()
