import json

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from lipcli import checkpoint
from lipcli.cli import app
from lipcli.data import DataError
from lipcli.presets import apply_overrides, load_preset
from lipcli.recall import IGNORE_INDEX, RecallSpec, train_batch, validation_set
from lipcli.sweep import sweep
from lipcli.training import evaluate, loss_and_correct, make_task, train

runner = CliRunner()
SPEC = RecallSpec(keys=10, values=12, pairs=5, queries=3)
# A recall model small enough to train in a second: 4 pairs and 4 queries fill a 16-token context.
TINY_RECALL = {"model.d_model": 32, "model.n_layers": 1, "model.residual_scale": 1.0, "model.n_heads": 2,
               "model.context": 16, "train.recall_keys": 8, "train.recall_values": 8, "train.recall_pairs": 4,
               "train.recall_queries": 4, "train.batch_size": 4, "train.eval_batches": 2, "train.steps": 4,
               "train.eval_every": 2, "train.device": "cpu",
               "train.anneal_start": 1, "train.anneal_end": 2}  # fmt: skip  # recall-cpu anneals until step 1000


def test_sequences_list_pairs_then_ask_for_their_values():
    x, y = train_batch(SPEC, seed=0, step=0, batch_size=64)
    end = 2 * SPEC.pairs
    assert x.shape == y.shape == (64, SPEC.length)
    for seq, labels in zip(x.tolist(), y.tolist(), strict=True):
        keys, values = seq[0:end:2], seq[1:end:2]
        assert len(set(keys)) == SPEC.pairs and all(0 <= k < SPEC.keys for k in keys)
        assert len(set(values)) == SPEC.pairs and all(SPEC.keys <= v < SPEC.vocab_size for v in values)
        paired = dict(zip(keys, values, strict=True))
        asked = seq[end::2]
        assert len(set(asked)) == SPEC.queries and set(asked) <= set(keys)
        # Each answer label is the value listed with the asked key, and the next input repeats it (teacher-forced).
        assert labels[end::2] == [paired[k] for k in asked] == seq[end + 1 :: 2]
        answers = set(range(end, SPEC.length, 2))
        assert all(label == IGNORE_INDEX for i, label in enumerate(labels) if i not in answers)


def test_batches_are_reproducible_and_validation_is_apart_from_training():
    first = train_batch(SPEC, seed=0, step=3, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(first, train_batch(SPEC, 0, 3, 8), strict=True))
    assert not torch.equal(first[0], train_batch(SPEC, 0, 4, 8)[0])
    assert not torch.equal(first[0], train_batch(SPEC, 1, 3, 8)[0])
    # A rank's slice of the global batch is the same rows a single process draws.
    ranks = [train_batch(SPEC, 0, 3, 4, rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), first[0])
    val_x, val_y = validation_set(SPEC, 100)
    assert torch.equal(validation_set(SPEC, 10)[0], val_x[:10])  # the first n whatever the count asked for
    assert torch.equal(validation_set(SPEC, 100)[1], val_y)
    seen = {
        tuple(row) for seed in range(3) for step in range(20) for row in train_batch(SPEC, seed, step, 8)[0].tolist()
    }
    assert not seen & {tuple(row) for row in val_x.tolist()}


def test_chance_is_a_guess_among_the_values_not_yet_answered():
    x, _ = validation_set(SPEC, 32)
    end = 2 * SPEC.pairs
    # Counted from the sequences: at each query, the listed values that no earlier answer has used.
    left = [len(set(seq[1:end:2]) - set(seq[end + 1 : end + 1 + 2 * j : 2])) for seq in x.tolist() for j in range(3)]
    assert SPEC.chance == pytest.approx(sum(1 / n for n in left) / len(left))
    assert SPEC.chance > 1 / SPEC.pairs


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (RecallSpec(0, 8, 4, 4), "train.recall_keys must be an integer >= 1 (got 0)"),
        (RecallSpec(8, 8, 9, 4), "recall_pairs 9 needs as many distinct keys and values"),
        (RecallSpec(8, 8, 4, 5), "recall_queries 5 must be <= recall_pairs 4"),
        (RecallSpec(64, 64, 16, 16), "= 64 tokens, more than model.context 16"),
    ],
)
def test_bad_sizes_are_one_line_errors(spec, words):
    with pytest.raises(DataError) as raised:
        spec.check(context=16)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_cli_rejects_bad_sizes_in_one_line_before_writing(tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["train", "--preset", "recall-cpu", "--set", "train.recall_queries=17", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "recall_queries 17 must be <= recall_pairs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


class _Oracle(nn.Module):
    """Sharp logits for a chosen token per position: ``pick(x, y)`` decides which."""

    def __init__(self, pick, vocab: int) -> None:
        super().__init__()
        self.pick, self.vocab = pick, vocab
        self.unused = nn.Parameter(torch.zeros(1))  # evaluate() reads the device from a parameter
        self.labels: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        assert self.labels is not None
        return 50.0 * nn.functional.one_hot(self.pick(x, self.labels), self.vocab).float()


def _next_tokens(x: Tensor) -> Tensor:
    return torch.cat([x[:, 1:], x[:, :1]], dim=1)


def _score(pick) -> dict[str, float]:
    x, y = validation_set(SPEC, 16)
    model = _Oracle(pick, SPEC.vocab_size)
    model.labels = y
    return evaluate(model, iter([(x, y)]), torch.autocast("cpu", enabled=False))


def test_loss_and_accuracy_count_answer_positions_only():
    answers = validation_set(SPEC, 16)[1] != IGNORE_INDEX
    # Right on every answer, wrong (a key where a value follows, and so on) everywhere else: 100%.
    right_on_answers = _score(lambda x, y: torch.where(answers, y, (x + 1) % SPEC.vocab_size))
    assert right_on_answers["val_acc"] == 1.0 and right_on_answers["val_loss"] < 1e-6
    # Right on every next token but the answers: 0%, and the loss is the answers' alone.
    wrong_on_answers = _score(lambda x, y: torch.where(answers, (y + 1) % SPEC.vocab_size, _next_tokens(x)))
    assert wrong_on_answers["val_acc"] == 0.0 and wrong_on_answers["val_loss"] == pytest.approx(50.0)
    x, y = validation_set(SPEC, 4)
    logits = torch.randn(4, SPEC.length, SPEC.vocab_size)
    loss, correct = loss_and_correct(lambda _: logits, x, y)
    scored = y != IGNORE_INDEX
    assert float(loss) == pytest.approx(float(nn.functional.cross_entropy(logits[scored], y[scored])))
    assert int(correct) == int((logits.argmax(-1)[scored] == y[scored]).sum())


def test_any_lm_preset_trains_on_recall(tmp_path):
    preset = apply_overrides(load_preset("shakespeare-cpu"), {**TINY_RECALL, "train.data": "recall"})
    task = make_task(preset)
    assert task.model_fields() == {"vocab_size": 16}
    result = train(preset, tmp_path / "m.safetensors")
    assert result.step == 4 and 0.0 <= result.metrics["val_acc"] <= 1.0


def _cli(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("preset", ["recall-cpu", "recall-baseline"])
def test_a_recall_checkpoint_goes_through_certify_attack_and_activations(preset, tmp_path):
    out = tmp_path / "m.safetensors"
    sets = [arg for key, value in TINY_RECALL.items() for arg in ("--set", f"{key}={value}")]
    trained = _cli("train", "--preset", preset, *sets, "--out", str(out))
    assert trained["step"] == 4
    certified = _cli("certify", str(out))
    assert "log10_bound" in json.dumps(certified)
    attacked = _cli("attack", str(out), "--eps", "0,0.01", "--n", "3", "--steps", "2", "--device", "cpu")
    # 3 sequences of 4 queries: only the answers are predictions; eps 0 attacks nothing, so nothing is lost.
    assert attacked["examples"] == 3 and attacked["predictions"] == 3 * 4
    assert "recall" in attacked["source"]
    assert attacked["rows"][0]["clean_acc"] == attacked["rows"][0]["adv_acc"]
    profiled = _cli("activations", str(out), "--batches", "1", "--batch-size", "4", "--fp8-check", "--device", "cpu")
    assert profiled["checkpoints"][0]["samples"] == 4


def test_a_recall_sweep_runs_against_recall_baseline_on_the_same_sequences(tmp_path):
    result = sweep("recall-cpu", ["muon"], ["softcap"], [1.0], tmp_path, overrides=TINY_RECALL)
    assert not result.failed
    by_preset = {row.preset: row for row in result.rows}
    assert set(by_preset) == {"recall-cpu", "recall-baseline"}
    for row in result.rows:
        trained = checkpoint.load(row.checkpoint).train_config
        assert trained["data"] == "recall" and (trained["recall_pairs"], trained["recall_queries"]) == (4, 4)
        assert 0.0 <= row.val_acc <= 1.0
