"""Rectified distribution matching (RDM): a sliced Wasserstein-2 estimate between ReLU(Z) and
ReLU(N(mu, sigma^2)) samples of Z's shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rdm(
    z: torch.Tensor,
    mu_target: float = 0.0,
    sigma_target: float = 1.0,
    num_projections: int = 2048,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RDM of encoder outputs ``z`` (n x d). Samples and directions are redrawn at every call from
    ``generator`` (so a seeded generator makes the estimate reproducible)."""
    z = z.reshape(-1, z.shape[-1])
    z_pos = F.relu(z)
    y_pos = F.relu(torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device) * sigma_target + mu_target)
    u = torch.randn(z.shape[1], num_projections, generator=generator, dtype=z.dtype).to(z.device)
    u = u / u.norm(dim=0, keepdim=True)
    # projections x samples, so each sort runs along a contiguous row (sorting the samples x projections
    # product along dim 0 gives the same values ~2.8x slower: a strided sort)
    zs, _ = torch.sort(u.T @ z_pos.T, dim=1)
    ys, _ = torch.sort(u.T @ y_pos.T, dim=1)
    return ((zs - ys) ** 2).mean()
