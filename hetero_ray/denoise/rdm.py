"""Rectified distribution matching (RDM): a sliced Wasserstein-2 estimate between ReLU(Z) and
ReLU(N(mu, sigma^2)) samples of Z's shape."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` sorted along its last dimension, differentiable. On the CPU the order comes from numpy's
    vectorised argsort (about 5x faster than ``torch.sort`` on 2048 x 2816 rows, one thread) and the values
    from a ``gather``, so autograd routes each gradient to the element it came from, as ``torch.sort`` does;
    the values are the same, bit for bit. Elsewhere, ``torch.sort``."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return torch.sort(x, dim=-1).values
    if not x.requires_grad:
        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=-1))
    order = torch.from_numpy(np.argsort(x.detach().contiguous().numpy(), axis=-1))
    return torch.gather(x, -1, order)


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
) -> torch.Tensor:
    """RDM of encoder outputs ``z`` (n x d). Samples and directions are redrawn at every call from
    ``generator`` (so a seeded generator makes the estimate reproducible). ``max_samples``: above that many
    rows, the estimate uses a random subset of that size (drawn from ``generator``), which bounds the cost
    (two sorts of ``num_projections`` x n) but biases the estimate upwards (a smaller sample is farther from
    any distribution); at or below it, the estimate is the full one, bit for bit. ``sort_budget``: at most
    this many projected values per sort, by using fewer projections (see ``projections_for``): the unbiased
    way to bound the cost, and the spec's default."""
    z = z.reshape(-1, z.shape[-1])
    if max_samples is not None and z.shape[0] > max_samples:
        keep = torch.randperm(z.shape[0], generator=generator)[:max_samples].to(z.device)
        z = z.index_select(0, keep)
    num_projections = projections_for(z.shape[0], num_projections, sort_budget)
    z_pos = F.relu(z)
    y_pos = F.relu(torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device) * sigma_target + mu_target)
    u = torch.randn(z.shape[1], num_projections, generator=generator, dtype=z.dtype).to(z.device)
    u = u / u.norm(dim=0, keepdim=True)
    # projections x samples, so each sort runs along a contiguous row (sorting the samples x projections
    # product along dim 0 gives the same values ~2.8x slower: a strided sort)
    zs = sort_rows(u.T @ z_pos.T)
    ys = sort_rows(u.T @ y_pos.T)
    return ((zs - ys) ** 2).mean()
