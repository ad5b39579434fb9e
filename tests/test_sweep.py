import csv
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lipcli import sweep as sweep_module
from lipcli.cli import app
from lipcli.sweep import COLUMNS, SIGMA_FREE_METHODS, expand_grid, sweep
from lipcli.training import TrainingError

from .conftest import TINY_GPT, tiny_cli, tiny_preset

runner = CliRunner()
TINY_ARGS = tiny_cli()
# What a run measures: equal for equal seeds, whichever process or invocation ran it.
MEASURED = ("name", "sigma_max", "log10_tight", "log10_paper", "val_loss", "val_acc", "max_activation")


def _tiny_sweep(out, sigmas=(1.0,), baseline=False, overrides=TINY_GPT, **options):
    return sweep(
        "shakespeare-cpu", ["muon"], ["softcap"], sigmas, out, overrides=overrides, baseline=baseline, **options
    )


def _measured(rows):
    return [{key: asdict(row)[key] for key in MEASURED} for row in rows]


def _of_type(events, kind):
    return [event for event in events if event["type"] == kind]


def test_grid_skips_invalid_pairs_with_reasons_and_runs_sigma_free_methods_once():
    base = tiny_preset(**{"train.wd": 0.1})
    grid = expand_grid(base, ["muon", "adamw"], ["softcap", "hammer", "wd", "hardcap"], [0.5, 2])
    assert SIGMA_FREE_METHODS == ("none", "wd")
    assert [p.name for p in grid.points] == [
        "muon-softcap-0.5", "muon-softcap-2", "muon-wd-0.1", "muon-hardcap-0.5", "muon-hardcap-2",
        "adamw-hammer-0.5", "adamw-hammer-2", "adamw-wd-0.1", "adamw-hardcap-0.5", "adamw-hardcap-2",
    ]  # fmt: skip
    reasons = {(s.optimizer, s.method): s.reason for s in grid.skipped}
    assert set(reasons) == {("muon", "hammer"), ("adamw", "softcap")}
    assert "only Muon" in reasons["adamw", "softcap"] and "full-rank" in reasons["muon", "hammer"]
    by_name = {p.name: p for p in grid.points}
    hammer = by_name["adamw-hammer-0.5"].preset.train
    assert (hammer.optimizer, hammer.method, hammer.sigma_max) == ("adamw", "hammer", 0.5)
    assert by_name["adamw-hammer-0.5"].sigma_max == 0.5 and by_name["muon-wd-0.1"].sigma_max is None
    assert any("wd ignores sigma_max" in note for note in grid.notes)
    no_decay = expand_grid(tiny_preset(**{"train.wd": 0.0}), ["muon"], ["wd", "softcap"], [1.0])
    assert [p.name for p in no_decay.points] == ["muon-softcap-1"]
    assert [(s.method, "--wd" in s.reason) for s in no_decay.skipped] == [("wd", True)]  # it would train unconstrained


def test_the_wd_method_sweeps_its_decay_strength_and_leaves_the_others_at_the_presets():
    grid = expand_grid(tiny_preset(**{"train.wd": 0.0}), ["muon"], ["wd", "softcap"], [1.0, 2.0], decays=[0.01, 0.1])
    by_name = {p.name: p.preset.train for p in grid.points}
    assert list(by_name) == ["muon-wd-0.01", "muon-wd-0.1", "muon-softcap-1", "muon-softcap-2"]
    assert [by_name[n].wd for n in by_name] == [0.01, 0.1, 0.0, 0.0]
    assert {t.lr for t in by_name.values()} == {tiny_preset().train.lr}  # the preset's optimizer keeps its rate
    mixed = expand_grid(tiny_preset(), ["muon", "adamw"], ["normalize"], [1.0], lrs={"muon": 0.05})
    assert {p.name: p.preset.train.lr for p in mixed.points} == {"muon-normalize-1": 0.05, "adamw-normalize-1": 3e-3}
    assert "learning rates: muon 0.05, adamw 0.003" in mixed.notes
    assert any("wd ignores sigma_max: one run per optimizer and decay" in note for note in grid.notes)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"optimizers": ["sgd"]}, "unknown optimizer"),
        ({"methods": ["nope"]}, "unknown constraint method"),
        ({"sigmas": [0.0]}, "> 0"),
        ({"sigmas": []}, "at least one"),
        ({"optimizers": ["adamw"], "methods": ["softcap"]}, "no (optimizer, method) pair"),
        ({"overrides": {**TINY_GPT, "train.sigma_max": 2}}, "the sweep sets it"),
        ({"jobs": 0}, "--jobs must be >= 1"),
        ({"preset_name": "mlp-digits", "overrides": {}}, "names no baselines"),
    ],
)
def test_bad_input_raises_before_anything_is_written(tmp_path, options, words):
    arguments = {"preset_name": "shakespeare-cpu", "optimizers": ["muon"], "methods": ["softcap"], "sigmas": [1.0],
                 "overrides": TINY_GPT, **options}  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(words)):
        sweep(out_dir=tmp_path / "sweep", **arguments)
    assert not (tmp_path / "sweep").exists()


def test_sweep_writes_results_then_reruns_only_missing_points(tmp_path):
    out = tmp_path / "sweep"
    result = _tiny_sweep(out, sigmas=[0.5, 4.0], baseline="shakespeare-baseline")
    assert [row.name for row in result.rows] == ["muon-softcap-0.5", "muon-softcap-4", "shakespeare-baseline"]
    low, high, base = result.rows
    assert low.log10_tight < high.log10_tight and low.log10_paper < high.log10_paper
    assert base.baseline and base.method == "none" and base.log10_tight == math.inf and base.sigma_max is None

    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == 3
    for line in table[:2]:
        assert all(math.isfinite(float(line[key])) for key in MEASURED[1:] + ("wall_s",))
    assert table[2]["log10_tight"] == table[2]["log10_paper"] == "inf"

    def no_constants(name):
        raise AssertionError(f"{name} in results.json")

    saved = json.loads((out / "results.json").read_text(), parse_constant=no_constants)
    assert [tuple(row) for row in saved["rows"]] == [COLUMNS] * 3
    assert saved["rows"][2]["log10_tight"] is None and saved["rows"][0]["log10_tight"] == low.log10_tight
    assert (out / "frontier.png").read_bytes().startswith(b"\x89PNG") and (out / "frontier.png").stat().st_size > 10_000

    points = sorted((out / "points").iterdir())
    stamps = [p.stat().st_mtime_ns for p in points]
    events = []
    again = _tiny_sweep(out, sigmas=[0.5, 4.0], baseline="shakespeare-baseline", on_event=events.append)
    assert not _of_type(events, "start") and all(e["cached"] for e in _of_type(events, "point_done"))
    assert [asdict(row) for row in again.rows] == [asdict(row) for row in result.rows]
    assert [p.stat().st_mtime_ns for p in points] == stamps

    for path in [out / "points" / "muon-softcap-4.json", *(out / "runs").glob("muon-softcap-4.*")]:
        path.unlink()
    events = []
    rerun = _tiny_sweep(out, sigmas=[0.5, 4.0], baseline="shakespeare-baseline", on_event=events.append)
    assert {e["point"] for e in _of_type(events, "step")} == {"muon-softcap-4"}
    assert [e["step"] for e in _of_type(events, "step")] == list(range(1, TINY_GPT["train.steps"] + 1))
    assert _measured(rerun.rows) == _measured(result.rows)


def test_killed_sweep_resumes_the_half_trained_point(tmp_path):
    def kill_at_step_4(event):
        if event["type"] == "step" and event["step"] == 4:
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    with pytest.raises(TrainingError, match="rerun the same command"):
        _tiny_sweep(out, on_event=kill_at_step_4)
    assert (out / "runs" / "muon-softcap-1.safetensors").exists() and not (out / "points").exists()

    events = []
    resumed = _tiny_sweep(out, on_event=events.append)
    assert [e["step"] for e in _of_type(events, "start")] == [3]  # the checkpoint of the step-3 evaluation
    assert [e["step"] for e in _of_type(events, "step")] == [4, 5, 6]
    assert _measured(resumed.rows) == _measured(_tiny_sweep(tmp_path / "uninterrupted").rows)

    with pytest.raises(ValueError, match="train.steps 6 -> 8"):
        _tiny_sweep(out, overrides={**TINY_GPT, "train.steps": 8})


def test_cli_sweep_json_and_a_failed_run_exits_1(tmp_path):
    grid = ["--optimizer", "muon", "--method", "softcap", "--sigma-max", "1", "--no-baseline"]
    result = runner.invoke(app, ["sweep", *TINY_ARGS, *grid, "--out", str(tmp_path / "ok"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [tuple(row) for row in summary["rows"]] == [COLUMNS]
    assert summary["rows"][0]["sigma_max"] == 1.0 and 0 < summary["rows"][0]["val_acc"] < 1
    assert summary["failed"] == [] and all(Path(path).exists() for path in summary["files"].values())

    # AdamW at lr 1e6 diverges unless normalize pulls every matrix back to sigma_max after each step.
    grid = ["--optimizer", "adamw", "--method", "none,normalize", "--sigma-max", "1", "--no-baseline"]
    result = runner.invoke(app, ["sweep", *TINY_ARGS, *grid, "--lr", "adamw=1e6", "--out", str(tmp_path / "nan")])
    assert result.exit_code == 1, result.output
    table, _, below = result.stdout.partition("└")
    assert "adamw-normalize-1" in table and "adamw-none" not in table and "failed adamw-none: loss became NaN" in below
    assert "adamw-normalize-1: val acc" in result.stderr and "adamw-none: failed: loss became NaN" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: 1 run(s) failed: adamw-none (rerun the same command to retry them)"
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--optimizer", "sgd"], "unknown optimizer"),
        (["--sigma-max", "1,abc"], "expects numbers"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--optimizer", "adamw", "--method", "softcap"], "only Muon"),
        (["--set", "train.method=svd"], "the sweep sets it"),
        (["--no-baseline", "--baseline-preset", "shakespeare-baseline"], "choose one"),
        (["--set", "model.final_scale=abc"], "cannot parse"),
        (["--lr", "adamw"], "expects OPTIMIZER=NUMBER"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, words):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", *TINY_ARGS, "--method", "softcap", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output and not out.exists()


def test_jobs_2_gives_the_same_rows_as_jobs_1(tmp_path, monkeypatch):
    def in_the_parent(*args):
        raise AssertionError("--jobs 2 ran a point in the parent process")

    events = []
    with monkeypatch.context() as patch:
        patch.setattr(sweep_module, "run_point", in_the_parent)  # the spawned workers import the real one
        parallel = _tiny_sweep(tmp_path / "two", sigmas=[0.5, 2.0], jobs=2, on_event=events.append)
    serial = _tiny_sweep(tmp_path / "one", sigmas=[0.5, 2.0])
    assert _measured(parallel.rows) == _measured(serial.rows)
    assert len(parallel.rows) == 2 and parallel.failed == []
    # The workers' training events reach the parent, each before its point's result.
    done = [i for i, e in enumerate(events) if e["type"] == "point_done"]
    for name in ("muon-softcap-0.5", "muon-softcap-2"):
        steps = [i for i, e in enumerate(events) if e["type"] == "step" and e["point"] == name]
        assert len(steps) == TINY_GPT["train.steps"]
        assert max(steps) < next(i for i in done if events[i]["point"] == name)


def test_the_default_baselines_are_the_presets_own_references_at_the_sweeps_size_and_budget():
    from lipcli.presets import apply_overrides, load_preset
    from lipcli.sweep import baseline_points

    base = apply_overrides(load_preset("shakespeare-cpu"), TINY_GPT)
    points = baseline_points(base, True)
    assert [p.name for p in points] == ["shakespeare-baseline", "shakespeare-baseline-muon"]
    assert [p.preset.train.optimizer for p in points] == ["adamw", "muon-adamw"]
    for p in points:
        assert p.baseline and p.preset.train.steps == base.train.steps
        assert p.preset.model["d_model"] == base.model["d_model"]
    assert baseline_points(base, False) == []
    with pytest.raises(ValueError, match="names no baselines"):
        baseline_points(load_preset("mlp-digits"), True)
