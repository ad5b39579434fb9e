import json
import math

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from lipcli import checkpoint
from lipcli.certification import certify, certify_loaded, exact_norm
from lipcli.cli import app
from lipcli.constraints import CapContext, project
from lipcli.errors import UserError
from lipcli.models import build_model
from lipcli.nn import Domain
from lipcli.sensitivity import measure_sensitivity

runner = CliRunner()


def _gpt(**config) -> torch.nn.Module:
    base = {"vocab_size": 11, "d_model": 16, "n_layers": 2, "n_heads": 2, "context": 6, "zero_init": False}
    return build_model("lipschitz-gpt", {**base, **config})


def _cap(model: torch.nn.Module, sigma_max: float) -> torch.nn.Module:
    """Random weights pushed to the cap: the worst case the training guarantee allows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_bias" in name or "bias" in name:  # input-independent, uncapped: any value must stay sound
                p.copy_(torch.randn(p.shape, generator=gen) * 5)
            elif not name.startswith("embed"):
                p.copy_(project(torch.randn(p.shape, generator=gen) * 3, "svd", CapContext(sigma_max)))
    return model


def _bounds(model: torch.nn.Module) -> tuple[float, float]:
    paper = sum(b.log10_lipschitz for _, b in model.bound(exact_norm, tight=False))
    tight = sum(b.log10_lipschitz for _, b in model.bound(exact_norm, tight=True))
    return 10**paper, 10**tight


@pytest.mark.parametrize(
    "config",
    [
        {"softmax_scale": 1.0},
        {"softmax_scale": 8.0, "final_scale": 4.0},
        {"softmax_scale": 30.0, "n_heads": 4, "residual_scale": 2.0},
        {"softmax_scale": 8.0, "position_bias": True},
        {"softmax_scale": 0.5, "position_bias": True, "attn_out_scale": 1.0, "mlp_gain": 4.0},
        # Biases grow the stream's norm, which the query/key term of the next attention must account for.
        {"softmax_scale": 4.0, "position_bias": True, "mlp_gain": 4.0, "bias": True},
        {"softmax_scale": 0.0, "position_bias": True, "attn_out_scale": 1.0, "bias": True},
        {"softmax_scale": 2.0, "position_bias": True, "activation": "groupsort", "bias": True},
        {"softmax_scale": 0.0, "position_bias": True, "activation": "groupsort", "group_size": 4},
        # Content heads beside position heads: only the content heads' query/key term is counted.
        {"softmax_scale": 30.0, "n_heads": 4, "content_heads": 1, "position_bias": True, "attn_out_scale": 1.0},
        {"softmax_scale": 16.0, "n_heads": 4, "content_heads": 2, "activation": "groupsort", "bias": True},
    ],
)
def test_gpt_bounds_exceed_measured_sensitivity(config):
    model = _cap(_gpt(**config), sigma_max=1.0).double()
    paper, tight = _bounds(model)
    assert tight <= paper * (1 + 1e-12)
    radius = model.embed.max_row_rms()
    measured = measure_sensitivity(
        model.forward_embeddings, (6, 16), "seq-rms", radius=radius, restarts=2, steps=60, batch=8, seed=0
    )
    best = max(measured.best_ratio, measured.local_ratio)
    assert 0 < best <= tight, (best, tight)
    assert best > tight / 1e3  # the search must find something of the bound's order, or it tested nothing


def test_mlp_bound_exceeds_measured_sensitivity():
    model = build_model("lipschitz-mlp", {"input_dim": 12, "hidden": 16, "n_layers": 3, "num_classes": 5})
    model = _cap(model, sigma_max=2.0).double()
    paper, tight = _bounds(model)
    measured = measure_sensitivity(model, (12,), "l2", restarts=2, steps=60, batch=8, seed=0)
    assert 0 < max(measured.best_ratio, measured.local_ratio) <= tight <= paper * (1 + 1e-12)


def test_orthogonal_linear_mlp_gets_its_exact_constant():
    """One orthogonal layer then any layer: ReLU is the identity on the positive orthant, so L = sigma(W2)."""
    model = build_model("lipschitz-mlp", {"input_dim": 8, "hidden": 8, "n_layers": 2, "num_classes": 3})
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.eye(8))
        model.layers[1].weight.copy_(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
    _, tight = _bounds(model.double())
    assert tight == pytest.approx(float(torch.linalg.svdvals(model.layers[1].weight.detach())[0]), rel=1e-9)


def test_linear_residual_gpt_gets_its_exact_constant():
    """q = k = 0, W_o V = 3c I, MLP off: each block is x -> (1 - a) x + a c mean(x); L is the product, exactly."""
    model = _gpt(n_heads=1, n_layers=2, final_scale=2.0).double()
    c, a = 0.8, 1.0 / 4
    with torch.no_grad():
        for block in model.blocks:
            attn, mlp = block.attn.inner, block.mlp.inner
            attn.q.weight.zero_()
            attn.k.weight.zero_()
            attn.v.weight.copy_(torch.eye(16, dtype=torch.float64).unsqueeze(0))
            attn.o.weight.copy_(3 * c * torch.eye(16, dtype=torch.float64))
            mlp.fc_out.weight.zero_()
        model.head.weight.copy_(torch.eye(11, 16) * 0.5)
    expected = ((1 - a + a * c) * (1 - a)) ** 2 * 2.0 * 0.5 * math.sqrt(16 / 11)
    paper, tight = _bounds(model)
    assert paper == pytest.approx(expected, rel=1e-9)
    assert tight == pytest.approx(expected, rel=1e-9)
    # A uniform shift along the head's top singular direction attains it.
    x = torch.zeros(1, 6, 16, dtype=torch.float64)
    dx = torch.zeros_like(x)
    dx[..., 0] = 0.1
    with torch.no_grad():
        moved = model.forward_embeddings(x + dx) - model.forward_embeddings(x)
    ratio = float(moved.pow(2).mean(-1).sqrt().max() / dx.pow(2).mean(-1).sqrt().max())
    assert ratio == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["blocks.0.attn.inner.v.weight", "blocks.1.mlp.inner.fc_in.weight", "head.weight"])
def test_scaling_a_matrix_up_never_lowers_the_bound(name):
    model = _cap(_gpt(), sigma_max=1.0).double()
    before = _bounds(model)
    with torch.no_grad():
        dict(model.named_parameters())[name].mul_(1.5)
    after = _bounds(model)
    assert after[0] > before[0] and after[1] > before[1]


def _saved(tmp_path, model, name="m.safetensors"):
    return checkpoint.save(tmp_path / name, model, train_config={"method": "svd", "sigma_max": 1.0})


def test_power_iteration_mode_is_sound(tmp_path):
    path = _saved(tmp_path, _cap(_gpt(), 1.0))
    exact, fast = certify(path), certify(path, power_iters=4)
    assert fast.log10_tight >= exact.log10_tight and fast.log10_paper >= exact.log10_paper
    assert fast.log10_tight - exact.log10_tight < math.log10(1.01)


def test_metadata_disagreement_is_reported_not_trusted(tmp_path):
    model = _cap(_gpt(), 1.0)
    path = _saved(tmp_path, model)
    ckpt = checkpoint.load(path)
    ckpt.spectral_norms["head.weight"] = 0.01
    report = certify_loaded(ckpt)
    assert "head.weight" in report.disagreements
    assert report.log10_tight == pytest.approx(certify(path).log10_tight)


def test_cli_certify_table_json_and_gate(tmp_path):
    path = _saved(tmp_path, _cap(_gpt(final_scale=3.0), 1.0))
    table = runner.invoke(app, ["certify", str(path)])
    assert table.exit_code == 0, table.output
    assert "block1.attn" in table.stdout and "per-token RMS" in table.stdout
    result = runner.invoke(app, ["certify", str(path), "--json"])
    report = json.loads(result.stdout)
    bound = 10 ** report["log10_bound"]
    assert report["log10_tight"] <= report["log10_paper"]
    assert runner.invoke(app, ["certify", str(path), "--fail-above", str(bound * 1.01)]).exit_code == 0
    gated = runner.invoke(app, ["certify", str(path), "--fail-above", str(bound * 0.99), "--json"])
    assert gated.exit_code == 1 and json.loads(gated.stdout)["passed"] is False


def test_cli_certify_errors_and_unbounded_baseline(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["certify", str(broken)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    base = build_model("baseline-gpt", {"vocab_size": 11, "d_model": 16, "n_layers": 1, "n_heads": 2, "context": 6})
    path = _saved(tmp_path, base, "base.safetensors")
    report = json.loads(runner.invoke(app, ["certify", str(path), "--json"]).stdout)
    assert report["log10_bound"] is None and "RMSNorm" in report["unbounded_reason"]
    assert runner.invoke(app, ["certify", str(path), "--fail-above", "1e300"]).exit_code == 1


def test_huge_bounds_stay_finite_in_log_space(tmp_path):
    # Scales at the accepted limit (1e6); depth makes the bound huge (final_scale 1e250 would make logits inf).
    model = _cap(_gpt(n_layers=12, softmax_scale=1e6, final_scale=1e6), sigma_max=50.0)
    report = certify(_saved(tmp_path, model))
    assert math.isfinite(report.log10_tight) and report.log10_tight > 300
    table = runner.invoke(app, ["certify", str(tmp_path / "m.safetensors")])
    assert "10^" in table.stdout


# --- soundness holes of issue 18: each test fails on the tree before the fix ---------------------------------


def _cli_error(args: list[str]) -> str:
    """Run certify expecting a user error: exit 2 and exactly one line on stderr, no traceback."""
    result = runner.invoke(app, ["certify", *args])
    assert result.exit_code == 2, (args, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "signed", [{"final_scale": -3.0}, {"attn_out_scale": -1 / 3}, {"softmax_scale": -8.0}, {"mlp_gain": -2.0}]
)
def test_a_negative_scale_costs_its_absolute_value(signed):
    """x -> s f(x) has constant |s| Lip(f): a sign flip must certify exactly what the positive scale does."""
    positive = {name: abs(value) for name, value in signed.items()}
    flipped, plain = _cap(_gpt(**signed), 1.0).double(), _cap(_gpt(**positive), 1.0).double()
    assert _bounds(flipped) == pytest.approx(_bounds(plain), rel=1e-12)
    assert _bounds(flipped)[1] > 0.01


def test_a_negative_mlp_final_scale_costs_its_absolute_value():
    config = {"input_dim": 6, "hidden": 8, "n_layers": 2, "num_classes": 3}
    flipped = _cap(build_model("lipschitz-mlp", {**config, "final_scale": -2.0}), 1.0).double()
    plain = _cap(build_model("lipschitz-mlp", {**config, "final_scale": 2.0}), 1.0).double()
    assert _bounds(flipped) == pytest.approx(_bounds(plain), rel=1e-12)


def test_zero_final_scale_certifies_zero(tmp_path):
    report = certify(_saved(tmp_path, _cap(_gpt(final_scale=0.0), 1.0)))
    assert report.log10_tight == -math.inf  # a constant map, and the running sum stays -inf (not NaN)


def test_a_negative_final_scale_gates_like_a_positive_one(tmp_path):
    path = _saved(tmp_path, _cap(_gpt(final_scale=-30.0), 1.0))
    gated = runner.invoke(app, ["certify", str(path), "--fail-above", "10", "--json"])
    assert gated.exit_code == 1 and json.loads(gated.stdout)["log10_bound"] > 1


@pytest.mark.parametrize("field", ["final_scale", "softmax_scale", "attn_out_scale", "mlp_gain", "residual_scale"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_scales_are_refused_not_certified(tmp_path, field, value):
    ckpt = checkpoint.load(_saved(tmp_path, _cap(_gpt(), 1.0)))
    setattr(ckpt.model.config, field, value)
    with pytest.raises(UserError, match=field):
        certify_loaded(ckpt)


@pytest.mark.parametrize("name", ["blocks.0.attn.inner.q.weight", "embed.weight", "head.weight", "logit_bias.weight"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_refused_in_one_line(tmp_path, name, value):
    path = _saved(tmp_path, _cap(_gpt(bias=True), 1.0))
    tensors = safetensors.torch.load_file(path)
    tensors[name][0, ...] = value
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    before = path.read_bytes()
    assert "NaN or inf" in _cli_error([str(path)]) or name in _cli_error([str(path)])
    assert path.read_bytes() == before


def test_a_model_whose_forward_is_not_finite_is_refused(tmp_path):
    """mlp_gain 0 makes GeLU(0 z) / (0 c) = 0/0: no bound may be printed for a model that outputs NaN."""
    ckpt = checkpoint.load(_saved(tmp_path, _cap(_gpt(), 1.0)))
    ckpt.model.config.mlp_gain = 0.0
    for block in ckpt.model.blocks:
        block.mlp.inner.gain = 0.0
    with pytest.raises(UserError, match="not finite"):
        certify_loaded(ckpt)


@pytest.mark.parametrize("softmax_scale", [0.0, -2.0])
def test_causal_attention_with_a_non_positive_scale_computes_what_is_certified(softmax_scale):
    """SDPA's causal kernel returned NaN for a scale <= 0 while certify printed a finite bound."""
    model = _cap(_gpt(softmax_scale=softmax_scale), 1.0).double()
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        assert bool(torch.isfinite(model.forward_embeddings(x)).all())
    measured = measure_sensitivity(model.forward_embeddings, (6, 16), "seq-rms", restarts=1, steps=30, batch=4)
    assert 0 < measured.lower_bound <= _bounds(model)[1]


def test_content_free_attention_with_zero_softmax_scale_is_certified(tmp_path):
    report = certify(_saved(tmp_path, _cap(_gpt(softmax_scale=0.0, position_bias=True), 1.0)))
    assert math.isfinite(report.log10_tight)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_fail_above_must_be_a_finite_positive_number(tmp_path, value):
    path = _saved(tmp_path, _cap(_gpt(), 1.0))
    assert "--fail-above" in _cli_error([str(path), "--fail-above", value])


@pytest.mark.parametrize("iters", ["0", "-3", "1001", "1000000000"])
def test_power_iters_is_bounded(tmp_path, iters):
    path = _saved(tmp_path, _cap(_gpt(), 1.0))
    assert "--power-iters" in _cli_error([str(path), "--power-iters", iters])


def test_the_bound_covers_the_domain_it_prints_not_the_embeddings_span():
    """Embedding rows of RMS 0.05 used to set the attention radius while the output promised RMS <= 1."""
    model = _cap(_gpt(softmax_scale=8.0, n_layers=1), 1.0)
    with torch.no_grad():
        w = model.embed.weight
        w.mul_(0.05 / w.pow(2).mean(-1, keepdim=True).sqrt())
    model = model.double()
    assert model.domain().radius == 1.0 and "RMS <= 1" in model.domain().statement()
    tight = _bounds(model)[1]
    measured = measure_sensitivity(
        model.forward_embeddings, (6, 16), "seq-rms", radius=1.0, restarts=2, steps=60, batch=8, seed=0
    )
    assert measured.lower_bound <= tight, (measured.lower_bound, tight)


def test_embeddings_beyond_unit_rms_widen_the_domain_and_it_is_printed(tmp_path):
    model = _cap(_gpt(softmax_scale=2.0), 1.0)
    with torch.no_grad():
        model.embed.weight[3].mul_(2.5 / model.embed.weight[3].pow(2).mean().sqrt())
    radius = model.domain().radius
    assert 2.5 <= radius <= 2.5 * (1 + 1e-5)  # a short decimal, rounded up
    report = json.loads(runner.invoke(app, ["certify", str(_saved(tmp_path, model)), "--json"]).stdout)
    assert f"RMS <= {radius:.7g}" in report["domain"] and "per-token RMS" in report["norm_pair"]


def test_exact_norms_are_proved_upper_bounds():
    """float64 eigvalsh undershoots sigma_1 by ~1e-16 on about half of these matrices (seed 1 among them)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    for seed in range(8):
        w = torch.randn(12, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        sigma = max(mpmath.svd_r(mpmath.matrix(w.tolist()), compute_uv=False))
        certified = mpmath.mpf(float(exact_norm(w))) * mpmath.sqrt(mpmath.mpf(12) / 8)
        assert certified >= sigma, seed
        assert certified <= sigma * (1 + mpmath.mpf(1e-10))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_checkpoints_are_flagged_and_the_arithmetic_is_stated(tmp_path, dtype):
    path = _saved(tmp_path, _cap(_gpt(), 1.0).to(dtype))
    report = json.loads(runner.invoke(app, ["certify", str(path), "--json"]).stdout)
    name = str(dtype).removeprefix("torch.")
    assert report["low_precision"] is True and report["stored_dtype"] == name
    assert "exact real arithmetic" in report["arithmetic"] and name in report["arithmetic"]
    table = runner.invoke(app, ["certify", str(path)])
    assert table.exit_code == 0 and f"weights stored in {name}" in table.stdout
    assert "arithmetic: exact real arithmetic" in table.stdout


def test_float32_checkpoint_states_its_arithmetic_without_a_warning(tmp_path):
    path = _saved(tmp_path, _cap(_gpt(), 1.0))
    report = json.loads(runner.invoke(app, ["certify", str(path), "--json"]).stdout)
    assert report["low_precision"] is False and report["stored_dtype"] == "float32"
    table = runner.invoke(app, ["certify", str(path)])
    assert "warning" not in table.stdout and "domain: token embeddings" in table.stdout


def test_a_path_with_brackets_is_printed_as_text(tmp_path):
    folder = tmp_path / "runs[bold]" / "[red]x"
    path = _saved(folder, _cap(_gpt(), 1.0), "m[1].safetensors")
    table = runner.invoke(app, ["certify", str(path)])
    assert table.exit_code == 0, table.output
    assert "m[1].safetensors" in table.stdout.replace("\n", "")


def test_a_nan_scale_in_the_file_is_refused_in_one_line(tmp_path):
    """Strict JSON stores a NaN final_scale as null: it used to certify -inf and pass every gate."""
    model = _cap(_gpt(), 1.0)
    model.config.final_scale = math.nan  # past build_model's own check, as a hand-edited file would be
    path = _saved(tmp_path, model)
    before = path.read_bytes()
    assert "final_scale" in _cli_error([str(path), "--fail-above", "10"])
    assert path.read_bytes() == before


def test_domain_statement_projection_and_rounding():
    domain = Domain.token_embeddings(16, 1.0000000596, max_tokens=6)
    assert domain.radius == 1.00001 and "T <= 6" in domain.statement() and "RMS <= 1.00001" in domain.statement()
    assert Domain.token_embeddings(16, 0.05, 6).radius >= 0.05
    x = torch.randn(2, 5, 16, dtype=torch.float64) * 3
    projected = domain.project(x)
    assert float(projected.pow(2).mean(-1).sqrt().max()) <= domain.radius * (1 + 1e-15)
    inside = x / x.pow(2).mean(-1, keepdim=True).sqrt() * 0.5
    assert torch.equal(domain.project(inside), inside)
    whole = build_model("lipschitz-mlp", {"input_dim": 6, "hidden": 8}).domain()
    assert whole.radius is None and torch.equal(whole.project(x), x)
