"""Chunks of a text on which two tokenizations agree, for cross-tokenizer distillation.

A source tokenizer S and a target tokenizer T tokenize the same text. A *boundary* is a character offset where
a token ends in both tokenizations (the end offsets of the fast tokenizers' offset mapping; tokens with an empty
span end nothing), unless a token of either tokenization straddles it (start < offset < end: a byte-level BPE
token may hold the last byte of one character and the first byte of the next, and all such byte tokens carry
the offsets of the whole characters they touch); 0 and len(text) are always boundaries. Consecutive boundaries
delimit the candidate chunks [start, end), so whitespace between tokens falls inside a chunk whether or not the
offsets include it. Token k belongs to the chunk that contains its end offset (a token with an empty span to
the chunk that starts there, or the last chunk at the end of the text), so the chunks tile both id lists with
contiguous token ranges.

A candidate is kept only if the text its tokens contribute in context (:func:`span_text`) is exactly
``text[start:end]`` on both sides; otherwise its character span goes to ``dropped``. This catches a chunk edge
inside a multi-byte character (a prefix decode ending in U+FFFD), normalizers that change the text (NFKC,
lowercasing), prefix spaces a tokenizer adds, and anything else the offsets claim but the ids do not say.
Cost: O(n) prefix decodes per side, O(n^2) in the number of tokens.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Chunk", "ChunkAlignment", "align_chunks", "span_text"]


@dataclass(frozen=True)
class Chunk:
    """Characters ``text[start:end]``, tokens ``src_ids[src[0]:src[1]]`` and ``tgt_ids[tgt[0]:tgt[1]]``."""

    start: int
    end: int
    src: tuple[int, int]
    tgt: tuple[int, int]


@dataclass
class ChunkAlignment:
    """``text`` tokenized by both tokenizers, with the chunks that passed the decode check (in order) and the
    character spans of those that did not. Kept and dropped spans, merged in order, tile ``[0, len(text))``."""

    text: str
    src_ids: list[int]
    tgt_ids: list[int]
    chunks: list[Chunk] = field(default_factory=list)
    dropped: list[tuple[int, int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able: chunks as ``{"start", "end", "src": [i, j], "tgt": [i, j]}``, dropped as ``[start, end]``."""
        return {
            "text": self.text,
            "src_ids": list(self.src_ids),
            "tgt_ids": list(self.tgt_ids),
            "chunks": [{"start": c.start, "end": c.end, "src": list(c.src), "tgt": list(c.tgt)} for c in self.chunks],
            "dropped": [list(span) for span in self.dropped],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ChunkAlignment:
        return cls(
            text=d["text"],
            src_ids=[int(i) for i in d["src_ids"]],
            tgt_ids=[int(i) for i in d["tgt_ids"]],
            chunks=[Chunk(int(c["start"]), int(c["end"]), (int(c["src"][0]), int(c["src"][1])),
                          (int(c["tgt"][0]), int(c["tgt"][1]))) for c in d["chunks"]],
            dropped=[(int(s), int(e)) for s, e in d["dropped"]],
        )


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _piece(before: str, upto: str) -> str | None:
    """What ``upto`` adds to ``before``; None when ``before`` is not a prefix of it (the cut fell inside a
    character, or the decoder rewrote earlier text)."""
    return upto[len(before):] if upto.startswith(before) else None


def span_text(tokenizer, ids: Sequence[int], i: int, j: int) -> str | None:
    """The text tokens ``ids[i:j]`` contribute in context: ``decode(ids[:j])`` minus ``decode(ids[:i])``.

    Decoding the prefixes, rather than ``ids[i:j]`` alone, keeps a space that SentencePiece decoders strip from
    the first token. Returns None (which equals no text) when ``decode(ids[:i])`` is not a prefix of
    ``decode(ids[:j])``, e.g. when ``ids[:i]`` ends inside a multi-byte character and decodes to U+FFFD."""
    return _piece(_decode(tokenizer, ids[:i]), _decode(tokenizer, ids[:j]))


def _tokenize(tokenizer, text: str, role: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets (clipped to the text) of ``text``; ValueError without offsets."""
    name = f"{role} tokenizer {type(tokenizer).__name__}"
    path = getattr(tokenizer, "name_or_path", "")
    if path:
        name += f" ({path})"
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{name} is not a fast (Rust-backed) tokenizer: chunk alignment needs its character "
                         "offsets (return_offsets_mapping)")
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{name} gave no character offsets (return_offsets_mapping): {e}") from e
    if offsets is None or len(offsets) != len(ids):
        raise ValueError(f"{name} gave no character offsets for its {len(ids)} tokens")
    n = len(text)
    spans = [(min(max(int(s), 0), n), min(max(int(e), 0), n)) for s, e in offsets]
    return [int(i) for i in ids], [(s, max(s, e)) for s, e in spans]


def _ends(offsets: list[tuple[int, int]]) -> set[int]:
    return {e for s, e in offsets if e > s}


def _inside(offsets: list[tuple[int, int]]) -> set[int]:
    """Offsets strictly inside some token's span."""
    out: set[int] = set()
    for s, e in offsets:
        out.update(range(s + 1, e))
    return out


def _ranges(offsets: list[tuple[int, int]], chunk_ends: list[int]) -> list[tuple[int, int]]:
    """Per chunk, the token range [i, j) of the tokens it holds (contiguous, tiling all the tokens)."""
    counts = [0] * len(chunk_ends)
    last = 0
    for s, e in offsets:
        c = bisect_left(chunk_ends, e) if e > s else bisect_right(chunk_ends, e)
        c = min(max(c, last), len(chunk_ends) - 1)  # token order wins over offsets that go backwards
        counts[c] += 1
        last = c
    out, i = [], 0
    for n in counts:
        out.append((i, i + n))
        i += n
    return out


class _Prefixes:
    """``decode(ids[:k])``, decoded once per k."""

    def __init__(self, tokenizer, ids: list[int]):
        self.tokenizer, self.ids, self.cache = tokenizer, ids, {0: ""}

    def __call__(self, k: int) -> str:
        if k not in self.cache:
            self.cache[k] = _decode(self.tokenizer, self.ids[:k])
        return self.cache[k]

    def span(self, i: int, j: int) -> str | None:
        return _piece(self(i), self(j))


def _candidates(text: str, src_tokenizer, tgt_tokenizer) -> tuple[list[int], list[int], list[Chunk]]:
    """Both id lists and every candidate chunk, before the decode check (no chunks for an empty text)."""
    src_ids, src_off = _tokenize(src_tokenizer, text, "source")
    tgt_ids, tgt_off = _tokenize(tgt_tokenizer, text, "target")
    n = len(text)
    if n == 0:
        return src_ids, tgt_ids, []
    cuts = (_ends(src_off) & _ends(tgt_off)) - _inside(src_off) - _inside(tgt_off)
    bounds = sorted({0, n} | {b for b in cuts if 0 < b < n})
    src_ranges, tgt_ranges = _ranges(src_off, bounds[1:]), _ranges(tgt_off, bounds[1:])
    chunks = [Chunk(start, end, src, tgt)
              for start, end, src, tgt in zip(bounds[:-1], bounds[1:], src_ranges, tgt_ranges, strict=True)]
    return src_ids, tgt_ids, chunks


def align_chunks(text: str, src_tokenizer, tgt_tokenizer) -> ChunkAlignment:
    """Tokenize ``text`` with both (fast) tokenizers and split it into chunks on the offsets where both
    tokenizations have a token boundary; chunks whose tokens do not decode to exactly their text on either
    side are dropped (see the module docstring). ValueError when a tokenizer gives no character offsets."""
    src_ids, tgt_ids, candidates = _candidates(text, src_tokenizer, tgt_tokenizer)
    al = ChunkAlignment(text=text, src_ids=src_ids, tgt_ids=tgt_ids)
    src_prefix, tgt_prefix = _Prefixes(src_tokenizer, src_ids), _Prefixes(tgt_tokenizer, tgt_ids)
    for c in candidates:
        want = text[c.start:c.end]
        if src_prefix.span(*c.src) == want and tgt_prefix.span(*c.tgt) == want:
            al.chunks.append(c)
        else:
            al.dropped.append((c.start, c.end))
    return al
