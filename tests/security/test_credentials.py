"""The credentials module: file validation, token matching, and every rule as a pure decision."""

from __future__ import annotations

import hashlib
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audiosockets.credentials import (
    BAD_TOKEN,
    EVERYONE,
    Credentials,
    Identity,
    OpenAccess,
    Refusal,
    SharedToken,
    load_credentials,
    may_open,
    may_publish,
    may_request_status,
    may_subscribe,
    may_take_over,
    parse_credentials,
    pattern_within,
)
from audiosockets.errors import ConfigError
from audiosockets.protocol import Role


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


SITE = f"""
[[client]]
name = "rec-kitchen"
token_sha256 = "{sha("kitchen-secret")}"
roles = ["publish"]
streams = ["kitchen-*"]

[[client]]
name = "archiver"
token_sha256 = "{sha("archive-secret")}"
roles = ["subscribe"]
streams = ["kitchen-*", "hall"]
groups = ["archivers"]

[[client]]
name = "ops"
token_sha256 = "{sha("ops-secret")}"
roles = ["admin", "subscribe"]
streams = ["*"]
"""


@pytest.fixture
def creds() -> Credentials:
    return parse_credentials(SITE, source="site.toml")


def identity(creds: Credentials, token: str) -> Identity:
    found = creds.authenticate(token)
    assert isinstance(found, Identity), found
    return found


# -- tokens ----------------------------------------------------------------------------------


def test_each_token_opens_its_own_identity(creds: Credentials) -> None:
    assert identity(creds, "kitchen-secret").name == "rec-kitchen"
    assert identity(creds, "archive-secret").name == "archiver"
    assert identity(creds, "ops-secret").roles == {"admin", "subscribe"}


@pytest.mark.parametrize(
    "token", ["", "kitchen-secre", "kitchen-secret\n", "KITCHEN-SECRET", sha("kitchen-secret")]
)
def test_wrong_or_empty_tokens_are_refused_as_bad_token(creds: Credentials, token: str) -> None:
    refusal = creds.authenticate(token)
    assert refusal == BAD_TOKEN
    assert refusal.reason == "bad_token"
    assert refusal.message.startswith("bad token")


def test_shared_token_is_one_identity_with_every_role() -> None:
    auth = SharedToken("s3cret")
    assert auth.authenticate("s3cret") is EVERYONE
    assert auth.authenticate("s3cre") == BAD_TOKEN
    assert auth.authenticate("") == BAD_TOKEN
    assert OpenAccess().authenticate("anything") is EVERYONE
    with pytest.raises(ConfigError):
        SharedToken("")


def test_token_match_uses_constant_time_comparison_over_every_entry(
    creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every entry is compared with hmac.compare_digest, whichever one matches."""
    import audiosockets.credentials as module

    calls: list[bytes] = []
    real = module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(module.hmac, "compare_digest", spy)
    creds.authenticate("kitchen-secret")  # the first entry matches
    assert len(calls) == len(creds.clients)


# -- roles -------------------------------------------------------------------------------------


def test_roles_decide_which_sessions_open(creds: Credentials) -> None:
    kitchen = identity(creds, "kitchen-secret")
    archiver = identity(creds, "archive-secret")
    ops = identity(creds, "ops-secret")
    assert may_open(kitchen, Role.PUBLISHER) is None
    assert may_open(archiver, Role.SUBSCRIBER) is None
    assert may_open(ops, Role.OBSERVER) is None
    for who, role in [
        (kitchen, Role.SUBSCRIBER),
        (kitchen, Role.OBSERVER),
        (archiver, Role.PUBLISHER),
        (ops, Role.PUBLISHER),
    ]:
        refusal = may_open(who, role)
        assert refusal is not None
        assert refusal.reason == "role_not_allowed"
        assert refusal.message.startswith("role not allowed")
        assert who.name in refusal.message
    assert may_request_status(ops) is None
    refusal = may_request_status(archiver)
    assert refusal is not None
    assert refusal.reason == "role_not_allowed"


# -- streams -----------------------------------------------------------------------------------


def test_publish_only_streams_matching_the_globs(creds: Credentials) -> None:
    kitchen = identity(creds, "kitchen-secret")
    assert may_publish(kitchen, "kitchen-1") is None
    refusal = may_publish(kitchen, "hall")
    assert refusal is not None
    assert refusal.reason == "stream_not_allowed"
    assert "'hall'" in refusal.message
    assert refusal.message.startswith("stream not allowed")


def test_absent_streams_means_none() -> None:
    creds = parse_credentials(
        f'[[client]]\nname = "x"\ntoken_sha256 = "{sha("t")}"\nroles = ["publish", "subscribe"]\n'
    )
    x = identity(creds, "t")
    assert may_publish(x, "a") is not None
    assert may_subscribe(x, "a", "") is not None


def test_subscribe_patterns_within_the_globs(creds: Credentials) -> None:
    archiver = identity(creds, "archive-secret")
    for pattern in ["kitchen-1", "kitchen-*", "kitchen-?", "kitchen-[12]", "hall"]:
        assert may_subscribe(archiver, pattern, "") is None, pattern
    for pattern in ["*", "hall*", "k*", "?itchen-1", "office"]:
        refusal = may_subscribe(archiver, pattern, "")
        assert (refusal.reason if refusal else None) == "stream_not_allowed", pattern


def test_groups_only_those_listed_and_none_when_absent(creds: Credentials) -> None:
    archiver = identity(creds, "archive-secret")
    ops = identity(creds, "ops-secret")
    assert may_subscribe(archiver, "hall", "archivers") is None
    refusal = may_subscribe(archiver, "hall", "analysts")
    assert refusal is not None
    assert refusal.reason == "group_not_allowed"
    assert refusal.message.startswith("group not allowed")
    assert "'analysts'" in refusal.message
    # ops has no `groups`: fan-out only.
    assert may_subscribe(ops, "hall", "") is None
    refusal = may_subscribe(ops, "hall", "archivers")
    assert refusal is not None
    assert refusal.reason == "group_not_allowed"
    # The shared-token / open identity may join any group.
    assert may_subscribe(EVERYONE, "*", "anything") is None


def test_a_stream_belongs_to_its_first_identity() -> None:
    assert may_take_over("rec-kitchen", "rec-kitchen", "kitchen-1") is None
    refusal = may_take_over("rec-kitchen", "intruder", "kitchen-1")
    assert refusal is not None
    assert refusal.reason == "stream_owned"
    assert "rec-kitchen" in refusal.message
    assert "'kitchen-1'" in refusal.message


NAMES = st.text(alphabet="ab-", max_size=6)
PATTERNS = st.text(alphabet="ab-*?", min_size=1, max_size=6)


def expand(pattern: str, fill: str) -> str:
    """A name ``pattern`` matches: each ``*`` becomes ``fill``, each ``?`` its first char."""
    return pattern.replace("*", fill).replace("?", (fill or "a")[0])


@given(pattern=PATTERNS, globs=st.lists(PATTERNS, max_size=3), fill=NAMES)
def test_pattern_within_never_admits_a_name_outside_the_globs(
    pattern: str, globs: list[str], fill: str
) -> None:
    """Soundness: if the pattern is admitted, every name it matches is allowed."""
    name = expand(pattern, fill)
    assert fnmatchcase(name, pattern)
    if pattern_within(pattern, tuple(globs)):
        assert any(fnmatchcase(name, g) for g in globs), (pattern, globs, name)


@given(name=st.text(alphabet="ab-", min_size=1, max_size=8), globs=st.lists(PATTERNS, max_size=3))
def test_a_plain_name_is_within_exactly_when_a_glob_matches_it(name: str, globs: list[str]) -> None:
    assert pattern_within(name, tuple(globs)) == any(fnmatchcase(name, g) for g in globs)


@given(glob=PATTERNS)
def test_every_glob_admits_itself_and_star_admits_all(glob: str) -> None:
    assert pattern_within(glob, (glob,))
    assert pattern_within(glob, ("*",))


# -- the file ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[client]\nname='x'", r"site\.toml: not valid TOML: .*line 1"),
        (f"[[client]]\ntoken_sha256='{sha('t')}'\nroles=['publish']", r"#1: 'name' must be"),
        (
            "[[client]]\nname='x'\ntoken_sha256='abc'\nroles=['publish']",
            r"#1 \('x'\): 'token_sha256' must be",
        ),
        (
            f"[[client]]\nname='x'\ntoken_sha256='{sha('t')}'\nroles=['root']",
            r"role 'root' is not one of",
        ),
        (f"[[client]]\nname='x'\ntoken_sha256='{sha('t')}'", r"'roles' is missing"),
        (
            f"[[client]]\nname='x'\ntoken_sha256='{sha('t')}'\nroles=['publish']\nstream=['a']",
            r"unknown field 'stream'",
        ),
        (
            f"[[client]]\nname='x'\ntoken_sha256='{sha('t')}'\nroles=['publish']\nstreams='a*'",
            r"'streams' must be a list",
        ),
        (
            f"[[client]]\nname='x'\ntoken_sha256='{sha('t')}'\nroles=['publish']\n"
            f"[[client]]\nname='x'\ntoken_sha256='{sha('u')}'\nroles=['publish']",
            r"#2: name 'x' is used twice",
        ),
        (
            f"[[client]]\nname='x'\ntoken_sha256='{sha('t')}'\nroles=['publish']\n"
            f"[[client]]\nname='y'\ntoken_sha256='{sha('t')}'\nroles=['publish']",
            r"#2 \('y'\): token_sha256 is used twice",
        ),
        (
            "[[client]]\nname='x'\nroles=['publish']",
            r"#1 \('x'\): give 'token_sha256', 'certificate'",
        ),
        (
            "[[client]]\nname='x'\ncertificate=''\nroles=['publish']",
            r"'certificate' must be a non-empty",
        ),
        (
            "[[client]]\nname='x'\ncertificate=['x']\nroles=['publish']",
            r"'certificate' must be a non-empty",
        ),
        (
            "[[client]]\nname='x'\ncertificate='cam'\nroles=['publish']\n"
            "[[client]]\nname='y'\ncertificate='cam'\nroles=['publish']",
            r"#2 \('y'\): certificate 'cam' is used twice",
        ),
        ("[client]\nname='x'", r"'client' must be \[\[client\]\] tables"),
        ("token = 'x'", r"unknown top-level key 'token'"),
        ("", r"no \[\[client\]\] tables: the file admits no one"),  # truncated mid-edit
        (" \n\t\n", r"no \[\[client\]\] tables"),
    ],
)
def test_bad_files_are_one_line_config_errors_naming_file_and_entry(
    text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_credentials(text, source="site.toml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("site.toml")
    assert re.search(expected, message), message


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read credentials file .*missing\.toml"):
        load_credentials(tmp_path / "missing.toml")
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    assert load_credentials(path).names() == {"rec-kitchen", "archiver", "ops"}


def test_uppercase_hex_is_accepted() -> None:
    creds = parse_credentials(
        f"[[client]]\nname='x'\ntoken_sha256='{sha('t').upper()}'\nroles=['publish']\n"
    )
    assert identity(creds, "t").name == "x"


# -- certificates ------------------------------------------------------------------------------

CERTIFICATES = f"""
[[client]]
name = "cam"
certificate = "cam-7"
roles = ["publish"]
streams = ["cam-*"]

[[client]]
name = "both"
certificate = "both-cert"
token_sha256 = "{sha("both-secret")}"
roles = ["subscribe"]

[[client]]
name = "tok"
token_sha256 = "{sha("tok-secret")}"
roles = ["publish"]
"""


def test_a_certificate_names_its_entry_and_a_token_must_agree() -> None:
    creds = parse_credentials(CERTIFICATES)
    cam = creds.authenticate("", "cam-7")
    assert isinstance(cam, Identity)
    assert cam.name == "cam"
    assert cam.streams == ("cam-*",)
    # An entry naming both: either one identifies it, both together too.
    pairs = [("both-secret", None), ("", "both-cert"), ("both-secret", "both-cert")]
    for token, certificate in pairs:
        found = creds.authenticate(token, certificate)
        assert isinstance(found, Identity), (token, certificate)
        assert found.name == "both"
    # A certificate no entry names leaves the token to decide.
    found = creds.authenticate("tok-secret", "stranger")
    assert isinstance(found, Identity)
    assert found.name == "tok"
    for token in ["tok-secret", "both-secret", "wrong"]:
        refusal = creds.authenticate(token, "cam-7")
        assert refusal == Refusal(
            "certificate_mismatch",
            "certificate and token disagree: the certificate is client 'cam''s and the token is not",
        ), token
    unknown = creds.authenticate("", "stranger")
    assert isinstance(unknown, Refusal)
    assert unknown.reason == "certificate_unknown"
    assert "'stranger'" in unknown.message
    # No certificate: a certificate-only entry cannot be reached.
    assert creds.authenticate("", None) == BAD_TOKEN
    assert creds.authenticate("wrong", "stranger") == BAD_TOKEN
    # Certificate names are matched exactly.
    assert isinstance(creds.authenticate("", "CAM-7"), Refusal)
    # The open and shared-token modes ignore certificates.
    assert OpenAccess().authenticate("", "cam-7") is EVERYONE
    assert SharedToken("s").authenticate("", "cam-7") == BAD_TOKEN
