"""Tests for lipcli.data; everything runs offline (the hub is replaced by in-process datasets)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import tiktoken
import torch
from PIL import Image

from lipcli import data
from lipcli.data import (
    BatchSampler,
    CharTokenizer,
    DataError,
    ShardStream,
    TiktokenTokenizer,
    load_shard_splits,
    load_text_splits,
    load_token_shards,
    resolve_text,
    tokenizer_from_dict,
    val_batches,
)
from lipcli.images import load_image_splits

CORPUS_BYTES = 1_115_394
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _offline_hub(*args: Any, **kwargs: Any) -> Any:
    raise ConnectionError("no network in tests")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private cache dir and a hub that always fails unless a test installs its own."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIPCLI_CACHE_DIR", str(cache))
    monkeypatch.setattr(datasets, "load_dataset", _offline_hub)
    return cache


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "data_dir"
    path.mkdir()
    monkeypatch.setenv("LIPCLI_DATA_DIR", str(path))
    return path


def fake_hub(monkeypatch: pytest.MonkeyPatch, splits: dict[str, dict[str, list[Any]]]) -> list[tuple[Any, ...]]:
    """Install a load_dataset that returns a real in-process DatasetDict and records its calls."""
    calls: list[tuple[Any, ...]] = []

    def load_dataset(*args: Any, **kwargs: Any) -> datasets.DatasetDict:
        calls.append(args)
        return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def raises_one_line(match: str, fn: Callable[[], Any]) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def tiny_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="tiny-bytes",
        pat_str=PAT_STR,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|end|>": 256},
    )


def write_shard(path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens))
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


# --- tokenizers -------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_the_real_corpus() -> None:
    text, source = resolve_text()
    assert Path(source) == Path(os.environ["LIPCLI_DATA_DIR"]) / "tinyshakespeare.txt"
    assert len(text.encode("utf-8")) == CORPUS_BYTES
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    ids = tok.encode(text)
    assert min(ids) == 0 and max(ids) == 64
    assert tok.decode(ids) == text
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(rebuilt, CharTokenizer)
    assert rebuilt.encode(text[:5000]) == ids[:5000]


def test_char_tokenizer_vocab_is_sorted_and_rejects_unknown_characters() -> None:
    tok = CharTokenizer.from_text("banana!")
    assert tok.to_dict() == {"name": "char", "vocab": "!abn"}
    assert tok.encode("nab") == [3, 1, 2]
    message = raises_one_line("outside the char vocabulary", lambda: tok.encode("baz?"))
    assert "'?z'" in message


def test_tiny_tiktoken_round_trip_and_serialization() -> None:
    tok = TiktokenTokenizer(tiny_encoding())
    text = "héllo wörld <|end|> 42"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # byte-level ranks only, special token kept as text
    assert tok.decode(ids) == text
    assert (tok.name, tok.vocab_size) == ("tiny-bytes", 257)
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(rebuilt, TiktokenTokenizer)
    assert (rebuilt.name, rebuilt.vocab_size) == ("tiny-bytes", 257)
    assert rebuilt.encode(text) == ids
    assert rebuilt.encoding.encode("<|end|>", allowed_special="all") == [256]


def test_tokenizer_from_dict_rejects_unknown_and_broken_metadata() -> None:
    raises_one_line("unknown tokenizer 'wordpiece'", lambda: tokenizer_from_dict({"name": "wordpiece"}))
    raises_one_line("no 'vocab'", lambda: tokenizer_from_dict({"name": "char"}))
    broken = {"name": "x", "mergeable_ranks": {"AA==": 0}}
    raises_one_line("invalid tiktoken tokenizer metadata", lambda: tokenizer_from_dict(broken))


# --- resolve_text -----------------------------------------------------------------------------------------


def test_resolve_order_path_then_data_dir_then_cache_then_hub(
    tmp_path: Path, data_dir: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = tmp_path / "mine.txt"
    explicit.write_text("explicit", encoding="utf-8")
    (data_dir / "tinyshakespeare.txt").write_text("from data dir", encoding="utf-8")
    isolated.mkdir()
    (isolated / "tinyshakespeare.txt").write_text("from cache", encoding="utf-8")
    calls = fake_hub(monkeypatch, {s: {"text": ["from hub"]} for s in ("train", "validation", "test")})

    assert resolve_text(str(explicit)) == ("explicit", str(explicit))
    assert resolve_text(None)[0] == "from data dir"
    (data_dir / "tinyshakespeare.txt").unlink()
    assert resolve_text(None)[0] == "from cache"
    (isolated / "tinyshakespeare.txt").unlink()
    assert resolve_text(None)[0] == "from hub" * 3
    assert len(calls) == 1


def test_hub_download_is_cached_and_reused(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIPCLI_DATA_DIR", raising=False)
    splits = {"train": {"text": ["First "]}, "validation": {"text": ["Second "]}, "test": {"text": ["Third"]}}
    calls = fake_hub(monkeypatch, splits)

    text, source = resolve_text("tinyshakespeare")
    assert text == "First Second Third"
    assert calls == [("karpathy/tiny_shakespeare",)]
    cache_file = isolated / "tinyshakespeare.txt"
    assert cache_file.read_text(encoding="utf-8") == text
    assert str(cache_file) in source
    assert [p.name for p in isolated.iterdir()] == ["tinyshakespeare.txt"]  # no temp file left

    assert resolve_text(None) == (text, str(cache_file))
    assert len(calls) == 1


def test_other_hub_dataset_joins_train_rows(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_hub(monkeypatch, {"train": {"text": ["one", "two"]}, "test": {"text": ["unused"]}})
    text, _ = resolve_text("someone/stories")
    assert text == "one\ntwo"
    assert calls == [("someone/stories",)]
    assert (isolated / "someone__stories.txt").read_text(encoding="utf-8") == "one\ntwo"


def test_hub_dataset_without_text_column(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub(monkeypatch, {"train": {"content": ["x"]}})
    raises_one_line("no train split with a 'text' column", lambda: resolve_text("someone/code"))


def test_hub_failure_says_where_it_looked(data_dir: Path, isolated: Path) -> None:
    message = raises_one_line("not found locally", lambda: resolve_text("tinyshakespeare"))
    assert str(data_dir / "tinyshakespeare.txt") in message
    assert str(isolated / "tinyshakespeare.txt") in message
    assert "ConnectionError" in message and "--data PATH" in message and "LIPCLI_DATA_DIR" in message


@pytest.mark.parametrize("name", ["missing.txt", "some/dir/corpus", "./corpus", "/nonexistent/corpus"])
def test_missing_path_is_file_not_found(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_hub(monkeypatch, {"train": {"text": ["never"]}})
    monkeypatch.chdir(tmp_path)
    raises_one_line("file not found", lambda: resolve_text(name))
    assert calls == []


def test_empty_and_directory_inputs(tmp_path: Path, data_dir: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    raises_one_line("file is empty", lambda: resolve_text(str(empty)))
    (data_dir / "blank.txt").write_text("", encoding="utf-8")
    raises_one_line("file is empty", lambda: resolve_text("blank"))
    raises_one_line("got a directory", lambda: resolve_text(str(tmp_path)))


def test_non_utf8_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    raises_one_line("not UTF-8", lambda: resolve_text(str(bad)))


# --- load_text_splits -------------------------------------------------------------------------------------


def test_text_splits_are_contiguous_prefix_and_suffix(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    text = "abcdefghij" * 10
    corpus.write_text(text, encoding="utf-8")
    splits = load_text_splits(str(corpus), val_fraction=0.25, context=8)
    assert splits.train.dtype == torch.int64 and splits.train.ndim == 1
    assert (len(splits.train), len(splits.val)) == (75, 25)
    assert splits.tokenizer is not None and splits.tokenizer.vocab_size == 10
    assert splits.tokenizer.decode(torch.cat([splits.train, splits.val]).tolist()) == text
    assert str(corpus) in splits.source


def test_text_splits_with_a_given_tokenizer(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("naïve text " * 20, encoding="utf-8")
    tok = TiktokenTokenizer(tiny_encoding())
    splits = load_text_splits(str(corpus), tokenizer="char", val_fraction=0.5, tokenizer_obj=tok)
    assert splits.tokenizer is tok
    assert torch.cat([splits.train, splits.val]).tolist() == list(("naïve text " * 20).encode("utf-8"))


def test_text_too_short_for_context(tmp_path: Path) -> None:
    corpus = tmp_path / "short.txt"
    corpus.write_text("x" * 100, encoding="utf-8")
    message = raises_one_line("text too short", lambda: load_text_splits(str(corpus), context=10))
    assert "10 tokens in the val split" in message and "context+1 = 11" in message
    assert "raise --val-fraction" in message
    message = raises_one_line("train split", lambda: load_text_splits(str(corpus), context=95))
    assert "lower --context or lower --val-fraction" in message


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction(tmp_path: Path, fraction: float) -> None:
    corpus = str(tmp_path / "x.txt")
    raises_one_line("--val-fraction", lambda: load_text_splits(corpus, val_fraction=fraction))


def test_unknown_tokenizer_name(tmp_path: Path) -> None:
    raises_one_line("unknown tokenizer 'bpe'", lambda: load_text_splits(None, tokenizer="bpe"))


# --- token shards -----------------------------------------------------------------------------------------


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Shards holding 0..9, 10..24, 25..29 (plus a large id) in file-name order."""
    path = tmp_path / "shards"
    path.mkdir()
    write_shard(path / "train_000.bin", np.arange(0, 10))
    write_shard(path / "train_001.bin", np.arange(10, 25))
    write_shard(path / "train_002.bin", np.append(np.arange(25, 30), 50256))
    write_shard(path / "val_000.bin", np.arange(100, 140))
    return path


def test_shards_round_trip_and_cross_boundaries(shard_dir: Path) -> None:
    stream = load_token_shards(str(shard_dir / "train_*.bin"))
    assert len(stream) == 31
    expected = np.append(np.arange(30), 50256)
    assert stream.window(0, 31).tolist() == expected.tolist()
    window = stream.window(5, 22)  # spans all three shards
    assert window.dtype == torch.int64
    assert window.tolist() == list(range(5, 27))
    assert stream.window(10, 15).tolist() == list(range(10, 25))  # exactly one shard
    with pytest.raises(IndexError):
        stream.window(20, 12)


def test_shard_directory_takes_all_bins_sorted(shard_dir: Path) -> None:
    stream = load_token_shards(str(shard_dir))
    names = [p.name for p in stream.paths]
    assert names == ["train_000.bin", "train_001.bin", "train_002.bin", "val_000.bin"]
    assert len(stream) == 71


def test_shard_splits(shard_dir: Path) -> None:
    splits = load_shard_splits(str(shard_dir / "train_*.bin"), str(shard_dir / "val_*.bin"))
    assert isinstance(splits.train, ShardStream) and isinstance(splits.val, ShardStream)
    assert (len(splits.train), len(splits.val), splits.tokenizer) == (31, 40, None)
    assert "3 files" in splits.source


def test_bad_shards_name_the_file(tmp_path: Path) -> None:
    bad_magic = tmp_path / "magic.bin"
    write_shard(bad_magic, np.arange(8), magic=12345)
    message = raises_one_line("bad magic 12345", lambda: load_token_shards(str(bad_magic)))
    assert str(bad_magic) in message
    bad_version = tmp_path / "version.bin"
    write_shard(bad_version, np.arange(8), version=7)
    raises_one_line("unsupported shard version 7", lambda: load_token_shards(str(bad_version)))
    truncated = tmp_path / "truncated.bin"
    write_shard(truncated, np.arange(8))
    truncated.write_bytes(truncated.read_bytes()[:-2])
    raises_one_line("header says 8 tokens", lambda: load_token_shards(str(truncated)))
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"\x00" * 10)
    raises_one_line("too small", lambda: load_token_shards(str(tiny)))
    raises_one_line("no token shards match", lambda: load_token_shards(str(tmp_path / "none_*.bin")))


# --- batches ----------------------------------------------------------------------------------------------


def test_batch_sampler_is_deterministic_per_step() -> None:
    tokens = torch.arange(1000)
    first = BatchSampler(tokens, context=16, batch_size=8, seed=3)
    for step in range(5):
        first.batch(step)
    resumed = BatchSampler(tokens, context=16, batch_size=8, seed=3)
    x, y = first.batch(5)
    assert torch.equal(x, resumed.batch(5)[0]) and torch.equal(y, resumed.batch(5)[1])
    assert not torch.equal(x, first.batch(6)[0])
    assert not torch.equal(x, BatchSampler(tokens, 16, 8, seed=4).batch(5)[0])


def test_batch_windows_are_shifted_by_one() -> None:
    tokens = torch.arange(1000) * 7 % 1009  # distinct values, not sorted
    x, y = BatchSampler(tokens, context=16, batch_size=8, seed=0).batch(2, device="cpu")
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = [int((tokens == row[0]).nonzero()) for row in x]
    for row_x, row_y, start in zip(x, y, starts, strict=True):
        assert torch.equal(row_x, tokens[start : start + 16])
        assert torch.equal(row_y, tokens[start + 1 : start + 17])


def test_two_ranks_equal_one_rank_with_the_global_batch() -> None:
    tokens = torch.arange(500)
    full_x, full_y = BatchSampler(tokens, 8, batch_size=6, seed=11).batch(7)
    parts = [BatchSampler(tokens, 8, batch_size=3, seed=11, rank=r, world_size=2).batch(7) for r in (0, 1)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)
    assert not torch.equal(parts[0][0], parts[1][0])


def test_batch_sampler_reads_shards_like_tensors(shard_dir: Path) -> None:
    stream = load_token_shards(str(shard_dir))
    tokens = stream.window(0, len(stream))
    for step in range(3):
        from_shards = BatchSampler(stream, 12, batch_size=4, seed=1).batch(step)
        from_tensor = BatchSampler(tokens, 12, batch_size=4, seed=1).batch(step)
        assert torch.equal(from_shards[0], from_tensor[0]) and torch.equal(from_shards[1], from_tensor[1])


def test_batch_sampler_needs_context_plus_one_tokens() -> None:
    BatchSampler(torch.arange(17), context=16, batch_size=2, seed=0).batch(0)
    raises_one_line("context\\+1 = 17", lambda: BatchSampler(torch.arange(16), 16, 2, seed=0))


def test_val_batches_are_consecutive_and_repeatable(shard_dir: Path) -> None:
    tokens = torch.arange(100)
    batches = list(val_batches(tokens, context=10, batch_size=4, max_batches=None))
    assert [len(x) for x, _ in batches] == [4, 4, 1]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(xs.flatten(), torch.arange(90))
    assert torch.equal(ys, xs + 1)
    again = list(val_batches(tokens, context=10, batch_size=4, max_batches=2))
    assert len(again) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(again, batches, strict=False))
    stream = load_token_shards(str(shard_dir / "val_*.bin"))
    (x, y), *_ = val_batches(stream, context=10, batch_size=2, max_batches=1)
    assert x.tolist() == [list(range(100, 110)), list(range(110, 120))]
    assert torch.equal(y, x + 1)
    raises_one_line("val split has 5 tokens", lambda: val_batches(torch.arange(5), 8, 2, None))


# --- images -----------------------------------------------------------------------------------------------


def test_digits_shapes_range_and_stratified_seeded_split() -> None:
    splits = load_image_splits("digits", val_fraction=0.2, seed=0)
    assert len(splits.x_train) + len(splits.x_val) == 1797
    assert len(splits.x_val) == 360
    assert splits.x_train.shape[1] == splits.input_dim == 64
    assert splits.num_classes == 10
    assert splits.x_train.dtype == torch.float32 and splits.y_train.dtype == torch.int64
    both = torch.cat([splits.x_train, splits.x_val])
    assert both.min() == 0.0 and both.max() == 1.0
    assert torch.bincount(splits.y_val, minlength=10).min() >= 35  # stratified: every class ~36 times
    assert torch.equal(load_image_splits("digits", seed=0).y_val, splits.y_val)
    assert not torch.equal(load_image_splits("digits", seed=1).y_val, splits.y_val)


def _cifar_pixels(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(count)]


def test_cifar10_from_pil_and_array_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    train_pixels, test_pixels = _cifar_pixels(3, seed=0), _cifar_pixels(2, seed=1)
    train_pixels[0][:] = 255
    calls = fake_hub(
        monkeypatch,
        {
            "train": {"img": [Image.fromarray(p) for p in train_pixels], "label": [3, 0, 9]},
            "test": {"img": test_pixels, "label": [1, 2]},
        },
    )
    splits = load_image_splits("cifar10")
    assert calls == [("uoft-cs/cifar10",)]
    assert splits.x_train.shape == (3, 3072) and splits.x_val.shape == (2, 3072)
    assert (splits.input_dim, splits.num_classes) == (3072, 10)
    assert splits.x_train.dtype == torch.float32 and splits.y_val.dtype == torch.int64
    assert torch.all(splits.x_train[0] == 1.0)
    expected = torch.from_numpy(np.stack(test_pixels).reshape(2, -1) / 255.0).float()
    assert torch.allclose(splits.x_val, expected)
    assert splits.y_train.tolist() == [3, 0, 9] and splits.y_val.tolist() == [1, 2]


def test_cifar10_offline_points_to_digits() -> None:
    message = raises_one_line("CIFAR-10 needs the Hugging Face hub", lambda: load_image_splits("cifar10"))
    assert "mlp-digits" in message


def test_unknown_image_dataset_lists_known_names() -> None:
    message = raises_one_line("unknown image dataset 'mnist'", lambda: load_image_splits("mnist"))
    assert "cifar10, digits" in message


def test_data_error_is_a_value_error() -> None:
    assert issubclass(data.DataError, ValueError)
