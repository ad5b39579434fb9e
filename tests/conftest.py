import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lipcli.presets import Preset, apply_overrides, load_preset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _data_dir(monkeypatch, tmp_path):
    """Point dataset names at the local corpus and keep caches inside the test's tmp dir."""
    if "LIPCLI_DATA_DIR" not in os.environ:
        monkeypatch.setenv("LIPCLI_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("LIPCLI_CACHE_DIR", str(tmp_path / "cache"))


@contextmanager
def module_data_dir(folder: Path) -> Iterator[None]:
    """The data settings of _data_dir for a module-scoped fixture, which runs before any function's fixtures."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LIPCLI_DATA_DIR", os.environ.get("LIPCLI_DATA_DIR", str(SHARED_DATA)))
        env.setenv("LIPCLI_CACHE_DIR", str(folder / "cache"))
        yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny batches gain nothing from threads, and on a busy 2-core machine they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_GPT = {"model.d_model": 32, "model.n_layers": 1, "model.residual_scale": 1.0, "model.n_heads": 2,
            "model.context": 16, "train.batch_size": 4, "train.eval_batches": 2, "train.steps": 6,
            "train.eval_every": 3, "train.device": "cpu"}  # fmt: skip


def tiny_preset(name: str = "shakespeare-cpu", **overrides) -> Preset:
    """A preset shrunk to run in about a second on 2 CPU cores."""
    return apply_overrides(load_preset(name), {**TINY_GPT, **overrides})


def tiny_cli(**overrides) -> list[str]:
    """The tiny preset's fields as `--set` options, for CLI tests."""
    return [arg for key, value in {**TINY_GPT, **overrides}.items() for arg in ("--set", f"{key}={value}")]
