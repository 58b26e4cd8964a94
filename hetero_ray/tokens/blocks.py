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


def block_rows(d_in: int, d_out: int, block_size: int) -> list[int]:
    """The real (unpadded) rows of each token of a module's sequence [A^T blocks ; B blocks]."""
    def part(rows: int) -> list[int]:
        return [min(block_size, rows - lo) for lo in range(0, rows, block_size)]
    return part(d_in) + part(d_out)


def block_singular_values(tokens: torch.Tensor, rank: int, rows: torch.Tensor | None = None,
                          chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """(..., n, b * r) -> (..., n, min(b, r)): the singular values of each b x r block, fp32, no gradient.
    ``rows`` (..., n) gives each block's real rows (0: a padding token, whose values are 0): the Grams then
    skip the zero rows of padded blocks, which change no singular value. Blocks of one row count are batched,
    in chunks that keep the fp64 working copy under ``chunk_bytes`` (a group's tokens can be GBs at paper
    scale)."""
    lead, d = tokens.shape[:-1], tokens.shape[-1]
    b = d // rank
    flat = tokens.reshape(-1, b, rank)
    out = torch.zeros(flat.shape[0], min(b, rank), device=tokens.device)
    rows = torch.full((flat.shape[0],), b) if rows is None else rows.reshape(-1).cpu()
    for h in sorted(set(rows.tolist()) - {0}):
        idx = torch.nonzero(rows == h).flatten().to(tokens.device)
        step = max(1, chunk_bytes // max(1, h * rank * 8))
        for lo in range(0, idx.numel(), step):
            part = idx[lo : lo + step]
            sig = singular_values(flat[part, :h])
            out[part, : sig.shape[-1]] = sig
    return out.reshape(*lead, out.shape[-1])


def module_tokens(a: torch.Tensor, b: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The token sequence [A^T blocks ; B blocks] of one module, its singular values, and #A blocks."""
    ta, tb = to_tokens(a.T.float(), block_size), to_tokens(b.float(), block_size)
    tokens = torch.cat([ta, tb])
    rows = torch.tensor(block_rows(a.shape[1], b.shape[0], block_size))
    return tokens, block_singular_values(tokens, a.shape[0], rows), ta.shape[0]
