import json

import numpy as np
import pytest
import safetensors
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lipcli import checkpoint
from lipcli.activations import profile
from lipcli.certification import certify
from lipcli.cli import app
from lipcli.convert import ConvertError, convert
from lipcli.data import DataError
from lipcli.models import build_model
from lipcli.precision import FP8_MAX
from lipcli.spectral import rms_norm_exact
from lipcli.weightfiles import load_fp8

runner = CliRunner()
TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "context": 8}
TINY_CONFIG = json.dumps({"arch": "lipschitz-gpt", **{k: v for k, v in TINY.items() if k != "d_model"}})


def tiny_model(arch: str = "lipschitz-gpt", vocab_size: int = 11, **fields) -> torch.nn.Module:
    # zero_init off, so no tensor is trivially zero and every comparison below means something.
    return build_model(arch, {**TINY, "vocab_size": vocab_size, "zero_init": False, **fields})


def test_pt_to_safetensors_to_pt_is_lossless(tmp_path):
    model = tiny_model()
    meta = {"train_config": {"data": "tinyshakespeare", "lr": 0.1}, "metrics": {"val_loss": 2.5}, "step": 7,
            "tokenizer": {"name": "char", "vocab": "abcdefghijk"}, "extra": {"note": "kept"}}  # fmt: skip
    payload = {"arch": model.arch, "model_config": dict(model.config.__dict__), "state_dict": model.state_dict()}
    torch.save({**payload, "metadata": meta}, tmp_path / "a.pt")

    convert(tmp_path / "a.pt", tmp_path / "b.safetensors")
    convert(tmp_path / "b.safetensors", tmp_path / "c.pth")

    back = torch.load(tmp_path / "c.pth", weights_only=True)
    assert back["arch"] == "lipschitz-gpt" and back["model_config"] == payload["model_config"]
    assert back["state_dict"].keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert back["state_dict"][name].dtype == tensor.dtype and torch.equal(back["state_dict"][name], tensor)
    carried = back["metadata"]
    assert carried["train_config"] == meta["train_config"] and carried["metrics"] == meta["metrics"]
    assert carried["step"] == 7 and carried["tokenizer"] == meta["tokenizer"] and carried["extra"]["note"] == "kept"


def test_bf16_checkpoint_loads_with_checkpoint_load_and_runs(tmp_path):
    model = tiny_model()
    checkpoint.save(tmp_path / "m.safetensors", model, step=3)
    result = convert(tmp_path / "m.safetensors", tmp_path / "m16.safetensors", dtype="bf16")
    assert result.dtype == "bf16" and result.tensors == len(model.state_dict())

    loaded = checkpoint.load(tmp_path / "m16.safetensors")
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor.bfloat16())
    tokens = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        logits = loaded.model(tokens)
        torch.testing.assert_close(logits.float(), model(tokens), atol=0.05, rtol=0.05)
    # Converting back keeps bf16 unless told otherwise: the source's dtype is the default.
    assert convert(tmp_path / "m16.safetensors", tmp_path / "again.pt").dtype == "bf16"


def test_fp8_stores_scaled_e4m3_that_only_load_fp8_reads(tmp_path):
    model = tiny_model()
    checkpoint.save(tmp_path / "m.safetensors", model)
    convert(tmp_path / "m.safetensors", tmp_path / "q.safetensors", dtype="fp8-e4m3")

    with safetensors.safe_open(tmp_path / "q.safetensors", framework="pt") as f:
        scales = json.loads(f.metadata()["fp8_scales"])
        raw = {name: f.get_tensor(name) for name in f.keys()}
    for name, tensor in model.state_dict().items():
        assert raw[name].dtype == torch.float8_e4m3fn
        assert scales[name] == pytest.approx(float(tensor.abs().max()) / FP8_MAX, rel=1e-6)
        assert float(raw[name].float().abs().max()) == FP8_MAX  # the scale uses the whole range
    with pytest.raises(checkpoint.CheckpointError, match="lipcli convert"):
        checkpoint.load(tmp_path / "q.safetensors")  # it would otherwise read w / scale as the weights

    restored = load_fp8(tmp_path / "q.safetensors")
    for name, tensor in model.state_dict().items():
        # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 in units of the scale.
        error = (restored.model.state_dict()[name] - tensor).abs()
        assert bool((error <= tensor.abs() / 16 + scales[name] * 2**-9).all()), name
    # Back to fp32 through convert gives exactly the dequantized weights.
    convert(tmp_path / "q.safetensors", tmp_path / "deq.pt", dtype="fp32")
    deq = torch.load(tmp_path / "deq.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(deq[n], t) for n, t in restored.model.state_dict().items())


def test_bare_state_dict_takes_config_or_preset_and_infers_sizes(tmp_path):
    gpt = tiny_model(vocab_size=13)
    torch.save(gpt.state_dict(), tmp_path / "gpt.pt")
    convert(tmp_path / "gpt.pt", tmp_path / "gpt.safetensors", config=TINY_CONFIG)
    loaded = checkpoint.load(tmp_path / "gpt.safetensors")
    assert loaded.model_config["vocab_size"] == 13 and loaded.model_config["d_model"] == 16

    mlp = build_model("lipschitz-mlp", {"input_dim": 64, "hidden": 256, "n_layers": 3, "num_classes": 10})
    torch.save({f"_orig_mod.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "mlp.pt")  # a compiled model
    convert(tmp_path / "mlp.pt", tmp_path / "mlp.safetensors", preset="mlp-digits")
    loaded = checkpoint.load(tmp_path / "mlp.safetensors")
    assert loaded.arch == "lipschitz-mlp" and loaded.train_config["data"] == "digits"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in mlp.state_dict().items())


def test_data_past_the_vocabulary_is_refused_by_every_reader(tmp_path):
    """Tiny Shakespeare has 65 characters; a 13-token model without a stored tokenizer cannot read them."""
    path = tmp_path / "small.safetensors"
    checkpoint.save(path, tiny_model(vocab_size=13), train_config={"data": "tinyshakespeare"})
    with pytest.raises(DataError, match=r"larger than the model's \(13\)"):
        convert(path, tmp_path / "out.safetensors", data="tinyshakespeare", eval_batches=1)
    with pytest.raises(DataError, match=r"larger than the model's \(13\)"):
        profile(path, batches=1, batch_size=2, device="cpu")


def test_projection_certifies_an_unconstrained_model_and_reports_val_loss(tmp_path):
    model = tiny_model(vocab_size=65)  # tiny Shakespeare's character vocabulary
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # norms far above the cap, embedding rows at RMS 3
    checkpoint.save(tmp_path / "free.safetensors", model, train_config={"data": "tinyshakespeare"})

    result = convert(
        tmp_path / "free.safetensors", tmp_path / "capped.safetensors", method="svd", sigma_max=0.5, eval_batches=1
    )
    assert result.max_sigma_before == pytest.approx(3.0, rel=1e-4)
    assert result.max_sigma_after <= 0.5 * (1 + 1e-5)
    assert result.val_loss_before is not None and result.val_loss_after is not None
    assert result.val_loss_before != result.val_loss_after

    capped = checkpoint.load(tmp_path / "capped.safetensors")
    for name, p in capped.model.state_dict().items():
        if name == "embed.weight":
            assert float(p.pow(2).mean(dim=-1).sqrt().max()) <= 1 + 1e-6
        else:
            assert float(rms_norm_exact(p).max()) <= 0.5 * (1 + 1e-5), name
    assert certify(tmp_path / "capped.safetensors").log10_bound < certify(tmp_path / "free.safetensors").log10_bound
    assert capped.metrics["max_sigma"] == result.max_sigma_after  # the source's metrics described other weights


def modula_gpt_forward(weights: list[np.ndarray], args: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Modula's GPT forward on its flat weight list, transcribed to torch from Arongil/lipschitz-transformers.

    Followed: modula/compound.py (GPT, Attention), modula/atom.py (Linear: x @ W.T; Embed: W[:, x] with W
    [d, vocab]; Unembed/Linear out [vocab, d]), modula/bond.py (SplitIntoHeads, Rope.rotate's half split,
    AttentionQK's 1/d_head, CausalMask before Mul(softmax_scale), 1/3 on the attention output, GeLU / 1.1289)
    and abstract.py (``a @ b`` lists b's weights first). One change: GeLU is erf-exact, as in lipcli, where
    jax.nn.gelu defaults to the tanh approximation.
    """
    w = [torch.from_numpy(x) for x in weights]
    d, heads, blocks = args["d_embed"], args["num_heads"], args["num_blocks"]
    head_dim, half = d // heads, d // heads // 2
    a = args["residual_scale"] / (2 * blocks)
    x = w[0][:, tokens].movedim(0, -1)
    b, t, _ = x.shape
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), 1 / 10000 ** (torch.arange(half) / half))
    cos, sin = freqs.cos(), freqs.sin()

    def split(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(b, t, heads, head_dim).transpose(1, 2)

    def rope(z: torch.Tensor) -> torch.Tensor:
        x1, x2 = z[..., half:], z[..., :half]
        return torch.cat([cos * x1 + sin * x2, -sin * x1 + cos * x2], dim=-1)

    for i in range(blocks):
        v, q, k, o, w_in, w_out = w[1 + 6 * i : 7 + 6 * i]
        scores = rope(split(x @ q.T)) @ rope(split(x @ k.T)).transpose(-1, -2) / head_dim
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min) * args["softmax_scale"]
        attended = (scores.softmax(-1) @ split(x @ v.T) / 3).transpose(1, 2).reshape(b, t, d)
        x = (1 - a) * x + a * (attended @ o.T)
        x = (1 - a) * x + a * (F.gelu(x @ w_in.T) / 1.1289 @ w_out.T)
    return args["final_scale"] * (x @ w[-1].T)


def reference_weights(args: dict, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    d, vocab = args["d_embed"], args["vocab_size"]
    shapes = [(d, vocab)]
    for _ in range(args["num_blocks"]):
        shapes += [(d, d), (d, d), (d, d), (d, d), (4 * d, d), (d, 4 * d)]
    shapes.append((vocab, d))
    return [rng.normal(scale=0.5, size=s).astype(np.float32) for s in shapes]


def test_reference_npz_converts_to_the_same_function(tmp_path):
    args = {"d_embed": 8, "num_heads": 2, "num_blocks": 2, "seq_len": 6, "vocab_size": 11, "softmax_scale": 2.0,
            "final_scale": 3.0, "residual_scale": 1.5, "zero_init": True, "layernorm_substitute": "none",
            "use_unembed": False, "blocks_mass": 32, "data": "shakespeare", "optimizer": "muon", "lr": 0.1,
            "wd": 0.0, "w_max": 2, "project": {"default": "soft_cap"}, "steps": 100, "seed": 0}  # fmt: skip
    first, last = reference_weights(args, 0), reference_weights(args, 1)
    path = tmp_path / "shakespeare_muon.npz"
    # As utils.save_results writes it: JAX arrays become nested lists (jax_to_numpy), dicts pickle as objects.
    np.savez_compressed(path, args=args, results={"val_losses": [1.5]}, allow_pickle=True,
                        weights_checkpoint_0={i: w.tolist() for i, w in enumerate(first)},
                        weights_checkpoint_1={i: w.tolist() for i, w in enumerate(last)})  # fmt: skip

    with pytest.raises(ConvertError, match="arbitrary code"):
        convert(path, tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()

    convert(path, tmp_path / "ref.safetensors", allow_pickle=True)
    ckpt = checkpoint.load(tmp_path / "ref.safetensors")
    config = ckpt.model_config
    scales = (config["softmax_scale"], config["final_scale"], config["residual_scale"])
    assert config["context"] == 6 and config["n_layers"] == 2 and scales == (2, 3, 1.5)
    assert ckpt.train_config["data"] == "tinyshakespeare" and ckpt.train_config["sigma_max"] == 2
    tokens = torch.randint(0, 11, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(tokens), modula_gpt_forward(last, args, tokens), atol=1e-5, rtol=1e-5)

    convert(path, tmp_path / "first.pt", allow_pickle=True, npz_checkpoint=0)
    embed = torch.load(tmp_path / "first.pt", weights_only=True)["state_dict"]["embed.weight"]
    assert torch.equal(embed, torch.from_numpy(first[0]).T)


def test_cli_json_and_table(tmp_path):
    checkpoint.save(tmp_path / "m.safetensors", tiny_model())
    out = tmp_path / "m.pt"
    result = runner.invoke(app, ["convert", str(tmp_path / "m.safetensors"), str(out), "--dtype", "fp16", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dtype"] == "fp16" and summary["dst_format"] == "pt" and summary["arch"] == "lipschitz-gpt"
    assert summary["max_sigma_before"] is None and out.exists()

    table = runner.invoke(app, ["convert", str(out), str(tmp_path / "n.safetensors"), "--to", "safetensors"])
    assert table.exit_code == 0, table.output
    assert "fp16" in table.stdout and "lipschitz-gpt" in table.stdout
    assert checkpoint.load(tmp_path / "n.safetensors").model.head.weight.dtype == torch.float16


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.save(tiny_model().state_dict(), src / "bare.pt")
    checkpoint.save(src / "base.safetensors", tiny_model("baseline-gpt"))
    (src / "weights.bin").write_bytes(b"\0" * 16)
    (src / "corrupt.pt").write_bytes(b"not a zip file at all")
    np.savez(src / "ref.npz", args=np.array({"d_embed": 8}, dtype=object))
    wrong_shape = json.dumps({**json.loads(TINY_CONFIG), "mlp_ratio": 2})
    cases = [
        (["bare.pt", "out.safetensors"], "without a model config"),
        (["bare.pt", "out.safetensors", "--config", wrong_shape], "shape mismatch"),
        (["weights.bin", "out.safetensors"], "cannot tell the format"),
        (["bare.pt", "out.onnx", "--config", TINY_CONFIG], "cannot tell the format"),
        (["corrupt.pt", "out.safetensors"], "weights_only=True"),
        (["ref.npz", "out.safetensors"], "arbitrary code"),
        (["ref.npz", "out.safetensors", "--allow-pickle"], "not a reference checkpoint"),
        (["base.safetensors", "out.pt", "--preset", "shakespeare-cpu"], "carries its own config"),
        (["base.safetensors", "out.safetensors", "--project", "svd", "--sigma-max", "1"], "RMSNorm"),
        (["bare.pt", "out.safetensors", "--config", TINY_CONFIG, "--project", "svd"], "finite --sigma-max > 0"),
        (["bare.pt", "out.safetensors", "--config", TINY_CONFIG, "--dtype", "int4"], "unknown --dtype"),
    ]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for args, words in cases:
        result = runner.invoke(app, ["convert", str(src / args[0]), str(out_dir / args[1]), *args[2:]])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert "Traceback" not in result.output
        assert list(out_dir.iterdir()) == [], args  # no output and no temp file left behind


def test_reference_mlp_npz_converts_to_the_same_function(tmp_path):
    # Modula's MLP (compound.py): Flatten, mlp_in [hidden, input], ReLU, hidden layers, ReLU, mlp_out [10, hidden].
    args = {"data": "cifar", "d_embed": 16, "num_blocks": 3, "final_scale": 2.0}
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=s).astype(np.float32) for s in [(16, 12), (16, 16), (10, 16)]]
    path = tmp_path / "cifar.npz"
    np.savez_compressed(path, args=args, weights_checkpoint_0={i: w.tolist() for i, w in enumerate(weights)})

    convert(path, tmp_path / "mlp.safetensors", allow_pickle=True)
    model = checkpoint.load(tmp_path / "mlp.safetensors").model
    x = torch.randn(5, 3, 2, 2)
    expected = x.flatten(1)
    for i, w in enumerate(weights):
        expected = expected @ torch.from_numpy(w).T
        expected = expected.relu() if i < len(weights) - 1 else expected
    with torch.no_grad():
        torch.testing.assert_close(model(x), 2.0 * expected)
