"""A training run's files on disk: one writer at a time, and weights + optimizer state committed as one step.

``OUT`` and ``OUT.optim.pt`` are what users and other commands read. Behind them, the folder
``.OUT.run/`` holds the run's record: each save writes a numbered pair (``pairN.safetensors`` and its
``.optim.pt``), then ``manifest.json`` naming it (an atomic rename: the commit), then links the pair to
``OUT`` and ``OUT.optim.pt``, then deletes older pairs. A kill at any point leaves the manifest naming a
complete pair, which is what ``--resume`` reads. ``lock`` (a :mod:`filelock`) keeps a second run off
the same ``OUT``; stale temp files of a killed run are removed when the next run takes the lock.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from .checkpoint import CheckpointError, optimizer_path
from .errors import UserError
from .files import atomic_write

MANIFEST_VERSION = 1


class RunLockedError(UserError):
    """Another process is training into the same ``--out``."""


@dataclass(frozen=True)
class Pair:
    """Weights and the optimizer state saved with them, at one step."""

    weights: Path
    step: int

    @property
    def optimizer(self) -> Path:
        return optimizer_path(self.weights)


class RunFiles:
    """The files of the run that writes ``out``; use as a context manager to hold its lock."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.record = out.with_name(f".{out.name}.run")
        self.manifest = self.record / "manifest.json"
        self.log = out.with_name(out.name + ".log.jsonl")
        self._lock = FileLock(self.record / "lock", timeout=0)

    def check_writable(self) -> None:
        """Fail with one line unless ``out`` can be written; leaves nothing behind (runs before any training work)."""
        if self.out.is_dir():
            raise UserError(f"--out {self.out} is a folder; give a file path such as {self.out / 'model.safetensors'}")
        folder = self.out.parent
        while not folder.exists() and folder != folder.parent:  # the folders training will create
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"cannot write --out {self.out}: {folder} is not a folder")
        try:
            # Creating a file is the one sure test (root ignores permission bits, read-only mounts do not).
            # Named like atomic_write's temp files, so one a kill leaves behind is cleaned up next time.
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{self.out.name}.", suffix=".tmp"):
                pass
        except OSError as exc:
            raise UserError(f"cannot write --out {self.out}: {exc.strerror or exc} in {folder}") from None

    def __enter__(self) -> RunFiles:
        """Take the run's lock (or fail naming the file another run holds) and remove a killed run's debris."""
        try:
            self.record.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout:
            raise RunLockedError(
                f"another lipcli train is writing {self.out} (it holds {self._lock.lock_file}); "
                "wait for it to finish or choose another --out"
            ) from None
        except OSError as exc:
            raise UserError(f"cannot write --out {self.out}: {exc.strerror or exc} ({exc.filename})") from None
        self._remove_debris()
        return self

    def __exit__(self, *exc: object) -> None:
        lock_file = Path(self._lock.lock_file)
        # A run that committed nothing (it failed on resume, or before its first save) leaves no trace. The lock
        # file goes while still held, so a run starting now cannot lock the old file while another locks a new one.
        untouched = [path.name for path in self.record.iterdir()] == [lock_file.name]
        if untouched:
            lock_file.unlink()
        self._lock.release()
        if untouched:
            with contextlib.suppress(OSError):  # a new run may have made its lock here already
                self.record.rmdir()

    def _remove_debris(self) -> None:
        """Temp files a kill -9 left behind (a killed save's pair goes at the next commit)."""
        for path in self.record.glob("*.tmp"):
            path.unlink(missing_ok=True)
        published = {self.out.name, optimizer_path(self.out).name, self.log.name}
        for path in self.out.parent.iterdir():
            match = _TEMP_NAME.fullmatch(path.name)
            if match and match.group(1) in published:
                path.unlink(missing_ok=True)

    def committed(self) -> Pair | None:
        """The pair the manifest names; None when the run has no manifest (a new run, or one from an older lipcli)."""
        if not self.manifest.exists():
            return None
        try:
            manifest = json.loads(self.manifest.read_text())
            generation, step = int(manifest["generation"]), int(manifest["step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{self.manifest}: unreadable run manifest ({exc}); train again without --resume"
            ) from None
        return Pair(self._pair_path(generation), step)

    def next_pair(self, step: int) -> Pair:
        """Where the next save writes: a new generation, so the committed pair is never touched."""
        generations = [_generation(path) for path in self._pairs()]
        return Pair(self._pair_path(max(generations, default=0) + 1), step)

    def commit(self, pair: Pair) -> None:
        """Make ``pair`` the run's state (one atomic rename), publish it as OUT and OUT.optim.pt, drop older pairs."""
        manifest = {"version": MANIFEST_VERSION, "generation": _generation(pair.weights), "step": pair.step}
        atomic_write(self.manifest, lambda tmp: tmp.write_text(json.dumps(manifest)))
        self.publish(pair)
        for path in self.record.glob("pair*"):
            if path not in (pair.weights, pair.optimizer):
                path.unlink(missing_ok=True)

    def publish(self, pair: Pair) -> None:
        """Link (or, where links are not supported, copy) the pair to OUT and OUT.optim.pt, each by atomic rename."""
        for source, target in ((pair.weights, self.out), (pair.optimizer, optimizer_path(self.out))):
            if target.exists() and target.samefile(source):
                continue  # already published; renaming a link over its own file would leave the temp name behind
            atomic_write(target, lambda tmp, source=source: _link_or_copy(source, tmp))

    def out_is_from_run(self, pair: Pair) -> bool:
        """OUT is absent, or holds ``pair``'s weights or an older pair's still here (a kill came before publishing)."""
        if not self.out.exists():
            return True
        candidates = [pair.weights, *(path for path in self._pairs() if path != pair.weights)]
        return any(self.out.samefile(c) or filecmp.cmp(self.out, c, shallow=False) for c in candidates)

    def _pairs(self) -> list[Path]:
        return [path for path in self.record.glob("pair*.safetensors") if _PAIR.fullmatch(path.name)]

    def _pair_path(self, generation: int) -> Path:
        return self.record / f"pair{generation}.safetensors"


# atomic_write's temp names: ".<file name>.<tempfile's random part, no dots>.tmp".
_TEMP_NAME = re.compile(r"\.(.+)\.[^.]+\.tmp")


_PAIR = re.compile(r"pair(\d+)\.safetensors")


def _generation(weights: Path) -> int:
    return int(_PAIR.fullmatch(weights.name).group(1))


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink()  # atomic_write made it; a hard link needs the name free
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)
