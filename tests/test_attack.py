import json
import math
import os

import pytest
import torch
import torchattacks
from typer.testing import CliRunner

from lipcli import attack as attack_module
from lipcli.attack import SoundnessError, _make_attack, _SequenceBatch, parse_eps, robustness
from lipcli.certification import certify
from lipcli.checkpoint import load
from lipcli.cli import app
from lipcli.data import load_text_splits, tokenizer_from_dict, val_batches
from lipcli.images import load_image_splits
from lipcli.presets import apply_overrides, load_preset
from lipcli.training import train

from .conftest import SHARED_DATA, tiny_preset

runner = CliRunner()
CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A briefly trained MLP on digits, LipschitzGPT and BaselineGPT on Shakespeare (about 4 s in all)."""
    root = tmp_path_factory.mktemp("attack")
    with pytest.MonkeyPatch.context() as mp:
        # Module-scoped, so conftest's per-test data-dir fixture has not run yet.
        mp.setenv("LIPCLI_DATA_DIR", os.environ.get("LIPCLI_DATA_DIR", str(SHARED_DATA)))
        mp.setenv("LIPCLI_CACHE_DIR", str(root / "cache"))
        short = {"train.steps": 40, "train.eval_every": 40}
        mlp_preset = apply_overrides(load_preset("mlp-digits"), {"train.steps": 30, "train.eval_every": 30})
        return {
            "mlp": train(mlp_preset, root / "mlp.safetensors").checkpoint,
            "gpt": train(tiny_preset(**short), root / "gpt.safetensors").checkpoint,
            "baseline": train(tiny_preset("shakespeare-baseline", **short), root / "base.safetensors").checkpoint,
        }


def _check_invariant(rows) -> None:
    for row in rows:
        assert row.certified_acc <= row.adv_acc <= row.clean_acc, row


def test_mlp_rows_match_an_independent_certificate_and_keep_the_invariant(models):
    eps = [0.0, 0.05, 0.2, 0.5]
    report = robustness(models["mlp"], eps, norm="l2", **CPU)
    _check_invariant(report.rows)
    assert [r.eps for r in report.rows] == eps and report.predictions == 256
    zero = report.rows[0]
    assert zero.adv_acc == zero.clean_acc and zero.max_norm == zero.max_threat_norm == 0.0
    assert report.rows[-1].drop > 0 and report.rows[-1].certified_acc < report.rows[1].certified_acc
    # Certified accuracy recomputed from the model's margins and certify()'s bound.
    model, bound = load(models["mlp"]).model, 10 ** certify(models["mlp"]).log10_bound
    images = load_image_splits("digits")
    with torch.no_grad():
        logits = model(images.x_val[:256])
    top2 = logits.topk(2, dim=-1).values
    correct = logits.argmax(dim=-1) == images.y_val[:256]
    for row in report.rows:
        expected = (correct & (top2[:, 0] - top2[:, 1] > math.sqrt(2) * bound * row.eps)).float().mean()
        assert row.certified_acc == pytest.approx(float(expected))
        assert row.clean_acc == pytest.approx(float(correct.float().mean()))
    for row in report.rows[1:]:
        # L2 PGD spends its whole budget and never more (the [0, 1] clamp may trim a little on some images).
        assert row.max_threat_norm == row.max_norm == pytest.approx(row.eps, rel=1e-4)
        assert 0.95 * row.eps < row.mean_norm <= row.max_norm


def test_mlp_linf_apgd_and_fgsm_use_the_l2_radius_of_the_box(models):
    for method in ("pgd", "apgd", "fgsm"):
        report = robustness(models["mlp"], [0.02, 0.1], norm="linf", attack=method, steps=10, **CPU)
        _check_invariant(report.rows)
        for row in report.rows:
            assert row.radius == pytest.approx(row.eps * 8)  # 64 pixels: the box lies in the L2 ball eps * sqrt(64)
            assert row.max_threat_norm == pytest.approx(row.eps, rel=1e-4) and row.max_norm <= row.radius


def test_more_restarts_break_at_least_as_much(models):
    one, three = (robustness(models["mlp"], [0.5], restarts=k, steps=5, **CPU).rows[0] for k in (1, 3))
    assert three.adv_acc <= one.adv_acc and three.clean_acc == one.clean_acc


@pytest.mark.parametrize("arch", ["gpt", "baseline"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_embedding_attack_spends_exactly_its_budget(models, arch, norm):
    ckpt = load(models[arch])
    model = ckpt.model.eval().requires_grad_(False)
    tokens = torch.randint(0, ckpt.model_config["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(0))
    domain = model.domain() if arch == "gpt" else None
    eps, d = 0.05, ckpt.model_config["d_model"]
    with torch.no_grad():
        batch = _SequenceBatch(model, tokens[:, :-1], tokens[:, 1:], norm, domain)
    module, eps_u = batch.attacked(eps)
    u = _make_attack(module, "pgd", norm, eps_u, 2.5 * eps_u / 10, 10, 1, 0)(batch.u0, batch.labels)
    assert u.shape == (3, 1, 15, d) and module(u).shape == (3, ckpt.model_config["vocab_size"], 15)
    moved, threat = batch.norms(module, u)
    # Every sequence's perturbation sits on the threat set's boundary (in the units of eps).
    torch.testing.assert_close(threat, torch.full((3,), eps), rtol=1e-4, atol=0)
    fed = module.embeddings(u) - batch.e0  # the change the model sees, in embedding space
    seq_rms = fed.pow(2).mean(dim=-1).sqrt().amax(dim=-1)
    assert torch.equal(moved, seq_rms) and float(seq_rms.max()) <= eps * (1 + 1e-5)
    assert float(seq_rms.min()) > 0.2 * eps
    if domain is None:  # nothing pulled back: the threat set's own norm, measured on what the model sees
        flat = fed.flatten(1)
        measured = flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1) / math.sqrt(d)
        torch.testing.assert_close(measured, torch.full((3,), eps), rtol=1e-4, atol=0)
    else:  # pulled back into the certificate's domain
        assert float(module.embeddings(u).pow(2).mean(dim=-1).sqrt().max()) <= domain.radius * (
            1 + 1e-6
        )  # float32 projection


def test_language_model_certified_positions_match_an_independent_count(models):
    eps = [0.0, 0.01, 0.03, 0.1]
    report = robustness(models["gpt"], eps, norm="linf", n=4, steps=10, **CPU)
    _check_invariant(report.rows)
    assert report.examples == 4 and report.predictions == 4 * 16 and report.note is None
    assert report.rows[0].adv_acc == report.rows[0].clean_acc > 0
    assert report.rows[-1].certified_acc < report.rows[1].certified_acc < report.rows[0].clean_acc
    ckpt = load(models["gpt"])
    splits = load_text_splits("tinyshakespeare", tokenizer_obj=tokenizer_from_dict(ckpt.tokenizer))
    x, y = next(val_batches(splits.val, 16, 4, 1))
    with torch.no_grad():
        logits = ckpt.model(x).flatten(0, 1)
    top2, correct = logits.topk(2, dim=-1).values, logits.argmax(dim=-1) == y.flatten()
    bound, vocab = 10**report.log10_bound, ckpt.model_config["vocab_size"]
    for row in report.rows:
        expected = (correct & (top2[:, 0] - top2[:, 1] > math.sqrt(2 * vocab) * bound * row.eps)).float().mean()
        assert row.certified_acc == pytest.approx(float(expected))


def test_baseline_has_no_certificate(models):
    with torch.no_grad():  # a caller's no_grad must not stop the attack's gradients
        report = robustness(models["baseline"], [0.0, 0.01], norm="l2", n=2, steps=5, **CPU)
    assert math.isinf(report.log10_bound) and "no certificate" in report.note
    assert [r.certified_acc for r in report.rows] == [0.0, 0.0] and report.rows[0].clean_acc > 0
    assert report.rows[1].max_threat_norm == pytest.approx(0.01, rel=1e-4)


def _shrunk_bound(monkeypatch, factor: float) -> None:
    """certify() with a bound ``factor`` times too small: unsound on purpose."""

    def unsound(path, power_iters=None):
        report = certify(path, power_iters)
        report.log10_paper += math.log10(factor)
        report.log10_tight += math.log10(factor)
        return report

    monkeypatch.setattr(attack_module, "certify", unsound)


@pytest.mark.parametrize("arch", ["mlp", "gpt"])
def test_an_unsound_bound_is_caught(models, monkeypatch, arch):
    eps, n = (0.5, 32) if arch == "mlp" else (0.2, 4)
    _check_invariant(robustness(models[arch], [eps], norm="linf", n=n, **CPU).rows)  # the sound bound passes
    _shrunk_bound(monkeypatch, 0.01)
    with pytest.raises(SoundnessError, match=f"SOUNDNESS VIOLATION at eps {eps:g}: the attack broke"):
        robustness(models[arch], [eps], norm="linf", n=n, **CPU)
    args = ["attack", str(models[arch]), "--eps", f"0,{eps}", "--norm", "linf", "--n", str(n), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and result.stdout == ""
    assert "SOUNDNESS VIOLATION" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_perturbation_outside_the_threat_set_is_caught(models, monkeypatch):
    class Overshoot:
        def __call__(self, u, labels):
            return u + 0.3  # 0.3 per pixel: L2 norm 2.4, far outside a ball of 0.1

    monkeypatch.setattr(attack_module, "_make_attack", lambda *args: Overshoot())
    with pytest.raises(SoundnessError, match="left its threat set"):
        robustness(models["mlp"], [0.1], n=8, **CPU)


def test_cli_sweep_json_is_one_clean_object_with_a_plot(models, monkeypatch, tmp_path):
    forward = torchattacks.PGD.forward

    def chatty(self, images, labels):
        print("torchattacks says hello")  # as torchattacks does in places
        return forward(self, images, labels)

    monkeypatch.setattr(torchattacks.PGD, "forward", chatty)
    png = tmp_path / "robust.png"
    args = ["attack", str(models["gpt"]), "--eps", "0,0.01,0.05", "--norm", "linf", "--n", "2", "--steps", "5"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["eps"] for r in report["rows"]] == [0.0, 0.01, 0.05] and report["plot"] == str(png)
    assert {"clean_acc", "adv_acc", "drop", "certified_acc", "mean_norm", "max_norm"} <= set(report["rows"][1])
    assert report["arch"] == "lipschitz-gpt" and report["predictions"] == 32
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_table_has_one_row_per_eps(models):
    args = ["attack", str(models["baseline"]), "--eps", "0.02,0.1", "--n", "2", "--steps", "3", "--device", "cpu"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["0.02", "0.1"]
    assert "no certificate" in result.stdout and "certified" in result.stdout


def test_parse_eps():
    assert parse_eps("0.05, 0.1,1e-3") == [0.05, 0.1, 0.001]
    for text in ("-0.1", "0.1,abc", "nan", ""):
        with pytest.raises(ValueError, match="--eps"):
            parse_eps(text)


def test_cli_errors_are_one_line_exit_2(models, tmp_path):
    mlp, gpt = str(models["mlp"]), str(models["gpt"])
    for args, words in [
        ([mlp, "--eps", "0.1", "--attack", "cw"], "unknown attack 'cw'"),
        ([mlp, "--eps", "0.1,-0.2"], "--eps must be finite and >= 0"),
        ([mlp, "--eps", "0.1", "--attack", "fgsm"], "fgsm is an Linf attack"),
        ([mlp, "--eps", "0.1", "--norm", "l1"], "unknown norm 'l1'"),
        ([mlp, "--eps", "0.1", "--steps", "0"], "--steps must be >= 1"),
        ([gpt, "--eps", "0.1", "--attack", "apgd"], "apgd needs one label per input"),
        ([str(tmp_path / "missing.safetensors"), "--eps", "0.1"], "no such checkpoint"),
    ]:
        result = runner.invoke(app, ["attack", *args, "--device", "cpu"])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_attack_pulls_back_into_the_domain_certify_proves(models):
    """One domain object: the threat set names exactly the statement certify prints."""
    report = robustness(models["gpt"], [0.01], norm="linf", n=2, steps=2, **CPU)
    assert certify(models["gpt"]).domain in report.threat
