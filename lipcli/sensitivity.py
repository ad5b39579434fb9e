"""Measured sensitivity: an adversarial lower bound on a map's Lipschitz constant, to audit certificates.

A certificate claims ``||f(x) - f(y)|| <= L ||x - y||`` for every pair in the input domain. Any pair
with ratio r proves that the true constant is at least r, so a sound certificate satisfies L >= r.
The search works hard to make r large: it is what catches a wrong (too small) bound.

Norm pairs (the certificate's), for one input of shape ``shape``:

- ``"seq-rms"`` (sequence models, X of shape [T, d] -> logits [T, V]): ``||X|| = max_t ||x_t||_2 / sqrt(d)``,
  the largest per-position RMS, and likewise ``||Y|| = max_t ||y_t||_2 / sqrt(V)`` on the output. Domain:
  every row of X has RMS <= ``radius``; both points of every pair stay inside it (rows are projected back
  onto the sphere after each ascent step). :func:`model_sensitivity` takes norm and radius from the
  model's certified :class:`~lipcli.nn.Domain`, so the search covers exactly what certify proves.
- ``"l2"`` (the MLP, any input shape): the L2 norm of the flattened input and output. The domain is
  unconstrained, or the box [lo, hi]^D with ``box=(lo, hi)``; ``radius`` then only sets the scale of starts.

Strategy, in float64 (pass a model converted with ``model.double()``):

1. Pair ascent: ``restarts`` rounds of ``batch`` parallel searches that maximize ``log(ratio)`` with Adam
   over x and y = x + s u, projecting onto the domain, keeping the best pair ever seen. Half the starts
   are far-apart pairs, half are close pairs at log-spaced distances s.
2. Local estimate: at the best points found and at random points (shrunk into the interior by 0.99), a
   generalized power method maximizes ``||J v|| / ||v||`` over directions v (J v and J^T u by reverse
   mode). For "l2" this is power iteration on J^T J: the exact local operator norm. For "seq-rms"
   it alternates g <- (subgradient of the chosen output row's norm at J v) and v <- (rows of J^T g, each
   scaled to unit RMS: the linear maximizer over the input ball), so no step lowers the ratio. Searches
   from pairs start along the pair and follow the largest output row; those from random points each
   fix one output row, covering all of them. Every local value must be confirmed by the
   central-difference pair (x - hv, x + hv), which also joins the pair candidates.
3. Refinement: pair ascent restarted from the best local points and directions at small distances, which
   moves x itself towards larger local slopes, then one more local round at the points it found.

``best_ratio`` and ``local_ratio`` are both lower bounds on the true constant (the local one because the
domain is convex and the points are interior); ``lower_bound`` is the larger. ``f`` takes a batch and
must treat its samples independently (as every lipcli model does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import checkpoint
from .nn import Domain, certified_map, clip_token_rms

NORMS = ("seq-rms", "l2")
_TINY = 1e-300  # keeps log() and divisions finite when f is constant
_FLOOR = 1e-12  # relative floor on ||x - y||: a degenerate pair can only under-report its ratio
_INTERIOR = 0.99  # local estimates need interior points, where the Jacobian bounds the constant
_FD_STEP = 1e-5  # central-difference half-step, relative to the domain's scale
_FD_TOLERANCE = 1e-4  # relative: a local value its finite-difference pair does not confirm is discarded
_CLOSE_SCALES = (1e-3, 1e-1)  # range of relative distances for close pairs


@dataclass
class Sensitivity:
    """The strongest evidence found: the best pair's ratio and the best local (Jacobian) ratio."""

    best_ratio: float
    local_ratio: float
    x: Tensor
    y: Tensor
    evaluations: int  # samples passed through f (a jvp or vjp of one sample counts as one)

    @property
    def lower_bound(self) -> float:
        return max(self.best_ratio, self.local_ratio)


@dataclass(frozen=True)
class _Geometry:
    """One norm pair and its input domain, acting on batches [B, *shape]."""

    norm: str
    shape: tuple[int, ...]
    radius: float
    box: tuple[float, float] | None

    @property
    def scale(self) -> float:
        """Typical coordinate size of a point in the domain: sets learning rates and step sizes."""
        return self.box[1] - self.box[0] if self.box is not None else self.radius

    def rows(self, z: Tensor) -> Tensor:
        """[B, R, k]: the rows whose largest (scaled) L2 norm is the norm; "l2" has one row."""
        return z if self.norm == "seq-rms" else z.reshape(z.shape[0], 1, -1)

    def row_norms(self, z: Tensor) -> Tensor:
        rows = self.rows(z)
        norms = rows.norm(dim=-1)
        return norms / math.sqrt(rows.shape[-1]) if self.norm == "seq-rms" else norms

    def norm_of(self, z: Tensor) -> Tensor:
        return self.row_norms(z).amax(dim=-1)

    def project(self, z: Tensor) -> Tensor:
        if self.norm == "seq-rms":
            z = clip_token_rms(z, self.radius)  # the same projection as the certificate's Domain
        return z.clamp(*self.box) if self.box is not None else z

    def interior(self, z: Tensor) -> Tensor:
        """Shrink towards the domain's center, so small steps in any direction stay inside."""
        if self.box is not None:
            center = 0.5 * (self.box[0] + self.box[1])
            return center + _INTERIOR * (self.project(z) - center)
        return _INTERIOR * z if self.norm == "seq-rms" else z

    def unit_rows(self, z: Tensor, fallback: Tensor) -> Tensor:
        """Every row scaled to norm 1 (an extreme point of the unit ball); zero rows take ``fallback``'s."""
        norms = self.row_norms(z).unsqueeze(-1)
        unit = torch.where(norms > _TINY, self.rows(z) / norms.clamp_min(_TINY), self.rows(fallback))
        return unit.reshape(z.shape)

    def sample(self, n: int, generator: torch.Generator, dtype: torch.dtype, device: str) -> Tensor:
        if self.box is not None:
            lo, hi = self.box
            return lo + (hi - lo) * torch.rand((n, *self.shape), generator=generator, dtype=dtype, device=device)
        z = self.radius * torch.randn((n, *self.shape), generator=generator, dtype=dtype, device=device)
        if self.norm == "l2":
            return z
        # Half the rows on the sphere (where attention is steepest), half spread through the ball.
        rho = torch.rand(z.shape[:-1], generator=generator, dtype=dtype, device=device)
        rho = torch.where(rho < 0.5, torch.ones_like(rho), 2.0 * rho - 1.0)
        return self.unit_rows(z, z) * (self.radius * rho).unsqueeze(-1)

    def direction(self, n: int, generator: torch.Generator, dtype: torch.dtype, device: str) -> Tensor:
        z = torch.randn((n, *self.shape), generator=generator, dtype=dtype, device=device)
        return self.unit_rows(z, z)


class _Search:
    """Shared state of one measurement: f, the geometry, the evaluation count and the best pair."""

    def __init__(self, f: Callable[[Tensor], Tensor], geometry: _Geometry, output_norm: _Geometry) -> None:
        self.f, self.geo, self.out = f, geometry, output_norm
        self.evaluations = 0
        self.best_ratio = -math.inf
        self.best_pair: tuple[Tensor, Tensor] | None = None

    def ratio(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample ||f(x) - f(y)|| / max(||x - y||, floor), in one batched call of f."""
        fxy = self.f(torch.cat([x, y]))
        self.evaluations += fxy.shape[0]
        fx, fy = fxy.chunk(2)
        distance = self.geo.norm_of(y - x).clamp_min(_FLOOR * self.geo.scale)
        return self.out.norm_of(fx - fy) / distance

    def record(self, ratios: Tensor, x: Tensor, y: Tensor) -> None:
        i = int(ratios.argmax())
        if float(ratios[i]) > self.best_ratio:
            self.best_ratio = float(ratios[i])
            self.best_pair = (x[i].detach().clone(), y[i].detach().clone())

    def pair_ascent(self, x0: Tensor, y0: Tensor, steps: int, lr: float) -> tuple[Tensor, Tensor, Tensor]:
        """Adam on log(ratio) from the pairs (x0, y0); returns each search's best ratio and pair."""
        geo = self.geo
        s = geo.norm_of(y0 - x0).clamp_min(_FLOOR * geo.scale).view(-1, *[1] * len(geo.shape))
        x = x0.clone().requires_grad_(True)
        u = ((y0 - x0) / s).requires_grad_(True)
        # Adam's steps are per coordinate, so each variable's rate follows its coordinates' size.
        u_scale = float(u.detach().pow(2).mean().sqrt())
        optimizer = torch.optim.Adam([{"params": [x], "lr": lr * geo.scale}, {"params": [u], "lr": lr * u_scale}])
        # Cosine decay to 1%: large early steps explore, small late ones settle on the maximum.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        )
        best = torch.full((x0.shape[0],), -math.inf, dtype=x0.dtype, device=x0.device)
        best_x, best_y = x0.clone(), y0.clone()
        for step in range(steps + 1):
            y = x + s * u
            ratios = self.ratio(x, y)
            with torch.no_grad():
                improved = ratios > best
                best = torch.where(improved, ratios, best)
                mask = improved.view(-1, *[1] * len(geo.shape))
                best_x, best_y = torch.where(mask, x, best_x), torch.where(mask, y, best_y)
            if step == steps:
                break
            loss = -ratios.clamp_min(_TINY).log().sum()
            x.grad, u.grad = torch.autograd.grad(loss, [x, u])
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                x.copy_(geo.project(x))
                u.copy_((geo.project(x + s * u) - x) / s)
        self.record(best, best_x, best_y)
        return best, best_x, best_y

    def local(self, points: Tensor, v: Tensor, free: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """Generalized power method for max ||J v|| / ||v|| at interior points; returns confirmed values.

        It ascends one output row's norm per step: the current largest where ``free``, else row
        ``i mod R`` for search i, so that together the searches cover every row's own maximum.
        """
        geo, out = self.geo, self.out
        x = geo.interior(points.detach())
        v = geo.unit_rows(v.detach(), geo.unit_rows(torch.ones_like(v), v))
        # The fused CPU attention kernels have no double backward; the math kernel does.
        with sdpa_kernel(SDPBackend.MATH):
            linear = _Linearized(self.f, x)
            fx = linear.fx.detach()
            self.evaluations += x.shape[0]
            out_rows = out.rows(fx).shape[1]
            cyclic = torch.arange(x.shape[0], device=x.device) % out_rows
            best = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
            best_v = v
            for _ in range(steps):
                jv = linear.jvp(v)
                self.evaluations += x.shape[0]
                target = torch.where(free, out.row_norms(jv).argmax(dim=-1), cyclic)
                rows = out.rows(jv) * torch.nn.functional.one_hot(target, out_rows).to(x.dtype).unsqueeze(-1)
                values = out.norm_of(rows) / geo.norm_of(v)
                improved = values > best
                best = torch.where(improved, values, best)
                best_v = torch.where(improved.view(-1, *[1] * len(geo.shape)), v, best_v)
                # Subgradient of the selected row's norm; its linear maximizer over the ball is the next v.
                cotangent = (rows / out.norm_of(rows).clamp_min(_TINY).view(-1, 1, 1)).reshape(fx.shape)
                pulled = linear.vjp(cotangent)
                self.evaluations += x.shape[0]
                v = geo.unit_rows(pulled.detach(), v)
        return self.confirm(best.detach(), x, best_v.detach())

    def confirm(self, values: Tensor, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a local value only if the pair x -/+ h v confirms it; the pair joins the candidates."""
        h = _FD_STEP * self.geo.scale
        lo, hi = self.geo.project(x - h * v), self.geo.project(x + h * v)
        with torch.no_grad():
            ratios = self.ratio(lo, hi)
        self.record(ratios, lo, hi)
        confirmed = ratios >= values * (1.0 - _FD_TOLERANCE)
        return torch.where(confirmed, values, torch.zeros_like(values)), x, v


class _Linearized:
    """J v and J^T u of f at x in reverse mode only: J v is the gradient in u of <J^T u, v> (a double backward).

    On CPU this is many times faster than torch.func's forward mode, whose decompositions run op by op in Python.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self.x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            self.fx = f(self.x)
            self.u = torch.zeros_like(self.fx, requires_grad=True)
            # J^T u, built with its graph so that it can be differentiated in u; None when f ignores x.
            self.pulled_u = self._grad(self.fx, self.x, self.u, create_graph=True)

    @staticmethod
    def _grad(output: Tensor, wrt: Tensor, cotangent: Tensor, create_graph: bool = False) -> Tensor | None:
        if not output.requires_grad:
            return None
        (grad,) = torch.autograd.grad(
            output, wrt, cotangent, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        return grad

    def jvp(self, v: Tensor) -> Tensor:
        grad = None if self.pulled_u is None else self._grad(self.pulled_u, self.u, v)
        return torch.zeros_like(self.fx).detach() if grad is None else grad.detach()

    def vjp(self, cotangent: Tensor) -> Tensor:
        grad = self._grad(self.fx, self.x, cotangent)
        return torch.zeros_like(self.x).detach() if grad is None else grad.detach()


def _close_pairs(geo: _Geometry, x: Tensor, direction: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pairs (x, x + s direction) at log-spaced distances s, both points inside the domain."""
    lo, hi = (math.log10(c * geo.scale) for c in _CLOSE_SCALES)
    s = torch.logspace(lo, hi, x.shape[0], dtype=x.dtype, device=x.device)
    s = s[torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)]
    x = geo.project(x)
    return x, geo.project(x + s.view(-1, *[1] * len(geo.shape)) * direction)


def _top(candidates: list[tuple[Tensor, Tensor, Tensor]], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k best (ratio, x, y) rows across rounds."""
    ratios, xs, ys = (torch.cat(parts) for parts in zip(*candidates, strict=True))
    order = ratios.argsort(descending=True)[:k]
    return ratios[order], xs[order], ys[order]


def measure_sensitivity(
    f: Callable[[Tensor], Tensor],
    shape: tuple[int, ...],
    norm: str,
    *,
    radius: float = 1.0,
    restarts: int = 8,
    steps: int = 200,
    lr: float = 0.05,
    seed: int = 0,
    batch: int = 16,
    device: str | torch.device = "cpu",
    box: tuple[float, float] | None = None,
) -> Sensitivity:
    """Search for the largest ``||f(x) - f(y)|| / ||x - y||`` over the domain (see the module docstring).

    ``shape`` is one input's shape ([T, d] for "seq-rms"); ``f`` maps float64 batches [B, *shape] to
    [B, T, V] ("seq-rms") or [B, ...] ("l2"). Each of the ``restarts`` pair rounds, both local rounds and
    the refinement run ``batch`` searches for ``steps`` steps.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    if norm == "seq-rms" and len(shape) != 2:
        raise ValueError(f'"seq-rms" needs one input of shape (T, d), got {shape}')
    if box is not None and norm != "l2":
        raise ValueError('box applies to the "l2" norm only')
    if radius <= 0 or restarts < 1 or steps < 1 or batch < 2:
        raise ValueError("need radius > 0, restarts >= 1, steps >= 1 and batch >= 2")
    geo = _Geometry(norm, tuple(shape), radius, box)
    search = _Search(f, geo, _Geometry(norm, (), radius, None))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.float64

    def sample(n: int) -> Tensor:
        return geo.sample(n, generator, dtype, "cpu").to(device)

    def direction(n: int) -> Tensor:
        return geo.direction(n, generator, dtype, "cpu").to(device)

    rounds = []
    far = batch // 2
    for _ in range(restarts):
        x = sample(batch)
        close_x, close_y = _close_pairs(geo, x[far:], direction(batch - far), generator)
        x0, y0 = torch.cat([x[:far], close_x]), torch.cat([sample(far), close_y])
        rounds.append(search.pair_ascent(x0, y0, steps, lr))

    # Local estimates from the best pairs (warm-started along their directions) and at random points.
    _, top_x, top_y = _top(rounds, batch - far)
    points = torch.stack([top_x, top_y, 0.5 * (top_x + top_y)], dim=1).flatten(0, 1)[: batch - far]
    directions = (top_y - top_x).repeat_interleave(3, dim=0)[: batch - far]
    free = torch.arange(batch, device=device) < batch - far
    local = [search.local(torch.cat([points, sample(far)]), torch.cat([directions, direction(far)]), free, steps)]

    # Refinement: close pairs along the best local directions, then a last local round along the result.
    _, x, v = local[0]
    x0, y0 = _close_pairs(geo, x, v, generator)
    _, refined_x, refined_y = search.pair_ascent(x0, y0, steps, lr)
    local.append(search.local(refined_x, refined_y - refined_x, torch.ones_like(free), steps))

    assert search.best_pair is not None, "the first round records a pair"
    return Sensitivity(
        best_ratio=search.best_ratio,
        local_ratio=max(float(values.max()) for values, _, _ in local),
        x=search.best_pair[0],
        y=search.best_pair[1],
        evaluations=search.evaluations,
    )


def domain_sensitivity(f: Callable[[Tensor], Tensor], domain: Domain, tokens: int = 1, **search: Any) -> Sensitivity:
    """:func:`measure_sensitivity` on a certificate's own :class:`~lipcli.nn.Domain`: its norm pair and radius.

    ``tokens`` sets the sequence length for token-embedding domains (at most the domain's); an unbounded domain
    searches at scale 1.
    """
    radius = domain.radius if domain.radius is not None else 1.0
    return measure_sensitivity(f, domain.shape(tokens), domain.norm, radius=radius, **search)


def model_sensitivity(model: torch.nn.Module, *, window: int = 32, **search: Any) -> Sensitivity:
    """The measured sensitivity of a float64 certified model on ``model.domain()``, in its certificate's norm pair.

    Sequence models are searched on windows of at most ``window`` tokens: the certificate holds for every
    length, and short windows search faster.
    """
    return domain_sensitivity(certified_map(model), model.domain(), window, **search)


def checkpoint_sensitivity(path: str | Path, *, steps: int = 150, restarts: int = 3, window: int = 32) -> float:
    """The measured lower bound on a checkpoint's Lipschitz constant, on its certificate's domain and norm pair."""
    model = checkpoint.load(path).model.double()
    return model_sensitivity(model, window=window, restarts=restarts, steps=steps, batch=8).lower_bound
