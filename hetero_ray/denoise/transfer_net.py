"""The conflict-aware transfer network of one module group (method.md section 3).

Tokens are flattened b x r blocks (D = b * r). Shapes below: M modules in the group (batched), T target
tokens per module, S source tokens per module (padded, with a validity mask).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAPER = {"block_size": 4096, "embed_dim": 1024, "num_heads": 8, "max_positions": 4096, "mu_gate": 0.1}


@dataclass(frozen=True)
class TransferNetConfig:
    block_size: int
    rank: int
    embed_dim: int = 1024
    num_heads: int = 8
    max_positions: int = 4096
    mu_gate: float = 0.1

    @classmethod
    def paper(cls, rank: int = 8) -> TransferNetConfig:
        return cls(rank=rank, **PAPER)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self) -> int:
        """Parameter count of a TransferNet with this config, computed without building it."""
        big, d, q = self.block_size * self.rank, self.embed_dim, self.embed_dim // 4
        encoder = 2 * big + 2 * (big * d + d) + (self.rank * q + q) + (q * d + d) + 2 * d
        attention = 4 * (d * d + d)
        decoder = (d * d + d) + (d * big + big)
        return encoder + self.max_positions * d + attention + decoder


def auto_sizes(max_rows: int, max_tokens: int) -> dict[str, int]:
    """Sizes that scale with the adapters: the paper's values at 4096-wide modules, smaller below.

    block_size: the next power of two >= the widest module row count, capped at 4096; embed_dim:
    block_size / 4 clamped to [32, 1024]; heads: 8 when embed_dim allows 16-wide heads, else fewer;
    max_positions: the longest token sequence of any group (rounded up to 64), at most 4096.
    """
    block = min(4096, 1 << max(3, math.ceil(math.log2(max(max_rows, 1)))))
    embed = max(32, min(1024, block // 4))
    heads = max(1, min(8, embed // 16))
    positions = min(4096, max(64, math.ceil(max_tokens / 64) * 64))
    return {"block_size": block, "embed_dim": embed, "num_heads": heads, "max_positions": positions}


class SpectralBlockEncoder(nn.Module):
    """E: row and column views of each normalised block, gated by an MLP of its singular values."""

    def __init__(self, cfg: TransferNetConfig):
        super().__init__()
        d, flat = cfg.embed_dim, cfg.block_size * cfg.rank
        self.block_size, self.rank, self.mu_gate = cfg.block_size, cfg.rank, cfg.mu_gate
        self.input_norm = nn.LayerNorm(flat)
        self.row = nn.Linear(flat, d)
        self.col = nn.Linear(flat, d)
        self.gate_mlp = nn.Sequential(nn.Linear(cfg.rank, d // 4), nn.ReLU(), nn.Linear(d // 4, d))
        self.out_norm = nn.LayerNorm(d)

    def gate(self, sigmas: torch.Tensor) -> torch.Tensor:
        """g = clip(ReLU(MLP(sigma) + mu_gate), 0, 1)."""
        return torch.clamp(F.relu(self.gate_mlp(sigmas) + self.mu_gate), 0.0, 1.0)

    def forward(self, tokens: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (..., D), sigmas (..., r) -> embeddings (..., d) and the gate (..., d)."""
        x = self.input_norm(tokens)
        x_t = x.unflatten(-1, (self.block_size, self.rank)).transpose(-1, -2).flatten(-2)
        g = self.gate(sigmas)
        return self.out_norm((F.gelu(self.row(x)) + F.gelu(self.col(x_t))) * g), g


class AlignedCrossAttention(nn.Module):
    """Multi-head attention: queries from target tokens, keys and values from source tokens."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"embed_dim {d} is not divisible by num_heads {heads}")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(
        self, query: torch.Tensor, kv: torch.Tensor, kv_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (M, T, d), kv (M, S, d), kv_valid (M, S) bool -> output (M, T, d), weights (M, T, S)
        averaged over heads."""
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(query)), split(self.k(kv)), split(self.v(kv))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~kv_valid[:, None, None, :], float("-inf"))
        w = scores.softmax(dim=-1)
        out = (w @ v).transpose(1, 2).flatten(-2)
        return self.out(out), w.mean(dim=1)


class TransferNet(nn.Module):
    """Encoder + learned positions + topology-aligned cross-attention + zero-initialised decoder."""

    def __init__(self, cfg: TransferNetConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.encoder = SpectralBlockEncoder(cfg)
        self.positions = nn.Embedding(cfg.max_positions, d)
        self.attention = AlignedCrossAttention(d, cfg.num_heads)
        self.decoder = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.block_size * cfg.rank))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def _with_positions(self, e: torch.Tensor) -> torch.Tensor:
        n = e.shape[-2]
        if n > self.cfg.max_positions:
            raise ValueError(f"{n} tokens exceed max_positions={self.cfg.max_positions}")
        return e + self.positions(torch.arange(n, device=e.device))

    def forward(
        self,
        tgt_tokens: torch.Tensor,
        tgt_sigmas: torch.Tensor,
        src_tokens: torch.Tensor,
        src_sigmas: torch.Tensor,
        src_valid: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Returns ``delta`` (M, T, D) one output token per target token, ``attention`` (M, T, S),
        ``z_target`` (M, T, d) and ``z_source`` (M, S, d) encoder outputs, ``gate_open`` (fraction of
        gate entries > 0 over valid tokens)."""
        dtype = self.positions.weight.dtype  # fp32, or bf16 under DeepSpeed's bf16 mode
        z_t, g_t = self.encoder(tgt_tokens.to(dtype), tgt_sigmas.to(dtype))
        z_s, g_s = self.encoder(src_tokens.to(dtype), src_sigmas.to(dtype))
        context, attn = self.attention(self._with_positions(z_t), self._with_positions(z_s), src_valid)
        gates = torch.cat([g_t.flatten(0, 1), g_s[src_valid]])
        return {
            "delta": self.decoder(context),
            "attention": attn,
            "z_target": z_t,
            "z_source": z_s,
            "gate_open": (gates > 0).float().mean().detach(),
        }


class GroundedNet(nn.Module):
    """A transfer network whose output is built from the source tokens themselves (``method.net: grounded``).

    Attention weights come from the paper's encoder (queries: target tokens, keys: source tokens, with
    positions), but the values are the raw source tokens, RMS-normalised per token, mixed across the rank by
    an r x r matrix (identity at start) and bias-free: with every source zero, dB is exactly zero whatever the
    parameters. Each source has a gate sigmoid(g_s) (0.5 at start) that can close it, and the output is scaled
    by a per-group scalar c (zero at start), so the first optimizer step moves dB by about alpha * lr.
    """

    def __init__(self, cfg: TransferNetConfig, n_sources: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.encoder = SpectralBlockEncoder(cfg)
        self.positions = nn.Embedding(cfg.max_positions, d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        for m in (self.q, self.k, *[m for m in self.encoder.modules() if isinstance(m, nn.Linear)]):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        self.mix = nn.Parameter(torch.eye(cfg.rank))
        self.source_gates = nn.Parameter(torch.zeros(n_sources))
        self.scale = nn.Parameter(torch.zeros(1))

    def _with_positions(self, e: torch.Tensor) -> torch.Tensor:
        n = e.shape[-2]
        if n > self.cfg.max_positions:
            raise ValueError(f"{n} tokens exceed max_positions={self.cfg.max_positions}")
        return e + self.positions(torch.arange(n, device=e.device))

    def forward(self, tgt_tokens, tgt_sigmas, src_tokens, src_sigmas, src_valid, src_owner) -> dict[str, torch.Tensor]:
        dtype = self.positions.weight.dtype
        z_t, _ = self.encoder(tgt_tokens.to(dtype), tgt_sigmas.to(dtype))
        z_s, _ = self.encoder(src_tokens.to(dtype), src_sigmas.to(dtype))
        heads = self.cfg.num_heads
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        q, k = split(self.q(self._with_positions(z_t))), split(self.k(self._with_positions(z_s)))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).mean(dim=1)  # (M, T, S)
        scores = scores.masked_fill(~src_valid[:, None, :], float("-inf"))
        w = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)  # a module without sources attends to nothing
        raw = src_tokens.to(dtype)
        values = raw / raw.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # zero tokens stay zero
        values = (values.unflatten(-1, (self.cfg.block_size, self.cfg.rank)) @ self.mix).flatten(-2)
        gates = torch.sigmoid(self.source_gates)[src_owner.clamp_min(0)] * src_valid  # (M, S)
        context = w @ (values * gates[..., None])  # (M, T, D)
        return {"delta": self.scale * context, "attention": w, "z_target": z_t, "z_source": z_s,
                "gate_open": torch.sigmoid(self.source_gates).mean().detach()}
