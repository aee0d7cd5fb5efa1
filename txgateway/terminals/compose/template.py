"""Path templates of composed calls: `/users/{id}`, `/orders?customer={user.customer_id}`.

A value comes from the route's path (`{id}`, named by `compose.path`), the query
(`{query.page}`), the identity (`{user_id}`, `{user_role}`, `{user_tier}`) or an earlier
call's JSON answer (`{user.customer_id}`). Each value becomes exactly one percent-encoded
segment (or query value): `/`, `?`, `%`, CR and LF are encoded, and the values `.`, `..` and
the empty string are refused, so no value can climb out of the path its template names or
add a query, a header or a second request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from txgateway.filters.reshape import IDENTITY_ATTRIBUTES

__all__ = ["IDENTITY_FIELDS", "BadValue", "PathPattern", "Template", "Token", "Values", "parse_template"]

IDENTITY_FIELDS = tuple(IDENTITY_ATTRIBUTES)
_TOKEN = re.compile(r"\{([^{}]*)\}")
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]+\Z")    # what quote() leaves as it is
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_LITERAL_PATH = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@/%-]*$")
_LITERAL_QUERY = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*$")


class BadValue(ValueError):
    """A value that cannot be put in a path: absent, not a scalar, or a dot segment.

    `from_request` says whether the client's request supplied it (then the client is told,
    400) or an upstream's answer did (then that call fails)."""

    def __init__(self, message: str, from_request: bool) -> None:
        super().__init__(message)
        self.from_request = from_request


@dataclass(frozen=True)
class Token:
    """One `{...}`: `source` is param, query, identity or answer; `name` the param, query
    key, identity field or call; `path` the dotted path in that call's answer."""

    source: str
    name: str
    path: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        if self.source == "query":
            return "{query.%s}" % self.name
        return "{%s}" % ".".join((self.name, *self.path))


class Values:
    """Where a template's tokens get their values (a composition). A base class rather than a
    callable: compiled, `value` is then a direct call, not a bound method built per render
    and called generically per token."""

    def value(self, token: Token) -> object:
        raise NotImplementedError


@dataclass(frozen=True)
class Template:
    """Literal text and tokens, alternating (`parts[0]` and every other part are literal)."""

    parts: tuple[str | Token, ...]

    @property
    def tokens(self) -> tuple[Token, ...]:
        return tuple(p for p in self.parts if isinstance(p, Token))

    def render(self, values: Values) -> bytes:
        """The path (and query) with each token's value encoded as one segment."""
        out = []
        for part in self.parts:
            if isinstance(part, Token):
                out.append(_segment(part, values.value(part)))
            else:
                out.append(part)
        return "".join(out).encode("ascii")


def _segment(token: Token, value: object) -> str:
    from_request = token.source != "answer"
    if value is None:
        raise BadValue(f"no value for {token.text}", from_request)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        raise BadValue(f"{token.text} is not a single value", from_request)
    if text in ("", ".", ".."):
        raise BadValue(f"{token.text} may not be {text!r}", from_request)
    if text.isalnum() and text.isascii():       # most values (ids): no regex needed
        return text
    return text if _UNRESERVED.match(text) else quote(text, safe="")


def parse_template(text: str, params: tuple[str, ...], calls: tuple[str, ...]) -> Template:
    """The template, or ValueError saying what is wrong with it (for the config reader)."""
    if not text.startswith("/"):
        raise ValueError(f'expected a path starting with "/", got {text!r}')
    parts: list[str | Token] = []
    last = 0
    for match in _TOKEN.finditer(text):
        parts.append(text[last:match.start()])
        parts.append(_token(match.group(1), params, calls))
        last = match.end()
    parts.append(text[last:])
    literal = "".join(p for p in parts if isinstance(p, str))
    if "{" in literal or "}" in literal:
        raise ValueError(f"unbalanced braces in {text!r}")
    path, _, query = literal.partition("?")
    if not _LITERAL_PATH.match(path) or not _LITERAL_QUERY.match(query) or "#" in literal:
        raise ValueError(f"{text!r} has characters a path cannot hold (encode them)")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ValueError(f"{text!r} has a dot segment")
    return Template(tuple(parts))


def _token(inner: str, params: tuple[str, ...], calls: tuple[str, ...]) -> Token:
    head, _, rest = inner.partition(".")
    if head == "query":
        if not rest:
            raise ValueError("{query.NAME} names a query parameter")
        return Token("query", rest)
    if head in IDENTITY_FIELDS and not rest:
        return Token("identity", head)
    if head in params and not rest:
        return Token("param", head)
    if head in calls and rest:
        path = tuple(rest.split("."))
        if not all(path):
            raise ValueError(f"{{{inner}}}: empty field name")
        return Token("answer", head, path)
    known = [*params, *IDENTITY_FIELDS, "query.NAME", *(f"{c}.FIELD" for c in calls)]
    raise ValueError(f"{{{inner}}} names no value (expected one of: {', '.join(known)})")


@dataclass(frozen=True)
class PathPattern:
    """`compose.path` (`/{id}`, `/{id}/items/{item}`): the request path after the route's
    prefix, a parameter name (or None: a literal) per segment."""

    segments: tuple[tuple[str | None, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.segments if name is not None)

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        if not text.startswith("/"):
            raise ValueError(f'expected a path starting with "/", got {text!r}')
        out: list[tuple[str | None, str]] = []
        for seg in text.split("/")[1:]:
            if seg.startswith("{") and seg.endswith("}"):
                name = seg[1:-1]
                if not _NAME.match(name) or name == "query" or name in IDENTITY_FIELDS:
                    raise ValueError(f"{{{name}}}: expected a parameter name like {{id}}")
                if any(name == n for n, _ in out):
                    raise ValueError(f"{{{name}}} appears twice")
                out.append((name, seg))
            elif "{" in seg or "}" in seg:
                raise ValueError(f"{seg!r}: a parameter is a whole segment, like /{{id}}")
            else:
                out.append((None, seg))
        return cls(tuple(out))

    def match(self, rest: bytes) -> dict[str, str] | None:
        """The parameters' values (percent-decoded) if `rest` has this shape, else None."""
        segments = rest.split(b"/")
        if segments[0] != b"" or len(segments) - 1 != len(self.segments):
            return None
        values: dict[str, str] = {}
        for i, (name, literal) in enumerate(self.segments):
            raw = segments[i + 1]
            try:
                text = unquote(raw.decode("latin-1"), errors="strict") if b"%" in raw else raw.decode("latin-1")
            except UnicodeDecodeError:
                return None
            if name is None:
                if text != literal:
                    return None
            elif not raw:
                return None
            else:
                values[name] = text
        return values
