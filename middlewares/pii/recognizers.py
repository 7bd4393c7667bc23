"""Built-in, offline PII recognizers: regular expressions plus checksums, no model.

`Recognizers(entities).analyze(text)` returns the entities found in `text` as `Span`s:
sorted by start, never overlapping. When two candidates overlap, the longer one wins,
then the higher score, then the stricter check (card, IBAN, API key, e-mail, SSN, IP,
phone); `resolve_overlaps` applies the same rule to spans from elsewhere.

This runs on every prompt, so the expensive part is skipped whenever a cheap test says
it cannot match:

- e-mail addresses are looked for only around each ``@``;
- numbers (cards, SSNs, phones, IPv4, IBANs) only inside the runs of digits and
  separators long enough to hold one, and only when the text holds at least four
  ASCII digits;
- IPv6 only where ``::`` (after a whole hex group) or ``:h:h:h:`` occurs;
- each API-key family only when its fixed prefix occurs (``sk-``, ``AKIA``, ``eyJ``...).

The runs (with the gates each entity's pattern needs), the key prefixes and the
``local@domain`` shapes around each ``@`` are found by one pass over the text, `scan`: in
C (``middlewares/pii/_scan.c``, built at install when a compiler is there) or, without it, by
`scan_python`, which finds the same with the regex engine (the tests compare the two).
Everything after that, every other entity pattern and check, is Python.

Candidates are then validated in Python (Luhn, mod-97, ranges, context). The rules for
the judgement calls:

EMAIL_ADDRESS  ``local@domain.tld``: local part of letters, digits and ``._%+-``; the
    domain needs a dot and an alphabetic TLD of 2+ letters (``a@b``, ``@handle`` and
    ``user@localhost`` are not addresses). In a URL's authority (``scheme://`` with no
    ``/`` before the ``@``) ``user@host`` is userinfo and host, not an address, unless
    another ``@`` follows it (``ftp://bob@example.com@ftp.example.org``).
PHONE_NUMBER  ``+`` and 8-15 digits in groups (E.164, ``+44 (0)20 ...``); North
    American ``(415) 555-2671``, ``415-555-2671``, ``415.555.2671`` (same separator
    twice), with an optional leading ``1``; national numbers with a trunk ``0`` and
    at least one space or dash, 9-12 digits (``020 7946 0958``, ``030 901820``,
    ``01 23 45 67 89``). Unseparated digits without ``+`` are never a phone (order ids),
    and neither are dates, prices, versions or IPv4 addresses (none has these shapes).
    Trailing groups past the digit limit are dropped (``... 0958 12 times``).
CREDIT_CARD  13-19 digits, unseparated or in groups (4-4-4-x, 4-6-4/5) with one kind of
    separator, first digit 2-6 (every major network), Luhn-valid.
US_SSN  ``AAA-GG-SSSS`` or ``AAA GG SSSS``: area not 000, 666 or 900-999, group not 00,
    serial not 0000, and not one of the numbers the SSA voided after they were printed
    in public (078-05-1120, 219-09-9999). Nine unseparated digits count only when
    ``SSN``, ``SS#`` or ``social security`` appears in the 40 characters before them.
IP_ADDRESS  IPv4 with every octet 0-255; IPv6 full or compressed, with an IPv4 tail or
    a ``%zone``. An IPv4-shaped string is a version, not an address, when one of the
    words version/ver/v/release/rel/build/firmware/fw/kernel/python/py/pip/npm/sdk/
    tag/rev/revision/patch ends at most a few characters before it (``version 1.2.3.4``,
    ``release: 10.0.0.1``, ``build is 1.2.3.4``), or when ``-alpha``/``-beta``/``-rc``/
    ``-dev``/``-pre`` follows it. ``node`` is deliberately not on the list: a Node.js
    version never has four parts, while "node 10.0.0.5" is a cluster node's address.
    A compressed IPv6 needs a decimal digit (so ``a::b`` in code is not one), and
    ``x[::2]``, ``a[1::3]`` (``::`` right after ``name[`` or ``name[h``) is a slice.
IBAN_CODE  country, two check digits, BBAN, upper case, unseparated or in groups of
    four; the length must be the country's (table below) and mod-97 must give 1.
API_KEY  ``sk-`` keys (OpenAI, ``sk-proj-``, Anthropic ``sk-ant-``) with 20+ characters
    after ``sk-``, a digit among them, and a run of 16+ characters without ``-``/``_`` (so
    ``sk-learn-v1-compatible-estimators`` is prose); Stripe ``sk_/rk_`` live/test; AWS
    ``AKIA``/``ASIA`` + 16; GitHub ``gh[pousr]_`` + 36+ and ``github_pat_``; Slack
    ``xox[abprse]-`` with a digit; Google ``AIza`` + 35; JWTs (``eyJ...eyJ...sig``);
    and any 20+ character token with a letter and a digit after ``Bearer `` (the span
    is the token, not the word ``Bearer``).

Context-dependent results (9-digit SSNs, opaque bearer tokens) carry a lower score.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from functools import partial
from typing import Callable, Iterable, NamedTuple

try:
    from llmproxy.middlewares.pii._scan import scan as scan_compiled
except ImportError:  # not built (no compiler at install): scan_python does the same
    scan_compiled = None

__all__ = ["ENTITIES", "Recognizers", "Span", "resolve_overlaps", "scan_compiled", "scan_python"]


class Span(NamedTuple):  # a tuple: cheap to make, sorts by position
    start: int  # character offsets into the analysed str
    end: int
    entity: str
    score: float = 1.0


# Span((start, end, entity, score)) without the Python-level __new__ of a NamedTuple: the
# recognizers make one per entity found.
_span = partial(tuple.__new__, Span)
Pairs = list[tuple[int, int]]  # (start, end) of each candidate `scan` found


EMAIL = "EMAIL_ADDRESS"
PHONE = "PHONE_NUMBER"
CARD = "CREDIT_CARD"
SSN = "US_SSN"
IP = "IP_ADDRESS"
IBAN = "IBAN_CODE"
API_KEY = "API_KEY"

ENTITIES: frozenset[str] = frozenset({EMAIL, PHONE, CARD, SSN, IP, IBAN, API_KEY})

# Ties in length and score go to the entity whose check is the strictest.
_PRIORITY = {e: i for i, e in enumerate((CARD, IBAN, API_KEY, EMAIL, SSN, IP, PHONE))}

_SCORE_PHONE = 0.75
_SCORE_SSN = 0.9
_SCORE_SSN_CONTEXT = 0.6
_SCORE_IP = 0.9
_SCORE_BEARER = 0.8

_DIGITS = b"0123456789"
_DROP_DIGITS = {ord(c): None for c in "0123456789"}

# -- e-mail -----------------------------------------------------------------------

# The local part, read backwards from the "@" (a dot-atom reads the same both ways).
_LOCAL_REVERSED = re.compile(r"[A-Za-z0-9_%+\-]+(?:\.[A-Za-z0-9_%+\-]+)*")
_LOCAL_MAX = 64
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![A-Za-z0-9\-])"
)
_AUTHORITY_END = re.compile(r"[\s/?#]")


def _email_candidates(text: str) -> Pairs:
    """`local@domain` around each "@" (scan_python's; _scan.c finds the same)."""
    found = []
    at = text.find("@")
    while at != -1:
        lo = at - _LOCAL_MAX if at > _LOCAL_MAX else 0
        local = _LOCAL_REVERSED.match(text[lo:at][::-1])
        domain = _DOMAIN.match(text, at + 1) if local else None
        if domain:
            found.append((at - local.end(), domain.end()))
        at = text.find("@", at + 1)
    return found


def _find_emails(text: str, candidates: Pairs, out: list[Span]) -> None:
    for start, end in candidates:
        if not _in_url_authority(text, start) or text.startswith("@", end):
            out.append(_span((start, end, EMAIL, 1.0)))


def _in_url_authority(text: str, start: int) -> bool:
    """True when `start` is inside the ``user:pass@host`` part of a ``scheme://`` URL."""
    scheme = text.rfind("://", max(0, start - 256), start)
    return scheme != -1 and not _AUTHORITY_END.search(text, scheme + 3, start)


# -- numbers: cards, SSNs, phones, IPv4, IBANs -----------------------------------------

# A run of digits and the separators numbers are written with, kept only when it can
# hold an entity: 9+ digits (card, SSN, national phone) or 8+ after a "+" (international
# phone), at most two separators apart, or an IPv4 shape, or digits right after two
# capitals (IBAN). The entity patterns below run only inside such runs, plus two
# characters of context on each side. An entity that starts inside a run gets a run of
# its own: a run never starts right after a digit, but may after a separator.
_NUMBER_RUN = re.compile(
    r"[0-9](?<![0-9][0-9])(?:(?:[ \t\u00a0().\-/]{0,2}+[0-9]){8}|(?<=\+[0-9])(?:[ \t\u00a0().\-/]{0,2}+[0-9]){7}"
    r"|(?<=[A-Z][A-Z][0-9])[0-9]|[0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9])[0-9 \t\u00a0().\-/]*"
)
# The same in an ASCII text's "shape", which is faster to search: each digit becomes d,
# "." p, "+" P, another separator s, a capital letter A, anything else x; the literal
# first byte lets the regex engine jump from digit to digit.
_SHAPE = bytes(
    ord("d") if "0" <= c <= "9" else ord("p") if c == "." else ord("P") if c == "+"
    else ord("s") if c in " \t()-/" else ord("A") if "A" <= c <= "Z" else ord("x")
    for c in map(chr, range(256))
)  # fmt: skip
_SHAPE_RUN = re.compile(
    rb"d(?<!dd)(?:(?:[sp]{0,2}+d){8}|(?<=Pd)(?:[sp]{0,2}+d){7}|(?<=AAd)d|d{0,2}pd{1,3}pd{1,3}pd)[dsp]*"
)

_CARD = re.compile(
    r"""(?<!\w)(?<![0-9][ .,\-])[2-6](?:
        [0-9]{12,18}+(?!\w)(?![.,][0-9])
      | [0-9]{3}(?P<s>[ \-])[0-9]{4}(?P=s)[0-9]{4}(?P=s)[0-9]{1,4}(?:(?P=s)[0-9]{1,3})?
        (?!\w)(?!(?P=s)[0-9])(?![.,][0-9])
      | [0-9]{3}(?P<t>[ \-])[0-9]{6}(?P=t)[0-9]{4,5}(?!\w)(?!(?P=t)[0-9])(?![.,][0-9])
    )""",
    re.X,
)

_SSN = re.compile(
    r"(?<!\w)(?<![0-9][ .,\-])(?:[0-9]{3}(?P<s>[ \-])[0-9]{2}(?P=s)[0-9]{4}|(?P<plain>[0-9]{9}))"
    r"(?!\w)(?![.,\-][0-9])"
)
_SSN_CONTEXT = re.compile(r"(?i)\bssns?\b|\bss#|\bsocial[\s\-]+security\b")
_SSN_CONTEXT_WINDOW = 40
_SSN_VOIDED = frozenset({"078051120", "219099999"})

_PHONE_INTERNATIONAL = re.compile(
    r"(?<![\w+])\+[1-9](?:[0-9]|[ .\-](?=[0-9]|\([0-9]{1,4}\))|\([0-9]{1,4}\))*+(?!\w)(?![.\-/][0-9])"
)
_PHONE_NANP = re.compile(
    r"""(?<![\w+])(?<![0-9][ .\-])(?:1[ .\-]?)?(?:
        \([0-9]{3}\)\ ?[0-9]{3}[ .\-][0-9]{4}
      | [0-9]{3}(?P<s>[ .\-])[0-9]{3}(?P=s)[0-9]{4}
    )(?!\w)(?![.\-/][0-9])""",
    re.X,
)
_PHONE_TRUNK = re.compile(
    r"(?<![\w+])(?<![0-9][ .\-/])(?:\(0[0-9]{1,4}\)\ ?|0[0-9]{1,4}[ \-])"
    r"[0-9]{2,8}+(?:[ \-][0-9]{2,8}+){0,3}+(?!\w)(?![.\-/][0-9])",
    re.X,
)

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9]?[0-9])"  # 0-255, leading zeros allowed
_IPV4 = re.compile(rf"(?<!\w)(?<![0-9]\.){_OCTET}(?:\.{_OCTET}){{3}}(?!\w)(?!\.[0-9])")
# A version word ending just before an IPv4-shaped string; matched on the reversed text
# before it (anchored at the string's start, so no scan): word, optional ".", up to two
# blanks, optional ":"/"="/"#" and blanks, optional "is"/"was"/"to"/"of" and blanks.
_VERSION_WORDS = ("version", "ver", "v", "release", "rel", "build", "firmware", "fw", "kernel", "python",
                  "py", "pip", "npm", "sdk", "tag", "rev", "revision", "patch")
_VERSION_WINDOW = 24
_VERSION_BEFORE_REVERSED = re.compile(
    r"(?i)(?:[ \t]{1,2}(?:si|saw|ot|fo))?(?:[ \t]{0,2}[:=#])?[ \t]{0,2}\.?"
    r"(?:" + "|".join(sorted((w[::-1] for w in _VERSION_WORDS), key=len, reverse=True)) + r")(?!\w)"
)
_VERSION_AFTER = re.compile(r"(?i)-(?:alpha|beta|rc|dev|pre)")

_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?:\ ?[A-Z0-9]{4}){2,7}+(?:\ ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"
)
_IBAN_LENGTH = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


_LUHN_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")  # 2d, its digits summed


def _luhn_ok(digits: str) -> bool:
    """Luhn over ASCII digits: the byte values summed, less 48 ("0") per digit."""
    b = digits.encode("ascii")
    return (sum(b[-1::-2]) + sum(b[-2::-2].translate(_LUHN_DOUBLED)) - 48 * len(b)) % 10 == 0


def _mod97_ok(iban: str) -> bool:
    n = 0
    for ch in iban[4:] + iban[:4]:
        n = (n * (10 if ch <= "9" else 100) + int(ch, 36)) % 97
    return n == 1


def _digit_count(s: str) -> int:
    return len(s) - len(s.translate(_DROP_DIGITS))


def _trim_groups(s: str, most: int) -> str:
    """Drop trailing separated groups until `s` holds at most `most` digits."""
    digits, cut = 0, 0
    for i, ch in enumerate(s):
        if "0" <= ch <= "9":
            digits += 1
            if digits > most:
                return s[:cut]
        elif ch in " .-":
            cut = i
    return s


# Gates on a run's shape (ASCII texts), each a superset of what its pattern can match:
# a pattern runs only when the run holds the digit groups it needs.
_SSN_SHAPE = re.compile(rb"(?<!d)(?:dddsddsdddd|d{9})(?!d)")  # 3-2-4 or 9 in a row
_NANP_SHAPE = re.compile(rb"ddd[sp]{1,2}ddd[sp]dddd")  # 3-3-4, "(415) " included
_TRUNK_SHAPES = (b"dsd", b"dssd")  # a group, "-", " " or ")" and maybe " ", a group

# A run as `scan` reports it: (start, end, digits, last, flags): its digit count, the end
# of its last digit, and these bits (the same values in _scan.c):
RUN_SHAPED = 1  # the text is ASCII: the shape gates below were applied
RUN_PLUS = 2  # a "+" right before the run
RUN_IBAN = 4  # two capitals right before it
RUN_DOTS = 8  # 3+ "." in it
RUN_SSN = 16  # _SSN_SHAPE matches its shape (always set when not RUN_SHAPED)
RUN_NANP = 32  # _NANP_SHAPE matches its shape (always set when not RUN_SHAPED)
RUN_TRUNK = 64  # a "0" in it and (not RUN_SHAPED or a _TRUNK_SHAPES in its shape)
Run = tuple[int, int, int, int, int]
Scan = tuple[list[Run], int, Pairs, Pairs, Pairs, Pairs]  # runs, keys, emails, cards, ipv4s, sks
_RUN_SEPARATORS = " \t\u00a0().-/"


def _run_window(text: str, start: int, end: int) -> tuple[int, int]:
    """Where the entity patterns look for a run: 2 characters of context on each side."""
    return start - 2 if start > 2 else 0, min(end + 2, len(text))


def _card_matches(text: str, lo: int, hi: int) -> Pairs:
    found = []
    for m in _CARD.finditer(text, lo, hi):
        if _luhn_ok(m.group().replace(" ", "").replace("-", "")):
            found.append(m.span())
    return found


def _run_info(text: str, start: int, end: int, shaped: bool) -> Run:
    """`scan_python`'s account of one run (what _scan.c computes in C)."""
    run = text[start:end]
    if shaped:
        sh = run.encode("ascii").translate(_SHAPE)
        digits = sh.count(100)  # b"d"
        flags = RUN_SHAPED
        if _SSN_SHAPE.search(sh):
            flags |= RUN_SSN
        if _NANP_SHAPE.search(sh):
            flags |= RUN_NANP
        if "0" in run and (_TRUNK_SHAPES[0] in sh or _TRUNK_SHAPES[1] in sh):
            flags |= RUN_TRUNK
    else:
        digits = _digit_count(run)
        flags = RUN_SSN | RUN_NANP | (RUN_TRUNK if "0" in run else 0)
    if start and text[start - 1] == "+":
        flags |= RUN_PLUS
    if start >= 2 and "A" <= text[start - 2] <= "Z" and "A" <= text[start - 1] <= "Z":
        flags |= RUN_IBAN
    if run.count(".") >= 3:
        flags |= RUN_DOTS
    return start, end, digits, start + len(run.rstrip(_RUN_SEPARATORS)), flags


class _Numbers:
    """Cards, SSNs, phones, IPv4 and IBANs: everything found inside runs of digits."""

    __slots__ = ("card", "ssn", "phone", "ipv4", "iban")

    def __init__(self, entities: frozenset[str]) -> None:
        self.card, self.ssn, self.phone = CARD in entities, SSN in entities, PHONE in entities
        self.ipv4, self.iban = IP in entities, IBAN in entities

    def __call__(self, text: str, runs: list[Run], cards: Pairs, ipv4s: Pairs, out: list[Span]) -> None:
        """The entities inside `runs` (`scan`'s runs of digits and separators); `cards` and
        `ipv4s` are the matches `scan` found in them already."""
        if self.card:
            for start, end in cards:
                out.append(_span((start, end, CARD, 1.0)))
        if self.ipv4 and ipv4s:
            self._ipv4(text, ipv4s, out)
        n = len(text)
        ssn, phone, iban = self.ssn, self.phone, self.iban
        for start, end, digits, last, flags in runs:
            if iban and flags & RUN_IBAN:
                self._iban(text, start - 2, out)
            if end - start < 7:
                continue
            hi = end + 2 if end + 2 < n else n
            if digits < 9:
                if phone and digits == 8 and flags & RUN_PLUS:
                    self._phones(text, start, hi, digits, last, flags, out)
                continue
            if phone and flags & (RUN_PLUS | RUN_NANP | RUN_TRUNK):
                self._phones(text, start, hi, digits, last, flags, out)
            if ssn and flags & RUN_SSN:
                self._ssns(text, start - 2 if start > 2 else 0, hi, out)

    @staticmethod
    def _ssns(text: str, lo: int, hi: int, out: list[Span]) -> None:
        for m in _SSN.finditer(text, lo, hi):
            s = m.group()
            digits = s if m.group("plain") else s[0:3] + s[4:6] + s[7:]
            area = digits[:3]
            if (
                area == "000" or area == "666" or area[0] == "9" or digits[3:5] == "00"
                or digits[5:] == "0000" or digits in _SSN_VOIDED
            ):  # fmt: skip
                continue
            if not m.group("plain"):
                out.append(_span((m.start(), m.end(), SSN, _SCORE_SSN)))
            elif _SSN_CONTEXT.search(text, max(0, m.start() - _SSN_CONTEXT_WINDOW), m.start()):
                out.append(_span((m.start(), m.end(), SSN, _SCORE_SSN_CONTEXT)))

    @staticmethod
    def _phones(text: str, start: int, hi: int, digits: int, last: int, flags: int, out: list[Span]) -> None:
        lo = start - 2 if start > 2 else 0
        candidates = []  # (match, fewest digits, most digits)
        if flags & RUN_PLUS:  # "+" is no run character: it can only come first
            m = _PHONE_INTERNATIONAL.match(text, start - 1, hi)
            if m is not None and flags & RUN_SHAPED and m.end() >= last:
                # The number spans the whole run (its digits are the run's): a national
                # match inside it would be shorter and lose to it.
                if 8 <= digits <= 15:
                    out.append(_span((m.start(), m.end(), PHONE, _SCORE_PHONE)))
                    return
            candidates.append((m, 8, 15))
        if digits >= 10 and flags & RUN_NANP:
            candidates.extend((m, 10, 11) for m in _PHONE_NANP.finditer(text, lo, hi))
        if digits >= 9 and flags & RUN_TRUNK:
            candidates.extend((m, 9, 12) for m in _PHONE_TRUNK.finditer(text, lo, hi))
        for m, fewest, most in candidates:
            if m is not None:
                s = m.group()
                count = _digit_count(s)
                if count > most:
                    s = _trim_groups(s, most)
                    count = _digit_count(s)
                if s and count >= fewest:
                    out.append(_span((m.start(), m.start() + len(s), PHONE, _SCORE_PHONE)))

    @staticmethod
    def _ipv4(text: str, ipv4s: Pairs, out: list[Span]) -> None:
        for start, end in ipv4s:  # _IPV4's matches: octets 0-255
            if text.startswith("-", end) and _VERSION_AFTER.match(text, end):
                continue
            before = text[start - _VERSION_WINDOW if start > _VERSION_WINDOW else 0 : start]
            if _VERSION_BEFORE_REVERSED.match(before[::-1]):
                continue
            out.append(_span((start, end, IP, _SCORE_IP)))

    @staticmethod
    def _iban(text: str, at: int, out: list[Span]) -> None:
        m = _IBAN.match(text, at)
        if not m:
            return
        s = m.group()
        length = _IBAN_LENGTH.get(s[:2])
        if length is None:
            return
        compact = s.replace(" ", "")
        if len(compact) < length:
            return
        if len(compact) > length:  # a following word was taken for a group: cut it off
            cut, seen = 0, 0
            while seen < length:
                seen += s[cut] != " "
                cut += 1
            if s[cut] != " ":
                return
            s, compact = s[:cut], compact[:length]
        if _mod97_ok(compact):
            out.append(_span((at, at + len(s), IBAN, 1.0)))


# -- IPv6 ---------------------------------------------------------------------------

# Every IPv6 address holds "::" or ":h:h:h:"; the search jumps from colon to colon.
# "::" counts only after a whole hex group (so std::vector is not looked at) and not
# right after "name[" or "name[h" (x[::2], a[1::3] are slices).
_IPV6_HINT = re.compile(
    r":(?::(?:(?<![\w.]::)(?<![\w)\]]\[::)"
    + "".join(
        rf"|(?<=[0-9A-Fa-f]{{{k}}}::)(?<![\w.][0-9A-Fa-f]{{{k}}}::)(?<![\w)\]]\[[0-9A-Fa-f]{{{k}}}::)"
        for k in range(1, 5)
    )
    + r")|[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:)"
)
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.])[0-9A-Fa-f:]{2,39}(?:(?<=:)[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?:%[0-9A-Za-z._~\-]+)?"
    r"(?![\w:])(?!\.[0-9])"
)
_IPV4_TAIL = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")


def _ipv6_groups(addr: str) -> int:
    """How many 16-bit groups `addr` (no zone) spells out, or -1 if it is no IPv6."""
    if "." in addr:
        i = addr.rfind(":")
        tail = addr[i + 1 :]
        if not _IPV4_TAIL.fullmatch(tail) or any(int(o) > 255 for o in tail.split(".")):
            return -1
        addr = addr[: i + 1] + "0:0"
    if "::" in addr:
        if addr.count("::") > 1 or ":::" in addr:
            return -1
        head, tail = addr.split("::")
        groups = (head.split(":") if head else []) + (tail.split(":") if tail else [])
        if not groups or len(groups) > 7:
            return -1
    else:
        groups = addr.split(":")
        if len(groups) != 8:
            return -1
    return len(groups) if all(0 < len(g) <= 4 for g in groups) else -1


_HEX_COLON_RUN = re.compile(r"[0-9A-Fa-f:]*")


def _find_ipv6(text: str, out: list[Span]) -> None:
    pos = 0
    while hint := _IPV6_HINT.search(text, pos):
        start = hint.start()
        floor = max(0, start - 40)
        while start > floor and text[start - 1] in _HEX_COLON:
            start -= 1
        if start == floor and floor > 0 and text[floor - 1] in _HEX_COLON:
            # Inside a run of hex digits and colons longer than any address: an address
            # starts only where such a run does, so none is in the rest of this one.
            pos = _HEX_COLON_RUN.match(text, hint.start()).end() + 1
            continue
        m = _IPV6_CANDIDATE.match(text, start)
        if m is None:
            pos = hint.start() + 1
            continue
        pos = max(m.end(), hint.start() + 1)
        addr = m.group().partition("%")[0]
        if _ipv6_groups(addr) < 0:
            continue
        if "::" in addr and not any("0" <= c <= "9" for c in addr):
            continue  # a::b, dead::beef: more likely code than an address
        out.append(_span((m.start(), m.end(), IP, _SCORE_IP)))


# -- API keys -----------------------------------------------------------------------


_HAS_DIGIT = re.compile(r"[0-9]")
_HAS_LETTER = re.compile(r"[A-Za-z]")


def _has_letter_and_digit(s: str) -> bool:
    return _HAS_DIGIT.search(s) is not None and _HAS_LETTER.search(s) is not None


# The key prefixes `scan` reports, as bits (the same values in _scan.c). A bit may be set
# when its prefix is absent (scan_python sets KEY_AWS and KEY_GITHUB on weaker evidence),
# never the other way round: a family whose bit is clear cannot match.
KEY_SK = 1  # "sk-"
KEY_XOX = 2  # "xox" + one of abprse + "-"
KEY_AWS = 4  # "AKIA", "ASIA", "AIza"
KEY_STRIPE = 8  # "k_live_", "k_test_"
KEY_GITHUB = 16  # "gh" + one of pousr + "_", "github_pat_"
KEY_JWT = 32  # "eyJ"
KEY_BEARER = 64  # "Bearer", "bearer", "BEARER" (scan_python: "earer", "EARER")
# The prefixes whose patterns run in Python (`scan` itself finds the "sk-" keys).
_FAMILY_BITS = KEY_XOX | KEY_AWS | KEY_STRIPE | KEY_GITHUB | KEY_JWT | KEY_BEARER
HINT_IPV6 = 128  # not a key: ":" before ":" or a hex digit (scan_python: any ":")

# (bit, pattern, check of the match or None): a pattern runs only when its prefix's bit is
# set; patterns start with a literal so the regex engine can skip ahead, and look behind
# only after it.
_KeyFamily = tuple[int, re.Pattern[str], Callable[[str], bool] | None]
_DASH_KEY = re.compile(r"-(?:(?<=(?P<sk>sk)-)|(?<=(?P<xox>xox[abprse])-))")
# "sk-" keys (OpenAI, Anthropic): `scan` finds them. The body after "sk-" (the whole
# token: the lookaheads cannot leave it) needs a digit and a 16+ character stretch without
# "-"/"_" (module docstring).
_SK_KEY = re.compile(r"sk-(?<![\w\-]...)(?=[A-Za-z0-9_\-]*?[0-9])(?=[A-Za-z0-9_\-]*?[A-Za-z0-9]{16})"
                     r"[A-Za-z0-9_\-]{20,}")
_KEY_FAMILIES: tuple[_KeyFamily, ...] = (
    (
        KEY_AWS,
        re.compile(
            r"A(?:KIA|SIA)(?<![\w\-]....)[A-Z0-9]{16}(?![\w\-])"
            r"|AIza(?<![\w\-]....)[A-Za-z0-9_\-]{35}(?![\w\-])"
        ),
        None,
    ),
    (
        KEY_STRIPE,
        re.compile(r"[sr]k_(?<![\w\-]...)(?:live|test)_[A-Za-z0-9]{16,}(?![\w\-])"),
        None,
    ),
    (
        KEY_GITHUB,
        re.compile(
            r"g(?:h[pousr]_(?<![\w\-]....)[A-Za-z0-9]{36,255}|ithub_pat_(?<![\w\-]...........)[A-Za-z0-9_]{30,255})"
            r"(?![\w\-])"
        ),
        None,
    ),
    (
        KEY_XOX,
        re.compile(r"xox(?<![\w\-]...)[abprse]-[A-Za-z0-9\-]{10,}"),
        _has_letter_and_digit,
    ),
    (
        KEY_JWT,
        re.compile(r"eyJ(?<![\w\-]...)[A-Za-z0-9_\-]{10,}+\.eyJ[A-Za-z0-9_\-]{10,}+\.[A-Za-z0-9_\-]{10,}+(?![\w\-])"),
        None,
    ),
)
_BEARER = re.compile(r"(?<!\w)(?:Bearer|bearer|BEARER)[ \t]+([A-Za-z0-9\-._~+/]{20,}=*)")


# The families to look for, by the bits `scan` set (the families' bits are all below 64).
_FAMILIES_BY_BITS = tuple(tuple(f for f in _KEY_FAMILIES if bits & f[0]) for bits in range(64))


def _find_api_keys(text: str, keys: int, sks: Pairs, out: list[Span]) -> None:
    """The "sk-" keys `scan` found, and the API keys of the families whose prefix bit is
    set in `keys`."""
    for start, end in sks:
        out.append(_span((start, end, API_KEY, 1.0)))
    for _, pattern, check in _FAMILIES_BY_BITS[keys & 63]:
        for m in pattern.finditer(text):
            if check is None or check(m.group()):
                out.append(_span((m.start(), m.end(), API_KEY, 1.0)))
    if keys & KEY_BEARER:
        for m in _BEARER.finditer(text):
            token = m.group(1).rstrip(".")
            if len(token) >= 20 and _has_letter_and_digit(token):
                start = m.start(1)
                out.append(_span((start, start + len(token), API_KEY, _SCORE_BEARER)))


# -- the one pass --------------------------------------------------------------------


def scan_python(text: str) -> Scan:
    """`(runs, keys, emails, cards, ipv4s, sks)`: the runs of digits and separators that
    can hold a number entity (`_SHAPE_RUN` over an ASCII text's shape, `_NUMBER_RUN` over
    any other text holding 4+ digits), each as a `Run`; the KEY_* bits of the key
    prefixes present (plus HINT_IPV6); the e-mail address candidates (before the URL
    rule); the Luhn-valid `_CARD` matches in runs of 7+ characters with 13+ digits; the
    `_IPV4` matches in runs of 7+ characters with 3+ dots (before the version rule), both
    in the run's window (`_run_window`); the `_SK_KEY` matches. What `_scan.c` computes
    in one pass; used when it is not built."""
    if text.isascii():
        found = _SHAPE_RUN.finditer(text.encode("ascii").translate(_SHAPE))
        runs = [_run_info(text, *m.span(), True) for m in found]
    else:
        data = text.encode("utf-8", "surrogatepass")
        digits = len(data) - len(data.translate(None, _DIGITS))
        runs = [_run_info(text, *m.span(), False) for m in _NUMBER_RUN.finditer(text)] if digits >= 4 else []
    cards: Pairs = []
    ipv4s: Pairs = []
    for start, end, digits, _, flags in runs:
        if end - start >= 7:
            lo, hi = _run_window(text, start, end)
            if digits >= 13:
                cards += _card_matches(text, lo, hi)
            if flags & RUN_DOTS:
                ipv4s += [m.span() for m in _IPV4.finditer(text, lo, hi)]
    keys = KEY_AWS  # the pattern's literal "A" is its own fast gate
    if "-" in text:
        for m in _DASH_KEY.finditer(text):
            keys |= KEY_SK if m.lastgroup == "sk" else KEY_XOX
    if "_" in text:
        keys |= KEY_GITHUB
        if "k_live_" in text or "k_test_" in text:
            keys |= KEY_STRIPE
    if "J" in text and "eyJ" in text:
        keys |= KEY_JWT
    if "earer" in text or ("R" in text and "EARER" in text):
        keys |= KEY_BEARER
    if ":" in text:
        keys |= HINT_IPV6
    sks = [m.span() for m in _SK_KEY.finditer(text)] if keys & KEY_SK else []
    return runs, keys, _email_candidates(text), cards, ipv4s, sks


# -- the recognizer set ------------------------------------------------------------


def resolve_overlaps(spans: Iterable[Span]) -> list[Span]:
    """`spans` sorted by start with overlaps removed: of two overlapping spans the longer
    stays, then the higher score, then the built-in entity with the stricter check (any
    other entity name after those), then the earlier one. Usable on spans from elsewhere
    (a Presidio analyzer) too. Empty spans are dropped."""
    return _resolve([s for s in spans if s.start < s.end])


def _resolve(given: list[Span]) -> list[Span]:
    """resolve_overlaps of non-empty spans (the recognizers make no empty ones)."""
    ordered = sorted(given)  # tuples: by start, then end
    end = 0
    for s in ordered:
        if s.start < end:
            break
        end = s.end
    else:
        return ordered
    last = len(_PRIORITY)
    # Ties (the same start and end) keep the order given.
    ranked = sorted(given, key=lambda s: (s.start - s.end, -s.score, _PRIORITY.get(s.entity, last), s.start))
    starts: list[int] = []
    kept: list[Span] = []
    for s in ranked:
        i = bisect_left(starts, s.start)
        if (i < len(kept) and kept[i].start < s.end) or (i > 0 and kept[i - 1].end > s.start):
            continue
        starts.insert(i, s.start)
        kept.insert(i, s)
    return kept


class Recognizers:
    """The built-in recognizers for a set of entities; build once, call `analyze` often.
    `compiled=False` uses `scan_python` even where the C pass is built (tests, comparison)."""

    __slots__ = ("entities", "key", "scan", "_emails", "_numbers", "_ipv6", "_keys")

    def __init__(self, entities: Iterable[str] = ENTITIES, compiled: bool = True) -> None:
        if isinstance(entities, str):
            raise TypeError("entities must be an iterable of entity names, not one str")
        wanted = frozenset(entities)
        unknown = sorted(wanted - ENTITIES)
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise ValueError(f"unknown PII entity {names} (known: {', '.join(sorted(ENTITIES))})")
        self.entities = wanted
        self.key = ",".join(sorted(wanted))  # the same for equal sets: results can be shared
        self.scan: Callable[[str], Scan] = (
            scan_compiled if compiled and scan_compiled is not None else scan_python)
        self._emails = EMAIL in wanted
        self._numbers = _Numbers(wanted) if wanted & {CARD, SSN, PHONE, IP, IBAN} else None
        self._ipv6 = IP in wanted
        self._keys = API_KEY in wanted

    def analyze(self, text: str) -> list[Span]:
        """The entities in `text`: sorted by start, non-overlapping, offsets into `text`."""
        spans: list[Span] = []
        runs, hints, emails, cards, ipv4s, sks = self.scan(text)
        if emails and self._emails:
            _find_emails(text, emails, spans)
        if runs and self._numbers is not None:
            self._numbers(text, runs, cards, ipv4s, spans)
        if (sks or hints & _FAMILY_BITS) and self._keys:
            _find_api_keys(text, hints, sks, spans)
        if hints & HINT_IPV6 and self._ipv6:
            _find_ipv6(text, spans)
        return _resolve(spans) if len(spans) > 1 else spans
