import math
import re
from dataclasses import replace

import pytest
import torch

from lipcli.attention import ATTENTION_OUT_FACTOR, Attention
from lipcli.errors import UserError
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
from lipcli.optim import optimizer_groups
from lipcli.presets import load_preset
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


@pytest.mark.parametrize("position_bias", [False, True])
def test_attention_is_causal(position_bias):
    model = LipschitzGPT(GPTConfig(**{**CFG.__dict__, "zero_init": False, "position_bias": position_bias}))
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
            from lipcli.bounds import Bound

            return Bound(0.0, in_norm)

    res = Residual(Identity(), a=0.25)
    b = res.bound(2.0, _exact)
    assert b.log10_lipschitz == pytest.approx(0.0, abs=1e-12) and b.out_norm == pytest.approx(2.0)


def test_gpt_bound_rows_follow_the_papers_formula():
    changes = {"zero_init": False, "softmax_scale": 2.0, "final_scale": 3.0, "attn_out_scale": 0.5, "mlp_gain": 3.0}
    model = LipschitzGPT(GPTConfig(**{**CFG.__dict__, **changes}))
    rows = dict(model.bound(_exact))
    a = 1.0 / (2 * CFG.n_layers)
    attn = model.blocks[0].attn.inner
    nq, nk, nv, no = (_largest(m.weight) for m in (attn.q, attn.k, attn.v, attn.o))
    r = model.domain().radius  # the certified domain: RMS <= max(1, largest embedding row), rounded up
    l_att = no * 0.5 * (nv + 2 * nv * r**2 * nq * nk * 2.0)
    assert rows["block0.attn"].log10_lipschitz == pytest.approx(math.log10(1 - a + a * l_att))
    assert rows["block0.attn"].out_norm == pytest.approx((1 - a) * r + a * no * nv * 0.5 * r)
    mlp = model.blocks[0].mlp.inner
    n_in, n_out = _largest(mlp.fc_in.weight), _largest(mlp.fc_out.weight)
    r1 = rows["block0.attn"].out_norm
    assert rows["block0.mlp"].out_norm == pytest.approx((1 - a) * r1 + a * n_in * n_out / GELU_MAX_SLOPE * r1)
    assert rows["head"].log10_lipschitz == pytest.approx(math.log10(3.0 * _largest(model.head.weight)))


def test_position_bias_attention_is_softmax_of_scaled_scores_plus_offset_bias():
    """Against the definition: p_ts = softmax_s(scale q_t.k_s + b[h, t - s]) over s <= t."""
    gen = torch.Generator().manual_seed(0)
    attn = Attention(d_model=12, n_heads=3, softmax_scale=5.0, zero_init=False, position_context=8)
    for module in (attn.q, attn.k, attn.v, attn.o):
        module.reset_parameters(gen)
    with torch.no_grad():
        attn.position_bias.weight.copy_(torch.randn(3, 8, generator=gen) * 4)
    x = torch.randn(2, 7, 12, generator=gen)
    q, k, v = attn.rotary(attn.q(x)), attn.rotary(attn.k(x)), attn.v(x)
    scores = torch.einsum("bhte,bhse->bhts", q, k) * 5.0 / 4
    bias = attn.position_bias.weight.detach()
    expected_logits = torch.full((2, 3, 7, 7), -math.inf)
    for t in range(7):
        for s in range(t + 1):
            expected_logits[:, :, t, s] = scores[:, :, t, s] + bias[:, t - s]
    y = (expected_logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(2, 7, 12)
    torch.testing.assert_close(attn.logits(x), expected_logits)
    torch.testing.assert_close(attn(x), attn.o(y * ATTENTION_OUT_FACTOR))
    with pytest.raises(ValueError, match="longer than the position bias"):
        attn(torch.randn(1, 9, 12))


def test_position_bias_starts_local_and_is_a_free_group():
    model = LipschitzGPT(GPTConfig(**{**CFG.__dict__, "position_bias": True}))
    bias = model.blocks[0].attn.inner.position_bias.weight
    assert bias.shape == (CFG.n_heads, CFG.context)
    assert bool((bias[:, 1:] < bias[:, :-1]).all())  # every head prefers nearer tokens at init
    kinds = {d.group: d.kind for d in model.declared_parameters()}
    assert kinds["attn_pos"] == "free" and kinds["embed"] == "embed" and kinds["attn_qk"] == "matrix"


def test_mlp_gain_moves_the_gelu_operating_point_and_cancels_in_the_bound():
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0))
    plain = LipschitzGPT(GPTConfig(**{**CFG.__dict__, "zero_init": False}))
    gained = LipschitzGPT(GPTConfig(**{**CFG.__dict__, "zero_init": False, "mlp_gain": 4.0}))
    mlp = gained.blocks[0].mlp.inner
    expected = mlp.fc_out(torch.nn.functional.gelu(4.0 * mlp.fc_in(x)) / (4.0 * GELU_MAX_SLOPE))
    torch.testing.assert_close(mlp(x), expected)
    assert not torch.allclose(mlp(x), plain.blocks[0].mlp.inner(x))  # same weights, another nonlinearity
    assert [b.log10_lipschitz for _, b in gained.bound(_exact)] == [b.log10_lipschitz for _, b in plain.bound(_exact)]


def test_biases_leave_the_lipschitz_bound_and_enter_the_output_norm_bound():
    config = {**CFG.__dict__, "zero_init": False, "mlp_gain": 4.0}
    plain, biased = LipschitzGPT(GPTConfig(**config)), LipschitzGPT(GPTConfig(**{**config, "bias": True}))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in biased.named_parameters():
            if name.endswith("bias_in.weight") or name.endswith("bias_out.weight") or name == "logit_bias.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * 3)
    x = torch.randn(4, 6, 24, generator=gen)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # every token at RMS 1
    mlp = biased.blocks[0].mlp.inner
    assert mlp.bias_in is not None and mlp.bias_out is not None
    h = mlp.bias_in.weight + mlp.fc_in(x)
    expected = mlp.fc_out(torch.nn.functional.gelu(4.0 * h) / (4.0 * GELU_MAX_SLOPE)) + mlp.bias_out.weight
    torch.testing.assert_close(mlp(x), expected)
    rows, plain_rows = dict(biased.bound(_exact)), dict(plain.bound(_exact))
    for name in ("block0.mlp", "block1.mlp", "head"):  # a bias moves no Jacobian
        assert rows[name].log10_lipschitz == plain_rows[name].log10_lipschitz
    # ...but it grows the stream, which the next attention's query/key term pays for.
    assert rows["block1.attn"].log10_lipschitz > plain_rows["block1.attn"].log10_lipschitz
    # The output-norm bound must hold: biases of RMS 3 dominate what the weights alone allow.
    out_rms = float(mlp(x).pow(2).mean(-1).sqrt().max())
    assert out_rms <= mlp.bound(1.0, _exact).out_norm
    assert out_rms > plain.blocks[0].mlp.inner.bound(1.0, _exact).out_norm
    kinds = {d.group: d.kind for d in biased.declared_parameters()}
    assert kinds["mlp_bias"] == "free" and kinds["head_bias"] == "free"
    logits = biased.forward_embeddings(x)
    assert biased.logit_bias is not None
    without = logits - biased.logit_bias.weight
    torch.testing.assert_close(without, biased.config.final_scale * biased.head(_stream(biased, x)))


@pytest.mark.parametrize("group", [2, 3])
def test_groupsort_sorts_unit_groups_keeps_norms_and_its_output_bound_holds(group):
    from lipcli.nn import MLP

    mlp = MLP(8, 6, zero_init=False, activation="groupsort", group_size=group)
    h = torch.tensor([[3.0, -1.0, 0.5, 2.0, -4.0, -5.0]])
    expected = {2: [-1.0, 3.0, 0.5, 2.0, -5.0, -4.0], 3: [-1.0, 0.5, 3.0, -5.0, -4.0, 2.0]}[group]
    torch.testing.assert_close(mlp.activate(h), torch.tensor([expected]))
    z = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mlp.activate(z).norm(dim=-1), z.norm(dim=-1))  # a permutation per token
    # 1-Lipschitz in L2 per token, checked on random pairs.
    w = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(1))
    assert bool(((mlp.activate(z) - mlp.activate(w)).norm(dim=-1) <= (z - w).norm(dim=-1) + 1e-6).all())
    config = {**CFG.__dict__, "zero_init": False, "activation": "groupsort", "group_size": group}
    model = LipschitzGPT(GPTConfig(**config))
    block_mlp = model.blocks[0].mlp.inner
    x = torch.randn(4, 6, 24, generator=torch.Generator().manual_seed(2))
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    out_rms = float(block_mlp(x).pow(2).mean(-1).sqrt().max())
    bound = block_mlp.bound(1.0, _exact)
    assert out_rms <= bound.out_norm
    assert bound.log10_lipschitz == pytest.approx(
        math.log10(_largest(block_mlp.fc_in.weight) * _largest(block_mlp.fc_out.weight))
    )
    # Identity weights attain the output bound exactly: nothing is lost to the activation.
    square = MLP(6, 6, zero_init=False, activation="groupsort", group_size=group)
    with torch.no_grad():
        square.fc_in.weight.copy_(torch.eye(6))
        square.fc_out.weight.copy_(torch.eye(6))
    tokens = z / z.pow(2).mean(-1, keepdim=True).sqrt()
    assert float(square(tokens).pow(2).mean(-1).sqrt().max()) == pytest.approx(square.bound(1.0, _exact).out_norm)
    with pytest.raises(ValueError, match="divide the MLP width 5"):
        MLP(8, 5, zero_init=False, activation="groupsort", group_size=group)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        MLP(8, 6, zero_init=False, activation="relu")


def _stream(model: LipschitzGPT, x: torch.Tensor) -> torch.Tensor:
    for block in model.blocks:
        x = block(x)
    return x


def test_a_residual_without_its_skip_path_is_rejected():
    with pytest.raises(ValueError, match="lower model.residual_scale below 2"):
        LipschitzGPT(GPTConfig(**{**CFG.__dict__, "n_layers": 1, "residual_scale": 2.0}))


def test_tight_value_path_uses_each_heads_joint_norm_of_o_and_v():
    model = LipschitzGPT(GPTConfig(**{**CFG.__dict__, "zero_init": False})).double()
    attn = model.blocks[0].attn.inner
    h, d_h = attn.n_heads, attn.head_dim
    with torch.no_grad():
        attn.o.weight[:, d_h:] *= 0.01  # heads 1.. nearly silent: the per-head (joint) term is the smaller one
    o, v = attn.o.weight.detach(), attn.v.weight.detach()
    joint = sum(float(torch.linalg.svdvals(o[:, i * d_h : (i + 1) * d_h] @ v[i])[0]) for i in range(h))
    stacked = float(torch.linalg.svdvals(o)[0]) * math.sqrt(
        sum(float(torch.linalg.svdvals(v[i])[0]) ** 2 for i in range(h))
    )
    bound = attn.bound(1.0, lambda w: rms_norm_exact(w, dtype=torch.float64), tight=True)
    assert joint < stacked
    assert bound.terms["value_path"] == pytest.approx(ATTENTION_OUT_FACTOR * joint, rel=1e-9)


def test_content_free_attention_is_the_bias_softmax_applied_to_the_values_and_has_no_q_k():
    gen = torch.Generator().manual_seed(0)
    attn = Attention(d_model=12, n_heads=3, softmax_scale=0.0, zero_init=False, position_context=8)
    for module in (attn.v, attn.o, attn.position_bias):
        module.reset_parameters(gen)
    x = torch.randn(2, 7, 12, generator=gen)
    v = attn.v(x)
    pattern = attn.logits(x).softmax(dim=-1)
    y = (pattern @ v).transpose(1, 2).reshape(2, 7, 12)
    torch.testing.assert_close(attn(x), attn.o(y * ATTENTION_OUT_FACTOR))
    assert attn.q is None and attn.k is None and attn.content_free


@pytest.mark.parametrize("position_context", [0, 8])
def test_mixed_heads_read_content_in_the_first_heads_and_position_in_the_rest(position_context):
    """Content heads: softmax(s q.k / d_h + bias) V; position heads: softmax(bias) V, whatever the input."""
    gen = torch.Generator().manual_seed(0)
    attn = Attention(12, 3, 4.0, zero_init=False, position_context=position_context, content_heads=1).double()
    for module in (attn.q, attn.k, attn.v, attn.o, attn.position_bias):
        if module is not None:
            module.reset_parameters(gen)
    assert attn.q.weight.shape == (1, 4, 12) and attn.v.weight.shape == (3, 4, 12)
    x = torch.randn(2, 7, 12, generator=gen, dtype=torch.float64)
    q, k = attn.rotary(attn.q(x)), attn.rotary(attn.k(x))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    offset = torch.arange(7)[:, None] - torch.arange(7)[None, :]
    learned = attn.position_bias.weight.detach()[:, offset.clamp_min(0)] if position_context else torch.zeros(3, 7, 7)
    bias = learned.double().masked_fill(~causal, -math.inf)
    content = (4.0 * q @ k.mT / 4 + bias[:1]).softmax(dim=-1)
    pattern = torch.cat((content, bias[1:].softmax(dim=-1).expand(2, 2, 7, 7)), dim=1)
    torch.testing.assert_close(attn.logits(x).softmax(dim=-1), pattern)
    y = (pattern @ attn.v(x)).transpose(1, 2).reshape(2, 7, 12)
    torch.testing.assert_close(attn(x), attn.o(y * ATTENTION_OUT_FACTOR))
    other = x.clone()
    other[:, :-1] = torch.randn(2, 6, 12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(attn.logits(other)[:, 1:], attn.logits(x)[:, 1:])  # position heads ignore content


@pytest.mark.parametrize("content_bias", ["alibi", "none"])
def test_content_heads_take_a_fixed_position_bias_and_only_position_heads_learn_one(content_bias):
    """alibi: content logits s q.k / d_h - slope_h (t - s), ALiBi's slopes; none: q.k alone. Same bound as learned."""
    gen = torch.Generator().manual_seed(0)
    attn = Attention(12, 3, 4.0, False, position_context=8, content_heads=1, content_bias=content_bias).double()
    for module in (attn.q, attn.k, attn.v, attn.o, attn.position_bias):
        module.reset_parameters(gen)
    with torch.no_grad():
        attn.position_bias.weight.copy_(torch.randn(2, 8, generator=gen, dtype=torch.float64) * 4)
    assert attn.position_bias.weight.shape == (2, 8)  # the position heads' rows only
    assert "content_slopes" not in attn.state_dict()  # fixed by the config, not stored
    x = torch.randn(2, 7, 12, generator=gen, dtype=torch.float64)
    q, k = attn.rotary(attn.q(x)), attn.rotary(attn.k(x))
    offset = (torch.arange(7)[:, None] - torch.arange(7)[None, :]).double()
    fixed = -(2.0 ** (-8.0 / 3)) * offset if content_bias == "alibi" else torch.zeros(7, 7, dtype=torch.float64)
    learned = attn.position_bias.weight.detach()[:, offset.clamp_min(0).long()]
    bias = torch.cat((fixed[None], learned)).masked_fill(offset < 0, -math.inf)
    pattern = torch.cat(
        ((4.0 * q @ k.mT / 4 + bias[:1]).softmax(dim=-1), bias[1:].softmax(dim=-1).expand(2, 2, 7, 7)), 1
    )
    torch.testing.assert_close(attn.logits(x).softmax(dim=-1), pattern)
    y = (pattern @ attn.v(x)).transpose(1, 2).reshape(2, 7, 12)
    torch.testing.assert_close(attn(x), attn.o(y * ATTENTION_OUT_FACTOR))
    shared = Attention(12, 3, 4.0, False, position_context=8, content_heads=1).double()
    shared.load_state_dict({**attn.state_dict(), "position_bias.weight": torch.zeros(3, 8)})
    norm = lambda w: rms_norm_exact(w, dtype=torch.float64)  # noqa: E731
    assert attn.bound(1.3, norm, tight=True) == shared.bound(1.3, norm, tight=True)  # biases are free in the bound


def test_a_limited_content_bias_stays_within_its_limit_and_leaves_position_heads_alone():
    """content_bias_limit L: the content heads' learned bias is L tanh(w / L); the position heads' is w itself."""
    gen = torch.Generator().manual_seed(0)
    attn = Attention(12, 3, 4.0, False, position_context=8, content_heads=2, content_bias_limit=2.0).double()
    for module in (attn.q, attn.k, attn.v, attn.o, attn.position_bias):
        module.reset_parameters(gen)
    with torch.no_grad():
        attn.position_bias.weight.copy_(torch.randn(3, 8, generator=gen, dtype=torch.float64) * 8)
    x = torch.randn(2, 7, 12, generator=gen, dtype=torch.float64)
    q, k = attn.rotary(attn.q(x)), attn.rotary(attn.k(x))
    offset = torch.arange(7)[:, None] - torch.arange(7)[None, :]
    w = attn.position_bias.weight.detach()[:, offset.clamp_min(0)]
    bias = torch.cat((2.0 * torch.tanh(w[:2] / 2.0), w[2:])).masked_fill(offset < 0, -math.inf)
    assert bias[:2][offset.expand(2, 7, 7) >= 0].abs().max() <= 2.0 < bias[2][offset >= 0].abs().max()
    content = (4.0 * q @ k.mT / 4 + bias[:2]).softmax(dim=-1)
    pattern = torch.cat((content, bias[2:].softmax(dim=-1).expand(2, 1, 7, 7)), dim=1)
    torch.testing.assert_close(attn.logits(x).softmax(dim=-1), pattern)
    y = (pattern @ attn.v(x)).transpose(1, 2).reshape(2, 7, 12)
    torch.testing.assert_close(attn(x), attn.o(y * ATTENTION_OUT_FACTOR))
    unlimited = Attention(12, 3, 4.0, False, position_context=8, content_heads=2).double()
    unlimited.load_state_dict(attn.state_dict())
    assert not torch.allclose(unlimited.logits(x), attn.logits(x))
    norm = lambda w: rms_norm_exact(w, dtype=torch.float64)  # noqa: E731
    assert attn.bound(1.3, norm, tight=True) == unlimited.bound(1.3, norm, tight=True)  # free in the bound


@pytest.mark.parametrize(
    ("changes", "words"),
    [({"content_bias_limit": 2.0}, "needs model.position_bias = true"),
     ({"content_bias_limit": 2.0, "position_bias": True, "content_bias": "alibi"}, "needs model.position_bias"),
     ({"content_bias_limit": 0.0, "position_bias": True}, "must lie in (0, 1e+06]"),
     ({"content_bias_limit": -3.0, "position_bias": True}, "must lie in (0, 1e+06]")],
)  # fmt: skip
def test_content_bias_limit_is_refused_where_it_means_nothing_or_is_out_of_range(changes, words):
    with pytest.raises(UserError, match=re.escape(words)):
        build_model("lipschitz-gpt", {**CFG.__dict__, **changes})


def test_only_content_heads_pay_the_query_key_term():
    def bound(content_heads: int):
        attn = Attention(16, 4, 8.0, zero_init=False, position_context=8, content_heads=content_heads).double()
        gen = torch.Generator().manual_seed(0)
        for module in (attn.q, attn.k, attn.v, attn.o, attn.position_bias):
            if module is not None:
                module.reset_parameters(gen)
        return attn.bound(1.0, lambda w: rms_norm_exact(w, dtype=torch.float64), tight=True).terms

    all_heads, one, none = bound(4), bound(1), bound(0)
    assert none["qk_path"] == 0.0 and one["qk_path"] > 0.0
    assert one["qk_path"] <= all_heads["qk_path"] / 1.9  # 1 of 4 heads: sqrt(4) = 2x less, at orthogonal init
    assert one["value_path"] == pytest.approx(all_heads["value_path"], rel=0.5)


def test_only_the_last_content_layers_read_content():
    config = GPTConfig(vocab_size=9, d_model=16, n_layers=3, n_heads=4, context=8, softmax_scale=8.0,
                       content_heads=1, content_layers=1, position_bias=True, zero_init=False)  # fmt: skip
    model = LipschitzGPT(config).double()
    assert [block.attn.inner.content_heads for block in model.blocks] == [0, 0, 1]
    rows = dict(model.bound(lambda w: rms_norm_exact(w, dtype=torch.float64), tight=True))
    assert rows["block0.attn"].terms["qk_path"] == rows["block1.attn"].terms["qk_path"] == 0.0
    assert rows["block2.attn"].terms["qk_path"] > 0.0
    every = LipschitzGPT(replace(config, content_layers=None)).double()
    assert [block.attn.inner.content_heads for block in every.blocks] == [1, 1, 1]


def test_baseline_predictions_depend_on_the_order_of_the_context():
    """One causal layer without positions sees earlier tokens as a set: swapping two leaves the last output alone."""
    model = BaselineGPT(GPTConfig(vocab_size=11, d_model=24, n_layers=1, n_heads=3, context=12)).double()
    with torch.no_grad():  # sharper attention than at init, so order (if seen at all) moves the output clearly
        model.blocks[0].attn.q.weight.mul_(30.0)
        model.blocks[0].attn.k.weight.mul_(30.0)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    swapped = tokens[:, [1, 0, 2, 3, 4, 5, 6]]
    with torch.no_grad():
        last, last_swapped = model(tokens)[0, -1], model(swapped)[0, -1]
    assert (last - last_swapped).abs().max() > 1e-3 * last.abs().max()


def test_baseline_init_is_gpt2s_and_its_groups_cover_every_parameter_once():
    model = BaselineGPT(GPTConfig(vocab_size=11, d_model=64, n_layers=4, n_heads=4, context=12))
    std = {name: float(p.std()) for name, p in model.named_parameters() if p.dim() == 2}
    assert std["embed.weight"] == pytest.approx(0.02, rel=0.2) and std["head.weight"] == pytest.approx(0.02, rel=0.2)
    assert std["blocks.0.attn.q.weight"] == pytest.approx(0.02, rel=0.1)
    for name in ("blocks.0.attn.o.weight", "blocks.3.fc_out.weight"):
        assert std[name] == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    groups = optimizer_groups(model.declared_parameters(), 1.0, {}, {"head": 0.5})
    assert {g.name: g.kind for g in groups} == {"hidden": "matrix", "embed": "edge", "head": "edge", "norm": "gain"}
    assert sorted(id(p) for g in groups for p in g.params) == sorted(id(p) for p in model.parameters())
    assert next(g for g in groups if g.name == "head").lr_mult == 0.5


def test_the_default_presets_last_attention_reads_content_and_the_others_position():
    """Issue 17: the default is a transformer. Its attention pattern depends on the input in the last layer only."""
    preset = load_preset("shakespeare-cpu")
    small = {"vocab_size": 11, "d_model": 32, "context": 8, "zero_init": False}
    model = build_model(preset.arch, {**preset.model, **small})
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, 8, 32, generator=gen) for _ in range(2))
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            moved = not torch.allclose(block.attn.inner.logits(a), block.attn.inner.logits(b))
            assert moved == (i == len(model.blocks) - 1), f"block {i}"
