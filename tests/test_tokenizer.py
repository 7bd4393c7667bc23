"""The offline o200k_base tokenizer: known counts, parity with bpe_openai, hash check."""

from __future__ import annotations

import base64
import gzip
import hashlib
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy import tokenizer
from llmproxy.tokenizer import (
    ENCODINGS,
    TokenizerDataError,
    count_tokens,
    encoding,
    parse_ranks,
    read_ranks,
    warm,
)


@pytest.fixture(scope="module")
def reference_encoder():
    bpe_openai = pytest.importorskip("bpe_openai")
    return bpe_openai.get_encoding("o200k_base")


@pytest.mark.parametrize(
    "text, count",
    [
        ("", 0),
        ("hello world", 2),
        ("Hello, world!", 4),
        ("<|endoftext|>", 7),  # special-token text is counted as plain text
    ],
)
def test_known_counts(text: str, count: int) -> None:
    assert count_tokens(text) == count


@pytest.mark.parametrize(
    "text",
    ["hello world", "The quick brown fox jumps over the lazy dog.", "日本語のテキスト",
     "def f(x):\n    return x ** 2\n", "  leading and trailing  \n\n", "1234567890",
     "emoji 🎉🎉 and ümlauts", "I'm they're we'll you'VE"],
)
def test_matches_bpe_openai(reference_encoder, text: str) -> None:
    assert count_tokens(text) == len(reference_encoder.encode(text))


@settings(deadline=None, max_examples=300)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_matches_bpe_openai_random(reference_encoder, text: str) -> None:
    assert count_tokens(text) == len(reference_encoder.encode(text, disallowed_special=()))


def test_lone_surrogate_does_not_raise() -> None:
    assert count_tokens("a\ud800b") > 0


def test_pattern_and_specials_match_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our copies of pat_str/special tokens equal tiktoken's (its loader stubbed, no download)."""
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})
    for name, spec in ENCODINGS.items():
        theirs = getattr(openai_public, name)()
        assert spec.pat_str == theirs["pat_str"]
        assert spec.special_tokens == theirs["special_tokens"]


def test_encoding_is_built_once_and_complete() -> None:
    warm()
    enc = encoding()
    assert enc is encoding("o200k_base")
    assert enc.name == "o200k_base" and enc.n_vocab == 200019
    assert enc.encode("hello world") == [24912, 2375]


def test_loading_is_thread_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = tokenizer.read_ranks

    def counting(spec):
        calls.append(spec.name)
        return real(spec)

    monkeypatch.setattr(tokenizer, "read_ranks", counting)
    monkeypatch.setattr(tokenizer, "_encodings", {})
    results = []
    threads = [threading.Thread(target=lambda: results.append(encoding("cl100k_base")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["cl100k_base"]
    assert len({id(r) for r in results}) == 1
    assert results[0].encode("hello world") == [15339, 1917]


def test_no_network_when_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ranks = read_ranks(ENCODINGS["cl100k_base"])
    assert len(ranks) == 100256


def test_unknown_encoding() -> None:
    with pytest.raises(KeyError):
        encoding("p50k_base")


# -- the hash check and the parser ---------------------------------------------------


def tiktoken_file(tokens: list[bytes]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens))


def test_parse_ranks_accepts_matching_hash() -> None:
    data = tiktoken_file([b"a", b"b", b"ab"])
    ranks = parse_ranks(data, hashlib.sha256(data).hexdigest())
    assert ranks == {b"a": 0, b"b": 1, b"ab": 2}


def test_real_file_rejects_tampering() -> None:
    spec = ENCODINGS["o200k_base"]
    path = tokenizer.importlib.util.find_spec("bpe_openai").submodule_search_locations[0]
    with open(f"{path}/data/{spec.resource}", "rb") as fh:
        data = gzip.decompress(fh.read())
    assert hashlib.sha256(data).hexdigest() == spec.sha256
    # Swap the ranks of two tokens: still well-formed, but not the pinned file.
    tampered = data.replace(b"IQ== 0\n", b"IQ== 1\n", 1).replace(b"Ig== 1\n", b"Ig== 0\n", 1)
    assert tampered != data
    with pytest.raises(TokenizerDataError, match="hash mismatch"):
        parse_ranks(tampered, spec.sha256)
    with pytest.raises(TokenizerDataError, match="hash mismatch"):
        parse_ranks(data[:-1], spec.sha256)


def test_parse_ranks_rejects_malformed() -> None:
    data = b"YQ== 0\nnot-a-valid-line\n"
    with pytest.raises(TokenizerDataError, match="malformed"):
        parse_ranks(data, hashlib.sha256(data).hexdigest())


def test_read_ranks_reports_bad_bundled_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer, "_bundled", lambda resource: gzip.compress(b"YQ== 0\n"))
    with pytest.raises(TokenizerDataError, match="hash mismatch"):
        read_ranks(ENCODINGS["o200k_base"])
    monkeypatch.setattr(tokenizer, "_bundled", lambda resource: b"not gzip")
    with pytest.raises(TokenizerDataError, match="not valid gzip"):
        read_ranks(ENCODINGS["o200k_base"])
