"""Adapters become tokens: rank harmonization, blocking into b x r tokens, per-block singular values."""

from __future__ import annotations

import math

import torch


def harmonize_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refactor (A: r_k x d_in, B: d_out x r_k) to rank ``rank`` through the SVD of the product B A.

    Returns A' = sqrt(S) V^T and B' = U sqrt(S), zero-padded when r_k < rank (then B' A' == B A exactly up to
    rounding) and truncated to the best rank-``rank`` approximation when r_k > rank. The SVD is taken of the
    small r_k x r_k core of the two QR factors, never of the d_out x d_in product.
    """
    a, b = a.double(), b.double()
    if a.shape[0] == rank:
        return a.float(), b.float()
    qb, rb = torch.linalg.qr(b)  # B = Qb Rb
    qa, ra = torch.linalg.qr(a.T)  # A^T = Qa Ra
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    b_new = (qb @ u[:, :keep]) * root
    a_new = root[:, None] * (vh[:keep] @ qa.T)
    if keep < rank:
        a_new = torch.cat([a_new, a_new.new_zeros(rank - keep, a_new.shape[1])])
        b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], rank - keep)], dim=1)
    return a_new.float(), b_new.float()


def n_blocks(rows: int, block_size: int) -> int:
    return math.ceil(rows / block_size)


def to_tokens(m: torch.Tensor, block_size: int) -> torch.Tensor:
    """(rows, r) -> (n_blocks, block_size * r): zero-pad rows to a multiple of b, one token per block."""
    rows, r = m.shape
    pad = n_blocks(rows, block_size) * block_size - rows
    m = torch.cat([m, m.new_zeros(pad, r)]) if pad else m
    return m.reshape(-1, block_size * r)


def from_tokens(tokens: torch.Tensor, rows: int, rank: int) -> torch.Tensor:
    """Inverse of :func:`to_tokens`: (..., n_blocks, b * r) -> (..., rows, r), cropping the padding."""
    lead = tokens.shape[:-2]
    return tokens.reshape(*lead, -1, rank)[..., :rows, :]


def block_singular_values(tokens: torch.Tensor, rank: int) -> torch.Tensor:
    """(n, b * r) -> (n, r): the singular values of each b x r block, fp32, no gradient."""
    with torch.no_grad():
        return torch.linalg.svdvals(tokens.float().reshape(tokens.shape[0], -1, rank))


def module_tokens(a: torch.Tensor, b: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The token sequence [A^T blocks ; B blocks] of one module, its singular values, and #A blocks."""
    ta, tb = to_tokens(a.T.float(), block_size), to_tokens(b.float(), block_size)
    tokens = torch.cat([ta, tb])
    return tokens, block_singular_values(tokens, a.shape[0]), ta.shape[0]
