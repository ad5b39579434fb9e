"""Corpora, tokenizers, token shards and batch sampling for lipcli (image sets: lipcli.images)."""

from __future__ import annotations

import base64
import glob
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tiktoken
import torch

from .errors import UserError
from .files import atomic_write

DEFAULT_DATASET = "tinyshakespeare"
TINYSHAKESPEARE_HUB_ID = "karpathy/tiny_shakespeare"
TOKENIZERS = ("char", "gpt2")

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
_SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4

# A hub id is "name" or "owner/name"; anything else that is not an existing file is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class DataError(UserError):
    """A data problem the user can fix; the message is one actionable line."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of the corpus."""

    name = "char"

    def __init__(self, vocab: str) -> None:
        if not vocab or len(set(vocab)) != len(vocab):
            raise DataError("char tokenizer vocabulary must be a non-empty string of distinct characters")
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self._index = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        vocab = d.get("vocab")
        if not isinstance(vocab, str):
            raise DataError("char tokenizer metadata has no 'vocab' string; the checkpoint is incomplete")
        return cls(vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[ch] for ch in text]
        except KeyError:
            unknown = sorted(set(text) - self._index.keys())
            raise DataError(
                f"text contains characters outside the char vocabulary: {''.join(unknown)!r}; "
                "use only characters that occur in the training corpus"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vocab": self.vocab}


class TiktokenTokenizer:
    """Byte-level BPE through any tiktoken.Encoding (gpt2 by default)."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.name = encoding.name
        self.vocab_size = encoding.n_vocab

    @classmethod
    def gpt2(cls) -> TiktokenTokenizer:
        return cls.registered("gpt2")

    @classmethod
    def registered(cls, name: str) -> TiktokenTokenizer:
        """A tiktoken encoding by name (downloaded once into tiktoken's cache)."""
        try:
            return cls(tiktoken.get_encoding(name))
        except Exception as exc:
            raise DataError(
                f"could not load the {name} tokenizer ({error_summary(exc)}); it downloads once into "
                "TIKTOKEN_CACHE_DIR, so connect once or use --tokenizer char"
            ) from exc

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TiktokenTokenizer:
        try:
            ranks = {base64.b64decode(k): int(v) for k, v in d["mergeable_ranks"].items()}
            encoding = tiktoken.Encoding(
                name=d["name"],
                pat_str=d["pat_str"],
                mergeable_ranks=ranks,
                special_tokens={str(k): int(v) for k, v in d["special_tokens"].items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"invalid tiktoken tokenizer metadata ({error_summary(exc)})") from exc
        return cls(encoding)

    def encode(self, text: str) -> list[int]:
        # Corpus text may contain "<|endoftext|>" literally; treat it as text, not a special token.
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def to_dict(self) -> dict[str, Any]:
        # tiktoken's pickle state: just the name for registered encodings, the full tables otherwise.
        state = self.encoding.__getstate__()
        if isinstance(state, str):
            return {"name": state}
        return {
            "name": state["name"],
            "pat_str": state["pat_str"],
            "mergeable_ranks": {base64.b64encode(k).decode("ascii"): v for k, v in state["mergeable_ranks"].items()},
            "special_tokens": dict(state["special_tokens"]),
        }


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its to_dict() output."""
    name = d.get("name")
    if name == "char":
        return CharTokenizer.from_dict(d)
    if "mergeable_ranks" in d:
        return TiktokenTokenizer.from_dict(d)
    if name in tiktoken.list_encoding_names():
        return TiktokenTokenizer.registered(name)
    raise DataError(f"unknown tokenizer {name!r} in metadata; expected one of: {', '.join(TOKENIZERS)}")


def error_summary(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _cache_dir() -> Path:
    if os.environ.get("LIPCLI_CACHE_DIR"):
        return Path(os.environ["LIPCLI_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lipcli"
    return Path.home() / ".cache" / "lipcli"


def _file_name(name: str) -> str:
    # "owner/name" hub ids are stored flat so every corpus is one file in the directory.
    return name.replace("/", "__") + ".txt"


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"not UTF-8 text: {path}; convert it to UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    if not text:
        raise DataError(f"file is empty: {path}; point --data at a non-empty text file")
    return text


def _local_candidates(name: str) -> list[Path]:
    dirs = [Path(os.environ["LIPCLI_DATA_DIR"]).expanduser()] if os.environ.get("LIPCLI_DATA_DIR") else []
    return [d / _file_name(name) for d in [*dirs, _cache_dir()]]


def _load_hub(name: str) -> Any:
    import datasets  # imported lazily: it is slow and only needed on a cache miss

    return datasets.load_dataset(TINYSHAKESPEARE_HUB_ID if name == DEFAULT_DATASET else name)


def _hub_text(name: str, splits: Any) -> str:
    if name == DEFAULT_DATASET:
        return "".join("".join(splits[s]["text"]) for s in ("train", "validation", "test"))
    if "train" not in splits or "text" not in splits["train"].column_names:
        raise DataError(f"dataset {name!r} has no train split with a 'text' column; pass --data PATH instead")
    return "\n".join(splits["train"]["text"])


def _write_atomic(path: Path, text: str) -> None:
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise DataError(
            f"cannot write cache file {path} ({exc.strerror}); set LIPCLI_CACHE_DIR to a writable directory"
        ) from exc


def _download(name: str, looked: list[Path]) -> tuple[str, str]:
    try:
        splits = _load_hub(name)
    except Exception as exc:
        where = ", ".join(str(p) for p in looked)
        raise DataError(
            f"dataset {name!r} was not found locally (looked in: {where}) nor downloaded "
            f"({error_summary(exc)}); pass --data PATH to a text file or set LIPCLI_DATA_DIR"
        ) from exc
    text = _hub_text(name, splits)
    if not text:
        raise DataError(f"dataset {name!r} from the hub has no text; pass --data PATH to a text file")
    cache_path = _cache_dir() / _file_name(name)
    _write_atomic(cache_path, text)
    return text, f"hub:{name} (cached at {cache_path})"


def resolve_text(data: str | None = None) -> tuple[str, str]:
    """Return (text, source) for a file path or dataset name: file, $LIPCLI_DATA_DIR, cache, then hub."""
    if data:
        path = Path(data).expanduser()
        if path.is_file():
            return _read_text(path), str(path)
        if path.is_dir():
            raise DataError(f"expected a text file, got a directory: {path}")
        if not _HUB_ID.match(data) or data.endswith(".txt"):
            raise DataError(f"file not found: {path}")
    name = data or DEFAULT_DATASET
    candidates = _local_candidates(name)
    for candidate in candidates:
        if candidate.is_file():
            return _read_text(candidate), str(candidate)
    return _download(name, candidates)


class ShardStream:
    """Memory-mapped uint16 token shards (modded-nanogpt / llm.c format) read as one token stream."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._shards = [_open_shard(p) for p in self.paths]
        sizes = [len(s) for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, start: int, length: int) -> torch.Tensor:
        """Tokens [start, start + length) as int64, crossing shard boundaries as needed."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside stream of {len(self)} tokens")
        pieces = [np.empty(0, dtype="<u2")]
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self._starts[shard])
            piece = self._shards[shard][offset : offset + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return torch.from_numpy(np.concatenate(pieces).astype(np.int64))


def _open_shard(path: Path) -> np.memmap:
    size = path.stat().st_size
    if size < _SHARD_HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is too small for the {_SHARD_HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    if num_tokens <= 0 or size != _SHARD_HEADER_BYTES + 2 * num_tokens:
        raise DataError(
            f"{path}: header says {num_tokens} tokens but the file has {size} bytes; the shard is truncated or corrupt"
        )
    return np.memmap(path, dtype="<u2", mode="r", offset=_SHARD_HEADER_BYTES, shape=(num_tokens,))


def load_token_shards(pattern_or_dir: str) -> ShardStream:
    """Open the .bin shards in a directory (sorted) or matching a glob pattern as one ShardStream."""
    root = Path(pattern_or_dir).expanduser()
    if root.is_dir():
        paths = sorted(root.glob("*.bin"))
    else:
        paths = sorted(Path(p) for p in glob.glob(str(root)) if Path(p).is_file())
    if not paths:
        raise DataError(f"no token shards match {pattern_or_dir!r}; pass a directory of .bin files or a glob")
    return ShardStream(paths)


Tokens = torch.Tensor | ShardStream


@dataclass
class TokenSplits:
    train: Tokens
    val: Tokens
    tokenizer: Tokenizer | None
    source: str


def load_shard_splits(train_pattern: str, val_pattern: str) -> TokenSplits:
    """Train/val ShardStreams; tokenizer is None (shards are usually gpt2, the caller decides)."""
    train, val = load_token_shards(train_pattern), load_token_shards(val_pattern)
    source = (
        f"shards train={train_pattern} ({len(train.paths)} files, {len(train)} tokens) "
        f"val={val_pattern} ({len(val.paths)} files, {len(val)} tokens)"
    )
    return TokenSplits(train=train, val=val, tokenizer=None, source=source)


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be strictly between 0 and 1, got {val_fraction}")


def _named_tokenizer(name: str, text: str) -> Tokenizer:
    if name == "char":
        return CharTokenizer.from_text(text)
    return TiktokenTokenizer.gpt2()


def _check_split_length(split: str, n: int, context: int | None) -> None:
    need = 2 if context is None else context + 1
    if n >= need:
        return
    fraction_hint = "raise" if split == "val" else "lower"
    raise DataError(
        f"text too short: {n} tokens in the {split} split, need at least context+1 = {need}; "
        f"lower --context or {fraction_hint} --val-fraction"
    )


def load_text_splits(
    data: str | None,
    tokenizer: str = "char",
    val_fraction: float = 0.1,
    context: int | None = None,
    tokenizer_obj: Tokenizer | None = None,
) -> TokenSplits:
    """Tokenize a corpus and split it: the first (1 - val_fraction) of the tokens train, the rest val."""
    check_val_fraction(val_fraction)
    if tokenizer_obj is None and tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
    text, source = resolve_text(data)
    tok = tokenizer_obj or _named_tokenizer(tokenizer, text)
    ids = torch.tensor(tok.encode(text), dtype=torch.int64)
    n_train = int(len(ids) * (1.0 - val_fraction))
    train, val = ids[:n_train], ids[n_train:]
    _check_split_length("train", len(train), context)
    _check_split_length("val", len(val), context)
    return TokenSplits(train=train, val=val, tokenizer=tok, source=f"{source} [{tok.name} tokenizer]")


def _gather(tokens: Tokens, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Windows tokens[s:s+length] for every start, stacked into an int64 [len(starts), length]."""
    if isinstance(tokens, ShardStream):
        return torch.stack([tokens.window(int(s), length) for s in starts])
    return tokens[starts[:, None] + torch.arange(length)].long()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from pinned host memory on CUDA, so the copy overlaps the GPU's work."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _step_seed(seed: int, step: int) -> int:
    # A stable hash (unlike hash()) so the batch for (seed, step) is identical across runs and resumes.
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest(), "little")


def _check_context(n_tokens: int, context: int, what: str) -> None:
    if n_tokens < context + 1:
        need = context + 1
        raise DataError(f"{what} has {n_tokens} tokens, need at least context+1 = {need}; lower --context")


class BatchSampler:
    """Deterministic random windows for LM training: x = tokens[i:i+T], y = tokens[i+1:i+T+1]."""

    def __init__(
        self, tokens: Tokens, context: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if context < 1 or batch_size < 1:
            raise DataError(f"context and batch size must be positive, got {context} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        _check_context(len(tokens), context, "the training split")
        self.tokens = tokens
        self.context = context
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def batch(self, step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch for `step`; a pure function of (seed, step, rank)."""
        generator = torch.Generator().manual_seed(_step_seed(self.seed, step))
        n_starts = len(self.tokens) - self.context
        starts = torch.randint(0, n_starts, (self.batch_size * self.world_size,), generator=generator)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = _gather(self.tokens, mine, self.context + 1)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        return to_device(x, torch.device(device)), to_device(y, torch.device(device))


def recorded_val_tokens(
    train_config: dict[str, Any], tokenizer: dict[str, Any] | None, context: int, data: str | None = None
) -> tuple[Tokens, str]:
    """The validation tokens a checkpoint was evaluated on (or those of ``data``), and where they came from."""
    if data is None and train_config.get("val_data"):
        # Token-shard runs name their validation shards; text runs hold out the corpus's tail.
        shards = load_shard_splits(train_config["data"], train_config["val_data"])
        return shards.val, f"shards {train_config['val_data']}"
    splits = load_text_splits(
        data or train_config.get("data"),
        tokenizer=train_config.get("tokenizer", "char"),
        val_fraction=train_config.get("val_fraction", 0.1),
        context=context,
        tokenizer_obj=tokenizer_from_dict(tokenizer) if tokenizer else None,
    )
    return splits.val, splits.source


def val_batches(
    tokens: Tokens, context: int, batch_size: int, max_batches: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start of `tokens`; the last batch may be smaller."""
    # Validate eagerly (a generator body would only raise at the first next()).
    if max_batches is not None and max_batches < 1:
        raise DataError(f"the number of eval batches must be positive, got {max_batches}")
    _check_context(len(tokens), context, "the val split")
    starts = torch.arange(0, len(tokens) - context, context)
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    return _windows(tokens, starts.split(batch_size), context)


def _windows(
    tokens: Tokens, chunks: Sequence[torch.Tensor], context: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for chunk in chunks:
        windows = _gather(tokens, chunk, context + 1)
        yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
