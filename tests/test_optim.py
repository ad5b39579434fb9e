import pytest
import torch
import torch.nn.functional as F

from lipcli.errors import UserError
from lipcli.models import GPTConfig, LipschitzGPT, LipschitzMLP, MLPConfig
from lipcli.nn import Declared
from lipcli.optim import Muon, build_optimizer, check_method, group_names, mass_lr_mult, optimizer_groups, param_groups
from lipcli.spectral import MUON_COEFFS, max_gain, rms_norm_exact, rms_scale


def _tiny_gpt(seed: int = 0) -> LipschitzGPT:
    return LipschitzGPT(GPTConfig(vocab_size=13, d_model=32, n_layers=2, n_heads=2, context=16, seed=seed))


def _groups(model, sigma_max: float, caps: dict | None = None, lr_mult: dict | None = None):
    return optimizer_groups(model.declared_parameters(), sigma_max, caps or {}, lr_mult or {})


def _lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64)])
def test_muon_update_has_promised_rms_norm(shape):
    """One step from zero momentum: W moves by lr * msign(g) * sqrt(fan_out / fan_in)."""
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = Muon([{"params": [p], "method": "none"}], lr=0.1, momentum=0.0, nesterov=False)
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    opt.step()
    step_norm = float(rms_norm_exact(p))
    assert 0.1 * 0.6 < step_norm <= 0.1 * max_gain(MUON_COEFFS) * (1 + 1e-4)
    # All singular values of the step are O(1): an orthogonalized update, not the raw gradient.
    s = torch.linalg.svdvals(p.detach().double()) / rms_scale(p)
    assert float(s.min()) > 0.1 * 0.5


def test_muon_direction_matches_torch_muon():
    """Same momentum, Nesterov and Newton-Schulz as torch.optim.Muon; only the lr scaling differs."""
    shape = (48, 24)
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(3)]
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    opt_ours = Muon([{"params": [ours], "method": "none"}], lr=0.01)
    opt_theirs = torch.optim.Muon([theirs], lr=0.01, weight_decay=0.0)
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        before_ours, before_theirs = ours.detach().clone(), theirs.detach().clone()
        opt_ours.step()
        opt_theirs.step()
        d_ours = (ours.detach() - before_ours).flatten()
        d_theirs = (theirs.detach() - before_theirs).flatten()
        # torch computes Newton-Schulz in bf16: the directions agree to bf16 precision.
        assert float(F.cosine_similarity(d_ours, d_theirs, dim=0)) > 0.99


@pytest.mark.parametrize("method", ["softcap", "hardcap", "svd", "normalize"])
def test_training_lowers_loss_and_keeps_every_matrix_capped(method):
    torch.manual_seed(0)
    model = _tiny_gpt()
    sigma_max = 1.0
    opt = build_optimizer("muon", _groups(model, sigma_max), lr=0.05, method=method, wd=0.0)
    tokens = torch.randint(0, 13, (8, 17), generator=torch.Generator().manual_seed(3))
    first = None
    for _ in range(20):
        loss = _lm_loss(model, tokens)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        for name, p in model.named_parameters():
            if name.startswith("embed"):
                rms = p.detach().pow(2).mean(dim=-1).sqrt()
                assert float(rms.max()) <= 1.0 + 1e-5, name
            else:
                assert float(rms_norm_exact(p).max()) <= sigma_max * (1 + 1e-3), (method, name)
    assert float(_lm_loss(model, tokens)) < first - 0.2


def test_per_group_caps_and_lr_multipliers_reach_the_optimizer():
    model = _tiny_gpt()
    groups = _groups(model, 1.0, {"head": 4.0}, {"embed": 0.5})
    opt = build_optimizer("muon", groups, lr=0.1, method="softcap", wd=0.0)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["head"]["sigma_max"] == 4.0 and by_name["attn_qk"]["sigma_max"] == 1.0
    assert by_name["embed"]["lr"] == pytest.approx(0.05) and by_name["mlp_in"]["lr"] == pytest.approx(0.1)
    assert by_name["embed"]["method"] == "none" and by_name["embed"]["sigma_max"] == 1.0  # not sigma_max's


def test_embedding_row_cap_is_a_named_group_cap():
    model = _tiny_gpt()
    opt = build_optimizer("muon", _groups(model, 2.0, {"embed": 0.5}, {}), lr=0.1, method="softcap", wd=0.0)
    loss = _lm_loss(model, torch.randint(0, 13, (4, 9), generator=torch.Generator().manual_seed(0)))
    loss.backward()
    opt.step()
    rows = model.embed.weight.detach().pow(2).mean(dim=-1).sqrt()
    assert float(rows.max()) == pytest.approx(0.5, rel=1e-5)


def test_spec_wd_replaces_decoupled_decay():
    model = _tiny_gpt()
    groups = param_groups(_groups(model, 1.0), lr=0.1, method="spec-wd", wd=0.3)
    matrix = next(g for g in groups if g["name"] == "mlp_in")
    assert matrix["weight_decay"] == 0.0 and matrix["spectral_decay"] == 0.3


def test_adamw_with_constraint_caps_after_each_step():
    model = _tiny_gpt()
    opt = build_optimizer("adamw", _groups(model, 0.5), lr=1e-2, method="hardcap", wd=0.0)
    tokens = torch.randint(0, 13, (4, 17), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        opt.zero_grad()
        _lm_loss(model, tokens).backward()
        opt.step()
    assert max(
        float(rms_norm_exact(p).max()) for n, p in model.named_parameters() if not n.startswith("embed")
    ) <= 0.5 * (1 + 1e-3)


@pytest.mark.parametrize(
    ("optimizer", "method", "reason"),
    [("adamw", "softcap", "only Muon"), ("muon", "hammer", "full-rank"), ("sgd", "none", "unknown optimizer")],
)
def test_pairs_the_optimizer_cannot_honour_are_rejected(optimizer, method, reason):
    with pytest.raises(ValueError, match=reason):
        check_method(optimizer, method)


def test_identical_seeds_give_identical_training():
    def run() -> torch.Tensor:
        model = _tiny_gpt(seed=7)
        opt = build_optimizer("muon", _groups(model, 1.0), lr=0.05, method="softcap", wd=0.0)
        tokens = torch.randint(0, 13, (4, 17), generator=torch.Generator().manual_seed(5))
        for _ in range(3):
            opt.zero_grad()
            _lm_loss(model, tokens).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(), run())


def test_muon_trains_position_biases_without_capping_them():
    model = LipschitzGPT(GPTConfig(vocab_size=13, d_model=32, n_layers=2, n_heads=2, context=16, position_bias=True))
    opt = build_optimizer("muon", _groups(model, 1.0), lr=0.5, method="softcap", wd=0.0)
    bias = model.blocks[0].attn.inner.position_bias.weight
    before = bias.detach().clone()
    tokens = torch.randint(0, 13, (8, 17), generator=torch.Generator().manual_seed(3))
    for _ in range(10):
        loss = _lm_loss(model, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = (bias.detach() - before).pow(2).mean(dim=-1).sqrt()
    assert bool((moved > 0.1).all())  # each head's row took real steps
    assert float(torch.linalg.svdvals(bias.detach())[0]) > 1.0  # and no spectral cap was applied to it
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed" not in name and "position_bias" not in name:
            assert float(rms_norm_exact(p).max()) <= 1.0 + 1e-3, name


def test_embed_inflation_limits_how_far_a_rare_tokens_step_is_scaled_up():
    model = _tiny_gpt()
    opt = build_optimizer("muon", _groups(model, 1.0), lr=0.1, method="softcap", wd=0.0, embed_inflation=2.0)
    embed_group = next(g for g in opt.param_groups if g["name"] == "embed")
    grad = torch.ones(13, 32)
    grad[0] *= 1e-6  # a token that barely occurs
    rows = opt.direction(grad, embed_group).pow(2).mean(dim=-1).sqrt()
    assert float(rows[1:].min()) == pytest.approx(1.0) and float(rows[0]) == pytest.approx(2.0 * 1e-6, rel=1e-3)


def test_muon_adamw_splits_hidden_matrices_from_the_rest_and_decays_no_gain():
    from lipcli.models import BaselineGPT
    from lipcli.optim import ConstrainedAdamW, MuonWithAdamW

    model = BaselineGPT(GPTConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, context=8))
    optimizer = build_optimizer("muon-adamw", _groups(model, 1.0), 0.05, "none", 0.1, adamw_lr=3e-3)
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(optimizer.adamw, ConstrainedAdamW)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert [g["name"] for g in optimizer.muon.param_groups] == ["hidden"]
    assert by_name["hidden"]["lr"] == 0.05 and by_name["head"]["lr"] == 3e-3 and by_name["embed"]["lr"] == 3e-3
    assert by_name["norm"]["weight_decay"] == 0.0 and by_name["head"]["weight_decay"] == 0.1
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = torch.randint(0, 11, (2, 8))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    q = model.blocks[0].attn.q.weight
    # Muon's step on a square matrix: RMS->RMS norm lr x the quintic's gain, never AdamW's sign-like step.
    step = float(rms_norm_exact(q.detach() - before["blocks.0.attn.q.weight"]))
    assert 0.05 * 0.6 < step <= 0.05 * max_gain(MUON_COEFFS) * 1.05 + 0.05 * 0.05 * 0.1
    state = optimizer.state_dict()  # one torch-style dict: resume checks it like any optimizer's
    assert sorted(state["state"]) == list(range(sum(1 for _ in model.parameters())))
    again = build_optimizer("muon-adamw", _groups(model, 1.0), 0.05, "none", 0.1, adamw_lr=3e-3)
    again.load_state_dict(state)
    for a, b in ((again.muon, optimizer.muon), (again.adamw, optimizer.adamw)):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and all(sa[i].keys() == sb[i].keys() for i in sa)
        assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i])


def test_unknown_parameter_kinds_are_rejected():
    from lipcli.optim import Group

    with pytest.raises(ValueError, match="unknown parameter kind"):
        Group("x", [], "matrices")


def test_groups_cover_every_parameter_once_and_unknown_names_are_refused_with_the_real_ones():
    model = LipschitzGPT(GPTConfig(vocab_size=13, d_model=32, n_layers=2, n_heads=2, context=16, bias=True))
    declared = model.declared_parameters()
    groups = optimizer_groups(declared, 1.0, {}, {})
    assert [g.name for g in groups] == group_names(declared)
    assert sorted(id(p) for g in groups for p in g.params) == sorted(id(p) for p in model.parameters())
    for table in ("caps", "lr_mult"):
        with pytest.raises(UserError) as caught:
            optimizer_groups(declared, 1.0, **{"caps": {}, "lr_mult": {}, table: {"attn_q": 2.0}}, model="gpt")
        assert str(caught.value).startswith(
            f"train.{table}: unknown group 'attn_q'; gpt has groups {', '.join(group_names(declared))} ("
        )


def test_blocks_mass_split_follows_the_declared_roles_as_it_followed_the_group_names():
    m = 16.0
    block, edge = m / (m + 2.0), 1.0 / (m + 2.0)
    gpt = LipschitzGPT(
        GPTConfig(vocab_size=13, d_model=32, n_layers=2, n_heads=2, context=16, position_bias=True, bias=True)
    )
    # The table training.py hard-coded before the split moved to optim: every value, no extra group.
    by_name = {"embed": edge, "head": edge, "attn_qk": block, "attn_v": block,
               "attn_out": block / 3, "mlp_in": block / 3, "mlp_out": block / 3}  # fmt: skip
    assert mass_lr_mult(m, gpt.declared_parameters()) == by_name
    mlp = LipschitzMLP(MLPConfig(n_layers=4))
    assert mass_lr_mult(m, mlp.declared_parameters()) == {"mlp_in": block / 3, "head": edge}
    assert mass_lr_mult(None, gpt.declared_parameters()) == {}
    groups = optimizer_groups(gpt.declared_parameters(), 1.0, {}, {"attn_out": 0.7}, blocks_mass=m)
    mult = {g.name: g.lr_mult for g in groups}
    assert mult["attn_out"] == 0.7 and mult["mlp_in"] == block / 3  # an explicit multiplier wins over the split
    assert mult["attn_pos"] == mult["mlp_bias"] == mult["head_bias"] == 1.0  # no role: outside the split


def test_a_group_is_one_kind_and_one_mass_role():
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="mixes kinds"):
        optimizer_groups([Declared("g", "matrix", a), Declared("g", "free", b)], 1.0, {}, {})
    with pytest.raises(ValueError, match="mixes kinds or mass roles"):
        optimizer_groups([Declared("g", "matrix", a, "block"), Declared("g", "matrix", b)], 1.0, {}, {})
    with pytest.raises(ValueError, match="unknown mass role 'hidden'"):
        optimizer_groups([Declared("g", "matrix", a, "hidden")], 1.0, {}, {})
