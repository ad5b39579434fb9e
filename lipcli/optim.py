"""Optimizers that keep their constraint after every step: Muon (+ any method) and AdamW (+ any method).

Models declare their parameters (group, kind, mass role: :class:`lipcli.nn.Declared`); :func:`optimizer_groups`
applies the train config's caps and learning-rate multipliers to them, and :func:`param_groups` turns the
groups into optimizer groups carrying ``kind`` (see :data:`KINDS`), ``method`` and ``sigma_max``. A constraint
only ever sees matrices; the optimizer tells it the one thing it knows that the constraint cannot: a bound on
the norm of the step just taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .constraints import CapContext, get_method, project
from .errors import UserError
from .nn import Declared
from .spectral import MUON_COEFFS, max_gain, msign, rms_scale

# Rounding inside msign (bf16 on CUDA) can push a singular value a little past the exact polynomial's max.
_GAIN_MARGIN = 1.05

MUON_METHODS = ("none", "wd", "spec-wd", "normalize", "softcap", "hardcap", "svd")
ADAMW_METHODS = ("none", "wd", "spec-wd", "normalize", "hammer", "hardcap", "svd")


DECAY_METHODS = ("wd", "spec-wd")
OPTIMIZERS = ("muon", "adamw", "muon-adamw")

# What a parameter is decides how it is stepped, capped and decayed.
KINDS = {
    "matrix": "hidden matrix: the method's spectral cap, decoupled decay; Muon orthogonalizes its step",
    "embed": "Lipschitz token embedding: rows capped at sigma RMS, no decay",
    "free": "input-independent vector (bias, position bias): unconstrained, decayed",
    "edge": "unconstrained input/output matrix (an unconstrained model's embedding and head): decayed",
    "gain": "normalization gain: unconstrained, never decayed",
}
# Under muon-adamw (modded-nanogpt's split) Muon takes these kinds, AdamW the rest.
MUON_KINDS = ("matrix",)
# Modula's mass split under train.blocks_mass = m: a declared parameter's role sets its lr share.
MASS_ROLES = {
    "edge": "embedding and head: 1 / (m + 2)",
    "attention": "query, key and value: m / (m + 2), three times a block matrix's for the 1/3 on their output",
    "block": "other block matrices: m / (m + 2) / 3",
}


def check_method(optimizer: str, method: str, wd: float | None = None) -> None:
    """Reject pairs whose guarantee or purpose the optimizer cannot honour, with the reason.

    With ``wd`` given, also reject a decay method that would decay nothing (it would train unconstrained).
    """
    get_method(method)
    if method in DECAY_METHODS and wd is not None and wd <= 0:
        raise UserError(f"method {method} constrains only through --wd, which is {wd:g}: pass --wd (e.g. 0.1)")
    if optimizer == "adamw" and method not in ADAMW_METHODS:
        raise UserError(
            "softcap's guarantee needs a known bound on each step's spectral norm, which only Muon gives; "
            "use --optimizer muon, or hardcap/normalize/svd with adamw"
        )
    if optimizer in ("muon", "muon-adamw") and method not in MUON_METHODS:
        raise UserError(
            "hammer only moves the top singular value, but Muon's full-rank steps raise all of them; "
            "use --optimizer adamw with hammer, or softcap/hardcap with muon"
        )
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class Group:
    """A named set of parameters that share a kind, a cap and a learning-rate multiplier."""

    name: str
    params: list[nn.Parameter]
    kind: str  # one of KINDS
    sigma_max: float = 1.0
    lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"group {self.name}: unknown parameter kind {self.kind!r}; known: {', '.join(KINDS)}")


def group_names(declared: Iterable[Declared]) -> list[str]:
    """The declared groups, in order of first appearance."""
    return list(dict.fromkeys(d.group for d in declared))


def mass_lr_mult(blocks_mass: float | None, declared: Iterable[Declared]) -> dict[str, float]:
    """Each group's learning-rate share under Modula's mass split (:data:`MASS_ROLES`); {} without one."""
    if blocks_mass is None:
        return {}
    block = blocks_mass / (blocks_mass + 2.0)
    share = {"edge": 1.0 / (blocks_mass + 2.0), "attention": block, "block": block / 3}
    return {d.group: share[d.mass] for d in declared if d.mass is not None}


def check_group_names(declared: Iterable[Declared], tables: Mapping[str, Mapping[str, float]], model: str) -> None:
    """Every key of every named table (train.caps, train.lr_mult) must be a declared group of ``model``."""
    names = group_names(declared)
    for table_name, table in tables.items():
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise UserError(
                f"{table_name}: unknown group {unknown[0]!r}; {model} has groups {', '.join(names)} "
                f"(a preset's table can name a group your overrides removed: --set {table_name}='{{...}}' replaces it)"
            )


def optimizer_groups(
    declared: Iterable[Declared],
    sigma_max: float,
    caps: Mapping[str, float],
    lr_mult: Mapping[str, float],
    blocks_mass: float | None = None,
    model: str = "the model",
) -> list[Group]:
    """The declared parameters as groups, in order of first appearance, with the train config's caps and lr
    multipliers (explicit ones over the mass split's); names that are not declared groups are refused."""
    declared = list(declared)
    check_group_names(declared, {"train.caps": caps, "train.lr_mult": lr_mult}, model)
    mult = {**mass_lr_mult(blocks_mass, declared), **lr_mult}
    return [
        # Embedding rows keep unit RMS unless capped by name: sigma_max bounds matrices, not the input domain.
        Group(name, params, kind, caps.get(name, 1.0 if kind == "embed" else sigma_max), mult.get(name, 1.0))
        for name, (kind, params) in _by_group(declared).items()
    ]


def _by_group(declared: list[Declared]) -> dict[str, tuple[str, list[nn.Parameter]]]:
    """Each group's kind and parameters, in order of first appearance; a group is one kind and one mass role."""
    first: dict[str, Declared] = {}
    groups: dict[str, tuple[str, list[nn.Parameter]]] = {}
    for d in declared:
        if d.mass is not None and d.mass not in MASS_ROLES:
            raise ValueError(f"group {d.group}: unknown mass role {d.mass!r}; known: {', '.join(MASS_ROLES)}")
        seen = first.setdefault(d.group, d)
        if (seen.kind, seen.mass) != (d.kind, d.mass):
            raise ValueError(f"group {d.group} mixes kinds or mass roles: {seen.kind}/{seen.mass}, {d.kind}/{d.mass}")
        groups.setdefault(d.group, (d.kind, []))[1].append(d.param)
    return groups


def param_groups(groups: Iterable[Group], lr: float, method: str, wd: float) -> list[dict]:
    """Optimizer param-group dicts; spec-wd turns ``wd`` into spectral decay instead of decoupled decay."""
    dicts = []
    for g in groups:
        if not g.params:
            continue
        group_method = method if g.kind == "matrix" else "none"
        spectral = group_method == "spec-wd"
        decoupled = wd if g.kind not in ("embed", "gain") and not spectral else 0.0
        dicts.append(
            {
                "params": g.params,
                "name": g.name,
                "kind": g.kind,
                "sigma_max": g.sigma_max,
                "lr": lr * g.lr_mult,
                "method": group_method,
                "weight_decay": decoupled,
                "spectral_decay": wd if spectral else 0.0,
            }
        )
    return dicts


def cap_embedding_rows(weight: Tensor, max_rms: float = 1.0) -> Tensor:
    """Scale each row (one token's vector) down to RMS <= max_rms."""
    rms = weight.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
    return weight * (max_rms / rms.clamp_min(max_rms)).to(weight.dtype)


def _apply_constraint(p: Tensor, group: dict, state: dict, step_norm: float | None) -> None:
    if group["kind"] == "embed":
        p.copy_(cap_embedding_rows(p, group["sigma_max"]))
        return
    if group["kind"] != "matrix" or group["method"] == "none":
        return
    sigma_max = group["sigma_max"]
    decay = group["lr"] * group["weight_decay"]
    # The induction "norm <= sigma_max before the step" holds only after a first exact projection.
    norm_bound = None
    if step_norm is not None and state.get("capped"):
        norm_bound = sigma_max * (1.0 - decay) + step_norm
    spectral_decay = group["lr"] * group["spectral_decay"]
    ctx = CapContext(sigma_max, norm_bound=norm_bound, decay=spectral_decay, state=state.setdefault("cap", {}))
    p.copy_(project(p, group["method"], ctx))
    state["capped"] = get_method(group["method"]).enforces


class Muon(torch.optim.Optimizer):
    """Muon with the constraint applied inside ``step()``.

    Written here rather than wrapping torch.optim.Muon because the soft cap needs the exact bound on
    each update's RMS->RMS norm (lr times the Newton-Schulz gain), the paper scales by
    sqrt(fan_out / fan_in) for every shape, and embeddings take a row-normalized update.

    With ``world_size`` > 1 (gradients already averaged, e.g. by DDP) the work is sharded as in
    modded-nanogpt: parameters go round-robin to ranks, each rank takes the step and applies the
    constraint for its own, and the owner broadcasts the result, so every rank ends with the same
    capped weights. Momentum and constraint state live on the owner only; see
    :func:`lipcli.distributed.gather_sharded_state` for checkpoints.
    """

    def __init__(
        self,
        params: list[dict],
        lr: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        method: str = "softcap",
        sigma_max: float = 1.0,
        embed_inflation: float = 16.0,
        coeffs: tuple[tuple[float, float, float], ...] = MUON_COEFFS,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            method=method,
            sigma_max=sigma_max,
            kind="matrix",
            spectral_decay=0.0,
            embed_inflation=embed_inflation,
        )
        super().__init__(params, defaults)
        self.coeffs = coeffs
        self.gain = max_gain(coeffs) * _GAIN_MARGIN
        self.rank, self.world_size = rank, world_size

    def direction(self, update: Tensor, group: dict) -> Tensor:
        """The step before the learning rate: RMS->RMS norm <= gain for matrices, unit-RMS rows otherwise."""
        # Vectors (embedding rows, attention position biases) have no matrix sign: normalize each row instead.
        if group["kind"] in ("embed", "free", "gain"):
            rms = update.pow(2).mean(dim=-1, keepdim=True).sqrt()
            # Rare tokens get small gradients: normalize rows, but inflate none more than embed_inflation.
            floor = rms.max() / group["embed_inflation"]
            return update / rms.clamp_min(floor).clamp_min(1e-30)
        return msign(update, self.coeffs) * rms_scale(update)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        broadcasts = []
        for group, p, owner in self._assignments():
            if p.grad is None:
                continue
            if owner == self.rank:
                self._update(p, group)
            if self.world_size > 1:
                # Issued in the same order on every rank; async, so owners keep computing while results travel.
                broadcasts.append(dist.broadcast(p, src=owner, async_op=True))
        for work in broadcasts:
            work.wait()
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        """Momentum, step and constraint for one parameter, in place."""
        lr, momentum = group["lr"], group["momentum"]
        decay = lr * group["weight_decay"]
        state = self.state[p]
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.lerp_(p.grad, 1 - momentum)
        update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
        if decay:
            p.mul_(1.0 - decay)
        p.add_(self.direction(update, group).to(p.dtype), alpha=-lr)
        _apply_constraint(p, group, state, step_norm=lr * self.gain)

    def _assignments(self) -> Iterator[tuple[dict, Tensor, int]]:
        """(group, parameter, owner rank): round-robin over all parameters, the same on every rank."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p, index % self.world_size
                index += 1

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # A checkpoint holds every parameter's state; each rank keeps only what it owns.
        for _, p, owner in self._assignments():
            if owner != self.rank:
                self.state.pop(p, None)


class ConstrainedAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay) followed by the group's constraint.

    AdamW's step has no spectral-norm bound, so methods needing one measure the norm instead.
    """

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    _apply_constraint(p, group, self.state[p], step_norm=None)
        return loss


class MuonWithAdamW:
    """Muon on the hidden matrices, AdamW on everything else (embedding, head, gains): modded-nanogpt's split.

    Two library-style optimizers side by side; the training loop sees one ``param_groups`` list (the lr
    schedule writes through it) and one state dict.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return self.joined(self.muon.state_dict(), self.adamw.state_dict())

    @staticmethod
    def joined(muon: dict, adamw: dict) -> dict:
        """One torch-style state dict (``state`` by parameter index, ``param_groups``): Muon's first, then AdamW's."""
        offset = sum(len(g["params"]) for g in muon["param_groups"])
        return {
            "state": {**muon["state"], **{i + offset: v for i, v in adamw["state"].items()}},
            "param_groups": muon["param_groups"]
            + [{**g, "params": [i + offset for i in g["params"]]} for g in adamw["param_groups"]],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        n = len(self.muon.param_groups)
        groups = state_dict["param_groups"]
        offset = sum(len(g["params"]) for g in groups[:n])
        state = state_dict["state"]
        self.muon.load_state_dict({"state": {i: v for i, v in state.items() if i < offset}, "param_groups": groups[:n]})
        self.adamw.load_state_dict({
            "state": {i - offset: v for i, v in state.items() if i >= offset},
            "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in groups[n:]],
        })  # fmt: skip


def build_optimizer(
    name: str,
    groups: Iterable[Group],
    lr: float,
    method: str,
    wd: float,
    betas: tuple[float, float] = (0.9, 0.95),
    rank: int = 0,
    world_size: int = 1,
    embed_inflation: float = 16.0,
    adamw_lr: float | None = None,
) -> torch.optim.Optimizer:
    """Muon sharded over ``world_size`` ranks, AdamW (every rank repeats the same step: it is cheap), or
    muon-adamw: Muon at ``lr`` on :data:`MUON_KINDS`, AdamW at ``adamw_lr`` on the other groups."""
    check_method(name, method)
    groups = list(groups)
    if name == "muon-adamw":
        muon_groups = [g for g in groups if g.kind in MUON_KINDS]
        other = [g for g in groups if g.kind not in MUON_KINDS]
        muon = build_optimizer("muon", muon_groups, lr, method, wd, betas, rank, world_size, embed_inflation)
        adamw = build_optimizer("adamw", other, adamw_lr or lr, method, wd, betas)
        return MuonWithAdamW(muon, adamw)  # type: ignore[return-value]
    param_dicts = param_groups(groups, lr, method, wd)
    if name == "muon":
        return Muon(
            param_dicts, lr=lr, weight_decay=wd, method=method, embed_inflation=embed_inflation, rank=rank,
            world_size=world_size,
        )  # fmt: skip
    return ConstrainedAdamW(param_dicts, lr=lr, weight_decay=wd, betas=betas)
