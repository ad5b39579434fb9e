import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lipcli import activations
from lipcli.activations import LIMITS, compare, fp8_check, profile
from lipcli.checkpoint import load, save
from lipcli.cli import app
from lipcli.data import CharTokenizer, load_text_splits, resolve_text, val_batches
from lipcli.models import build_model
from lipcli.nn import GELU_MAX_SLOPE

TINY = {"vocab_size": 65, "d_model": 16, "n_layers": 2, "n_heads": 2, "context": 16, "zero_init": False}
TRAIN_CONFIG = {"data": "tinyshakespeare", "tokenizer": "char", "val_fraction": 0.1}
SMALL = {"batches": 2, "batch_size": 4, "device": "cpu"}
runner = CliRunner()


def _save(path, arch, method, scale: dict[str, float] | None = None):
    model = build_model(arch, TINY)
    with torch.no_grad():
        for name, factor in (scale or {}).items():
            model.get_parameter(name).mul_(factor)
    tokenizer = CharTokenizer.from_text(resolve_text()[0]).to_dict()
    save(path, model, train_config={**TRAIN_CONFIG, "method": method}, tokenizer=tokenizer)
    return path


@pytest.fixture
def lipschitz(tmp_path):
    return _save(tmp_path / "softcap.safetensors", "lipschitz-gpt", "softcap")


@pytest.fixture
def baseline(tmp_path):
    # The first MLP's weights blown up far past fp8's range: the unconstrained model's outliers, in miniature.
    return _save(tmp_path / "baseline.safetensors", "baseline-gpt", "none", {"blocks.0.fc_in.weight": 1e7})


def _tokens(batches: int, batch_size: int) -> list[torch.Tensor]:
    tokenizer = CharTokenizer.from_text(resolve_text()[0])
    splits = load_text_splits("tinyshakespeare", tokenizer_obj=tokenizer, val_fraction=0.1)
    return [x for x, _ in val_batches(splits.val, TINY["context"], batch_size, batches)]


def _causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    t = scores.shape[-1]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, -math.inf).softmax(dim=-1)


def _causal_entries(scores: torch.Tensor) -> torch.Tensor:
    t = scores.shape[-1]
    return scores[..., torch.ones(t, t, dtype=torch.bool).tril()]


def _rope(x: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of each position by angle pos / 10000^(2i / d)."""
    d = x.shape[-1]
    # The frequencies in float32, as the model computes them: float64 ones differ by 1e-8 relative.
    inv_freq = (1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(x.dtype)
    angles = torch.arange(x.shape[-2], dtype=x.dtype)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def _heads(z: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, d = z.shape
    return z.view(b, t, n_heads, d // n_heads).transpose(1, 2)


def _lipschitz_forward(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """LipschitzGPT written out step by step from its weights: every site's tensor."""
    c = model.config
    sites = {"embed": model.embed.weight[tokens]}
    x = sites["embed"]
    b, t, d = x.shape
    for i, block in enumerate(model.blocks):
        p, attn, mlp, a = f"block{i}.", block.attn.inner, block.mlp.inner, block.attn.a
        q, k, v = (x @ m.weight.reshape(d, d).T for m in (attn.q, attn.k, attn.v))
        sites |= {p + "q": _heads(q, c.n_heads), p + "k": _heads(k, c.n_heads), p + "v": _heads(v, c.n_heads)}
        scores = _rope(sites[p + "q"]) @ _rope(sites[p + "k"]).mT * c.softmax_scale / (d // c.n_heads)
        y = (_causal_softmax(scores) @ sites[p + "v"]).transpose(1, 2).reshape(b, t, d)
        sites[p + "attn_logits"] = _causal_entries(scores)
        sites[p + "attn_out"] = (y / 3.0) @ attn.o.weight.T
        x = (1 - a) * x + a * sites[p + "attn_out"]
        sites[p + "mlp_pre"] = x @ mlp.fc_in.weight.T
        sites[p + "mlp_post"] = F.gelu(sites[p + "mlp_pre"]) / GELU_MAX_SLOPE
        x = (1 - a) * x + a * (sites[p + "mlp_post"] @ mlp.fc_out.weight.T)
        sites[p + "residual"] = x
    sites["logits"] = c.final_scale * x @ model.head.weight.T
    return sites


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * (x.pow(2).mean(dim=-1, keepdim=True) + torch.finfo(x.dtype).eps).rsqrt() * weight


def _baseline_forward(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """BaselineGPT written out step by step from its weights: every site's tensor."""
    n_heads = model.config.n_heads
    sites = {"embed": model.embed.weight[tokens]}
    x = sites["embed"]
    b, t, d = x.shape
    for i, block in enumerate(model.blocks):
        p, attn = f"block{i}.", block.attn
        h = _rms_norm(x, block.norm1.weight)
        for name in ("q", "k", "v"):
            sites[p + name] = h @ getattr(attn, name).weight.T
        q, k = (_rope(_heads(sites[p + n], n_heads)) for n in ("q", "k"))
        scores = q @ k.mT / math.sqrt(d // n_heads)
        sites[p + "attn_logits"] = _causal_entries(scores)
        y = (_causal_softmax(scores) @ _heads(sites[p + "v"], n_heads)).transpose(1, 2).reshape(b, t, d)
        sites[p + "attn_out"] = y @ attn.o.weight.T
        x = x + sites[p + "attn_out"]
        sites[p + "mlp_pre"] = _rms_norm(x, block.norm2.weight) @ block.fc_in.weight.T
        sites[p + "mlp_post"] = F.gelu(sites[p + "mlp_pre"])
        x = x + sites[p + "mlp_post"] @ block.fc_out.weight.T
        sites[p + "residual"] = x
    sites["logits"] = _rms_norm(x, model.norm.weight) @ model.head.weight.T
    return sites


FORWARDS = [("lipschitz-gpt", _lipschitz_forward), ("baseline-gpt", _baseline_forward)]


@pytest.mark.parametrize(("arch", "forward"), FORWARDS)
def test_hooks_match_an_independent_forward(tmp_path, arch, forward):
    ckpt = load(_save(tmp_path / "m.safetensors", arch, "softcap"))
    ckpt.model.double()  # float64 on both sides: any difference is a bug, not rounding
    result = profile(ckpt, **SMALL)
    tokens = _tokens(2, 4)
    per_batch = [forward(ckpt.model, x) for x in tokens]
    with torch.no_grad():
        for x, sites in zip(tokens, per_batch, strict=True):
            torch.testing.assert_close(sites["logits"], ckpt.model(x), rtol=1e-12, atol=1e-12)
    assert [s.site for s in result.sites] == list(per_batch[0])
    for name, sites in zip(per_batch[0], zip(*(b.values() for b in per_batch), strict=True), strict=True):
        entries = torch.cat([s.detach().abs().flatten() for s in sites])
        stats = result.site(name)
        assert stats.max_abs == pytest.approx(float(entries.max()), rel=1e-6), name
        assert stats.rms == pytest.approx(float(entries.pow(2).mean().sqrt()), rel=1e-6), name
        assert stats.p999 == pytest.approx(float(torch.quantile(entries, 0.999)), rel=1e-6), name
        assert stats.count == entries.numel()
    assert result.batches == 2 and result.samples == 8 and result.arch == arch


def test_headroom_flags_and_compare_ratio(lipschitz, baseline):
    capped, free = profile(lipschitz, **SMALL), profile(baseline, **SMALL)
    assert capped.max_abs < 10 and not any(s.exceeds for s in capped.sites)
    outlier = free.site("block0.mlp_pre")
    assert outlier.max_abs > LIMITS["e5m2"] and outlier.exceeds == ["e4m3", "e5m2"]
    assert outlier.headroom["e4m3"] == pytest.approx(outlier.max_abs / 448.0)
    assert free.site("embed").exceeds == [] and free.site("block0.q").exceeds == []
    assert free.max_abs == max(s.max_abs for s in free.sites)
    comparison = compare([capped, free])
    assert comparison.reference == str(lipschitz)
    assert [r.ratio for r in comparison.rows] == pytest.approx([1.0, free.max_abs / capped.max_abs])
    assert comparison.rows[1].peak_site == free.peak.site and comparison.rows[1].method == "none"


def test_quantile_subsample_is_uniform_and_seeded():
    x = torch.linspace(-1.0, 1.0, 400_001)  # |x| uniform on [0, 1]: its 99.9th percentile is 0.999
    estimates = []
    for seed in (0, 0, 1):
        site = activations._Site(per_batch=50_000)
        generator = torch.Generator().manual_seed(seed)
        site.add(x, generator)
        site.add(x[:200_001], generator)  # a smaller last batch is sampled at the first batch's rate
        assert sum(len(s) for s in site.samples) == 50_000 + 25_000
        estimates.append(site.stats("x").p999)
    assert estimates[0] == estimates[1] != estimates[2]
    assert all(abs(e - 0.999) < 2e-3 for e in estimates)


def test_fp8_check_rounds_linear_layers_and_restores_them(lipschitz, baseline):
    ckpt = load(lipschitz)
    before = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
    check = fp8_check(ckpt, **SMALL)
    assert check.layers == 2 * 6 + 1  # q, k, v, o, fc_in, fc_out per block, and the head
    assert math.isfinite(check.loss_change) and check.loss_change != 0.0 and abs(check.loss_change) < 0.05
    assert check.clamped_inputs == 0 and check.clamped_weights == 0
    for key, value in ckpt.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert profile(ckpt, **SMALL).max_abs == profile(lipschitz, **SMALL).max_abs  # no hook left behind
    blown = fp8_check(baseline, **SMALL)  # fc_in's weights and fc_out's inputs saturate at 448
    assert blown.layers == 2 * 6 + 1  # q, k, v, o, fc_in, fc_out per block, and the head
    fc_in = load(baseline).model.blocks[0].fc_in.weight
    assert blown.clamped_weights == int((fc_in.abs() > 448).sum()) > 0 and blown.clamped_inputs > 0
    assert math.isfinite(blown.fp8_val_loss) and blown.fp8_val_loss != blown.val_loss


def test_image_mlp_profiles_each_layer(tmp_path):
    model = build_model("lipschitz-mlp", {"input_dim": 64, "hidden": 32, "n_layers": 3, "num_classes": 10})
    path = save(tmp_path / "mlp.safetensors", model, train_config={"data": "digits", "method": "softcap"})
    result = profile(path, batches=1, batch_size=32, device="cpu")
    assert [s.site for s in result.sites] == ["layer0", "layer1", "layer2", "logits"]
    assert result.samples == 32 and result.site("layer0").count == 32 * 32
    with torch.no_grad():
        x = torch.cat([b[0] for b in activations._validation(load(path), None, 1, 32)[0]])
        assert result.site("logits").max_abs == pytest.approx(float(model(x).abs().max()), rel=1e-6)


def test_cli_json_compares_checks_and_plots(lipschitz, baseline, tmp_path):
    png = tmp_path / "chart.png"
    args = ["activations", str(lipschitz), str(baseline), "--batches", "1", "--batch-size", "4", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--fp8-check", "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    first, second = report["checkpoints"]
    assert first["arch"] == "lipschitz-gpt" and second["arch"] == "baseline-gpt"
    assert {"site", "max_abs", "rms", "p999", "headroom", "exceeds"} <= set(first["sites"][0])
    assert math.isfinite(first["fp8_check"]["loss_change"])
    ratio = report["comparison"]["rows"][1]["ratio"]
    assert ratio == pytest.approx(second["max_abs"] / first["max_abs"]) and ratio > 1e3
    assert report["plot"] == str(png) and png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_tables_flag_sites_over_e4m3(lipschitz, baseline):
    args = [str(lipschitz), str(baseline), "--batches", "1", "--batch-size", "4", "--device", "cpu"]
    result = runner.invoke(app, ["activations", *args], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "block1.attn_logits" in result.stdout and "relative to" in result.stdout
    assert any("block0.mlp_pre" in line and "OVER" in line for line in lines)
    assert not any("block0.q " in line and "OVER" in line for line in lines)


def test_cli_errors_are_one_line_exit_2(lipschitz, tmp_path, monkeypatch):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    for args, words in [
        ([str(tmp_path / "missing.safetensors")], "no such checkpoint"),
        ([str(broken)], "not a readable safetensors file"),
        ([str(lipschitz), "--batches", "0"], "--batches"),
    ]:
        result = runner.invoke(app, ["activations", *args])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    result = runner.invoke(app, ["activations", str(lipschitz), "--batches", "1", "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "needs matplotlib" in result.stderr
