"""`lipcli train` and `--resume` on bad input: one line on stderr, exit 2, no traceback, no file changed."""

import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
from safetensors import safe_open
from typer.testing import CliRunner

import lipcli.training as training
from lipcli import checkpoint
from lipcli.cli import app
from lipcli.models import build_model
from lipcli.optim import group_names
from lipcli.runfiles import RunFiles

from .conftest import module_data_dir, tiny_cli, tiny_preset

runner = CliRunner()
TINY = tiny_cli()  # as --set options, which win over flags: cases for the fields it sets use --set too


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_one_line_exit_2(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


BAD_TRAIN_INPUT = [
    (["--lr", "nan"], "train.lr must be a finite number > 0 (got nan)"),
    (["--lr", "inf"], "train.lr must be a finite number > 0"),
    (["--lr", "-0.1"], "train.lr must be a finite number > 0"),
    (["--sigma-max", "nan"], "train.sigma_max must be a finite number > 0"),
    (["--set", 'train.steps="abc"'], "train.steps must be an integer >= 1 (got 'abc')"),
    (["--set", "train.steps=[1]"], "train.steps must be an integer >= 1 (got [1])"),
    (["--set", "train.steps=2.5"], "train.steps must be an integer >= 1 (got 2.5)"),
    (["--set", "train.steps=true"], "train.steps must be an integer"),
    (["--set", "train.steps=0"], "train.steps must be an integer >= 1"),
    (["--set", "train.batch_size=-4"], "train.batch_size must be an integer >= 1"),
    (["--set", "train.eval_every=0"], "train.eval_every must be an integer >= 1"),
    (["--set", "train.eval_batches=0"], "train.eval_batches must be an integer >= 1"),
    (["--set", "train.warmup=-1"], "train.warmup must be an integer >= 0"),
    (["--set", "train.seed=-3"], "train.seed must be an integer >= 0"),
    (["--wd", "-1"], "train.wd must be a finite number >= 0"),
    (["--val-fraction", "1.5"], "train.val_fraction must be a finite number > 0 and < 1"),
    (["--set", "train.blocks_mass=NaN"], "train.blocks_mass must be a finite number > 0 (or unset)"),
    (["--set", "train.embed_inflation=Infinity"], "train.embed_inflation must be a finite number >= 1"),
    (["--set", 'train.caps={"head": "big"}'], "train.caps.head must be a finite number > 0"),
    (["--set", 'train.caps={"head": -1}'], "train.caps.head must be a finite number > 0"),
    (["--set", "train.caps=[1]"], "train.caps must be a table of finite numbers > 0"),
    (["--set", 'train.lr_mult={"head": -0.5}'], "train.lr_mult.head must be a finite number >= 0"),
    (["--set", 'train.caps={"haed": 2}'], "train.caps: unknown group 'haed'; lipschitz-gpt has groups embed, "),
    (["--set", 'train.lr_mult={"mlp_inn": 0.5}'], "train.lr_mult: unknown group 'mlp_inn'"),
    (["--set", "train.schedule=linaer"], "train.schedule must be one of linear, cosine, constant"),
    (["--dtype", "fp16"], "train.dtype must be one of fp32, bf16"),
    (["--set", "train.device=tpu:9"], "train.device must be auto, cpu, cuda or cuda:N"),
    (["--set", "train.data=/nonexistent/corpus.txt"], "not found"),
]


@pytest.mark.parametrize(("args", "words"), BAD_TRAIN_INPUT, ids=[" ".join(a) for a, _ in BAD_TRAIN_INPUT])
def test_bad_train_input_is_one_line_and_exit_2_and_writes_nothing(tmp_path, args, words):
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "other.txt").write_text("a file that must stay")
    before = _snapshot(folder)
    result = runner.invoke(app, ["train", *TINY, *args, "--out", str(folder / "m.safetensors"), "--quiet"])
    _assert_one_line_exit_2(result, words)
    assert _snapshot(folder) == before


def test_a_misspelled_group_lists_the_real_group_names():
    from lipcli.presets import PresetError

    preset = tiny_preset(**{"train.caps": {"attn_q": 2.0}})
    model = build_model(preset.arch, preset.model)
    names = group_names(model.declared_parameters())
    assert {"embed", "attn_v", "head"} <= set(names)
    with pytest.raises(PresetError) as caught:
        training.validate(preset)
    assert "lipschitz-gpt has groups " + ", ".join(names) + " (" in str(caught.value)


def test_out_that_is_a_folder_is_rejected_before_training(tmp_path):
    result = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path), "--quiet"])
    _assert_one_line_exit_2(result, "is a folder; give a file path")


def test_out_inside_a_file_is_rejected_before_training(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    before = _snapshot(tmp_path)
    result = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path / "notes.txt" / "m.safetensors"), "--quiet"])
    _assert_one_line_exit_2(result, "notes.txt is not a folder")
    assert _snapshot(tmp_path) == before


def test_resume_with_nothing_to_resume_is_one_line_and_leaves_nothing(tmp_path):
    result = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path / "m.safetensors"), "--resume", "--quiet"])
    _assert_one_line_exit_2(result, "no such checkpoint file")
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []  # cache: the test's data cache


def test_read_only_out_folder_is_one_line_before_any_training_work(tmp_path, monkeypatch):
    def no_data(*args):
        raise AssertionError("training work started")

    monkeypatch.setattr(training, "make_task", no_data)
    if os.geteuid() == 0:
        read_only = Path("/sys")  # root ignores permission bits; sysfs refuses new files even to root
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
    result = runner.invoke(app, ["train", *TINY, "--out", str(read_only / "m.safetensors"), "--quiet"])
    _assert_one_line_exit_2(result, f"cannot write --out {read_only / 'm.safetensors'}: Permission denied")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (6 steps, saves at 3 and 6) to copy for each resume case."""
    folder = tmp_path_factory.mktemp("trained")
    with module_data_dir(folder):
        training.train(tiny_preset(), folder / "m.safetensors")
    return folder


def _write_random_bytes(out: Path) -> None:
    # In place, as `head -c 3000 /dev/urandom > FILE` does: OUT.optim.pt and the run's pair are one file.
    with open(checkpoint.optimizer_path(out), "wb") as f:
        f.write(os.urandom(3000))


def _replace_with_nan_weights(out: Path) -> None:
    """A new file at OUT, the same checkpoint with a NaN head (written raw: checkpoint.save refuses NaN)."""
    with safe_open(out, framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(out)
    tensors["head.weight"][0, 0] = float("nan")
    out.unlink()
    safetensors.torch.save_file(tensors, out, metadata=metadata)


def _legacy_nan_run(out: Path) -> None:
    """A run without run record (older lipcli) whose weights are NaN: resume would say its bad checkpoint is good."""
    shutil.rmtree(out.with_name(".m.safetensors.run"))
    _replace_with_nan_weights(out)


def _truncate_weights(out: Path) -> None:
    with open(out, "r+b") as f:
        f.truncate(100)


def _break_manifest(out: Path) -> None:
    out.with_name(".m.safetensors.run").joinpath("manifest.json").write_text("{")


BAD_RESUMES = [
    ("random-byte optim", _write_random_bytes, [], "unreadable optimizer state (corrupt, truncated or not lipcli's"),
    ("changed d_model", None, ["--set", "model.d_model=64"], "other model settings (d_model 32 -> 64)"),
    ("muon -> adamw", None, ["--optimizer", "adamw", "--method", "hardcap", "--lr", "0.003"],
     "trained with --optimizer muon, this run asks adamw"),
    ("changed cap", None, ["--sigma-max", "2"], "trained with sigma_max 1.0 for group attn_qk, this run asks 2.0"),
    ("changed seed", None, ["--seed", "1"], "other model settings (seed 0 -> 1)"),
    ("NaN checkpoint", _legacy_nan_run, [], "tensor \"head.weight\" holds NaN or infinite values"),
    ("replaced OUT", _replace_with_nan_weights, [], "was changed after training"),
    ("truncated weights", _truncate_weights, [], "not a readable safetensors file"),
    ("broken manifest", _break_manifest, [], "unreadable run manifest"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "args", "words"), [c[1:] for c in BAD_RESUMES], ids=[c[0] for c in BAD_RESUMES])
def test_bad_resume_is_one_line_and_exit_2_and_changes_nothing(trained, tmp_path, damage, args, words):
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    out = folder / "m.safetensors"
    files = RunFiles(out)
    files.publish(files.committed())  # copytree broke the hard links between OUT and the run's pair
    if damage is not None:
        damage(out)
    before = _snapshot(folder)
    result = runner.invoke(app, ["train", *TINY, "--steps", "9", *args, "--out", str(out), "--resume", "--quiet"])
    _assert_one_line_exit_2(result, words)
    assert _snapshot(folder) == before


def test_a_second_run_on_the_same_out_fails_naming_the_lock_and_touches_nothing(trained, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    out = folder / "m.safetensors"
    before = _snapshot(folder)
    with RunFiles(out):  # the first run, holding --out
        result = runner.invoke(app, ["train", *TINY, "--out", str(out), "--quiet"])
    lock = folder / ".m.safetensors.run" / "lock"
    _assert_one_line_exit_2(result, f"another lipcli train is writing {out} (it holds {lock})")
    assert _snapshot(folder) == before
