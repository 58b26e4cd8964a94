"""Adapters become tokens: rank harmonization, blocking into b x r tokens, per-block singular values."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)


def harmonize_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refactor (A: r_k x d_in, B: d_out x r_k) to rank ``rank`` through the SVD of the product B A.

    Returns A' = sqrt(S) V^T and B' = U sqrt(S), zero-padded when r_k < rank (then B' A' == B A exactly up to
    rounding) and truncated to the best rank-``rank`` approximation when r_k > rank. The SVD is taken of the
    small r_k x r_k core of the two QR factors, never of the d_out x d_in product.
    """
    if a.shape[0] == rank:
        return a.float(), b.float()
    a, b = a.double(), b.double()
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


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """(..., rows, r) -> (..., min(rows, r)): singular values, descending, fp32, no gradient; from the r x r
    Gram matrices in fp64 (batched ``eigvalsh``), which matches ``svdvals`` of the fp32 blocks to ~1e-6 of the
    largest value and costs a fraction of it on tall blocks (2048 x 64: ~10x less)."""
    with torch.no_grad():
        x = x.double()
        return gram_singular_values(x.mT @ x, min(x.shape[-2], x.shape[-1]))


def gram_singular_values(grams: torch.Tensor, k: int) -> torch.Tensor:
    """(..., r, r) fp64 Grams X^T X -> (..., k): X's k largest singular values, descending, fp32."""
    return torch.linalg.eigvalsh(grams).flip(-1)[..., :k].clamp_min(0).sqrt().float()


def block_singular_values(tokens: torch.Tensor, rank: int) -> torch.Tensor:
    """(n, b * r) -> (n, r): the singular values of each b x r block, fp32, no gradient."""
    return singular_values(tokens.float().reshape(tokens.shape[0], -1, rank))


def module_tokens(a: torch.Tensor, b: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The token sequence [A^T blocks ; B blocks] of one module, its singular values, and #A blocks."""
    ta, tb = to_tokens(a.T.float(), block_size), to_tokens(b.float(), block_size)
    tokens = torch.cat([ta, tb])
    return tokens, block_singular_values(tokens, a.shape[0]), ta.shape[0]


def batched_module_rows(factors: Mapping[K, tuple[torch.Tensor, torch.Tensor]], block_size: int
                        ) -> dict[K, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, keyed as ``factors``: its unpadded rows [A^T ; B] ((d_in + d_out) x r, fp32) and the
    singular values of its blocks, as :func:`module_tokens` blocks it (its tokens are these rows with each part
    zero-padded to whole blocks; padding changes no singular value). Modules of one shape are stacked once and
    their blocks' singular values taken in one call; the rows are views into that stack."""
    by_shape: dict[tuple, list[K]] = {}
    for key, (a, b) in factors.items():
        by_shape.setdefault((tuple(a.shape), tuple(b.shape)), []).append(key)
    out: dict[K, tuple[torch.Tensor, torch.Tensor]] = {}
    for ((rank, d_in), (d_out, _)), keys in by_shape.items():
        rows = torch.empty(len(keys), d_in + d_out, rank)
        for i, key in enumerate(keys):
            a, b = factors[key]
            rows[i, :d_in] = a.T
            rows[i, d_in:] = b
        blocks = [(lo, min(lo + block_size, d_in)) for lo in range(0, d_in, block_size)]
        blocks += [(d_in + lo, d_in + min(lo + block_size, d_out)) for lo in range(0, d_out, block_size)]
        with torch.no_grad():
            x = rows.double()
            grams = torch.stack([x[:, lo:hi].mT @ x[:, lo:hi] for lo, hi in blocks], dim=1)
            sigmas = gram_singular_values(grams, min(block_size, rank))
        for i, key in enumerate(keys):
            out[key] = (rows[i], sigmas[i])
    return out
