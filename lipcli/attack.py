"""Attacked accuracy next to certified accuracy: how much a model loses to PGD, and how much is provably safe.

``robustness(path, eps)`` runs a torchattacks attack (PGD/PGDL2, APGD or FGSM) at each ``eps`` and
reports, per eps, clean, attacked and certified accuracy and the size of the perturbations it used.

- **Image models** (``input_kind = "images"``, the MLP): the attack moves the [0, 1] input pixels
  (torchattacks clamps to [0, 1], the image domain). The certificate is L2 -> L2 with constant ``L``: a prediction is
  certified at L2 radius ``r`` when it is correct and its logit margin (top minus runner-up) is
  strictly above ``sqrt(2) L r``; an Linf attack of size ``eps`` on ``D`` pixels is certified at
  ``r = eps sqrt(D)``.
- **Language models** (``input_kind = "tokens"``, both GPTs): the attack moves the token embeddings
  (the input of ``forward_embeddings``) and every position's next-token prediction counts. ``eps`` is
  in the certificate's norm, the max over positions of per-token RMS. ``linf``: every entry moves by at
  most ``eps``; ``l2``: the whole sequence moves by at most ``eps sqrt(d)`` in L2. Both sets lie in the
  certified ball of radius ``eps``. The attacked embeddings are then pulled back into the
  certificate's domain (``model.domain()``, the one certify proves: each token's RMS <= its radius): a
  projection onto a convex set holding the clean tokens, so no token moves further. A position is certified
  when it is correct and its margin is strictly above ``sqrt(2 V) L eps`` (the per-position RMS bound
  ``L eps`` in L2 over ``V`` logits). The baseline has no certificate, hence no domain: nothing is
  pulled back, and its certified accuracy is 0.

An example counts as attacked-correct only if both its clean and every attacked prediction are
correct. Certified but broken is impossible for a sound bound and a faithful attack: ``robustness``
raises ``SoundnessError`` instead of returning such a table, and also when a perturbation leaves its
threat set.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint
from .certification import certify
from .distributed import resolve_device
from .errors import UserError
from .models import IMAGES
from .nn import Domain
from .recall import IGNORE_INDEX
from .validation import checkpoint_batches

ATTACKS = ("pgd", "apgd", "fgsm")
NORMS = ("l2", "linf")
DEFAULT_IMAGES = 256
DEFAULT_SEQUENCES = 16
CHUNK = {"images": 512, "sequences": 16}  # examples per attack batch
# A perturbation on the boundary may overshoot by float32 rounding: relative for the scale, absolute for pixels.
_REL_SLACK, _ABS_SLACK = 1e-4, 1e-6


class SoundnessError(RuntimeError):
    """A certified prediction the attack broke, or a perturbation outside its threat set: a bug in bound or attack."""


@dataclass
class AttackRow:
    eps: float
    radius: float  # the certificate's radius for this eps, in the certificate's norm
    clean_acc: float
    adv_acc: float
    certified_acc: float
    mean_norm: float  # of the attack's perturbations, in the certificate's norm
    max_norm: float
    max_threat_norm: float  # in the threat set's own norm, the units of eps

    @property
    def drop(self) -> float:
        return self.clean_acc - self.adv_acc

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "drop": self.drop}


@dataclass
class AttackReport:
    checkpoint: str
    arch: str
    attack: str
    norm: str
    steps: int
    alpha: float | None  # None: 2.5 * eps / steps at each eps
    restarts: int
    examples: int  # images or sequences
    predictions: int  # images, or sequences x positions
    log10_bound: float  # +inf: no certificate
    certificate_norm: str
    threat: str
    rule: str  # when a prediction counts as certified
    source: str
    note: str | None
    seconds: float = 0.0
    rows: list[AttackRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "rows": [r.to_dict() for r in self.rows]}


def parse_eps(text: str) -> list[float]:
    """``"0.05,0.1"`` -> ``[0.05, 0.1]``; every value finite and >= 0."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--eps must be a number or a comma list of numbers, got {text!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise UserError(f"--eps must be finite and >= 0, got {bad[0]:g}")
    return values


def check_options(
    eps: Sequence[float], norm: str, attack: str, steps: int, alpha: float | None, restarts: int, n: int | None
) -> None:
    """Reject bad settings before any checkpoint or data is read."""
    if attack not in ATTACKS:
        raise UserError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    if attack == "fgsm" and norm == "l2":
        raise UserError("--attack fgsm is an Linf attack: use --norm linf, or pgd/apgd for l2")
    if not eps or any(not (math.isfinite(e) and e >= 0) for e in eps):
        raise UserError(f"--eps must be one or more finite values >= 0, got {list(eps)}")
    for name, value in (("steps", steps), ("restarts", restarts), ("n", n)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise UserError(f"--alpha must be > 0, got {alpha:g}")


def _torchattacks() -> Any:
    try:
        import torchattacks  # imported lazily: its pinned dependencies clash with datasets', so it is optional
    except ImportError:
        raise UserError("lipcli attack needs torchattacks: pip install --no-deps torchattacks") from None
    return torchattacks


class _Pixels(nn.Module):
    """Images as the (B, 1, 1, D) batches torchattacks' L2 attacks need, flattened back for the MLP."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, u: Tensor) -> Tensor:
        return self.model(u.flatten(1))


def _into_domain(e: Tensor, domain: Domain | None) -> Tensor:
    """The projection onto the certificate's domain (None: the model has no certificate, nothing to project onto)."""
    return e if domain is None else domain.project(e)


class _Embeddings(nn.Module):
    """Token embeddings e as a [0, 1] image u = 0.5 + (e - e0) / scale of shape (B, 1, T, d); logits (B, V, T)."""

    def __init__(self, model: nn.Module, e0: Tensor, scale: float, domain: Domain | None) -> None:
        super().__init__()
        self.model, self.e0, self.scale, self.domain = model, e0, scale, domain

    def embeddings(self, u: Tensor) -> Tensor:
        return _into_domain(self.e0 + self.scale * (u.squeeze(1) - 0.5), self.domain)

    def forward(self, u: Tensor) -> Tensor:
        return self.model.forward_embeddings(self.embeddings(u)).transpose(1, 2)


class _ImageBatch:
    """A batch of images attacked in pixel space; the certificate's norm is L2."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, norm: str) -> None:
        self.norm, self.labels = norm, y
        self.u0 = x.view(len(x), 1, 1, -1)
        self.module = _Pixels(model)
        self.clean_logits = model(x)

    def attacked(self, eps: float) -> tuple[nn.Module, float]:
        """The module torchattacks attacks and eps in its input's units."""
        return self.module, eps

    def norms(self, module: nn.Module, u: Tensor) -> tuple[Tensor, Tensor]:
        """Per example: the perturbation in the certificate's norm and in the threat set's norm."""
        delta = (u - self.u0).flatten(1)
        l2 = delta.norm(dim=1)
        return l2, (l2 if self.norm == "l2" else delta.abs().amax(dim=1))


class _SequenceBatch:
    """A batch of token sequences attacked in embedding space; the certificate's norm is max-over-positions RMS."""

    def __init__(self, model: nn.Module, tokens: Tensor, y: Tensor, norm: str, domain: Domain | None) -> None:
        self.model, self.norm, self.labels, self.domain = model, norm, y, domain
        self.e0 = model.embed(tokens).detach()
        self.u0 = torch.full_like(self.e0, 0.5).unsqueeze(1)
        self.d = self.e0.shape[-1]
        self.clean_logits = model.forward_embeddings(self.e0).flatten(0, 1)

    def attacked(self, eps: float) -> tuple[nn.Module, float]:
        # c, the largest per-entry move the threat set allows, maps to 0.5: the ball fits the box, no clamp binds.
        c = eps if self.norm == "linf" else eps * math.sqrt(self.d)
        return _Embeddings(self.model, self.e0, 2 * c, self.domain), 0.5

    def norms(self, module: _Embeddings, u: Tensor) -> tuple[Tensor, Tensor]:
        """Per sequence: what the model saw move (certificate's norm) and what the attack moved (threat set's norm)."""
        moved = (module.embeddings(u) - self.e0).pow(2).mean(dim=-1).sqrt().amax(dim=-1)
        delta = (module.scale * (u.squeeze(1) - 0.5)).flatten(1)
        threat = delta.abs().amax(dim=1) if self.norm == "linf" else delta.norm(dim=1) / math.sqrt(self.d)
        return moved, threat


def _make_attack(
    module: nn.Module, attack: str, norm: str, eps: float, alpha: float, steps: int, restarts: int, seed: int
) -> Any:
    ta = _torchattacks()
    if attack == "fgsm":
        made = ta.FGSM(module, eps=eps)
    elif attack == "apgd":
        made = ta.APGD(module, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=steps, n_restarts=restarts,
                       seed=seed)  # fmt: skip
    else:
        made = (ta.PGD if norm == "linf" else ta.PGDL2)(module, eps=eps, alpha=alpha, steps=steps, random_start=True)
    made.set_model_training_mode(model_training=False)
    return made


@dataclass
class _Tally:
    """Per-prediction outcomes and per-perturbation norms for one eps, gathered over batches."""

    clean: list[Tensor] = field(default_factory=list)
    robust: list[Tensor] = field(default_factory=list)
    certified: list[Tensor] = field(default_factory=list)
    norms: list[Tensor] = field(default_factory=list)
    threat_norms: list[Tensor] = field(default_factory=list)


def _certified(logits: Tensor, labels: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(correct, certified) per prediction: certified when correct and the margin is strictly above ``threshold``."""
    top2 = logits.topk(2, dim=-1).values
    correct = logits.argmax(dim=-1) == labels
    return correct, correct & (top2[:, 0] - top2[:, 1] > threshold)


def _threshold(log10_bound: float, factor: float, radius: float) -> float:
    """The logit margin (top minus runner-up) a prediction must exceed to be certified at ``radius``."""
    if not math.isfinite(log10_bound):
        return math.inf
    if radius == 0:
        return 0.0
    exponent = log10_bound + math.log10(factor * radius)
    return math.inf if exponent > 300 else 10.0**exponent


def _attack_batch(
    batch: _ImageBatch | _SequenceBatch, eps: float, options: dict[str, Any], tally: _Tally, threshold: float
) -> None:
    labels = batch.labels.flatten()
    correct, certified = _certified(batch.clean_logits, labels, threshold)
    robust = correct.clone()
    module, eps_u = batch.attacked(eps)
    if eps == 0:
        # The clean input is the whole threat set (and PGDL2 would divide 0 by 0).
        zeros = torch.zeros(len(batch.u0), device=batch.u0.device)
        tally.norms.append(zeros)
        tally.threat_norms.append(zeros)
    else:
        alpha = options["alpha"] if options["alpha"] is not None else 2.5 * eps / options["steps"]
        made = _make_attack(module, options["attack"], options["norm"], eps_u, alpha * eps_u / eps, options["steps"],
                            options["restarts"], options["seed"])  # fmt: skip
        # APGD restarts internally and FGSM is deterministic: only PGD is rerun from new random starts.
        for _ in range(options["restarts"] if options["attack"] == "pgd" else 1):
            # torchattacks prints in places; keep stdout for the caller's table or JSON.
            with contextlib.redirect_stdout(io.StringIO()), torch.enable_grad():
                u = made(batch.u0, batch.labels)
            with torch.no_grad():
                robust &= module(u).argmax(dim=1).flatten() == labels
                norm, threat = batch.norms(module, u)
            tally.norms.append(norm)
            tally.threat_norms.append(threat)
    # Only labelled predictions count (recall scores its answer positions alone).
    scored = labels != IGNORE_INDEX
    tally.clean.append(correct[scored])
    tally.robust.append(robust[scored])
    tally.certified.append(certified[scored])


def _row(eps: float, radius: float, tally: _Tally) -> AttackRow:
    clean, robust, certified = (torch.cat(t).float() for t in (tally.clean, tally.robust, tally.certified))
    norms, threat = torch.cat(tally.norms).double(), torch.cat(tally.threat_norms).double()
    row = AttackRow(eps, radius, float(clean.mean()), float(robust.mean()), float(certified.mean()),
                    float(norms.mean()), float(norms.max()), float(threat.max()))  # fmt: skip
    broken = int((certified.bool() & ~robust.bool()).sum())
    if broken:
        raise SoundnessError(
            f"SOUNDNESS VIOLATION at eps {eps:g}: the attack broke {broken} of {int(certified.sum())} certified "
            f"predictions (certified {row.certified_acc:.2%}, attacked {row.adv_acc:.2%}): the bound or the attack "
            "is wrong"
        )
    for what, value, limit in (("threat set", row.max_threat_norm, eps), ("certified ball", row.max_norm, radius)):
        if value > limit * (1 + _REL_SLACK) + _ABS_SLACK:
            raise SoundnessError(
                f"SOUNDNESS VIOLATION at eps {eps:g}: a perturbation of size {value:.6g} left its {what} "
                f"(radius {limit:.6g}): the attack is wrong"
            )
    return row


def _examples(ckpt: checkpoint.Checkpoint, data: str | None, n: int, images: bool) -> tuple[Tensor, Tensor, str]:
    """The first ``n`` validation examples of the checkpoint's data (or ``data``), and their source in words."""
    [(x, y)], source = checkpoint_batches(ckpt, data, n, 1)
    if images:
        return x, y, f"{source}, first {len(x)} validation images"
    return x, y, f"{source}, first {len(x)} validation windows of {x.shape[1]} tokens"


def _descriptions(images: bool, norm: str, d: int, domain: Domain | None) -> tuple[str, str]:
    """(the certificate's norm, the threat set) in words."""
    if images:
        if norm == "l2":
            return "L2 on the input pixels", "L2 ball of radius eps around the image, clamped to [0, 1]"
        return "L2 on the input pixels", f"Linf box eps around the image, clamped to [0, 1] (L2 radius eps*sqrt({d}))"
    if domain is None:
        moved = "no certificate domain to pull back into"
    else:
        moved = f"then pulled back into the certified domain ({domain.statement()})"
    if norm == "linf":
        return "max over positions of per-token RMS", f"every embedding entry moves by <= eps, {moved}"
    return "max over positions of per-token RMS", f"L2 ball of radius eps*sqrt({d}) over the sequence, {moved}"


def robustness(
    path: str | Path,
    eps: Sequence[float],
    *,
    norm: str = "l2",
    attack: str = "pgd",
    steps: int = 20,
    alpha: float | None = None,
    restarts: int = 1,
    n: int | None = None,
    data: str | None = None,
    seed: int = 0,
    device: str = "auto",
) -> AttackReport:
    """Clean, attacked and certified accuracy of the checkpoint at ``path`` at every ``eps``.

    ``alpha`` (PGD's step, in the units of eps) defaults to 2.5 * eps / steps; ``restarts`` reruns PGD
    from new random starts (APGD restarts internally; FGSM is deterministic). ``n`` examples (default
    256 images or 16 sequences) come from the start of the validation split of the checkpoint's data
    (or ``data``). Raises ``SoundnessError`` when a certified prediction is broken.
    """
    check_options(eps, norm, attack, steps, alpha, restarts, n)
    _torchattacks()  # fail on a missing torchattacks before the slow part
    started = time.perf_counter()
    dev = resolve_device(device)
    ckpt = checkpoint.load(path, device=dev)
    is_mlp = ckpt.model.input_kind == IMAGES
    if attack == "apgd" and not is_mlp:
        raise UserError(f"--attack apgd needs one label per input; {ckpt.arch} predicts a sequence: use pgd or fgsm")
    # The attack's gradients are taken in float32 whatever the stored dtype; only inputs need gradients.
    model = ckpt.model.float().eval().requires_grad_(False)
    report_cert = certify(path)
    log10_bound = report_cert.log10_bound
    count = n or (DEFAULT_IMAGES if is_mlp else DEFAULT_SEQUENCES)
    x, y, source = _examples(ckpt, data, count, is_mlp)
    x, y = x.to(dev), y.to(dev)
    if is_mlp:
        width, factor, rule = x.shape[1], math.sqrt(2), "margin > sqrt(2) L radius"
    else:
        vocab = int(ckpt.model_config["vocab_size"])
        width, factor = int(ckpt.model_config["d_model"]), math.sqrt(2 * vocab)
        rule = f"margin > sqrt(2V) L radius (V = {vocab})"
    # The certificate's own domain, the one certify proves (None: no certificate, nothing to pull back into).
    domain = model.domain() if hasattr(model, "domain") else None
    certificate_norm, threat = _descriptions(is_mlp, norm, width, domain)
    note = None if math.isfinite(log10_bound) else f"no certificate ({report_cert.unbounded_reason}): certified is 0"
    predictions = int((y != IGNORE_INDEX).sum())  # recall scores its answer positions only
    report = AttackReport(str(path), ckpt.arch, attack, norm, steps, alpha, restarts, len(y), predictions, log10_bound,
                          certificate_norm, threat, rule, source, note)  # fmt: skip
    options = {"attack": attack, "norm": norm, "steps": steps, "alpha": alpha, "restarts": restarts, "seed": seed}
    chunk = CHUNK["images" if is_mlp else "sequences"]
    with torch.no_grad():
        batches = [
            _ImageBatch(model, xb, yb, norm) if is_mlp else _SequenceBatch(model, xb, yb, norm, domain)
            for xb, yb in zip(x.split(chunk), y.split(chunk), strict=True)
        ]
    # The attacks draw from torch's global generator: seed a forked copy so callers' streams are untouched.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for e in eps:
            radius = e * math.sqrt(width) if is_mlp and norm == "linf" else e
            threshold = _threshold(log10_bound, factor, radius)
            tally = _Tally()
            for batch in batches:
                _attack_batch(batch, e, options, tally, threshold)
            report.rows.append(_row(e, radius, tally))
    report.seconds = time.perf_counter() - started
    return report


def plot(report: AttackReport, path: str | Path) -> Path:
    """A PNG of clean, attacked and certified accuracy against eps."""
    try:
        # The object-oriented Figure draws straight to a file: no pyplot state, no display backend.
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'lipcli[plot]'") from None
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    eps = [r.eps for r in report.rows]
    for label, values, style in (
        ("clean", [r.clean_acc for r in report.rows], "k--"),
        (f"attacked ({report.attack} {report.norm}, {report.steps} steps)", [r.adv_acc for r in report.rows], "o-"),
        ("certified", [r.certified_acc for r in report.rows], "s-"),
    ):
        ax.plot(eps, values, style, label=label)
    positive = [e for e in eps if e > 0]
    if positive and max(positive) >= 10 * min(positive):
        # Sweeps spanning decades read on a log axis; symlog keeps an eps = 0 row on it.
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel(f"eps ({report.certificate_norm})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(f"{Path(report.checkpoint).name} ({report.arch})", fontsize="medium")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
