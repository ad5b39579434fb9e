import json

import pytest
from typer.testing import CliRunner

from lipcli.cli import app
from lipcli.constraints import METHODS
from lipcli.errors import UserError
from lipcli.models import ARCHITECTURES
from lipcli.optim import OPTIMIZERS
from lipcli.presets import available
from lipcli.projection import ENFORCING

from .conftest import tiny_cli

runner = CliRunner()
TINY = tiny_cli(**{"train.steps": 4, "train.eval_every": 2})


def test_train_json_prints_one_object_with_accuracy_and_bound(tmp_path):
    out = tmp_path / "m.safetensors"
    result = runner.invoke(
        app, ["train", *TINY, "--method", "softcap", "--sigma-max", "1", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["step"] == 4 and summary["sigma_max"] == 1.0
    assert summary["max_sigma"] <= 1.001
    assert 0 < summary["val_acc"] < 1 and summary["log10_bound"] < 3
    assert out.exists()


def test_train_table_output(tmp_path):
    result = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path / "m.safetensors"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "certified bound" in result.stdout and "val_acc" in result.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, words in [
        (["train", "--preset", "nope"], "unknown preset"),
        (["train", *TINY, "--sigma-max", "-1"], "train.sigma_max must be a finite number > 0"),
        (["train", *TINY, "--optimizer", "adamw", "--method", "softcap"], "only Muon"),
        (["train", *TINY, "--set", "model.final_scale=abc"], "cannot parse"),
    ]:
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "x.safetensors")])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output


def test_help_explains_sigma_max_and_presets():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert "RMS->RMS" in result.stdout and "--resume" in result.stdout
    listing = runner.invoke(app, ["presets", "--json"])
    names = json.loads(listing.stdout)
    assert {
        "shakespeare-cpu",
        "shakespeare-baseline",
        "shakespeare-2m",
        "nanogpt-145m",
        "mlp-digits",
        "mlp-cifar",
    } <= set(names)


def test_error_lines_show_brackets_in_paths_literally(tmp_path):
    path = tmp_path / "run[bold]1.safetensors"
    path.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["certify", str(path)])
    assert result.exit_code == 2
    assert "run[bold]1.safetensors" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_bug_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    """A plain ValueError from inside lipcli or a library is a bug: exit 1 with its traceback, never 'bad input'."""

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr("lipcli.convert.convert", broken)
    result = runner.invoke(app, ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "error:" not in result.stderr


def test_a_user_error_from_the_library_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise UserError("bad [bold]input[/bold] named here")

    monkeypatch.setattr("lipcli.convert.convert", refuse)
    result = runner.invoke(app, ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: bad [bold]input[/bold] named here"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["attack", "x.safetensors"], "Missing option '--eps'"),
        (["attack", "x.safetensors", "--eps", "1", "--steps", "abc"], "Invalid value for '--steps'"),
        (["presets", "--bogus"], "No such option: --bogus"),
        (["--bogus"], "No such option: --bogus"),
        (["nope"], "No such command 'nope'"),
    ],
)
def test_usage_errors_are_one_line(args, words):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr


def test_help_still_shows_for_a_bare_command():
    result = runner.invoke(app, [])
    assert "certify" in result.stdout and "convert" in result.stdout


@pytest.mark.parametrize(
    ("command", "option", "registry"),
    [
        ("train", "--preset", available()),
        ("sweep", "--preset", available()),
        ("train", "--method", METHODS),
        ("train", "--optimizer", OPTIMIZERS),
        ("convert", "--config", ARCHITECTURES),
        ("convert", "--project", ENFORCING),
    ],
)
def test_help_names_every_entry_of_its_registry(command, option, registry):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "1000"})  # one line per option
    line = next(line for line in result.stdout.splitlines() if f"{option} " in line)
    assert all(name in line for name in registry), line
