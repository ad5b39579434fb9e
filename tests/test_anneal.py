"""train.anneal_from: fixed scales start elsewhere and end at the model's own, which the checkpoint records."""

import pytest
import torch

import lipcli.training as train_module
from lipcli import checkpoint
from lipcli.anneal import scales_at
from lipcli.models import build_model
from lipcli.presets import PresetError, TrainConfig
from lipcli.training import TrainingInterrupted, train

from .conftest import tiny_preset

CONTENT = {"model.softmax_scale": 2.0, "model.content_heads": 1, "model.final_scale": 3.0}
ANNEAL = {"train.anneal_from": {"softmax_scale": 8.0, "final_scale": 9.0}, "train.anneal_start": 1,
          "train.anneal_end": 3, "train.eval_every": 2}  # fmt: skip


def test_scales_hold_then_move_linearly_then_stay_at_the_models():
    t = TrainConfig(steps=10, anneal_from={"final_scale": 9.0}, anneal_start=2, anneal_end=6)
    final = {"final_scale": 1.0}
    assert [scales_at(step, t, final)["final_scale"] for step in range(8)] == [9, 9, 9, 7, 5, 3, 1, 1]
    jump = TrainConfig(steps=10, anneal_from={"final_scale": 9.0}, anneal_start=4, anneal_end=4)
    assert [scales_at(step, jump, final)["final_scale"] for step in (3, 4)] == [9, 1]


def test_each_checkpoint_records_the_scales_in_use_and_the_last_one_the_models(tmp_path, monkeypatch):
    used = []
    real = train_module.loss_and_correct

    def spy(model, x, y):
        if model.training:  # the scale the attention computes with, and the one the checkpoint would record
            attention = model.blocks[-1].attn.inner
            assert attention.softmax_scale == model.config.softmax_scale
            used.append((attention.softmax_scale, model.config.final_scale))
        return real(model, x, y)

    monkeypatch.setattr(train_module, "loss_and_correct", spy)
    preset = tiny_preset(**CONTENT, **ANNEAL)
    saved = []
    train(preset, tmp_path / "m.safetensors", on_event=lambda e: e["type"] == "eval" and saved.append(
        checkpoint.load(tmp_path / "m.safetensors").model_config))  # fmt: skip
    assert used == [(8.0, 9.0), (8.0, 9.0), (5.0, 6.0), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0)]
    assert [(c["softmax_scale"], c["final_scale"]) for c in saved] == [(8.0, 9.0), (2.0, 3.0), (2.0, 3.0)]
    final = checkpoint.load(tmp_path / "m.safetensors")
    assert {k: final.model_config[k.removeprefix("model.")] for k in CONTENT} == CONTENT
    fresh = build_model(preset.arch, final.model_config)
    fresh.load_state_dict(final.model.state_dict())
    x = torch.randint(0, final.model.config.vocab_size, (2, 8))
    torch.testing.assert_close(final.model(x), fresh(x))


def test_an_interrupted_anneal_resumes_like_an_uninterrupted_one(tmp_path):
    preset = tiny_preset(**CONTENT, **ANNEAL)
    full = train(preset, tmp_path / "full.safetensors")

    def interrupt(event):
        if event["type"] == "step" and event["step"] == 3:
            raise KeyboardInterrupt

    cut = tmp_path / "cut.safetensors"
    with pytest.raises(TrainingInterrupted):
        train(preset, cut, on_event=interrupt)
    assert checkpoint.load(cut).model_config["final_scale"] == 9.0  # saved at step 2, mid-anneal
    train(preset, cut, resume=True)
    a, b = checkpoint.load(full.checkpoint), checkpoint.load(cut)
    assert a.model_config == b.model_config
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            {"model.softmax_scale": 0.0, "train.anneal_from": {"softmax_scale": 8.0}},
            "names softmax_scale; this model's annealable scales: attn_out_scale, final_scale",
        ),  # content-free: no q or k
        ({**CONTENT, "train.anneal_from": {"mlp_gain": 2.0}, "train.anneal_end": 2}, "names mlp_gain"),
        ({**CONTENT, **ANNEAL, "train.anneal_end": 6}, "< train.steps (6) must hold"),
        ({**CONTENT, **ANNEAL, "train.anneal_start": 4}, "train.anneal_start (4) <= train.anneal_end (3)"),
        ({**CONTENT, **ANNEAL, "train.compile": True}, "without --compile"),
        ({**CONTENT, **ANNEAL, "train.anneal_from": {"final_scale": 1e7}}, "train.anneal_from: model.final_scale"),
        ({**CONTENT, **ANNEAL, "train.anneal_from": {"final_scale": "big"}}, "train.anneal_from.final_scale must"),
    ],
)
def test_a_bad_anneal_is_refused_before_anything_is_written(tmp_path, overrides, words):
    with pytest.raises(PresetError, match=words.replace("(", r"\(").replace(")", r"\)")):
        train(tiny_preset(**overrides), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())
