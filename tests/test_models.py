import math

import pytest
import torch

from lipcli.models import (
    BaselineGPT,
    GPTConfig,
    LipschitzGPT,
    LipschitzMLP,
    MLPConfig,
    build_model,
    config_dict,
    config_from_dict,
)
from lipcli.nn import GELU_MAX_SLOPE, Residual
from lipcli.spectral import rms_norm_exact

CFG = GPTConfig(vocab_size=11, d_model=24, n_layers=2, n_heads=3, context=12)


def _exact(w: torch.Tensor) -> torch.Tensor:
    return rms_norm_exact(w)


def _largest(w: torch.Tensor) -> float:
    return float(rms_norm_exact(w).max())


@pytest.mark.parametrize("cls", [LipschitzGPT, BaselineGPT])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpts_run_under_fp32_and_bf16_autocast(cls, dtype):
    model = cls(CFG)
    tokens = torch.randint(0, 11, (2, 12))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(tokens)
    assert logits.shape == (2, 12, 11)
    assert torch.isfinite(logits.float()).all()


def test_attention_is_causal():
    model = LipschitzGPT(GPTConfig(**{**CFG.__dict__, "zero_init": False}))
    tokens = torch.randint(0, 11, (1, 12))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 11
    torch.testing.assert_close(model(tokens)[0, :-1], model(changed)[0, :-1])


def test_same_seed_same_weights_different_seed_different_weights():
    a, b = LipschitzGPT(CFG), LipschitzGPT(CFG)
    c = LipschitzGPT(GPTConfig(**{**CFG.__dict__, "seed": 1}))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb)
        if "embed" in name or "q." in name:
            assert not torch.equal(pa, pc)


def test_init_is_within_unit_caps():
    model = LipschitzGPT(CFG)
    for name, p in model.named_parameters():
        if name.startswith("embed"):
            torch.testing.assert_close(p.pow(2).mean(dim=-1).sqrt(), torch.ones(11))
        else:
            assert _largest(p) <= 1 + 1e-5


def test_config_round_trip_and_unknown_fields():
    model = build_model("lipschitz-gpt", config_dict(LipschitzGPT(CFG)))
    assert model.config == CFG
    with pytest.raises(ValueError, match="d_modle"):
        config_from_dict("lipschitz-gpt", {"d_modle": 3})
    with pytest.raises(ValueError, match="unknown architecture"):
        config_from_dict("resnet", {})


def test_mlp_forward_and_bound_is_product_of_spectral_norms():
    model = LipschitzMLP(MLPConfig(input_dim=8, hidden=16, n_layers=3, num_classes=4, final_scale=2.0))
    assert model(torch.rand(5, 8)).shape == (5, 4)
    rows = model.bound(_exact)
    log_total = sum(b.log10_lipschitz for _, b in rows)
    product = 2.0 * math.prod(float(torch.linalg.svdvals(layer.weight.double())[0]) for layer in model.layers)
    assert log_total == pytest.approx(math.log10(product), rel=1e-9)


def test_residual_bound_with_linear_inner_is_exact():
    """(1 - a) x + a f(x) with f the identity is the identity: both bounds are exactly 1 and in_norm."""

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

        def bound(self, in_norm, norm_of, tight=False):
            from lipcli.nn import Bound

            return Bound(0.0, in_norm)

    res = Residual(Identity(), a=0.25)
    b = res.bound(2.0, _exact)
    assert b.log10_lipschitz == pytest.approx(0.0, abs=1e-12) and b.out_norm == pytest.approx(2.0)


def test_gpt_bound_rows_follow_the_papers_formula():
    model = LipschitzGPT(GPTConfig(**{**CFG.__dict__, "zero_init": False, "softmax_scale": 2.0, "final_scale": 3.0}))
    rows = dict(model.bound(_exact))
    a = 1.0 / (2 * CFG.n_layers)
    attn = model.blocks[0].attn.inner
    nq, nk, nv, no = (_largest(m.weight) for m in (attn.q, attn.k, attn.v, attn.o))
    r = model.embed.max_row_rms()
    l_att = no / 3 * (nv + 2 * nv * r**2 * nq * nk * 2.0)
    assert rows["block0.attn"].log10_lipschitz == pytest.approx(math.log10(1 - a + a * l_att))
    assert rows["block0.attn"].out_norm == pytest.approx((1 - a) * r + a * no * nv / 3 * r)
    mlp = model.blocks[0].mlp.inner
    n_in, n_out = _largest(mlp.fc_in.weight), _largest(mlp.fc_out.weight)
    r1 = rows["block0.attn"].out_norm
    assert rows["block0.mlp"].out_norm == pytest.approx((1 - a) * r1 + a * n_in * n_out / GELU_MAX_SLOPE * r1)
    assert rows["head"].log10_lipschitz == pytest.approx(math.log10(3.0 * _largest(model.head.weight)))
