"""Two gloo processes on CPU against one: the same training, identical ranks, caps held, one writer, clean failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

import lipcli.training as training
from lipcli import checkpoint
from lipcli.cli import app
from lipcli.spectral import rms_scale

from .conftest import SHARED_DATA, tiny_cli, tiny_preset

WORLD_SIZE = 2
STEPS, EVAL_EVERY, CUT_AT = 10, 5, 7
# Between 2 ranks and 1 only float summation order differs (the loss mean over two half-batches, the gradient
# all-reduce): ~1e-7 relative in the gradients, grown through Newton-Schulz and 10 steps to 4e-5 observed (max |diff|
# over max |w| per tensor). A real fault is far above: ranks stepping on their own half-batch gradients measured 1.5.
RANKS_VS_ONE_RTOL = 1e-3
# sigma_1 of a float32 matrix the constraint left at sigma_max carries float32 rounding (observed 1 + 1.4e-7).
CAP_RTOL = 1e-5
TINY_CLI = tiny_cli(**{"train.steps": 4, "train.eval_every": 2})


def _preset():
    # Content attention on, so every parameter trains and has sharded optimizer state to gather.
    return tiny_preset(**{"train.steps": STEPS, "train.eval_every": EVAL_EVERY, "model.softmax_scale": 1.0})


def _worst_cap_ratio(optimizer: torch.optim.Optimizer) -> float:
    """max over matrices of exact sigma_1 (RMS->RMS) / cap, and over embedding rows of RMS / 1."""
    worst = 0.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            w = p.detach().double()
            if group["kind"] == "matrix":
                worst = max(worst, float(torch.linalg.svdvals(w).max()) / rms_scale(w) / group["sigma_max"])
            elif group["kind"] == "embed":
                worst = max(worst, float(w.pow(2).mean(dim=-1).sqrt().max()))
    return worst


class _Recorder:
    """Patches the trainer (in a worker process) to keep its model and check the caps after every step."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.worst: list[float] = []
        build_model, build_optimizer = training.build_model, training.build_optimizer

        def keep_model(*args, **kwargs):
            self.model = build_model(*args, **kwargs)
            return self.model

        def checked_optimizer(*args, **kwargs):
            self.optimizer = build_optimizer(*args, **kwargs)
            step = self.optimizer.step

            def checked_step(*a, **k):
                loss = step(*a, **k)
                self.worst.append(_worst_cap_ratio(self.optimizer))
                return loss

            self.optimizer.step = checked_step
            return self.optimizer

        training.build_model, training.build_optimizer = keep_model, checked_optimizer

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def owned(self) -> list[int]:
        """Indices of the parameters whose optimizer state this rank holds."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return [i for i, p in enumerate(params) if p in self.optimizer.state]


def _interrupt_at(step: int) -> None:
    """Every rank raises KeyboardInterrupt in the same forward pass, as Ctrl-C does."""
    real, calls = training.loss_and_correct, []

    def interrupting(model, x, y):
        calls.append(model.training)
        if sum(calls) == step + 1 and model.training:
            raise KeyboardInterrupt
        return real(model, x, y)

    training.loss_and_correct = interrupting


def _worker(rank: int, store: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        out, captured = Path(root) / f"rank{rank}", {}
        recorder = _Recorder()
        training.train(_preset(), out / "full.safetensors")
        captured |= {"full": recorder.weights(), "worst": recorder.worst}
        recorder.worst, real_loss = [], training.loss_and_correct
        _interrupt_at(CUT_AT)
        with pytest.raises(training.TrainingInterrupted, match="interrupted"):
            training.train(_preset(), out / "cut.safetensors")
        training.loss_and_correct = real_loss
        training.train(_preset(), out / "cut.safetensors", resume=True)
        captured |= {"resumed": recorder.weights(), "worst_cut_resumed": recorder.worst, "owned": recorder.owned()}
        torch.save(captured, Path(root) / "captured" / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One 2-process job (a process group we start; train() joins it): a full run, then a cut and resumed one."""
    root = tmp_path_factory.mktemp("ranks")
    (root / "captured").mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LIPCLI_DATA_DIR", os.environ.get("LIPCLI_DATA_DIR", str(SHARED_DATA)))
        env.setenv("LIPCLI_CACHE_DIR", str(root / "cache"))
        mp.spawn(_worker, args=(str(root / "store"), str(root)), nprocs=WORLD_SIZE)
    return root, [torch.load(root / "captured" / f"{r}.pt") for r in range(WORLD_SIZE)]


def _max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def test_every_rank_ends_with_the_same_capped_weights(two_ranks):
    _, (first, second) = two_ranks
    for key in ("full", "resumed"):
        assert all(torch.equal(first[key][k], second[key][k]) for k in first[key]), key
    for captured in (first, second):
        assert len(captured["worst"]) == STEPS and len(captured["worst_cut_resumed"]) == CUT_AT + STEPS - EVAL_EVERY
        assert max(captured["worst"] + captured["worst_cut_resumed"]) <= 1 + CAP_RTOL


def test_two_ranks_train_like_one_process_with_the_same_global_batch(two_ranks, tmp_path):
    _, (first, _) = two_ranks
    one = training.train(_preset(), tmp_path / "one.safetensors")
    reference = checkpoint.load(one.checkpoint).model.state_dict()
    assert _max_relative_difference(first["full"], reference) < RANKS_VS_ONE_RTOL


def test_only_rank_0_writes_and_its_checkpoint_resumes_exactly(two_ranks):
    root, (first, second) = two_ranks
    runs = ("full", "cut")
    assert sorted(p.name for p in (root / "rank0").iterdir()) == sorted(
        [f"{run}.safetensors{suffix}" for run in runs for suffix in ("", ".log.jsonl", ".optim.pt")]
        + [f".{run}.safetensors.run" for run in runs]
    )
    # Each run's record: its lock, manifest and the last committed pair (saves at steps 5 and 10: the second).
    for run in runs:
        record = root / "rank0" / f".{run}.safetensors.run"
        names = ["lock", "manifest.json", "pair2.safetensors", "pair2.safetensors.optim.pt"]
        assert sorted(p.name for p in record.iterdir()) == names
        assert (root / "rank0" / f"{run}.safetensors").samefile(record / "pair2.safetensors")
    assert not (root / "rank1").exists()
    # Momentum lives on its owner only, yet the checkpoint holds every parameter's: gathered at save time.
    n_params = len(first["full"])
    assert sorted(first["owned"] + second["owned"]) == list(range(n_params)) and second["owned"]
    saved = torch.load(root / "rank0" / "full.safetensors.optim.pt", weights_only=True)["optimizer"]["state"]
    assert sorted(saved) == list(range(n_params))
    assert all(torch.equal(first["resumed"][k], first["full"][k]) for k in first["full"])


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env=_child_env())


def _child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


FAILING_RANK = """
import os, sys
import lipcli.training as training
from lipcli.cli import app

if os.environ["RANK"] == "1":
    def failing(model, x, y):
        raise RuntimeError("disk on fire")
    training.loss_and_correct = failing
app(sys.argv[1:])
"""


def test_a_failing_rank_stops_the_job_with_one_line_naming_it(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    result = _torchrun(script, "train", *TINY_CLI, "--out", str(tmp_path / "m.safetensors"), "--quiet")
    assert result.returncode != 0
    assert "error: rank 1 of 2: RuntimeError: disk on fire" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_nproc_starts_torchrun_and_rank_0_alone_reports(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(app, ["train", "--nproc", "2", *TINY_CLI, "--out", str(out), "--json"])
    workers = capfd.readouterr()  # torchrun's workers write to this process's file descriptors
    assert result.exit_code == 0, workers.err
    summary = json.loads(workers.out)  # one JSON object: rank 0's
    assert summary["step"] == 4 and summary["max_sigma"] <= 1 + CAP_RTOL and out.exists()


@pytest.mark.parametrize(("nproc", "words"), [("3", "does not split evenly over 3 processes"), ("0", ">= 1")])
def test_cli_nproc_rejects_bad_launches_before_starting_torchrun(tmp_path, nproc, words):
    result = CliRunner().invoke(app, ["train", *TINY_CLI, "--nproc", nproc, "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
