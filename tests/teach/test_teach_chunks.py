"""Chunks on which two tokenizations agree (hetero_ray.teach.chunks), on two local tokenizer styles: byte-level
BPE (GPT-2 / SmolLM2 style, ``Ġ`` for a space) and SentencePiece-style BPE (Llama style: ``▁`` for a space,
a dummy prefix, byte fallback, a decoder that strips the leading space). Real tokenizers: the slow test."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, PythonBackend

from hetero_ray.contrib.tiny import build_tokenizer
from hetero_ray.teach import chunks as chunks_mod
from hetero_ray.teach.chunks import Chunk, ChunkAlignment, align_chunks, span_text

CORPUS = [
    "location: paris; person: john smith",
    "cuisine: thai; rating: 4 stars",
    "restaurant name: olive garden; cuisine: italian",
    "person: mary jones; location: london",
    "rating: 5 stars; price: cheap",
    "amenity: parking; hours: 9 am",
] * 20


def metaspace_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = 200, normalizer=None) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE like Llama's tokenizer.json: Metaspace pre-tokenizer (dummy prefix on the first
    word), byte fallback (all 256 ``<0xXX>`` tokens in the vocab), decoder Replace + ByteFallback + Fuse + Strip."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    d["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(d)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def bytelevel() -> PreTrainedTokenizerFast:
    return build_tokenizer(texts=CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    return metaspace_tokenizer()


def texts(al: ChunkAlignment) -> list[str]:
    return [al.text[c.start : c.end] for c in al.chunks]


def assert_kept_exact(al: ChunkAlignment, src_tok, tgt_tok) -> None:
    for c in al.chunks:
        want = al.text[c.start : c.end]
        assert span_text(src_tok, al.src_ids, *c.src) == want
        assert span_text(tgt_tok, al.tgt_ids, *c.tgt) == want


def assert_tiled(text: str, src_ids: list[int], tgt_ids: list[int], candidates: list[Chunk]) -> None:
    if not text:
        assert candidates == []
        return
    assert candidates[0].start == 0 and candidates[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(candidates[:-1], candidates[1:], strict=True))
    assert all(c.start < c.end for c in candidates)
    for ids, side in ((src_ids, "src"), (tgt_ids, "tgt")):
        ranges = [getattr(c, side) for c in candidates]
        assert ranges[0][0] == 0 and ranges[-1][1] == len(ids)
        assert all(i <= j for i, j in ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))


# (a) hand-checked. Byte-level:  location : | Ġ l on don | ; | Ġ rating : | Ġ 4 | Ġstars
#                  Metaspace:   ▁location: | ▁london    | ; | ▁rating:   | ▁4  | ▁stars
# and, at the start of the text, the Metaspace dummy prefix ▁ and the byte-fallback <0x43> share C's offsets (0, 1):
#   Byte-level:  C | u isine : | Ġ | T | h ai | ; | Ġ | Ġp r i ce : | Ġ | 1 | 2 | Ġ | d | o | l | l | ars
#   Metaspace:   ▁ <0x43> | uis ine: | ▁ | <0x54> | hai | ; | ▁ | ▁price: | ▁ | <0x31> | <0x32> | ▁ | d | ...
HAND_CHECKED = [
    ("location: london; rating: 4 stars",
     [("location:", (0, 2), (0, 1)), (" london", (2, 6), (1, 2)), (";", (6, 7), (2, 3)),
      (" rating:", (7, 10), (3, 4)), (" 4", (10, 12), (4, 5)), (" stars", (12, 13), (5, 6))]),
    ("Cuisine: Thai;  price: 12 dollars",
     [("C", (0, 1), (0, 2)), ("uisine:", (1, 4), (2, 4)), (" ", (4, 5), (4, 5)), ("T", (5, 6), (5, 6)),
      ("hai", (6, 8), (6, 7)), (";", (8, 9), (7, 8)), (" ", (9, 10), (8, 9)), (" price:", (10, 15), (9, 10)),
      (" ", (15, 16), (10, 11)), ("1", (16, 17), (11, 12)), ("2", (17, 18), (12, 13)), (" ", (18, 19), (13, 14)),
      ("d", (19, 20), (14, 15)), ("o", (20, 21), (15, 16)), ("l", (21, 22), (16, 17)), ("l", (22, 23), (17, 18)),
      ("ars", (23, 24), (18, 20))]),
]


@pytest.mark.parametrize("text, expected", HAND_CHECKED)
def test_hand_checked_chunks(bytelevel, metaspace, text, expected):
    al = align_chunks(text, bytelevel, metaspace)
    assert [(al.text[c.start : c.end], c.src, c.tgt) for c in al.chunks] == expected
    assert al.dropped == []
    assert_kept_exact(al, bytelevel, metaspace)
    # the other direction: the same chunks with src and tgt swapped
    back = align_chunks(text, metaspace, bytelevel)
    assert [(t, tgt, src) for t, src, tgt in expected] == [(text[c.start : c.end], c.src, c.tgt) for c in back.chunks]


def test_span_text_keeps_the_space_a_sentencepiece_decoder_strips(metaspace):
    ids = metaspace("location: london", add_special_tokens=False)["input_ids"]
    assert metaspace.decode(ids[1:]) == "london"  # alone, the Strip decoder loses the space
    assert span_text(metaspace, ids, 1, len(ids)) == " london"  # in context it is there
    assert span_text(metaspace, ids, 0, 1) == "location:"


@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
def test_identical_tokenizers_give_one_chunk_per_token(request, style):
    tok = request.getfixturevalue(style)
    text = "restaurant name: olive garden; cuisine: italian; rating: 4 stars"
    al = align_chunks(text, tok, tok)
    n = len(al.src_ids)
    assert al.src_ids == al.tgt_ids and n > 5
    assert al.dropped == []
    assert [c.src for c in al.chunks] == [(k, k + 1) for k in range(n)]
    assert [c.tgt for c in al.chunks] == [(k, k + 1) for k in range(n)]
    assert "".join(texts(al)) == text


def test_byte_fallback_character_is_one_exact_chunk(bytelevel, metaspace):
    """Both tokenizers split é (2 bytes) and 🍕 (4 bytes) into byte tokens; all of a character's byte tokens
    carry that character's offsets, so no boundary falls inside it and it is one chunk, kept with exact text."""
    text = "cuisine: café 🍕"
    al = align_chunks(text, bytelevel, metaspace)
    assert al.dropped == []
    assert texts(al) == ["cuisine:", " c", "a", "f", "é", " ", "🍕"]
    by_text = {al.text[c.start : c.end]: c for c in al.chunks}
    assert by_text["é"].src[1] - by_text["é"].src[0] == 2 and by_text["é"].tgt[1] - by_text["é"].tgt[0] == 2
    assert by_text["🍕"].tgt[1] - by_text["🍕"].tgt[0] == 4
    assert_kept_exact(al, bytelevel, metaspace)


@pytest.fixture(scope="module")
def bytelevel_cross_char() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on accented words: it learns merges across character boundaries
    ('rÃ' = r + the first byte of è, '¨me' = the last byte of è + me)."""
    return build_tokenizer(texts=CORPUS + ["dessert: crème brûlée"] * 30, vocab_size=330)


def test_token_straddling_a_character_is_not_cut(bytelevel_cross_char, metaspace):
    text = "crème"
    enc = bytelevel_cross_char(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    # 'c' (0,1), 'rÃ' (1,3), '¨me' (2,5): offset 3 ends a token in both tokenizations, but '¨me' straddles it
    assert [tuple(o) for o in enc["offset_mapping"]] == [(0, 1), (1, 3), (2, 5)]
    # cutting there would leave a U+FFFD on one side and no valid continuation on the other
    assert span_text(bytelevel_cross_char, ids, 1, 2) == "r\ufffd"
    assert span_text(bytelevel_cross_char, ids, 2, 3) is None
    al = align_chunks(text, bytelevel_cross_char, metaspace)
    assert texts(al) == ["c", "rème"] and al.dropped == []
    assert_kept_exact(al, bytelevel_cross_char, metaspace)


def test_a_cut_inside_a_character_is_dropped_not_kept(bytelevel_cross_char, metaspace, monkeypatch):
    """Without the straddle rule the chunks meet at offset 3 inside the bytes of è: the decode check drops both
    halves (one decodes to 'r\\ufffd', the other is no continuation of the prefix) and keeps the rest exact."""
    monkeypatch.setattr(chunks_mod, "_inside", lambda offsets: set())
    text = "crème"
    al = align_chunks(text, bytelevel_cross_char, metaspace)
    assert [text[s:e] for s, e in al.dropped] == ["rè", "me"]
    assert texts(al) == ["c"]
    assert_kept_exact(al, bytelevel_cross_char, metaspace)


@pytest.mark.parametrize("text, dropped", [("rating: ４ stars", [" ４"]), ("ﬁsh: 1 star", ["ﬁs"]),
                                           ("café ① rating", ["①"])])
def test_multibyte_character_the_decode_does_not_give_back_is_dropped(bytelevel, text, dropped):
    """A SentencePiece-style tokenizer with NFKC normalization (the SentencePiece default) turns ４ into 4 and
    ﬁ into fi: the target's tokens do not decode to the text there, so that chunk is dropped and counted."""
    nfkc = metaspace_tokenizer(normalizer=normalizers.NFKC())
    al = align_chunks(text, bytelevel, nfkc)
    assert [text[s:e] for s, e in al.dropped] == dropped
    assert_kept_exact(al, bytelevel, nfkc)
    assert len(al.chunks) >= 2


def test_leading_space_a_tokenizer_cannot_give_back_is_dropped(bytelevel, metaspace):
    # the dummy prefix absorbs a leading space ('▁rating:' covers ' rating:') and the Strip decoder removes it
    al = align_chunks(" rating: 4", bytelevel, metaspace)
    assert al.dropped == [(0, 8)]
    assert texts(al) == [" 4"]


def test_empty_text_has_no_chunks(bytelevel, metaspace):
    al = align_chunks("", bytelevel, metaspace)
    assert (al.src_ids, al.tgt_ids, al.chunks, al.dropped) == ([], [], [], [])


POOL = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 :;,.-'$!?\n") + [
    "  ", "é", "ü", "🍕", "日本", "ﬁ", "\t", "\u200b", "Ω", "👍🏽"]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(0, 30))) for _ in range(n)]


@pytest.mark.parametrize("pair", [("bytelevel", "metaspace"), ("metaspace", "bytelevel"),
                                  ("bytelevel", "bytelevel_cross_char"), ("metaspace", "metaspace")])
def test_chunks_tile_text_and_tokens(request, pair):
    src_tok, tgt_tok = (request.getfixturevalue(name) for name in pair)
    for text in random_texts(150, seed=7):
        src_ids, tgt_ids, candidates = chunks_mod._candidates(text, src_tok, tgt_tok)
        assert_tiled(text, src_ids, tgt_ids, candidates)
        al = align_chunks(text, src_tok, tgt_tok)
        assert (al.src_ids, al.tgt_ids) == (src_ids, tgt_ids)
        spans = sorted([(c.start, c.end) for c in al.chunks] + al.dropped)
        assert spans == [(c.start, c.end) for c in candidates]
        assert "".join(text[s:e] for s, e in spans) == text
        assert al.chunks == [c for c in candidates if (c.start, c.end) not in set(al.dropped)]
        assert_kept_exact(al, src_tok, tgt_tok)


def test_round_trip_through_json(bytelevel, metaspace):
    al = align_chunks(" rating: ４ stars, café 🍕", bytelevel, metaspace_tokenizer(normalizer=normalizers.NFKC()))
    assert al.chunks and al.dropped
    back = ChunkAlignment.from_dict(json.loads(json.dumps(al.to_dict())))
    assert back == al
    assert all(isinstance(c.src, tuple) and isinstance(c.tgt, tuple) for c in back.chunks)
    assert all(isinstance(span, tuple) for span in back.dropped)


class _SlowTokenizer(PythonBackend):
    """A pure-Python tokenizer (one token per character): no offsets."""

    def __init__(self, **kwargs):
        self._vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz :;")}
        super().__init__(**kwargs)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def _tokenize(self, text, **kwargs):
        return list(text)

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return {i: c for c, i in self._vocab.items()}[index]


class _NoOffsets:
    """Claims to be fast but gives ids only."""

    is_fast = True

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) for c in text]}


def test_tokenizer_without_offsets_is_refused(bytelevel):
    slow = _SlowTokenizer()
    with pytest.raises(ValueError, match=r"source tokenizer _SlowTokenizer.*not a fast"):
        align_chunks("location: paris", slow, bytelevel)
    with pytest.raises(ValueError, match=r"target tokenizer _NoOffsets.*no character offsets"):
        align_chunks("location: paris", bytelevel, _NoOffsets())


# ---- real tokenizers (zoo models converted from GGUF), when they are in the local cache ----

REAL_ANSWERS = [
    "Restaurant Name: olive garden; Cuisine: italian",
    "restaurant name: olive garden; cuisine: italian",
    "LOCATION: New York City; PRICE: $$$",
    "Rating: 4.5 stars; Hours: 9am-10pm",
    "person: John Smith, location: Paris",
    "Amenity: free parking; Dish: pad thai",
    "cuisine: thai; rating: 4 stars",
    "Director: Steven Spielberg; Year: 1993; Genre: sci-fi",
    'Title: "The Matrix" (1999)',
    "Actor: Tom Hanks | Character: Forrest Gump",
    "location: 5 miles away; price: under $20",
    "Restaurant_Name: McDonald's; Cuisine: fast-food",
    "organization: U.N.; location: Geneva, Switzerland",
    "none",
    "Hours: open 24/7, Amenity: drive-thru",
    "Rating: 10/10!!! Cuisine: BBQ & grill",
    "type: person\nname: alice",
    "Location: downtown;   Price: cheap ",
    "Dish: sushi, ramen; Rating: 3 stars",
    "Cuisine: italian 🍕",
    "Cuisine: pizza 🍕🍕 and café crème",
]


@functools.cache
def _real_tokenizer(name: str):
    from transformers import AutoTokenizer

    from hetero_ray.contrib.zoo import cache_dir

    found = sorted(Path(cache_dir(), "models").glob(f"{name}-*"))
    found = [d for d in found if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()]
    if not found:
        pytest.skip(f"no local {name} model under {cache_dir() / 'models'}")
    return AutoTokenizer.from_pretrained(str(found[0]), local_files_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("src, tgt", [("smollm2-135m", "gemma3-270m"), ("gemma3-270m", "smollm2-135m")])
def test_real_tokenizers_rarely_drop(src, tgt):
    src_tok, tgt_tok = _real_tokenizer(src), _real_tokenizer(tgt)
    kept = dropped = kept_ascii = dropped_ascii = 0
    for text in REAL_ANSWERS:
        al = align_chunks(text, src_tok, tgt_tok)
        assert_kept_exact(al, src_tok, tgt_tok)
        kept, dropped = kept + len(al.chunks), dropped + len(al.dropped)
        if text.isascii():
            kept_ascii, dropped_ascii = kept_ascii + len(al.chunks), dropped_ascii + len(al.dropped)
    assert kept_ascii > 100
    assert dropped_ascii < 0.05 * (kept_ascii + dropped_ascii)
    assert dropped <= 0.1 * (kept + dropped)
