"""Rectified distribution matching (RDM): a sliced Wasserstein-2 estimate between ReLU(Z) and
ReLU(N(mu, sigma^2)) samples of Z's shape."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Directions = Literal["orthogonal", "iid"]


def _numpy_sorts(x: torch.Tensor) -> bool:
    """Whether numpy sorts ``x``: on the CPU, in fp32 or fp64 (its vectorised sorts are about 5x faster than
    ``torch.sort`` on 2048 x 2816 rows, one thread); elsewhere ``torch.sort`` does."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _argsort_rows(x: torch.Tensor) -> torch.Tensor:
    """The order that sorts each row of ``x`` (no gradient)."""
    if _numpy_sorts(x):
        return torch.from_numpy(np.argsort(x.contiguous().numpy(), axis=-1))
    return torch.sort(x, dim=-1).indices


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` sorted along its last dimension, differentiable: the values gathered in ``_argsort_rows``'s
    order, so autograd routes each gradient to the element it came from, as ``torch.sort`` does; the values
    are the same, bit for bit."""
    if not x.requires_grad:
        if _numpy_sorts(x):
            return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=-1))
        return torch.sort(x, dim=-1).values
    return torch.gather(x, -1, _argsort_rows(x.detach()))


class _SortedMatch(torch.autograd.Function):
    """mean((sort_rows(x) - ys)^2) with ``ys`` already sorted (no gradient): the 1-D optimal transport cost
    along each row. One node instead of gather, sub, pow and mean: the backward is one scatter of
    2 (sorted x - ys) / n to where each sorted value came from (the order is a permutation per row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        order = _argsort_rows(x)
        diff = torch.gather(x, -1, order) - ys
        ctx.save_for_backward(order, diff)
        return (diff * diff).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        order, diff = ctx.saved_tensors
        g = diff * (2.0 * grad / diff.numel())
        return torch.empty_like(g).scatter_(-1, order, g), None


def _qr_dtype(dtype: torch.dtype) -> torch.dtype:
    """QR runs in fp32 or fp64 (LAPACK has no half-precision QR); the result is cast back."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def haar_columns(d: int, k: int, generator: torch.Generator | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``k <= d`` orthonormal columns (d x k) drawn uniformly (Haar): QR of a Gaussian matrix (drawn on the
    CPU from ``generator``, factored on ``device``) with R's diagonal made positive."""
    g = torch.randn(d, k, generator=generator, dtype=_qr_dtype(dtype)).to(device)
    q, r = torch.linalg.qr(g)
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)).to(dtype)


@lru_cache(maxsize=8)
def _design(d: int, blocks: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A fixed d x (blocks * d) set of unit vectors in orthonormal blocks (from a fixed seed, the same in
    every process), rotated at every call of ``directions`` by a fresh Haar rotation; kept per device."""
    g = torch.Generator().manual_seed(0x5EED)
    return torch.cat([haar_columns(d, d, g, dtype) for _ in range(blocks)], dim=1).to(device)


def _direction_factors(d: int, p: int, generator: torch.Generator | None, dtype: torch.dtype,
                       kind: Directions, device: torch.device | str = "cpu"
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rotation, design) on ``device``: the directions are ``rotation`` (d x min(p, d)) when ``design`` is
    None, else ``rotation @ design`` (d x d times d x p); kept apart so that few rows can be rotated before
    they meet the design (d^2 n + d p n multiply-adds instead of d^2 p + d p n)."""
    if kind == "iid":
        u = torch.randn(d, p, generator=generator, dtype=dtype)
        return (u / u.norm(dim=0, keepdim=True)).to(device), None
    if p <= d:
        return haar_columns(d, p, generator, dtype, device), None
    return haar_columns(d, d, generator, dtype, device), _design(d, -(-p // d), dtype, str(device))[:, :p]


def directions(d: int, p: int, generator: torch.Generator | None, dtype: torch.dtype = torch.float32,
               kind: Directions = "orthogonal") -> torch.Tensor:
    """``p`` unit directions in ``d`` dimensions (d x p), each uniform on the sphere. ``iid``: independent,
    as the paper draws them. ``orthogonal``: in orthonormal blocks of ``d`` (a Haar draw when ``p <= d``;
    beyond, one Haar rotation of a fixed set of orthonormal blocks, so the blocks are not independent of
    each other). Every direction is still uniform on the sphere, so the sliced estimate's expectation is the
    same; within a block no two directions are alike, which lowers its variance (orthogonal estimation of
    Wasserstein distances, Rowland et al., AISTATS 2019; measured by ``jobs/benchmark_rdm.py``)."""
    rotation, design = _direction_factors(d, p, generator, dtype, kind)
    return rotation if design is None else rotation @ design


def _project(x: torch.Tensor, rotation: torch.Tensor, design: torch.Tensor | None) -> torch.Tensor:
    """``x`` (n x d) projected on the directions: p x n, so each sort runs along a contiguous row (sorting
    the n x p product along dim 0 gives the same values ~2.8x slower: a strided sort)."""
    if design is None:
        return rotation.T @ x.T
    if x.shape[0] < design.shape[1]:
        return design.T @ (rotation.T @ x.T)
    return (rotation @ design).T @ x.T


MIN_PROJECTIONS = 64


def projections_for(rows: int, num_projections: int, sort_budget: int | None) -> int:
    """Projections one RDM term uses on ``rows`` rows: ``num_projections``, or fewer where rows x projections
    would exceed ``sort_budget`` (never under ``MIN_PROJECTIONS``, nor over ``num_projections``). Directions
    are a Monte Carlo sample of the sliced Wasserstein integral, so fewer of them leave the estimate unbiased
    (subsampling rows would not: the empirical distance between smaller samples is larger); they raise its
    variance only."""
    if sort_budget is None or rows * num_projections <= sort_budget:
        return num_projections
    return min(num_projections, max(MIN_PROJECTIONS, sort_budget // max(rows, 1)))


def rdm(
    z: torch.Tensor,
    mu_target: float = 0.0,
    sigma_target: float = 1.0,
    num_projections: int = 2048,
    generator: torch.Generator | None = None,
    max_samples: int | None = None,
    sort_budget: int | None = None,
    kind: Directions = "orthogonal",
) -> torch.Tensor:
    """RDM of encoder outputs ``z`` (n x d). Samples and directions are redrawn at every call from
    ``generator`` (so a seeded generator makes the estimate reproducible); ``kind``: how directions are
    drawn (see ``directions``; ``iid`` is the paper's form). ``max_samples``: above that many rows, the
    estimate uses a random subset of that size (drawn from ``generator``), which bounds the cost (two sorts
    of ``num_projections`` x n) but biases the estimate upwards (a smaller sample is farther from any
    distribution); at or below it, the estimate is the full one, bit for bit. ``sort_budget``: at most this
    many projected values per sort, by using fewer projections (see ``projections_for``): the unbiased way
    to bound the cost, and the spec's default."""
    z = z.reshape(-1, z.shape[-1])
    if max_samples is not None and z.shape[0] > max_samples:
        keep = torch.randperm(z.shape[0], generator=generator)[:max_samples].to(z.device)
        z = z.index_select(0, keep)
    num_projections = projections_for(z.shape[0], num_projections, sort_budget)
    z_pos = F.relu(z)
    y_pos = F.relu(torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device) * sigma_target + mu_target)
    rotation, design = _direction_factors(z.shape[1], num_projections, generator, z.dtype, kind, z.device)
    return _SortedMatch.apply(_project(z_pos, rotation, design), sort_rows(_project(y_pos, rotation, design)))
