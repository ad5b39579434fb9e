"""Composition: every stage of a certified model certifies itself, and containers compose in forward's order.

The toy stage below is defined here only: adding it to a Block (one attribute) must put it into the forward pass,
into the block's bound and into certify's rows, with no edit anywhere else.
"""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lipcli.attention import Attention
from lipcli.bounds import Bound
from lipcli.certification import certify_loaded, exact_norm
from lipcli.checkpoint import Checkpoint
from lipcli.compose import compose
from lipcli.models import GPTConfig, LipschitzGPT, config_dict
from lipcli.nn import MLP, Bias, DenseReLU, Linear, Readout, Residual, Scale
from lipcli.sensitivity import measure_sensitivity, model_sensitivity

GAIN = 3.0
SEARCH = {"restarts": 2, "steps": 40, "batch": 8, "seed": 0}
# A float64 difference quotient is itself rounded (~1e-12 relative): where a bound is exact the search meets it.
SLACK = 1 + 1e-9


class TripledTanh(nn.Module):
    """x -> 3 tanh(x): tanh is 1-Lipschitz per coordinate and |tanh z| <= |z|, so L = 3 and out <= 3 in_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GAIN * torch.tanh(x)

    def bound(self, in_norm: float, norm_of, tight: bool = False) -> Bound:
        return Bound(math.log10(GAIN), GAIN * in_norm)


def _gpt(**changes) -> LipschitzGPT:
    base = {"vocab_size": 7, "d_model": 8, "n_layers": 2, "n_heads": 2, "context": 4}
    return LipschitzGPT(GPTConfig(**{**base, **changes})).double()


def _seq_rms(y: torch.Tensor) -> float:
    return float(y.detach().pow(2).mean(-1).sqrt().max())


@pytest.mark.parametrize("tight", [False, True])
def test_a_stage_added_to_a_block_is_run_and_composed_in_its_place(tight):
    block = _gpt(zero_init=False, softmax_scale=4.0).blocks[0]
    plain_rows = block.rows(1.0, exact_norm, tight)
    block.toy = TripledTanh()  # the one edit: a new stage after the MLP
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), GAIN * torch.tanh(block.mlp(block.attn(x))))
    rows = block.rows(1.0, exact_norm, tight)
    assert [name for name, _ in rows] == ["attn", "mlp", "toy"]
    attn = block.attn.bound(1.0, exact_norm, tight)
    mlp = block.mlp.bound(attn.out_norm, exact_norm, tight)
    toy = rows[2][1]
    assert toy.out_norm == pytest.approx(GAIN * mlp.out_norm, rel=1e-11)  # the toy sees the MLP's output bound
    product = math.log10(10**attn.log10_lipschitz * 10**mlp.log10_lipschitz * GAIN)
    composed = block.bound(1.0, exact_norm, tight)
    assert composed.log10_lipschitz == pytest.approx(product, rel=1e-11)
    assert composed.log10_lipschitz > compose(plain_rows, 1.0).log10_lipschitz + math.log10(GAIN) - 1e-9
    measured = measure_sensitivity(block, (4, 8), "seq-rms", radius=1.0, **SEARCH).lower_bound
    assert measured <= 10**composed.log10_lipschitz * SLACK


def test_certify_counts_a_stage_added_to_every_block_and_would_fail_without_it():
    """Blocks at their zero init are x -> (1 - a)^2 x, the head a fixed matrix: the toy's factor is all that moves."""
    model = _gpt(final_scale=2.0)
    model.head.zero_init = False
    model.head.reset_parameters(torch.Generator().manual_seed(0))
    for block in model.blocks:
        block.toy = TripledTanh()
    ckpt = Checkpoint(
        model=model, arch=model.arch, model_config=config_dict(model), train_config={}, metrics={}, step=0,
        spectral_norms={}, tokenizer=None, metadata={}, path=Path("<toy>"),
    )  # fmt: skip
    report = certify_loaded(ckpt)
    names = [row.name for row in report.rows]
    assert names == ["embed", *(f"block{i}.{s}" for i in range(2) for s in ("attn", "mlp", "toy")), "head"]
    toy_logs = [row.log10_tight for row in report.rows if row.name.endswith(".toy")]
    assert toy_logs == pytest.approx([math.log10(GAIN)] * 2, rel=1e-11)
    measured = model_sensitivity(model, window=4, **SEARCH).lower_bound
    assert 0.99 * 10**report.log10_bound <= measured <= 10**report.log10_bound * SLACK
    # A container that skipped the stage would certify only the other rows: the measurement beats that.
    ignored = sum(row.log10_tight for row in report.rows if not row.name.endswith(".toy"))
    assert measured > 10**ignored * 1.5


def test_the_gpt_runs_exactly_the_stages_it_certifies():
    model = _gpt(zero_init=False, bias=True, final_scale=-1.5)
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = x
    for block in model.blocks:
        h = block.mlp(block.attn(h))
    expected = -1.5 * model.head(h) + model.logit_bias.weight
    with torch.no_grad():
        torch.testing.assert_close(model.forward_embeddings(x), expected)
    assert [name for name, _ in model.bound(exact_norm)] == [
        "embed", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "head",
    ]  # fmt: skip
    assert _seq_rms(model.forward_embeddings(x / x.pow(2).mean(-1, keepdim=True).sqrt())) <= (
        model.bound(exact_norm)[-1][1].out_norm
    )


RADIUS = 1.3  # each module is certified on tokens of RMS <= RADIUS, and searched on exactly that domain


def _randomized(seed: int, *modules: nn.Module) -> None:
    """Gaussian weights well past the unit caps (RMS->RMS norms near 3), biases included: any weights must be sound."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1.5 / math.sqrt(p.shape[-1]))


def _stage(name: str):
    modules: dict[str, nn.Module] = {
        "linear": Linear(8, 6, "g"),
        "attention-content": Attention(8, 2, 8.0, zero_init=False, position_context=4),
        "attention-mixed": Attention(8, 2, 8.0, zero_init=False, position_context=4, content_heads=1),
        "attention-position": Attention(8, 2, 0.0, zero_init=False, position_context=4),
        "mlp-gelu": MLP(8, 16, zero_init=False, gain=3.0, bias=True),
        "mlp-groupsort": MLP(8, 16, zero_init=False, bias=True, activation="groupsort", group_size=4),
        "residual": Residual(Attention(8, 2, 4.0, zero_init=False), a=0.4),
        "block": _gpt(zero_init=False, softmax_scale=4.0, bias=True, position_bias=True).blocks[0],
    }
    if name == "head":
        head, bias = Linear(8, 7, "head").double(), Bias(7, "head_bias").double()
        _randomized(0, head, bias)
        return Readout(head, -2.5, bias)
    module = modules[name].double()
    _randomized(0, module)
    return module


def _sphere_points(n: int) -> torch.Tensor:
    z = torch.randn(n, 4, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return z * (RADIUS / z.pow(2).mean(-1, keepdim=True).sqrt())


@pytest.mark.parametrize(
    "name",
    ["linear", "attention-content", "attention-mixed", "attention-position", "mlp-gelu", "mlp-groupsort",
     "residual", "block", "head"],
)  # fmt: skip
def test_each_modules_bound_holds_against_its_own_measured_sensitivity(name):
    stage = _stage(name)
    with torch.no_grad():
        probe = stage(_sphere_points(16))
    measured = measure_sensitivity(stage, (4, 8), "seq-rms", radius=RADIUS, **SEARCH)
    assert measured.lower_bound > 0
    with torch.no_grad():
        pair = stage(torch.stack([measured.x, measured.y]))
    for tight in (False, True):
        bound = stage.bound(RADIUS, exact_norm, tight)
        assert measured.lower_bound <= 10**bound.log10_lipschitz * SLACK, (name, tight)
        assert max(_seq_rms(probe), _seq_rms(pair)) <= bound.out_norm, (name, tight)
    if name in ("linear", "head"):  # linear maps: the bound is their exact constant, and the search must reach it
        assert measured.lower_bound >= 0.99 * 10**bound.log10_lipschitz


def test_the_mlp_models_stages_hold_in_l2():
    layer = Linear(8, 6, "g").double()
    _randomized(1, layer)
    for stage, exact in (
        (DenseReLU(layer, relu=True), False),
        (DenseReLU(layer, relu=False), True),
        (Scale(-4.0), True),
    ):
        measured = measure_sensitivity(stage, (8,), "l2", **SEARCH).lower_bound
        bound = 10 ** stage.bound(math.nan, exact_norm).log10_lipschitz
        assert measured <= bound * SLACK
        if exact:
            assert measured >= 0.99 * bound


def test_a_stage_without_a_bound_is_refused_not_skipped():
    block = _gpt().blocks[0]
    block.unbounded = nn.Tanh()
    with pytest.raises(TypeError, match="stage unbounded \\(Tanh\\) has no bound"):
        block.bound(1.0, exact_norm)
