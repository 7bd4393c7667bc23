"""Built-in PII recognizers: what each entity must catch and must not, overlaps, filtering,
and properties over arbitrary text."""

from __future__ import annotations

import os
import re
import time
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("llmproxy.middlewares.pii", reason="the pii middleware is not installed")
from llmproxy.middlewares.pii import recognizers as rec
from llmproxy.middlewares.pii.recognizers import ENTITIES, Recognizers, Span, resolve_overlaps, scan_compiled, scan_python

# Every test here runs twice: with the compiled one-pass scan (middlewares/pii/_scan.c) and
# with its Python equivalent. ALL and ONLY are rebound per run by the fixture below.
ALL = Recognizers()
ONLY = {entity: Recognizers([entity]) for entity in ENTITIES}


def require_compiled() -> None:
    """Skip without the C scan, except under CI=true: there it must have been built."""
    if scan_compiled is None:
        if os.environ.get("CI") == "true":
            pytest.fail("llmproxy.middlewares.pii._scan is not built (the install found no C compiler?)")
        pytest.skip("llmproxy.middlewares.pii._scan is not built: the Python scan is tested alone")


@pytest.fixture(scope="module", params=["compiled", "python"], autouse=True)
def scan_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    global ALL, ONLY
    compiled = request.param == "compiled"
    if compiled:
        require_compiled()
    ALL = Recognizers(compiled=compiled)
    ONLY = {entity: Recognizers([entity], compiled=compiled) for entity in ENTITIES}
    assert ALL.scan is (scan_compiled if compiled else scan_python)
    yield request.param
    ALL, ONLY = Recognizers(), {entity: Recognizers([entity]) for entity in ENTITIES}


def found(text: str, recognizers: Recognizers | None = None) -> list[tuple[str, str]]:
    return [(text[s.start : s.end], s.entity) for s in (recognizers or ALL).analyze(text)]


# -- sample secrets (built here so no real-looking key sits in the source as one string) --

OPENAI_KEY = "sk-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGhIj"
OPENAI_PROJECT_KEY = "sk-proj-" + "Xy9Zk2Lm4Np6Qr8St0Uv1Wx3Yz5" * 4 + "-Ab_Cd"
ANTHROPIC_KEY = "sk-ant-api03-" + ("Xy9_Zk2-Lm4Np6Qr8St0Uv1Wx3Yz5" * 4)[:93] + "AA"
AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_SESSION_KEY_ID = "ASIA" + "Y34FZKBOKMUTVV7A"
GITHUB_PAT = "ghp_" + "a1B2" * 9
GITHUB_OAUTH = "gho_" + "Z9y8" * 9
GITHUB_FINE_GRAINED = (
    "github_pat_" + "11ABCDEFG0123456789_" + "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVW"
)
SLACK_BOT = "xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
SLACK_USER = "xoxp-" + "123456789012-1234567890123-1234567890123-0123456789abcdef0123456789abcdef"
STRIPE_LIVE = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
STRIPE_RESTRICTED = "rk_live_" + "51H8abcDEF0123456789xyzXYZ"
GOOGLE_KEY = "AIza" + "SyAb3_-Cd4Ef5Gh6Ij7Kl8Mn9Op0Qr1St2Uv3Wx"[:35]
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
OPAQUE_BEARER = "abcdef0123456789ABCDEF0123"

# (text, expected span text); each row's text holds exactly one entity of its table.
MUST_CATCH: dict[str, list[tuple[str, str]]] = {
    "EMAIL_ADDRESS": [
        ("write to jane.doe@example.com today", "jane.doe@example.com"),
        ("bob+newsletter@mail.example.co.uk", "bob+newsletter@mail.example.co.uk"),
        ("x_y-z%1@sub.domain.io", "x_y-z%1@sub.domain.io"),
        ("mailto:alice@example.org", "alice@example.org"),
        ("<carol@example.com>", "carol@example.com"),
        ("ask dave@example.com.", "dave@example.com"),
        ("(EVE@EXAMPLE.DE)", "EVE@EXAMPLE.DE"),
        ("a@b.io", "a@b.io"),
        ("ftp://bob@example.com@ftp.example.org/", "bob@example.com"),  # an address as userinfo
        ("https://example.com/users/erin@example.org", "erin@example.org"),  # in the path, not userinfo
    ],
    "PHONE_NUMBER": [
        ("+14155552671", "+14155552671"),
        ("call +44 20 7946 0958 now", "+44 20 7946 0958"),
        ("+49 30 901820", "+49 30 901820"),
        ("+1 (415) 555-2671", "+1 (415) 555-2671"),
        ("+44 (0)20 7946 0958", "+44 (0)20 7946 0958"),
        ("tel:+33-1-23-45-67-89", "+33-1-23-45-67-89"),
        ("(415) 555-2671", "(415) 555-2671"),
        ("415-555-2671", "415-555-2671"),
        ("415.555.2671", "415.555.2671"),
        ("415 555 2671", "415 555 2671"),
        ("1-800-555-0199", "1-800-555-0199"),
        ("123-456-7890", "123-456-7890"),
        ("020 7946 0958", "020 7946 0958"),
        ("(020) 7946 0958", "(020) 7946 0958"),
        ("07911 123456", "07911 123456"),
        ("030 901820", "030 901820"),
        ("01 23 45 67 89", "01 23 45 67 89"),
        ("call 020 7946 0958 12 times", "020 7946 0958"),  # the trailing count is not dialled
    ],
    "CREDIT_CARD": [
        ("card 4111 1111 1111 1111 exp 12/27", "4111 1111 1111 1111"),
        ("4111-1111-1111-1111", "4111-1111-1111-1111"),
        ("4111111111111111", "4111111111111111"),
        ("5555555555554444", "5555555555554444"),
        ("2223003122003222", "2223003122003222"),
        ("378282246310005", "378282246310005"),
        ("3782 822463 10005", "3782 822463 10005"),
        ("6011111111111117", "6011111111111117"),
        ("4222222222222", "4222222222222"),  # 13 digits
        ("pay with 4242424242424242.", "4242424242424242"),
    ],
    "US_SSN": [
        ("SSN 123-45-6789", "123-45-6789"),
        ("123 45 6789", "123 45 6789"),
        ("id: 001-01-0001", "001-01-0001"),
        ("899-99-9999", "899-99-9999"),
        ("SSN: 123456789", "123456789"),
        ("social security number 234567890", "234567890"),
        ("my ss# is 345678901", "345678901"),
    ],
    "IP_ADDRESS": [
        ("connect to 192.168.1.1 please", "192.168.1.1"),
        ("10.0.0.1", "10.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("255.255.255.255", "255.255.255.255"),
        ("server 10.20.30.40:8080", "10.20.30.40"),
        ("route 10.0.0.0/8", "10.0.0.0"),
        ("node 10.0.0.5", "10.0.0.5"),  # "node" is not a version word
        ("the host is at 172.16.254.1.", "172.16.254.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("ping ::1", "::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("2001:db8::", "2001:db8::"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
        ("::ffff:192.0.2.1", "::ffff:192.0.2.1"),
        ("http://[::1]:8080/", "::1"),
        ("bind to [2001:db8::7] now", "2001:db8::7"),
    ],
    "IBAN_CODE": [
        ("IBAN DE89 3704 0044 0532 0130 00.", "DE89 3704 0044 0532 0130 00"),
        ("DE89370400440532013000", "DE89370400440532013000"),
        ("GB82 WEST 1234 5698 7654 32", "GB82 WEST 1234 5698 7654 32"),
        ("GB82WEST12345698765432", "GB82WEST12345698765432"),
        ("FR14 2004 1010 0505 0001 3M02 606", "FR14 2004 1010 0505 0001 3M02 606"),
        ("ES91 2100 0418 4502 0005 1332", "ES91 2100 0418 4502 0005 1332"),
        ("IT60 X054 2811 1010 0000 0123 456", "IT60 X054 2811 1010 0000 0123 456"),
        ("NL91 ABNA 0417 1643 00", "NL91 ABNA 0417 1643 00"),
        ("CH93 0076 2011 6238 5295 7", "CH93 0076 2011 6238 5295 7"),
        ("AT61 1904 3002 3457 3201", "AT61 1904 3002 3457 3201"),
        ("BE68 5390 0754 7034", "BE68 5390 0754 7034"),
        ("PL61 1090 1014 0000 0712 1981 2874", "PL61 1090 1014 0000 0712 1981 2874"),
        ("NO93 8601 1117 947", "NO93 8601 1117 947"),
        ("BE68 5390 0754 7034 THEN pay", "BE68 5390 0754 7034"),  # a 4-letter word is no group
    ],
    "API_KEY": [
        (f"key={OPENAI_KEY}", OPENAI_KEY),
        (f'"{OPENAI_PROJECT_KEY}"', OPENAI_PROJECT_KEY),
        (f"ANTHROPIC_API_KEY={ANTHROPIC_KEY}", ANTHROPIC_KEY),
        (f"aws_access_key_id = {AWS_KEY_ID}", AWS_KEY_ID),
        (AWS_SESSION_KEY_ID, AWS_SESSION_KEY_ID),
        (f"token {GITHUB_PAT}", GITHUB_PAT),
        (GITHUB_OAUTH, GITHUB_OAUTH),
        (GITHUB_FINE_GRAINED, GITHUB_FINE_GRAINED),
        (SLACK_BOT, SLACK_BOT),
        (SLACK_USER, SLACK_USER),
        (STRIPE_LIVE, STRIPE_LIVE),
        (STRIPE_RESTRICTED, STRIPE_RESTRICTED),
        (f"&key={GOOGLE_KEY}&", GOOGLE_KEY),
        (f"Authorization: Bearer {JWT}", JWT),
        (JWT, JWT),
        (f"Authorization: Bearer {OPAQUE_BEARER}", OPAQUE_BEARER),
        ("sk-1234567890abcdefghij12", "sk-1234567890abcdefghij12"),
    ],
}

# Texts in which the entity's own recognizer (alone, so other entities cannot shadow it)
# finds nothing.
MUST_NOT_CATCH: dict[str, list[str]] = {
    "EMAIL_ADDRESS": [
        "a@b",
        "@handle",
        "ping @jane_doe on slack",
        "user@localhost",
        "name@example.c",
        "foo@bar.123",
        "x@.com",
        "bob.@example.com",
        "https://user:pass@host.com/path",  # userinfo and host, not an address
        "https://alice@example.com/repo.git",
        "git@github",
        "email me at john at example dot com",
    ],
    "PHONE_NUMBER": [
        "2024-01-15",
        "15/01/2024",
        "01/15/2024",
        "01-15-2024",
        "05 11 2024",
        "2024-01-15 12:30:45",
        "$1,234.56",
        "1 234,50 €",
        "€1.234.567,89",
        "version 1.2.3",
        "v10.15.7",
        "Python 3.11.7",
        "order 12345678901234",
        "4155552671",
        "0123456789",
        "order #0012345678",
        "192.168.1.100",
        "10.0.0.1",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "12:30:45",
        "ISBN 978-3-16-148410-0",
        "+1.5",
        "1+2=3",
        "+12 34",
        "415-555.2671",  # mixed separators
        "415-555-26710",
    ],
    "CREDIT_CARD": [
        "order 1234567812345678",  # Luhn-invalid 16 digits
        "4111 1111 1111 1112",
        "4111111111111112",
        "0000000000000000",  # Luhn-valid, no network starts with 0
        "7111111111111110",
        "12345678901234567890",
        "4111 1111 1111 1111 1111",
        "3.4111111111111111",
        "4111 1111-1111 1111",  # mixed separators
        "411111111111",  # 12 digits
        "ID4111111111111111",
    ],
    "US_SSN": [
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "999-99-9999",
        "123-00-4567",
        "123-45-0000",
        "078-05-1120",  # the Woolworth wallet card number, voided
        "219-09-9999",  # printed in an SSA pamphlet, voided
        "order 123456789",  # nine digits without context
        "123-45-67890",
        "1123-45-6789",
        "123-45 6789",
        "2024-01-15",
        "12-345-6789",
        "SSN: 000000000",
    ],
    "IP_ADDRESS": [
        "999.1.1.1",
        "256.1.1.1",
        "1.2.3",
        "1.2.3.4.5",
        "version 1.2.3.4",
        "Version: 1.2.3.4",
        "v1.2.3.4",
        "v 1.2.3.4",
        "release 10.0.0.1",
        "firmware is 2.0.0.1",
        "python 3.11.4.1",
        "build=1.0.0.27",
        "upgraded to 1.2.3.4-beta",
        "12:30:45",
        "2024-01-15T12:30:45Z",
        "00:1A:2B:3C:4D:5E",
        "x[::2]",
        "a[1::3]",
        "std::vector<int>",
        "Foo::Bar::baz()",
        "a::b",
        "dead::beef",
        "1:2:3:4:5:6:7:8:9",
        "2001:db8::1::2",
        "12345::1",
        "2001:db8:::1",
        "::",
    ],
    "IBAN_CODE": [
        "DE89 3704 0044 0532 0130 01",  # bad check digits
        "DE88370400440532013000",
        "DE89 3704 0044 0532 0130",  # too short for DE
        "DE89 3704 0044 0532 0130 0000",  # too long for DE
        "XX89370400440532013000",  # no such country
        "de89370400440532013000",
        "GB82 WEST 1234 5698 7654 32X",
        "ADE89370400440532013000",
        "AB12 order",
    ],
    "API_KEY": [
        "sk-ing",
        "sk-learn",
        "use sk-learn-v1-compatible-estimators-and-pipelines",
        "sk-1234",
        "risk-free-1234567890-abcdefghijklmnop",
        "task-abcdefghijklmnopqrstuvwxyz0123",
        "AKIA1234",
        "AKIAIOSFODNN7EXAMPLEX",
        "akiaiosfodnn7example",
        "ghp_short",
        "ghp_" + "a" * 35,
        "xoxb-",
        "xoxb-hello-world-team",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.payload.signature",
        "Bearer token",
        "the Bearer authentication-scheme-explained",
        "the bearer of good news",
        "pk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",  # publishable, not secret
        "AIza" + "short",
    ],
}


@pytest.mark.parametrize(
    "entity,text,expected",
    [(entity, text, expected) for entity, rows in MUST_CATCH.items() for text, expected in rows],
)
def test_must_catch(entity: str, text: str, expected: str) -> None:
    assert found(text) == [(expected, entity)]
    assert found(text, ONLY[entity]) == [(expected, entity)]


@pytest.mark.parametrize(
    "entity,text", [(entity, text) for entity, rows in MUST_NOT_CATCH.items() for text in rows]
)
def test_must_not_catch(entity: str, text: str) -> None:
    assert found(text, ONLY[entity]) == []


def test_a_prompt_with_five_entities() -> None:
    text = (
        "Hi, I'm Jane (jane.doe+work@example.com, +1 (415) 555-2671). Charge 4111 1111 1111 1111; "
        f"the server is 10.20.30.40 and the key is {OPENAI_PROJECT_KEY}. Running version 1.2.3.4."
    )
    assert found(text) == [
        ("jane.doe+work@example.com", "EMAIL_ADDRESS"),
        ("+1 (415) 555-2671", "PHONE_NUMBER"),
        ("4111 1111 1111 1111", "CREDIT_CARD"),
        ("10.20.30.40", "IP_ADDRESS"),
        (OPENAI_PROJECT_KEY, "API_KEY"),
    ]


def test_ssn_context_must_be_near() -> None:
    far = "SSN below." + " " * 60 + "123456789"
    assert found(far) == []


# -- overlaps ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        # the IPv4 tail is inside the longer IPv6
        ("::ffff:192.0.2.1", [("::ffff:192.0.2.1", "IP_ADDRESS")]),
        # a Luhn-valid card-shaped part of an IBAN loses to the IBAN
        ("DE89 3704 0044 0532 0130 00", [("DE89 3704 0044 0532 0130 00", "IBAN_CODE")]),
        # same span as a trunk-prefixed phone: the SSN scores higher
        ("012-34-5678", [("012-34-5678", "US_SSN")]),
        # "Bearer <jwt>" is found twice (as a JWT, as a bearer token): one span remains
        (f"Bearer {JWT}", [(JWT, "API_KEY")]),
        # +1 and the North American number inside it: the longer one
        ("+1 415-555-2671", [("+1 415-555-2671", "PHONE_NUMBER")]),
    ],
)
def test_overlap_resolution_in_analyze(text: str, expected: list[tuple[str, str]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize(
    "spans,kept",
    [
        ([Span(0, 5, "PHONE_NUMBER"), Span(3, 10, "EMAIL_ADDRESS")], [Span(3, 10, "EMAIL_ADDRESS")]),
        ([Span(0, 8, "PHONE_NUMBER", 0.5), Span(2, 10, "US_SSN", 0.9)], [Span(2, 10, "US_SSN", 0.9)]),
        ([Span(0, 8, "US_SSN", 0.9), Span(0, 8, "PHONE_NUMBER", 0.9)], [Span(0, 8, "US_SSN", 0.9)]),
        ([Span(0, 8, "CREDIT_CARD"), Span(0, 8, "PHONE_NUMBER")], [Span(0, 8, "CREDIT_CARD")]),
        ([Span(0, 4, "PERSON"), Span(0, 4, "IP_ADDRESS")], [Span(0, 4, "IP_ADDRESS")]),
        # the longest first, then what still fits around it
        (
            [Span(0, 4, "A"), Span(3, 12, "B"), Span(11, 15, "C"), Span(12, 14, "D")],
            [Span(3, 12, "B"), Span(12, 14, "D")],
        ),
        ([Span(5, 9, "B"), Span(0, 5, "A")], [Span(0, 5, "A"), Span(5, 9, "B")]),  # touching is fine
        ([Span(0, 3, "A"), Span(0, 3, "A")], [Span(0, 3, "A")]),
        ([], []),
    ],
)
def test_resolve_overlaps(spans: list[Span], kept: list[Span]) -> None:
    assert resolve_overlaps(spans) == kept
    assert resolve_overlaps(list(reversed(spans))) == kept


# -- the constructor -----------------------------------------------------------------


def test_entities_filter_what_is_reported() -> None:
    text = f"mail jane@example.com, call 415-555-2671, key {AWS_KEY_ID}, ip 10.0.0.1"
    assert found(text, Recognizers(["EMAIL_ADDRESS", "API_KEY"])) == [
        ("jane@example.com", "EMAIL_ADDRESS"),
        (AWS_KEY_ID, "API_KEY"),
    ]
    assert found(text, Recognizers(("PHONE_NUMBER", "PHONE_NUMBER"))) == [("415-555-2671", "PHONE_NUMBER")]
    assert Recognizers([]).analyze(text) == []
    assert Recognizers().entities == ENTITIES


def test_entities_are_the_seven() -> None:
    assert ENTITIES == {
        "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IP_ADDRESS", "IBAN_CODE", "API_KEY",
    }  # fmt: skip


def test_unknown_entity_is_named() -> None:
    with pytest.raises(ValueError, match="'PERSON'"):
        Recognizers(["EMAIL_ADDRESS", "PERSON"])


def test_a_bare_string_is_refused() -> None:
    with pytest.raises(TypeError):
        Recognizers("EMAIL_ADDRESS")


def test_empty_and_plain_text() -> None:
    assert ALL.analyze("") == []
    assert ALL.analyze("Please summarise the meeting notes below in three bullet points.") == []


# -- properties ------------------------------------------------------------------------

CAUGHT = [text for rows in MUST_CATCH.values() for text, _ in rows]
NOT_CAUGHT = [text for rows in MUST_NOT_CATCH.values() for text in rows]
# Nine-digit SSNs and opaque bearer tokens count only after their context word.
CONTEXT = {"US_SSN": "SSN ", "API_KEY": "Bearer "}

piiish_text = st.lists(
    st.one_of(
        st.sampled_from(CAUGHT + NOT_CAUGHT),
        st.text(alphabet="0123456789 .-:/()+@_,#[]%abcdefxyzABCDEFSN", max_size=12),
        st.text(max_size=6),
    ),
    max_size=8,
).map("".join)


def check_spans(text: str, spans: list[Span]) -> None:
    for s in spans:
        assert 0 <= s.start < s.end <= len(text)
        assert s.entity in ENTITIES
        assert 0 < s.score <= 1
    for a, b in zip(spans, spans[1:]):
        assert a.end <= b.start


@settings(deadline=None, max_examples=400)
@given(st.one_of(st.text(), piiish_text))
def test_analyze_never_raises_and_returns_sorted_disjoint_spans(text: str) -> None:
    check_spans(text, ALL.analyze(text))


@settings(deadline=None, max_examples=400)
@given(piiish_text)
def test_every_span_is_found_again_on_its_own(text: str) -> None:
    for s in ALL.analyze(text):
        piece = text[s.start : s.end]
        alone = [(x.start, x.end, x.entity) for x in ONLY[s.entity].analyze(piece)]
        if alone != [(0, len(piece), s.entity)] and s.entity in CONTEXT:
            prefix = CONTEXT[s.entity]
            with_context = ONLY[s.entity].analyze(prefix + piece)
            alone = [(x.start - len(prefix), x.end - len(prefix), x.entity) for x in with_context]
        assert alone == [(0, len(piece), s.entity)], (text, piece, s)


# -- the one pass: compiled and Python agree ------------------------------------------

EMAILS = ["a@b.co", "x.y@a-b.c-d.org", "@", "a@", "@b.com", "a@b", "a@b.c", "a.@b.com", ".a@b.com", "a..b@c.de",
          "a@-b.com", "a@b-.com", "a@b.c1.com", "a@b.com1", "a@b.com-x", "a@1.2.3.4", "a@b.co.uk.", "u@" + "x" * 64 + ".com",
          "u@x." + "y" * 64, "http://u:p@h.com/", "\u00e9@b.com", "b@\u00e9.com", "a@b.c\u00e9m"]
KEY_PREFIXES = ["sk-" + "a1" * 10, "sk-" + "a" * 16 + "1-_x", "sk-" + "a-" * 12 + "1", "-sk-" + "a1" * 10, "xsk-" + "1a" * 12,
                "sk-sk-" + "b2" * 12, "sk-" + "\u00e9" + "a1" * 12, "\u00e9sk-" + "a1" * 12, "sk-proj-" + "Zz9" * 8, "sk-", "xoxb-", "xoxq-", "AKIA", "ASIA", "AIza", "AIz", "k_live_", "k_test_", "sk_tes",
                "ghp_", "ghx_", "github_pat_", "github_", "eyJ", "Bearer ", "BEARER", "bearer", "eare", "nearer", "BEArer"]
NUMBERS = ["::1", "fe80::", ":ab", "a:b", "4111-1111-1111-1111", "4111 1111 1111 1", "4111 1111 1111 1111 12",
           "3782 822463 10005", "3782-822463-1000", "5500 0000 0000 0004", "4111111111111111", "41111111111111111111",
           "0.0.0.0", "255.255.255.255", "256.1.1.1", "1.2.3.4.5", "01.02.003.4", "1.2.3.4-rc1", "version 1.2.3.4",
           "\u0661.2.3.4", "x1.2.3.4", "+1 ", "+44 (0)20 ", "DE89", "GB", "4111 1111 1111 1111", "1.2.3.4", "203.0.113.42", "078-05-1120",
           "(415) 555-2671", "12.34.56", "1..2", "9\u00a08"]
scan_text = st.lists(
    st.one_of(
        st.sampled_from(EMAILS + KEY_PREFIXES + NUMBERS + CAUGHT + NOT_CAUGHT),
        st.text(alphabet="ab1.-_%+@ Z", max_size=24),  # e-mail shapes
        st.text(alphabet="0123456789 -./()+\t\u00a0AB", max_size=24),  # the numbers' shapes and gates
        st.text(alphabet="0123456 -.,_a\u0661", min_size=12, max_size=32),  # cards, IPv4
        st.text(alphabet="0123456789 \t\u00a0().-/+_AZBDEGKIS azskxobpregyJRliv\u00e9\u20ac\U0001f600", max_size=16),
        st.text(max_size=4),
    ),
    max_size=10,
).map("".join)


def prefix_bits(text: str) -> int:
    """The KEY_* bits of the prefixes in `text` and HINT_IPV6, by their definition."""
    return (
        rec.KEY_SK * ("sk-" in text)
        | rec.KEY_XOX * bool(re.search(r"xox[abprse]-", text))
        | rec.KEY_AWS * bool(re.search(r"A(?:KIA|SIA|Iza)", text))
        | rec.KEY_STRIPE * ("k_live_" in text or "k_test_" in text)
        | rec.KEY_GITHUB * bool(re.search(r"gh[pousr]_|github_pat_", text))
        | rec.KEY_JWT * ("eyJ" in text)
        | rec.KEY_BEARER * bool(re.search(r"Bearer|bearer|BEARER", text))
        | rec.HINT_IPV6 * bool(re.search(r":[:0-9A-Fa-f]", text))
    )


@pytest.fixture(scope="module")
def once(scan_backend: str) -> None:
    """The comparisons below use both passes themselves: run them in one module pass only."""
    if scan_backend != "compiled":
        pytest.skip("compares both passes; runs with the compiled module pass")


@settings(deadline=None, max_examples=1500)
@given(st.one_of(scan_text, st.text()))
def test_compiled_scan_finds_what_the_python_scan_finds(once: None, text: str) -> None:
    require_compiled()
    runs, keys, emails, cards, ipv4s, sks = scan_compiled(text)
    py_runs, py_keys, py_emails, py_cards, py_ipv4s, py_sks = scan_python(text)
    assert runs == py_runs
    assert emails == py_emails
    assert cards == py_cards
    assert ipv4s == py_ipv4s
    assert sks == py_sks
    assert keys == prefix_bits(text)
    assert keys & ~py_keys == 0  # the Python bits may be set on weaker evidence, never the C ones
    assert Recognizers(compiled=True).analyze(text) == Recognizers(compiled=False).analyze(text)


@pytest.mark.parametrize("text", ["", "7", "\u00e9 a.b@c.de \U0001f600 x@y.io", "\u00e9 12 34", "x\U0001f600 4111 1111 1111 1111 \u00a0+1 415 555 2671",
                                  "\u20ac 1.2.3.4 AKIA", "AB12", "\u00e9AB12", "1" * 9 + "\u00e9"])
def test_compiled_scan_on_every_string_width(once: None, text: str) -> None:
    require_compiled()
    runs, _, emails, cards, ipv4s, sks = scan_python(text)
    assert scan_compiled(text) == (runs, prefix_bits(text), emails, cards, ipv4s, sks)


def test_compiled_scan_takes_only_str(once: None) -> None:
    require_compiled()
    with pytest.raises(TypeError):
        scan_compiled(b"4111 1111 1111 1111")  # type: ignore[arg-type]


# -- cost ------------------------------------------------------------------------------


# Repeated units that once cost (or could cost) more than linear time: runs of digits and
# separators, "@" runs, key prefixes, hex-and-colon runs (IPv6), long words.
ADVERSARIAL = ["1", "1 ", "12-", "1.", "0 12 ", "+1 ", "DE89 ", "DE8", "1:", "a:", "ab:", "::1 ", "@", "@a", "a@",
               "a.", "sk-", "sk-proj-", "xoxb-", "AKIA", "ghp_", "eyJ", "Bearer ", "a", "4111 "]


def _work(text: str) -> float:
    """The least of five timings of one analysis: the run least disturbed by the machine."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        ALL.analyze(text)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("unit", ADVERSARIAL, ids=repr)
def test_every_recognizer_is_linear_in_the_text(unit: str) -> None:
    """The work at 16 times the length is about 16 times the work (quadratic work would
    be 256 times); compared in one process, so no machine is too slow or too fast."""
    def text(n: int) -> str:
        return (unit * (n // len(unit) + 1))[:n]

    check_spans(text(20_000), ALL.analyze(text(20_000)))
    small, big = _work(text(4_000)), _work(text(64_000))
    assert big < 64 * small + 0.002, f"{unit!r}: {small * 1e3:.3f} ms at 4k, {big * 1e3:.3f} ms at 64k"
