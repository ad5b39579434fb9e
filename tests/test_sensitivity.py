import math

import pytest
import torch

from lipcli.models import build_model
from lipcli.sensitivity import measure_sensitivity

TINY_GPT = {"vocab_size": 11, "d_model": 16, "n_layers": 2, "n_heads": 2, "context": 8, "zero_init": False}
FAST = {"restarts": 1, "steps": 40, "batch": 8}  # about a second per search on one core


def _matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sigma(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w, ord=2))


@pytest.mark.parametrize("box", [None, (0.0, 1.0)])
def test_linear_map_l2_recovers_the_spectral_norm(box):
    w = _matrix(5, 7, seed=1)
    result = measure_sensitivity(lambda x: x @ w.T, (7,), "l2", box=box, **FAST)
    sigma = _sigma(w)
    for measured in (result.best_ratio, result.local_ratio):
        assert measured == pytest.approx(sigma, rel=1e-3)
        assert measured <= sigma * (1 + 1e-9)
    if box is not None:
        assert result.x.min() >= 0 and result.y.max() <= 1


def test_per_token_linear_map_seq_rms_recovers_the_rms_operator_norm():
    vocab, d = 5, 6
    w = _matrix(vocab, d, seed=2)
    result = measure_sensitivity(lambda x: x @ w.T, (4, d), "seq-rms", **FAST)
    exact = math.sqrt(d / vocab) * _sigma(w)
    for measured in (result.best_ratio, result.local_ratio):
        assert measured == pytest.approx(exact, rel=1e-3)
        assert measured <= exact * (1 + 1e-9)


def test_relu_mlp_stays_below_the_product_of_spectral_norms():
    model = build_model("lipschitz-mlp", {"input_dim": 12, "hidden": 16, "n_layers": 3, "num_classes": 5}).double()
    bound = math.prod(_sigma(layer.weight.detach()) for layer in model.layers) * model.config.final_scale
    result = measure_sensitivity(model, (12,), "l2", box=(0.0, 1.0), **FAST)
    assert 0 < result.lower_bound <= bound
    assert result.x.min() >= 0 and result.y.max() <= 1


@pytest.mark.parametrize("radius", [1.0, 0.5])
def test_tiny_gpt_pair_stays_in_the_domain(radius):
    model = build_model("lipschitz-gpt", TINY_GPT).double()
    result = measure_sensitivity(model.forward_embeddings, (8, 16), "seq-rms", radius=radius, **FAST)
    assert math.isfinite(result.best_ratio) and math.isfinite(result.local_ratio)
    assert result.best_ratio > 0 and result.local_ratio > 0
    for point in (result.x, result.y):
        assert point.pow(2).mean(dim=-1).sqrt().max() <= radius + 1e-9
    assert not torch.equal(result.x, result.y)


def test_constant_map_measures_zero():
    model = build_model("lipschitz-gpt", {**TINY_GPT, "zero_init": True}).double()  # zero head: f == 0
    result = measure_sensitivity(model.forward_embeddings, (8, 16), "seq-rms", restarts=1, steps=3, batch=4)
    assert result.best_ratio == 0.0 and result.local_ratio == 0.0


def test_fixed_seed_is_deterministic():
    model = build_model("lipschitz-mlp", {"input_dim": 6, "hidden": 8, "n_layers": 2, "num_classes": 3}).double()
    first, second, other = (
        measure_sensitivity(model, (6,), "l2", restarts=1, steps=10, batch=4, seed=seed) for seed in (3, 3, 4)
    )
    assert (first.best_ratio, first.local_ratio, first.evaluations) == (
        second.best_ratio,
        second.local_ratio,
        second.evaluations,
    )
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert not torch.equal(first.x, other.x)


@pytest.mark.parametrize(
    ("shape", "norm", "kwargs"),
    [((4,), "linf", {}), ((4,), "seq-rms", {}), ((2, 4), "seq-rms", {"box": (0.0, 1.0)}), ((4,), "l2", {"batch": 1})],
)
def test_rejects_bad_arguments(shape, norm, kwargs):
    with pytest.raises(ValueError):
        measure_sensitivity(lambda x: x, shape, norm, **kwargs)


@pytest.mark.parametrize("arch", ["lipschitz-gpt", "lipschitz-mlp"])
def test_checkpoint_sensitivity_searches_the_certificates_norm_pair(tmp_path, arch):
    from lipcli import checkpoint
    from lipcli.certification import certify
    from lipcli.sensitivity import checkpoint_sensitivity

    config = {**TINY_GPT, "position_bias": True} if arch == "lipschitz-gpt" else {"input_dim": 6, "hidden": 8}
    path = checkpoint.save(tmp_path / "model.safetensors", build_model(arch, config))
    measured = checkpoint_sensitivity(path, steps=30, restarts=1)
    bound = 10 ** certify(path).log10_bound
    assert bound / 100 < measured <= bound


def test_model_sensitivity_searches_the_certified_domain_not_the_embeddings_span():
    """Embedding rows of RMS 0.05 must not shrink the search: certify proves RMS <= 1, so that is searched."""
    from lipcli.sensitivity import model_sensitivity

    model = build_model("lipschitz-gpt", {**TINY_GPT, "softmax_scale": 4.0}).double()
    with torch.no_grad():
        model.embed.weight.mul_(0.05)
    result = model_sensitivity(model, window=8, **FAST)
    rms = torch.stack([result.x, result.y]).pow(2).mean(-1).sqrt()
    assert model.domain().radius == 1.0
    assert 0.5 < float(rms.max()) <= 1.0 + 1e-12
