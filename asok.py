"""asok: a one-file, standard-library web framework with live components.

Copy asok.py and alive.js into a project and run `python asok.py serve`. The file reads
top to bottom in dependency order; each section opens with a `# ═══ N. Title ═══` banner,
and a long one is cut into lettered parts (`# ═══ 3a. ...`). The map, with every public name:

  1. Limits, errors   AsokError, the root of every error asok raises on purpose; HTTPError,
                      TemplateError, TemplateNotFound, BadSignature, LiveError, StoreUnavailable,
                      StoreBusy, SessionTooLarge (the protocol errors sit with 4a and 5a)
  2. HTML safety      Markup, escape: the one escape every template output goes through
  3. Templates        `<< >>` / `{{ }}` compiled to Python, generated line N = template line N
     3a syntax        the lexer, one parse function per statement, the nodes (slotted dataclasses)
     3b expressions   `x | filter(...)` and `x.name` rewritten on Python's own tokens
     3c compiler      nodes to one Python module per template
     3d runtime       what compiled code calls; the filters, one registry
     3e loader        Template, Templates (a folder of templates, cached; Templates.filter)
  4. HTTP/1.1         sans-I/O, RFC 9112
     4a               limits, HTTPProtocolError, the events: RequestHead, Body, EndOfMessage,
                      ConnectionEnded
     4b               HTTPParser: bytes in, events out
     4c               render_response_head, chunk, response_framing (the one framing rule)
  5. WebSocket        sans-I/O, RFC 6455
     5a               limits, Opcode, CloseCode, WebSocketError, WebSocketHandshakeError, the
                      events: TextMessage, BytesMessage, Ping, Pong, CloseConnection; frames
     5b               WSConnection: bytes in, events out, events in, bytes out
     5c               the handshake: ws_accept_key, ws_check_handshake, ws_handshake_request,
                      ws_check_handshake_response
  6. WS clients       WebSocketClient, AsyncWebSocketClient, ConnectionClosed
  7. Signing, keys    Signer, derive_key: HMAC-SHA256 bound to a purpose and a context
  8. Sessions         DESIGN §6, §11
     8a               Session, SessionStore (the contract)
     8b               FileSessionStore
     8c               a record as JSON texts, one per component (how the file store holds
                      it); the checks of a record's shape both stores and the app use
     8d               RedisSessionStore
  9. Form data        MultiDict, MultipartParser, UploadedFile
 10. HTTP objects     Request, Response, make_response, redirect, Route
 11. Components       DESIGN §4, §10
     11a              Component, exposed, on, every; the limits of live components
     11b              arguments from the browser, the renderer
 12. Live protocol    DESIGN §5, §9
     12a              SavedComponent, state tokens, connections, outboxes, HTML diffs
     12b              LiveHub (`app.live`), part one: tokens, messages, joins, views
     12c              LiveHub, part two: choose the state, apply, render, save, push
     12d              LiveHub: published messages, the queue per component, timers
 13. Brokers          Broker, FolderBroker, RedisBroker: processes reaching each other
 14. The application  Asok: a WSGI application itself; app.asgi, app.publish, app.run
     14a              setup and registration: @app.route, @app.before_request, @app.websocket,
                      @app.template_filter, pages, components
     14b              keys, sessions, CSRF
     14c              handling a request: url_for, static_url, render_template, error_response,
                      static files, alive.js
     14d              the live endpoint (/asok/live) and uploads (/asok/upload)
 15. WebSocket        WebSocket: the object an @app.websocket handler gets
 16. Adapters         WSGI (PEP 3333) and ASGI 3
 17. The server       asyncio, one protocol object per connection, limits per client
     17a              limits, phases, flow control, the connection base
     17b              the HTTP connection
     17c              the WebSocket connection; serve()
 18. Testing          TestClient, TestResponse, Headers
 19. Testing, live    what LiveHandle reads pages with, and LiveHandle
     19a              a small HTML tree and CSS selectors
     19b              LiveHandle: a live component driven like a user (click, type, submit)
 20. Running an app   load_app, serve_workers, the reloader
 21. The gallery      gallery_apps, describe_app, serve_gallery; the shared stylesheet
 22. Command line     main(); `python asok.py serve --help`
"""

__version__ = "0.1.0"
__all__ = [
    "Asok", "Component", "exposed", "on", "every", "Broker", "FolderBroker", "SavedComponent", "Request", "Response", "HTTPError", "redirect", "make_response",
    "Markup", "escape", "Template", "Templates", "TemplateError", "TemplateNotFound",
    "Session", "SessionStore", "FileSessionStore", "RedisSessionStore", "RedisBroker", "StoreUnavailable", "SessionTooLarge",
    "Signer", "AsokError", "BadSignature", "LiveError", "StoreBusy", "HTTPProtocolError", "WebSocketError",
    "WebSocketHandshakeError", "UploadedFile", "MultipartParser",
    "WSConnection", "WebSocket", "WebSocketClient", "AsyncWebSocketClient", "ConnectionClosed",
    "TestClient", "TestResponse", "LiveHandle", "serve", "serve_workers", "load_app", "main",
    # the sans-I/O cores (sections 4 and 5), their events and helpers
    "HTTPParser", "RequestHead", "Body", "EndOfMessage", "ConnectionEnded", "render_response_head", "chunk",
    "response_framing", "Opcode", "CloseCode", "TextMessage", "BytesMessage", "Ping", "Pong", "CloseConnection",
    "ws_accept_key", "ws_check_handshake", "ws_handshake_request", "ws_check_handshake_response",
    # the pieces the application is made of
    "derive_key", "MultiDict", "Headers", "gallery_apps", "describe_app", "serve_gallery",
]

from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from enum import Enum, IntEnum
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit
import argparse
import ast
import asyncio
import atexit
import base64
import binascii
import builtins
import codecs
import collections
import contextlib
import errno
import fcntl
import functools
import gzip
import hashlib
import heapq
import hmac
import html
import html.parser
import importlib.util
import inspect
import io
import ipaddress
import json
import keyword
import logging
import math
import mmap
import mimetypes
import os
import queue
import random
import re
import resource
import secrets
import signal
import socket
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tokenize
import traceback
import types
import urllib.parse
import weakref


# ═══ 1. Limits and errors: every error asok raises on purpose is an AsokError ═════════════════════

# Limits sit beside the code they bound, each named once with its RFC section where one applies
# (MAX_HEADER_BYTES in 4, MAX_WS_MESSAGE in 5, LIVE_MAX_MESSAGE in 12, ...); these two are the
# templates'.
MAX_TEMPLATE_DEPTH = 32          # levels of `extends` before a cycle is reported
_TPL_MERGE_CACHE_SIZE = 64


class AsokError(Exception):
    """The root of every error asok raises on purpose. Each carries the reply it calls for under
    one attribute name: `status` (an HTTP status: HTTPError, HTTPProtocolError,
    WebSocketHandshakeError, StoreUnavailable), `close_code` (a WebSocket close code:
    WebSocketError, ConnectionClosed) or `code` (a live error code, a str: LiveError,
    StoreUnavailable, SessionTooLarge). The protocol errors are defined beside their protocols."""


class TemplateError(AsokError):
    """A template that cannot be loaded or compiled; names the file and line."""

    def __init__(self, message: str, name: str | None = None, lineno: int | None = None) -> None:
        super().__init__(message)
        self.message, self.name, self.lineno = message, name, lineno

    def __str__(self):
        where = ", ".join(p for p in (self.name, self.lineno and f"line {self.lineno}") if p)
        return f"{where}: {self.message}" if where else self.message


class TemplateNotFound(TemplateError):
    """No template of that name under the loader's root."""


class HTTPError(AsokError):
    """Raise from a handler to answer with `status` and a short `detail`."""

    def __init__(self, status: int, detail: str | None = None,
                 headers: Iterable[tuple[str, str]] | None = None) -> None:
        self.status = int(status)
        self.detail = detail or HTTPStatus(self.status).phrase
        self.headers = list(headers or ())
        super().__init__(f"{self.status} {self.detail}")


class BadSignature(AsokError):
    """A signed value was tampered with, signed for something else, or malformed."""


class LiveError(AsokError):
    """A refused live event: `code` is machine-readable, `message` says why. Raise it from a
    component method or `authorize()`: nothing changes and the browser gets both."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class StoreBusy(AsokError):
    """update(..., wait=False) of a local store found the session's lock held (nothing ran)."""


class StoreUnavailable(AsokError):
    """The session store could not read or write (a full disk, an I/O error, a read-only
    folder, Redis down), so nothing was saved. A live event answers `store_unavailable`, a page
    or a route 503. `reason` is the storage problem in a few words."""

    status = 503
    code = "store_unavailable"

    def __init__(self, message: str, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class SessionTooLarge(AsokError, ValueError):
    """A session record would be larger than the store's `max_record` bytes; it was not saved."""

    code = "session_too_large"


# ═══ 2. HTML safety ═══════════════════════════════════════════════════════════════════════════════

class Markup(str):
    """Trusted HTML. Operators escape the other operand (MarkupSafe's rules)."""

    __slots__ = ()

    def __new__(cls, obj=""):
        if hasattr(obj, "__html__"):
            obj = obj.__html__()
        return super().__new__(cls, obj)

    def __html__(self):
        return self

    def __add__(self, other):
        if isinstance(other, str) or hasattr(other, "__html__"):
            return Markup(str.__add__(self, escape(other)))
        return NotImplemented

    def __radd__(self, other):
        if isinstance(other, str) or hasattr(other, "__html__"):
            return Markup(str.__add__(escape(other), self))
        return NotImplemented

    def __mul__(self, count):
        return Markup(str.__mul__(self, count))

    __rmul__ = __mul__

    def __mod__(self, arg):
        if isinstance(arg, tuple):
            arg = tuple(_TplEscaped(a) for a in arg)
        elif isinstance(arg, dict):
            arg = {k: _TplEscaped(v) for k, v in arg.items()}
        else:
            arg = _TplEscaped(arg)
        return Markup(str.__mod__(self, arg))

    def format(self, *args: Any, **kwargs: Any) -> "Markup":
        """str.format with every argument escaped."""
        args = [_TplEscaped(a) for a in args]
        kwargs = {k: _TplEscaped(v) for k, v in kwargs.items()}
        return Markup(str.format(self, *args, **kwargs))

    def join(self, seq: Iterable[Any]) -> "Markup":
        """str.join with every item escaped."""
        return Markup(str.join(self, map(escape, seq)))

    def __repr__(self):
        return f"Markup({str.__repr__(self)})"

    @classmethod
    def escape(cls, s: Any) -> "Markup":
        """Escape `s` and return it as this class."""
        rv = escape(s)
        return rv if cls is Markup else cls(rv)


class _TplEscaped:
    """Wraps a `%`/`format` argument of Markup so that it is escaped when formatted."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __str__(self):
        return escape(self.obj)

    def __repr__(self):
        return escape(repr(self.obj))

    def __format__(self, spec):
        if hasattr(self.obj, "__html__"):
            return self.obj.__html__()
        return escape(format(self.obj, spec))

    def __int__(self):
        return int(self.obj)

    def __float__(self):
        return float(self.obj)

    def __index__(self):
        return self.obj.__index__()


def _tpl_esc(v):
    """Escape one output value to a str; the choke point of every `<< >>`."""
    t = type(v)
    if t is str:
        return (v.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                .replace('"', "&#34;").replace("'", "&#39;"))
    if t is int or t is float or t is bool:
        return str(v)
    if t is Markup:
        return v
    if hasattr(v, "__html__"):
        return v.__html__()
    return _tpl_esc(str(v))


def escape(obj: Any) -> Markup:
    """Escape `& < > " '` in `str(obj)`; objects with `__html__` are trusted.

    None becomes "None", as in Jinja and MarkupSafe."""
    if hasattr(obj, "__html__"):
        return Markup(obj.__html__())
    return Markup(_tpl_esc(str(obj)))


# ═══ 3a. Templates: syntax ════════════════════════════════════════════════════════════════════════

#
# Two spellings of one engine: native `<< expr >>`, `<% stmt %>`, `<# note #>`
# and Jinja-like `{{ expr }}`, `{% stmt %}`, `{# note #}`; a `-` inside the
# tag (`<%-`, `-%>`, `{{-`, ...) strips the whitespace on that side. In native
# tags `>>` always ends the tag unless inside brackets or a string.
#
# A template goes through four steps, a section each: the lexer cuts the source
# into text, output and statement tokens and the parser builds a tree of the
# node records below (1a); each expression is rewritten to plain Python (1b);
# the tree becomes one Python module whose lines are the template's lines (1c);
# Template runs that module once, and the functions it defines call the
# runtime helpers of 1d on every render.

_TPL_TAGS = {"<<": (">>", "out"), "<%": ("%>", "stmt"), "<#": ("#>", "note"),
             "{{": ("}}", "out"), "{%": ("%}", "stmt"), "{#": ("#}", "note")}
_TPL_OPEN_RE = re.compile(r"<<(?!<)|<%|<#|\{\{|\{%|\{#")
_TPL_ENDRAW_RE = re.compile(r"(?:<%|\{%)(-?)\s*endraw\s*(-?)(?:%>|%\})")
_TPL_STRING = r"""'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*\""""
_TPL_CLOSE_RES = {closer: re.compile(r"(?P<str>%s)|(?P<close>%s)|(?P<br>[][(){}])"
                                     % (_TPL_STRING, re.escape(closer)))
                  for closer in (">>", "%>", "}}", "%}")}
_TPL_STMT_RE = re.compile(r"\s*([A-Za-z_]\w*)\s*(.*?)\s*\Z", re.S)
_TPL_FOR_RE = re.compile(r"(.+?)\s+in\s+(.+)\Z", re.S)
_TPL_SET_RE = re.compile(r"([A-Za-z_][\w\s,]*?)\s*=(?!=)\s*(.+)\Z", re.S)
_TPL_MACRO_RE = re.compile(r"([A-Za-z_]\w*)\s*\((.*)\)\Z", re.S)
_TPL_NAME_RE = re.compile(r"[A-Za-z_]\w*\Z")
_TPL_NEEDS_ARGUMENT = frozenset(("if", "elif", "for", "block", "macro", "set", "include", "extends"))

_TplToken = collections.namedtuple("_TplToken", "kind text line")         # kind: "text", "out", "stmt"
_TplStatement = collections.namedtuple("_TplStatement", "word arg text line")


# ─── Nodes: a template is a list of them; `line` is the template line a node starts on ───

@dataclass(slots=True)
class _TplText:
    text: str
    line: int


@dataclass(slots=True)
class _TplOut:            # << expr >>
    expr: str
    line: int


@dataclass(slots=True)
class _TplSet:            # <% set target = expr %>
    target: str
    expr: str
    line: int


@dataclass(slots=True)
class _TplInclude:        # <% include expr %>
    expr: str
    line: int


@dataclass(slots=True)
class _TplExtends:        # <% extends expr %>, only ever first in the root
    expr: str
    line: int


@dataclass(slots=True)
class _TplBlock:          # <% block name %> body <% endblock %>
    name: str
    body: list
    line: int


@dataclass(slots=True)
class _TplMacro:          # <% macro name(signature) %> body <% endmacro %>
    name: str
    signature: str
    body: list
    line: int


@dataclass(slots=True)
class _TplBranch:         # the body of an if or elif (with its test), or of an else (test None)
    test: str | None
    body: list
    line: int


@dataclass(slots=True)
class _TplIf:             # if, elif...: branches; else: else_
    branches: list
    else_: _TplBranch | None
    line: int


@dataclass(slots=True)
class _TplFor:            # <% for target in iter %> body <% else %> else_ <% endfor %>
    target: str
    iter: str
    body: list
    else_: _TplBranch | None
    line: int


# ─── Lexer ───

def _tpl_find_close(source, i, closer):
    """Index of `closer` after `i`, skipping string literals and bracketed code."""
    rx, depth = _TPL_CLOSE_RES[closer], 0
    while True:
        m = rx.search(source, i)
        if m is None:
            return -1
        kind, tok = m.lastgroup, m.group()
        if kind == "str":
            i = m.end()
            continue
        if kind == "close":
            if depth <= 0:
                return m.start()
            tok, i = tok[0], m.start() + 1
        else:
            i = m.end()
        if tok in "([{":
            depth += 1
        elif tok in ")]}":
            depth -= 1


def _tpl_lex(source, name):
    """Split a template into _TplToken("text" | "out" | "stmt", text, line).

    Comments are dropped, `raw` sections become text, `-` strips whitespace and,
    as in Jinja, a single newline ending the template is dropped."""
    source = source.removesuffix("\n")
    toks, pos, line, lstrip = [], 0, 1, False
    while True:
        m = _TPL_OPEN_RE.search(source, pos)
        start = m.start() if m else len(source)
        text = source[pos:start].lstrip() if lstrip else source[pos:start]
        if text:
            toks.append(_TplToken("text", text, line))
        if m is None:
            return toks
        line += source.count("\n", pos, start)
        opener = m.group()
        closer, kind = _TPL_TAGS[opener]
        inner = m.end()
        if source.startswith("-", inner):
            inner += 1
            if toks and toks[-1].kind == "text":
                toks[-1] = toks[-1]._replace(text=toks[-1].text.rstrip())
        end = source.find(closer, inner) if kind == "note" else _tpl_find_close(source, inner, closer)
        if end < 0:
            raise TemplateError(f"unclosed {opener!r} tag: expected {closer!r}", name, line)
        lstrip = end > inner and source[end - 1] == "-"
        body = source[inner:end - 1 if lstrip else end]
        pos = end + len(closer)
        if kind == "stmt" and body.strip() == "raw":
            raw = _TPL_ENDRAW_RE.search(source, pos)
            if raw is None:
                raise TemplateError(f"expected 'endraw' for 'raw' opened at line {line}",
                                    name, source.count("\n") + 1)
            text = source[pos:raw.start()]
            text = text.lstrip() if lstrip else text
            text = text.rstrip() if raw.group(1) else text
            if text:
                toks.append(_TplToken("text", text, line))
            lstrip, pos = bool(raw.group(2)), raw.end()
        elif kind != "note":
            toks.append(_TplToken(kind, body, line))
        line += source.count("\n", start, pos)


# ─── Parser ───

class _TplParser:
    """Builds the node tree from the lexer's tokens: each statement word has its
    `_parse_<word>` (the table _TPL_PARSERS, after the class).

    New nodes go into `body`; `stack` holds the open statements, innermost last,
    as (word, node, the body the node joins when its end tag comes)."""

    def __init__(self, name):
        self.name, self.blocks, self.stack = name, set(), []
        self.root = self.body = []

    def parse(self, toks, last_line):
        for kind, text, line in toks:
            if kind == "text":
                self.body.append(_TplText(text, line))
            elif not text.strip():
                raise self._error(f"empty {'expression' if kind == 'out' else 'statement'}", line)
            elif kind == "out":
                self.body.append(_TplOut(text, line))
            else:
                self._statement(text, line)
        if self.stack:
            word, node, _ = self.stack[-1]
            raise self._error(f"expected {'end' + word!r} for {word!r} opened at line {node.line}", last_line)
        return self.root

    def _statement(self, text, line):
        m = _TPL_STMT_RE.match(text)
        word, arg = m.groups() if m else ("", text)
        parse = _TPL_PARSERS.get(word)
        if parse is None:
            raise self._error(f"unknown statement {word or text.strip()!r}", line)
        if word in _TPL_NEEDS_ARGUMENT and not arg:
            raise self._error(f"{word!r} needs an argument", line)
        parse(self, _TplStatement(word, arg, text.strip(), line))

    def _error(self, message, line):
        return TemplateError(message, self.name, line)

    def _open(self, word, node, body):
        self.stack.append((word, node, self.body))
        self.body = body

    def _parse_if(self, s):
        branch = _TplBranch(s.arg, [], s.line)
        self._open("if", _TplIf([branch], None, s.line), branch.body)

    def _parse_for(self, s):
        m = _TPL_FOR_RE.match(s.arg)
        if m is None:
            raise self._error(f"expected 'for NAME in EXPRESSION', got {s.text!r}", s.line)
        node = _TplFor(m.group(1).strip(), m.group(2), [], None, s.line)
        self._open("for", node, node.body)

    def _parse_block(self, s):
        if not _TPL_NAME_RE.match(s.arg):
            raise self._error(f"invalid block name {s.arg!r}", s.line)
        if s.arg in self.blocks:
            raise self._error(f"block {s.arg!r} defined twice", s.line)
        self.blocks.add(s.arg)
        node = _TplBlock(s.arg, [], s.line)
        self._open("block", node, node.body)

    def _parse_macro(self, s):
        m = _TPL_MACRO_RE.match(s.arg)
        if m is None:
            raise self._error(f"expected 'macro NAME(ARGUMENTS)', got {s.text!r}", s.line)
        node = _TplMacro(m.group(1), m.group(2), [], s.line)
        self._open("macro", node, node.body)

    def _parse_elif(self, s):
        node = self._continued(s, _TplIf, "'elif' without 'if'")
        node.branches.append(_TplBranch(s.arg, [], s.line))
        self.body = node.branches[-1].body

    def _parse_else(self, s):
        node = self._continued(s, (_TplIf, _TplFor), "'else' without 'if' or 'for'")
        node.else_ = _TplBranch(None, [], s.line)
        self.body = node.else_.body

    def _continued(self, s, kinds, missing):
        """The open `if` (or `for`) that an `elif` or `else` continues."""
        node = self.stack[-1][1] if self.stack else None
        if not isinstance(node, kinds):
            raise self._error(missing, s.line)
        if node.else_ is not None:
            raise self._error(f"{s.word!r} after 'else' (opened at line {node.else_.line})", s.line)
        return node

    def _parse_end(self, s):
        opened = s.word[3:]
        if not self.stack:
            raise self._error(f"{s.word!r} without {opened!r}", s.line)
        word, node, parent = self.stack[-1]
        if word != opened:
            raise self._error(f"expected {'end' + word!r} for {word!r} opened at line {node.line}, "
                              f"got {s.word!r}", s.line)
        if word == "block" and s.arg and s.arg != node.name:
            raise self._error(f"'endblock {s.arg}' closes block {node.name!r} opened at line {node.line}",
                              s.line)
        self.stack.pop()
        parent.append(node)
        self.body = parent

    def _parse_set(self, s):
        m = _TPL_SET_RE.match(s.arg)
        if m is None:
            raise self._error(f"expected 'set NAME = EXPRESSION', got {s.arg!r}", s.line)
        self.body.append(_TplSet(m.group(1).strip(), m.group(2), s.line))

    def _parse_include(self, s):
        self.body.append(_TplInclude(s.arg, s.line))

    def _parse_extends(self, s):
        if self.stack or any(not isinstance(n, _TplText) or n.text.strip() for n in self.root):
            raise self._error("'extends' must be the first tag of the template", s.line)
        self.root.append(_TplExtends(s.arg, s.line))

    def _parse_endraw(self, s):
        raise self._error("'endraw' without 'raw'", s.line)


_TPL_PARSERS = {"if": _TplParser._parse_if, "elif": _TplParser._parse_elif, "else": _TplParser._parse_else,
                "for": _TplParser._parse_for, "block": _TplParser._parse_block,
                "macro": _TplParser._parse_macro, "set": _TplParser._parse_set,
                "include": _TplParser._parse_include, "extends": _TplParser._parse_extends,
                "endraw": _TplParser._parse_endraw, "endif": _TplParser._parse_end,
                "endfor": _TplParser._parse_end, "endblock": _TplParser._parse_end,
                "endmacro": _TplParser._parse_end}


# ═══ 3b. Templates: expressions ═══════════════════════════════════════════════════════════════════

#
# Expressions are Python with two Jinja habits: `x | name(args)` calls a filter
# on the primary expression before it (a `|` followed by a name is always a
# filter, so bitwise-or is not available) and `x.name` falls back to
# `x["name"]` (dict rows work). Both are rewritten on Python's own tokens:
# `x | f(a)` becomes `_tplf_f(x, a)` and `x.a` becomes `_tplga(x, 'a')`; the
# result is parsed by `ast` to find the names the expression reads.

_TPL_PRIM = -1      # token type of an already rewritten sub-expression
_TPL_SKIP_TOKENS = frozenset((tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.ENDMARKER,
                              tokenize.INDENT, tokenize.DEDENT))
_TPL_FSTRING_START = getattr(tokenize, "FSTRING_START", -1)
_TPL_FSTRING_END = getattr(tokenize, "FSTRING_END", -1)
_TPL_DICT_ATTRS = frozenset(dir(dict))
_TPL_ATOM_KEYWORDS = frozenset(("None", "True", "False"))


@dataclass(slots=True)
class _TplExprEnv:
    """What rewriting one expression needs and finds: the filters it may name, where it is."""
    filters: Mapping
    name: str
    line: int
    used: dict = field(default_factory=dict)     # filter names it calls, in order


def _tpl_tokens(s):
    """Python tokens of `s` as (type, string, start, end) offsets; f-strings stay whole."""
    starts = [0] + [i + 1 for i, c in enumerate(s) if c == "\n"]
    out, fdepth, fstart = [], 0, 0
    for t in tokenize.generate_tokens(io.StringIO(s).readline):
        if t.type in _TPL_SKIP_TOKENS:
            continue
        a = starts[t.start[0] - 1] + t.start[1]
        b = starts[t.end[0] - 1] + t.end[1]
        if t.type == _TPL_FSTRING_START:
            fstart = a if fdepth == 0 else fstart
            fdepth += 1
        elif fdepth:
            if t.type == _TPL_FSTRING_END:
                fdepth -= 1
                if fdepth == 0:
                    out.append((tokenize.STRING, s[fstart:b], fstart, b))
        else:
            out.append((t.type, t.string, a, b))
    return out


def _tpl_atom_end(el):
    typ, string = el[0], el[1]
    if typ == tokenize.NAME:
        return string in _TPL_ATOM_KEYWORDS or not keyword.iskeyword(string)
    return typ in (tokenize.STRING, tokenize.NUMBER, _TPL_PRIM) or (typ == tokenize.OP and string in ")]}")


def _tpl_operand(out):
    """Start index in `out` of the primary expression (atom plus trailers) that ends it."""
    i = len(out) - 1
    while i >= 0:
        typ, string = out[i][0], out[i][1]
        if typ == tokenize.OP and string in (")", "]", "}"):
            depth = 0
            while i >= 0:
                s = out[i][1] if out[i][0] == tokenize.OP else ""
                depth += s in (")", "]", "}")
                depth -= s in ("(", "[", "{")
                if depth == 0:
                    break
                i -= 1
            if i < 0:
                return None
            if i == 0 or not _tpl_atom_end(out[i - 1]):
                break
            i -= 1
            continue
        if not _tpl_atom_end(out[i]):
            return None
        while typ == tokenize.STRING and i > 0 and out[i - 1][0] == tokenize.STRING:
            i -= 1
        if i > 1 and out[i - 1][0] == tokenize.OP and out[i - 1][1] == ".":
            i -= 2
            continue
        break
    else:
        return None
    while i > 0 and out[i - 1][1] in ("-", "+", "~") and (i == 1 or not _tpl_atom_end(out[i - 2])):
        i -= 1
    return i


def _tpl_match(toks, j, hi):
    """Index of the bracket closing the one at `j`."""
    depth = 0
    for k in range(j, hi):
        if toks[k][0] == tokenize.OP:
            depth += toks[k][1] in ("(", "[", "{")
            depth -= toks[k][1] in (")", "]", "}")
            if depth == 0:
                return k
    return hi


def _tpl_rewrite(s, toks, lo, hi, env):
    """Rewrite tokens lo..hi: `x | f(a)` -> `_tplf_f(x, a)`, `x.a` -> `_tplga(x, 'a')`."""
    out, i = [], lo
    prev = toks[lo][2] if lo < hi else 0
    while i < hi:
        typ, string, _, b = toks[i]
        nxt = toks[i + 1] if i + 1 < hi else None
        is_name = nxt is not None and nxt[0] == tokenize.NAME and not keyword.iskeyword(nxt[1])
        if typ == tokenize.OP and string == "|" and is_name:
            fname, j, args = nxt[1], i + 2, ""
            if fname not in env.filters:
                raise TemplateError(f"no filter named {fname!r}", env.name, env.line)
            if j < hi and toks[j][0] == tokenize.OP and toks[j][1] == "(":
                k = _tpl_match(toks, j, hi)
                args, j = _tpl_rewrite(s, toks, j + 1, k, env).strip(), k + 1
            start = _tpl_operand(out)
            if start is None:
                raise TemplateError(f"filter {fname!r} has no value to filter", env.name, env.line)
            env.used[fname] = None
            value = "".join(el[2] for el in out[start:])
            lead = value[:len(value) - len(value.lstrip())]
            call = f"{lead}_tplf_{fname}({value.strip()}{', ' + args if args else ''})"
            out[start:] = [(_TPL_PRIM, "", call)]
            prev, i = toks[j - 1][3], j
            continue
        if typ == tokenize.OP and string == "." and is_name and nxt[1] not in _TPL_DICT_ATTRS:
            start = _tpl_operand(out)
            if start is not None and not (start == len(out) - 1 and out[start][1] == "loop"):
                value = "".join(el[2] for el in out[start:])
                lead = value[:len(value) - len(value.lstrip())]
                out[start:] = [(_TPL_PRIM, "", f"{lead}_tplga({value.strip()}, {nxt[1]!r})")]
                prev, i = nxt[3], i + 2
                continue
        out.append((typ, string, s[prev:b]))
        prev, i = b, i + 1
    return "".join(el[2] for el in out)


def _tpl_free_names(tree):
    """Names an expression reads, minus lambda and comprehension variables."""
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Lambda):
            a = node.args
            local.update(x.arg for x in a.posonlyargs + a.args + a.kwonlyargs)
            local.update(x.arg for x in (a.vararg, a.kwarg) if x)
        elif isinstance(node, ast.comprehension):
            local.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
    return [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            and n.id not in local and not n.id.startswith("_tpl")]


def _tpl_expr(src, name, line, filters):
    """Compile one template expression to Python: (code, free names, filters used)."""
    wrapped = "(" + src + ")"
    env = _TplExprEnv(filters, name, line)
    try:
        toks = _tpl_tokens(wrapped)
    except (tokenize.TokenError, SyntaxError):
        raise TemplateError(f"invalid expression {src.strip()!r}", name, line) from None
    code = "(" + _tpl_rewrite(wrapped, toks, 1, len(toks) - 1, env) + ")"
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError as e:
        raise TemplateError(f"invalid expression {src.strip()!r}: {e.msg}", name, line) from None
    return code, _tpl_free_names(tree), env.used


def _tpl_targets(src, name, line):
    """Names assigned by a `for`/`set` target such as `k, v`; anything else is an error."""
    try:
        tree = ast.parse(f"{src} = 0").body[0].targets[0]
    except SyntaxError:
        tree = None
    nodes = list(ast.walk(tree)) if tree is not None else []
    if not nodes or any(not isinstance(n, (ast.Name, ast.Tuple, ast.List, ast.Store)) for n in nodes):
        raise TemplateError(f"invalid assignment target {src.strip()!r}", name, line)
    return [n.id for n in nodes if isinstance(n, ast.Name)]


# ═══ 3c. Templates: compiler ══════════════════════════════════════════════════════════════════════

#
# The tree compiles once to a Python module: the body becomes `_tpl_root(_tplctx,
# _tplblocks)`, every block a function `_tpl_block_<name>` with the same
# arguments, every macro `_tpl_macro_<name>(_tplctx, ...)`. `_tplblocks` maps a
# block name to its functions, most derived template first, which is all
# extends/super() need. Each function starts by binding the free names it reads
# to locals: from the context, else through `_tplresolve` (3d). Literal text
# compiles to a constant, every output to `_tple(...)`: one escape, `_tpl_esc`.
# Each generated line carries the template line it came from; the code's line
# numbers are rewritten to those and it is compiled under the template's file
# name, so a traceback points at the template line.

_TPL_LOOP_RE = re.compile(r"\bloop\b")


class _TplScope:
    """What one generated function reads, binds and emits."""

    def __init__(self, bound, block):
        self.bound, self.block = set(bound), block
        self.needed, self.filters, self.out = {}, {}, []


def _tpl_bodies(node):
    """The node lists nested in `node`, in template order."""
    if isinstance(node, (_TplBlock, _TplMacro)):
        return [node.body]
    if isinstance(node, _TplIf):
        return [b.body for b in node.branches] + ([node.else_.body] if node.else_ else [])
    if isinstance(node, _TplFor):
        return [node.body] + ([node.else_.body] if node.else_ else [])
    return []


def _tpl_mentions_loop(nodes):
    """Whether these nodes read `loop` (a nested for has its own; blocks and macros are functions).

    An included template may read it, so an `include` counts as a use."""
    for n in nodes:
        match n:
            case _TplInclude():
                return True
            case _TplOut(expr=text) | _TplSet(expr=text) if _TPL_LOOP_RE.search(text):
                return True
            case _TplSet(target=target) if _TPL_LOOP_RE.search(target):
                return True
            case _TplIf(branches=branches, else_=else_) if (
                    any(_TPL_LOOP_RE.search(b.test) or _tpl_mentions_loop(b.body) for b in branches)
                    or (else_ and _tpl_mentions_loop(else_.body))):
                return True
            case _TplFor(iter=seq, else_=else_) if (
                    _TPL_LOOP_RE.search(seq) or (else_ and _tpl_mentions_loop(else_.body))):
                return True
    return False


class _TplCompiler:
    """Turns a parsed template into (python line, template line) pairs.

    `module(tree)` writes the functions; inside one, `_body` joins text and
    output into one write and hands each statement node to its `_compile_<kind>`
    (the table _TPL_COMPILERS, after the class)."""

    def __init__(self, name, filters):
        self.name, self.filters = name, filters
        self.blocks, self.macros = {}, {}
        self.fn, self.uid = None, 0

    def module(self, tree):
        self._collect(tree)
        extends = next((n for n in tree if isinstance(n, _TplExtends)), None)
        lines = self._function("_tpl_root(_tplctx, _tplblocks)", 1, tree, (), None, extends)
        for bname, node in self.blocks.items():
            lines += self._function(f"_tpl_block_{bname}(_tplctx, _tplblocks)", node.line, node.body,
                                    (), bname)
        for mname, node in self.macros.items():
            params = self._signature(node)
            sig = f", {node.signature}" if node.signature.strip() else ""
            lines += self._function(f"_tpl_macro_{mname}(_tplctx{sig})", node.line, node.body, params, None)
        return lines

    def _collect(self, nodes):
        """Every block and macro, however deep: each becomes a function of the module."""
        for n in nodes:
            if isinstance(n, _TplBlock):
                self.blocks[n.name] = n
            elif isinstance(n, _TplMacro):
                if n.name in self.macros:
                    raise TemplateError(f"macro {n.name!r} defined twice", self.name, n.line)
                self.macros[n.name] = n
            for body in _tpl_bodies(n):
                self._collect(body)

    def _signature(self, node):
        try:
            a = ast.parse(f"def _({node.signature}): pass").body[0].args
        except SyntaxError:
            raise TemplateError(f"invalid macro signature {node.signature!r}", self.name,
                                node.line) from None
        return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x]

    def _function(self, header, line, body, params, block, extends=None):
        self.fn = fn = _TplScope(params, block)
        macro = header.startswith("_tpl_macro_")
        wrap = ("_tplMarkup(", ")") if macro else ("", "")
        simple = extends is None and all(isinstance(n, (_TplText, _TplOut)) for n in body)
        if extends is not None:
            self._extending_root(body, extends)
        elif simple:
            self._run(body, 1, "return " + wrap[0], wrap[1])
        else:
            self._body(body, 1)
            self._emit(1, f"return {wrap[0]}''.join(_tplout){wrap[1]}", line)
        text = "\n".join(code for code, _ in fn.out)
        pro = [] if simple or extends is not None else ["_tplout = []", "_tplw = _tplout.append"]
        pro += ["_tple = _tplesc"] * ("_tple(" in text) + ["_tplga = _tplgetattr"] * ("_tplga(" in text)
        pro += [f"_tplf_{f} = _tplF[{f!r}]" for f in fn.filters]
        for n in fn.needed:
            if n in self.macros:
                pro.append(f"{n} = _tplpartial(_tpl_macro_{n}, _tplctx)")
            elif n == "super":
                pro.append(f"super = _tplpartial(_tplsuper, _tplctx, _tplblocks, {block!r}, _tpl_block_{block})"
                           if block else "super = _tplnosuper")
            else:
                pro.append(f"{n} = _tplctx[{n!r}] if {n!r} in _tplctx else _tplresolve(_tplG, {n!r})")
        return [(f"def {header}:", line)] + [("    " + p, line) for p in pro] + fn.out

    def _emit(self, indent, code, line):
        self.fn.out.append(("    " * indent + code, line))

    def _expr(self, src, line):
        code, names, used = _tpl_expr(src, self.name, line, self.filters)
        for n in names:
            if n not in self.fn.bound:
                self.fn.needed.setdefault(n)
        self.fn.filters.update(used)
        return code

    def _body(self, nodes, indent):
        start, run = len(self.fn.out), []
        for node in nodes:
            if isinstance(node, (_TplText, _TplOut)):
                run.append(node)
                continue
            self._run(run, indent, "_tplw(", ")")
            run = []
            _TPL_COMPILERS[type(node)](self, node, indent)
        self._run(run, indent, "_tplw(", ")")
        if len(self.fn.out) == start:
            self._emit(indent, "pass", nodes[0].line if nodes else 1)

    def _run(self, run, indent, head, tail):
        """Output text and expressions in one call: head + ''.join((...)) + tail."""
        pieces = [(repr(n.text) if isinstance(n, _TplText) else f"_tple({self._expr(n.expr, n.line)})",
                   n.line) for n in run]
        if len(pieces) == 1:
            self._emit(indent, head + pieces[0][0] + tail, pieces[0][1])
        elif pieces:
            self._emit(indent, head + "''.join((", pieces[0][1])
            for code, line in pieces:
                self._emit(indent + 1, code + ",", line)
            self._emit(indent, "))" + tail, pieces[-1][1])
        elif head.startswith("return"):
            self._emit(indent, head + "''" + tail, 1)

    def _extending_root(self, nodes, extends):
        """A child template's body: its `set`s, then the parent renders with its blocks."""
        sets = []
        for node in nodes:
            stray = None
            if isinstance(node, _TplSet):
                sets += self._compile_set(node, 1)
            elif isinstance(node, _TplText):
                if node.text.strip():
                    stray = node.line + node.text[:len(node.text) - len(node.text.lstrip())].count("\n")
            elif not isinstance(node, (_TplExtends, _TplBlock, _TplMacro)):
                stray = node.line
            if stray is not None:
                raise TemplateError("content outside of blocks is never rendered in a template that "
                                    "uses 'extends'", self.name, stray)
        ctx = "{**_tplctx, %s}" % ", ".join(f"{n!r}: {n}" for n in sets) if sets else "_tplctx"
        parent = self._expr(extends.expr, extends.line)
        self._emit(1, f"return _tplextends(_tplT, {ctx}, _tplblocks, {parent})", extends.line)

    def _compile_if(self, node, indent):
        bound = set(self.fn.bound)
        for i, branch in enumerate(node.branches):
            test = self._expr(branch.test, branch.line)
            self._emit(indent, f"{'elif' if i else 'if'} {test}:", branch.line)
            self._body(branch.body, indent + 1)
            self.fn.bound = set(bound)
        if node.else_ is not None:
            self._emit(indent, "else:", node.else_.line)
            self._body(node.else_.body, indent + 1)
            self.fn.bound = bound

    def _compile_for(self, node, indent):
        target, line, else_ = node.target, node.line, node.else_
        names = _tpl_targets(target, self.name, line)
        seq = self._expr(node.iter, line)
        bound, uses_loop = set(self.fn.bound), _tpl_mentions_loop(node.body)
        self.uid += 1
        save, empty = f"_tplsave{self.uid}", f"_tplempty{self.uid}"
        outer_loop = uses_loop and "loop" in bound
        if outer_loop:
            self._emit(indent, f"{save} = loop", line)
        if uses_loop:
            self._emit(indent, f"loop = _tplLoop({seq})", line)
            self._emit(indent, f"for loop.index0, ({target}) in enumerate(loop._seq):", line)
        else:
            if else_ is not None:
                self._emit(indent, f"{empty} = True", line)
            self._emit(indent, f"for {target} in {seq}:", line)
            if else_ is not None:
                self._emit(indent + 1, f"{empty} = False", line)
        self.fn.bound |= set(names) | ({"loop"} if uses_loop else set())
        self._body(node.body, indent + 1)
        self.fn.bound = set(bound)
        if else_ is not None:
            self._emit(indent, f"if {'not loop.length' if uses_loop else empty}:", else_.line)
            self._body(else_.body, indent + 1)
            self.fn.bound = set(bound)
        if outer_loop:
            self._emit(indent, f"loop = {save}", line)

    def _compile_set(self, node, indent):
        names = _tpl_targets(node.target, self.name, node.line)
        self._emit(indent, f"{node.target} = {self._expr(node.expr, node.line)}", node.line)
        self.fn.bound.update(names)
        return names

    def _compile_include(self, node, indent):
        target = self._expr(node.expr, node.line)
        local = sorted(n for n in self.fn.bound if not n.startswith("_tpl"))
        extra = "{%s}" % ", ".join(f"{n!r}: {n}" for n in local) if local else "None"
        self._emit(indent, f"_tplw(_tplinclude(_tplT, _tplctx, {target}, {extra}))", node.line)

    def _compile_block(self, node, indent):
        self._emit(indent, f"_tplw(_tplblocks[{node.name!r}][0](_tplctx, _tplblocks))", node.line)

    def _compile_macro(self, node, indent):
        """Macros are module-level functions; nothing happens where they are defined."""


_TPL_COMPILERS = {_TplIf: _TplCompiler._compile_if, _TplFor: _TplCompiler._compile_for,
                  _TplSet: _TplCompiler._compile_set, _TplInclude: _TplCompiler._compile_include,
                  _TplBlock: _TplCompiler._compile_block, _TplMacro: _TplCompiler._compile_macro}


def _tpl_code(lines, source, filename, name):
    """Compile generated lines with every node moved to its template line."""
    linemap = []
    for code, line in lines:
        linemap.extend(line + k for k in range(code.count("\n") + 1))
    try:
        tree = ast.parse("\n".join(code for code, _ in lines), filename)
    except SyntaxError as e:
        where = linemap[e.lineno - 1] if e.lineno and e.lineno <= len(linemap) else None
        raise TemplateError(f"invalid syntax: {e.msg}", name, where) from None
    widths = [len(text.encode()) for text in source.split("\n")]
    for node in ast.walk(tree):
        if "lineno" in node._attributes:
            line = linemap[node.lineno - 1]
            node.lineno = node.end_lineno = line
            node.col_offset, node.end_col_offset = 0, widths[line - 1] if line <= len(widths) else 0
    return compile(tree, filename, "exec")


# ═══ 3d. Templates: runtime and filters ═══════════════════════════════════════════════════════════

#
# What compiled templates call while they render, handed to their module by
# name (_TPL_RUNTIME below): the escape `_tpl_esc` (HTML safety, above),
# `_tplga` for `x.name`, `_tplresolve` for a free name the context lacks
# (`Templates.globals`, then builtins, then Jinja's true/false/none, else an
# undefined marker that raises NameError wherever it is used, `if` included;
# only the `default` filter accepts it), the `loop` helper, the filters, and
# include/extends/super().

_TPL_JINJA_LITERALS = {"true": True, "false": False, "none": None}
_TPL_STRIPTAGS_RE = re.compile(r"<!--.*?-->|<[^>]*>", re.S)


class _TplUndefined:
    """The value of an unknown name or attribute: any use raises, `default` replaces it."""

    __slots__ = ("_tpl_message", "_tpl_exc")

    def __init__(self, message, exc=NameError):
        self._tpl_message, self._tpl_exc = message, exc

    def _tpl_fail(self, *args, **kwargs):
        raise self._tpl_exc(self._tpl_message)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._tpl_fail()

    def __repr__(self):
        return f"Undefined({self._tpl_message!r})"

    __hash__ = object.__hash__
    __str__ = __html__ = __format__ = __iter__ = __len__ = __bool__ = _tpl_fail
    __call__ = __getitem__ = __contains__ = __int__ = __float__ = __index__ = _tpl_fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _tpl_fail
    __truediv__ = __rtruediv__ = __floordiv__ = __mod__ = __rmod__ = __neg__ = _tpl_fail
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _tpl_fail


def _tpl_resolve(globals_, name):
    """A free name missing from the context: globals, then builtins, else undefined."""
    if name in globals_:
        return globals_[name]
    if name in builtins.__dict__:
        return builtins.__dict__[name]
    if name in _TPL_JINJA_LITERALS:
        return _TPL_JINJA_LITERALS[name]
    return _TplUndefined(f"{name!r} is undefined")


def _tpl_ga(obj, name):
    """`obj.name` in a template: the attribute, else the item (Jinja's rule)."""
    if type(obj) is dict:
        if name in obj:
            return obj[name]
    else:
        try:
            return getattr(obj, name)
        except AttributeError:
            try:
                return obj[name]
            except (TypeError, LookupError, AttributeError):
                pass
    return _TplUndefined(f"{type(obj).__name__!r} object has no attribute {name!r}",
                         AttributeError)


class _TplLoop:
    """The `loop` helper of a for loop; the loop itself assigns `index0`."""

    __slots__ = ("index0", "length", "_seq")

    def __init__(self, seq):
        try:
            n = len(seq)
        except TypeError:
            seq = list(seq)
            n = len(seq)
        self._seq, self.length, self.index0 = seq, n, -1

    index = property(lambda self: self.index0 + 1)
    revindex = property(lambda self: self.length - self.index0)
    revindex0 = property(lambda self: self.length - self.index0 - 1)
    first = property(lambda self: self.index0 == 0)
    last = property(lambda self: self.index0 == self.length - 1)

    def cycle(self, *values):
        """The value for this iteration, cycling through `values`."""
        return values[self.index0 % len(values)]


def _tpl_include(template, ctx, name, extra):
    target = template._related(name)
    return target._root({**ctx, **extra} if extra else ctx, target._blocks)


def _tpl_extends(template, ctx, blocks, name):
    """Render the parent of `template` with `blocks` (child first) merged over its own."""
    parent = template._related(name)
    key = (id(blocks), id(parent))
    hit = template._merged.get(key)
    if hit is None or hit[0] is not blocks or hit[1] is not parent:
        chain = blocks.get(None, [template])
        if parent in chain or len(chain) >= MAX_TEMPLATE_DEPTH:
            names = " -> ".join(t.name for t in chain + [parent])
            raise TemplateError(f"extends loop or chain too deep: {names}", template.name)
        merged = {n: fns + parent._blocks.get(n, []) for n, fns in blocks.items() if n is not None}
        for n, fns in parent._blocks.items():
            merged.setdefault(n, list(fns))
        merged[None] = chain + [parent]
        if len(template._merged) >= _TPL_MERGE_CACHE_SIZE:
            template._merged.clear()
        hit = template._merged[key] = (blocks, parent, merged)
    return parent._root(ctx, hit[2])


def _tpl_super(ctx, blocks, name, fn):
    chain = blocks[name]
    i = next(i for i, f in enumerate(chain) if f is fn)
    if i + 1 >= len(chain):
        raise TemplateError(f"super(): block {name!r} has no parent block")
    return Markup(chain[i + 1](ctx, blocks))


def _tpl_no_super():
    raise TemplateError("super() is only available inside a block")


# The filters: Jinja's names and arguments, one registry (_TPL_FILTERS); Templates.filter adds to a copy.

def _tpl_keep(value, result):
    """A string filter's result stays trusted when its input was."""
    return Markup(result) if hasattr(value, "__html__") else result


def _tpl_text(value):
    return value.__html__() if hasattr(value, "__html__") else str(value)


def _tpl_f_default(value, default_value="", boolean=False):
    if isinstance(value, _TplUndefined) or (boolean and not value):
        return default_value
    return value


def _tpl_f_join(value, d="", attribute=None):
    items = [_tpl_ga(v, attribute) for v in value] if attribute else list(value)
    if hasattr(d, "__html__") or any(hasattr(v, "__html__") for v in items):
        return Markup(d).join(items)
    return str(d).join(map(str, items))


def _tpl_f_json(value, indent=None):
    text = json.dumps(value, indent=indent, sort_keys=indent is not None)
    return Markup(text.replace("&", "\\u0026").replace("<", "\\u003c")
                  .replace(">", "\\u003e").replace("'", "\\u0027"))


def _tpl_f_truncate(s, length=255, killwords=False, end="...", leeway=0):
    s = _tpl_text(s)
    if len(s) <= length + leeway:
        return s
    cut = s[:max(length - len(end), 0)]
    if not killwords and " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut + end


def _tpl_f_replace(s, old, new, count=-1):
    if hasattr(s, "__html__"):
        return Markup(str.replace(Markup(s), escape(old), escape(new), count))
    return str(s).replace(str(old), str(new), count)


def _tpl_f_first(seq):
    for item in seq:
        return item
    return _TplUndefined("first item of an empty sequence", LookupError)


def _tpl_f_last(seq):
    seq = seq if isinstance(seq, (list, tuple, str)) else list(seq)
    return seq[-1] if seq else _TplUndefined("last item of an empty sequence", LookupError)


def _tpl_f_sort(value, reverse=False, case_sensitive=False, attribute=None):
    def key(item):
        if attribute is not None:
            item = _tpl_ga(item, attribute)
        return item.lower() if not case_sensitive and isinstance(item, str) else item
    return sorted(value, key=key, reverse=reverse)


def _tpl_f_reverse(value):
    if isinstance(value, str):
        return value[::-1]
    return list(reversed(value if isinstance(value, (list, tuple)) else list(value)))


def _tpl_f_round(value, precision=0, method="common"):
    if method == "common":
        return round(value, precision)
    op = {"ceil": math.ceil, "floor": math.floor}[method]
    return op(value * 10 ** precision) / 10 ** precision


def _tpl_f_int(value, default=0, base=10):
    try:
        return int(value, base) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError, OverflowError):
            return default


def _tpl_f_float(value, default=0.0):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _tpl_f_striptags(value):
    text = _TPL_STRIPTAGS_RE.sub("", _tpl_text(value))
    return html.unescape(" ".join(text.split()))


def _tpl_f_urlencode(value):
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and value
                                   and isinstance(value[0], (list, tuple))):
        pairs = value.items() if isinstance(value, dict) else value
        return "&".join(urllib.parse.quote(str(k), safe="") + "=" + urllib.parse.quote(str(v), safe="")
                        for k, v in pairs)
    return urllib.parse.quote(str(value), safe="/")


def _tpl_f_nl2br(value):
    text = escape(value).replace("\r\n", "\n")
    return Markup(text.replace("\n", "<br>\n"))


_TPL_FILTERS = {
    "upper": lambda s: _tpl_keep(s, _tpl_text(s).upper()),
    "lower": lambda s: _tpl_keep(s, _tpl_text(s).lower()),
    "title": lambda s: _tpl_keep(s, _tpl_text(s).title()),
    "capitalize": lambda s: _tpl_keep(s, _tpl_text(s).capitalize()),
    "trim": lambda s, chars=None: _tpl_keep(s, _tpl_text(s).strip(chars)),
    "length": len, "count": len,
    "default": _tpl_f_default, "d": _tpl_f_default,
    "join": _tpl_f_join,
    "safe": lambda s: Markup(_tpl_text(s)),
    "escape": escape, "e": escape,
    "json": _tpl_f_json, "tojson": _tpl_f_json,
    "truncate": _tpl_f_truncate,
    "replace": _tpl_f_replace,
    "first": _tpl_f_first, "last": _tpl_f_last,
    "sort": _tpl_f_sort, "reverse": _tpl_f_reverse,
    "round": _tpl_f_round, "int": _tpl_f_int, "float": _tpl_f_float,
    "string": lambda s: _tpl_keep(s, _tpl_text(s)),
    "abs": abs, "list": list,
    "striptags": _tpl_f_striptags, "urlencode": _tpl_f_urlencode, "nl2br": _tpl_f_nl2br,
}

# The names compiled code calls, besides each template's own `_tplT` (the
# Template), `_tplG` (its globals) and `_tplF` (its filters).
_TPL_RUNTIME = {"_tplesc": _tpl_esc, "_tplgetattr": _tpl_ga, "_tplresolve": _tpl_resolve,
                "_tplLoop": _TplLoop, "_tplMarkup": Markup, "_tplpartial": functools.partial,
                "_tplinclude": _tpl_include, "_tplextends": _tpl_extends, "_tplsuper": _tpl_super,
                "_tplnosuper": _tpl_no_super, "__builtins__": builtins}


# ═══ 3e. Templates: the loader (Template, Templates) ══════════════════════════════════════════════

# Template compiles one source; Templates finds, caches and recompiles the files under a root.

class Template:
    """One compiled template. `render(**context)` returns a str."""

    def __init__(self, source: str, name: str = "<string>", env: "Templates | None" = None,
                 filename: str | None = None) -> None:
        self.source, self.name, self.env = source, name, env
        self.filename = filename or name
        self._base = self.filename if os.path.isabs(self.filename) else None  # what ./names are beside
        filters = env.filters if env is not None else _TPL_FILTERS
        compiler = _TplCompiler(name, filters)
        last_line = source.count("\n") + (not source.endswith("\n"))
        tree = _TplParser(name).parse(_tpl_lex(source, name), max(last_line, 1))
        code = _tpl_code(compiler.module(tree), source, self.filename, name)
        ns = {**_TPL_RUNTIME, "_tplT": self, "_tplG": env.globals if env is not None else {},
              "_tplF": filters}
        exec(code, ns)  # noqa: S102 (a template compiles to Python code, run here once)
        self._root = ns["_tpl_root"]
        self._blocks = {b: [ns["_tpl_block_" + b]] for b in compiler.blocks}
        self._merged = {}

    def render(self, /, **context: Any) -> str:
        """The template rendered with `context` as its names."""
        return self._root(context, self._blocks)

    def render_context(self, context: dict[str, Any]) -> str:
        """Render with `context` as is (not copied, not modified)."""
        return self._root(context, self._blocks)

    def _related(self, name):
        """A template named by this one's `extends` or `include`."""
        env = self.env
        if env is None:
            raise TemplateError(f"cannot load {name!r}: this template has no Templates loader", self.name)
        if type(name) is str and not env.debug and not name.startswith("./"):  # under the root, known
            hit = env._by_name.get(name)
            if hit is not None:
                return hit
        return env._get_related(name, self._base)

    def __repr__(self):
        return f"<Template {self.name!r}>"


class Templates:
    """Loads templates from `root`, caches them, recompiles changed files in debug mode."""

    def __init__(self, root: str | os.PathLike, debug: bool = False) -> None:
        self.root = Path(root).resolve()
        self.debug = debug
        self.filters = dict(_TPL_FILTERS)
        self.globals = {}
        self._by_name = {}
        self._by_path = {}

    def filter(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a filter: `@templates.filter()` or `@templates.filter("name")`."""
        if callable(name):
            self.filters[name.__name__] = name
            return name

        def register(fn):
            self.filters[name or fn.__name__] = fn
            return fn
        return register

    def get(self, name: str) -> Template:
        """The template `name` under the root, compiled once (again when it changes, in debug mode);
        TemplateNotFound if there is none."""
        hit = self._by_name.get(name) if type(name) is str else None
        if hit is not None and not self.debug:
            return hit
        return self._get_related(name, None)

    def get_file(self, path: str | os.PathLike) -> Template:
        """A template from a file path (a component's template beside its .py file)."""
        key = (None, str(path))
        hit = self._by_name.get(key)
        if hit is not None and not self.debug:
            return hit
        full = Path(path).resolve()
        try:
            display = full.relative_to(self.root).as_posix()
        except ValueError:
            display = str(full)
        template = self._by_name[key] = self._load(full, display)
        return template

    def from_string(self, source: str, name: str = "<string>") -> Template:
        """A template from source text."""
        return Template(source, name, self)

    def render(self, name: str, /, **context: Any) -> str:
        """Render the template `name` with `context`."""
        return self.get(name).render_context(context)

    def _get_related(self, name, base):
        """`name` under root, or beside `base` (a file) when it starts with './'."""
        relative = isinstance(name, str) and name.startswith("./") and base is not None
        key = (base, name) if relative else name
        hit = self._by_name.get(key)
        if hit is not None and not self.debug:
            return hit
        if not isinstance(name, str) or not name or "\0" in name:
            raise TemplateNotFound(f"invalid template name {name!r}", str(name))
        top = Path(base).resolve().parent if relative else self.root
        path = (top / name).resolve()
        if os.path.isabs(name) or not path.is_relative_to(top):
            raise TemplateNotFound(f"template {name!r} is outside {top}", name)
        template = self._by_name[key] = self._load(path, path.relative_to(top).as_posix()
                                                   if not relative else name)
        return template

    def _load(self, path, display):
        key = str(path)
        entry = self._by_path.get(key)
        try:
            mtime = os.stat(key).st_mtime_ns
        except OSError:
            mtime = None
        if mtime is None or not path.is_file():
            raise TemplateNotFound(f"template {display!r} not found (looked for {key})", display)
        if entry is not None and entry[0] == mtime:
            return entry[1]
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TemplateError(f"not UTF-8: {e}", display) from None
        template = Template(source, display, self, filename=key)
        self._by_path[key] = (mtime, template)
        return template


# ═══ 4a. HTTP/1.1, sans-I/O: limits, errors, events ═══════════════════════════════════════════════

# The server side of RFC 9112: bytes go in through HTTPParser.receive_data(),
# events come out of next_event(). No sockets here; the asyncio server and the
# tests drive the parser. Bad data from the peer raises HTTPProtocolError, which
# carries the status to answer with; the connection is closed after it.
#
# Transfer codings: only `chunked` is decoded. A request whose final coding is
# not chunked is rejected with 400 (RFC 9112 §6.3: the length cannot be known);
# a known compression coding before chunked (`gzip, chunked`) gets 501, and so
# does a coding nobody registered (RFC 9112 §6.1). Transfer-Encoding in an
# HTTP/1.0 request is rejected with 400 (RFC 9112 §6.1: faulty framing).

# RFC 9112 §3: a request line longer than this gets 414.
MAX_REQUEST_LINE = 8 * 1024
# RFC 9112 §5 and RFC 6585 §5: the header section (and the trailer section
# after a chunked body) may take this many bytes and fields, else 431.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
# RFC 9110 §15.5.14: a body larger than this gets 413.
DEFAULT_MAX_BODY = 16 * 1024 * 1024
# RFC 9112 §7.1: a chunk-size line, extensions included, may be this long.
_HTTP_MAX_CHUNK_LINE = 4 * 1024

# RFC 9110 §5.6.2 token, RFC 9112 §3 request line, RFC 9110 §5.5 field values.
_HTTP_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_TOKEN_TEXT = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_TOKEN_START = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                              b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r")
_HTTP_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9]+(?:\.[0-9]+)?)")
_HTTP_CONTROL = bytes((*range(0x09), *range(0x0b, 0x20), 0x7f))  # control bytes a head may not hold
_HTTP_BAD_OUTPUT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HTTP_HEX = re.compile(rb"[0-9A-Fa-f]+")
# RFC 9110 §7.8 / IANA transfer coding registry: the codings we recognise.
_HTTP_KNOWN_CODINGS = frozenset({"chunked", "gzip", "x-gzip", "deflate", "compress",
                                 "x-compress"})

_HTTP_HEAD = "head"
_HTTP_LENGTH_BODY = "length-body"
_HTTP_CHUNK_SIZE = "chunk-size"
_HTTP_CHUNK_DATA = "chunk-data"
_HTTP_CHUNK_END = "chunk-end"
_HTTP_TRAILERS = "trailers"
_HTTP_END = "end"
_HTTP_DONE = "done"
_HTTP_CLOSED = "closed"

LAST_CHUNK = b"0\r\n\r\n"


class HTTPProtocolError(AsokError):
    """The peer sent bad HTTP. Answer with `.status`, then close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self):
        return f"HTTPProtocolError({self.status}, {self.message!r})"


class _HttpSentinel:
    __slots__ = ("_name",)

    def __init__(self, name):
        self._name = name

    def __repr__(self):
        return self._name


NEED_DATA = _HttpSentinel("NEED_DATA")


@dataclass(slots=True)
class RequestHead:
    """A request line and its header fields (names lower-cased, values stripped)."""
    method: str
    target: str
    version: str
    headers: list
    keep_alive: bool
    expect_continue: bool

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header `name` (any case), else `default`."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default


@dataclass(slots=True)
class Body:
    """A piece of the request body; a body may arrive in several pieces."""
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    """The request is complete."""


@dataclass(slots=True)
class ConnectionEnded:
    """The peer closed the connection between two requests."""


# ═══ 4b. HTTP/1.1, sans-I/O: the request parser ═══════════════════════════════════════════════════

class HTTPParser:
    """Parse the requests of one connection, server side.

    Feed bytes with receive_data() (b"" at EOF) and call next_event() until it
    returns NEED_DATA. After EndOfMessage the parser waits: call
    start_next_cycle() once the response is sent to parse the next request.
    """

    def __init__(self, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._eof = False
        self._state = _HTTP_HEAD
        self._remaining = 0        # bytes left of a Content-Length body or of a chunk
        self._body_seen = 0        # chunked body bytes announced so far
        self._trailer_budget = 0   # header bytes left for the trailer section
        self._scan = 0             # where the search for a blank line resumes
        self._error = None

    @property
    def pending_bytes(self) -> bytes:
        """Bytes received but not consumed (e.g. WebSocket frames after an Upgrade)."""
        return bytes(self._buf)

    @property
    def pending_size(self) -> int:
        """How many bytes are buffered but not consumed (cheap: no copy)."""
        return len(self._buf)

    @property
    def waiting(self) -> bool:
        """Whether next_event() has nothing to return but NEED_DATA until more bytes come: a new
        cycle with no bytes buffered and the peer's side still open."""
        return self._state == _HTTP_HEAD and not self._buf and not self._eof and self._error is None

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; b"" means the peer closed its side."""
        if self._eof and data:
            raise RuntimeError("receive_data() after EOF")
        if data:
            self._buf += data
        else:
            self._eof = True

    def _skip_request(self) -> None:
        """The server took a whole request, arrived alone, from what it made of the same bytes
        before (_KNOWN_HEADS): the parser goes to where that request's EndOfMessage left it."""
        self._state = _HTTP_DONE

    def start_next_cycle(self) -> None:
        """Start parsing the next request; call it after the response is sent."""
        if self._state != _HTTP_DONE:
            raise RuntimeError("start_next_cycle() before EndOfMessage")
        self._state = _HTTP_HEAD

    def next_event(self) -> Any:
        """Return the next event, or NEED_DATA; raise HTTPProtocolError on bad data."""
        if self._error is not None:
            raise self._error
        try:
            return self._step()
        except HTTPProtocolError as exc:
            self._error = exc
            raise

    def _step(self):
        state = self._state
        if state == _HTTP_HEAD:
            return self._read_head()
        if state == _HTTP_LENGTH_BODY:
            return self._read_length_body()
        if state == _HTTP_END:
            self._state = _HTTP_DONE
            return EndOfMessage()
        if state == _HTTP_DONE:
            return NEED_DATA
        if state == _HTTP_CLOSED:
            return ConnectionEnded()
        return self._read_chunked()

    def _need_data(self):
        if self._eof:
            raise HTTPProtocolError(400, "incomplete request")
        return NEED_DATA

    def _find_blank_line(self, start, limit):
        """Return (end of the last field line, end of the blank line), or None."""
        buf = self._buf
        start = max(start, self._scan)
        crlf = buf.find(b"\n\r\n", start, limit)
        lf = buf.find(b"\n\n", start, limit if crlf < 0 else crlf + 1)
        if lf >= 0:
            return lf, lf + 2
        if crlf >= 0:
            return crlf, crlf + 3
        self._scan = max(start, len(buf) - 2)
        return None

    def _read_head(self):
        buf = self._buf
        while buf and (buf[0] == 10 or (buf[0] == 13 and buf[1:2] == b"\n")):  # RFC 9112 §2.2
            del buf[:1 if buf[0] == 10 else 2]
        if not buf:
            if self._eof:
                self._state = _HTTP_CLOSED
                return ConnectionEnded()
            return NEED_DATA
        if buf[0] not in _HTTP_TOKEN_START:
            raise HTTPProtocolError(400, "malformed request line")
        line_end = buf.find(b"\n", 0, MAX_REQUEST_LINE + 2)
        if line_end < 0:
            if len(buf) > MAX_REQUEST_LINE + 1:
                raise HTTPProtocolError(414, "request line too long")
            return self._need_data()
        found = self._find_blank_line(line_end, line_end + 1 + MAX_HEADER_BYTES)
        if found is None:
            if len(buf) - line_end - 1 > MAX_HEADER_BYTES:
                raise HTTPProtocolError(431, "header section too large")
            return self._need_data()
        fields_end, end = found
        header_bytes = end - line_end - 1
        if header_bytes > MAX_HEADER_BYTES:
            raise HTTPProtocolError(431, "header section too large")
        lines = _http_split_lines(bytes(buf[:fields_end + 1]))
        del buf[:end]
        self._scan = 0
        self._trailer_budget = MAX_HEADER_BYTES - header_bytes
        return self._parse_head(lines)

    def _parse_head(self, lines):
        request_line = lines[0]
        if len(request_line) > MAX_REQUEST_LINE:
            raise HTTPProtocolError(414, "request line too long")
        match = _HTTP_REQUEST_LINE.fullmatch(request_line)
        if match is None:
            raise HTTPProtocolError(400, "malformed request line")
        method, target, version = match.groups()
        if version not in (b"1.1", b"1.0"):
            raise HTTPProtocolError(505, "HTTP version not supported")
        version = "HTTP/1.1" if version == b"1.1" else "HTTP/1.0"
        headers = _http_parse_fields(lines[1:])
        return self._frame(method.decode("ascii"), target.decode("ascii"), version, headers)

    def _frame(self, method, target, version, headers):
        """Check the fields that frame the message and choose how to read the body."""
        hosts, lengths, codings, connection, expect = 0, [], [], [], []
        for name, value in headers:
            if name == "host":
                hosts += 1
            elif name == "content-length":
                lengths.append(value)
            elif name == "transfer-encoding":
                codings.append(value)
            elif name == "connection":
                connection.append(value)
            elif name == "expect":
                expect.append(value)
        if hosts > 1:
            raise HTTPProtocolError(400, "several Host headers")
        if hosts == 0 and version == "HTTP/1.1":
            raise HTTPProtocolError(400, "missing Host header")
        if lengths and codings:
            raise HTTPProtocolError(400, "Content-Length and Transfer-Encoding together")
        if codings:
            self._check_codings(codings, version)
            self._state = _HTTP_CHUNK_SIZE
            self._body_seen = 0
        elif lengths:
            length = self._content_length(lengths)
            self._state = _HTTP_LENGTH_BODY if length else _HTTP_END
            self._remaining = length
        else:
            self._state = _HTTP_END
        tokens = _http_tokens(connection) if connection else ()
        if "close" in tokens:
            keep_alive = False
        else:
            keep_alive = version == "HTTP/1.1" or "keep-alive" in tokens
        expect_continue = bool(expect) and version == "HTTP/1.1" and "100-continue" in _http_tokens(expect)
        return RequestHead(method, target, version, headers, keep_alive, expect_continue)

    def _check_codings(self, values, version):
        if version == "HTTP/1.0":
            raise HTTPProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.split(";", 1)[0].strip() for c in _http_tokens(values)]
        if not codings:
            raise HTTPProtocolError(400, "empty Transfer-Encoding")
        for coding in codings:
            if coding not in _HTTP_KNOWN_CODINGS:
                raise HTTPProtocolError(501, f"unsupported transfer coding {coding!r}")
        if codings[-1] != "chunked":
            raise HTTPProtocolError(400, "final transfer coding is not chunked")
        if "chunked" in codings[:-1]:
            raise HTTPProtocolError(400, "chunked applied more than once")
        if len(codings) > 1:
            raise HTTPProtocolError(501, f"unsupported transfer coding {codings[0]!r}")

    def _content_length(self, values):
        """One length from all Content-Length fields (RFC 9112 §6.3: equal repeats are fine)."""
        numbers = {v.strip(" \t") for value in values for v in value.split(",")}
        for number in numbers:
            if not (number.isascii() and number.isdigit()):
                raise HTTPProtocolError(400, "bad Content-Length")
        numbers = {number.lstrip("0") or "0" for number in numbers}
        if len(numbers) > 1:
            raise HTTPProtocolError(400, "conflicting Content-Length values")
        number = numbers.pop()
        if len(number) > len(str(self.max_body)) or int(number) > self.max_body:
            raise HTTPProtocolError(413, f"request body too large: the limit is {self.max_body} bytes")
        return int(number)

    def _read_length_body(self):
        buf = self._buf
        if not buf:
            return self._need_data()
        size = min(len(buf), self._remaining)
        data = bytes(buf[:size])
        del buf[:size]
        self._remaining -= size
        if not self._remaining:
            self._state = _HTTP_END
        return Body(data)

    def _read_chunked(self):
        buf = self._buf
        while True:
            state = self._state
            if state == _HTTP_CHUNK_SIZE:
                line_end = buf.find(b"\n", 0, _HTTP_MAX_CHUNK_LINE + 1)
                if line_end < 0:
                    if len(buf) > _HTTP_MAX_CHUNK_LINE:
                        raise HTTPProtocolError(400, "chunk size line too long")
                    return self._need_data()
                line = bytes(buf[:line_end])
                del buf[:line_end + 1]
                self._start_chunk(line)
            elif state == _HTTP_CHUNK_DATA:
                if not buf:
                    return self._need_data()
                size = min(len(buf), self._remaining)
                data = bytes(buf[:size])
                del buf[:size]
                self._remaining -= size
                if not self._remaining:
                    self._state = _HTTP_CHUNK_END
                return Body(data)
            elif state == _HTTP_CHUNK_END:
                if buf[:1] == b"\n" or buf[:2] == b"\r\n":
                    del buf[:1 if buf[0] == 10 else 2]
                    self._state = _HTTP_CHUNK_SIZE
                elif buf == b"" or buf == b"\r":
                    return self._need_data()
                else:
                    raise HTTPProtocolError(400, "missing CRLF after chunk data")
            else:
                return self._read_trailers()

    def _start_chunk(self, line):
        """Parse `chunk-size [; extensions]` (RFC 9112 §7.1); extensions are ignored."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            raise HTTPProtocolError(400, "bare CR in chunk size line")
        size = line.split(b";", 1)[0].strip(b" \t")
        if not _HTTP_HEX.fullmatch(size):
            raise HTTPProtocolError(400, "bad chunk size")
        size = int(size, 16)
        self._body_seen += size
        if self._body_seen > self.max_body:
            raise HTTPProtocolError(413, f"request body too large: the limit is {self.max_body} bytes")
        self._state = _HTTP_CHUNK_DATA if size else _HTTP_TRAILERS
        self._remaining = size

    def _read_trailers(self):
        """Read the trailer section (RFC 9112 §7.1.2) and drop it."""
        buf = self._buf
        if buf[:1] == b"\n" or buf[:2] == b"\r\n":
            del buf[:1 if buf[0] == 10 else 2]
            self._state = _HTTP_DONE
            return EndOfMessage()
        budget = self._trailer_budget
        found = self._find_blank_line(0, budget) if buf != b"\r" else None
        if found is None:
            if len(buf) > budget:
                raise HTTPProtocolError(431, "trailer section too large")
            return self._need_data()
        fields_end, end = found
        _http_parse_fields(_http_split_lines(bytes(buf[:fields_end + 1])))
        del buf[:end]
        self._scan = 0
        self._state = _HTTP_DONE
        return EndOfMessage()


def _http_split_lines(block):
    """Split a head ending in a line end into lines; CRLF and bare LF both end a line."""
    text = block.replace(b"\r\n", b"\n")
    if b"\r" in text:
        raise HTTPProtocolError(400, "bare CR in request head")
    if len(text.translate(None, _HTTP_CONTROL)) != len(text):  # one C pass (a regex tests each byte)
        raise HTTPProtocolError(400, "control character in request head")
    lines = text.split(b"\n")
    lines.pop()
    return lines


def _http_parse_fields(lines):
    """Parse `name: value` lines into (lower-case name, stripped value) pairs."""
    if len(lines) > MAX_HEADERS:
        raise HTTPProtocolError(431, "too many header fields")
    headers = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HTTPProtocolError(400, "obsolete line folding in header")
        name, colon, value = line.partition(b":")
        if not colon:
            raise HTTPProtocolError(400, "header line without a colon")
        known = _HTTP_NAMES.get(name)
        if known is None:
            if not _HTTP_TOKEN.fullmatch(name):
                if name and name.rstrip(b" \t") != name:
                    raise HTTPProtocolError(400, "whitespace before colon in header")
                raise HTTPProtocolError(400, "invalid header name")
            known = name.lower().decode("ascii")
            _keep(_HTTP_NAMES, bytes(name), known, 512)
        headers.append((known, value.strip(b" \t").decode("latin-1")))
    return headers


_HTTP_NAMES = {}  # a header name as received -> checked, in lower case (bounded)
_KEPT_LONGEST = 1024  # characters of a key (a header name, a field line, a Cookie field) a _keep cache takes


def _keep(cache, key, value, entries, size=None):
    """cache[key] = value, for the caches of what peers send or responses repeat (header names,
    field lines, Cookie fields): emptied when it holds `entries`, and a key (or the `size` given
    for it) longer than _KEPT_LONGEST is not kept, so what a client sends makes none of them large."""
    if (len(key) if size is None else size) <= _KEPT_LONGEST:
        if len(cache) >= entries:
            cache.clear()
        cache[key] = value


def _http_tokens(values):
    """Comma-separated list elements of several header values, lower-cased."""
    return [item.strip(" \t").lower() for value in values
            for item in value.split(",") if item.strip(" \t")]


# ═══ 4c. HTTP/1.1, sans-I/O: responses (the head, chunks, the framing rule) ═══════════════════════

_STATUS_LINES = {}  # (version, status) -> its status line
_FIELD_LINES = {}   # (name, value) -> its field line, for fields already checked (bounded)


def render_response_head(status: int, headers: Iterable[tuple[str, str]], version: str = "HTTP/1.1") -> bytes:
    """Return the status line and header fields of a response, blank line included."""
    first = _STATUS_LINES.get((version, status)) if type(status) is int else None
    if first is None:
        if not isinstance(status, int) or not 100 <= status <= 999:
            raise ValueError(f"invalid status code {status!r}")
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise ValueError(f"invalid HTTP version {version!r}")
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        first = _STATUS_LINES[(version, int(status))] = f"{version} {status} {reason}\r\n"
    lines = [first]
    for pair in headers:
        line = _FIELD_LINES.get(pair) if type(pair) is tuple else None
        if line is None:
            name, value = pair
            if not _HTTP_TOKEN_TEXT.fullmatch(name) or _HTTP_BAD_OUTPUT.search(value):
                raise ValueError(f"invalid response header {name!r}: {value!r}")
            line = f"{name}: {value}\r\n"
            if type(pair) is tuple and type(name) is str and type(value) is str:
                _keep(_FIELD_LINES, pair, line, 1024, len(line))  # Date, lengths, cookies: the stable ones come back
        lines.append(line)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def chunk(data: bytes) -> bytes:
    """Frame `data` as one chunk of a chunked body; b"" gives b"" (LAST_CHUNK ends the body)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def response_framing(method: str, status: int, headers: Iterable[tuple[str, str]], body: Any,
                     version: str = "HTTP/1.1") -> tuple[int | None, str]:
    """How a response's body is delimited, decided here once for the server, WSGI, ASGI,
    `Asok.handle` and the test client. Returns (length, mode): `length` is the Content-Length
    field to add (None when one is given, the body is an iterable, or the status has no body);
    `mode` is "none" (HEAD, 1xx, 204, 304: no body on the wire, RFC 9110 §6.4.1 and §9.3.2),
    "length" (Content-Length bytes), "chunked" (an iterable on HTTP/1.1: chunk() each piece,
    then LAST_CHUNK) or "close" (an iterable on HTTP/1.0: the end of the connection ends it,
    RFC 9112 §6.3)."""
    declared = False
    for name, _ in headers:  # a loop, not any() over a generator: run for every response
        if name.lower() == "content-length":
            declared = True
            break
    streamed = not isinstance(body, (bytes, bytearray, memoryview))
    bodiless = status < 200 or status in (204, 304)  # RFC 9110 §8.6: no Content-Length on these
    length = None if declared or streamed or bodiless else len(body)
    if bodiless or method == "HEAD":
        return length, "none"
    if declared or not streamed:
        return length, "length"
    return None, "chunked" if version == "HTTP/1.1" else "close"


# ═══ 5a. WebSocket, sans-I/O: limits, opcodes, close codes, events, frames ════════════════════════

#
# RFC 6455. `WSConnection` turns bytes into events and events into bytes; it
# never touches a socket. The server, the ASGI adapter's tests and the small
# clients at the end of this section all drive it the same way:
#
#     conn.receive_data(chunk)            # b"" means the peer closed the TCP stream
#     for event in conn.events(): ...     # TextMessage, BytesMessage, Ping, Pong, CloseConnection
#     sock.sendall(conn.send(event))
#
# Bad data from the peer raises WebSocketError carrying the close code to send.

WS_CLIENT_MAX_MESSAGE = 64 << 20   # what asok's own clients accept in one message
MAX_WS_MESSAGE = 1 << 20            # bytes in one (possibly fragmented) message
MAX_WS_FRAGMENTS = 1 << 16          # frames in one message (Autobahn sends 4 MiB in 64-byte ones), else 1009
_WS_MAX_CONTROL_PAYLOAD = 125       # §5.5
_WS_MAX_CLOSE_REASON = 123          # §5.5: 125 minus the two-byte code
_WS_MAX_RESPONSE_HEAD = 1 << 16     # client side: bytes of the handshake response head
_WS_READ_CHUNK = 1 << 16

# §1.3: the GUID hashed with the client's key to prove the server speaks WebSocket.
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# §5.2: opcodes.
class Opcode(IntEnum):
    """§5.2 frame opcodes; 0x8 and above are control frames (§5.5)."""
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


_WS_KNOWN_OPCODES = frozenset(Opcode)


class CloseCode(IntEnum):
    """§7.4.1 close status codes (1012-1014 from the IANA registry)."""
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015


# Codes that only report a local condition and never travel in a close frame.
_WS_LOCAL_ONLY_CODES = frozenset({CloseCode.NO_STATUS, CloseCode.ABNORMAL, CloseCode.TLS_HANDSHAKE})


def _ws_close_code_allowed(code):
    """True for the codes a close frame may carry (§7.4.1, §7.4.2)."""
    return (CloseCode.NORMAL <= code <= CloseCode.UNSUPPORTED_DATA
            or CloseCode.INVALID_DATA <= code <= CloseCode.BAD_GATEWAY or 3000 <= code <= 4999)


@dataclass(frozen=True, slots=True)
class TextMessage:
    data: str


@dataclass(frozen=True, slots=True)
class BytesMessage:
    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """Answer with `conn.send(Pong(ping.payload))`."""
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """A close frame (or, with 1006, a stream that ended without one).

    When the peer's close arrives, answer it with `conn.send(CloseConnection(event.code))`
    (echoing the code, or 1000); then close the TCP connection.
    """
    code: int = 1000
    reason: str = ""


class WebSocketError(AsokError):
    """The peer broke RFC 6455. Send `CloseConnection(err.close_code, str(err))`, then close."""

    def __init__(self, message: str, close_code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


class WebSocketHandshakeError(AsokError):
    """An upgrade request (server side) or response (client side) that is not a valid handshake.

    `status` is the HTTP status to answer with (or the one the server answered with);
    `headers` is a list of (name, value) pairs for that answer.
    """

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def _ws_mask(data, key):
    """XOR `data` with the 4-byte `key` repeated (§5.3); one big-integer XOR, no byte loop."""
    size = len(data)
    if not size:
        return b""
    stream = (key * (size // 4 + 1))[:size]
    mixed = int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")
    return mixed.to_bytes(size, "little")


def _ws_frame(opcode, payload, mask_key=None):
    """One final frame (§5.2), masked when `mask_key` is given."""
    size = len(payload)
    mask_bit = 0x80 if mask_key else 0
    head = bytearray([0x80 | opcode])
    if size < 126:
        head.append(mask_bit | size)
    elif size < 1 << 16:
        head.append(mask_bit | 126)
        head += size.to_bytes(2, "big")
    else:
        head.append(mask_bit | 127)
        head += size.to_bytes(8, "big")
    if mask_key:
        head += mask_key
        payload = _ws_mask(payload, mask_key)
    return bytes(head) + payload


def _ws_close_payload(code, reason):
    """The body of a close frame we send: empty for local-only codes, else code + cut reason."""
    if code in _WS_LOCAL_ONLY_CODES:
        return b""
    if not _ws_close_code_allowed(code):
        raise ValueError(f"close code {code} may not be sent")
    encoded = reason.encode("utf-8")[:_WS_MAX_CLOSE_REASON]
    encoded = encoded.decode("utf-8", "ignore").encode("utf-8")
    return int(code).to_bytes(2, "big") + encoded


def _ws_parse_close(payload):
    """Decode a received close body (§5.5.1) into CloseConnection, validating code and reason."""
    if not payload:
        return CloseConnection(CloseCode.NO_STATUS, "")
    if len(payload) == 1:
        raise WebSocketError("close frame body of one byte")
    code = int.from_bytes(payload[:2], "big")
    if not _ws_close_code_allowed(code):
        raise WebSocketError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError("close reason is not valid UTF-8", CloseCode.INVALID_DATA) from None
    return CloseConnection(code, reason)


def _ws_decode_utf8(decoder, data, final):
    """Decode one fragment; invalid UTF-8 fails here, even in a sequence the next fragment would end.

    CPython's incremental decoder already refuses most impossible prefixes at once; it
    waits on a surrogate prefix (ED A0..BF), so a held-back prefix of two or more bytes is
    checked by completing it with continuation bytes.
    """
    try:
        text = decoder.decode(data, final=final)
        pending = decoder.getstate()[0]
        if len(pending) >= 2:
            needed = 4 if pending[0] >= 0xF0 else 3
            (pending + b"\x80" * (needed - len(pending))).decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError("text message is not valid UTF-8", CloseCode.INVALID_DATA) from None
    return text


# ═══ 5b. WebSocket, sans-I/O: the connection (WSConnection) ═══════════════════════════════════════

class WSConnection:
    """One side of a WebSocket connection after the handshake: bytes in, events out.

    `state` is "OPEN"; "CLOSING" once we sent a close and wait for the peer's;
    "REMOTE_CLOSING" once the peer's close arrived and ours is not sent yet;
    "CLOSED" when both closes have passed (or the stream ended).
    """

    def __init__(self, client: bool = False, max_size: int = MAX_WS_MESSAGE,
                 max_fragments: int = MAX_WS_FRAGMENTS) -> None:
        self.client = client
        self.max_size = max_size
        self.max_fragments = max_fragments
        self.state = "OPEN"
        self._buffer = bytearray()
        self._eof = False
        self._peer_closed = False      # the peer's close frame (or EOF) has been reported
        self._error = None
        self._header = None            # (fin, opcode, length, mask_key, header_size) of the frame being read
        self._message_opcode = None    # TEXT or BINARY while a message is being assembled
        self._message = bytearray()    # its payload so far: fragments are joined as they come
        self._fragments = 0
        self._decoder = None           # checks a fragmented text message's UTF-8 as it arrives
        self._budget = math.inf        # frames events() may still read in this call
        self.frames_left = False       # events(max_frames) stopped with frames still buffered

    # -- receiving --------------------------------------------------------

    def receive_data(self, data: bytes | None) -> None:
        """Feed bytes read from the peer; b"" or None means the peer ended the stream
        (so never pass an empty leftover buffer by accident)."""
        if self._eof:
            raise RuntimeError("receive_data() after end of stream")
        if not data:
            self._eof = True
        elif not self._peer_closed:
            self._buffer += data

    def events(self, max_frames: int | None = None) -> Iterator[TextMessage | BytesMessage | Ping | Pong | CloseConnection]:
        """Yield events until more data is needed, or until `max_frames` frames have been read;
        then `frames_left` is true and events() should be called again (with no new data), so
        a server can take turns between connections however many frames one peer sends."""
        self._budget = math.inf if max_frames is None else max_frames
        self.frames_left = False
        try:
            while (event := self.next_event()) is not None:
                yield event
        finally:
            self._budget = math.inf

    def next_event(self) -> TextMessage | BytesMessage | Ping | Pong | CloseConnection | None:
        """The next event, or None when more data is needed. Raises WebSocketError on bad data."""
        if self._error is not None:
            raise self._error
        try:
            while not self._peer_closed:
                if self._budget <= 0:
                    self.frames_left = bool(self._buffer)
                    return None
                frame = self._read_frame()
                if frame is None:
                    return self._end_of_stream() if self._eof else None
                event = self._handle_frame(*frame)
                if event is not None:
                    return event
            return None
        except WebSocketError as err:
            self._error = err
            raise

    def _end_of_stream(self):
        """The stream ended without the peer's close frame: report 1006 once."""
        self._peer_closed = True
        self.state = "CLOSED"
        self._buffer.clear()
        return CloseConnection(CloseCode.ABNORMAL, "connection closed without a close frame")

    def _read_frame(self):
        """(fin, opcode, unmasked payload) of the next complete frame, or None."""
        if self._header is None:
            self._header = self._read_header()
            if self._header is None:
                return None
        fin, opcode, length, mask_key, start = self._header
        end = start + length
        if len(self._buffer) < end:
            return None
        with memoryview(self._buffer) as view:
            payload = bytes(view[start:end])
        del self._buffer[:end]
        self._header = None
        self._budget -= 1
        if mask_key:
            payload = _ws_mask(payload, mask_key)
        return fin, opcode, payload

    def _read_header(self):
        """Parse and check a frame header (§5.2) as soon as its bytes are in; None if incomplete."""
        buf = self._buffer
        if len(buf) < 2:
            return None
        fin, rsv, opcode = bool(buf[0] & 0x80), buf[0] & 0x70, buf[0] & 0x0F
        masked, length = bool(buf[1] & 0x80), buf[1] & 0x7F
        if rsv:
            raise WebSocketError("reserved bits set but no extension was negotiated")
        if opcode not in _WS_KNOWN_OPCODES:
            raise WebSocketError(f"reserved opcode {opcode:#x}")
        if opcode >= Opcode.CLOSE and not fin:
            raise WebSocketError("fragmented control frame")
        if opcode >= Opcode.CLOSE and length > _WS_MAX_CONTROL_PAYLOAD:
            raise WebSocketError("control frame payload over 125 bytes")
        if masked == self.client:
            raise WebSocketError("masked frame from the server" if self.client else "unmasked frame from the client")
        size = 2
        if length == 126:
            size = 4
            if len(buf) < size:
                return None
            length = int.from_bytes(buf[2:4], "big")
        elif length == 127:
            size = 10
            if len(buf) < size:
                return None
            length = int.from_bytes(buf[2:10], "big")
            if length >> 63:
                raise WebSocketError("64-bit payload length with the top bit set")
        mask_key = None
        if masked:
            if len(buf) < size + 4:
                return None
            mask_key = bytes(buf[size:size + 4])
            size += 4
        if opcode < Opcode.CLOSE:
            self._check_data_frame(opcode, length)
        return fin, opcode, length, mask_key, size

    def _check_data_frame(self, opcode, length):
        """Fragment order (§5.4) and the message size limit, before the payload arrives."""
        if opcode == Opcode.CONTINUATION and self._message_opcode is None:
            raise WebSocketError("continuation frame without a message to continue")
        if opcode != Opcode.CONTINUATION and self._message_opcode is not None:
            raise WebSocketError("new data frame while a fragmented message is open")
        size = length + (len(self._message) if opcode == Opcode.CONTINUATION else 0)
        if size > self.max_size:
            raise WebSocketError(f"message over {self.max_size} bytes", CloseCode.MESSAGE_TOO_BIG)
        if opcode == Opcode.CONTINUATION and self._fragments >= self.max_fragments:
            raise WebSocketError(f"message in over {self.max_fragments} fragments", CloseCode.MESSAGE_TOO_BIG)

    def _handle_frame(self, fin, opcode, payload):
        """Turn a complete frame into an event, or None for a non-final fragment."""
        if opcode == Opcode.PING:
            return Ping(payload)
        if opcode == Opcode.PONG:
            return Pong(payload)
        if opcode == Opcode.CLOSE:
            event = _ws_parse_close(payload)
            self._peer_closed = True
            self._buffer.clear()
            self.state = "CLOSED" if self.state == "CLOSING" else "REMOTE_CLOSING"
            return event
        if fin and opcode != Opcode.CONTINUATION:  # a whole message in one frame
            if opcode == Opcode.BINARY:
                return BytesMessage(payload)
            try:
                return TextMessage(payload.decode("utf-8"))
            except UnicodeDecodeError:
                raise WebSocketError("text message is not valid UTF-8", CloseCode.INVALID_DATA) from None
        if opcode != Opcode.CONTINUATION:
            self._message_opcode = opcode
            self._decoder = codecs.getincrementaldecoder("utf-8")() if opcode == Opcode.TEXT else None
        self._fragments += 1
        self._message += payload
        if self._decoder is not None:
            _ws_decode_utf8(self._decoder, payload, fin)  # fails at the first bad fragment
        if not fin:
            return None
        data = bytes(self._message)
        event = TextMessage(data.decode("utf-8")) if self._message_opcode == Opcode.TEXT else BytesMessage(data)
        self._message_opcode, self._message, self._fragments, self._decoder = None, bytearray(), 0, None
        return event

    # -- sending ----------------------------------------------------------

    def send(self, event: TextMessage | BytesMessage | Ping | Pong | CloseConnection) -> bytes:
        """The bytes that put `event` on the wire. A client masks with a fresh random key."""
        if self.state in ("CLOSING", "CLOSED"):
            raise RuntimeError(f"cannot send {type(event).__name__}: connection is {self.state}")
        if isinstance(event, TextMessage):
            opcode, payload = Opcode.TEXT, event.data.encode("utf-8")
        elif isinstance(event, BytesMessage):
            opcode, payload = Opcode.BINARY, bytes(event.data)
        elif isinstance(event, (Ping, Pong)):
            opcode, payload = (Opcode.PING if isinstance(event, Ping) else Opcode.PONG), bytes(event.payload)
            if len(payload) > _WS_MAX_CONTROL_PAYLOAD:
                raise ValueError("ping/pong payload over 125 bytes")
        elif isinstance(event, CloseConnection):
            opcode, payload = Opcode.CLOSE, _ws_close_payload(event.code, event.reason)
            self.state = "CLOSED" if self.state == "REMOTE_CLOSING" else "CLOSING"
        else:
            raise TypeError(f"cannot send {event!r}")
        return _ws_frame(opcode, payload, os.urandom(4) if self.client else None)


# ═══ 5c. WebSocket, sans-I/O: the opening handshake (§4) ══════════════════════════════════════════

def ws_accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key (§4.2.2)."""
    digest = hashlib.sha1((key + _WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def _ws_tokens(value):
    """The lower-case comma-separated tokens of a header value."""
    return {token.strip().lower() for token in (value or "").split(",")}


def _ws_valid_key(key):
    """True when `key` is base64 of exactly 16 bytes (§4.1)."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def ws_check_handshake(method: str, headers: Mapping[str, str]) -> str:
    """Check an upgrade request (§4.2.1); `headers` has lower-case names.

    Returns the Sec-WebSocket-Accept value, or raises WebSocketHandshakeError
    (400 for a malformed request, 426 for a missing or unsupported version).
    The HTTP version and the Origin policy are the caller's to check.
    """
    if method != "GET":
        raise WebSocketHandshakeError(400, "WebSocket upgrade must use GET")
    if "websocket" not in _ws_tokens(headers.get("upgrade")):
        raise WebSocketHandshakeError(400, "missing 'Upgrade: websocket' header")
    if "upgrade" not in _ws_tokens(headers.get("connection")):
        raise WebSocketHandshakeError(400, "'Connection' header lacks the 'upgrade' token")
    key = headers.get("sec-websocket-key", "").strip()
    if not _ws_valid_key(key):
        raise WebSocketHandshakeError(400, "missing or invalid Sec-WebSocket-Key")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise WebSocketHandshakeError(426, "unsupported WebSocket version (13 required)",
                                      [("Sec-WebSocket-Version", "13")])
    return ws_accept_key(key)


def ws_handshake_request(host: str, path: str, key: str, origin: str | None = None,
                         extra_headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """The bytes of a client's upgrade request (§4.1); `extra_headers` are (name, value) pairs."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    if any("\r" in line or "\n" in line for line in lines):
        raise ValueError("line break inside a handshake header")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def ws_check_handshake_response(status: int, headers: Mapping[str, str], key: str) -> None:
    """Check the server's answer to our upgrade request (§4.2.2); raises WebSocketHandshakeError."""
    if status != 101:
        raise WebSocketHandshakeError(status, f"server refused the WebSocket upgrade ({status})",
                                      list(headers.items()))
    if "websocket" not in _ws_tokens(headers.get("upgrade")):
        raise WebSocketHandshakeError(status, "response lacks 'Upgrade: websocket'")
    if "upgrade" not in _ws_tokens(headers.get("connection")):
        raise WebSocketHandshakeError(status, "response 'Connection' header lacks 'upgrade'")
    if headers.get("sec-websocket-accept", "").strip() != ws_accept_key(key):
        raise WebSocketHandshakeError(status, "wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-extensions") or headers.get("sec-websocket-protocol"):
        raise WebSocketHandshakeError(status, "server chose an extension or subprotocol we did not offer")


# ═══ 6. WebSocket clients (tests and the benchmark) ═══════════════════════════════════════════════

class ConnectionClosed(AsokError):
    """The WebSocket is closed; `close_code` and `reason` come from the close frame (1006: none
    came). `code` is the same number, under the name the websockets library uses."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed ({code}){': ' + reason if reason else ''}")
        self.close_code = self.code = code
        self.reason = reason


def _ws_parse_url(url):
    """(host, port, path) of a ws:// URL; the path keeps its query string."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"not a ws:// URL: {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, path


def _ws_client_request(url, origin, headers):
    """(host, port, key, request bytes) for connecting to `url`."""
    host, port, path = _ws_parse_url(url)
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or ())
    host_header = host if port == 80 else f"{host}:{port}"
    return host, port, key, ws_handshake_request(host_header, path, key, origin, pairs)


def _ws_parse_response_head(head):
    """(status, headers with lower-case names) of a response head without its blank line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise WebSocketHandshakeError(502, f"malformed handshake response: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise WebSocketHandshakeError(502, f"malformed header line: {line!r}")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(parts[1]), headers


class _WSClientCore:
    """What both clients share: the WSConnection and how a client answers its events."""

    def __init__(self, conn, response_headers):
        self._conn = conn
        self.response_headers = response_headers
        self._closed = None            # ConnectionClosed once the connection is over

    def _process(self):
        """Handle buffered events: (bytes to send, a message or None). Sets `_closed` at the end."""
        out = bytearray()
        try:
            for event in self._conn.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    return bytes(out), event.data
                if isinstance(event, Ping):
                    out += self._conn.send(Pong(event.payload))
                elif isinstance(event, CloseConnection):
                    if self._conn.state == "REMOTE_CLOSING":
                        out += self._conn.send(CloseConnection(event.code))
                    self._closed = ConnectionClosed(event.code, event.reason)
                    return bytes(out), None
        except WebSocketError as err:
            if self._conn.state in ("OPEN", "REMOTE_CLOSING"):
                out += self._conn.send(CloseConnection(err.close_code, str(err)))
            self._closed = ConnectionClosed(err.close_code, str(err))
        return bytes(out), None

    def _raise_if_closed(self):
        if self._closed is not None:
            raise ConnectionClosed(self._closed.code, self._closed.reason)

    def _message_event(self, message):
        if isinstance(message, str):
            return TextMessage(message)
        if isinstance(message, (bytes, bytearray, memoryview)):
            return BytesMessage(bytes(message))
        raise TypeError(f"can only send str or bytes, not {type(message).__name__}")


class WebSocketClient(_WSClientCore):
    """A blocking WebSocket client: `with WebSocketClient.connect("ws://host:port/path") as ws:`."""

    def __init__(self, sock: socket.socket, conn: WSConnection, response_headers: dict[str, str],
                 timeout: float | None) -> None:
        super().__init__(conn, response_headers)
        self._sock = sock
        self._timeout = timeout

    @classmethod
    def connect(cls, url: str, origin: str | None = None, headers: Mapping[str, str] | None = None,
                timeout: float = 10, max_size: int = WS_CLIENT_MAX_MESSAGE) -> "WebSocketClient":
        """Open the TCP connection and do the handshake; raises WebSocketHandshakeError if refused."""
        host, port, key, request = _ws_client_request(url, origin, headers)
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.sendall(request)
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                if len(buffer) > _WS_MAX_RESPONSE_HEAD:
                    raise WebSocketHandshakeError(502, "handshake response head too large")
                chunk = sock.recv(_WS_READ_CHUNK)
                if not chunk:
                    raise WebSocketHandshakeError(502, "connection closed during the handshake")
                buffer += chunk
            head, _, rest = buffer.partition(b"\r\n\r\n")
            status, response_headers = _ws_parse_response_head(head)
            ws_check_handshake_response(status, response_headers, key)
        except BaseException:
            sock.close()
            raise
        conn = WSConnection(client=True, max_size=max_size)
        if rest:
            conn.receive_data(rest)
        return cls(sock, conn, response_headers, timeout)

    def send(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message."""
        self._raise_if_closed()
        self._write(self._conn.send(self._message_event(message)))

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping; receive() reads its pong."""
        self._raise_if_closed()
        self._write(self._conn.send(Ping(payload)))

    def receive(self, timeout: float | None = None) -> str | bytes:
        """The next message (str or bytes); answers pings; raises ConnectionClosed or TimeoutError."""
        self._raise_if_closed()
        while True:
            out, message = self._process()
            if out:
                self._write(out)
            if message is not None:
                return message
            if self._closed is not None:
                self._sock.close()
                self._raise_if_closed()
            self._sock.settimeout(timeout)
            try:
                data = self._sock.recv(_WS_READ_CHUNK)
            except TimeoutError:
                raise                  # the connection stays usable after a timeout
            except OSError:
                data = b""
            self._conn.receive_data(data)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Do the closing handshake (waiting up to the connect timeout for the echo), then close."""
        if self._closed is not None:
            return
        try:
            self._write(self._conn.send(CloseConnection(code, reason)))
            while True:
                self.receive(self._timeout)
        except (ConnectionClosed, OSError):
            pass
        finally:
            self._sock.close()
            if self._closed is None:
                self._closed = ConnectionClosed(CloseCode.ABNORMAL, "no close frame from the server")

    def _write(self, data):
        try:
            self._sock.sendall(data)
        except OSError as err:
            self._sock.close()
            self._closed = ConnectionClosed(CloseCode.ABNORMAL, str(err))
            self._raise_if_closed()

    def __enter__(self) -> "WebSocketClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncWebSocketClient(_WSClientCore):
    """The asyncio twin of WebSocketClient: `ws = await AsyncWebSocketClient.connect(url)`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: WSConnection,
                 response_headers: dict[str, str], timeout: float | None) -> None:
        super().__init__(conn, response_headers)
        self._reader = reader
        self._writer = writer
        self._timeout = timeout

    @classmethod
    async def connect(cls, url: str, origin: str | None = None, headers: Mapping[str, str] | None = None,
                      timeout: float = 10, max_size: int = WS_CLIENT_MAX_MESSAGE) -> "AsyncWebSocketClient":
        """Open the connection and do the handshake; raises WebSocketHandshakeError if refused."""
        host, port, key, request = _ws_client_request(url, origin, headers)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=_WS_MAX_RESPONSE_HEAD), timeout)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            status, response_headers = _ws_parse_response_head(head[:-4])
            ws_check_handshake_response(status, response_headers, key)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            writer.close()
            raise WebSocketHandshakeError(502, f"bad handshake response: {err}") from None
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, WSConnection(client=True, max_size=max_size), response_headers, timeout)

    async def send(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message."""
        self._raise_if_closed()
        await self._write(self._conn.send(self._message_event(message)))

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping; receive() reads its pong."""
        self._raise_if_closed()
        await self._write(self._conn.send(Ping(payload)))

    async def receive(self, timeout: float | None = None) -> str | bytes:
        """The next message (str or bytes); answers pings; raises ConnectionClosed or TimeoutError."""
        self._raise_if_closed()
        while True:
            out, message = self._process()
            if out:
                await self._write(out)
            if message is not None:
                return message
            if self._closed is not None:
                self._writer.close()
                self._raise_if_closed()
            try:
                data = await asyncio.wait_for(self._reader.read(_WS_READ_CHUNK), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError("no WebSocket message in time") from None
            except OSError:
                data = b""
            self._conn.receive_data(data)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Do the closing handshake (waiting up to the connect timeout for the echo), then close."""
        if self._closed is not None:
            return
        try:
            await self._write(self._conn.send(CloseConnection(code, reason)))
            while True:
                await self.receive(self._timeout)
        except (ConnectionClosed, OSError):
            pass
        finally:
            self._writer.close()
            if self._closed is None:
                self._closed = ConnectionClosed(CloseCode.ABNORMAL, "no close frame from the server")
        try:
            await asyncio.wait_for(self._writer.wait_closed(), self._timeout)
        except OSError:
            pass

    async def _write(self, data):
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as err:
            self._writer.close()
            self._closed = ConnectionClosed(CloseCode.ABNORMAL, str(err))
            self._raise_if_closed()

    def __aiter__(self):
        return self

    async def __anext__(self):
        """Messages until the connection closes; a normal close ends the loop, others raise."""
        try:
            return await self.receive()
        except ConnectionClosed as closed:
            if closed.code in (CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS):
                raise StopAsyncIteration from None
            raise

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.close()


# ═══ 7. Signing and keys (DESIGN §6) ══════════════════════════════════════════════════════════════

SESSION_ID_BYTES = 32
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{43}\Z")


_B64_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(raw):
    return binascii.b2a_base64(raw, newline=False).translate(_B64_URLSAFE).rstrip(b"=").decode("ascii")


def derive_key(master: bytes, purpose: str) -> bytes:
    """A key for one purpose, so a state signature can never pass as a cookie's."""
    return hmac.new(master, b"asok/" + purpose.encode(), hashlib.sha256).digest()


class Signer:
    """HMAC-SHA256 over `bind` + value; the first key signs, every key verifies (rotation)."""

    def __init__(self, master_keys: Iterable[bytes], purpose: str) -> None:
        self.purpose = purpose
        keyed = [hmac.new(derive_key(k, purpose), digestmod=hashlib.sha256) for k in master_keys]
        # hmac.HMAC wraps OpenSSL's HMAC object in Python methods; that object, where there is one,
        # copies, updates and digests the same, without three Python calls per signature
        self._keys = [getattr(mac, "_hmac", None) or mac for mac in keyed]

    def __repr__(self):
        return f"<Signer {self.purpose} keys=***>"

    def _mac(self, key, value, bind):
        mac = key.copy()  # the keyed HMAC state, copied: cheaper than keying it again
        mac.update(f"{bind}\0{value}".encode())
        return _b64(mac.digest())

    def sign(self, value: str, bind: str = "") -> str:
        """`value` + "." + its HMAC-SHA256 for `bind`, made with the first key."""
        mac = self._keys[0].copy()  # as _mac, in this one frame: a page signs each component's token
        mac.update(f"{bind}\0{value}".encode())
        return value + "." + binascii.b2a_base64(mac.digest(), newline=False).translate(
            _B64_URLSAFE).rstrip(b"=").decode("ascii")

    def unsign(self, token: str, bind: str = "") -> str:
        """The value in `token` when one of the keys made its signature for `bind`; BadSignature otherwise."""
        if not isinstance(token, str) or "." not in token:
            raise BadSignature("not a signed value")
        value, _, mac = token.rpartition(".")
        for key in self._keys:
            if hmac.compare_digest(mac, self._mac(key, value, bind)):
                return value
        raise BadSignature("signature does not match")


# This process's id: os.getpid() is a system call, and a live event asked for it four times.
# A forked child sets its own before any of its code runs.
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


# The one place the key file and the session store write through: tests put a full disk here.
_os_write = os.write
_os_fsync = os.fsync
KEY_FILE_WAIT = 1.0   # seconds a reader waits for a short key file to fill before judging it


def _write_all(fd, data):
    """Write every byte of `data` or raise OSError: os.write may write less than asked (a
    nearly full disk does), so the rest is written again; a write of nothing is ENOSPC."""
    view = memoryview(data)
    while view:
        written = _os_write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _load_master_keys(app_dir, secret_key, debug, fallbacks):
    """SECRET_KEY, else a deterministic key in debug, else a random key kept in .asok/secret_key."""
    if secret_key:
        first = secret_key.encode() if isinstance(secret_key, str) else secret_key
    elif debug:
        first = hashlib.sha256(b"asok development key:" + str(app_dir).encode()).digest()
    else:
        first = _key_from_file(Path(app_dir, ".asok", "secret_key"))
    return [first] + [k.encode() if isinstance(k, str) else k for k in fallbacks if k]


def _key_from_file(path):
    """The key in `path`, made on first use. A new key is written to a temporary file, fsynced
    and linked into place, so nobody reads half a key and processes starting together agree
    on one. A short key (something writing it in place) is read again for KEY_FILE_WAIT; an
    empty file left by a start that could not write is replaced; a short one is an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + KEY_FILE_WAIT
    for _ in range(1000):
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            try:
                return _new_key_file(path, replace=False)
            except FileExistsError:
                continue  # another process linked its key first: read that one
        if len(key) >= 32:
            return key
        if time.monotonic() < deadline:
            time.sleep(0.02)
        elif key:
            break
        elif (key := _replace_empty_key_file(path)) is not None:
            return key
    raise RuntimeError(f"{path} holds a key shorter than 32 bytes; delete it to make a new one")


def _new_key_file(path, replace):
    key = secrets.token_hex(32).encode()
    temp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, key)
            _os_fsync(fd)
        finally:
            os.close(fd)
        (os.replace if replace else os.link)(temp, path)
    except OSError as exc:
        if isinstance(exc, FileExistsError):
            raise
        raise RuntimeError(f"cannot create the secret key file {path}: {exc.strerror or exc}") from exc
    finally:
        temp.unlink(missing_ok=True)
    return key


def _replace_empty_key_file(path):
    """Replace an empty key file with a new key, under flock on the empty file so that of
    several processes finding it only one replaces it; None if someone else did."""
    with open(path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        st = os.fstat(f.fileno())
        try:
            still_there = os.stat(path).st_ino == st.st_ino
        except FileNotFoundError:
            still_there = False
        if st.st_size or not still_there:
            return None
        log.warning("%s is empty (a start that could not write it left it); making a new key", path)
        return _new_key_file(path, replace=True)


# ═══ 8a. Sessions (DESIGN §6, §11): Session and the store contract ════════════════════════════════

SESSION_LIFETIME = 14 * 24 * 3600
SESSION_COOKIE = "asok_session"
SESSION_COLLECT_EVERY = 3600
_LOCK_STRIPES = 256
SESSION_CACHE_SIZE = 4096     # session records a process keeps parsed
SESSION_OPEN_FILES = 1024     # session files a process keeps open for appending, at most (and at
                              # most a sixteenth of its descriptor limit: _session_files_open)
SESSION_LOG_MAX = 64 * 1024   # a session file is compacted to one line past this size
SESSION_MAX_RECORD = 1 << 20  # bytes of one saved session record; a larger save is refused


class Session(dict):
    """A dict of the user's data. Assigning or deleting a key marks it modified by itself;
    a nested change needs `session.modified = True`, as in Flask and the seed.
    `regenerate()` gives it a new id (call it at sign-in); `clear()` empties it, component
    states included (sign-out)."""

    # what every session has in slots; what a session starts with, class attributes until set
    # (in its __dict__): one is opened per request
    __slots__ = ("sid", "live", "changed", "deleted", "__dict__")
    new = False
    seq = 0
    modified = False
    cleared = False
    previous_sid = None  # the id regenerate() replaced, deleted when the session is saved

    def __init__(self, data: Mapping[str, Any] | None = None, sid: str | None = None) -> None:
        if data:
            dict.__init__(self, data)
        self.sid = sid
        self.live = {}
        self.changed = set()
        self.deleted = set()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.changed.add(key)
        self.deleted.discard(key)
        self.modified = True

    def __delitem__(self, key):
        super().__delitem__(key)
        self.deleted.add(key)
        self.changed.discard(key)
        self.modified = True

    def pop(self, key: str, *default: Any) -> Any:
        """As dict.pop; removing a key marks the session modified."""
        if key in self:
            self.deleted.add(key)
            self.changed.discard(key)
            self.modified = True
        return super().pop(key, *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        """As dict.setdefault; marks the session modified when it adds the key."""
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        """As dict.update; marks the session modified."""
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        """Forget everything: the data and every component's state (what sign-out needs).
        Pages open before keep working only after a reload (their states get `bad_state`)."""
        for key in list(self):
            del self[key]
        self.live = {}
        self.seq += 1  # components rendered after this get tokens the cleared record accepts
        self.cleared = self.modified = True

    def regenerate(self) -> None:
        """Give the session a new id, so a new cookie and a new CSRF token, keeping its data.
        Call it at sign-in: an id planted in the browser before (session fixation) stops
        working, because the old id is deleted when the session is saved."""
        if self.sid is not None and self.previous_sid is None:
            self.previous_sid = self.sid
        self.sid = secrets.token_urlsafe(SESSION_ID_BYTES)
        self.new = self.modified = True

    def merge_into(self, data: dict[str, Any]) -> dict[str, Any]:
        """Apply this request's changes onto `data` freshly read under the lock,
        so two processes writing different keys both keep their writes."""
        if self.cleared:
            data.clear()
        keys = self.keys() if self.modified and not (self.changed or self.deleted) else self.changed
        for key in keys:
            if key in self:
                data[key] = dict.__getitem__(self, key)
        for key in self.deleted:
            data.pop(key, None)
        return data


class SessionStore:
    """Where sessions live; `Asok(session_store=...)` takes any object with these methods.
    A record is a JSON-safe dict: {"data": {...}, "live": {...}, ...}, opaque to the store.

    The contract every store holds (FileSessionStore and RedisSessionStore do):
    - `update(sid, fn)` runs `fn(record)` exactly once, under an exclusive per-session lock
      that holds across threads, processes and (for a shared store) machines, then writes
      the record fn changed before it returns fn's result. If fn raises, nothing is written
      and the exception propagates. If the write cannot be made durable, it raises
      StoreUnavailable and the previous record stays as it was, in the store and in any cache.
    - A store may hand fn `record["live"]` (the component states, {cid: entry}) as a
      MutableMapping that parses an entry when it is first read, and write only the entries fn
      read or set that changed (FileSessionStore does: an event on one component costs that
      component, not the session's others). fn uses it as a mapping; `_plain(record)` makes
      the record a plain dict where one is needed (to compare or copy it whole).
    - Every record returned is the caller's own copy: changing it changes nothing stored.
    - The store enforces `lifetime` (seconds since the last write): an older record is gone.
      `Asok` sets it from its `session_lifetime`.
    - A record larger than the store's cap raises SessionTooLarge; nothing is written.
    - A storage failure (disk, network, a server down) raises StoreUnavailable, whose message
      names the storage problem; the live endpoint answers `store_unavailable`, pages 503.
    Session ids are validated by the store before they touch a path or key."""

    lifetime = SESSION_LIFETIME
    # A local store (its update costs a few µs of local I/O) also takes update(sid, fn, wait=False):
    # if the session's lock is held, it raises StoreBusy at once, before fn runs, instead of
    # waiting. Live events of components with `on_loop = True` then run on the event loop.
    local = False

    def load(self, sid: str) -> dict[str, Any] | None:
        """The record of `sid` (a copy of its own), or None when there is none or it expired."""
        raise NotImplementedError

    def save(self, sid: str, record: dict[str, Any]) -> None:
        """Write `record` as the whole record of `sid`, without a read (prefer `update`)."""
        raise NotImplementedError

    def delete(self, sid: str) -> None:
        """Forget `sid`'s record (a missing one is not an error)."""
        raise NotImplementedError

    def update(self, sid: str, fn: Callable[[dict[str, Any]], Any]) -> Any:
        """Read-modify-write under the session's lock, as the class docstring says."""
        raise NotImplementedError

    def collect(self, max_age: float | None = None) -> int:
        """Remove expired records (a store whose backend expires them may do nothing);
        returns how many went."""
        raise NotImplementedError


# ═══ 8b. Sessions: the file store ═════════════════════════════════════════════════════════════════

class FileSessionStore(SessionStore):
    """One file per session under `folder`, a log of JSON lines, each appended in one write, so
    a save costs one small append instead of a rename (on ext4 a rename over an existing file
    forces a block allocation: ~100 µs against ~3 µs). A line is either a whole record or what
    one update changed: `{"~": the record but its component states, "p": [cids removed],
    "l": {cid: entry set}}` (an entry set after its removal goes last, as in a dict). So an
    event on one component appends that component's entry and the session's few small keys,
    whatever else the session holds. Loading takes the last whole record and applies the
    changes after it in order; a line torn by a crash is skipped (it was never acknowledged,
    and the writer forgot everything it knew of the file). When the file grows past
    SESSION_LOG_MAX (or four times the whole record) it is rewritten to one line: a temporary
    file, written, fsynced and checked for length, then `os.replace`, so a crash at any point
    leaves either the old file or the new one. A write the disk refuses or cuts short is
    truncated back off the file and raises StoreUnavailable. `flock` on one of _LOCK_STRIPES
    lock files (plus a thread lock) guards read-modify-write across threads and processes.
    The cache keeps recent files' records as JSON text (the small keys in one text, each
    component's entry in its own), keyed by (inode, size, mtime); each caller parses what it
    reads: nobody shares a live object with a writer."""

    def __init__(self, folder: str | os.PathLike, lifetime: float = SESSION_LIFETIME,
                 max_record: int = SESSION_MAX_RECORD) -> None:
        self.folder = Path(folder)
        self.lifetime = lifetime
        self.max_record = max_record
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_dir = self.folder / "locks"
        self._lock_dir.mkdir(exist_ok=True)
        self._lock_fds = {}
        self._thread_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._fd_lock = threading.Lock()
        self._cache = {}  # path -> ((inode, size, mtime_ns), the record as _StoredRecord texts)
        self._append_fds = {}  # path -> (inode, fd opened with O_APPEND), the newest last
        self._missing = set()  # paths load() found no file at lately (bounded)
        self._names = {}  # session id -> (its file, its lock stripe) (bounded)
        self._due = set()  # sessions whose files the compaction thread rewrites next
        self._due_ready = threading.Condition(self._fd_lock)
        self._compactor = None
        self._compacting = None  # the session the compaction thread is rewriting

    def _path(self, sid):
        return self._named(sid)[0]

    def _named(self, sid):
        """(the session's file, its lock stripe), checked and made once per session id."""
        named = self._names.get(sid) if sid.__class__ is str else None
        if named is None:
            if not isinstance(sid, str) or not _SESSION_ID_RE.match(sid):
                raise ValueError("malformed session id")
            named = (f"{self.folder}/{sid}.json", self._stripe(sid))
            _keep(self._names, sid, named, SESSION_CACHE_SIZE)
        return named

    @staticmethod
    def _stripe(sid):
        return int.from_bytes(hashlib.blake2s(sid.encode(), digest_size=2).digest(), "big") % _LOCK_STRIPES

    def _lock(self, sid):
        stripe = self._named(sid)[1]
        with self._fd_lock:
            fd = self._lock_fds.get(stripe)
            if fd is None:
                path = self._lock_dir / f"{stripe:03d}"
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                except OSError as exc:
                    raise _unavailable("open the lock file", path, exc) from exc
                self._lock_fds[stripe] = fd
        return _StoreLock(self._thread_locks[stripe], fd)

    def _read(self, path):
        """(_StoredRecord or None, bytes in the file, whether it ends with a complete line, its
        inode). A file that cannot be read raises StoreUnavailable."""
        try:
            st = os.stat(path)
            cached = self._cache.get(path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if cached is not None and cached[0] == stamp:
                stored, clean_end = cached[1], True
            else:
                with open(path, "rb") as f:
                    raw = f.read()
                stored, clean_end = _StoredRecord.parse(raw)
                if stored is not None and clean_end:
                    self._remember(path, stamp, stored)
        except FileNotFoundError:
            return None, 0, True, 0
        except OSError as exc:
            raise _unavailable("read", path, exc) from exc
        if stored is not None and not stored.alive():
            stored = None
        return stored, st.st_size, clean_end, st.st_ino

    def _remember(self, path, stamp, stored):
        cache = self._cache
        cache.pop(path, None)
        cache[path] = (stamp, stored)
        if len(cache) > SESSION_CACHE_SIZE:
            del cache[next(iter(cache))]

    def _forget(self, path):
        """After a failed write: nothing about this file is trusted until it is read again."""
        self._cache.pop(path, None)
        entry = self._append_fds.pop(path, None)
        if entry is not None:
            os.close(entry[1])

    def load(self, sid: str) -> dict[str, Any] | None:
        try:
            path = self._path(sid)
        except ValueError:
            return None
        missing = self._missing
        if path in missing and not os.access(path, os.F_OK):
            # a returning visitor whose session has no record yet (its page saved nothing): still
            # one system call, so a file another process made is seen at once, but no stat()
            # raising FileNotFoundError (an exception object, its message and file name) per page
            return None
        stored, _, _, ino = self._read(path)
        if ino:
            missing.discard(path)
        else:
            if len(missing) >= SESSION_CACHE_SIZE:
                missing.clear()
            missing.add(path)
        return None if stored is None else json.loads(stored.line())

    def _write(self, path, record, stored, live, size, clean_end, ino, sid=None):
        """Write what fn made of `stored` (read under the lock; None if there was no record):
        only what changed if `live` (the _LiveEntries fn got) is still record["live"], else
        the whole record. With `sid` (an update on an event loop, which must not wait for a
        disk), a file due for compaction gets the line appended and is compacted by a thread,
        unless it is already past twice its limit."""
        record["expires"] = int(time.time()) + self.lifetime
        if stored is not None and live is not None and record.get("live") is live:
            new, line = stored.changed(record, live)
        else:
            new, line = _StoredRecord.of(record), None
        whole = new.size()
        if whole > self.max_record:
            raise SessionTooLarge(f"the session record would be {whole} bytes; "
                                  f"the limit is {self.max_record} (SESSION_MAX_RECORD)")
        limit = _log_limit(whole)
        try:
            if line is not None and sid is not None and limit < size + len(line) <= 2 * limit:
                st = self._append(path, line, size, clean_end, ino)  # an fsync is not for the loop
                self._compact_later(sid)
            else:
                if line is None or size + len(line) > limit:
                    line = new.line()
                if size + len(line) > limit:
                    st = self._compact(path, line)
                else:
                    st = self._append(path, line, size, clean_end, ino)
        except OSError as exc:
            self._forget(path)
            raise _unavailable("write", path, exc) from exc
        self._remember(path, (st.st_ino, st.st_size, st.st_mtime_ns), new)

    def _compact_later(self, sid):
        """Compact sid's file in the store's compaction thread (started when needed; it waits a
        second for more work before it ends)."""
        with self._fd_lock:
            self._due.add(sid)
            if self._compactor is None or not self._compactor.is_alive():
                self._compactor = threading.Thread(target=self._compact_due, name="asok-compact", daemon=True)
                self._compactor.start()
            else:
                self._due_ready.notify_all()

    def _compact_due(self):
        while True:
            with self._fd_lock:
                if not self._due:
                    self._due_ready.wait(1.0)
                if not self._due:
                    self._compactor = None
                    return
                sid = self._compacting = self._due.pop()
            try:
                self._compact_if_due(sid)
            except StoreUnavailable as exc:  # a full disk: the file keeps its lines, the next save tries again
                log.error("session file not compacted (it stays as it is): %s", exc)
            except Exception:
                log.exception("the session store could not compact a session file (it stays as it is)")
            finally:
                with self._fd_lock:
                    self._compacting = None
                    self._due_ready.notify_all()

    def _settle(self, timeout=10.0):
        """Wait until no session file waits for the compaction thread (tests); whether none does."""
        with self._fd_lock:
            return self._due_ready.wait_for(lambda: not self._due and self._compacting is None, timeout)

    def _compact_if_due(self, sid):
        """Rewrite sid's file as its one record if it is past its compaction limit; whether it
        did. The new file is written and fsynced outside the session's lock (an fsync takes from
        0.3 ms to ~90 ms here while another process writes, and saves go on meanwhile); under the
        lock again, the lines appended since are copied after it (unsynced, as every append is)
        and it replaces the file, unless the file is no longer the one it was made from. That
        one is held open meanwhile: ext4 gives a freed inode's number to the next new file at
        once, so a file another process made after two compactions could have it."""
        path = self._path(sid)
        with self._lock(sid):
            stored, size, _, ino = self._read(path)
            if stored is None or size <= _log_limit(stored.size()):
                return False
            line = stored.line()
            try:
                pin = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise _unavailable("compact", path, exc) from exc
        target = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        replaced = False
        try:
            if os.fstat(pin).st_ino != ino:
                return False
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, line)
                _os_fsync(fd)
                with self._lock(sid):
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:  # deleted meanwhile: nothing to compact
                        return False
                    if st.st_ino != ino or st.st_size < size:  # another process compacted it first
                        return False
                    cached = self._cache.get(path)
                    at = size
                    while at < st.st_size:  # the lines appended since, from the file held open
                        tail = os.pread(pin, st.st_size - at, at)
                        if not tail:
                            raise OSError(errno.EIO, f"the file ends at {at} bytes, not {st.st_size}")
                        _write_all(fd, tail)
                        at += len(tail)
                    new = os.fstat(fd)
                    if new.st_size != len(line) + st.st_size - size:
                        raise OSError(errno.EIO, f"the new file holds {new.st_size} of "
                                                 f"{len(line) + st.st_size - size} bytes")
                    os.replace(target, path)
                    replaced = True
                    if cached is not None and cached[0] == (st.st_ino, st.st_size, st.st_mtime_ns):
                        self._remember(path, (new.st_ino, new.st_size, new.st_mtime_ns), cached[1])
                    else:
                        self._cache.pop(path, None)
            finally:
                os.close(fd)
                if not replaced:
                    with contextlib.suppress(OSError):
                        os.unlink(target)
        except OSError as exc:
            raise _unavailable("compact", path, exc) from exc
        finally:
            os.close(pin)
        return True

    def _append(self, path, line, size, clean_end, ino):
        fd = self._append_fd(path, ino)
        try:
            _write_all(fd, line if clean_end else b"\n" + line)
            return os.fstat(fd)
        except OSError:
            try:  # leave the file as it was: a reader must not find half of this line
                os.ftruncate(fd, size)
            except OSError:
                log.error("could not truncate %s back to %d bytes; its torn last line is skipped", path, size)
            raise

    def _compact(self, path, line):
        target = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, line)
                _os_fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if st.st_size != len(line):
                raise OSError(errno.EIO, f"the new file holds {st.st_size} of {len(line)} bytes")
            os.replace(target, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise
        return st

    def _append_fd(self, path, ino):
        """An O_APPEND descriptor for path, kept open while path is still that inode (`ino`,
        just stat'ed under the lock; 0 when the file does not exist yet)."""
        entry = self._append_fds.pop(path, None)
        if entry is not None and ino and entry[0] == ino:
            self._append_fds[path] = entry
            return entry[1]
        if entry is not None:
            os.close(entry[1])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._append_fds[path] = (os.fstat(fd).st_ino, fd)
        if len(self._append_fds) > _session_files_open():
            os.close(self._append_fds.pop(next(iter(self._append_fds)))[1])
        return fd

    def save(self, sid: str, record: dict[str, Any]) -> None:
        path = self._path(sid)
        with self._lock(sid):
            stored, size, clean_end, ino = self._read(path)
            self._write(path, dict(record), stored, None, size, clean_end, ino)

    def delete(self, sid: str) -> None:
        path = self._path(sid)
        with self._lock(sid):
            self._forget(path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _unavailable("delete", path, exc) from exc

    local = True

    def update(self, sid: str, fn: Callable[[dict[str, Any]], Any], wait: bool = True) -> Any:
        """Run fn(record) under the session's lock and save what it changed. The record is this
        call's own copy, its component states parsed as fn reads them (_LiveEntries), so if fn
        raises or the write fails, nothing changed anywhere. With wait=False, a lock held by
        another thread or process raises StoreBusy at once."""
        path = self._path(sid)
        lock = self._lock(sid)
        if not wait:
            lock = lock.now()
        with lock:
            stored, size, clean_end, ino = self._read(path)
            record, live = stored.record() if stored is not None else ({"data": {}, "live": {}}, None)
            result = fn(record)
            # a thread's save leaves the compaction to the compaction thread too when that one
            # is already on this file (else both would rewrite it, and this one fsync)
            later = not wait or sid == self._compacting or sid in self._due
            self._write(path, record, stored, live, size, clean_end, ino, sid if later else None)
            return result

    def collect(self, max_age: float | None = None) -> int:
        """Delete expired session files; returns how many went. If every session looks
        expired, the clock has more likely jumped than every user left: none is deleted."""
        now = time.time()
        limit = max_age or self.lifetime
        total, expired = 0, []
        for path in self.folder.glob("*.json"):
            total += 1
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime + limit < now:
                    expired.append(path)
        if expired and len(expired) == total:
            log.warning("session collector: all %d sessions in %s look expired; has the clock jumped? "
                        "deleting none", total, self.folder)
            return 0
        for path in expired:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for path in self.folder.glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime + 3600 < now:
                    path.unlink()
        return len(expired)


def _log_limit(whole):
    """The size past which a session file whose record is `whole` bytes is compacted."""
    return max(SESSION_LOG_MAX, 4 * whole)


def _session_files_open():
    """How many session files a FileSessionStore keeps open: SESSION_OPEN_FILES, but a
    sixteenth of the descriptor limit at most (a publish to a thousand sessions appends to a
    thousand files, and reopening each costs more than the append)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return SESSION_OPEN_FILES if soft == resource.RLIM_INFINITY else max(16, min(SESSION_OPEN_FILES, soft // 16))


def _unavailable(action, path, exc):
    reason = exc.strerror or str(exc)
    return StoreUnavailable(f"the session store cannot {action} {path}: {reason}", reason)


class _StoreLock:
    __slots__ = ("thread_lock", "fd", "wait")

    def __init__(self, thread_lock, fd):
        self.thread_lock = thread_lock
        self.fd = fd
        self.wait = True

    def now(self):
        """This lock, taken without waiting (StoreBusy if it is held)."""
        self.wait = False
        return self

    def __enter__(self):
        if self.wait:
            self.thread_lock.acquire()
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return
        if not self.thread_lock.acquire(blocking=False):
            raise StoreBusy()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.thread_lock.release()
            raise StoreBusy() from None

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.thread_lock.release()


# ═══ 8c. Sessions: a record as JSON texts, one per component; a record's shape ════════════════════

_dump = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(value, separators=(",", ":")), quicker
# (the record's own keys, which hold the session's data: a cycle there is a ValueError. A component's
# entry, checked JSON-safe before it is saved, goes through _json_compact, the C encoder itself.)


class _Raw(str):
    """A component entry's JSON text, not parsed yet (FileSessionStore)."""
    __slots__ = ()


_scan_json = json.JSONDecoder().scan_once  # the C scanner json.loads calls, without its two frames and
# two whitespace matches: for JSON texts the store made itself (compact, nothing around them)


def _stored_json(text):
    """json.loads(text) of a text the store wrote or already checked (ValueError if it is not one value)."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        raise ValueError("not a JSON value") from None
    if end != len(text):
        raise ValueError("extra data after a JSON value")
    return value


class _LiveEntries(collections.abc.MutableMapping):
    """record["live"] as FileSessionStore.update hands it to fn: {cid: entry}, an entry parsed
    from its JSON text when first read. It notes what fn read, set and deleted, so the store
    writes only the entries that changed; an entry deleted and set again goes last, as in a dict
    (the least recently saved component is the first one a full session drops)."""
    __slots__ = ("_d", "_fresh", "_touched", "_appended", "_gone", "checked")

    def __init__(self, texts, fresh=frozenset()):
        self._d = dict(texts)  # cid -> _Raw text, or the entry once read or set
        self._fresh = fresh  # cids read from the disk whose shape nobody here checked yet
        self._touched, self._appended, self._gone = set(), [], set()
        self.checked = False

    def __getitem__(self, cid):
        value = self._d[cid]
        if value.__class__ is _Raw:
            value = self._d[cid] = _stored_json(value)
            self._touched.add(cid)
        return value

    def __setitem__(self, cid, value):
        if cid not in self._d:
            self._appended.append(cid)
        self._d[cid] = value
        self._touched.add(cid)

    def __delitem__(self, cid):
        del self._d[cid]
        self._gone.add(cid)

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __contains__(self, cid):
        return cid in self._d

    def __repr__(self):
        return f"<_LiveEntries {len(self._d)} components>"

    def unchecked(self):
        """[(cid, entry)] of the entries read from the disk that nobody in this process has
        checked the shape of (_record_problem checks these; the others it checked before)."""
        self.checked = True
        return [(cid, self[cid]) for cid in self._fresh if cid in self._d]


def _plain(record):
    """`record` with its component states a plain dict (see SessionStore)."""
    live = record.get("live")
    return {**record, "live": dict(live.items())} if isinstance(live, _LiveEntries) else record


class _StoredRecord:
    """A session record as FileSessionStore keeps it in its cache: the record but its component
    states as one JSON text (`top`), each component's entry as its own (`live`, None when the
    record's "live" is not an object: then it stays in `top`, for asok to find malformed)."""
    __slots__ = ("top", "live", "live_size", "fresh", "expires")

    def __init__(self, top, live, live_size, fresh, expires):
        self.expires = expires  # the record's "expires", as it holds it
        self.top = top  # JSON text of the record without "live"
        self.live = live  # cid -> _Raw entry text, in the record's order
        self.live_size = live_size  # characters of `"cid":entry,` over the entries
        self.fresh = fresh  # cids read from the disk, not shape-checked yet (_LiveEntries.unchecked)

    @classmethod
    def of(cls, record, fresh=frozenset()):
        live = record.get("live")
        if isinstance(live, _LiveEntries):
            fresh = frozenset() if live.checked else frozenset(c for c in live._fresh if c in live)
            live = {cid: v if v.__class__ is _Raw else _Raw(_json_compact(v)) for cid, v in live._d.items()}
        elif isinstance(live, dict):
            live = {cid: _Raw(_json_compact(entry)) for cid, entry in live.items()}
        else:
            return cls(_dump(record), None, 0, frozenset(), record.get("expires", 0))
        size = _live_size(live)
        return cls(_dump({k: v for k, v in record.items() if k != "live"}), live, size, fresh,
                   record.get("expires", 0))

    @classmethod
    def parse(cls, raw):
        """(the record a file holds or None, whether the file ends with a complete line): its
        last whole record with the changes after it applied; torn lines are skipped."""
        clean_end = raw.endswith(b"\n") or not raw
        base, changes = None, []
        for line in reversed(raw.split(b"\n")[:-1]):  # the last piece is empty or torn
            record = _json_record(line)
            if record is None:
                continue
            if line.startswith(b'{"~":'):
                changes.append(record)
            else:
                base = record
                break
        if base is None and not changes:
            return None, clean_end
        base = base or {"data": {}, "live": {}}
        stored = cls.of(base, fresh=frozenset(base["live"]) if isinstance(base.get("live"), dict) else frozenset())
        for change in reversed(changes):
            stored = stored.applied(change)
        return stored, clean_end

    def applied(self, change):
        """This record with one change line (parsed) applied."""
        top, removed, entries = change.get("~"), change.get("p", []), change.get("l", {})
        if not (isinstance(top, dict) and isinstance(removed, list) and isinstance(entries, dict)):
            return self  # not a line asok wrote: skipped, as a torn one is
        live, size = dict(self.live or {}), self.live_size
        for cid in removed:
            text = live.pop(cid, None) if isinstance(cid, str) else None
            if text is not None:
                size -= len(_dump(cid)) + len(text) + 2
        for cid, entry in entries.items():
            text, old = _Raw(_json_compact(entry)), live.get(cid)
            size += len(text) - (len(old) if old is not None else -len(_dump(cid)) - 2)
            live[cid] = text
        return _StoredRecord(_dump(top), live, size, self.fresh | frozenset(entries), top.get("expires", 0))

    def record(self):
        """(the caller's own record, its _LiveEntries or None)."""
        record = _stored_json(self.top)
        if self.live is None:
            return record, None
        live = record["live"] = _LiveEntries(self.live, self.fresh)
        return record, live

    def alive(self):
        """Whether the record has not expired."""
        expires = self.expires
        return isinstance(expires, (int, float)) and expires >= time.time()

    def line(self):
        """The whole record as one line (bytes)."""
        if self.live is None:
            return self.top.encode() + b"\n"
        entries = ",".join([f"{_dump(cid)}:{text}" for cid, text in self.live.items()])
        head = self.top[:-1] + ("," if len(self.top) > 2 else "")
        return f'{head}"live":{{{entries}}}}}\n'.encode()

    def size(self):
        """len(self.line()), without building it."""
        if self.live is None:
            return len(self.top) + 1
        return len(self.top) + (len(self.top) > 2) + len('"live":{}') + max(self.live_size - 1, 0) + 1

    def changed(self, record, live):
        """(the record fn made of this one, the line that says what changed): `record` is
        what fn left, `live` its record["live"], still the _LiveEntries it was given."""
        d, old = live._d, self.live
        removed = [cid for cid in live._gone if cid in old]
        appended = dict.fromkeys(cid for cid in reversed(live._appended) if cid in d)  # the last set counts
        entries = {}
        for cid in live._touched:
            if cid in d and cid not in appended:
                text = _json_compact(d[cid])
                if text != old.get(cid):
                    entries[cid] = text
        appended = list(reversed(appended))  # in the order they now have, after the others
        if len(appended) == 1 and removed == appended and next(reversed(old)) == appended[0]:
            removed = []  # the last one set again stays last (an event's component, most often)
        for cid in appended:
            value = d[cid]
            entries[cid] = value if value.__class__ is _Raw else _json_compact(value)
        top = _dump({k: v for k, v in record.items() if k != "live"})
        new, size = dict(old), self.live_size
        for cid in removed:
            size -= len(_dump(cid)) + len(new.pop(cid)) + 2
        parts = ['{"~":', top]
        if removed:
            parts += [',"p":', _dump(removed)]
        if entries:
            parts.append(',"l":{')
            for i, (cid, text) in enumerate(entries.items()):
                key, prev = _dump(cid), new.get(cid)
                size += len(text) - (len(prev) if prev is not None else -len(key) - 2)
                new[cid] = _Raw(text)
                parts += [("," if i else ""), key, ":", text]
            parts.append("}")
        parts.append("}\n")
        fresh = frozenset() if live.checked else frozenset(c for c in self.fresh if c in new and c not in entries)
        return _StoredRecord(top, new, size, fresh, record.get("expires", 0)), "".join(parts).encode()


def _live_size(texts):
    """Characters of `"cid":text,` over a record's component texts (_StoredRecord.live_size)."""
    return sum(len(_dump(cid)) + len(text) + 2 for cid, text in texts.items())


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _record_problem(record):
    """What is wrong with the shape of a session record (as asok writes it), or None."""
    if not isinstance(record.get("data", {}), dict):
        return "'data' is not an object"
    live, dropped = record.get("live", {}), record.get("dropped", {})
    if not isinstance(live, (dict, _LiveEntries)) or not isinstance(dropped, dict):
        return "'live' or 'dropped' is not an object"
    for cid, entry in live.unchecked() if isinstance(live, _LiveEntries) else live.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("c"), str) and isinstance(entry.get("s"), dict)
                and _is_int(entry.get("v")) and _is_int(entry.get("q", 0))
                and isinstance(entry.get("ids", ()), (list, dict))):
            return f"the component state {cid[:60]!r} is malformed"
    if not all(_is_int(value) for value in dropped.values()):
        return "'dropped' holds a value that is not an integer"
    if not (_is_int(record.get("seq", 0)) and _is_int(record.get("floor", 0))):
        return "'seq' or 'floor' is not an integer"
    return None


def _clear_live(record, seq):
    """session.clear(): every component state goes, and every state token issued before
    (their sequence numbers are lower than `seq`) is refused from now on."""
    record["live"], record["dropped"] = {}, {}
    record["seq"] = record["floor"] = max(seq, record.get("seq", 0) + 1)


def _json_record(line):
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# ═══ 8d. Sessions: the Redis store ════════════════════════════════════════════════════════════════

class RedisSessionStore(SessionStore):
    """Sessions in Redis, shared by every process and machine that uses the same Redis.
    `client` is one the user builds (redis-py: `redis.Redis(host=...)`); asok never imports
    redis and needs only `register_script` of it (each script runs with EVALSHA, else EVAL).

    A record is one hash (`<prefix>s:<sid>`) whose TTL is the session lifetime, so Redis
    collects expired sessions itself. Its field `~` holds the record but its component states
    (JSON), one field `.<cid>` per component holds `<n> <the entry's JSON>`, where n orders the
    components by when they were last saved (the session's component limit drops the least
    recently saved first), and `#` the fencing token of the write that made it, which names the
    record's version (a record whose "live" is not an object is one field `=`, to be found
    malformed). `update(sid, fn)` costs two round trips, each a Lua script: the first takes the
    session's lock (`<prefix>l:<sid>`, held at most `lock_timeout` seconds) with a fencing token
    from a counter and returns the record, or only its version when it is the one this process
    holds in its cache; the second writes only the fields fn changed (as FileSessionStore, fn
    gets the component states as a _LiveEntries), deletes the components fn removed and
    releases the lock, only if the lock still holds that token. A process that stalled past its
    lock (a GC pause, a lost network) therefore cannot overwrite a newer write: its save fails
    with StoreUnavailable and is not acknowledged. A record that is not the version read (it
    expired meanwhile) is written whole instead. `save` and `delete` take the lock too, so what
    an update changed always lands on the record it read. A record an older asok wrote (one JSON
    string under the same key) is read, and rewritten as a hash on its next write. Any error of the
    client (Redis down, a timeout) is StoreUnavailable naming Redis; the next call tries again."""

    # As few calls as can be: each costs Redis, which serves every node, a microsecond or two
    _LOCK = """
    local token = redis.call('incr', KEYS[3])
    if not redis.call('set', KEYS[1], token, 'NX', 'PX', ARGV[1]) then return false end
    if ARGV[3] then return {token} end
    local version = redis.pcall('hget', KEYS[2], '#')
    if type(version) == 'table' then return {token, 's', redis.call('get', KEYS[2])} end
    if version and version == ARGV[2] then return token end
    if not version and redis.call('exists', KEYS[2]) == 0 then return {token} end
    return {token, 'h', version or '', redis.call('hgetall', KEYS[2])}
    """
    # ARGV[1]: "<token> <TTL> <fields to delete> <the version the changes apply to, none: replace
    # the record>" (one argument costs the client less than four), then the fields to delete,
    # then field, value pairs to set (in chunks: Lua's unpack is bounded)
    _COMMIT = """
    local token, ttl, drop, version = string.match(ARGV[1], '^(%d+) (%d+) (%d+) ?(.*)$')
    if redis.call('get', KEYS[1]) ~= token then return 0 end
    if version == '' then
      redis.call('del', KEYS[2])
    elseif redis.pcall('hget', KEYS[2], '#') ~= version then
      return -1
    end
    local last = 1 + tonumber(drop)
    for i = 2, last, 1000 do redis.call('hdel', KEYS[2], unpack(ARGV, i, math.min(i + 999, last))) end
    for i = last + 1, #ARGV, 1000 do redis.call('hset', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
    redis.call('hset', KEYS[2], '#', token)
    redis.call('expire', KEYS[2], ttl)
    redis.call('del', KEYS[1])
    return 1
    """
    _UNLOCK = """
    if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
    return 1
    """
    _READ = """
    local version = redis.pcall('hget', KEYS[1], '#')
    if type(version) == 'table' then return {'s', redis.call('get', KEYS[1])} end
    if version and version == ARGV[1] then return {'h', version} end
    if not version and redis.call('exists', KEYS[1]) == 0 then return false end
    return {'h', version or '', redis.call('hgetall', KEYS[1])}
    """
    _DROP = """
    if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
    redis.call('del', KEYS[2])
    redis.call('del', KEYS[1])
    return 1
    """

    def __init__(self, client: Any, lifetime: float = SESSION_LIFETIME, *, prefix: str = "asok:",
                 lock_timeout: float = 10.0, lock_wait: float = 5.0, max_record: int | None = None) -> None:
        self.client = client
        self.lifetime = lifetime
        self.prefix = prefix
        self.lock_timeout = lock_timeout
        self.lock_wait = lock_wait
        self.max_record = max_record or SESSION_MAX_RECORD
        self._scripts = None
        self._cache = {}  # sid -> (version, _StoredRecord, {cid: n}), the records last read or written here
        self._cache_lock = threading.Lock()

    def __repr__(self):
        return f"<RedisSessionStore {self.client!r}>"

    def _redis(self, action, call, *args, **kwargs):
        try:
            if self._scripts is None:
                self._scripts = [self.client.register_script(src)
                                 for src in (self._LOCK, self._COMMIT, self._UNLOCK, self._READ, self._DROP)]
            return call(*args, **kwargs) if callable(call) else self._scripts[call](*args, **kwargs)
        except StoreUnavailable:
            raise
        except Exception as exc:  # whatever the client raises: connection refused, timeout, ...
            raise _redis_unavailable(action, exc) from exc

    def _keys(self, sid):
        if not isinstance(sid, str) or not _SESSION_ID_RE.match(sid):
            raise ValueError("malformed session id")
        return f"{self.prefix}l:{sid}", f"{self.prefix}s:{sid}", f"{self.prefix}fence"

    def _remember(self, sid, version, stored, order):
        cache = self._cache
        with self._cache_lock:
            cache.pop(sid, None)
            cache[sid] = (version, stored, order)
            if len(cache) > SESSION_CACHE_SIZE:
                del cache[next(iter(cache))]

    def _forget(self, sid):
        with self._cache_lock:
            self._cache.pop(sid, None)

    def _stored(self, sid, reply, at, cached):
        """(_StoredRecord or None, its version, {cid: n}) from a script's reply, whose kind is at
        index `at`: a hash (with its fields, or without them when it is at the version of
        `cached`, the cache entry the script was given), a record of the old format (version '':
        its next write replaces it) or nothing."""
        kind = _text(reply[at]) if len(reply) > at else None
        if kind == "h":
            version = _text(reply[at + 1])
            if len(reply) == at + 2:
                if cached is None or cached[0] != version:  # not a reply to what was asked
                    raise StoreUnavailable(f"Redis: session {sid[:6]}... answered for a version "
                                           "this process does not hold", "bad reply")
                return cached[1], version, cached[2]
            stored, order = _redis_parsed(reply[at + 2] if len(reply) > at + 2 else ())
            if version:
                self._remember(sid, version, stored, order)
            return stored, version, order
        if kind == "s":
            record = _json_record(reply[at + 1] or b"")
            if record is not None:
                live = record.get("live")
                fresh = frozenset(live) if isinstance(live, dict) else frozenset()
                return _StoredRecord.of(record, fresh), "", {}
        return None, "", {}

    def load(self, sid: str) -> dict[str, Any] | None:
        try:
            _, key, _ = self._keys(sid)
        except ValueError:
            return None
        cached = self._cache.get(sid)
        reply = self._redis("read", 3, keys=[key], args=[cached[0] if cached else ""])
        stored = self._stored(sid, reply, 0, cached)[0] if reply else None
        return None if stored is None else json.loads(stored.line())

    def save(self, sid: str, record: dict[str, Any]) -> None:
        """Replace the record of `sid` (under its lock, as every write here)."""
        def replace(old):
            old.clear()
            old.update(record)
        self.update(sid, replace)

    def delete(self, sid: str) -> None:
        keys = self._keys(sid)
        token = self._lock(sid, keys, "", read=False)[0]
        self._forget(sid)
        if not self._redis("delete", 4, keys=keys[:2], args=[token]):
            raise self._expired(sid)

    def _lock(self, sid, keys, version, read=True):
        deadline, pause = time.monotonic() + self.lock_wait, 0.001
        args = [int(self.lock_timeout * 1000), version] + ([] if read else ["no read"])
        while True:
            got = self._redis("lock", 0, keys=keys, args=args)
            if got:
                return got
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"Redis: session {sid[:6]}... stayed locked by another request "
                                       f"for more than {self.lock_wait:g} s", "session locked")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _expired(self, sid):
        return StoreUnavailable(f"Redis: the lock on session {sid[:6]}... expired before the write "
                                f"(the update took over {self.lock_timeout:g} s); nothing was saved",
                                "lock expired")

    def update(self, sid: str, fn: Callable[[dict[str, Any]], Any]) -> Any:
        """Run fn(record) once under the session's lock and save what it changed; if fn raises,
        nothing is written. Raises StoreUnavailable if the lock cannot be had within `lock_wait`
        seconds or was lost before the write."""
        keys = self._keys(sid)
        cached = self._cache.get(sid)
        got = self._lock(sid, keys, cached[0] if cached else "")
        try:
            if isinstance(got, int):  # the version this process holds
                token, (version, stored, order) = got, cached
            else:
                token = got[0]
                stored, version, order = self._stored(sid, got, 1, cached)
            record, live = stored.record() if stored is not None else ({"data": {}, "live": {}}, None)
            result = fn(record)
            new, order, drop, pairs, whole = _redis_changes(record, stored, live, order, version)
            size = new.size() - 1
            if size > self.max_record:
                raise SessionTooLarge(f"the session record would be {size} bytes; "
                                      f"the limit is {self.max_record} (SESSION_MAX_RECORD)")
            drop = ["." + cid for cid in drop]
        except BaseException:
            self._redis("unlock", 2, keys=keys[:1], args=[token])
            raise
        ttl = max(1, int(self.lifetime))
        try:
            # a whole record (fn replaced "live": save(), a sign-out's clear) replaces the hash: no
            # version, so the script deletes the fields first (the lock says nobody wrote since)
            done = self._redis("write", 1, keys=keys[:2],
                               args=[f"{token} {ttl} {len(drop)} {'' if whole else version}", *drop, *pairs])
            if done == -1:  # not the record read (it expired meanwhile): what fn made of it, whole
                done = self._redis("write", 1, keys=keys[:2], args=[f"{token} {ttl} 0", *_redis_fields(new, order)])
        except StoreUnavailable:
            self._forget(sid)
            raise
        if not done:
            self._forget(sid)
            raise self._expired(sid)
        self._remember(sid, str(token), new, order)
        return result

    def collect(self, max_age: float | None = None) -> int:
        """Redis expires sessions by their TTL: nothing to do."""
        return 0


_redis_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _redis_parsed(pairs):
    """(_StoredRecord, {cid: n}) of a session hash's fields (HGETALL: field, value, ...), its
    components in the order of their n. A field asok did not write is skipped."""
    top, entries = "{}", []
    fields = iter(pairs)
    for name, value in zip(fields, fields):
        name, value = _text(name), _text(value)
        if name.startswith("."):
            n, _, text = value.partition(" ")
            if n.isdigit():
                entries.append((int(n), name[1:], text))
        elif name == "~" and _json_record(value) is not None:
            top = value
        elif name == "=":
            return _StoredRecord(value, None, 0, frozenset(), 0), {}
    entries.sort()
    live = {cid: _Raw(text) for _, cid, text in entries}
    size = _live_size(live)
    return _StoredRecord(top, live, size, frozenset(live), 0), {cid: n for n, cid, _ in entries}


def _redis_changes(record, stored, live, order, version):
    """(the record fn made as a _StoredRecord, its {cid: n}, the fields to delete, the field,
    value pairs to set, whether that is the whole record): only what changed when fn kept the
    _LiveEntries it got from a hash at `version`, else the whole record. Entries go through the file store's C encoder (a state is
    checked JSON before it is saved); the small keys through the checking one."""
    if not version or live is None or record.get("live") is not live:
        new = _redis_whole(record)
        order = {cid: n for n, cid in enumerate(new.live or (), 1)}
        return new, order, [], _redis_fields(new, order), True
    d, old = live._d, stored.live
    appended = live._appended
    moved = []  # set new or after their removal: they go last, in the order they now have in d
    if len(appended) == 1:
        moved = [cid for cid in appended if cid in d]
    elif appended:
        appended = set(appended)
        count = sum(cid in d for cid in appended)
        for cid in reversed(d):
            if len(moved) == count:
                break
            if cid in appended:
                moved.append(cid)
        moved.reverse()
    if len(moved) == 1 and old and next(reversed(old)) == moved[0]:
        moved = []  # the last one set again stays last (an event's component, most often)
    drop = [cid for cid in live._gone if cid in old and cid not in d]
    new, order, size, pairs, written = dict(old), dict(order), stored.live_size, [], set()
    last = next(reversed(order.values()), 0)
    for cid in drop:
        size -= len(_dump(cid)) + len(new.pop(cid)) + 2
        del order[cid]
    moving = set(moved)
    for cid in live._touched:  # read or set in place: written if its text changed
        if cid in d and cid in old and cid not in moving:
            value = d[cid]
            text = value if value.__class__ is _Raw else _json_compact(value)
            if text != old[cid]:
                size += len(text) - len(old[cid])
                new[cid] = _Raw(text)
                written.add(cid)
                pairs += ["." + cid, f"{order[cid]} {text}"]
    for cid in moved:
        value = d[cid]
        text = value if value.__class__ is _Raw else _json_compact(value)
        prev = new.pop(cid, None)
        size += len(text) - (len(prev) if prev is not None else -len(_dump(cid)) - 2)
        new[cid] = _Raw(text)
        order.pop(cid, None)
        last = order[cid] = last + 1
        written.add(cid)
        pairs += ["." + cid, f"{last} {text}"]
    top = _redis_json({k: v for k, v in record.items() if k != "live"})
    if top != stored.top:
        pairs += ["~", top]
    fresh = frozenset() if live.checked else frozenset(c for c in stored.fresh if c in new and c not in written)
    return _StoredRecord(top, new, size, fresh, 0), order, drop, pairs, False


def _redis_whole(record):
    """`record` (what fn left) as a _StoredRecord; its "live" not a mapping keeps it whole."""
    live = record.get("live")
    if isinstance(live, _LiveEntries):
        fresh = frozenset() if live.checked else frozenset(c for c in live._fresh if c in live)
        entries = live._d
    elif isinstance(live, dict):
        fresh, entries = frozenset(), live
    else:
        return _StoredRecord(_redis_json(record), None, 0, frozenset(), 0)
    texts = {cid: v if v.__class__ is _Raw else _Raw(_redis_json(v)) for cid, v in entries.items()}
    size = _live_size(texts)
    return _StoredRecord(_redis_json({k: v for k, v in record.items() if k != "live"}), texts, size, fresh, 0)


def _redis_fields(stored, order):
    """The field, value pairs of a whole session hash."""
    if stored.live is None:
        return ["=", stored.top]
    pairs = ["~", stored.top]
    for cid, text in stored.live.items():
        pairs += ["." + cid, f"{order[cid]} {text}"]
    return pairs


def _redis_unavailable(action, exc):
    return StoreUnavailable(f"Redis: cannot {action} the session ({type(exc).__name__}: {exc})", "Redis unavailable")


# ═══ 9. Form data: MultiDict, multipart/form-data (RFC 7578 on RFC 2046 §5.1), UploadedFile ═══════

DEFAULT_MAX_FORM_FIELDS = 1000
BODY_MEMORY = 256 * 1024            # a request body past this waits in a temporary file
MULTIPART_SPOOL = 64 * 1024         # an uploaded file past this waits in a temporary file
MULTIPART_MAX_HEADER = 8 * 1024     # one part's header section, else 413
DEFAULT_MAX_FORM_PARTS = 1000       # parts in one multipart body, else 413 (Asok(max_form_parts=))
DEFAULT_MAX_FIELD_SIZE = 1 << 20    # one form field that is not a file (kept in memory), else 413
DEFAULT_MAX_PART_SIZE = 16 << 20    # one uploaded file, else 413 (Asok(max_part_size=))
_READ_CHUNK = 64 * 1024


class MultiDict(dict):
    """A dict of first values that also keeps every value: `getlist(key)`."""

    def __init__(self, pairs: Iterable[tuple[str, Any]] = ()) -> None:
        super().__init__()
        self._lists = {}
        for key, value in pairs:
            self._lists.setdefault(key, []).append(value)
            dict.setdefault(self, key, value)

    def getlist(self, key: str) -> list[Any]:
        """Every value given for `key`, in order (an empty list when there is none)."""
        return list(self._lists.get(key, ()))


def _parse_qs(text):
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                                       max_num_fields=DEFAULT_MAX_FORM_FIELDS)
    except ValueError as exc:
        raise HTTPError(400, f"bad query or form data: {exc}")
    return MultiDict(pairs)


class _BodyBuffer:
    """A request body as it arrives: in memory up to BODY_MEMORY bytes, then in an unnamed
    temporary file, so a large upload costs the server disk, not memory."""

    __slots__ = ("chunks", "size", "file")  # one per request

    def __init__(self):
        self.chunks = []
        self.size = 0
        self.file = None

    def write(self, data):
        """Raises OSError when the disk refuses (the caller answers 503)."""
        self.size += len(data)
        if self.file is None:
            self.chunks.append(data)
            if self.size <= BODY_MEMORY:
                return
            self.file = tempfile.TemporaryFile(prefix="asok-body-")
            data = b"".join(self.chunks)
            self.chunks = []
        self.file.write(data)

    def finish(self):
        """The body: bytes, or for a large one the temporary file at its start."""
        if self.file is None:
            return b"".join(self.chunks)
        self.file.flush()
        self.file.seek(0)
        return self.file

    def close(self):
        if self.file is not None:
            self.file.close()


# ── multipart/form-data ──

# MultipartParser is sans-I/O: feed() takes any slice of the body and returns events;
# _read_multipart drives it from a stream and applies the limits.

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')


def _header_params(value):
    """`form-data; name="a"; filename="b.png"` -> ("form-data", {"name": "a", "filename": "b.png"}).
    Inside quotes only \\" and \\\\ are escapes (browsers send Windows paths with bare backslashes);
    `filename*=UTF-8''...` (RFC 8187) wins over `filename`."""
    kind = value.split(";", 1)[0].strip().lower()
    params = {}
    for m in _HEADER_PARAM.finditer(value):
        key, quoted, bare = m.group(1).lower(), m.group(2), m.group(3)
        text = re.sub(r'\\(["\\])', r"\1", quoted) if quoted is not None else bare.strip()
        if key.endswith("*"):
            charset, _, rest = text.partition("'")
            _, _, text = rest.partition("'")
            try:
                text = urllib.parse.unquote(text, encoding=charset or "utf-8", errors="strict")
            except (LookupError, UnicodeDecodeError):
                continue
            key = key[:-1]
        elif key in params:
            continue
        params[key] = text
    return kind, params


def _safe_filename(name):
    """The client's file name reduced to a base name that is safe to show and to put in a
    folder: no folders, no NUL or control characters, no leading or trailing dots; may be ""."""
    name = re.split(r"[/\\]", name)[-1]
    name = _CONTROL_CHARS.sub("", name).strip().strip(".").strip()
    while len(name.encode("utf-8")) > 255:
        name = name[:-1]
    return name


class MultipartParser:
    """Bytes of a multipart body in, events out. `feed(data)` returns a list of
    ("part", headers) · ("data", bytes) · ("end", None) for each part, and ("close", None)
    after the closing boundary; `feed(b"")` says the body ended. Bad input raises
    HTTPError (400 malformed, 413 past a limit). Preamble and epilogue are ignored."""

    def __init__(self, boundary: bytes | str, max_parts: int = DEFAULT_MAX_FORM_PARTS) -> None:
        if isinstance(boundary, str):
            boundary = boundary.encode("latin-1", "replace")
        if not 1 <= len(boundary) <= 70:  # RFC 2046 §5.1.1
            raise HTTPError(400, "multipart boundary must be 1 to 70 characters")
        self.max_parts = max_parts
        self.parts = 0
        self._delim = b"\r\n--" + boundary
        self._buf = b"\r\n"  # the first boundary may open the body: it then follows this CRLF
        self._state = "preamble"

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        """Parse `data` (b"" at the end of the body): the events it completes (see the class)."""
        events = []
        self._buf += data
        delim = self._delim
        while True:
            buf, state = self._buf, self._state
            if state in ("preamble", "data"):
                at = buf.find(delim)
                if at < 0:  # keep what could be the start of a boundary split across feeds
                    keep = len(delim) - 1
                    if state == "data" and len(buf) > keep:
                        events.append(("data", buf[:-keep]))
                    self._buf = buf[-keep:]
                    break
                if state == "data":
                    if at:
                        events.append(("data", buf[:at]))
                    events.append(("end", None))
                self._buf, self._state = buf[at + len(delim):], "boundary"
            elif state == "boundary":  # after a delimiter: "--" closes, else padding and CRLF
                line = buf.lstrip(b" \t")
                if buf[:2] == b"--":
                    events.append(("close", None))
                    self._buf, self._state = b"", "epilogue"
                elif line[:2] == b"\r\n":
                    self.parts += 1
                    if self.parts > self.max_parts:
                        raise HTTPError(413, f"multipart body has more than {self.max_parts} parts (the limit)")
                    self._buf, self._state = line[2:], "headers"
                elif len(buf) < 2 or line in (b"", b"\r"):
                    if len(buf) > 256:
                        raise HTTPError(400, "malformed multipart body: a boundary line does not end")
                    break
                else:
                    raise HTTPError(400, "malformed multipart body: text after a boundary on its line")
            elif state == "headers":
                end = -2 if buf[:2] == b"\r\n" else buf.find(b"\r\n\r\n", 0, MULTIPART_MAX_HEADER + 4)
                if end < 0:
                    if len(buf) > MULTIPART_MAX_HEADER:
                        raise HTTPError(413, f"a multipart part's headers are over {MULTIPART_MAX_HEADER} bytes (the limit)")
                    break
                events.append(("part", _multipart_headers(buf[:max(end, 0)])))
                self._buf, self._state = buf[end + 4:], "data"
            else:  # epilogue
                self._buf = b""
                break
        if not data and self._state != "epilogue":
            raise HTTPError(400, "malformed multipart body: it ends before the closing boundary")
        return events


def _multipart_headers(block):
    headers = {}
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        name = name.decode("latin-1").strip().lower()
        if not sep or not name or not _HTTP_TOKEN_TEXT.fullmatch(name):
            raise HTTPError(400, "malformed multipart body: a part header line is not `Name: value`")
        headers[name] = value.strip().decode("utf-8", "replace")
    return headers


class UploadedFile:
    """A file from a multipart form (`request.files`) or a live upload (in the fields dict).
    `filename` is the client's name reduced to a safe base name (no folders, `..`, NUL or
    control characters; "" if nothing is left); `raw_filename` is what the client sent.
    The content sits in memory up to MULTIPART_SPOOL bytes, then in a temporary file."""

    def __init__(self, name: str, raw_filename: str, content_type: str, file: BinaryIO, size: int,
                 path: str | None = None) -> None:
        self.name = name
        self.raw_filename = raw_filename
        self.filename = _safe_filename(raw_filename)
        self.content_type = content_type
        self.file = file
        self.size = size
        self._path = path    # a live upload's file under .asok/uploads, deleted unless saved
        self.saved = None

    def __repr__(self):
        return f"<UploadedFile {self.name}={self.filename!r} {self.content_type} {self.size} bytes>"

    def read(self, size: int = -1) -> bytes:
        """Read up to `size` bytes of the content (all of it by default)."""
        return self.file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move in the content, as a file's seek does."""
        return self.file.seek(offset, whence)

    def save(self, dest: str | os.PathLike) -> Path:
        """Write the content to `dest`, a file path or a folder (then `filename` inside it).
        Written beside it and renamed into place, so `dest` is complete or untouched; the
        OSError of a full disk reaches the caller. Returns the path written."""
        dest = Path(dest)
        if dest.is_dir():
            if not self.filename:
                raise ValueError(f"upload {self.name!r} has no usable file name; give save() a file path")
            dest = dest / self.filename
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            if self._path is not None:
                try:  # a live upload already is a file on disk: move it when it is on the same device
                    os.replace(self._path, dest)
                    self.saved = dest
                    return dest
                except OSError:
                    pass
            with open(tmp, "wb") as out:
                self.file.seek(0)
                shutil.copyfileobj(self.file, out, _READ_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self.file.seek(0)
        self.saved = dest
        return dest

    def close(self) -> None:
        """Close the content; a live upload not saved is deleted."""
        self.file.close()
        if self._path is not None:
            _remove_upload(self._path.parent, self._path.stem)
            self._path = None


def _pending_uploads(folder, sid):
    """(bytes waiting for `sid`'s events, bytes waiting for everyone's) under .asok/uploads."""
    mine = everyone = 0
    for meta in folder.glob("*.json") if folder.is_dir() else ():
        try:
            info = json.loads(meta.read_text())
            size = int(info["size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        everyone += size
        if info.get("sid") == sid:
            mine += size
    return mine, everyone


def _mib(size):
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size // 1024} KiB" if size >= 1024 else f"{size} bytes"


def _remove_upload(folder, uid):
    for suffix in (".data", ".json"):
        try:
            os.unlink(folder / f"{uid}{suffix}")
        except FileNotFoundError:
            pass


def _read_multipart(stream, content_type, limits):
    """Parse a multipart/form-data body from `stream` -> (fields, files) as MultiDicts.
    `limits` is (max_parts, max_field_size, max_part_size, max_body)."""
    max_parts, max_field, max_part, max_body = limits
    boundary = _header_params(content_type)[1].get("boundary")
    if not boundary:
        raise HTTPError(400, "multipart/form-data needs a boundary parameter in its Content-Type")
    parser = MultipartParser(boundary, max_parts)
    fields, files, total = [], [], 0
    name = sink = None
    try:
        while True:
            data = stream.read(_READ_CHUNK)
            total += len(data)
            if total > max_body:
                raise HTTPError(413, f"request body too large: the limit is {max_body} bytes")
            for kind, value in parser.feed(data):
                if kind == "part":
                    disposition, params = _header_params(value.get("content-disposition", ""))
                    if disposition != "form-data" or "name" not in params:
                        raise HTTPError(400, "malformed multipart body: a part needs "
                                             "Content-Disposition: form-data; name=...")
                    name, filename, size = params["name"], params.get("filename"), 0
                    ctype = value.get("content-type", "text/plain" if filename is None else "application/octet-stream")
                    sink = io.BytesIO() if filename is None else tempfile.SpooledTemporaryFile(MULTIPART_SPOOL)
                    if filename is not None:
                        files.append(UploadedFile(name, filename, ctype, sink, 0))
                elif kind == "data":
                    size += len(value)
                    if filename is None and size > max_field:
                        raise HTTPError(413, f"form field {name!r} is over {max_field} bytes (the limit for a field)")
                    if filename is not None and size > max_part:
                        raise HTTPError(413, f"file {name!r} is over {max_part} bytes (the limit for a file)")
                    try:
                        sink.write(value)
                    except OSError as exc:
                        raise HTTPError(503, f"the server has no room for file {name!r} ({exc.strerror})")
                elif kind == "end":
                    if filename is None:
                        try:
                            fields.append((name, sink.getvalue().decode("utf-8")))
                        except UnicodeDecodeError:
                            raise HTTPError(400, f"form field {name!r} is not valid UTF-8")
                    elif not filename and not size:  # an empty file input: nothing was chosen
                        files.pop().close()
                    else:
                        sink.seek(0)
                        files[-1].size = size
                    sink = None
            if not data:
                break
    except BaseException:
        for upload in files:
            upload.close()
        raise
    return MultiDict(fields), MultiDict((f.name, f) for f in files)


def _multipart_body(fields=None, files=None):
    """Encode (body, content_type) for tests and scripts: fields {name: str}, files
    {name: (filename, bytes, content_type)}."""
    boundary = "asok" + secrets.token_hex(12)
    out = []
    for name, value in (fields or {}).items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                   + str(value).encode() + b"\r\n")
    for name, (filename, data, ctype) in (files or {}).items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f'Content-Type: {ctype}\r\n\r\n'.encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


# ═══ 10. Requests, responses, routing ═════════════════════════════════════════════════════════════

@dataclass(frozen=True, slots=True)
class _SessionAccess:
    """How a Request reaches its session, given to it when it is made (`app.session_access`; a
    Request with no app gets _NO_SESSIONS). `open(request)` returns the Session the request's
    cookie names (a fresh one if none verifies); `csrf_token(request)` that session's CSRF
    token, starting the session if it is new."""
    open: Callable[[Any], Session]
    csrf_token: Callable[[Any], str]


def _no_csrf_token(request):
    raise AttributeError("a Request made without an app has no csrf_token (no key signs one)")


_NO_SESSIONS = _SessionAccess(lambda request: Session(), _no_csrf_token)  # a Request with no app


class Request:
    """One HTTP request. Built by the server, the WSGI and ASGI adapters and the TestClient.
    `body` is given as bytes or, for a large body, as a binary file at its start. The request
    reaches its session through what the app gives it here (`app.session_access`)."""

    # what every request has in slots; what it may set later, class attributes until then (in its
    # __dict__, with anything an application adds)
    __slots__ = ("method", "path", "query_string", "headers", "_body", "scheme", "remote_addr", "app", "params",
                 "_sessions", "alive_parts", "__dict__")
    _on_loop = False  # set by the server while it tries the request on the event loop (see _OffLoop)
    _session = _cookies = _query = _form = _files = None  # made when first asked for (one request each)
    uses_live = False

    def __init__(self, method: str, path: str, query_string: str = "",
                 headers: dict[str, str] | None = None, body: bytes | BinaryIO = b"", scheme: str = "http",
                 remote_addr: str = "", app: "Asok | None" = None) -> None:
        self.method = method.upper()
        self.path = path
        self.query_string = query_string
        self.headers = headers or {}
        self._body = body
        self.scheme = scheme
        self.remote_addr = remote_addr
        self.app = app
        self.params = {}
        if app is not None and app.trusted_proxies and _ip_in(remote_addr, app.trusted_proxies):
            self._trust_proxy(app.trusted_proxies)
        self._sessions = app.session_access if app is not None else _NO_SESSIONS
        self.alive_parts = set()  # parts of alive.js the page needs beside the core ("forms")

    def __repr__(self):
        return f"<Request {self.method} {self.path}>"

    def _retry(self):
        """Back to where a try on the event loop started (see _OffLoop), before the request starts
        again in a thread: the fields a page render notes on its request go back to their start
        (the cached cookies, query and session stay: they are what the request says)."""
        self._on_loop = False
        self.uses_live = False
        self.alive_parts = set()

    def _trust_proxy(self, trusted):
        """The peer is a proxy the app trusts (`Asok(trusted_proxies=...)`): take the client's
        scheme, host and address from `Forwarded` (RFC 7239 §4) or, without it, from
        X-Forwarded-Proto / -Host / -For. Values are read right to left, past every trusted hop,
        so a client cannot choose them by sending the headers itself."""
        headers = self.headers
        hops = []
        if "forwarded" in headers:
            for element in headers["forwarded"].split(","):
                pairs = (part.strip().partition("=") for part in element.split(";"))
                hops.append({k.strip().lower(): v.strip().strip('"') for k, _, v in pairs if k})
        else:  # one list (For); Proto and Host belong to the nearest hop
            hops = [{"for": a.strip()} for a in headers.get("x-forwarded-for", "").split(",") if a.strip()]
            nearest = {name: headers[f"x-forwarded-{name}"].rpartition(",")[2].strip()
                       for name in ("proto", "host") if f"x-forwarded-{name}" in headers}
            hops[-1:] = [{**(hops[-1] if hops else {}), **nearest}]
        for hop in reversed(hops):
            address = hop.get("for", "")
            if address.startswith("["):  # '"[2001:db8::1]:4711"'
                address = address[1:].partition("]")[0]
            elif address.count(":") == 1:  # "192.0.2.1:4711"
                address = address.partition(":")[0]
            if hop.get("proto", "").lower() in ("http", "https"):
                self.scheme = hop["proto"].lower()
            if hop.get("host") and _HOST_RE.match(hop["host"]):
                self.headers = headers = {**headers, "host": hop["host"]}
            if address:
                self.remote_addr = address
            if not address or not _ip_in(address, trusted):
                break

    @property
    def query(self) -> MultiDict:
        """The query string's fields: a MultiDict (`.get(name)`, `.getlist(name)`)."""
        if self._query is None:
            self._query = _parse_qs(self.query_string)
        return self._query

    @property
    def cookies(self) -> dict[str, str]:
        """The request's cookies by name."""
        if self._cookies is None:
            header = self.headers.get("cookie", "")
            parsed = _COOKIES_SEEN.get(header)
            if parsed is None:
                parsed = _parse_cookies(header)
                _keep(_COOKIES_SEEN, header, parsed, 256)  # a long field is parsed each time
            self._cookies = dict(parsed)  # the request's own copy
        return self._cookies

    @property
    def content_type(self) -> str:
        """The media type of the body in lower case, without parameters ("" when there is none)."""
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    @property
    def body(self) -> bytes:
        """The body as bytes (a large body is read from its temporary file when asked for)."""
        if not isinstance(self._body, (bytes, bytearray)):
            self._body.seek(0)
            self._body = self._body.read()
        return self._body

    @body.setter
    def body(self, value):
        self._body = value

    def _stream(self):
        if isinstance(self._body, (bytes, bytearray)):
            return io.BytesIO(self._body)
        self._body.seek(0)
        return self._body

    @property
    def form(self) -> MultiDict:
        """Form fields of an urlencoded or a multipart/form-data body (a MultiDict of str)."""
        if self._form is None:
            if self.content_type == "application/x-www-form-urlencoded":
                try:
                    text = self.body.decode("utf-8")
                except UnicodeDecodeError:
                    raise HTTPError(400, "form data is not valid UTF-8")
                self._form = _parse_qs(text)
            elif self.content_type == "multipart/form-data":
                app = self.app
                limits = ((app.max_form_parts, app.max_field_size, app.max_part_size, app.max_body) if app else
                          (DEFAULT_MAX_FORM_PARTS, DEFAULT_MAX_FIELD_SIZE, DEFAULT_MAX_PART_SIZE, DEFAULT_MAX_BODY))
                self._form, self._files = _read_multipart(self._stream(), self.headers.get("content-type", ""), limits)
            else:
                self._form = MultiDict()
        return self._form

    @property
    def files(self) -> MultiDict:
        """Files of a multipart/form-data body: a MultiDict of UploadedFile by field name.
        They are closed (and their temporary files removed) when the handler returns."""
        if self._files is None:
            self.form  # noqa: B018 (parsing the body fills _files)
            if self._files is None:
                self._files = MultiDict()
        return self._files

    def close(self) -> None:
        """Release the body's temporary file and the uploaded files."""
        for uploads in (self._files._lists.values() if self._files else ()):
            for upload in uploads:
                upload.close()
        if not isinstance(self._body, (bytes, bytearray)):
            self._body.close()

    @property
    def json(self) -> Any:
        """The body parsed as JSON (None when empty); HTTPError 400 when it is not JSON."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}")

    @property
    def host(self) -> str:
        """The Host header ("" when absent; from X-Forwarded-Host behind a trusted proxy)."""
        return self.headers.get("host", "")

    @property
    def session(self) -> Session:
        """The user's session, opened from the cookie when first used."""
        if self._session is None:
            self._session = self._sessions.open(self)
        return self._session

    @property
    def csrf_token(self) -> str:
        """The session's CSRF token (starting a session if there is none)."""
        return self._sessions.csrf_token(self)


_HOST_RE = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def _proxy_networks(spec):
    """`"127.0.0.1, 10.0.0.0/8"`, a list of addresses or networks, or `"*"` (trust any peer)."""
    if not spec:
        return ()
    items = spec.split(",") if isinstance(spec, str) else spec
    networks = []
    for item in (str(i).strip() for i in items):
        if item == "*":
            return ("*",)
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"trusted proxy {item!r} is not an IP address or network (e.g. 10.0.0.0/8)")
    return tuple(networks)


def _ip_in(address, networks):
    if networks == ("*",):
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


_COOKIES_SEEN = {}  # a Cookie field's value -> its cookies, parsed (bounded; each request copies)


def _parse_cookies(header):
    cookies = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


class Response:
    """Status, headers, cookies and a body: bytes, or an iterable of bytes to stream."""

    def __init__(self, body: bytes | str | Iterable[bytes] = b"", status: int = 200,
                 headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 content_type: str | None = "text/html; charset=utf-8") -> None:
        self.status = int(status)
        if not headers:  # the usual page: its one field, with nothing to look through
            self.headers = [("Content-Type", content_type)] if content_type else []
        else:
            self.headers = list(headers.items() if isinstance(headers, dict) else headers)
            if content_type and not any(k.lower() == "content-type" for k, _ in self.headers):
                self.headers.append(("Content-Type", content_type))
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.body = body

    def __repr__(self):
        return f"<Response {self.status}>"

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of the header field `name` (any case), or `default`."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    def set_cookie(self, name: str, value: str, max_age: float | None = None, path: str = "/",
                   httponly: bool = True, samesite: str | None = "Lax", secure: bool = False,
                   expires: float | None = None) -> None:
        """Add a Set-Cookie field: HttpOnly and SameSite=Lax unless told otherwise."""
        parts = [f"{name}={value}", f"Path={path}"]
        if max_age is not None:
            parts.append(f"Max-Age={int(max_age)}")
        if expires is not None:
            parts.append(f"Expires={formatdate(expires, usegmt=True)}")
        if httponly:
            parts.append("HttpOnly")
        if samesite:
            parts.append(f"SameSite={samesite}")
        if secure:
            parts.append("Secure")
        self.headers.append(("Set-Cookie", "; ".join(parts)))

    def delete_cookie(self, name: str, path: str = "/") -> None:
        """Tell the browser to drop the cookie `name`."""
        self.set_cookie(name, "", max_age=0, path=path, expires=0)

    @property
    def streamed(self) -> bool:
        """True when the body is an iterable of chunks (sent chunked) rather than bytes."""
        return not isinstance(self.body, (bytes, bytearray, memoryview))


def redirect(location: str, status: int = 302) -> Response:
    """A response sending the browser to `location`: 302, or `status` (301, 303, 307, 308)."""
    return Response(b"", status, [("Location", location)], content_type=None)


def make_response(rv: Any) -> Response:
    """Turn what a handler returned into a Response:
    Response as is; str -> HTML; bytes -> application/octet-stream; dict or list -> JSON;
    an iterator or generator of str/bytes -> streamed; (body, status) and
    (body, status, headers) tuples as in Flask."""
    status, headers = None, None
    if isinstance(rv, tuple):
        if len(rv) == 2:
            rv, status = rv
        elif len(rv) == 3:
            rv, status, headers = rv
        else:
            raise TypeError("a handler's tuple must be (body, status) or (body, status, headers)")
    if isinstance(rv, Response):
        response = rv
    elif isinstance(rv, str):
        response = Response(rv)
    elif isinstance(rv, (bytes, bytearray)):
        response = Response(bytes(rv), content_type="application/octet-stream")
    elif isinstance(rv, (dict, list)):
        response = Response(json.dumps(rv).encode(), content_type="application/json")
    elif rv is None:
        raise TypeError("the handler returned None; return a str, bytes, dict, list or Response")
    elif hasattr(rv, "__iter__"):
        response = Response(c.encode() if isinstance(c, str) else c for c in rv)
    else:
        raise TypeError(f"a handler cannot return {type(rv).__name__}")
    if status is not None:
        response.status = int(status)
    if headers:
        response.headers.extend(headers.items() if isinstance(headers, dict) else headers)
    return response


_CONVERTERS = {
    "str": (r"[^/]+", str),
    "int": (r"-?\d+", int),
    "float": (r"-?\d+(?:\.\d+)?", float),
    "path": (r".+", str),
}


class Route:
    """A path pattern (`/users/<int:id>`; file pages use `[id]`) bound to a handler."""

    def __init__(self, pattern, handler, methods=("GET",), csrf=True, name=None, page=None):
        self.pattern = pattern
        self.handler = handler
        self.methods = {m.upper() for m in methods}
        if "GET" in self.methods:
            self.methods.add("HEAD")
        self.csrf = csrf
        self.name = name or getattr(handler, "__name__", pattern)
        self.page = page
        self.converters = {}
        regex = "^"
        for literal, conv, name_ in re.findall(r"([^<]*)(?:<(?:(\w+):)?(\w+)>)?", pattern):
            regex += re.escape(literal)
            if name_:
                if (conv or "str") not in _CONVERTERS:
                    raise ValueError(f"route {pattern!r}: unknown converter {conv!r}")
                part, self.converters[name_] = _CONVERTERS[conv or "str"]
                regex += f"(?P<{name_}>{part})"
        self.regex = re.compile(regex + "$")
        self.static = not self.converters
        self.wants_request = handler is not None and "request" in _parameters(handler)

    def match(self, path):
        if self.static:
            return {} if path == self.pattern else None
        m = self.regex.match(path)
        if m is None:
            return None
        try:
            return {k: self.converters[k](v) for k, v in m.groupdict().items()}
        except ValueError:
            return None

    def build(self, **params):
        def fill(m):
            return urllib.parse.quote(str(params.pop(m.group(2))), safe="" if m.group(1) != "path:" else "/")
        try:
            path = re.sub(r"<(\w+:)?(\w+)>", fill, self.pattern)
        except KeyError as exc:
            raise ValueError(f"url_for({self.name!r}) needs {exc.args[0]!r}")
        return path + ("?" + urllib.parse.urlencode(params) if params else "")


def _parameters(fn):
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


# ═══ 11a. Components (DESIGN §4, §10): limits, decorators, the Component class ════════════════════

LIVE_MAX_MESSAGE = 256 * 1024   # larger events get a too_large reply...
LIVE_SOCKET_MAX = LIVE_MAX_MESSAGE + (64 << 10)  # ...up to this; past it the socket closes with 1009
LIVE_RECENT_PAGES = 8           # pages per component whose last applied request id is kept (a resend applies once)
LIVE_MAX_ID = 100               # characters of a request id, else id_too_long
LIVE_MAX_STATE = 512 * 1024     # bytes of one component's state as JSON, else state_too_large (a saved
                                # state travels by reference, so this is bound by SESSION_MAX_RECORD)
LIVE_MAX_PER_SESSION = 200      # component states kept per session; the least recently used go
LIVE_MAX_DROPPED = 1000         # dropped components remembered one by one (see _live_apply)
LIVE_MAX_JOIN = 500             # live components one page may show
LIVE_MAX_PUBLISH = 64 * 1024    # bytes of one published topic + JSON payload
LIVE_MAX_PENDING = 64           # published messages waiting per (session, cid); past it they are dropped (logged)
LIVE_RUNNERS = 2                # threads applying published messages and ticks at once
LIVE_LOOP_TURN = 32             # on_loop components' messages and ticks applied per turn of the event loop
LIVE_MIN_PERIOD = 0.05          # the shortest @every period, in seconds
LIVE_CLOCK_SLACK = 2            # periods a tick may lag the last one saved before it counts as a clock jump
LIVE_ORIGINS_KEPT = 16          # publishing processes whose last applied message a saved component remembers
LIVE_OUTBOX_REPLIES = 8         # replies queued for a page that does not read before its messages wait
LIVE_SIGNED_KEPT = 1024         # references this process signed lately, read back without checking their HMAC
LIVE_INLINE_STATE = 16 * 1024   # a fresh component's state past this (JSON) is saved when its page renders,
                                # so the page's first event carries a reference, not the state
DEFAULT_MAX_UPLOAD = 10 << 20    # bytes of files one ws-submit may upload (Component.max_upload)
UPLOAD_LIFETIME = 3600          # an uploaded file no event took is deleted after this
UPLOAD_PENDING_MAX = 512 << 20  # bytes of uploads waiting for their events, all sessions together
                                # (one session: twice its component's max_upload)
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9_-]{32}\Z")
_COMPONENT_SETTINGS = ("url", "max_upload", "locked", "on_loop")  # class attributes that configure, not state
LIVE_RELOAD_CODES = ("bad_state", "no_session")  # refusals that only a page reload cures
LIVE_MAX_EMITS = 50             # @on handler runs that one round trip's emits may cause (a loop stops there)
_JSON_SCALARS = (str, int, float, bool, type(None))
_JSON_PLAIN = frozenset((str, int, bool, type(None)))  # types a quick check passes at once (floats: if finite)
_CID_RE = re.compile(r"[\w:./#@-]{1,200}\Z")


def exposed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a component method as callable from the browser."""
    fn.__asok_exposed__ = True
    return fn


def on(topic: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@on("chat:{room}")` on a component method: it runs with the payload, `method(self,
    payload)`, when `topic` is published, while at least one view of the component is open.
    `{field}` is filled in from the component's state (when it joins and after each change)."""
    if not isinstance(topic, str) or not topic:
        raise TypeError("@on() takes a topic: a non-empty str such as 'chat:{room}'")
    if re.search(r"[{}]", re.sub(r"\{[A-Za-z_]\w*\}", "", topic)):
        raise ValueError(f"@on({topic!r}): a placeholder is the name of a state field in braces, like {{room}}")

    def mark(fn):
        fn.__asok_on__ = getattr(fn, "__asok_on__", ()) + (topic,)
        return fn
    return mark


def every(seconds: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@every(5)` on a component method taking no arguments: it runs once per period per
    (session, cid) while at least one view of the component is open."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= LIVE_MIN_PERIOD:
        raise ValueError(f"@every() takes a number of seconds, at least {LIVE_MIN_PERIOD}; got {seconds!r}")

    def mark(fn):
        fn.__asok_every__ = float(seconds)
        return fn
    return mark


def _json_safe(value):
    """Whether `value` is JSON-safe: the quick walk each event makes (no path built)."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _JSON_PLAIN and not _json_safe(item)):
                return False
        return True
    if kind is list:
        for item in value:
            if type(item) not in _JSON_PLAIN and not _json_safe(item):
                return False
        return True
    if kind is float:
        return math.isfinite(value)
    return isinstance(value, _JSON_SCALARS) and not (isinstance(value, float) and not math.isfinite(value))


def _json_encoder(sort_keys):
    """Compact JSON (as json.dumps(value, separators=(",", ":"), sort_keys=...)) for values already
    known to be JSON: the C encoder made once, where json.dumps with arguments builds an encoder
    and a C encoder per call (a third of a small component's signing). No cycle check: a cycle never
    gets here, _json_safe has refused it (RecursionError) before anything is dumped."""
    make = getattr(json.encoder, "c_make_encoder", None)
    plain = json.JSONEncoder(separators=(",", ":"), sort_keys=sort_keys).encode
    try:
        fast = make(None, plain.__self__.default, json.encoder.encode_basestring_ascii, None, ":", ",",
                    sort_keys, False, True)
        sample = {"b": [1, 2.5, None, True, "é\n"], "a": {}}
        if "".join(fast(sample, 0)) != plain(sample):
            return plain
    except TypeError:  # no C encoder, or one that takes other arguments
        return plain
    return lambda value: "".join(fast(value, 0))


_json_compact = _json_encoder(False)
_json_compact_sorted = _json_encoder(True)


def _check_json_safe(value, where):
    if type(value) in _JSON_PLAIN or _json_safe(value):
        return
    _explain_json_safe(value, where)


def _explain_json_safe(value, where):
    """Raise TypeError (ValueError for NaN and infinities) naming the first part of `value`
    that is not JSON-safe (the slow walk, after the quick one found something)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}; state numbers must be finite (JSON has no NaN or Infinity)")
    if isinstance(value, _JSON_SCALARS):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _explain_json_safe(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a {type(key).__name__} key {key!r}; state dict keys must be str")
            _explain_json_safe(item, f"{where}[{key!r}]")
    else:
        raise TypeError(f"{where} is a {type(value).__name__}; component state must be JSON-safe "
                        "(str, int, float, bool, None, list, dict)")


class Component:
    """A live component. Public class attributes are its initial state; `@exposed` methods
    run when the browser asks; `render()` returns its HTML (by default `<name>.html`
    beside the component's file, lower-cased)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        module = sys.modules.get(cls.__module__)
        cls._asok_dir = Path(getattr(module, "__file__", None) or Path.cwd() / "x").parent
        cls._asok_fields = {}
        for klass in reversed(cls.__mro__):
            if klass in (Component, object):
                continue
            for name, value in vars(klass).items():
                if name.startswith("_") or name in _COMPONENT_SETTINGS or callable(value) or isinstance(
                        value, (property, classmethod, staticmethod, types.MemberDescriptorType)):
                    continue
                cls._asok_fields[name] = value
        if isinstance(cls.url, str):
            cls.url = (cls.url,)
        if not isinstance(cls.max_upload, int) or isinstance(cls.max_upload, bool) or cls.max_upload < 0:
            raise TypeError(f"{cls.__name__}.max_upload must be a number of bytes (an int >= 0), "
                            f"not {cls.max_upload!r}")
        # the part of alive.js for uploads and URL binding: for these, and any component with a file input
        cls._asok_forms = bool(cls.url) or any("max_upload" in vars(k) for k in cls.__mro__[:-2])
        for name in cls.url:
            if name not in cls._asok_fields:
                raise TypeError(f"{cls.__name__}.url names {name!r}, which is not a state attribute "
                                f"(it has: {', '.join(cls._asok_fields) or 'none'})")
        cls._asok_signatures = {}
        cls._asok_paths = {}
        methods = {}
        for klass in reversed(cls.__mro__):
            methods.update((name, value) for name, value in vars(klass).items() if callable(value))
        cls._asok_on = [(topic, name) for name, fn in methods.items() for topic in getattr(fn, "__asok_on__", ())]
        cls._asok_every = [(name, fn.__asok_every__) for name, fn in methods.items() if hasattr(fn, "__asok_every__")]
        for name, fn in methods.items():
            takes = (None, None) if hasattr(fn, "__asok_on__") else (None,) if hasattr(fn, "__asok_every__") else None
            if takes is None:
                continue
            try:
                inspect.signature(fn).bind(*takes)
            except TypeError:
                raise TypeError(f"{cls.__name__}.{name}: an @on method takes the payload (def {name}(self, "
                                f"payload)); an @every method takes nothing (def {name}(self))") from None

    url = ()                        # state fields bound to the query string: url = ("page", "sort")
    on_loop = None                  # True: events (and page renders, mount included) run on the event loop;
    # None: a method's events do when its code only works on the state (_events_on_loop); False: never
    max_upload = DEFAULT_MAX_UPLOAD  # bytes of files one ws-submit may upload
    # State fields the browser may not set through ws-model ($model), as Livewire's #[Locked]:
    # every other public field is writable by the page's user, like a form field.
    locked = ()

    def mount(self) -> None:
        """Runs once, on the first render of this component for a session."""

    def update(self, **props: Any) -> None:
        """Runs on every later render that passes props (the first render sets them as state
        before `mount()`); by default the saved state wins and the props are ignored."""

    def authorize(self, method: str, args: list[Any]) -> bool:
        """Runs before every call from the browser (`method` is "$model" for ws-model) with
        the state restored; return False to refuse with `forbidden`, or raise
        LiveError(code, message) to refuse with your own. Default: allow."""
        return True

    def render(self) -> str:
        """The component's HTML: by default the template named after the class in lower case (Counter:
        counter.html) beside its file."""
        return self.html(type(self).__name__.lower() + ".html")

    def html(self, name: str, /, **extra: Any) -> Markup:
        """Render a template beside the component's file with the state (and `extra`) as context."""
        return self._render_html(name, self.state, extra)

    def _render_html(self, name, state, extra):
        """html(name, **extra) with the state given (a page's render has just made it)."""
        templates = self._asok_app.templates
        known = self._asok_paths.get(name)
        if known is None:
            known = self._asok_paths[name] = (self._asok_dir / name, None, None)
        path, loader, template = known
        if loader is not templates or templates.debug:  # compiled once per loader; looked at again in debug
            template = templates.get_file(path)
            if not templates.debug:
                self._asok_paths[name] = (path, templates, template)
        context = {**templates.globals, **self._asok_context, **state, **extra}
        return str.__new__(Markup, template.render_context(context))  # a str: Markup's own __new__ adds nothing

    @property
    def session(self) -> Session:
        """The session of the user the component belongs to (see Session)."""
        return self._asok_session

    def publish(self, topic: str, payload: Any = None) -> None:
        """`app.publish` from inside a component: sent once this call's result is saved
        (not at all if the call fails)."""
        encoded = self._asok_app.live.encode(topic, payload)
        outbox = getattr(self, "_asok_outbox", None)
        if outbox is None:
            self._asok_app.live._send(encoded)
        else:
            outbox.append(encoded)

    def emit(self, event: str, payload: Any = None) -> None:
        """Tell the other components on this page: those with `@on(event)` run it with
        `payload` in this same round trip, and the reply brings every one that changed
        (a child telling its parent). Only during a live call: an event, or a handler."""
        emits = getattr(self, "_asok_emits", None)
        if emits is None:
            raise RuntimeError(f"{type(self).__name__}.emit({event!r}): emit() works during a live call "
                               "(an @exposed method, or an @on/@every handler), not in a page render")
        emits.append(self._asok_app.live.encode(event, payload))

    @property
    def state(self) -> dict[str, Any]:
        """The component's state: its public attributes, as rendered, signed and saved."""
        state = {name: value for name, value in vars(self).items() if name[0] != "_"}
        if not self._asok_fields.keys() <= state.keys():  # a field not set on the instance: the class's
            state = {**{name: getattr(self, name) for name in self._asok_fields}, **state}
        return state

    def _checked_state(self):
        return self._checked_state_json()[0]

    def _checked_state_json(self):
        """The state, checked (JSON-safe, within LIVE_MAX_STATE), and its compact JSON."""
        state = self.state
        for name, value in state.items():
            if type(value) not in _JSON_PLAIN:
                _check_json_safe(value, f"{type(self).__name__}.{name}")
        text = _json_compact(state)
        if len(text) > LIVE_MAX_STATE:
            raise LiveError("state_too_large", f"{type(self).__name__}'s state is {len(text)} bytes as JSON; the "
                                               f"limit is {LIVE_MAX_STATE} (LIVE_MAX_STATE), so it was not saved")
        return state, text

    @classmethod
    def _restore(cls, app, state, session, cid, context):
        self = cls.__new__(cls)
        self._asok_app = app
        self._asok_session = session
        self._asok_cid = cid
        self._asok_context = context
        for name, value in state.items():
            setattr(self, name, value)
        return self

    @classmethod
    def _check_props(cls, props):
        for name in props:
            if name not in cls._asok_fields:
                raise TypeError(f"{cls.__name__} has no state attribute {name!r} "
                                f"(it has: {', '.join(cls._asok_fields) or 'none'})")

    @classmethod
    def _create(cls, app, props, session, cid, context):
        fields = cls._asok_fields
        if not props.keys() <= fields.keys():
            cls._check_props(props)
        state = {**fields, **props}
        plain = True
        for name, value in state.items():
            kind = type(value)
            if kind not in _JSON_PLAIN:
                _check_json_safe(value, f"{cls.__name__}.{name}")
                plain = plain and kind is float
        if not plain:  # a list or dict among the defaults: a private copy (class defaults are shared)
            state = json.loads(json.dumps(state))
        self = cls._restore(app, state, session, cid, context)
        if cls.mount is not Component.mount:  # Component's own does nothing
            self.mount()
        return self

    @classmethod
    def _signature(cls, method):
        sig = cls._asok_signatures.get(method)
        if sig is None:
            sig = cls._asok_signatures[method] = inspect.signature(getattr(cls, method))
        return sig


# ═══ 11b. Components: arguments from the browser, and the renderer ════════════════════════════════

def _convert_arg(value, annotation, name):
    """Convert a JSON argument to the parameter's annotated type, or say which argument does not fit."""
    if annotation is inspect.Parameter.empty or annotation is None:
        return value
    target = annotation if isinstance(annotation, type) else None
    if isinstance(annotation, str):
        target = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}.get(annotation)
    if target is None:
        return value
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "on", "1", "yes", "false", "off", "0", "no", ""):
                return value.lower() in ("true", "on", "1", "yes")
            if value in (0, 1):
                return bool(value)
        elif target is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
        elif target is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
        elif target is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        elif isinstance(value, target):
            return value
    except ValueError:
        pass
    raise LiveError("bad_args", f"argument {name!r} must be {target.__name__}, got {json.dumps(value)[:60]}")


def _bind_args(cls, method, args):
    sig = cls._signature(method)
    params = list(sig.parameters.values())[1:]
    if not args and not params:
        return args
    try:
        bound = sig.bind(None, *args)
    except TypeError as exc:
        names = ", ".join(p.name for p in params) or "no arguments"
        raise LiveError("bad_args", f"{cls.__name__}.{method}() takes ({names}); {exc}")
    converted = []
    for param in params:
        if param.name not in bound.arguments:
            continue
        value = bound.arguments[param.name]
        if param.kind is param.VAR_POSITIONAL:
            converted.extend(value)
        else:
            converted.append(_convert_arg(value, param.annotation, param.name))
    return converted


def _model_value(cls, prop, value, current=None):
    """The value ws-model sets, in the field's type: that of its class default, or of its
    current value when the default is None (a dict cannot land in a str field)."""
    if prop.startswith("_") or prop not in cls._asok_fields:
        raise LiveError("bad_args", f"ws-model names {prop!r}, which is not a state attribute of {cls.__name__}")
    default = cls._asok_fields[prop]
    kind = type(default if default is not None else current)
    if kind in (bool, int, float, str, list, dict):
        return _convert_arg(value, kind, prop)
    return value


def _url_value(cls, name, text):
    """A query-string value for the url-bound field `name`, converted to its declared type (the
    annotation, else the type of the class default); a value that does not convert is the default."""
    default = cls._asok_fields[name]
    kind = inspect.get_annotations(cls, eval_str=False).get(name, type(default))
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
    try:
        if kind is bool:
            return {"true": True, "1": True, "on": True, "yes": True,
                    "false": False, "0": False, "off": False, "no": False}[text.lower()]
        if kind in (int, float):
            value = kind(text)
            return value if math.isfinite(value) else default
        if kind is str or default is None:
            return text
    except (KeyError, ValueError, OverflowError):
        pass
    return default


@dataclass(frozen=True, slots=True)
class _RendererTools:
    """What the app gives each _ComponentRenderer besides itself (built once, in Asok.__init__)."""
    session_id: Callable[[Session], str]            # its sid, starting the session if it is new
    context: Callable[[Any, str], dict[str, Any]]   # (request, prefix) -> the globals of a nested render
    save_url_state: Callable[..., tuple[int, int]]  # (sid, cid, cls, state) -> the saved (version, seq)
    wrap: Callable[..., Markup]                     # (comp, name, cid, sid, version, seq, saved) -> its HTML


class _ComponentRenderer:
    """The `component(name, **props)` template global for one page render or one live event."""

    __slots__ = ("app", "tools", "request", "prefix", "counts", "keyed")  # one per render

    def __init__(self, app, tools, request, prefix):
        self.app = app
        self.tools = tools
        self.request = request
        self.prefix = prefix
        self.counts = self.keyed = None  # made when a second component or a key= needs them

    def __call__(self, name, /, **props):
        app, request = self.app, self.request
        cls = app.components.get(name)
        if cls is None:
            raise LookupError(f"component({name!r}): no such component "
                              f"(known: {', '.join(sorted(app.components)) or 'none'}; "
                              f"they are found in {app.root / 'src' / 'components'})")
        if request._on_loop and not _renders_on_loop(cls):
            raise _OffLoop(lasting=True)  # its mount(), update() or render() is the application's
        cid = self._cid(name, props.pop("cid", None), props.pop("key", None)) if "cid" in props or "key" in props \
            else self._cid(name, None, None)
        request.uses_live = True
        if getattr(cls, "_alive_parts", None):  # parts of alive.js this component needs (see _minify_alive)
            request.alive_parts = {*getattr(request, "alive_parts", ()), *cls._alive_parts}
        session, tools = request.session, self.tools
        sid = session.sid or tools.session_id(session)
        context = tools.context(request, cid)
        raw = session.live.get(cid)
        stored = SavedComponent.load(raw, name) if raw else None
        if stored is not None:
            if props:
                return self._update(cls, name, cid, sid, context, stored, props)
            comp = cls._restore(app, stored.state, session, cid, context)
            version, seq = stored.version, stored.seq
        else:
            comp = cls._create(app, props, session, cid, context)
            version, seq = 0, session.seq
        saved = stored is not None
        if cls.url and isinstance(request, Request) and request.query_string:
            # a page loaded with a query string starts from it over the saved state, and saves it
            changed = {k: _url_value(cls, k, request.query[k]) for k in cls.url if k in request.query}
            changed = {k: v for k, v in changed.items() if getattr(comp, k) != v}
            if changed:
                if request._on_loop:
                    raise _OffLoop()  # a save waits for the session's lock: in a thread
                for key, value in changed.items():
                    setattr(comp, key, value)
                version, seq = tools.save_url_state(sid, cid, cls, comp._checked_state())
                saved = True
        markup = tools.wrap(comp, name, cid, sid, version, seq, saved)
        if cls._asok_forms or ("type=" in markup and ('type="file"' in markup or "type=file" in markup)):
            request.alive_parts = {*getattr(request, "alive_parts", ()), "forms"}
        return markup

    def _cid(self, name, cid, key):
        """`cid=` as given; `key=` under the enclosing page or component, so the state follows
        the item; else the position among this render's unkeyed `name` components."""
        if key is not None:
            if cid is not None:
                raise TypeError(f"component({name!r}): give key= or cid=, not both")
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"component({name!r}): key must be a str or an int, not {type(key).__name__}")
            part = str(key)
            if not re.fullmatch(r"[\w.-]{1,64}", part):  # anything else by its digest (':' sets it apart)
                part = ":" + hashlib.sha256(part.encode()).hexdigest()[:20]
            cid = f"{self.prefix}#{name}@{part}"
            if self.keyed is None:
                self.keyed = set()
            if cid in self.keyed:
                raise ValueError(f"component({name!r}, key={key!r}) is rendered twice here; "
                                 "keys must be unique among the components of one name")
            self.keyed.add(cid)
            return cid
        if cid is None:
            if self.counts is None:
                self.counts = {}
            n = self.counts[name] = self.counts.get(name, -1) + 1
            if n == 1 and self.app.debug:
                log.warning("component(%r) renders more than once in %s with no key: each one's state "
                            "follows its position, not its item; pass key=item.id", name, self.prefix)
            return f"{self.prefix}#{name}-{n}"
        if not isinstance(cid, str) or not _CID_RE.match(cid):
            raise ValueError(f"component({name!r}): cid must be 1-200 letters, digits or _:./#@-")
        return cid

    def _update(self, cls, name, cid, sid, context, stored, props):
        """A later render with props: `update(**props)` on a private copy of the saved state; a
        change is saved (in the event's own record during a live render, else in one store update)."""
        app, session = self.app, self.request.session
        cls._check_props(props)
        comp = cls._restore(app, json.loads(json.dumps(stored.state)), session, cid, context)
        comp.update(**props)
        state, before = comp._checked_state(), stored.version
        if _json_compact_sorted(state) != _json_compact_sorted(stored.state):
            if self.request._on_loop:
                raise _OffLoop()
            stored.state, stored.version = state, before + 1  # stored is this render's own copy
            saved = stored.dump()
            if isinstance(self.request, _LiveContext):
                session.live[cid] = saved
            else:
                def save(record):
                    live = record.setdefault("live", {})
                    if live.get(cid, {}).get("v") == before:  # else a newer save wins
                        live[cid] = saved
                app.sessions.update(sid, save)
        return self.tools.wrap(comp, name, cid, sid, stored.version, stored.seq, saved=True)


def _renders_on_loop(cls):
    """Whether a page render of `cls` runs no application code that might block: the class says
    `on_loop = True`, or it has no mount(), update(), html() or state of its own and its render() is
    Component's or only `return self.html("name.html")`. Worked out once per class."""
    known = cls.__dict__.get("_asok_page_loop")
    if known is None:
        known = cls.on_loop is True or (
            all(getattr(cls, name) is getattr(Component, name) for name in ("mount", "update", "html", "state"))
            and (cls.render is Component.render or _only_renders_a_template(cls.render) is not None))
        cls._asok_page_loop = known
    return known


# What a method may use and still have its events run on the event loop without `on_loop = True`
# (_events_on_loop): builtins that compute, the component's state and session, its emit/publish.
_PURE_BUILTINS = frozenset("""len min max abs int float str bool round sum sorted reversed enumerate range list dict
    set tuple zip any all isinstance divmod ValueError TypeError KeyError IndexError""".split())
_PURE_SELF = frozenset({"session", "publish"})  # (not emit(): it runs other components' @on handlers at once)
_PURE_NODES = (ast.Module, ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.If, ast.For, ast.Return,
               ast.Pass, ast.Delete, ast.Break, ast.Continue, ast.Raise, ast.Try, ast.ExceptHandler, ast.BoolOp,
               ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Dict, ast.Set, ast.List, ast.Tuple,
               ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension, ast.Constant,
               ast.JoinedStr, ast.FormattedValue, ast.Subscript, ast.Slice, ast.Starred, ast.keyword, ast.Lambda,
               ast.arguments, ast.arg, ast.Call, ast.expr_context, ast.operator, ast.boolop, ast.unaryop, ast.cmpop)


def _events_on_loop(cls, method):
    """Whether events calling `method` on `cls` (which leaves `on_loop` unset) may run on the
    event loop: the class renders only a template of its own with no component() in it, keeps
    Component's authorize(), and the method's code (and that of the methods it calls on self)
    only computes with builtins, its arguments and locals, the state's fields, self.session
    and self.publish: no global name, no import, no private attribute, no other
    decorator than @exposed, no while loop. Anything else may block: it runs in a thread."""
    known = cls.__dict__.get("_asok_loop_methods")
    if known is None:
        known = cls._asok_loop_methods = {}
    if method not in known:
        known[method] = isinstance(method, str) and _loop_class(cls) and (
            method == "$model" or _pure_method(cls, method, 0))
        if len(known) > 256:  # (a page may name any method: only the class's are worth keeping)
            known.clear()
    return known[method]


def _loop_class(cls):
    known = cls.__dict__.get("_asok_loop_class")
    if known is None:
        known = False
        own = ("authorize", "update", "__setattr__", "__getattr__", "__getattribute__", "__delattr__")
        template = _template_of(cls) if all(
            getattr(cls, name, None) is getattr(Component, name, None) for name in own) else None
        if template is not None:
            try:
                known = not re.search(r"\bcomponent\s*\(", (cls._asok_dir / template[0]).read_text())
            except (OSError, UnicodeDecodeError, AttributeError):
                known = False
        cls._asok_loop_class = known
    return known


def _pure_method(cls, name, depth):
    fn = inspect.getattr_static(cls, name, None)
    if not isinstance(fn, types.FunctionType) or depth > 2 or name.startswith("__"):
        return False
    node = _function_node(fn)
    if node is None or not node.args.args or any(
            not (isinstance(d, ast.Name) and d.id == "exposed") for d in node.decorator_list):
        return False
    me, names = node.args.args[0].arg, fn.__globals__
    local = {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)} | {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    for sub in ast.walk(ast.Module(body=node.body, type_ignores=[])):
        if isinstance(sub, ast.Name):
            if sub.id not in local and (sub.id not in _PURE_BUILTINS or sub.id in names):
                return False
        elif isinstance(sub, ast.Attribute):
            if isinstance(sub.value, ast.Name) and sub.value.id == me:  # a field, or a method that is pure too
                if sub.attr not in cls._asok_fields and sub.attr not in _PURE_SELF \
                        and not _pure_method(cls, sub.attr, depth + 1):
                    return False
            elif sub.attr.startswith("_"):
                return False
        elif not isinstance(sub, _PURE_NODES):
            return False
    return True


def _function_node(fn):
    """The ast.FunctionDef of a function's own source, or None (no source to read: it might do anything)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if len(tree.body) == 1 else None
    return node if isinstance(node, ast.FunctionDef) else None


def _only_renders_a_template(fn):
    """Whether the function's source is a docstring at most and `return self.html(<literals>)`:
    then the html() call's (args, kwargs), else None."""
    node = _function_node(fn)
    if node is None or node.decorator_list or len(node.args.args) != 1:
        return None
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    call = body[0].value if len(body) == 1 and isinstance(body[0], ast.Return) else None
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "html"
            and isinstance(call.func.value, ast.Name) and call.func.value.id == node.args.args[0].arg
            and all(isinstance(a, ast.Constant) for a in call.args)
            and all(k.arg is not None and isinstance(k.value, ast.Constant) for k in call.keywords)):
        return tuple(a.value for a in call.args), {k.arg: k.value.value for k in call.keywords}
    return None


def _template_of(cls):
    """(name, extra) when `cls().render()` is Component's own or only `return self.html(name, **extra)`
    with literals, through Component's html() and state: a page's render then renders that template
    with the state it has just made, instead of making it again. None otherwise. Once per class."""
    known = cls.__dict__.get("_asok_template_of", False)
    if known is False:
        known = None
        if cls.html is Component.html and cls.state is Component.state:
            if cls.render is Component.render:
                known = (cls.__name__.lower() + ".html", {})
            else:
                call = _only_renders_a_template(cls.render)
                if call is not None and len(call[0]) == 1 and isinstance(call[0][0], str):
                    known = (call[0][0], call[1])
        cls._asok_template_of = known
    return known


class _LiveContext:
    """What a live re-render sees as `request` in the template context: the session, and the
    path and query of the page, which alive.js sends when it joins."""

    _on_loop = False  # a live render is never a page tried on the loop (Request._on_loop)

    def __init__(self, app, session, sid, conn=None):
        self.app = app
        self.session = session
        self.sid = sid
        self.uses_live = True
        self.alive_parts = set()
        self.path = conn.path if conn is not None else None
        self.query_string = conn.query_string if conn is not None else ""
        self._query = None

    @property
    def query(self):
        if self._query is None:
            self._query = _parse_qs(self.query_string)
        return self._query

    @property
    def csrf_token(self):
        return self.app.session_access.csrf_token(self)


class _LazyToken:
    """`csrf_token` in templates: computed, and a session created, only when printed."""

    __slots__ = ("request",)  # one per render

    def __init__(self, request):
        self.request = request

    def __str__(self):
        return self.request.csrf_token

    __html__ = __str__


# ═══ 12a. The live protocol (DESIGN §5, §9): saved components, tokens, connections, diffs ═════════

@dataclass
class SavedComponent:
    """One component's state as the session store keeps it, under record["live"][cid]
    (on disk with short keys: c, s, v, q, ids, h, t)."""
    name: str                                   # c: the component class
    state: dict                                 # s: its state
    version: int = 0                            # v: events, handlers and timer ticks that changed it
    seq: int = 0                                # q: the session-wide number of the save that wrote it
    ids: dict = field(default_factory=dict)     # ids: page -> the highest request counter applied from it
    heard: dict = field(default_factory=dict)   # h: publishing process -> number of its last message applied
    ticks: dict = field(default_factory=dict)   # t: timer method -> the last period it ran in

    @classmethod
    def load(cls, raw: dict[str, Any] | None, name: str) -> "SavedComponent | None":
        """The saved component in `raw`, or None if there is none or it belongs to another class."""
        if not raw or raw.get("c") != name:
            return None
        return cls(name, raw["s"], raw["v"], raw.get("q", 0), raw.get("ids", {}), raw.get("h", {}), raw.get("t", {}))

    def dump(self) -> dict[str, Any]:
        """The record as the store keeps it (a JSON-safe dict)."""
        raw = {"c": self.name, "s": self.state, "v": self.version, "q": self.seq, "ids": self.ids}
        if self.heard:
            raw["h"] = self.heard
        if self.ticks:
            raw["t"] = self.ticks
        return raw


@dataclass(slots=True)
class StateToken:
    """What a signed state token (`data-asok-state`) says, bound to the component name, the
    cid and the session (LiveHub.sign / LiveHub.read). Two kinds, both JSON + "." + HMAC:
    - a reference {q, t, v}: "the state the session saved at save number q" (`state` is None);
      the session holds that state, so the browser need not send it back;
    - a state token {s, v, q, t, r?}: the state itself, for a component the session has not
      saved yet (its first event carries it), or for a page that needs its values (ws-model
      fields, URL-bound fields); `r` is then the reference, which alive.js sends instead."""
    state: dict | None
    version: int
    seq: int
    issued: int

    @classmethod
    def parse(cls, token):
        """The fields of a token, not verified (the test client's view of what a page shows)."""
        return cls.from_json(token.rpartition(".")[0])

    @classmethod
    def from_json(cls, text):
        payload = json.loads(text)
        state = payload.get("s")
        if state is not None and not isinstance(state, dict):
            raise TypeError("the state in a token is an object")
        return cls(state, payload["v"], payload.get("q", 0), payload["t"])


def _request_order(rid):
    """(page, counter) of a request id: alive.js numbers the events of a page ("<page>:<n>"), and
    a page sends the events of one component in order, so a resend is any id whose counter is
    not above the highest applied from its page. Another id is its own page, counter 0."""
    page, colon, counter = rid.rpartition(":")
    if colon and counter.isdigit() and counter.isascii() and len(counter) < 16:
        return page, int(counter)
    return rid, 0


@dataclass
class _LiveCall:
    """An event, checked: what to run on which component."""
    rid: str
    cid: str
    cls: type
    token: StateToken
    method: str
    args: list
    held: int | None = None  # the save number of the HTML the page holds for a diff (its `h`)


class LiveConnection:
    """One page's live socket (or a test client's stand-in): its session, the URL its page was
    loaded from, and its views by cid. `push(cid, text)` queues a message to the page; it is
    called from any thread and must not block."""
    __slots__ = ("sid", "push", "path", "query_string", "views")

    def __init__(self, sid, push):
        self.sid = sid
        self.push = push
        self.path = None
        self.query_string = ""
        self.views = {}


_LOOP_INBOXES = weakref.WeakKeyDictionary()  # event loop -> its _LoopInbox


class _LoopInbox:
    """Calls handed to one event loop from other threads, many per wake-up: one publish pushes
    to a thousand pages, and a wake-up (a write to the loop's self-pipe) for each would cost
    more than the pushes. A call under the key of one still waiting replaces it (the newest
    push of a component to a page is all it needs), so a stalled loop holds one per key."""

    def __init__(self, loop):
        self.loop = loop
        self.calls = {}
        self.lock = threading.Lock()

    @classmethod
    def of(cls, loop):
        inbox = _LOOP_INBOXES.get(loop)
        if inbox is None:
            inbox = _LOOP_INBOXES[loop] = cls(loop)
        return inbox

    def put(self, key, fn, *args):
        with self.lock:
            waiting = bool(self.calls)
            self.calls.pop(key, None)
            self.calls[key] = (fn, args)
            if waiting:
                return  # a wake-up is already on its way
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed: nobody is there to call
            self.calls.clear()

    def _run(self):
        with self.lock:
            calls, self.calls = self.calls, {}
        for fn, args in calls.values():
            try:
                fn(*args)
            except Exception:  # one page's failure does not cost the others their pushes
                log.exception("a live push failed")


class _LiveOutbox:
    """What goes out on one page's socket (built-in server or ASGI): replies in order, and
    pushes, only the newest per component (a page needs just the latest HTML). One sender at a
    time; a page that stops reading holds at most LIVE_OUTBOX_REPLIES replies (then its next
    messages wait) and one push per component."""
    __slots__ = ("loop", "inbox", "ws", "replies", "pushes", "busy", "closed", "room")

    def __init__(self, loop, ws):
        self.loop = loop
        self.inbox = _LoopInbox.of(loop)
        self.ws = ws
        self.replies = []  # a list, not a deque: a thousand idle pages each hold one
        self.pushes = None  # {cid: text} only while pushes wait
        self.busy = False
        self.closed = False
        self.room = None

    def push(self, cid, text):
        """Any thread."""
        self.inbox.put((id(self), cid), self._push, cid, text)

    def _push(self, cid, text):
        if self.send_now(text) or self.closed:
            return  # written at once: no task needed
        if self.pushes is None:
            self.pushes = {}
        self.pushes.pop(cid, None)
        self.pushes[cid] = text
        if not self.busy:
            self.loop.create_task(self._drain())

    def send_now(self, text):
        """Write a reply or push at once if nothing waits before it and the peer is reading (the
        built-in server's socket): True; else False, and `await reply()` (or `push`) is the way."""
        if self.busy or self.replies or self.pushes or self.closed:
            return False
        send_now = getattr(self.ws, "send_now", None)  # not under ASGI
        return send_now is not None and send_now(text)

    async def reply(self, text, tried=False):
        """Send a reply in order (`tried`: send_now() said it could not go at once)."""
        if not tried and self.send_now(text):
            return  # written at once: no drain, no coroutine per layer below it
        self.replies.append(text)
        if not self.busy:
            await self._drain()
        while len(self.replies) > LIVE_OUTBOX_REPLIES and not self.closed:
            self.room = self.room or asyncio.Event()
            self.room.clear()
            await self.room.wait()

    async def _drain(self):
        if self.busy:
            return
        self.busy = True
        try:
            while not self.closed and (self.replies or self.pushes):
                if self.replies:
                    text = self.replies.pop(0)
                    if self.room is not None:
                        self.room.set()
                else:
                    text = self.pushes.pop(next(iter(self.pushes)))
                    if not self.pushes:
                        self.pushes = None
                await self.ws.send(text)
        except Exception:  # the socket is gone (ConnectionClosed, or the ASGI server's own error)
            self.closed = True
        finally:
            self.busy = False
            if self.room is not None:
                self.room.set()


_HTML_TOKENS = re.compile(r"<[^>]*>?|[^<\s]+|\s+")  # every character is in one (a window may cut a tag)
DIFF_FINE = 4096  # a changed middle up to this many characters (old + new) is split into hunks


def _html_patch(old, diff):
    """`old` with each hunk of a diff (see _html_diff) applied, as alive.js applies it."""
    units, out, at = old.encode("utf-16-le"), [], 0
    for i in range(0, len(diff), 3):
        out += [units[2 * at:2 * diff[i]], diff[i + 2].encode("utf-16-le")]
        at = diff[i + 1]
    return b"".join([*out, units[2 * at:]]).decode("utf-16-le")


class _View:
    __slots__ = ("conn", "cid", "seq", "last")

    def __init__(self, conn, cid, seq):
        self.conn = conn
        self.cid = cid
        self.seq = seq  # the save number of the HTML the page shows
        self.last = None  # (save number, inner HTML) of the last reply to this view: a diff's base


def _html_diff(old, new):
    """[s1, e1, text1, s2, e2, text2, ...]: `new` is `old` with its characters s to e replaced by
    text, for each hunk (positions in old, in UTF-16 code units as JavaScript counts them); None if
    that is no shorter than `new`. A short changed middle whose tags and words are as many on both
    sides (values changed in place) is split into a hunk per changed run of them."""
    if len(old) + len(new) <= DIFF_FINE and old.isascii() and new.isascii():
        return _ascii_diff(old, new)  # most components' HTML: bytes are characters are code units
    n, a = min(len(old), len(new)), 0
    step = 1 << max(n.bit_length() - 1, 0) if n < 4096 else 4096
    while step:  # the common prefix: chunks while they match, then halves of the one that does not
        if a + step <= n and old[a:a + step] == new[a:a + step]:
            a += step
        else:
            step //= 2
    m, b, lo, hi = n - a, 0, len(old), len(new)
    step = 1 << max(m.bit_length() - 1, 0) if m < 4096 else 4096
    while step:  # the common suffix, within what the prefix left
        if b + step <= m and old[lo - b - step:lo - b] == new[hi - b - step:hi - b]:
            b += step
        else:
            step //= 2
    hunks = _fine_hunks(old, new, a, lo - b, hi - b)
    if _diff_too_long(hunks, 2 * lo, len(new)):
        return None
    out = []
    for s, e, text in hunks:
        out += [len(old[:s].encode("utf-16-le")) // 2, len(old[:e].encode("utf-16-le")) // 2, text]
    return out


def _diff_too_long(hunks, most, length):
    """Whether the hunks as JSON ([s,e,"text",...]) may be as long as the whole HTML as a JSON
    string (`length` characters): each hunk counted with two positions of as many digits as
    `most` (the last a position can be), its quotes and commas, and its text (what the texts'
    escapes add is never more than the whole HTML's escapes add: they are parts of it)."""
    per = 5 + 2 * len(str(most))
    return sum([len(text) for _, _, text in hunks]) + per * len(hunks) + 2 >= length


_DIFF_GAP = bytes(12)  # XOR of two texts: 12 bytes alike end a hunk


def _ascii_diff(old, new):
    """_html_diff of two short ASCII texts, by XOR of their bytes as integers (C loops, no slicing
    search; for long texts the integers cost more than the search): of the same length, a hunk
    per run of changed bytes (unchanged runs of 11 or fewer bytes inside one); else the common
    prefix and suffix, then _fine_hunks in between."""
    ob, nb = old.encode("ascii"), new.encode("ascii")
    lo, hi = len(ob), len(nb)
    if lo == hi:
        xi = int.from_bytes(ob, "big") ^ int.from_bytes(nb, "big")
        x, hunks = xi.to_bytes(lo, "big"), []
        at = lo - 1 - (xi.bit_length() - 1) // 8 if xi else lo  # the first byte that differs
        last = lo - (xi & -xi).bit_length() // 8 if xi else lo  # after the last that differs (an ASCII
        # byte's top bit is 0, so a changed byte's lowest set bit says which byte it is)
        while at < last:
            gap = x.find(_DIFF_GAP, at, last)  # 12 bytes alike: a hunk would cost more than they save
            end = last if gap < 0 else gap
            hunks.append((at, end, new[at:end]))
            rest = xi & ((1 << 8 * (lo - end)) - 1)  # the bytes from `end` on
            at = lo - 1 - (rest.bit_length() - 1) // 8 if rest else lo
        hunks = hunks or [(lo, lo, "")]
    else:
        n = min(lo, hi)
        x = int.from_bytes(ob[:n], "big") ^ int.from_bytes(nb[:n], "big")
        a = n - 1 - (x.bit_length() - 1) // 8 if x else n  # the first byte that differs
        m = n - a
        y = int.from_bytes(ob[lo - m:], "little") ^ int.from_bytes(nb[hi - m:], "little")
        b = m - 1 - (y.bit_length() - 1) // 8 if y else m  # bytes the same at the end, after a
        hunks = _fine_hunks(old, new, a, lo - b, hi - b)
    if _diff_too_long(hunks, lo, hi):
        return None
    out = []
    for s, e, text in hunks:
        out += [s, e, text]
    return out


def _fine_hunks(old, new, a, end_old, end_new):
    """The hunks turning old[a:end_old] into new[a:end_new] (both sides otherwise the same): one,
    or, for a short middle with as many tags and words on both sides, one per changed run."""
    hunks = [(a, end_old, new[a:end_new])]
    if 0 < end_old - a and 0 < end_new - a and (end_old - a) + (end_new - a) <= DIFF_FINE:
        ours, theirs = _HTML_TOKENS.findall(old, a, end_old), _HTML_TOKENS.findall(new, a, end_new)
        if len(ours) == len(theirs):  # values changed in place (the common case): a hunk per changed run
            hunks, at = [], a
            for mine, yours in zip(ours, theirs):
                if mine != yours:
                    if hunks and hunks[-1][1] == at:
                        hunks[-1] = (hunks[-1][0], at + len(mine), hunks[-1][2] + yours)
                    else:
                        hunks.append((at, at + len(mine), yours))
                at += len(mine)
    return hunks


class _Key:
    """A (session, cid) with at least one view in this process."""
    __slots__ = ("sid", "cid", "cls", "views", "topics", "fallback", "jobs", "queued", "timers", "error")

    def __init__(self, sid, cid, cls, fallback):
        self.sid = sid
        self.cid = cid
        self.cls = cls
        self.views = []
        self.topics = ()  # a sorted tuple: lighter than a set, for the few topics a component has
        self.fallback = fallback  # the page's token, while the store has no state for it
        self.jobs = []
        self.queued = False
        self.timers = {}  # method -> its entry in LiveHub._heap
        self.error = None


class _Fallback:
    """A page's StateToken as a _Key keeps it while the store has no state for it: the state as
    its JSON text, parsed each time `state` is read (a fresh copy; a page's parsed state, kept
    for each of a thousand idle pages, costs several times its text)."""
    __slots__ = ("text", "version", "seq")

    def __init__(self, token):
        state = token.state
        self.text = None if state is None else json.dumps(state, ensure_ascii=False, separators=(",", ":"))
        self.version, self.seq = token.version, token.seq

    @property
    def state(self):
        return None if self.text is None else json.loads(self.text)


class _NothingToSave(Exception):
    """Raised inside a store update when the work was already done (by another process)."""


# ═══ 12b. The live protocol: the hub's intake (tokens, messages, joins, views) ════════════════════

# LiveHub is one object written as a chain of three classes, one a part (12b-12d), so that each
# part reads on its own: _LiveIntake, then _LiveApply(_LiveIntake), then LiveHub(_LiveApply).
# Nothing is overridden; a method of an earlier part may call one of a later part through self.
class _LiveIntake:
    """The live protocol (DESIGN §5, §9): every message from a page's socket, every published
    message and every timer tick for a component goes through here.

    Theory of operation. A component is one piece of state per (session, cid), kept in the
    session store as a SavedComponent. A *view* is a page showing it: a LiveConnection (one
    socket, one session, one URL) plus the cid and the save number (`seq`) of what it shows.
    Views live in this process's memory only; no component instance outlives a call.

    1. Parse: a page's message is a join ({join: [[cid, name, token], ...], url, csrf}, sent on
       every (re)connect) or an event ({id, cid, component, state, method, args, csrf}).
       Both are checked (CSRF, signature, method, arguments) before anything runs.
    2. Choose the state: the saved state if there is one (two tabs add up, an old page cannot
       roll it back); else the state signed into the page, unless its save number shows that
       the session has dropped that component since (`dropped` per cid, then one `floor`).
    3. Apply, under the session's lock (SessionStore.update): an event, a published message or
       a timer tick runs once per (session, cid). The last request ids, the number of the last
       message applied from each publishing process, and the last timer period are saved with
       the state, so a resend, another tab or another process finds the work already done.
    4. Render with the URL the page sent in its join, save with the session's next save
       number, sign. A handler or tick that changes nothing saves only that bookkeeping.
    5. Push: the caller gets the reply; this process's other views of that (session, cid) get
       the HTML; the broker tells the other processes (session, cid, seq), and those with views
       re-render from the store. A join is answered with fresh HTML for each view whose page
       shows an older save, so a lost push is repaired by the next (re)connect or event.
    Published messages, ticks and refreshes wait in a FIFO per (session, cid); a few runner
    threads take them in order, one (session, cid) at a time. Timers run on one thread, on
    period boundaries of the wall clock, so processes agree on which period a tick belongs to."""

    def __init__(self, app, broker):
        self.app = app
        self.broker = broker
        self._origin_id = (None, None)  # (the pid it was made in, this process's name in messages)
        self._origin_lock = threading.Lock()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._keys = {}         # (sid, cid) -> _Key
        self._topics = {}       # topic -> {(sid, cid), ...}
        self._ready = collections.deque()
        self._runners = 0
        self._loop_ready = {}   # event loop -> deque of keys of on_loop components waiting there
        self._heap = []         # [due, n, key, method, period, alive]
        self._timer_wake = threading.Condition(self._lock)
        self._timer_thread = None
        self._published = 0
        self._publish_lock = threading.Lock()
        self._subscribed = False
        self._signed = {}  # reference token -> (what it is bound to, its StateToken), the newest last
        self._signed_lock = threading.Lock()

    def _origin(self):
        """This process's name in published messages (a forked child gets its own). One tuple
        read, so a thread never sees the pid of a name another thread is still making (that
        was a server_error on the first events of a `--workers` child, one in ~20,000)."""
        pid, name = self._origin_id
        if pid != _PID[0]:
            with self._origin_lock:
                pid, name = self._origin_id
                if pid != _PID[0]:
                    name = f"{_PID[0]}.{secrets.token_hex(4)}"
                    self._published = 0
                    self._origin_id = (_PID[0], name)
        return name

    # ── tokens ────────────────────────────────────────────────────────
    def sign(self, name, cid, sid, state, version, seq, saved=False, text=None):
        """A state token carrying `state` (with its reference inside when the session has
        `saved` it), or, when `state` is None, just the reference (see StateToken). A component
        the session has not saved gets no reference: its page carries the state, and nothing
        could name a save that does not exist (one HMAC and a lock fewer per such component).
        `text`: the state's compact JSON when the caller has it (readers take keys in any order)."""
        bind, now = f"{name}\0{cid}\0{sid}", int(time.time())
        signer = self.app._state_signer
        if not saved and state is not None:
            return signer.sign('{"s":%s,"v":%d,"q":%d,"t":%d}' % (
                text or _json_compact_sorted(state), version, seq, now), bind=bind)
        ref = signer.sign('{"q":%d,"t":%d,"v":%d}' % (seq, now, version), bind=bind)
        with self._signed_lock:  # the page sends this back with its next event: read() knows it then
            signed = self._signed
            signed[ref] = (bind, StateToken(None, version, seq, now))
            if len(signed) > LIVE_SIGNED_KEPT:
                del signed[next(iter(signed))]
        if state is None:
            return ref
        payload = '{"s":%s,"v":%d,"q":%d,"t":%d,"r":%s}' % (
            _json_compact_sorted(state), version, seq, now, json.dumps(ref))
        return signer.sign(payload, bind=bind)

    @staticmethod
    def _shows_values(component, inner):
        """Whether a page needs the state's values beside the HTML: alive.js sets ws-model
        fields from them, and the forms part writes URL-bound fields into the address."""
        return bool(component.url) or "ws-model" in inner

    def _page_token(self, cls, cid, sid, saved, inner):
        """The token a reply or push carries for `saved` (saved, so a reference suffices)."""
        state = saved.state if self._shows_values(cls, inner) else None
        return self.sign(cls.__name__, cid, sid, state, saved.version, saved.seq, saved=True)

    def read(self, name, cid, sid, token):
        bind = f"{name}\0{cid}\0{sid}"
        known = self._signed.get(token) if isinstance(token, str) else None
        try:
            if known is not None and known[0] == bind:  # a reference this process signed: no HMAC to check
                token = known[1]
            else:
                token = StateToken.from_json(self.app._state_signer.unsign(token, bind=bind))
        except (BadSignature, ValueError, KeyError, TypeError):
            raise LiveError("bad_state", "state signature does not match this component, "
                                         "cid and session (tampered or foreign state)")
        if token.issued + self.app.session_lifetime < time.time():
            raise LiveError("bad_state", "state has expired; reload the page")
        return token

    # ── 1. parse ──────────────────────────────────────────────────────
    def handle(self, conn, text, message=None, wait=True, later=None):
        """One message from a page in (JSON text, or `message` already parsed from it); the
        messages to send back out. Never raises, but for StoreBusy when `wait` is False (then
        nothing was done: the caller hands the message to a thread, which waits). `later`: a
        list to put what an event does once saved and answered (pushes to this process's other
        views, telling the other processes, the method's publishes) for the caller to run with
        run_later() after sending the replies; without it that runs before handle() returns.
        Either way a failure there is logged: the event was saved, and its reply stands."""
        if later is not None:
            return self._handle(conn, text, message, wait, later)
        later = []
        try:
            return self._handle(conn, text, message, wait, later)
        finally:
            self.run_later(later)

    def _handle(self, conn, text, message, wait, later):
        rid = None
        try:
            if message is None:
                try:
                    message = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
                except ValueError as exc:
                    raise LiveError("bad_json", f"message is not JSON: {exc}")
                except RecursionError:
                    raise LiveError("bad_json", "message is nested too deeply to read")
            if not isinstance(message, dict):
                raise LiveError("bad_message", "message must be a JSON object")
            if "join" in message:
                return self._join(conn, message)
            rid = message.get("id")
            if not isinstance(rid, str) or len(rid) > LIVE_MAX_ID:  # an id is echoed only if it is small
                rid = None
                if isinstance(message.get("id"), str):
                    raise LiveError("id_too_long", f"the request id has {len(message['id'])} characters; "
                                                   f"the limit is {LIVE_MAX_ID}")
            return self._event(conn, message, wait, later)
        except StoreBusy:
            raise
        except LiveError as exc:
            log.warning("live event refused: %s: %s", exc.code, exc.message)
            return [_live_error(rid, exc.code, exc.message)]
        except StoreUnavailable as exc:
            log.error("live event not saved: %s", exc)
            return [_live_error(rid, "store_unavailable", f"the session storage is unavailable ({exc.reason}); "
                                                          "the change was not saved, try again")]
        except SessionTooLarge as exc:
            log.warning("live event refused: session_too_large: %s", exc)
            return [_live_error(rid, "session_too_large", f"{exc}; the change was not saved")]
        except Exception as exc:
            log.exception("live event failed")
            detail = _describe(exc) if self.app.debug else "see the server log"
            return [_live_error(rid, "server_error", f"the component raised an error ({detail})")]

    def _check_page(self, sid, csrf):
        if not sid:
            raise LiveError("no_session", "this connection has no session cookie; reload the page")
        if not self.app._csrf_ok(sid, csrf):
            raise LiveError("bad_csrf", "CSRF token missing or invalid for this session; reload the page")

    def _component(self, name):
        cls = self.app.components.get(name)
        if cls is None:
            raise LiveError("unknown_component", f"no component named {name!r}")
        return cls

    def _parse_call(self, sid, message):
        get = message.get
        rid, cid, name, token, method, args, csrf = (
            get("id"), get("cid"), get("component"), get("state"), get("method"), get("args"), get("csrf"))
        if args is None:
            args = []
        if not (rid.__class__ is cid.__class__ is name.__class__ is token.__class__ is method.__class__ is str
                and args.__class__ is list):  # (what json.loads made: exact types; else each is looked at)
            for key, value, kind in (("id", rid, str), ("cid", cid, str), ("component", name, str),
                                     ("state", token, str), ("method", method, str), ("args", args, list)):
                if not isinstance(value, kind):
                    raise LiveError("bad_message", f"field {key!r} must be a {kind.__name__}")
        self._check_page(sid, csrf)
        cls = self._component(name)
        token = self.read(name, cid, sid, token)
        held = message.get("h")
        held = held if _is_int(held) else None
        if method == "$model":
            if len(args) != 2 or not isinstance(args[0], str):
                raise LiveError("bad_args", "$model takes [property, value]")
            if args[0] in cls.locked:
                raise LiveError("locked", f"{name}.{args[0]} is locked: the browser cannot set it "
                                          "(only the component's methods can)")
            # with a reference, a field whose default is None takes its type from the saved
            # state, under the session's lock (see _run_event)
            value = _model_value(cls, args[0], args[1], (token.state or {}).get(args[0]))
            return _LiveCall(rid, cid, cls, token, method, [args[0], value], held)
        if method.startswith("_"):
            raise LiveError("private_method", f"{name}.{method} is private")
        fn = getattr(cls, method, None)
        if fn is None or not callable(fn):
            raise LiveError("unknown_method", f"{name} has no method {method!r}")
        if not getattr(fn, "__asok_exposed__", False):
            raise LiveError("not_exposed", f"{name}.{method} is not @exposed")
        return _LiveCall(rid, cid, cls, token, method, _bind_args(cls, method, args), held)

    def on_loop(self, message):
        """Whether this parsed message is an event to run on the event loop: one of a component
        with `on_loop = True` (or unset, and a method _events_on_loop finds pure), with a local
        store, and no uploaded file among its arguments."""
        name = message.get("component") if isinstance(message, dict) else None
        cls = self.app.components.get(name) if isinstance(name, str) else None
        if cls is None or "join" in message or not isinstance(message.get("method"), str) \
                or not getattr(self.app.sessions, "local", False) or "$upload" in str(message.get("args")):
            return False  # (a method that is not a string is handle()'s bad_message)
        return cls.on_loop is True or (cls.on_loop is None and _events_on_loop(cls, message.get("method")))

    def _event(self, conn, message, wait, later):
        call = self._parse_call(conn.sid, message)
        taken = []  # uploaded files among the arguments: deleted afterwards unless the method saved them
        call.args = self.app._take_uploads(conn.sid, call.cid, call.args, taken)
        try:
            return self._run_event(conn, call, wait, later)
        finally:
            for upload in taken:
                upload.close()

    def _run_event(self, conn, call, wait, later):
        def run(comp, saved):
            page, order = _request_order(call.rid)
            ids = saved.ids if isinstance(saved.ids, dict) else {}
            if order <= ids.get(page, -1):  # a resend: answered with the saved result, not applied again
                return False
            if comp.authorize(call.method, list(call.args)) is False:
                raise LiveError("forbidden", f"{call.cls.__name__}.{call.method} is not allowed")
            if call.method == "$model":
                prop, value = call.args
                if call.token.state is None and call.cls._asok_fields.get(prop) is None:
                    value = _model_value(call.cls, prop, value, getattr(comp, prop, None))
                setattr(comp, prop, value)
            else:
                getattr(comp, call.method)(*call.args)
            ids.pop(page, None)  # the page heard from last goes last; the oldest goes past the limit
            ids[page] = order
            while len(ids) > LIVE_RECENT_PAGES:
                del ids[next(iter(ids))]
            saved.ids = ids
            return True

        view = self._attach(conn, call.cid, call.cls, call.token) if conn.push else None
        saved, inner, outbox, changed = self._commit(conn.sid, call.cid, call.cls, call.token, conn, run,
                                                     always=True, wait=wait)
        diff = None
        if view is not None:
            with self._lock:
                view.seq = max(view.seq, saved.seq)  # the reply brings it
                last, view.last = view.last, (saved.seq, inner)
            if last is not None and call.held == last[0]:  # the page holds that HTML: the change suffices
                diff = _html_diff(last[1], inner)
        token = self._saved_and_pushed(conn.sid, call.cid, call.cls, saved, inner, conn, later)
        self._adopt(conn, inner)
        first = {"id": call.rid, "html": inner, "state": token} if diff is None else {
            "id": call.rid, "d": diff, "state": token}
        replies = [_json_compact(first)]
        for cid, (cls, saved, inner) in changed.items():  # what the emits changed comes with the reply
            with self._lock:
                if cid in conn.views:
                    conn.views[cid].seq = max(conn.views[cid].seq, saved.seq)
            token = self._saved_and_pushed(conn.sid, cid, cls, saved, inner, conn, later)
            self._adopt(conn, inner)
            replies.append(_json_compact({"cid": cid, "html": inner, "state": token}))
        if outbox:
            later.append(functools.partial(self._flush, outbox))
        return replies

    def run_later(self, later):
        """What handle() left in `later`, once its replies are sent."""
        for fn in later:
            try:
                fn()
            except Exception:
                log.exception("live push after an event failed (the event was saved and answered)")

    def _join(self, conn, message):
        """A page (re)connected: its views, and fresh HTML for those that show an older save."""
        items, url = message.get("join"), message.get("url", "/")
        if not isinstance(items, list) or len(items) > LIVE_MAX_JOIN:
            raise LiveError("bad_message", f"join must list at most {LIVE_MAX_JOIN} [cid, component, state]")
        if not isinstance(url, str) or not url.startswith("/") or len(url) > 4096:
            raise LiveError("bad_message", "join url must be the page's path and query, starting with /")
        self._check_page(conn.sid, message.get("csrf"))
        conn.path, _, conn.query_string = url.partition("?")
        out, joined = [], []
        for item in items:
            cid = item[0] if isinstance(item, list) and item and isinstance(item[0], str) else None
            try:
                if cid is None or len(item) != 3 or not all(isinstance(x, str) for x in item):
                    raise LiveError("bad_message", "each joined component is [cid, component, state]")
                cls = self._component(item[1])
                joined.append((self._attach(conn, cid, cls, self.read(item[1], cid, conn.sid, item[2])), cls))
            except LiveError as exc:
                log.warning("live join refused: %s: %s", exc.code, exc.message)
                out.append(json.dumps({"cid": cid, "error": {"code": exc.code, "message": exc.message}},
                                      separators=(",", ":")))
        # read after the views are registered: a save from now on is pushed to them, one before is here
        live = (self.app.sessions.load(conn.sid) or {}).get("live") or {}
        for view, cls in joined:
            saved = SavedComponent.load(live.get(view.cid), cls.__name__)
            if saved is not None and saved.seq > view.seq:
                message = self._render_push(conn.sid, view.cid, cls, saved, conn)
                with self._lock:
                    if saved.seq > view.seq:
                        view.seq = saved.seq
                        out.append(message)
        return out

    # ── views ─────────────────────────────────────────────────────────
    def _attach(self, conn, cid, cls, token):
        """The view of `cid` on `conn`, registered (with its topics and timers) if it is new."""
        view = conn.views.get(cid)
        if view is not None:
            return view
        if conn.push is None:  # nobody to push to (app.live_event): answered, not kept
            return _View(conn, cid, token.seq)
        if len(conn.views) >= LIVE_MAX_JOIN:
            raise LiveError("bad_message", f"a page may show at most {LIVE_MAX_JOIN} live components")
        self._subscribe()
        state = token.state
        saved = SavedComponent.load((self.app.sessions.load(conn.sid) or {}).get("live", {}).get(cid), cls.__name__)
        if saved is not None:
            state = saved.state
        elif state is None:  # a reference to a state the session no longer holds
            raise LiveError("bad_state", "this page's state is older than what the session keeps; "
                                         "reload the page")
        topics = self._topics_of(cls, state)
        with self._lock:
            view = conn.views[cid] = _View(conn, cid, token.seq)
            key = self._keys.get((conn.sid, cid))
            if key is None or key.cls is not cls:
                key = self._keys[(conn.sid, cid)] = _Key(conn.sid, cid, cls, _Fallback(token))
                self._retopic(key, topics)
                for method, period in cls._asok_every:
                    self._start_timer(key, method, period)
            key.views.append(view)
            if token.seq > key.fallback.seq:
                key.fallback = _Fallback(token)
        return view

    def leave(self, conn):
        """The page closed: its views go; a (session, cid) with no view left stops its timers."""
        with self._lock:
            for cid, view in conn.views.items():
                key = self._keys.get((conn.sid, cid))
                if key is None or view not in key.views:
                    continue
                key.views.remove(view)
                if not key.views:
                    del self._keys[(key.sid, key.cid)]
                    self._retopic(key, ())
                    for entry in key.timers.values():
                        entry[5] = False
                    key.timers.clear()
            conn.views = {}

    def _topics_of(self, cls, state):
        topics = set()
        for template, _ in cls._asok_on:
            try:
                topics.add(template.format_map(state))
            except (KeyError, IndexError, AttributeError, ValueError) as exc:
                raise LiveError("bad_topic", f"@on({template!r}) of {cls.__name__} cannot be formatted "
                                             f"from its state: {exc!r}")
        return tuple(sorted(topics))

    def _retopic(self, key, topics):
        """Move `key` from its topics to `topics` (called with the lock held)."""
        for topic in set(key.topics) - set(topics):
            keys = self._topics.get(topic)
            if keys is not None:
                keys.discard((key.sid, key.cid))
                if not keys:
                    del self._topics[topic]
        for topic in set(topics) - set(key.topics):
            self._topics.setdefault(topic, set()).add((key.sid, key.cid))
        key.topics = topics

    def stats(self):
        """{"views": views open in this process, "timers": timers running for them}."""
        with self._lock:
            return {"views": sum(len(k.views) for k in self._keys.values()),
                    "timers": sum(len(k.timers) for k in self._keys.values())}


# ═══ 12c. The live protocol: choose the state, apply, render, save, push ══════════════════════════

class _LiveApply(_LiveIntake):
    """LiveHub, steps 2 to 5 (see _LiveIntake): an event, message or tick applied under the
    session's lock, rendered, saved, and pushed to the views of its (session, cid)."""

    def _commit(self, sid, cid, cls, fallback, conn, run, always=False, wait=True):
        """Apply `run(comp, saved)` to the (session, cid) under the store's lock, and the @on
        handlers on the same page of what it emits; returns (saved, inner HTML or None when
        nothing changed, deferred publishes, {cid: (cls, saved, inner)} the emits changed).
        With wait=False a held lock raises StoreBusy before anything runs (SessionStore.local)."""
        result = []

        def apply(record):
            saved, inner, outbox, emits = self._apply(record, sid, cid, cls, fallback, conn, run, always)
            result[:] = saved, inner, outbox, self._emitted(record, sid, cid, conn, emits, outbox)

        if wait:
            self.app.sessions.update(sid, apply)
        else:
            self.app.sessions.update(sid, apply, wait=False)
        return result

    def _apply(self, record, sid, cid, cls, fallback, conn, run, always):
        name = cls.__name__
        if record.get("replaced"):
            raise LiveError("no_session", "this session was replaced (a sign-in); reload the page")
        if self.app._checked_record(record, sid) is None:
            record.clear()
        live = record.setdefault("live", {})
        dropped = record.setdefault("dropped", {})
        saved = SavedComponent.load(live.get(cid), name)
        if saved is None:
            if fallback is None or fallback.state is None or fallback.seq <= dropped.get(cid, -1) \
                    or fallback.seq < record.get("floor", 0):
                raise LiveError("bad_state", "this page's state is older than what the session keeps; "
                                             "reload the page")
            saved = SavedComponent(name, fallback.state, fallback.version, fallback.seq)
        before = None if always else _json_compact(saved.state)  # an event always saves
        session = Session(record.get("data"), sid)
        session.live = live
        session.seq = record.get("seq", 0)
        comp = self._restore(cls, saved.state, session, sid, cid, conn)
        comp._asok_outbox, comp._asok_emits = outbox, emits = [], []
        ran = run(comp, saved)
        if ran is None:
            raise _NothingToSave()
        if session.previous_sid:
            raise RuntimeError("session.regenerate() needs an HTTP response to set the new cookie: "
                               "call it in a route or a page (the sign-in POST), not in a live event")
        if session.cleared:
            _clear_live(record, session.seq)
            live, dropped = record["live"], record["dropped"]
        state, text = comp._checked_state_json()
        # the same JSON as before it ran: unchanged (a state's keys keep their order, the class's
        # fields first; a dict whose keys only changed order counts as changed, and is saved)
        changed = ran and (always or session.modified or text != before)
        inner = None
        if changed or always:
            saved.version += 1 if ran else 0
            inner = str(comp.render())
            # Every save that changes the component gets the session's next save number, carried
            # by the tokens it issues. A state dropped past the limit leaves its number in
            # `dropped`: tokens for that cid up to it are refused, so replaying an old page never
            # brings a dropped state back (a fresh render afterwards gets a higher number). Past
            # LIVE_MAX_DROPPED, the oldest entries fold into one session-wide floor.
            saved.seq = record["seq"] = record.get("seq", 0) + 1
        saved.state = state
        live.pop(cid, None)  # newest last, so the oldest component goes first past the limit
        dropped.pop(cid, None)
        live[cid] = saved.dump()
        while len(live) > LIVE_MAX_PER_SESSION:
            gone = next(iter(live))
            dropped[gone] = live.pop(gone).get("q", 0)
        while len(dropped) > LIVE_MAX_DROPPED:
            record["floor"] = max(record.get("floor", 0), dropped.pop(next(iter(dropped))))
        if session.modified:
            record["data"] = dict(session)
        return saved, inner, outbox, emits

    def _emitted(self, record, sid, origin, conn, emits, outbox):
        """The @on(event) handlers of the other components on `conn`'s page, run in `record` for
        each (event, payload) emitted, in order, then for what they emit in turn; each is saved
        as an event is. Returns {cid: (cls, saved, inner)} of those that changed."""
        if not emits:
            return {}
        with self._lock:
            keys = [self._keys.get((sid, cid)) for cid in conn.views]
        page = [key for key in keys if key is not None and key.cls._asok_on]
        queue, changed, runs = collections.deque((origin, event) for event in emits), {}, 0
        while queue:
            sender, (event, data) = queue.popleft()
            for key in page:
                raw = record.get("live", {}).get(key.cid)
                state = collections.defaultdict(str, raw["s"] if raw and raw.get("c") == key.cls.__name__
                                                else key.fallback.state)
                methods = [m for t, m in key.cls._asok_on if t.format_map(state) == event]
                if key.cid == sender or not methods:
                    continue
                runs += 1
                if runs > LIVE_MAX_EMITS:
                    raise LiveError("emit_loop", f"emit({event!r}) would run a {LIVE_MAX_EMITS + 1}th @on handler "
                                                 "in one round trip: components that emit back and forth never stop")

                def run(comp, saved, methods=methods, data=data):
                    for method in methods:
                        getattr(comp, method)(json.loads(data))  # each handler its own copy
                    return True
                saved, inner, more, emitted = self._apply(record, sid, key.cid, key.cls, key.fallback, conn, run, False)
                outbox.extend(more)
                queue.extend((key.cid, event) for event in emitted)
                if inner is not None:
                    changed[key.cid] = (key.cls, saved, inner)
        return changed

    def _restore(self, cls, state, session, sid, cid, conn):
        request = _LiveContext(self.app, session, sid, conn)
        return cls._restore(self.app, state, session, cid, self.app._context(request, cid))

    def _render_push(self, sid, cid, cls, saved, conn):
        """A push of `saved` rendered for `conn`'s page, outside any lock (nothing is saved)."""
        session = self.app._load_session(sid)
        inner = str(self._restore(cls, saved.state, session, sid, cid, conn).render())
        token = self._page_token(cls, cid, sid, saved, inner)
        self._adopt(conn, inner)
        return _json_compact({"cid": cid, "html": inner, "state": token})

    def _adopt(self, conn, inner):
        """Components nested in HTML on its way to a page are views of that page too: a parent's
        re-render can add children that the page's join did not list."""
        if conn.push is None or "data-asok-component" not in inner:
            return
        for cid, name, token in _find_components(inner):
            cls = self.app.components.get(name)
            if cid in conn.views or cls is None:
                continue
            try:
                self._attach(conn, cid, cls, self.read(name, cid, conn.sid, token))
            except LiveError as exc:
                log.warning("nested component %s not followed: %s", cid, exc.message)

    # ── 5. push ───────────────────────────────────────────────────────
    def _saved_and_pushed(self, sid, cid, cls, saved, inner, rendered_for, later=None):
        """After a save that changed (sid, cid): its topics follow its state, this process's
        views get the new HTML, the other processes hear of the save (then, or put in `later`).
        Returns the new token."""
        token = self._page_token(cls, cid, sid, saved, inner or "")
        if later is None:
            self._pushed(sid, cid, cls, saved, inner, token, rendered_for)
        else:
            later.append(functools.partial(self._pushed, sid, cid, cls, saved, inner, token, rendered_for))
        return token

    def _pushed(self, sid, cid, cls, saved, inner, token, rendered_for):
        if cls._asok_on:
            try:
                topics = self._topics_of(cls, saved.state)
            except LiveError as exc:  # the change is saved; the component keeps its topics
                log.warning("%s keeps its topics: %s", cid, exc.message)
            else:
                with self._lock:
                    key = self._keys.get((sid, cid))
                    if key is not None:
                        self._retopic(key, topics)
        self._push_local(sid, cid, cls, saved, inner, token, rendered_for)
        self.broker.publish(('{"o":"%s","c":%s}' % (self._origin(), _json_compact([sid, cid, saved.seq]))).encode())

    def _push_local(self, sid, cid, cls, saved, inner=None, token=None, rendered_for=None):
        """Push `saved` to every view of (sid, cid) in this process whose page shows an older
        save: the HTML already rendered for `rendered_for`'s URL, or rendered for the view's."""
        with self._lock:
            key = self._keys.get((sid, cid))
            views = [v for v in key.views if v.seq < saved.seq] if key else []
        made = {}
        if inner is not None and rendered_for is not None and views:
            made[(rendered_for.path, rendered_for.query_string)] = _json_compact(
                {"cid": cid, "html": inner, "state": token})
        for view in views:
            url = (view.conn.path, view.conn.query_string)
            if url not in made:
                made[url] = self._render_push(sid, cid, cls, saved, view.conn)
            elif inner is not None:
                self._adopt(view.conn, inner)
            with self._lock:
                if view.seq < saved.seq:  # another thread may have pushed a newer one meanwhile
                    view.seq = saved.seq
                    view.last = None  # the page's next event gets the whole HTML
                    view.conn.push(cid, made[url])


# ═══ 12d. The live protocol: published messages, the queue per component, timers ══════════════════

class LiveHub(_LiveApply):
    """The live protocol's hub, one per app (`app.live`): _LiveIntake (12b) takes what pages
    send, _LiveApply (12c) applies and pushes it, and this class carries published messages,
    the FIFO per (session, cid) with its runner threads, and the timers."""

    def publish(self, topic, payload=None):
        """Send `payload` to every component with an @on for `topic` that has a view open, in
        every process serving this app. Callable from any thread or coroutine; never blocks long."""
        self._send(self.encode(topic, payload))

    def encode(self, topic, payload):
        if not isinstance(topic, str) or not topic:
            raise TypeError(f"publish() takes a topic str, not {type(topic).__name__}")
        _check_json_safe(payload, f"the payload published to {topic!r}")
        try:
            data = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        except ValueError:
            raise ValueError(f"the payload published to {topic!r} holds NaN or Infinity, which JSON cannot carry")
        if len(data) + len(topic) > LIVE_MAX_PUBLISH:
            raise ValueError(f"the payload published to {topic!r} is {len(data)} bytes of JSON; "
                             f"the limit is {LIVE_MAX_PUBLISH}")
        return topic, data

    def _send(self, encoded):
        topic, data = encoded
        with self._publish_lock:  # numbers go out in order: receivers apply them in order
            origin = self._origin()
            self._published += 1
            message = '{"t":%s,"o":"%s","n":%d,"p":%s}' % (json.dumps(topic), origin, self._published, data)
            self.broker.publish(message.encode())

    def _flush(self, outbox):
        for encoded in outbox:
            self._send(encoded)

    def _subscribe(self):
        if not self._subscribed:
            self._subscribed = True
            self.broker.subscribe(self._received)

    def _received(self, data):
        """A broker message (any thread): a publish, or another process's save."""
        if data.startswith(b'{"o":"%s"' % self._origin().encode()):
            return  # this process's own save: its views have it already
        try:
            message = json.loads(data)
            if "t" in message:
                topic, origin, n, payload = message["t"], message["o"], message["n"], message["p"]
                with self._lock:
                    keys = [self._keys[k] for k in self._topics.get(topic, ()) if k in self._keys]
                    for key in keys:
                        self._enqueue(key, ("message", topic, origin, n, payload))
            else:
                sid, cid, seq = message["c"]
                with self._lock:
                    key = self._keys.get((sid, cid))
                    if key is not None and any(v.seq < seq for v in key.views):
                        self._enqueue(key, ("refresh",))
        except (ValueError, KeyError, TypeError):
            log.error("the broker delivered a malformed message: %r", data[:200])

    # ── the queue per (session, cid) and its runners ──────────────────
    def _enqueue(self, key, job):
        """Called with the lock held."""
        if self._loop_ready:
            self._loop_work()  # what waits for a loop that closed meanwhile goes to the runners
        if len(key.jobs) >= LIVE_MAX_PENDING:
            log.warning("%s: %d messages already wait for this component; one is dropped", key.cid, len(key.jobs))
            return
        if job[0] != "message" and any(j[:2] == job[:2] for j in key.jobs):
            return  # a tick or a refresh already waits
        key.jobs.append(job)
        if not key.queued:
            key.queued = True
            loop = self._loop_of(key)
            if loop is not None:  # on_loop = True: applied on the loop of its page's socket
                ready = self._loop_ready.get(loop)
                if ready is None:
                    ready = self._loop_ready[loop] = collections.deque()
                    _LoopInbox.of(loop).put(self, self._run_on_loop, loop)
                ready.append(key)
                return
            self._to_runners(key)

    def _to_runners(self, key):
        """Called with the lock held: `key` (queued) waits for a runner thread."""
        self._ready.append(key)
        if self._runners < LIVE_RUNNERS:
            self._runners += 1
            self.app.executor.submit(self._run)

    def _loop_of(self, key):
        """Called with the lock held: the event loop of the socket of `key`'s first view, when
        the component says `on_loop = True` and the store is local; else None (a thread)."""
        if key.cls.on_loop is not True or not key.views or not getattr(self.app.sessions, "local", False):
            return None
        outbox = getattr(key.views[0].conn.push, "__self__", None)
        loop = getattr(outbox, "loop", None) if isinstance(outbox, _LiveOutbox) else None
        return None if loop is None or loop.is_closed() else loop

    def _run_on_loop(self, loop):
        """On `loop`: the queued jobs of on_loop components whose pages it serves, in turns of
        LIVE_LOOP_TURN, so a publish to a thousand views lets the loop serve sockets between
        them. A job whose session lock is held goes to a runner thread (the loop never waits
        for a lock), and the rest of its (session, cid)'s jobs after it."""
        for _ in range(LIVE_LOOP_TURN):
            with self._lock:
                ready = self._loop_ready.get(loop)
                if not ready:
                    self._loop_ready.pop(loop, None)
                    self._idle.notify_all()
                    return
                key = ready.popleft()
                job = key.jobs.pop(0)
            try:
                self._attempt(key, job, wait=False)
            except StoreBusy:
                with self._lock:
                    key.jobs.insert(0, job)
                    self._to_runners(key)
                continue
            with self._lock:
                if key.jobs:
                    ready.append(key)
                else:
                    key.queued = False
        loop.call_soon(self._run_on_loop, loop)

    def _loop_work(self):
        """Called with the lock held: whether jobs wait for an event loop that still runs (those
        waiting for a loop closed meanwhile, a server stopped with jobs queued, go to the runners)."""
        for loop in [loop for loop in self._loop_ready if loop.is_closed()]:
            for key in self._loop_ready.pop(loop):
                self._to_runners(key)
        return bool(self._loop_ready)

    def _run(self):
        while True:
            with self._lock:
                if not self._ready:
                    self._runners -= 1
                    self._idle.notify_all()
                    return
                key = self._ready.popleft()
                job = key.jobs.pop(0)
            self._attempt(key, job)
            with self._lock:
                if key.jobs:
                    self._ready.append(key)
                else:
                    key.queued = False

    def _attempt(self, key, job, wait=True):
        """Apply one job of `key`; a refusal goes to its pages, anything else to the log (with
        wait=False, StoreBusy is raised before anything ran)."""
        try:
            self._do(key, job, wait)
        except LiveError as exc:
            self._refused(key, exc)
        except StoreUnavailable as exc:
            self._refused(key, LiveError("store_unavailable", f"the session storage is unavailable "
                                                              f"({exc.reason}); a live update was not saved"))
        except SessionTooLarge as exc:
            self._refused(key, LiveError("session_too_large", f"{exc}; a live update was not saved"))
        except StoreBusy:
            raise
        except Exception:
            log.exception("%s of %s (%s) failed", job[0], key.cls.__name__, key.cid)
        else:
            key.error = None

    def _do(self, key, job, wait=True):
        """Apply one queued job of `key`: ("message", topic, origin, n, payload), ("tick",
        method, slot) or ("refresh",)."""
        sid, cid, cls = key.sid, key.cid, key.cls
        with self._lock:
            if not key.views:
                return
            conn = key.views[0].conn
        kind = job[0]
        if kind == "message":
            _, topic, origin, n, payload = job

            def run(comp, saved):
                if saved.heard.get(origin, 0) >= n:  # another process applied it
                    return None
                state = collections.defaultdict(str, saved.state)
                for template, method in cls._asok_on:
                    if template.format_map(state) == topic:
                        getattr(comp, method)(payload)
                saved.heard.pop(origin, None)
                saved.heard[origin] = n
                while len(saved.heard) > LIVE_ORIGINS_KEPT:
                    del saved.heard[next(iter(saved.heard))]
                return True
        elif kind == "tick":
            _, method, slot = job

            def run(comp, saved):
                last = saved.ticks.get(method, -1)
                if last >= slot and last - slot <= LIVE_CLOCK_SLACK:  # done here or elsewhere (or the clock went back)
                    return None
                getattr(comp, method)()
                saved.ticks[method] = slot
                return True
        else:
            run = None
        try:
            if run is None:
                raise _NothingToSave()
            saved, inner, outbox, changed = self._commit(sid, cid, cls, key.fallback, conn, run, wait=wait)
        except _NothingToSave:  # views that missed what another process saved get it
            raw = ((self.app.sessions.load(sid) or {}).get("live") or {}).get(cid)
            saved = SavedComponent.load(raw, cls.__name__)
            if saved is not None:
                self._push_local(sid, cid, cls, saved)
            return
        if inner is not None:
            self._saved_and_pushed(sid, cid, cls, saved, inner, conn)
        for other, (other_cls, other_saved, other_inner) in changed.items():
            self._saved_and_pushed(sid, other, other_cls, other_saved, other_inner, conn)
        self._flush(outbox)

    def _refused(self, key, exc):
        """A message or tick was refused (its state was dropped, say): the pages hear of it once."""
        log.warning("live update refused for %s: %s: %s", key.cid, exc.code, exc.message)
        if key.error == exc.code:
            return
        key.error = exc.code
        text = json.dumps({"cid": key.cid, "error": {"code": exc.code, "message": exc.message}}, separators=(",", ":"))
        with self._lock:
            for view in key.views:
                view.conn.push(key.cid, text)

    def settle(self, timeout=5.0):
        """Wait until every queued message and tick of this process has been applied (tests)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._loop_work() or self._ready or self._runners:  # (first: it may start runners)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"live updates still running after {timeout} s")
                self._idle.wait(left)

    # ── timers ────────────────────────────────────────────────────────
    def _start_timer(self, key, method, period):
        """Called with the lock held: tick `method` of `key` at each multiple of `period`."""
        due = (math.floor(time.time() / period) + 1) * period
        entry = [due, id(key) ^ hash(method), key, method, period, True]
        key.timers[method] = entry
        heapq.heappush(self._heap, entry)
        if self._timer_thread is None:
            self._timer_thread = threading.Thread(target=self._tick_loop, name="asok-timers", daemon=True)
            self._timer_thread.start()
        self._timer_wake.notify()

    def _tick_loop(self):
        with self._lock:
            while True:
                while self._heap and not self._heap[0][5]:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._timer_wake.wait()
                    continue
                entry = self._heap[0]
                left = entry[0] - time.time()
                if left > 0:
                    self._timer_wake.wait(left)
                    continue
                heapq.heappop(self._heap)
                due, _, key, method, period, _ = entry
                slot = round(due / period)
                entry[0] = max(due + period, (math.floor(time.time() / period) + 1) * period)
                heapq.heappush(self._heap, entry)
                self._enqueue(key, ("tick", method, slot))


# ═══ 13. Brokers: how the processes serving one app reach each other (DESIGN §9, §11) ═════════════

BROKER_SEND_TIMEOUT = 1.0   # a process that does not take a datagram within this loses it (logged)
BROKER_QUEUE = 4096         # datagrams waiting to be sent; past it publish() drops and logs
BROKER_GATHER = 0.005       # the sender waits this long after a message for others to share its datagram
BROKER_MAX_DATAGRAM = LIVE_MAX_PUBLISH + 1024
BROKER_SWEEP_AGE = 60.0     # a broker folder under the temporary folder unchanged this long is swept
BROKER_SWEEP_MAX = 64       # folders a process looks at when it starts, at most
_BROKER_SOCKET_RE = re.compile(r"\d+\.[0-9a-f]{6}\Z")  # FolderBroker's socket names: pid.random


class Broker:
    """Carries live messages between the processes serving one app. A message is bytes (JSON,
    at most BROKER_MAX_DATAGRAM). Two methods, so another transport (Redis pub/sub, say) is a
    small class:

    - `publish(data)`: hand `data` to the subscriber of every process, this one included
      (which may be called in the caller's thread). It must not block for long: it is called
      from request threads and from the event loop.
    - `subscribe(callback)`: from now on, call `callback(data)` for each message, from any
      thread; the callback does not block.

    A broker may lose a message (a process that stopped reading, a full queue): asok repairs
    what that costs a page on its next join or event, since every view re-renders from the
    session store; only a published payload that never arrives is not applied there."""

    def publish(self, data: bytes) -> None:
        """Hand `data` to the subscriber of every process, this one included (see the class)."""
        raise NotImplementedError

    def subscribe(self, callback: Callable[[bytes], Any]) -> None:
        """Call `callback(data)` for each message from now on, from any thread."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush what is queued and let go of sockets and threads (at exit, or in tests)."""


class FolderBroker(Broker):
    """The default: every process serving one app folder binds a Unix datagram socket in one
    folder (`.asok/live/` in the app folder; when that path is too long for a socket address,
    a folder named after the app folder's path under the system temporary folder). publish()
    delivers to this process's subscriber directly and sends a datagram to every other socket
    there, from one sender thread, in order. A socket whose process died is removed by the first
    sender that finds nobody listening. Both folders are mode 0700 and must belong to this user:
    whoever can write to them can publish."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._callback = None
        self._lock = threading.Lock()
        self._recv = None      # the bound socket, read by the receiver thread
        self._send = None      # an unbound socket for sending, with a timeout
        self._path = None
        self._queue = None
        self._peers = (None, ())  # (the folder's mtime when listed, the other processes' socket paths)
        self._closed = False
        self._pid = None
        self._folder_fd = None  # the folder, open: its mtime is read per message without a path lookup

    def __repr__(self):
        return f"<FolderBroker {self.folder}>"

    def _open(self):
        """Called with the lock held: make the folder, bind, start the threads (once per process:
        a child forked after this has none of the threads, so it gets its own socket)."""
        if self._send is not None and self._pid == _PID[0]:
            return
        if self._folder_fd is not None and self._folder_fd >= 0:  # the parent's, inherited by a fork
            with contextlib.suppress(OSError):
                os.close(self._folder_fd)
            self._folder_fd = None  # (its number may soon be another file's)
        self._recv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._path = f"{self.folder}/{os.getpid()}.{secrets.token_hex(3)}"
        for attempt in range(3):
            try:
                _private_folder(self.folder)
                self._recv.bind(self._path)
                break
            except FileNotFoundError:  # the last process to leave removed the empty folder meanwhile
                if attempt == 2:
                    raise
        self._folder_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.settimeout(BROKER_SEND_TIMEOUT)
        self._queue = queue.Queue(BROKER_QUEUE)
        threading.Thread(target=self._receive_loop, args=(self._recv,), name="asok-broker-in", daemon=True).start()
        threading.Thread(target=self._send_loop, name="asok-broker-out", daemon=True).start()
        atexit.register(self.close)
        self._pid = _PID[0]  # last: publish() skips the lock once this says the process's sockets are made

    def subscribe(self, callback: Callable[[bytes], Any]) -> None:
        with self._lock:
            self._callback = callback
            self._open()

    def publish(self, data: bytes) -> None:
        if len(data) > BROKER_MAX_DATAGRAM:
            raise ValueError(f"a broker message is at most {BROKER_MAX_DATAGRAM} bytes, not {len(data)}")
        if self._send is None or self._pid != _PID[0]:
            with self._lock:
                self._open()
        callback = self._callback
        if callback is not None:
            callback(data)
        if self._others():
            try:
                self._queue.put_nowait(data)
            except queue.Full:
                log.error("the broker's send queue is full (%d messages); a message is dropped", BROKER_QUEUE)

    def _others(self):
        """The other processes' sockets, listed again when the folder changes (a process came or
        went): one stat per message, so a process that just started is never missed."""
        try:
            stamp = os.stat(self._folder_fd).st_mtime_ns
        except OSError:
            return ()
        listed, peers = self._peers
        if stamp != listed or time.time_ns() - stamp < 50_000_000:  # a folder's mtime ticks coarsely
            # (a few ms): right after a change, another one may not have moved it yet
            mine = os.path.basename(self._path)
            try:
                peers = tuple(f"{self.folder}/{name}" for name in os.listdir(self.folder) if name != mine)
            except OSError:  # the folder went (this process is closing): nobody to tell
                return ()
            self._peers = (stamp, peers)
        return peers

    def _send_loop(self):
        """Sends what waits, several messages to a datagram (one per line: a message is JSON,
        which has no raw newline), so a busy process wakes its peers once per batch, not once
        per save."""
        if self.folder.parent == Path(tempfile.gettempdir()):
            try:
                _sweep_broker_folders(self.folder)
            except Exception:  # tidying up after others never stops this process's messages
                log.exception("sweeping old live broker folders failed")
        waiting = self._queue.get()
        while waiting is not None:  # None: close() was called
            time.sleep(BROKER_GATHER)  # what comes meanwhile goes in the same datagram
            batch, size, waiting = [waiting], len(waiting), ...
            while waiting is ...:
                try:
                    data = self._queue.get_nowait()
                except queue.Empty:
                    break
                if data is None or size + 1 + len(data) > BROKER_MAX_DATAGRAM:
                    waiting = data  # the next batch starts with it (or the loop ends)
                else:
                    batch.append(data)
                    size += 1 + len(data)
            self._send_batch(b"\n".join(batch))
            if waiting is ...:
                waiting = self._queue.get()

    def _send_batch(self, data):
        for path in self._others():
            try:
                self._send.sendto(data, path)
            except (ConnectionRefusedError, FileNotFoundError):
                try:  # nobody listens there: a process that died without cleaning up
                    os.unlink(path)
                except OSError:
                    pass
            except OSError as exc:  # a timeout: that process stopped reading
                log.error("live message to %s dropped: %s", path, exc)

    def _receive_loop(self, sock):
        while True:
            try:
                data = sock.recv(BROKER_MAX_DATAGRAM)
            except OSError:
                return
            callback = self._callback
            for message in data.split(b"\n") if callback is not None else ():
                try:
                    callback(message)
                except Exception:
                    log.exception("the live broker's subscriber failed")

    def close(self) -> None:
        with self._lock:
            if self._send is None or self._closed or self._pid != _PID[0]:
                return  # (a forked child's atexit: the socket and the folder are its parent's)
            self._closed = True
        try:
            self._queue.put(None, timeout=BROKER_SEND_TIMEOUT)
        except queue.Full:
            pass
        try:
            os.unlink(self._path)
        except OSError:
            pass
        with contextlib.suppress(OSError):  # the last process to leave takes the folder with it
            os.rmdir(self.folder)  # (one under the temporary folder would stay there otherwise)
        self._recv.close()
        fd, self._folder_fd = self._folder_fd, -1  # -1: an fstat that fails, never another file's
        with contextlib.suppress(OSError):
            os.close(fd)


class RedisBroker(Broker):
    """Live messages over Redis pub/sub, for processes on several machines (DESIGN §11).
    `client` is one the user builds (redis-py's `redis.Redis`); asok needs its `publish` and
    `pubsub`. Each process keeps one subscription to `channel`, read by one thread that hands
    every message to this process's views; publish() delivers to this process directly and
    queues the message for one sender thread, so a slow or absent Redis never blocks a request
    or the event loop. A message this process sent comes back from Redis and is skipped by
    its prefix. While Redis is down, messages to other processes are lost (logged) and the
    subscription is retried every RETRY seconds; views catch up on their next join or event."""

    RETRY = 1.0

    def __init__(self, client: Any, channel: str = "asok:live") -> None:
        self.client = client
        self.channel = channel
        self._me = secrets.token_hex(8).encode() + b" "
        self._callback = None
        self._queue = queue.Queue(BROKER_QUEUE)
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    def __repr__(self):
        return f"<RedisBroker {self.channel} on {self.client!r}>"

    def _start(self):
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._receive_loop, name="asok-redis-in", daemon=True).start()
        threading.Thread(target=self._send_loop, name="asok-redis-out", daemon=True).start()

    def subscribe(self, callback: Callable[[bytes], Any]) -> None:
        self._callback = callback
        self._start()

    def publish(self, data: bytes) -> None:
        if len(data) > BROKER_MAX_DATAGRAM:
            raise ValueError(f"a broker message is at most {BROKER_MAX_DATAGRAM} bytes, not {len(data)}")
        self._start()
        callback = self._callback
        if callback is not None:
            callback(data)
        try:
            self._queue.put_nowait(self._me + data)
        except queue.Full:
            log.error("Redis broker: %d messages wait to be sent; a message is dropped", BROKER_QUEUE)

    def _send_loop(self):
        while (data := self._queue.get()) is not None:
            try:
                self.client.publish(self.channel, data)
            except Exception as exc:  # whatever the client raises while Redis is away
                log.error("Redis broker: a live message to the other processes is lost (%s: %s)",
                          type(exc).__name__, exc)

    def _receive_loop(self):
        while not self._closed:
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while not self._closed:
                    message = pubsub.get_message(timeout=self.RETRY)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message["data"]
                    data = data.encode() if isinstance(data, str) else data
                    if data.startswith(self._me):
                        continue
                    callback = self._callback
                    if callback is not None:
                        try:
                            callback(data.partition(b" ")[2])
                        except Exception:
                            log.exception("the live broker's subscriber failed")
            except Exception as exc:
                if self._closed:
                    return
                log.error("Redis broker: subscription lost (%s: %s); retrying in %g s",
                          type(exc).__name__, exc, self.RETRY)
                time.sleep(self.RETRY)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)


def _live_folder(root):
    """Where the folder broker's sockets go: .asok/live, or a short folder when that is too long
    for a Unix socket address (108 bytes on Linux, 104 on macOS)."""
    folder = root / ".asok" / "live"
    if len(os.fsencode(str(folder))) > 80:
        digest = hashlib.sha256(os.fsencode(str(root))).hexdigest()[:16]
        folder = Path(tempfile.gettempdir(), f"asok-{os.getuid()}-{digest}")
    return folder


def _sweep_broker_folders(mine):
    """What killed processes left in the temporary folder (a process killed with SIGKILL never
    closes its broker, and an app whose folder has a long path has its socket there: a test run
    makes hundreds of such apps): in each other asok-<uid>-* folder there, unchanged for
    BROKER_SWEEP_AGE, the sockets nobody listens on go, then the folder if that empties it. A
    folder holding anything but such sockets is left alone. A process binding in a folder
    removed meanwhile makes it again (FolderBroker._open)."""
    prefix, uid, old = f"asok-{os.getuid()}-", os.getuid(), time.time() - BROKER_SWEEP_AGE
    with os.scandir(mine.parent) as entries:
        folders = [entry.path for entry in entries if entry.name.startswith(prefix) and entry.name != mine.name]
    random.shuffle(folders)  # (more than BROKER_SWEEP_MAX that stay, live ones: the others get their turn)
    for folder in folders[:BROKER_SWEEP_MAX]:
        try:
            st = os.lstat(folder)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mtime > old:
                continue
            names = os.listdir(folder)
            if not all(_BROKER_SOCKET_RE.match(name) and stat.S_ISSOCK(os.lstat(f"{folder}/{name}").st_mode)
                       for name in names):
                continue
            listening = 0
            for name in names:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                    try:
                        probe.connect(f"{folder}/{name}")  # (a datagram socket's connect sends nothing)
                        listening += 1
                    except ConnectionRefusedError:
                        os.unlink(f"{folder}/{name}")
            if not listening:
                os.rmdir(folder)
        except OSError:  # gone meanwhile, or another process's: left as it is
            continue


def _private_folder(folder):
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{folder} must be a folder of this user with mode 0700 "
                           "(processes of the app publish to each other through it)")


# ═══ 14a. The application: setup and registration ═════════════════════════════════════════════════

ALIVE_JS = Path(__file__).with_name("alive.js")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TRUE = ("1", "true", "yes", "on")
log = logging.getLogger("asok")
access_log = logging.getLogger("asok.access")


# Asok is one object written as a chain of four classes, one a part (14a-14d), as LiveHub is:
# _AppSetup, _AppSessions(_AppSetup), _AppPages(_AppSessions), then Asok(_AppPages).
class _AppSetup:
    """Asok, part one (14a): its settings and what is registered on it (routes, hooks,
    WebSocket routes, filters, pages, components). 14b-14d add the rest."""

    def __init__(self, app_dir: str | os.PathLike = ".", *, debug: bool | None = None,
                 secret_key: str | bytes | None = None,
                 secret_key_fallbacks: Iterable[str | bytes] | None = None,
                 max_body: int = DEFAULT_MAX_BODY, session_store: SessionStore | None = None,
                 session_lifetime: float = SESSION_LIFETIME,
                 trusted_proxies: str | Iterable[str] | None = None, live_origins: Iterable[str] = (),
                 max_form_parts: int = DEFAULT_MAX_FORM_PARTS, max_field_size: int = DEFAULT_MAX_FIELD_SIZE,
                 max_part_size: int = DEFAULT_MAX_PART_SIZE, broker: Broker | None = None) -> None:
        root = Path(app_dir).resolve()
        self.root = root.parent if root.is_file() else root
        env = os.environ
        self.debug = env.get("DEBUG", "").lower() in _TRUE if debug is None else bool(debug)
        if secret_key_fallbacks is None:
            secret_key_fallbacks = [k for k in env.get("SECRET_KEY_FALLBACKS", "").split(",") if k]
        keys = _load_master_keys(self.root, secret_key or env.get("SECRET_KEY"), self.debug,
                                 secret_key_fallbacks)
        self.key_source = ("the secret_key argument" if secret_key else "the SECRET_KEY environment variable"
                           if env.get("SECRET_KEY") else "the development key (debug mode)" if self.debug
                           else str(self.root / ".asok" / "secret_key"))
        self._state_signer = Signer(keys, "live-state")
        self._cookie_signer = Signer(keys, "session-cookie")
        self._csrf_signer = Signer(keys, "csrf")
        self._csrf_tokens = {}
        self._cookie_sids = {}  # session cookie -> its session id, for cookies whose signature verified
        self.max_body = max_body
        if trusted_proxies is None:
            trusted_proxies = env.get("FORWARDED_ALLOW_IPS", "")
        self.trusted_proxies = _proxy_networks(trusted_proxies)
        self.max_form_parts = max_form_parts
        self.max_field_size = max_field_size
        self.max_part_size = max_part_size
        self.session_lifetime = session_lifetime
        if session_store is None:
            session_store = FileSessionStore(self.root / ".asok" / "sessions", session_lifetime)
        session_store.lifetime = session_lifetime
        self.sessions = session_store
        self._last_collect = 0.0
        self.templates = Templates(self.root / "src", debug=self.debug)
        self.templates.globals.update(static=self.static_url, url_for=self.url_for)
        self.routes = []
        self.before_request_hooks = []
        self.ws_routes = []
        self._components = None  # imported on first use, so component modules can import app.py
        self._registered = {}
        self._components_lock = threading.RLock()
        self.pages = self._scan_pages()
        self._threaded_pages = set()  # pages whose components run application code: never tried on the loop
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="asok")
        self.asgi = _ASGIApp(self)
        self._alive_js = (None, {}, None, 0.0)  # (mtime, scripts, the path read, when it was looked at)
        self._script_tags = {}  # parts of alive.js a page needs -> its <script> tags
        self._wsgi_warned = False
        self.live = LiveHub(self, broker or FolderBroker(_live_folder(self.root)))
        self.websocket("/asok/live", max_size=LIVE_SOCKET_MAX, origins=live_origins)(self._live_socket)
        # what each Request is given to reach its session (14b); the methods are looked up per call
        self.session_access = _SessionAccess(lambda request: self._open_session(request), self._csrf_token)
        self._renderer_tools = _RendererTools(self._ensure_session, self._context, self._save_url_state,
                                              self._wrap_component)

    def __repr__(self):
        return f"<Asok {self.root}>"

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return self.wsgi_app(environ, start_response)

    def wsgi_app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """PEP 3333: the app served by any WSGI server."""
        return _wsgi_call(self, environ, start_response)

    def publish(self, topic: str, payload: Any = None) -> None:
        """Run the @on(topic) methods of every component with a view open, in every process
        serving this app folder; each changed view gets its new HTML. Callable from any thread
        or coroutine; `payload` is JSON-safe (at most LIVE_MAX_PUBLISH bytes as JSON)."""
        self.live.publish(topic, payload)

    def run(self, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
        """Serve with the built-in asyncio server until SIGINT / SIGTERM."""
        asyncio.run(serve(self, host, port, **options))

    # ── registration ──────────────────────────────────────────────────
    def route(self, path: str, methods: Iterable[str] = ("GET",), *, csrf: bool = True,
              name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """`@app.route("/users/<int:id>", methods=["GET", "POST"])`. The handler receives the
        path parameters as keyword arguments, and the request too if it has a `request` parameter."""
        def decorator(fn):
            self.routes.append(Route(path, fn, methods, csrf=csrf, name=name))
            return fn
        return decorator

    def before_request(self, fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """`@app.before_request` on `fn(request)`: runs before every page and route (not static
        files, not the live socket), in the order registered; a return value other than None
        is the response (e.g. `redirect("/signin")`) and the page or route does not run."""
        self.before_request_hooks.append(fn)
        return fn

    def websocket(self, path: str, *, max_size: int = MAX_WS_MESSAGE, origins: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """`@app.websocket("/chat")` on `async def handler(ws)`. Same-origin browsers only,
        unless `origins` lists others (e.g. "https://example.com")."""
        def decorator(fn):
            route = Route(path, fn, ("GET",), csrf=False)
            route.max_size = max_size
            route.origins = {o.rstrip("/").lower() for o in origins}
            self.ws_routes.append(route)
            return fn
        return decorator

    def template_filter(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """`Templates.filter` on this app's templates: `@app.template_filter()` (named after the
        function) or `@app.template_filter("name")`."""
        return self.templates.filter(name)

    def _scan_pages(self):
        pages_dir = self.root / "src" / "pages"
        routes = []
        for file in sorted(pages_dir.rglob("*.html")) if pages_dir.is_dir() else ():
            rel = file.relative_to(pages_dir).with_suffix("")
            parts = [p for p in rel.parts]
            if parts[-1] == "index":
                parts.pop()
            pattern = "/" + "/".join(re.sub(r"\[(\w+)\]", r"<\1>", p) for p in parts)
            routes.append(Route(pattern, None, ("GET", "POST"), page=file.relative_to(self.root / "src").as_posix()))
        routes.sort(key=lambda r: (not r.static, r.pattern))
        return routes

    @property
    def components(self) -> dict[str, type[Component]]:
        """{name: Component class}: src/components/*.py, imported on first use (the first request,
        or load_app once app.py has run), so a component module may `from app import helper`."""
        if self._components is None:
            with self._components_lock:
                if self._components is None:
                    self._components = self._discover_components()
                    self._components.update(self._registered)
        return self._components

    def _discover_components(self):
        found = {}
        folder = self.root / "src" / "components"
        for file in sorted(folder.glob("*.py")) if folder.is_dir() else ():
            name = f"_asok_components_{abs(hash(str(self.root))):x}.{file.stem}"
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            for value in vars(module).values():
                if isinstance(value, type) and issubclass(value, Component) and value.__module__ == name:
                    found[value.__name__] = value
        return found

    def register_component(self, cls: type[Component]) -> type[Component]:
        """Make `cls` available to `component(name)` and the live endpoint (found files do this)."""
        self._registered[cls.__name__] = cls
        if self._components is not None:
            self._components[cls.__name__] = cls
        return cls


# ═══ 14b. The application: keys, sessions, CSRF ═══════════════════════════════════════════════════

class _AppSessions(_AppSetup):
    """Asok, part two (14b): the session each request opens, its cookie, its CSRF token."""

    def log_startup(self) -> None:
        """One line at start-up (outside debug mode): where the signing key came from."""
        if not self.debug:
            log.info("signing key from %s; every process and machine serving this app must share it "
                     "(set the same SECRET_KEY on each)", self.key_source)

    def _open_session(self, request):
        cookies = request._cookies
        if cookies is None:  # read from the parsed field, not the request's own copy of it (made when asked for)
            cookies = _COOKIES_SEEN.get(request.headers.get("cookie", "")) or request.cookies
        token = cookies.get(SESSION_COOKIE)
        sid = self._cookie_sids.get(token) if token else None
        if token and sid is None:  # a cookie not seen yet: its signature checked once (then remembered)
            try:
                sid = self._cookie_signer.unsign(token)
            except BadSignature:
                sid = None
            if sid is not None and not _SESSION_ID_RE.match(sid):
                sid = None
            if sid is not None:
                if len(self._cookie_sids) > SESSION_CACHE_SIZE:
                    self._cookie_sids.clear()
                self._cookie_sids[token] = sid
        return self._load_session(sid)

    def _load_session(self, sid):
        record = self.sessions.load(sid) if sid else None
        if record is not None:
            record = self._checked_record(record, sid)
        if record is None or record.get("replaced"):  # a session moved away by regenerate() stays dead
            return Session(None, sid if record is None else None)
        session = Session(record.get("data"), sid)  # the store's copy is this request's own
        session.live = record.get("live", {})
        session.seq = record.get("seq", 0)
        return session

    def _checked_record(self, record, sid):
        """`record`, or None (a fresh session) if its shape is wrong, which is logged."""
        problem = record is not None and _record_problem(record)
        if problem:
            log.warning("session %s…: the stored record is malformed (%s); starting a fresh session",
                        sid[:8], problem)
            return None
        return record

    def _ensure_session(self, session):
        if session.sid is None:
            session.sid = secrets.token_urlsafe(SESSION_ID_BYTES)
            session.new = True
        return session.sid

    def _csrf_token(self, request):
        return self._csrf_for(self._ensure_session(request.session))

    def _csrf_ok(self, sid, token):
        if not sid or not isinstance(token, str):
            return False
        return hmac.compare_digest(token, self._csrf_for(sid))

    def _csrf_for(self, sid):
        token = self._csrf_tokens.get(sid)
        if token is None:
            if len(self._csrf_tokens) > SESSION_CACHE_SIZE:
                self._csrf_tokens.clear()
            token = self._csrf_tokens[sid] = self._csrf_signer.sign("csrf", bind=sid).rpartition(".")[2]
        return token

    def _check_csrf(self, request):
        token = request.headers.get("x-csrf-token") or request.form.get("csrf_token")
        if not token:
            raise HTTPError(403, "CSRF token missing: send the csrf_token form field "
                                 "or an X-CSRF-Token header (templates have it as csrf_token)")
        sid = request.session.sid
        if sid is None:
            raise HTTPError(403, "CSRF token given but the request has no session cookie")
        if not self._csrf_ok(sid, token):
            raise HTTPError(403, "CSRF token invalid for this session")

    def _finish_session(self, request, response):
        session = request._session
        if session is None or not (session.modified or session.new):
            return
        if request._on_loop and (session.modified or session.previous_sid):
            raise _OffLoop()  # a write waits for the session's lock: the request goes to a thread
        sid = self._ensure_session(session)
        if session.previous_sid:
            self._move_session(session)
        elif session.modified:  # a new session with nothing in it needs a cookie, not a file

            def apply(record):
                if self._checked_record(record, sid) is None:
                    record.clear()
                if session.cleared:
                    _clear_live(record, session.seq)
                record["data"] = session.merge_into(record.get("data") or {})

            self.sessions.update(sid, apply)
        response.set_cookie(SESSION_COOKIE, self._cookie_signer.sign(session.sid),
                            max_age=self.session_lifetime, secure=request.scheme == "https")
        self._maybe_collect()

    def _move_session(self, session):
        """After regenerate(): the record under the old id goes to the new one with this
        request's changes, then the old id is left as a tombstone, so its cookie gets a fresh
        session and its open live sockets get `no_session`. The copy is written first: if
        either write fails nothing is lost; if the old record changed meanwhile (a live event
        on it), it is copied again."""
        old, sid = session.previous_sid, session.sid
        for attempt in range(3):
            source = self._checked_record(self.sessions.load(old), old) or {"data": {}, "live": {}}
            snapshot = json.dumps(source, sort_keys=True)

            def fill(record):
                record.clear()
                record.update(json.loads(snapshot))  # noqa: B023 (run within this iteration)
                record.pop("replaced", None)
                if session.cleared:
                    _clear_live(record, session.seq)
                record["data"] = session.merge_into(record.get("data") or {})

            def bury(record):
                if attempt < 2 and record and json.dumps(_plain(record), sort_keys=True) != snapshot:  # noqa: B023
                    return False
                record.clear()
                record.update(data={}, live={}, replaced=True)
                return True

            self.sessions.update(sid, fill)
            if self.sessions.update(old, bury):
                break
        session.previous_sid = None
    def _maybe_collect(self):
        now = time.monotonic()
        if now - self._last_collect > SESSION_COLLECT_EVERY:
            self._last_collect = now
            threading.Thread(target=self.sessions.collect, name="asok-collect", daemon=True).start()
            threading.Thread(target=self._collect_uploads, name="asok-collect-uploads", daemon=True).start()

    def _collect_uploads(self, now=None):
        """Delete live uploads that no event took within UPLOAD_LIFETIME."""
        folder = self.root / ".asok" / "uploads"
        cutoff = (now or time.time()) - UPLOAD_LIFETIME
        for meta in folder.glob("*.json") if folder.is_dir() else ():
            try:
                if meta.stat().st_mtime < cutoff:
                    _remove_upload(folder, meta.stem)
            except OSError:
                pass


# ═══ 14c. The application: handling a request (URLs, pages, errors, static files, alive.js) ═══════

class _AppPages(_AppSessions):
    """Asok, part three (14c): a request in, a response out."""

    def static_url(self, path: str) -> str:
        """The URL of a file under static/: `static_url("app.css")` is "/static/app.css"."""
        return "/static/" + urllib.parse.quote(str(path).lstrip("/"))

    def url_for(self, name: str, /, **params: Any) -> str:
        """The path of the route named `name` with `params` filled in; LookupError if no route has that
        name."""
        for route in self.routes:
            if route.name == name:
                return route.build(**params)
        raise LookupError(f"url_for({name!r}): no route has that name")

    # ── handling a request ────────────────────────────────────────────
    def handle(self, request: Request) -> Response:
        """Request in, Response out; never raises."""
        request.app = self
        try:
            response = self._dispatch(request)
        except HTTPError as exc:
            response = self.error_response(exc.status, exc.detail, exc.headers)
        except StoreUnavailable as exc:
            log.error("%s %s: %s", request.method, request.path, exc)
            response = self._store_unavailable(exc)
        except Exception as exc:
            log.exception("error handling %s %s", request.method, request.path)
            response = self.error_response(500, _describe(exc) if self.debug else None, tb=traceback.format_exc())
        finally:
            if request._files or type(request._body) is not bytes:  # else nothing to close
                request.close()
        try:
            self._finish_session(request, response)
        except StoreUnavailable as exc:
            log.error("%s %s: %s", request.method, request.path, exc)
            response = self._store_unavailable(exc)
        except SessionTooLarge as exc:
            log.error("%s %s: %s", request.method, request.path, exc)
            response = self.error_response(500, f"could not save the session: {exc}")
        except Exception:
            log.exception("could not save the session")
            response = self.error_response(500, "could not save the session")
        if request.method == "HEAD":
            length, _ = response_framing("HEAD", response.status, response.headers, response.body)
            if length is not None:
                response.headers.append(("Content-Length", str(length)))
            response.body = b""
        return response

    def _store_unavailable(self, exc):
        return self.error_response(503, f"The session storage is unavailable ({exc.reason}), so nothing "
                                        "was saved. Try again in a moment.", [("Retry-After", "5")])

    def loop_first(self, request: Request) -> bool:
        """Whether the built-in server tries `request` on its event loop before a thread: a GET or
        HEAD without a body, in an app with file pages, a local session store, no before_request hook
        and not in debug mode. What turns out to need a thread (a route's handler, a static file, a
        component's own mount(), a session write) raises _OffLoop before it runs."""
        return (request.method in ("GET", "HEAD") and not request._body and not self.debug
                and not self.before_request_hooks and bool(self.pages) and getattr(self.sessions, "local", False))

    def _dispatch(self, request):
        path = request.path
        on_loop = request._on_loop
        if path.startswith(("/static/", "/asok/")):  # what asok serves itself
            if path.startswith("/static/"):
                if on_loop:
                    raise _OffLoop()
                return self._static(request, self.root / "static", path[len("/static/"):])
            if path.startswith("/asok/alive"):
                return self._alive(request)
            if path == "/asok/asok.css":
                return _stylesheet(request)
            if path == "/asok/upload":
                return self._upload(request)
        for hook in self.before_request_hooks:
            rv = hook(request)
            if rv is not None:
                return make_response(rv)
        allowed = set()
        for route in self.routes:
            params = route.match(path)
            if params is None:
                continue
            if request.method not in route.methods:
                allowed |= route.methods
                continue
            if on_loop:
                raise _OffLoop()  # the application's handler: in a thread
            request.params = params
            if route.csrf and request.method in UNSAFE_METHODS:
                self._check_csrf(request)
            if route.wants_request:
                params = dict(params, request=request)
            return make_response(route.handler(**params))
        for page in self._page_routes():
            params = page.match(path if path == "/" else path.rstrip("/"))
            if params is None:
                continue
            if request.method not in page.methods:
                allowed |= page.methods
                continue
            request.params = params
            if request.method in UNSAFE_METHODS:
                self._check_csrf(request)
            if not on_loop:
                return self._render_page(request, page.page, params)
            if page.page in self._threaded_pages:
                raise _OffLoop()
            try:
                return self._render_page(request, page.page, params)
            except _OffLoop as exc:
                if exc.lasting:
                    self._threaded_pages.add(page.page)
                raise
        if allowed:
            raise HTTPError(405, f"{request.method} is not allowed here; use {', '.join(sorted(allowed))}",
                            [("Allow", ", ".join(sorted(allowed)))])
        if any(r.match(path) is not None for r in self.ws_routes):
            raise HTTPError(426, "this is a WebSocket endpoint", [("Upgrade", "websocket"), ("Connection", "Upgrade")])
        if path == "/favicon.ico" and request.method in ("GET", "HEAD"):  # asked for by every browser
            icon = self.root / "static" / "favicon.ico"
            if on_loop:
                raise _OffLoop()
            return _file_response(request, icon) if icon.is_file() else Response(b"", 204, content_type=None)
        raise HTTPError(404, f"nothing at {path}")

    def _page_routes(self):
        if self.debug:
            self.pages = self._scan_pages()
        return self.pages

    def _context(self, request, prefix):
        """The template globals of one render; components inside get cids under `prefix`
        (the page path, or the cid of the component being rendered)."""
        return {"request": request, "session": request.session, "csrf_token": _LazyToken(request),
                "component": _ComponentRenderer(self, self._renderer_tools, request, prefix)}

    def render_template(self, request: Request, name: str, /, **context: Any) -> str:
        """Render `name` (under src/) for a route handler; adds the page globals and, when a
        component is on the page, the live runtime."""
        full = self._context(request, request.path)
        full.update(context)
        return self._finish_html(request, self.templates.get(name).render_context(full))

    def _render_page(self, request, name, params):
        return Response(self.render_template(request, name, **params))

    def _finish_html(self, request, text):
        if type(text) is not str:
            text = str.__str__(text)  # plain str: the tags below are HTML, not text to escape
        if not request.uses_live:
            return text
        scripts = self._alive_scripts()
        parts, hooks, model = getattr(request, "alive_parts", ()), " ws-hook=" in text, " ws-model=" in text
        parts = frozenset((*parts, *(("hooks",) if hooks else ()), *(("model",) if model else ()))) \
            if parts or hooks or model else _NO_PARTS
        script_tags = self._script_tags.get(parts)
        if script_tags is None:
            script_tags = "".join(f'<script src="/asok/{f"alive-{part}.js" if part else "alive.js"}?v='
                                  f'{scripts[part][2]}" defer></script>' for part in ("", *sorted(parts)) if part in scripts)
            if len(self._script_tags) < 64:
                self._script_tags[parts] = script_tags
        tags = f'<meta name="csrf-token" content="{request.csrf_token}">{script_tags}'
        at = text.find("</head>")
        if at < 0:
            at = text.find("</body>")
        return text + tags if at < 0 else text[:at] + tags + text[at:]

    def error_response(self, status: int, detail: str | None = None,
                       headers: Iterable[tuple[str, str]] = (), tb: str | None = None) -> Response:
        """The error page for `status`: its phrase, `detail` if given, and the traceback `tb` in debug
        mode."""
        phrase = HTTPStatus(status).phrase
        body = f"<!doctype html><title>{status} {phrase}</title><h1>{status} {phrase}</h1>"
        if detail:
            body += f"<p>{html.escape(detail)}</p>"
        if tb and self.debug:
            body += f"<pre>{html.escape(tb)}</pre>"
        response = Response(body, status, list(headers))
        return response

    def _static(self, request, folder, rel):
        rel = urllib.parse.unquote(rel)
        if "\0" in rel or "\\" in rel:
            raise HTTPError(400, "bad characters in the file path")
        try:
            path = (folder / rel).resolve()
            inside = path.is_relative_to(folder.resolve())
        except (OSError, ValueError):
            inside = False
        if not inside or not path.is_file():
            raise HTTPError(404, f"no file {rel!r} in static/")
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "static files answer GET and HEAD", [("Allow", "GET, HEAD")])
        return _file_response(request, path)

    def _alive_scripts(self):
        """{part: (bytes, gzipped bytes, version)} of alive.js as served, read again when it changes
        (looked at once a second at most outside debug mode: every page with a component asks)."""
        now = time.monotonic()
        stamp, scripts, path, looked = self._alive_js
        if path is ALIVE_JS and now - looked < 1 and not self.debug:
            return scripts
        try:
            new_stamp = ALIVE_JS.stat().st_mtime_ns
        except OSError:
            raise HTTPError(404, f"alive.js is missing: copy it beside asok.py ({ALIVE_JS})")
        if stamp != new_stamp or path is not ALIVE_JS:
            parts = _minify_alive(ALIVE_JS.read_text("utf-8"))
            scripts = {name: (body, gzip.compress(body, 9, mtime=0), hashlib.sha256(body).hexdigest()[:12])
                       for name, body in parts.items()}
            self._script_tags = {}
        self._alive_js = (new_stamp, scripts, ALIVE_JS, now)
        return scripts

    def _alive(self, request):
        """/asok/alive.js and /asok/alive-<part>.js: minified, gzipped when the browser takes it,
        and cached for a year under the versioned URL that pages use (?v=<hash of the bytes>)."""
        match = re.fullmatch(r"/asok/alive(?:-(\w+))?\.js", request.path)
        name = match and (match.group(1) or "")
        scripts = self._alive_scripts()
        if name not in scripts:
            raise HTTPError(404, f"no script {request.path}; alive.js has the parts: "
                                 f"{', '.join(n for n in scripts if n) or 'none'}")
        body, packed, version = scripts[name]
        cache = "public, max-age=31536000, immutable" if request.query.get("v") == version else "no-cache"
        headers = [("ETag", f'"{version}"'), ("Cache-Control", cache), ("Vary", "Accept-Encoding")]
        inm = request.headers.get("if-none-match")
        if inm is not None and (f'"{version}"' in [t.strip() for t in inm.split(",")] or inm.strip() == "*"):
            return Response(b"", 304, headers, content_type=None)
        if _accepts_gzip(request.headers.get("accept-encoding", "")):
            body = packed
            headers.append(("Content-Encoding", "gzip"))
        return Response(body, 200, headers, content_type="text/javascript; charset=utf-8")


_NO_PARTS = frozenset()  # a page that needs alive.js's core alone


class _OffLoop(BaseException):
    """Raised while the server tries a request on its event loop (Request._on_loop), before anything
    that may block runs: application code, a file read, a wait for a session's lock. The server then
    runs the request again in a thread from the start. `lasting`: the page will always need one.
    A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, lasting=False):
        super().__init__()
        self.lasting = lasting


def _minify_alive(source):
    """alive.js as served, split into parts: {"": the core, name: each part}. Lines that are only
    a comment and leading indentation are dropped, and so is a trailing comment that starts with
    " // ", and spaces beside punctuation outside string literals (so alive.js keeps " // ",
    quotes and spaces out of its regular expressions). A line
    `//# part: name` starts a part that asok serves as /asok/alive-<name>.js, only to pages whose
    request has the name in `request.alive_parts` (a component adds it with `_alive_parts =
    ("name",)` on its class): a feature most pages do not use costs them no bytes."""
    parts, name = {"": []}, ""
    for line in source.splitlines():
        text = line.strip()
        marker = re.fullmatch(r"//# part: (\w+)", text)
        if marker:
            name = marker.group(1)
            parts[name] = []
        elif text and not text.startswith("//"):
            parts[name].append(_squeeze_js(re.sub(r"\s+// .*$", "", text)))
    return {name: ("\n".join(lines) + "\n").encode() for name, lines in parts.items()}


_JS_PUNCTUATION = frozenset("=,:;{}()[]<>+-*/%|&?!.")


def _squeeze_js(line):
    """`a = b + ++c;` -> `a=b+ ++c;`: a space goes when a neighbour is punctuation, unless it
    parts `+ +` or `- -`; strings and template literals are copied as they are."""
    out, quote, i = [], None, 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                out.append(line[i:i + 2])
                i += 2
                continue
            quote = None if c == quote else quote
        elif c in "\"'`":
            quote = c
        elif c == " ":
            before, after = (out[-1][-1:] if out else ""), line[i + 1:i + 2]
            if (before in _JS_PUNCTUATION or after in _JS_PUNCTUATION) and before + after not in ("++", "--"):
                i += 1
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _accepts_gzip(header):
    for item in header.lower().split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip() in ("gzip", "*"):
            q = params.strip().removeprefix("q=")
            try:
                return not params or float(q) > 0
            except ValueError:
                return False
    return False


def _file_response(request, path):
    st = path.stat()
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    headers = [("ETag", etag), ("Last-Modified", formatdate(st.st_mtime, usegmt=True)), ("Cache-Control", "no-cache")]
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
        ctype += "; charset=utf-8"
    inm = request.headers.get("if-none-match")
    ims = request.headers.get("if-modified-since")
    fresh = False
    if inm is not None:
        fresh = etag in [t.strip() for t in inm.split(",")] or inm.strip() == "*"
    elif ims:
        try:
            fresh = int(st.st_mtime) <= parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError):
            fresh = False
    if fresh:
        return Response(b"", 304, headers, content_type=None)
    headers.append(("Content-Length", str(st.st_size)))
    if st.st_size <= 256 * 1024:
        return Response(path.read_bytes(), 200, headers, content_type=ctype)
    return Response(_read_chunks(path), 200, headers, content_type=ctype)


def _read_chunks(path, size=64 * 1024):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


# ═══ 14d. The application: the live endpoint and uploads ══════════════════════════════════════════

class Asok(_AppPages):
    """The application: file pages, routes, components, sessions.
    A WSGI application itself; `app.asgi` is its ASGI 3 application.

    Built in four parts, one a section: 14a setup and registration, 14b sessions, 14c
    requests, 14d the live endpoint and uploads."""

    def _wrap_component(self, comp, name, cid, sid, version, seq, saved=False):
        state, text = comp._checked_state_json()
        cls = type(comp)
        template = _template_of(cls)
        inner = comp.render() if template is None else comp._render_html(template[0], state, template[1])
        if not saved and len(text) > LIVE_INLINE_STATE:
            # too large to travel with each first event: saved now, so the page holds a reference
            if getattr(comp._asok_context.get("request"), "_on_loop", False):
                raise _OffLoop()
            version, seq = self._save_url_state(sid, cid, cls, state)
            saved = True
        shown = state if not saved or self.live._shows_values(cls, inner) else None
        token = self.live.sign(name, cid, sid, shown, version, seq, saved=saved, text=text)
        url = f' data-asok-url="{html.escape(json.dumps({k: comp._asok_fields[k] for k in comp.url}))}"' \
            if comp.url else ""

        return str.__new__(Markup, f'<div id="{_attr_escape(cid)}" data-asok-component="{name}" '
                                   f'data-asok-state="{_attr_escape(token)}"{url}>{inner}</div>')

    def _save_url_state(self, sid, cid, cls, state):
        """Save a component's state changed by the page's query string, and push it to the
        component's other views; (version, seq) to sign into the page."""
        def apply(record):
            live = record.setdefault("live", {})
            saved = SavedComponent.load(live.pop(cid, None), cls.__name__) or SavedComponent(cls.__name__, state)
            saved.state, saved.version = state, saved.version + 1
            saved.seq = record["seq"] = record.get("seq", 0) + 1
            record.setdefault("dropped", {}).pop(cid, None)
            live[cid] = saved.dump()
            return saved

        saved = self.sessions.update(sid, apply)
        self.live._saved_and_pushed(sid, cid, cls, saved, None, None)
        return saved.version, saved.seq

    # ── live uploads: POST /asok/upload, then the event names the files ──
    def _upload(self, request):
        """Files of a ws-submit form, posted before the event: checked against the CSRF token,
        the component's signed state (so bound to the component, the cid and the session) and
        the component's max_upload, then kept under .asok/uploads until the event takes them.
        Answers JSON {files: {input name: [upload id, ...]}} or {error: {code, message}}."""
        def refuse(status, code, message):
            return Response(json.dumps({"error": {"code": code, "message": message}}), status,
                            content_type="application/json")

        if request.method != "POST":
            return refuse(405, "bad_method", "POST the files here")
        try:
            self._check_csrf(request)
            form, files = request.form, request.files
        except HTTPError as exc:
            return refuse(exc.status, "too_large" if exc.status == 413 else "bad_upload", exc.detail)
        sid, cid, name = request.session.sid, form.get("cid", ""), form.get("component", "")
        cls = self.components.get(name)
        if cls is None:
            return refuse(400, "unknown_component", f"no component named {name!r}")
        try:
            token = self.live.read(name, cid, sid, form.get("state", ""))
        except LiveError as exc:
            return refuse(403, exc.code, exc.message)
        uploads = [f for key in files for f in files.getlist(key)]
        total = sum(f.size for f in uploads)
        if total > cls.max_upload:
            return refuse(413, "too_large", f"the files are {_mib(total)}; this form takes at most "
                                            f"{_mib(cls.max_upload)}")
        folder = self.root / ".asok" / "uploads"
        mine, everyone = _pending_uploads(folder, sid)
        if mine + total > 2 * cls.max_upload:
            return refuse(429, "too_many_uploads", f"{_mib(mine)} of this session's uploads wait for "
                                                   "their event; send the form again once they are taken")
        if everyone + total > UPLOAD_PENDING_MAX:
            return refuse(503, "store_unavailable", "the server holds too many uploads waiting for their "
                                                    "events; try again in a minute")
        try:
            saved = SavedComponent.load(request.session.live.get(cid), name)  # newer than the page's, if any
            state = saved.state if saved is not None else token.state
            comp = cls._restore(self, state, request.session, cid, self._context(request, cid))
            if comp.authorize("$upload", sorted(files)) is False:
                return refuse(403, "forbidden", f"{name} does not take uploads here")
        except LiveError as exc:
            return refuse(403, exc.code, exc.message)
        folder.mkdir(parents=True, exist_ok=True)
        ids = {}
        try:
            for upload in uploads:
                uid = secrets.token_urlsafe(24)
                upload.save(folder / f"{uid}.data")
                meta = {"sid": sid, "cid": cid, "name": upload.name, "filename": upload.raw_filename,
                        "content_type": upload.content_type, "size": upload.size, "t": int(time.time())}
                (folder / f"{uid}.json").write_text(json.dumps(meta))
                ids.setdefault(upload.name, []).append(uid)
        except OSError as exc:
            for uid in (u for group in ids.values() for u in group):
                _remove_upload(folder, uid)
            return refuse(503, "store_unavailable", f"the server has no room for the files ({exc.strerror})")
        return Response(json.dumps({"files": ids}), content_type="application/json")

    def _take_uploads(self, sid: str, cid: str, args: list[Any], taken: list[Any]) -> list[Any]:
        """Replace each {"$upload": id} in a call's arguments (or in a fields dict among them)
        by its UploadedFile, appended to `taken` (closed, so deleted unless saved, by the caller)."""
        def take(value):
            if isinstance(value, dict) and len(value) == 1 and "$upload" in value:
                uid, folder = value["$upload"], self.root / ".asok" / "uploads"
                try:
                    if not isinstance(uid, str) or not _UPLOAD_ID_RE.match(uid):
                        raise ValueError
                    meta = json.loads((folder / f"{uid}.json").read_text())
                    if (meta["sid"], meta["cid"]) != (sid, cid):
                        raise ValueError
                    upload = UploadedFile(meta["name"], meta["filename"], meta["content_type"],
                                          open(folder / f"{uid}.data", "rb"), meta["size"], folder / f"{uid}.data")
                except (OSError, ValueError, KeyError, TypeError):
                    raise LiveError("bad_upload", "no such upload for this component (it was used by an "
                                                  "earlier event or has expired); choose the file again")
                taken.append(upload)
                return upload
            if isinstance(value, dict):
                return {k: take(v) for k, v in value.items()}
            return value

        return [take(a) for a in args]

    async def _live_socket(self, ws):
        """/asok/live: one page. Its messages are handled one at a time in a thread (LiveHub.handle);
        replies and pushes go out through the page's _LiveOutbox."""
        loop = asyncio.get_running_loop()
        outbox = _LiveOutbox(loop, ws)
        conn = LiveConnection(ws.request.session.sid, outbox.push)  # (LiveHub._loop_of finds the outbox in it)
        ws.request = None  # the session's id is all a page's socket needs of it: an idle page keeps
        # neither its headers, its cookies nor its Session (the hub loads the record per event)

        def here(message):
            """(its replies, what follows them) for a text message that is an event to run on
            the event loop, handled now; else (None, None, what json.loads made of it or None),
            for a thread (a held lock sends one there too: then nothing ran)."""
            try:
                parsed = json.loads(message, parse_constant=_refuse_constant, parse_float=_finite_float)
            except (ValueError, RecursionError):
                return None, None, None  # handle() says what is wrong with it
            if self.live.on_loop(parsed):
                later = []  # what the event does once answered: after its reply, on the loop
                with contextlib.suppress(StoreBusy):
                    return self.live.handle(conn, message, parsed, wait=False, later=later), later, parsed
            return None, None, parsed

        def direct(message):
            """A message that arrives while the loop below waits for one: an event to run on
            the event loop is handled at once, in the protocol's callback (no future, task
            wake-up and turn of the loop per event). Returns None once it is answered; else
            what the loop below takes instead: the message, or its replies still to send."""
            if message.__class__ is not str or len(message) > LIVE_MAX_MESSAGE:
                return message
            replies, later, _ = here(message)
            if replies is None:
                return message
            for n, reply in enumerate(replies):
                if not outbox.send_now(reply):  # the page is not reading: the loop below waits for it
                    self.live.run_later(later)
                    return _Answered(replies[n:])
            self.live.run_later(later)
            return None

        if isinstance(ws, _ServerWebSocket):
            ws.direct = direct
        try:
            async for message in ws:
                later = None
                if message.__class__ is _Answered:
                    for reply in message.replies:
                        await outbox.reply(reply, tried=True)
                    message = reply = None  # (an idle page's socket holds none of them)
                    continue
                if not isinstance(message, str):
                    replies = [_live_error(None, "bad_message", "live messages are JSON text, not binary")]
                elif len(message) > LIVE_MAX_MESSAGE:
                    rid = re.search(r'"id"\s*:\s*"([^"\\]{1,100})"', message[:300])
                    replies = [_live_error(rid and rid.group(1), "too_large",
                                           f"message of {len(message)} bytes; the limit is {LIVE_MAX_MESSAGE}")]
                else:
                    replies, later, parsed = here(message)  # on the loop: no thread round trip
                    if replies is None:
                        replies = await _in_thread(loop, self.executor, self.live.handle, conn, message, parsed)
                for reply in replies:
                    if outbox.send_now(reply):
                        continue
                    if later:  # the page is not reading (or ASGI): what follows the save does not wait for it
                        self.live.run_later(later)
                        later = None
                    await outbox.reply(reply, tried=True)
                if later:
                    self.live.run_later(later)
                message = parsed = replies = reply = later = None  # an idle page's socket holds none of it
        finally:
            ws.direct = None
            outbox.closed = True
            self.live.leave(conn)  # quick: no I/O, the lock is only ever held briefly

    def live_event(self, sid: str | None, text: str) -> str:
        """One live event in (JSON text), its reply out (JSON text), with no page behind it
        (no view is kept: nothing is pushed to it). Never raises."""
        return self.live.handle(LiveConnection(sid, None), text)[0]


def _attr_escape(text):
    """html.escape(text) (quotes too), without its call: run twice per component on a page."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;"))


def _describe(exc):
    """`NameError: 'x' is undefined (src/pages/index.html, line 3)`: the error and the last
    place outside Python files it passed through, which for a template is its file and line."""
    where = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.endswith(".py")]
    place = f" ({where[-1].filename}, line {where[-1].lineno})" if where else ""
    return traceback.format_exception_only(type(exc), exc)[-1].strip() + place


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number (numbers must be finite)")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a finite number")
    return value


def _live_error(rid, code, message):
    error = {"code": code, "message": message}
    if code in LIVE_RELOAD_CODES:
        error["reload"] = True  # alive.js reloads the page, once
    return json.dumps({"id": rid, "error": error}, separators=(",", ":"))


# ═══ 15. WebSocket handlers' side: the object an @app.websocket handler receives ══════════════════

def _origin_allowed(request, route):
    """Same origin by default (RFC 6455 §10.2); a route may list other origins.
    A client that sends no Origin (not a browser) is let through."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    return origin == f"{request.scheme}://{request.host}".lower() or origin in route.origins


class WebSocket:
    """`await ws.receive()` -> str or bytes, `await ws.send(data)`, `await ws.close(code, reason)`,
    `async for message in ws` (ends when the peer closes). `ws.request` is the upgrade request."""

    request = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.receive()
        except ConnectionClosed:
            raise StopAsyncIteration


class _Answered:
    """A live event handled as it arrived (_live_socket's direct()), with the replies that wait
    for the page to read them: queued for the socket's loop like a message."""
    __slots__ = ("replies",)

    def __init__(self, replies):
        self.replies = replies

    def __len__(self):
        return 0


class _ServerWebSocket(WebSocket):
    """A WebSocket on the built-in server: messages come from _WebSocketConnection."""

    def __init__(self, request, conn):
        self.request = request
        self._conn = conn
        self._items = []      # messages not received yet, then the ConnectionClosed that ends them
        self._waiter = None   # the future receive() waits on while there are none
        self.queued = 0       # bytes of the messages in _items
        self.closed = None
        self.direct = None    # fn(message) -> None once it has handled it, else the item to queue

    async def receive(self):
        # a list and one future rather than an asyncio.Queue (four deques: ~3 KB per idle socket)
        while not self._items:
            if self.closed is not None:
                raise ConnectionClosed(*self.closed)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items[0]
        if isinstance(item, ConnectionClosed):
            raise item  # it stays: every later receive() raises it too
        del self._items[0]
        self.queued -= len(item)
        if self._conn.flow.paused:
            self._conn.read_more()
        return item

    def _wake(self):
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def send(self, data):
        if self.closed is not None:
            raise ConnectionClosed(*self.closed)
        event = TextMessage(data) if isinstance(data, str) else BytesMessage(bytes(data))
        await self._conn.write(event)

    async def close(self, code=CloseCode.NORMAL, reason=""):
        await self._conn.close(code, reason)

    def send_now(self, text):
        """Write a text message at once if the peer is reading (True); else False, and
        `await send()` is the way (it waits for the peer)."""
        conn = self._conn
        if self.closed is not None or conn.closed or not conn.flow.writable.is_set():
            return False
        conn.transport.write(conn.wsconn.send(TextMessage(text)))
        return True

    def _deliver(self, item):
        if self.direct is not None and not self._items and self._waiter is not None and not self._waiter.done():
            item = self.direct(item)  # (only while the handler waits for a message: order is kept)
            if item is None:
                return
        self.queued += len(item)
        self._items.append(item)
        self._wake()

    def _closed(self, code, reason):
        if self.closed is None:
            self.closed = (code, reason)
            self._items.append(ConnectionClosed(code, reason))
            self._wake()


class _ASGIWebSocket(WebSocket):
    def __init__(self, request, receive, send):
        self.request = request
        self._receive = receive
        self._send = send
        self.closed = None

    async def receive(self):
        if self.closed is not None:
            raise ConnectionClosed(*self.closed)
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            self.closed = (message.get("code", CloseCode.NO_STATUS), message.get("reason") or "")
            raise ConnectionClosed(*self.closed)
        text = message.get("text")
        return text if text is not None else message.get("bytes") or b""

    async def send(self, data):
        if self.closed is not None:
            raise ConnectionClosed(*self.closed)
        key = "text" if isinstance(data, str) else "bytes"
        await self._send({"type": "websocket.send", key: data})

    async def close(self, code=CloseCode.NORMAL, reason=""):
        if self.closed is None:
            self.closed = (code, reason)
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


# ═══ 16. WSGI (PEP 3333) and ASGI 3 adapters ══════════════════════════════════════════════════════

# RFC 9110 §7.6.1: connection-specific fields, which PEP 3333 forbids an application to send.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade"})


def _wsgi_call(app, environ, start_response):
    if not app._wsgi_warned:
        app._wsgi_warned = True
        if app.components:
            log.warning("asok is running under WSGI (%s): pages render, but live components need a "
                        "WebSocket, which WSGI cannot carry; serve with `python asok.py serve` or an "
                        "ASGI server (uvicorn) for them to respond", environ.get("SERVER_SOFTWARE", "?"))
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").lower()] = value
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    path = environ.get("PATH_INFO", "") or "/"
    path = path.encode("latin-1").decode("utf-8", "replace")
    request = Request(environ["REQUEST_METHOD"], environ.get("SCRIPT_NAME", "") + path,
                      environ.get("QUERY_STRING", ""), headers, b"", environ.get("wsgi.url_scheme", "http"),
                      environ.get("REMOTE_ADDR", ""), app)
    if length < 0:
        response = app.error_response(400, "Content-Length is not a number")
    elif length > app.max_body:
        response = app.error_response(413, f"body of {length} bytes; the limit is {app.max_body}")
    else:
        body, stream = _BodyBuffer(), environ["wsgi.input"]
        while length > body.size and (data := stream.read(min(_READ_CHUNK, length - body.size))):
            body.write(data)
        request.body = body.finish()
        response = app.handle(request)
    status = f"{response.status} {HTTPStatus(response.status).phrase}"
    headers = [(k, str(v)) for k, v in response.headers if k.lower() not in _HOP_BY_HOP]
    length, _ = response_framing(request.method, response.status, response.headers, response.body)
    if length is not None:
        headers.append(("Content-Length", str(length)))
    start_response(status, headers)
    return [bytes(response.body)] if not response.streamed else response.body


class _ASGIApp:
    """ASGI 3: `uvicorn module:app.asgi`. HTTP and WebSocket scopes; lifespan acknowledged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.app.log_startup()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    def _request(self, scope):
        headers = {}
        for name, value in scope.get("headers", ()):
            name = name.decode("latin-1").lower()
            value = value.decode("latin-1")
            headers[name] = headers[name] + (";" if name == "cookie" else ", ") + value if name in headers else value
        client = scope.get("client") or ("", 0)
        scheme = {"wss": "https", "ws": "http"}.get(scope.get("scheme"), scope.get("scheme", "http"))
        return Request(scope.get("method", "GET"), scope.get("root_path", "") + scope["path"],
                       scope.get("query_string", b"").decode("latin-1"), headers, b"", scheme, client[0], self.app)

    async def _http(self, scope, receive, send):
        app = self.app
        loop = asyncio.get_running_loop()
        request = self._request(scope)
        body = _BodyBuffer()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                body.close()
                return
            body.write(message.get("body", b""))
            if body.size > app.max_body or not message.get("more_body"):
                break
        if body.size > app.max_body:
            body.close()
            response = app.error_response(413, f"body over the limit of {app.max_body} bytes")
        else:
            request.body = body.finish()
            response = await loop.run_in_executor(app.executor, app.handle, request)
        await self._respond(request, response, send, "http.response")

    async def _respond(self, request, response, send, kind):
        """Send `response` as `kind`.start and `kind`.body messages (kind: "http.response", or
        "websocket.http.response" to refuse a WebSocket with an HTTP answer)."""
        loop = asyncio.get_running_loop()
        headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in response.headers]
        length, _ = response_framing(request.method, response.status, response.headers, response.body)
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        await send({"type": f"{kind}.start", "status": response.status, "headers": headers})
        if not response.streamed:
            await send({"type": f"{kind}.body", "body": bytes(response.body)})
            return
        iterator = iter(response.body)
        while (piece := await loop.run_in_executor(self.app.executor, next, iterator, None)) is not None:
            await send({"type": f"{kind}.body", "body": piece, "more_body": True})
        await send({"type": f"{kind}.body", "body": b""})

    async def _websocket(self, scope, receive, send):
        app = self.app
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        request = self._request(scope)
        route, params = _find_ws_route(app, request.path)
        if route is None or not _origin_allowed(request, route):
            await self._refuse_websocket(scope, request, route, send)
            return
        request.params = params
        try:
            await asyncio.get_running_loop().run_in_executor(app.executor, lambda: request.session)
        except Exception:
            log.exception("WebSocket upgrade %s failed", request.path)
            await send({"type": "websocket.close", "code": CloseCode.INTERNAL_ERROR})
            return
        await send({"type": "websocket.accept"})
        ws = _ASGIWebSocket(request, receive, send)
        request = None  # the socket's handler has it in ws.request (the live one lets it go)
        await _run_ws_handler(route, ws, params)

    async def _refuse_websocket(self, scope, request, route, send):
        """Refuse as the built-in server does: what a plain GET of the path answers (404 on an
        unknown path), or 403 for an origin the route does not allow. That needs the ASGI server
        to offer the `websocket.http.response` extension (uvicorn does); without it a close
        before the accept is all there is, and the server answers it with 403 itself."""
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
            return
        if route is None:
            response = await asyncio.get_running_loop().run_in_executor(self.app.executor, self.app.handle, request)
        else:
            response = self.app.error_response(403, f"origin {request.headers.get('origin')} may not "
                                                    "open this WebSocket")
        await self._respond(request, response, send, "websocket.http.response")


def _find_ws_route(app, path):
    for route in app.ws_routes:
        params = route.match(path)
        if params is not None:
            return route, params
    return None, None


async def _run_ws_handler(route, ws, params):
    try:
        await route.handler(ws, **params)
    except ConnectionClosed:
        pass
    except Exception:
        log.exception("WebSocket handler %s failed", route.pattern)
        if ws.closed is None:
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        return
    if ws.closed is None:
        await ws.close(CloseCode.NORMAL, "")


# ═══ 17a. The asyncio server: limits, phases, flow control, the connection base ═══════════════════

#
# Split by job, as uvicorn splits its protocols. _HTTPConnection drives HTTPParser, hands each
# request to the app in a thread and writes the response, framed by response_framing(). A
# WebSocket upgrade ends with transport.set_protocol(_WebSocketConnection(...)): from the 101 on,
# that object drives WSConnection. Each has a _FlowControl (reading paused or not, writable or
# not, the write deadline for a peer that stops reading) and a _Phase; a phase is entered only
# through _Connection._enter, which sets the deadline from _ServerState.timeouts. One periodic
# sweep (_ServerState.sweep) acts on the connections whose deadline has passed.

HEADER_TIMEOUT = 10.0      # the whole request head must arrive within this
BODY_TIMEOUT = 30.0        # longest pause while a body is arriving
IDLE_TIMEOUT = 5.0         # keep-alive connection with no request
WS_PING_INTERVAL = 20.0    # ping a quiet WebSocket; no answer by the next tick ends it
WS_CLOSE_TIMEOUT = 5.0     # wait this long for the peer's close frame
SWITCH_INTERVAL = 0.0002   # GIL hand-off between the event loop and handler threads (default 5 ms)
SWEEP_EVERY = 1.0          # deadlines are checked at least this often (a quarter of the shortest timeout)
SHUTDOWN_GRACE = 10.0      # in-flight requests get this long on SIGINT / SIGTERM
ACCEPT_DEFER = 0.001       # --workers: how long a worker holding more connections than another leaves
ACCEPT_DEFER_TIMES = 3     # the shared socket to the others, and how many times in a row at most
_worker_slots = None       # --workers: (open connections per worker, in shared memory; this worker's index;
                           # the pid of the process that forked it)
BODY_MIN_RATE = 1024       # bytes/s a request body must average once its first body_timeout is over
WS_MAX_OUTPUT = 8 << 20    # bytes queued for one WebSocket peer (unread, or waiting to be sent); past it the
                           # peer is dropped. A single message larger than this still goes when none waits.
WS_MAX_INPUT = 1 << 20     # bytes of received messages the handler has not taken yet; reading pauses past it
WS_FRAMES_PER_TURN = 256   # frames handled for one connection before the loop serves the others
MAX_CONNECTIONS = 10000    # open connections, at most; past it (or past what the fd limit allows) 503
_FDS_KEPT = 384            # descriptors kept free for threads, the log and the broker (and the session
                           # store's open files beside them: _session_files_open)
_PAUSE_AT = 256 * 1024
# A request that arrives alone in one read, with no body, is made from the same bytes next time
# without parsing them again (a browser reloading or polling a page, a keep-alive client asking
# again). Bounded as the other caches of what peers send (_keep): 256 heads of 4 KiB at most.
_KNOWN_HEADS = {}          # the bytes of one whole bodiless request -> (RequestHead, path, query, headers)
_KNOWN_HEADS_KEPT = 256
_KNOWN_HEAD_LONGEST = 4096
_PLAIN_HEADS = {}          # (status, its one field) -> (the Date in it, its response head up to the length)


class _Phase(Enum):
    """Where a connection is. Each phase has its own timeout (_ServerState.timeouts), and the
    phase changes only through _Connection._enter, which sets the deadline from that table."""
    IDLE = "idle"              # keep-alive, no request yet: closed after idle_timeout
    HEAD = "head"              # a request head arriving: 408 after header_timeout
    BODY = "body"              # a request body arriving: 408 after body_timeout (and BODY_MIN_RATE)
    BUSY = "busy"              # the app has the request, or its response is going out: no timeout
    DRAINING = "draining"      # answered, but the client reads nothing: only the write deadline
    WS = "ws"                  # a WebSocket: pinged every ping_interval
    WS_CLOSING = "ws-closing"  # our close frame is out: aborted after WS_CLOSE_TIMEOUT

    __hash__ = object.__hash__  # by identity (each phase is one object): Enum's own is Python code, run 4 times a request


class _ServerState:
    """What every connection of one server shares: the app, the limits, the open connections."""

    def __init__(self, app, header_timeout, body_timeout, idle_timeout, ping_interval, max_connections):
        self.app = app
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.ping_interval = ping_interval
        self.max_connections = max_connections
        self.timeouts = {_Phase.IDLE: idle_timeout, _Phase.HEAD: header_timeout, _Phase.BODY: body_timeout,
                         _Phase.BUSY: math.inf, _Phase.DRAINING: math.inf, _Phase.WS: ping_interval,
                         _Phase.WS_CLOSING: WS_CLOSE_TIMEOUT}
        self.connections = set()
        self.stopping = False
        self._date = (0, "")

    def date(self):
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def sweep(self, now):
        """Run by a periodic timer: act on each connection whose deadline has passed.
        One timer for the server is cheaper than a timer per connection per request."""
        for conn in [c for c in self.connections if c.deadline <= now]:
            conn._timed_out(now)


def _in_thread(loop, executor, fn, *args):
    """Run fn(*args) in the executor; an asyncio future for its result (lighter than
    run_in_executor: no wrapping of a concurrent future in an asyncio one). Results reach the
    loop through its _LoopInbox: those that finish while the loop is busy share one wake-up."""
    waiter = loop.create_future()
    inbox = _LoopInbox.of(loop)

    def done(future):
        inbox.put(waiter, _settle, waiter, future)

    executor.submit(fn, *args).add_done_callback(done)
    return waiter


def _settle(waiter, future):
    if waiter.cancelled():
        return
    exc = future.exception()
    if exc is None:
        waiter.set_result(future.result())
    else:
        waiter.set_exception(exc)


class _Gate:
    """asyncio.Event's is_set / set / clear / wait, allocating nothing until someone waits:
    every open connection holds one, and an asyncio.Event's deque alone is 760 bytes."""

    __slots__ = ("_open", "_waiters")

    def __init__(self):
        self._open, self._waiters = True, None

    def is_set(self):
        return self._open

    def clear(self):
        self._open = False

    def set(self):
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self):
        if self._open:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters and waiter in self._waiters:
                self._waiters.remove(waiter)


class _FlowControl:
    """Back-pressure both ways on one transport. Reading pauses while we hold enough of the
    peer's input; `writable` is clear while asyncio's write buffer is over its high-water mark.
    While written bytes wait, the write deadline runs (`watch`): a peer that reads none of them
    for `timeout` seconds is dropped; one that reads some, however slowly, gets another `timeout`."""

    __slots__ = ("transport", "timeout", "paused", "writable", "stall")

    def __init__(self, transport, timeout):
        self.transport = transport
        self.timeout = timeout
        self.paused = False
        self.writable = _Gate()
        self.stall = None  # write-buffer size when the peer was last seen reading, while watched

    def pause_reading(self):
        if not self.paused and not self.transport.is_closing():
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self):
        if self.paused and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def watch(self, now):
        """Start the write deadline; returns when it falls."""
        self.stall = self.transport.get_write_buffer_size() + 1
        return now + self.timeout

    def overdue(self, now):
        """The write deadline fell: the next one if the peer read some meanwhile, math.inf
        once it was dropped for reading nothing, None when it has read everything."""
        left = self.transport.get_write_buffer_size()
        if left and left < self.stall:
            self.stall = left
            return now + self.timeout
        if left:
            self.transport.abort()
            return math.inf
        self.stall = None
        return None


class _Connection(asyncio.Protocol):
    """What the server's sweep and shutdown see of a connection: `phase`, `deadline` (when the
    phase, or the write deadline, falls; checked by _ServerState.sweep), `flow`, `transport`."""

    def connection_lost(self, exc):
        self.closed = True
        self.flow.writable.set()  # a send waiting for the peer to read wakes up, and sees it gone
        self.s.connections.discard(self)

    def _enter(self, phase, now=None):
        self.phase = phase
        self.deadline = (self.loop.time() if now is None else now) + self.s.timeouts[phase]

    def _watch_writes(self):
        """Until the write buffer drains, a client that stops reading for body_timeout is dropped."""
        self.deadline = self.flow.watch(self.loop.time())

    def _timed_out(self, now):
        self.deadline = math.inf
        if self.flow.stall is not None:  # waiting for the client to read what was written
            deadline = self.flow.overdue(now)
            if deadline is not None:
                self.deadline = deadline
            elif self.phase is _Phase.WS:  # it read everything: back to pinging it
                self._enter(_Phase.WS, now)
            return
        if not self.closed:
            self._phase_over(now)


# ═══ 17b. The asyncio server: the HTTP connection ═════════════════════════════════════════════════

class _HTTPConnection(_Connection):
    """HTTP/1.1 keep-alive and pipelining: drives the HTTPParser, hands each request to the app
    in a thread and writes its response; a WebSocket upgrade hands the transport over to a
    _WebSocketConnection after the 101."""

    def __init__(self, state):
        self.s = state
        self.app = state.app
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "-"
        self.remote_addr = self.peer.rpartition(":")[0]
        self.parser = HTTPParser(max_body=self.app.max_body)
        self.flow = _FlowControl(transport, self.s.body_timeout)
        self.draining = None  # the phase to go back to once a client that stopped reading reads again
        self.alone = None  # the bytes of the last read, when they arrived with nothing buffered before
        self.closed = False
        self._enter(_Phase.IDLE)
        if len(self.s.connections) >= self.s.max_connections:
            self._refuse(503, f"the server has {len(self.s.connections)} connections open, its limit; "
                              "try again in a moment", [("Retry-After", "1")])
            return
        self.s.connections.add(self)

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if self.phase is _Phase.BODY:  # a body cut off: its temporary file goes
            self.body.close()

    def pause_writing(self):
        self.flow.writable.clear()

    def resume_writing(self):
        self.flow.writable.set()
        if self.phase is _Phase.DRAINING:
            self.flow.stall = None
            self._enter(self.draining)
            self.flow.resume_reading()
            self._advance()

    def _phase_over(self, now):
        if self.phase is _Phase.IDLE:
            self.transport.close()
        elif self.phase is _Phase.HEAD:
            self._refuse(408, "request head not received in time")
        elif self.phase is _Phase.BODY:
            self._refuse(408, f"request body not received in time (after {self.s.body_timeout:g} s it must "
                              f"average {BODY_MIN_RATE} bytes/s, with no pause of {self.s.body_timeout:g} s)")

    async def _drained(self):
        if not self.flow.writable.is_set():
            self._watch_writes()
            await self.flow.writable.wait()
            self.flow.stall = None
            self._enter(_Phase.BUSY)

    def data_received(self, data):
        alone = None
        if self.phase is _Phase.IDLE and self.parser.waiting:
            known = _KNOWN_HEADS.get(data)
            if known is not None:  # these very bytes were a whole bodiless request before
                self.parser._skip_request()
                self.phase, self.deadline = _Phase.BUSY, math.inf  # as _enter(_Phase.BUSY): no timeout
                head, path, query, headers = known
                self._run(head, Request(head.method, path, query, headers.copy(), b"", "http",
                                        self.remote_addr, self.app))
                return
            if len(data) <= _KNOWN_HEAD_LONGEST:
                alone = data  # _start keeps what it makes of them if they are one whole request
        self.alone = alone
        self.parser.receive_data(data)
        if self.phase is _Phase.IDLE:
            self._enter(_Phase.HEAD)
        elif self.phase is _Phase.BUSY or self.phase is _Phase.DRAINING:
            if self.parser.pending_size > _PAUSE_AT:
                self.flow.pause_reading()
            return
        self._advance()
        if self.phase is _Phase.BODY and not self.closed:
            # A pause of body_timeout ends the request, and so does a body slower on average than
            # BODY_MIN_RATE after its first body_timeout: a byte now and then cannot hold a connection.
            timeout = self.s.body_timeout
            self.deadline = min(self.loop.time() + timeout,
                                self.body_started + timeout + self.body.size / BODY_MIN_RATE)

    def eof_received(self):
        self.parser.receive_data(b"")
        if self.phase is not _Phase.BUSY and self.phase is not _Phase.DRAINING:
            self._advance()
        return True

    def _advance(self):
        while not self.closed:
            try:
                event = self.parser.next_event()
            except HTTPProtocolError as exc:
                self._refuse(exc.status, exc.message)
                return
            if event is NEED_DATA:
                return
            if isinstance(event, RequestHead):
                self.head = event
                self.body = _BodyBuffer()
                self.body_started = self.loop.time()
                self._enter(_Phase.BODY, self.body_started)
                if event.expect_continue:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif isinstance(event, Body):
                try:
                    self.body.write(event.data)
                except OSError as exc:
                    self._no_room(exc)
                    return
            elif isinstance(event, EndOfMessage):
                self._enter(_Phase.BUSY, self.body_started)  # no timeout: any start will do
                try:
                    body = self.body.finish()
                except OSError as exc:
                    self._no_room(exc)
                    return
                self._start(self.head, body)
                return
            elif isinstance(event, ConnectionEnded):
                self.transport.close()
                return

    def _no_room(self, exc):
        self.body.close()
        self._refuse(503, f"the server has no room for the request body ({exc.strerror})")

    def _refuse(self, status, message, headers=()):
        """Answer a request we cannot parse or wait for, then close the connection."""
        body = f"{status} {HTTPStatus(status).phrase}: {message}\n".encode()
        head = render_response_head(status, [("Content-Type", "text/plain; charset=utf-8"), *headers,
                                             ("Content-Length", str(len(body))), ("Connection", "close")])
        if not self.closed:
            self.transport.write(head + body)
            self.transport.close()
        access_log.info('%s "-" %d %d (%s)', self.peer, status, len(body), message)
        self.closed = True

    def _request_parts(self, head):
        """(path, query string, headers) of a request head, as the client sent them."""
        target = head.target
        if target.startswith("/"):
            raw_path, _, query = target.partition("?")
        elif target.startswith(("http://", "https://")):
            try:
                split = urllib.parse.urlsplit(target)
            except ValueError as exc:
                raise HTTPError(400, f"malformed request target: {exc}")
            raw_path, query = split.path or "/", split.query
        else:
            raise HTTPError(400, "the request target must be a path starting with /")
        headers = {}
        for name, value in head.headers:
            if name in headers:
                value = headers[name] + ("; " if name == "cookie" else ", ") + value
            headers[name] = value
        path = urllib.parse.unquote(raw_path) if "%" in raw_path else raw_path
        return path, query, headers

    def _start(self, head, body):
        """A whole request has arrived: upgrade it, or hand it to the app in a thread."""
        alone, self.alone = self.alone, None
        try:
            path, query, headers = self._request_parts(head)
        except HTTPError as exc:
            self._refuse(exc.status, exc.detail)
            return
        known = dict(headers) if alone is not None else None  # as sent: a trusted proxy's are rewritten
        request = Request(head.method, path, query, headers, body, "http", self.remote_addr, self.app)
        if alone is not None and not body and not head.expect_continue and not self.parser.pending_size \
                and "upgrade" not in request.headers:
            # the read that started this request held it whole and nothing more: the same bytes
            # again make the same request (see _KNOWN_HEADS). Not an upgrade: its key is new each time
            if len(_KNOWN_HEADS) >= _KNOWN_HEADS_KEPT:
                _KNOWN_HEADS.clear()
            _KNOWN_HEADS[alone] = (head, path, query, known)  # (a request from another peer or app trusts
            # its own proxies: its Request applies its app's trusted_proxies to the headers as sent)
        self._run(head, request)

    def _run(self, head, request):
        """Upgrade `request`, answer it on the loop (asok's own pages), or hand it to the app in a thread."""
        headers = request.headers
        if "sec-websocket-key" in headers or ("upgrade" in headers and "websocket" in headers["upgrade"].lower()):
            route, params = _find_ws_route(self.app, request.path)
            if route is not None:
                self.loop.create_task(self._upgrade(head, request, route, params))
                return
        started = time.perf_counter()
        app = self.app
        if app.loop_first(request):  # asok's own page: no thread round trip (see Asok.loop_first)
            request._on_loop = True
            try:
                response = app.handle(request)
            except _OffLoop:  # something on the way needs a thread: the request starts again in one
                request._retry()
            else:  # answered now, unless requests wait behind it (then later: no recursion per request)
                if self.parser.pending_size:
                    self.loop.call_soon(self._handled, head, response, started)
                else:
                    self._handled(head, response, started)
                return
        self._in_thread(head, request, started)

    def _in_thread(self, head, request, started):
        """Hand `request` to the app in a worker thread; its response comes back to the loop."""
        loop = self.loop

        def done(future):
            exc = future.exception()
            if exc is None:
                response = future.result()
            else:  # handle() answers every error itself; this is a last resort
                log.error("handling %s %s failed", head.method, head.target, exc_info=exc)
                response = Response("500 Internal Server Error", 500, content_type="text/plain")
            loop.call_soon_threadsafe(self._handled, head, response, started)

        self.app.executor.submit(self.app.handle, request).add_done_callback(done)

    def _handled(self, head, response, started):
        keep_alive = head.keep_alive and not self.s.stopping
        if type(response.body) is not bytes and response.streamed:
            self.loop.create_task(self._stream(head, response, keep_alive, started))
            return
        try:
            out, mode = self._head(head, response, keep_alive)
        except ValueError as exc:  # a header value with CR/LF or a control character
            log.error("%s %s: the response cannot be sent: %s", head.method, head.target, exc)
            response = self.app.error_response(500, "the response had an invalid header")
            out, mode = self._head(head, response, keep_alive)
        body = b"" if mode == "none" else response.body
        if not self.closed:
            if len(body) < 65536:
                self.transport.write(out + body)
            else:
                self.transport.write(out)
                self.transport.write(body)
        self._finished(head, response, len(body), keep_alive, started)

    def _head(self, head, response, keep_alive):
        """The response head, and how its body goes (see response_framing)."""
        fields = response.headers
        # the usual page (one field, its length to add, kept alive): its head but the length is
        # made once per second (the Date) for each status and field
        plain = len(fields) == 1 and keep_alive and head.version == "HTTP/1.1" and type(fields[0]) is tuple
        if plain:
            date = self.s.date()
            known = _PLAIN_HEADS.get((response.status, fields[0]))
            if known is not None and known[0] == date and type(response.body) is bytes and head.method != "HEAD":
                return known[1] + b"%d\r\n\r\n" % len(response.body), "length"
        length, mode = response_framing(head.method, response.status, fields, response.body, head.version)
        if plain and mode == "length" and length is not None:
            first = render_response_head(response.status, [("Date", date), fields[0]])[:-2] + b"Content-Length: "
            _keep(_PLAIN_HEADS, (response.status, fields[0]), (date, first), 64)
            return first + b"%d\r\n\r\n" % length, mode
        headers = [("Date", self.s.date()), *response.headers]
        if length is not None:
            headers.append(("Content-Length", str(length)))
        elif mode == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
        if not keep_alive or mode == "close":
            headers.append(("Connection", "close"))
        elif head.version == "HTTP/1.0":
            headers.append(("Connection", "keep-alive"))
        return render_response_head(response.status, headers), mode

    def _finished(self, head, response, sent, keep_alive, started):
        """Log the request, then close or wait for the next one (perhaps already buffered)."""
        if access_log.isEnabledFor(logging.INFO):
            access_log.info('%s "%s %s %s" %d %d %.1fms', self.peer, head.method, head.target,
                            head.version, response.status, sent, (time.perf_counter() - started) * 1000)
        if self.closed:
            return
        if not keep_alive:
            self.transport.close()
            self.closed = True
            if not self.flow.writable.is_set():
                self._watch_writes()
            return
        parser, flow = self.parser, self.flow
        parser.start_next_cycle()
        pending = parser.pending_size
        following = _Phase.HEAD if pending else _Phase.IDLE
        if not flow.writable.is_set():  # the client is not reading: answer no more until it does
            self.draining = following
            self._enter(_Phase.DRAINING)
            self._watch_writes()
            flow.pause_reading()
            return
        self._enter(following)
        if flow.paused:
            flow.resume_reading()
        if pending or not parser.waiting:  # else nothing to parse until data_received
            self._advance()

    async def _stream(self, head, response, keep_alive, started):
        """Send an iterable body, chunked on HTTP/1.1 (closing the connection on HTTP/1.0);
        each next() runs in a thread, as the generator is application code."""
        try:
            out, mode = self._head(head, response, keep_alive)
        except ValueError as exc:
            log.error("%s %s: the response cannot be sent: %s", head.method, head.target, exc)
            self._handled(head, self.app.error_response(500, "the response had an invalid header"), started)
            return
        keep_alive = keep_alive and mode != "close"
        chunked = mode == "chunked"
        if not self.closed:
            self.transport.write(out)
        sent = 0
        iterator = iter(response.body)
        try:
            while not self.closed:
                piece = await _in_thread(self.loop, self.app.executor, next, iterator, None)
                if piece is None:
                    break
                if mode == "none" or not piece:
                    continue
                sent += len(piece)
                self.transport.write(chunk(piece) if chunked else piece)
                await self._drained()
        except Exception:
            log.exception("streaming the response to %s %s failed", head.method, head.target)
            keep_alive = False
            chunked = False
        finally:
            close = getattr(iterator, "close", None)
            if close:
                close()
        if chunked and not self.closed:
            self.transport.write(LAST_CHUNK)
        self._finished(head, response, sent, keep_alive, started)

    async def _upgrade(self, head, request, route, params):
        """Check the handshake, open the session, answer 101, and hand the transport to a
        _WebSocketConnection, which runs the route's handler."""
        if head.version != "HTTP/1.1":
            self._refuse(400, "a WebSocket upgrade needs HTTP/1.1")
            return
        try:
            accept = ws_check_handshake(head.method, request.headers)
        except WebSocketHandshakeError as exc:
            self._refuse(exc.status, str(exc), exc.headers)
            return
        if not _origin_allowed(request, route):
            self._refuse(403, f"origin {request.headers.get('origin')} may not open this WebSocket")
            return
        try:
            await _in_thread(self.loop, self.app.executor, lambda: request.session)
        except StoreUnavailable as exc:
            log.error("WebSocket upgrade %s: %s", head.target, exc)
            self._refuse(503, f"the session storage is unavailable ({exc.reason})")
            return
        except Exception:
            log.exception("WebSocket upgrade %s failed", head.target)
            self._refuse(500, "the server failed to open this WebSocket")
            return
        if self.closed:
            return
        request.params = params
        self.transport.write(render_response_head(101, [
            ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)]))
        access_log.info('%s "%s %s %s" 101 websocket', self.peer, head.method, head.target, head.version)
        self.closed = True  # this object is done with the transport
        self.s.connections.discard(self)
        conn = _WebSocketConnection(self.s, self.transport, self.peer, self.flow, route.max_size, request)
        self.transport.set_protocol(conn)
        self.s.connections.add(conn)
        leftover = self.parser.pending_bytes
        if leftover:
            conn.data_received(leftover)
        conn.read_more()
        # while the socket is open this frame holds only what the handler has (ws, ws.request):
        # not this HTTP connection's parser and buffers, nor the request's head and header list
        del self, head, leftover, accept
        request = None  # ws.request holds it for as long as the handler wants it (/asok/live: not long)
        await _run_ws_handler(route, conn.ws, params)

    def shutdown(self):
        """Close an idle connection now; a busy one closes after its response."""
        if self.phase is _Phase.IDLE or self.phase is _Phase.HEAD:
            self.transport.close()


# ═══ 17c. The asyncio server: the WebSocket connection, serve() ═══════════════════════════════════

class _WebSocketConnection(_Connection):
    """A WebSocket on the built-in server, protocol of the transport from the 101 on: drives the
    WSConnection, pings a quiet peer, and bounds what one peer costs (WS_MAX_OUTPUT,
    WS_MAX_INPUT, WS_FRAMES_PER_TURN, the write deadline). The handler's side is _ServerWebSocket."""

    def __init__(self, state, transport, peer, flow, max_size, request):
        self.s = state
        self.loop = asyncio.get_running_loop()
        self.transport = transport
        self.peer = peer
        self.flow = flow
        self.wsconn = WSConnection(max_size=max_size)
        self.ws = _ServerWebSocket(request, self)
        self.closed = False
        self.heard = True
        self.owed_pong = None    # the payload of the latest ping not answered yet (the peer is not reading)
        self.waiting = 0         # bytes of sends waiting for the peer to read
        self.turn = None         # the next turn of the loop, when frames are left to handle
        self._enter(_Phase.WS)

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.ws._closed(CloseCode.ABNORMAL, "connection lost")

    def pause_writing(self):
        self.flow.writable.clear()
        if self.phase is _Phase.WS:  # a peer that does not read is not read from (so it cannot make us
            self.flow.pause_reading()  # answer more), and is dropped if it reads nothing for body_timeout
            self._watch_writes()

    def resume_writing(self):
        self.flow.writable.set()
        if self.phase is _Phase.WS:
            self.flow.stall = None
            self.heard = True
            self._enter(_Phase.WS)
            if self.owed_pong is not None and self.wsconn.state == "OPEN":
                self.transport.write(self.wsconn.send(Pong(self.owed_pong)))
            self.owed_pong = None
            self.read_more()

    def _phase_over(self, now):
        if self.phase is _Phase.WS:
            self._tick(now)
        elif self.phase is _Phase.WS_CLOSING:
            self.transport.abort()

    def _tick(self, now):
        """Every ping_interval: a peer heard from since the last tick gets a ping; one that
        stayed silent (no pong, no data) is taken for dead and the handler sees 1006."""
        if not self.heard:
            self.ws._closed(CloseCode.ABNORMAL, "peer stopped answering pings")
            self.transport.abort()
            return
        self.heard = False
        if self.wsconn.state == "OPEN":
            self.transport.write(self.wsconn.send(Ping(b"asok")))
        self._enter(_Phase.WS, now)
        if self.transport.get_write_buffer_size() > len(b"asok") + 2:  # more than our ping waits: is it read?
            self._watch_writes()

    def data_received(self, data):
        self.heard = True
        self.wsconn.receive_data(data)
        if self.turn is None:
            self._handle()

    def eof_received(self):
        self.data_received(b"")
        return False

    def _handle(self):
        """Handle the frames the peer sent, WS_FRAMES_PER_TURN at a time: with more left, reading
        pauses and the rest waits for the next turn of the loop, so a peer sending a flood of
        tiny frames takes its turn like everyone else."""
        self.turn = None
        conn = self.wsconn
        try:
            for event in conn.events(max_frames=WS_FRAMES_PER_TURN):
                if isinstance(event, (TextMessage, BytesMessage)):
                    self.ws._deliver(event.data)
                elif isinstance(event, Ping):
                    if conn.state != "OPEN":  # once our close is out, no pong is owed (RFC 6455 §5.5.2)
                        pass
                    elif self.flow.writable.is_set():
                        self.transport.write(conn.send(Pong(event.payload)))
                    else:  # §5.5.3: only the latest ping needs a pong; it goes when the peer reads
                        self.owed_pong = event.payload
                elif isinstance(event, CloseConnection):
                    if conn.state != "CLOSED" and event.code != CloseCode.ABNORMAL:
                        self.transport.write(conn.send(CloseConnection(event.code)))
                    self.ws._closed(event.code, event.reason)
                    self.transport.close()
                    return
        except WebSocketError as exc:
            if conn.state == "OPEN":
                self.transport.write(conn.send(CloseConnection(exc.close_code, str(exc))))
            self.ws._closed(exc.close_code, str(exc))
            self.transport.close()
            return
        if conn.frames_left and not self.closed:
            self.turn = self.loop.call_soon(self._handle)
        self.read_more()

    def read_more(self):
        """Read from the peer again unless it is not reading (writes pending), the handler has
        WS_MAX_INPUT bytes of messages still to take, or frames wait for their turn."""
        if self.flow.writable.is_set() and self.ws.queued < WS_MAX_INPUT and self.turn is None:
            self.flow.resume_reading()
        else:
            self.flow.pause_reading()

    async def write(self, event):
        if self.closed:
            raise ConnectionClosed(CloseCode.ABNORMAL, "connection lost")
        frame = self.wsconn.send(event)
        queued = self.transport.get_write_buffer_size() + self.waiting
        if queued and queued + len(frame) > WS_MAX_OUTPUT:
            log.warning("%s: dropping a WebSocket peer that leaves %d bytes unread (WS_MAX_OUTPUT is %d)",
                        self.peer, queued, WS_MAX_OUTPUT)
            self.ws._closed(CloseCode.ABNORMAL, "peer does not read what it is sent")
            self.transport.abort()
            raise ConnectionClosed(CloseCode.ABNORMAL, "peer does not read what it is sent")
        self.waiting += len(frame)
        try:
            while not self.flow.writable.is_set() and not self.closed:
                await self.flow.writable.wait()
        finally:
            self.waiting -= len(frame)
        if self.closed or self.wsconn.state != "OPEN":
            raise ConnectionClosed(*(self.ws.closed or (CloseCode.ABNORMAL, "connection lost")))
        self.transport.write(frame)

    async def close(self, code, reason):
        if self.closed or self.wsconn.state != "OPEN":
            return
        self.transport.write(self.wsconn.send(CloseConnection(code, reason)))
        self.ws._closed(code, reason)
        self._enter(_Phase.WS_CLOSING)

    def shutdown(self):
        """Say 1001 to the peer and close soon after."""
        if self.phase is _Phase.WS and self.wsconn.state == "OPEN":
            self.transport.write(self.wsconn.send(CloseConnection(CloseCode.GOING_AWAY, "server shutting down")))
            self.ws._closed(CloseCode.GOING_AWAY, "server shutting down")
            self.loop.call_later(1.0, self.transport.close)


def _connection_limit(requested):
    """`requested` (default MAX_CONNECTIONS), lowered to what the descriptor limit allows after
    _FDS_KEPT, so that a connection over the limit can still be accepted and told 503 rather
    than left waiting. The soft descriptor limit is raised to the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    allowed = max(16, soft - _FDS_KEPT - _session_files_open()) if soft != resource.RLIM_INFINITY else MAX_CONNECTIONS
    limit = min(requested or MAX_CONNECTIONS, allowed)
    if requested and limit < requested:
        log.warning("max_connections=%d lowered to %d: the process may open %d files", requested, limit, soft)
    return limit


class _SharedListener:
    """Accepts from a listening socket that other processes accept from too (`--workers`).
    asyncio's own server accepts every pending connection at each wake-up, so the first
    worker to wake takes a whole burst: ten keep-alive connections all on one of two
    workers, the other idle. This one takes a connection at a time, and when `slots` (a
    count of open connections per worker, in memory the workers share) shows this worker
    holding more than another, it leaves the socket to the others for a moment, a few
    times at most, so a wedged worker cannot hold connections back. It has the members
    serve() uses of asyncio.Server."""

    def __init__(self, loop, sock, factory, state, slots=None, index=0):
        self.loop, self.factory, self.state, self.sockets = loop, factory, state, [sock]
        self.slots, self.index, self.pending, self.deferred, self.closed = slots, index, 0, 0, False
        self.tasks = set()
        sock.setblocking(False)
        self._publish()
        loop.add_reader(sock.fileno(), self._accept)

    def _publish(self):
        mine = len(self.state.connections) + self.pending
        if self.slots is not None:
            self.slots[self.index] = mine
        return mine

    def _accept(self):
        mine = self._publish()
        if self.slots is not None and self.deferred < ACCEPT_DEFER_TIMES and mine > min(self.slots):
            self.deferred += 1
            self.loop.remove_reader(self.sockets[0].fileno())
            self.loop.call_later(ACCEPT_DEFER, self._resume)
            return
        self.deferred = 0
        try:
            conn, _ = self.sockets[0].accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up while it queued
        except OSError as exc:  # EMFILE and the like: the connection cap answers those it can
            log.warning("accept failed: %s", exc)
            return
        self.pending += 1
        self._publish()
        task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn))
        self.tasks.add(task)
        task.add_done_callback(self._accepted)

    def _accepted(self, task):
        self.tasks.discard(task)
        self.pending -= 1
        if not task.cancelled() and task.exception() is not None:
            log.warning("accepted connection failed: %s", task.exception())

    def _resume(self):
        if not self.closed:
            self.loop.add_reader(self.sockets[0].fileno(), self._accept)

    def close(self):
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sockets[0].fileno())
        if self.slots is not None:
            self.slots[self.index] = 1 << 62  # a stopping worker is never the least loaded

    async def wait_closed(self):
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def serve(app: Asok, host: str = "127.0.0.1", port: int = 8000, *,
                ready: Callable[[tuple[Any, ...]], Any] | None = None,
                header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                idle_timeout: float = IDLE_TIMEOUT, ping_interval: float = WS_PING_INTERVAL,
                stop: asyncio.Event | None = None, sock: socket.socket | None = None,
                max_connections: int | None = None) -> None:
    """Serve `app` until SIGINT / SIGTERM (or until the `stop` event is set), on host:port or
    on `sock`, a listening socket already bound (how `--workers` shares one)."""
    loop = asyncio.get_running_loop()
    sys.setswitchinterval(SWITCH_INTERVAL)
    state = _ServerState(app, header_timeout, body_timeout, idle_timeout, ping_interval,
                         _connection_limit(max_connections))
    if sock is not None:
        slots, index, _ = _worker_slots or (None, 0, None)
        server = _SharedListener(loop, sock, lambda: _HTTPConnection(state), state, slots, index)
    else:
        server = await loop.create_server(lambda: _HTTPConnection(state), host, port, backlog=1024)
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    tick = min(SWEEP_EVERY, header_timeout, body_timeout, idle_timeout, ping_interval) / 4

    master = _worker_slots[2] if _worker_slots is not None else None  # (not getppid(): it may be gone already)

    def sweep():
        state.sweep(loop.time())
        if master is not None and os.getppid() != master and not stop.is_set():
            log.warning("the --workers process that started this worker is gone; stopping")
            stop.set()  # killed with -9, it could not stop us: a worker left alone would hold the port
        sweeper[0] = loop.call_later(tick, sweep)

    sweeper = [loop.call_later(tick, sweep)]
    bound = server.sockets[0].getsockname()
    log.info("serving %s on http://%s:%d%s", app.root, bound[0], bound[1], " (debug)" if app.debug else "")
    app.log_startup()
    if ready is not None:
        ready(bound)
    await stop.wait()
    log.info("shutting down: finishing %d connection(s)", len(state.connections))
    state.stopping = True
    server.close()
    for conn in list(state.connections):
        conn.shutdown()
    deadline = loop.time() + SHUTDOWN_GRACE
    while state.connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    sweeper[0].cancel()
    for conn in list(state.connections):
        conn.transport.abort()
    await server.wait_closed()


# ═══ 18. Testing: TestClient, TestResponse, Headers ═══════════════════════════════════════════════

TEST_MAX_REDIRECTS = 20  # TestClient(follow_redirects=True) gives up past this many hops
_REDIRECT_CODES = (301, 302, 303, 307, 308)


class Headers(Mapping):
    """A response's header fields as a read-only mapping whose keys ignore case:
    `headers["content-type"]`, `"etag" in headers`, `headers.get("x-a", "")`. A field sent
    more than once reads as its values joined with ", " (RFC 9110 §5.3); `getlist(name)` gives
    them one by one (Set-Cookie, say). `raw` is the (name, value) pairs as sent."""

    def __init__(self, raw: Iterable[tuple[str, str]] = ()) -> None:
        self.raw = list(raw)

    def getlist(self, name: str) -> list[str]:
        """Every value of the field `name`, in the order sent; [] when there is none."""
        name = name.lower()
        return [v for k, v in self.raw if k.lower() == name]

    def __getitem__(self, name: str) -> str:
        values = self.getlist(name)
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.lower() for k, _ in self.raw))

    def __len__(self) -> int:
        return len({k.lower() for k, _ in self.raw})

    def __repr__(self):
        return f"Headers({self.raw!r})"


class TestResponse:
    """What a TestClient call returns: `status` (or `status_code`), `headers` (a case-insensitive
    `Headers`), the body as `body` / `content` / `data` (bytes), `text` and `json()`; `url` is the
    path that answered, `history` the redirects followed to get here."""

    __test__ = False  # a class named Test... is not a test class: pytest must not collect it

    def __init__(self, response: Response, url: str = "", history: "Iterable[TestResponse]" = ()) -> None:
        self.status = response.status
        self.headers = Headers(response.headers)
        body = response.body
        self.body = body if not response.streamed else b"".join(body)
        self.url = url
        self.history = list(history)

    @property
    def status_code(self) -> int:
        """The status, under the name Flask, Starlette and requests use."""
        return self.status

    @property
    def content(self) -> bytes:
        """The body as bytes (httpx's and Starlette's name)."""
        return self.body

    @property
    def data(self) -> bytes:
        """The body as bytes (Flask's name)."""
        return self.body

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of the header field `name` (any case), or `default`."""
        values = self.headers.getlist(name)
        return values[0] if values else default

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def get_json(self) -> Any:
        """The body parsed as JSON (Flask's name)."""
        return self.json()

    def __repr__(self):
        return f"<TestResponse {self.status}>"


def _test_body(data, json_value, content):
    """(body bytes, content type or None) from the data= / json= / content= a test passed."""
    given = [name for name, v in (("data", data), ("json", json_value), ("content", content)) if v is not None]
    if len(given) > 1:
        raise TypeError(f"give one of data=, json= and content=, not {' and '.join(given)}")
    if json_value is not None:
        return json.dumps(json_value).encode(), "application/json"
    if isinstance(data, (str, bytes)):
        content, data = data, None
    if data is not None:
        return urllib.parse.urlencode(data, doseq=True).encode(), "application/x-www-form-urlencoded"
    if content is not None:
        return content.encode() if isinstance(content, str) else bytes(content), None
    return None, None


class TestClient:
    """Drive an app without a server, as Flask's and Starlette's test clients do:
    `client.get("/", params={"q": "x"})`, `client.post(url, data={...})` or `json=...`,
    `follow_redirects=True`, `headers={...}` on every method; cookies are kept between calls.
    `client.live("/", "Counter")` is a handle on a component of that page (see LiveHandle)."""

    __test__ = False

    def __init__(self, app: Asok, scheme: str = "http", host: str = "testserver", *,
                 follow_redirects: bool = False) -> None:
        self.app = app
        self.scheme = scheme
        self.host = host
        self.follow_redirects = follow_redirects
        self.cookies = {}

    def __enter__(self) -> "TestClient":
        """`with TestClient(app) as client:`; the client's cookies are dropped at the end."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cookies.clear()

    def request(self, method: str, url: str, *,
                params: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
                data: Mapping[str, Any] | str | bytes | None = None, json: Any = None,
                content: str | bytes | None = None,
                headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                follow_redirects: bool | None = None, json_body: Any = None, body: bytes = b"",
                files: Mapping[str, Any] | None = None) -> TestResponse:
        """Send one request through the app and return a TestResponse. `url` is a path (with a
        query string if you like) or a full URL; `params` (a dict or pairs) is added to its query;
        `data` is form fields (a dict) or a raw body, `json` a value sent as JSON, `content` raw bytes.
        Redirects are followed when `follow_redirects` (default: the client's) is true, as a browser
        does: 301, 302 and 303 become a GET without a body (a HEAD stays a HEAD), 307 and 308 repeat
        the request; a redirect to another host is not followed but returned.
        `files={"avatar": ("me.png", b"...", "image/png")}` sends `data` and the files as
        multipart/form-data."""
        if files is not None:
            payload, content_type = _multipart_body(data, files)
        else:
            payload, content_type = _test_body(data, json if json is not None else json_body, content)
        fields = {k.lower(): v for k, v in (headers.items() if isinstance(headers, dict) else headers or ())}
        if content_type:
            fields.setdefault("content-type", content_type)
        if payload is None:
            payload = body
        parts = urlsplit(url)
        scheme, host = parts.scheme or self.scheme, parts.netloc or fields.get("host", self.host)
        query = parts.query
        if params:
            extra = urllib.parse.urlencode(params, doseq=True)
            query = f"{query}&{extra}" if query else extra
        follow = self.follow_redirects if follow_redirects is None else follow_redirects
        history = []
        while True:
            response = self._send(method.upper(), scheme, host, parts.path or "/", query, fields, payload)
            location = response.header("location")
            if not (follow and response.status in _REDIRECT_CODES and location):
                break
            target = urlsplit(urllib.parse.urljoin(f"{scheme}://{host}{response.url}", location))
            if target.netloc != host:
                break  # off the app: the test sees the redirect
            if len(history) == TEST_MAX_REDIRECTS:
                raise AssertionError(f"more than {TEST_MAX_REDIRECTS} redirects from {method} {url}")
            history.append(response)
            if response.status == 303 and method.upper() != "HEAD" or response.status in (301, 302) and \
                    method.upper() not in ("GET", "HEAD"):
                method, payload = "GET", b""
                fields.pop("content-type", None)
            scheme, parts, query = target.scheme, target, target.query
        response.history = history
        return response

    def _send(self, method, scheme, host, path, query, fields, payload):
        headers = dict(fields, host=host)
        if self.cookies:
            headers.setdefault("cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        request = Request(method, urllib.parse.unquote(path), query, headers, payload, scheme, "127.0.0.1", self.app)
        answer = self.app.handle(request)
        if response_framing(method, answer.status, answer.headers, answer.body)[1] == "none":
            answer.body = b""  # a 1xx, 204 or 304 has no body on the wire (the headers stay as handle() made them)
        response = TestResponse(answer, path + (f"?{query}" if query else ""))
        for value in response.headers.getlist("set-cookie"):
            cookie_name, _, rest = value.partition("=")
            if "Max-Age=0" in value:
                self.cookies.pop(cookie_name, None)
            else:
                self.cookies[cookie_name] = rest.split(";")[0]
        return response

    def get(self, url: str, **kwargs: Any) -> TestResponse:
        """GET `url`; keyword arguments as for `request`."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> TestResponse:
        """POST to `url`; keyword arguments as for `request`."""
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> TestResponse:
        """PUT to `url`; keyword arguments as for `request`."""
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> TestResponse:
        """PATCH `url`; keyword arguments as for `request`."""
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> TestResponse:
        """DELETE `url`; keyword arguments as for `request`."""
        return self.request("DELETE", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> TestResponse:
        """HEAD `url`: the status and headers of a GET, no body."""
        return self.request("HEAD", url, **kwargs)

    def options(self, url: str, **kwargs: Any) -> TestResponse:
        """OPTIONS `url`; keyword arguments as for `request`."""
        return self.request("OPTIONS", url, **kwargs)

    @property
    def sid(self) -> str | None:
        """The id of the session the client's cookie names, or None."""
        token = self.cookies.get(SESSION_COOKIE)
        return self.app._cookie_signer.unsign(token) if token else None

    def publish(self, topic: str, payload: Any = None, timeout: float = 5.0) -> None:
        """`app.publish(topic, payload)`, then wait until this process has applied it (and
        pushed the new HTML to the handles that show the component)."""
        self.app.publish(topic, payload)
        self.app.live.settle(timeout)

    def live(self, path: str, name: str, index: int = 0) -> "LiveHandle":
        """Load the page at `path` and return a LiveHandle on its `index`-th `name` component,
        joined as alive.js joins: it receives pushes (`handle.pushes`) until `handle.close()`."""
        page = self.get(path)
        if page.status != 200:
            raise AssertionError(f"GET {path} answered {page.status}")
        roots = [el for el in _parse_html(page.text).walk() if "data-asok-component" in el.attrs]
        matches = [el for el in roots if el.attrs["data-asok-component"] == name]
        if len(matches) <= index:
            found = [el.attrs["data-asok-component"] for el in roots]
            raise AssertionError(f"no component {name!r} #{index} on {path} (found {found})")
        root = matches[index]
        csrf = re.search(r'<meta name="csrf-token" content="([^"]*)"', page.text)
        page = [[el.attrs.get("id", ""), el.attrs["data-asok-component"], el.attrs.get("data-asok-state", "")]
                for el in roots]
        return LiveHandle(self, root.attrs.get("id", ""), name, root.attrs.get("data-asok-state", ""),
                          csrf.group(1) if csrf else "", html=root.inner_html, path=path, page=page)


def _find_components(text):
    """(cid, name, signed state) of each component root on a page, in page order."""
    return [(el.attrs.get("id", ""), el.attrs["data-asok-component"], el.attrs.get("data-asok-state", ""))
            for el in _parse_html(text).walk() if "data-asok-component" in el.attrs]


# ═══ 19a. Testing: a small HTML tree and CSS selectors, for LiveHandle's user actions ═════════════

_VOID_TAGS = frozenset("area base br col embed hr img input link meta source track wbr".split())
_SELF_CLOSING = frozenset("li option p tr td th dt dd".split())  # `<li>a<li>b`: the second closes the first
_BLOCK_TAGS = frozenset("address article aside blockquote br dd div dl dt fieldset figure footer form "
                        "h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table td th tr ul".split())


class _Node:
    """An element of a parsed fragment: tag, attrs (a dict), children (nodes and strings), parent,
    and `inner_html`, the source text between its tags."""

    def __init__(self, tag, attrs, parent, source="", inner=0):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []
        self._source, self._inner, self._end = source, inner, None

    @property
    def inner_html(self):
        return self._source[self._inner:self._end]

    def walk(self, into_components=True):
        """The elements below this one, in document order; `into_components=False` skips the
        insides of nested components (their events go to them, not to this one)."""
        for child in self.children:
            if isinstance(child, _Node):
                yield child
                if into_components or "data-asok-component" not in child.attrs:
                    yield from child.walk(into_components)

    @property
    def text(self):
        """The text content, with runs of white space (and element breaks) as one space."""
        parts = []

        def collect(node):
            for child in node.children:
                if isinstance(child, str):
                    parts.append(child)
                elif child.tag not in ("script", "style", "template"):
                    gap = " " if child.tag in _BLOCK_TAGS else ""
                    parts.append(gap)
                    collect(child)
                    parts.append(gap)

        collect(self)
        return " ".join("".join(parts).split())

    def closest(self, attr):
        """This element or its nearest ancestor having `attr`, within the component; else None."""
        node = self
        while node is not None and node.tag is not None:
            if attr in node.attrs:
                return node
            if "data-asok-component" in node.attrs:
                return None
            node = node.parent
        return None

    def describe(self):
        attrs = "".join(f' {k}="{v}"' if v else f" {k}" for k, v in self.attrs.items())
        text = self.text
        return f"<{self.tag}{attrs}>" + (f" {text[:40]!r}" if text else "")


class _TreeBuilder(html.parser.HTMLParser):
    def __init__(self, source):
        super().__init__(convert_charrefs=True)
        self.source = source
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self.root = self.node = _Node(None, {}, None, source, 0)
        self.root._end = len(source)

    def _offset(self):
        line, col = self.getpos()
        return self.line_starts[line - 1] + col

    def handle_starttag(self, tag, attrs):
        if tag in _SELF_CLOSING and self.node.tag == tag:
            self._close(self.node, self._offset())
        inner = self._offset() + len(self.get_starttag_text())
        node = _Node(tag, {k: v or "" for k, v in attrs}, self.node, self.source, inner)
        self.node.children.append(node)
        if tag not in _VOID_TAGS:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS:  # `<div/>`: nothing inside
            self._close(self.node, self.node._inner)

    def handle_endtag(self, tag):
        open_node = self.node
        while open_node.tag is not None and open_node.tag != tag:
            open_node = open_node.parent
        if open_node.tag is not None:  # an end tag with nothing open to close is ignored
            end = self._offset()
            node = self.node
            while node is not open_node:
                node = self._close(node, end)
            self._close(open_node, end)

    def _close(self, node, end):
        node._end = end
        self.node = node.parent
        return node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def _parse_html(source):
    """The element tree of an HTML fragment or page (the root node has tag None)."""
    builder = _TreeBuilder(source)
    builder.feed(source)
    builder.close()
    node = builder.node
    while node is not builder.root:  # elements left open end where the source ends
        node = builder._close(node, len(source))
    return builder.root


_CSS_TOKEN = re.compile(r"""(?P<comb>[>,])|(?P<tag>[a-zA-Z][\w-]*|\*)|\#(?P<id>[\w-]+)|\.(?P<cls>[\w-]+)
    |\[\s*(?P<attr>[\w.:-]+)\s*(?:(?P<op>[~^$*]?=)\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^\]\s]+))\s*)?\]""",
                        re.X)


def _parse_selector(selector):
    """A selector group as [[(combinator, [test, ...]), ...], ...]: tags, #id, .class, [attr],
    [attr=v] (also ~= ^= $= *=), the descendant and `>` combinators and `,`. Raises ValueError."""
    groups, chain, tests, comb, pos, text = [], [], [], None, 0, selector.strip()
    bad = ValueError(f"not a CSS selector this test client reads: {selector!r}")
    while pos < len(text):
        space = text[pos].isspace()
        while text[pos].isspace():
            pos += 1
        m = _CSS_TOKEN.match(text, pos)
        if not m:
            raise bad
        pos = m.end()
        if m.group("comb"):
            if not tests:
                raise bad
            chain.append((comb, tests))
            tests, comb = [], m.group("comb")
            if comb == ",":
                groups.append(chain)
                chain, comb = [], None
            continue
        if space and tests:
            chain.append((comb, tests))
            tests, comb = [], " "
        if m.group("tag"):
            tests.append(("tag", m.group("tag").lower()))
        elif m.group("id"):
            tests.append(("attr", "id", "=", m.group("id")))
        elif m.group("cls"):
            tests.append(("attr", "class", "~=", m.group("cls")))
        else:
            value = next((v for v in m.group("dq", "sq", "bare") if v is not None), None)
            tests.append(("attr", m.group("attr").lower(), m.group("op"), value))
    if not tests:
        raise bad
    chain.append((comb, tests))
    groups.append(chain)
    return groups


def _css_test(node, test):
    if test[0] == "tag":
        return test[1] in ("*", node.tag)
    _, name, op, value = test
    have = node.attrs.get(name)
    if have is None:
        return False
    return {None: True, "=": have == value, "~=": value in have.split(), "^=": have.startswith(value or "\0"),
            "$=": have.endswith(value or "\0"), "*=": bool(value) and value in have}[op]


def _css_match(node, chain):
    *rest, (comb, tests) = chain
    if node.tag is None or not all(_css_test(node, t) for t in tests):
        return False
    if not rest:
        return True
    parent = node.parent
    if comb == ">":
        return parent is not None and _css_match(parent, rest)
    while parent is not None:
        if _css_match(parent, rest):
            return True
        parent = parent.parent
    return False


def _directive_call(node, attr):
    """(method, args) written in a directive: "increment" -> ("increment", []), "add(5)" -> ("add", [5])."""
    method, _, rest = node.attrs[attr].strip().partition("(")
    try:
        args = json.loads(f"[{rest.rstrip().removesuffix(')')}]") if rest else []
    except ValueError:
        raise AssertionError(f"{attr}={node.attrs[attr]!r} on {node.describe()}: the arguments are not JSON")
    return method.strip(), args


def _form_fields(form):
    """What the browser's FormData would hold for `form` (as alive.js sends it: the last value of
    a repeated name), and the names of all its fields."""
    values, names = {}, set()
    for node in form.walk():
        name, kind = node.attrs.get("name"), node.attrs.get("type", "text").lower()
        if not name or node.tag not in ("input", "select", "textarea") or "disabled" in node.attrs:
            continue
        if node.tag == "input" and kind in ("submit", "button", "reset", "image", "file"):
            continue
        names.add(name)
        if node.tag == "textarea":
            values[name] = html.unescape(node.inner_html)
        elif node.tag == "select":
            options = [o for o in node.walk() if o.tag == "option"]
            chosen = [o for o in options if "selected" in o.attrs] or options[:1]
            if chosen:
                values[name] = chosen[-1].attrs.get("value", chosen[-1].text)
        elif kind not in ("checkbox", "radio") or "checked" in node.attrs:
            values[name] = node.attrs.get("value", "on" if kind in ("checkbox", "radio") else "")
    return values, names


# ═══ 19b. Testing: LiveHandle, a live component driven like a user (click, type, submit) ══════════

class LiveHandle:
    """One component on a page, driven through the live protocol without a socket or a browser.
    Read it as a user's actions, like LiveViewTest's `element(view, "button", "Add 1") |> render_click()`:

        counter = client.live("/", "Counter")
        counter.click("Add 1")                  # the element with that text, or a CSS selector
        counter.type("input[name=q]", "kiwi")   # its ws-model, ws-input or ws-change
        counter.submit("form", {"email": "a@b.c"})
        assert "Count: 11" in counter.text      # also .html, .state

    Each action sends the event alive.js would send and returns the reply ({id, html, state} or
    {id, error: {code, message}}); `call(method, *args)` sends any method by name. What the
    call's `emit()`s changed in other components comes with it, in `also` ([{cid, html, state}]).

    Like a page, a handle joins: it is a view, so other views' changes, published messages and
    timers reach it. Each push is kept in `pushes` (`wait_for_push()` waits for one), and one
    newer than what the handle shows replaces `html` and `state`, as in alive.js; `close()` is
    the page closing."""

    def __init__(self, client: TestClient, cid: str, name: str, state: str, csrf: str,
                 html: str | None = None, path: str = "/", page: list | tuple = ()) -> None:
        self.client = client
        self.cid = cid
        self.name = name
        self.state_token = state
        self.csrf = csrf
        self.html = html  # the component's inner HTML, as last rendered or pushed
        self.pushes = []  # every message pushed to this view, oldest first
        self.also = []  # {cid, html, state} of the other components the last call changed (emit)
        self._page = secrets.token_hex(4)  # ids are unique per page load, as alive.js makes them
        self._n = 0
        self._arrived = threading.Condition()
        self.conn = LiveConnection(client.sid, self._pushed)
        self.conn.path, _, self.conn.query_string = path.partition("?")
        self._held = None  # (save number, inner HTML) a reply's diff applies to, as alive.js's root.h
        # the page's components, as alive.js joins them: the others are there for emit()
        join = {"join": [[cid, name, self._ref], *(c for c in page if c[0] != cid)], "url": path, "csrf": csrf}
        for text in client.app.live.handle(self.conn, json.dumps(join)):
            self._pushed(json.loads(text).get("cid"), text)

    @property
    def state(self) -> dict[str, Any]:
        """The component's state, as signed into its last render, or, when the page holds a
        reference (the session saved it), as the session holds it."""
        state = StateToken.parse(self.state_token).state
        if state is None:
            saved = (self.client.app.sessions.load(self.conn.sid) or {}).get("live", {}).get(self.cid)
            state = saved["s"] if saved else None
        return state

    @property
    def _ref(self) -> str:
        """What alive.js sends as `state`: the reference inside the token, if it has one."""
        return json.loads(self.state_token.rpartition(".")[0]).get("r") or self.state_token

    def _pushed(self, cid, text):
        if cid != self.cid:  # another component of the page
            return
        message = json.loads(text)
        with self._arrived:
            self.pushes.append(message)
            if "html" in message and StateToken.parse(message["state"]).seq >= StateToken.parse(self.state_token).seq:
                self.state_token, self.html = message["state"], message["html"]
                self._held = (StateToken.parse(self.state_token).seq, self.html)
            self._arrived.notify_all()

    def wait_for_push(self, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:
        """Wait until this view has received `count` pushes in all; returns the last one."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.pushes) >= count, timeout):
                raise AssertionError(f"{self.cid}: {len(self.pushes)} push(es) after {timeout} s, not {count}")
            return self.pushes[-1]

    def close(self) -> None:
        """The page closes: this view stops receiving pushes (and its timers stop, if it was the last)."""
        self.client.app.live.leave(self.conn)

    @property
    def text(self) -> str:
        """The component's text as a user reads it: tags dropped, white space collapsed."""
        return _parse_html(self.html or "").text

    def send(self, message: dict[str, Any] | str) -> dict[str, Any]:
        """Send a raw message (dict or text) and return the reply as a dict."""
        text = message if isinstance(message, str) else json.dumps(message)
        if self.conn.sid != self.client.sid:  # the cookie changed (a sign-in): a new socket, as alive.js's next
            self.client.app.live.leave(self.conn)
            self.conn.sid = self.client.sid
        reply, *also = self.client.app.live.handle(self.conn, text)
        self.also = [json.loads(other) for other in also]
        return json.loads(reply)

    def call(self, method: str, *args: Any, **overrides: Any) -> dict[str, Any]:
        """Call `method` with `args` as alive.js would; `overrides` replace fields of the message."""
        self._n += 1
        held = self._held
        message = {"id": f"{self._page}:{self._n}", "cid": self.cid, "component": self.name,
                   "state": self._ref, "method": method, "args": list(args), "csrf": self.csrf}
        if held is not None:
            message["h"] = held[0]
        message.update(overrides)
        reply = self.send(message)
        if "d" in reply:  # a diff against the HTML held: the reply gets the whole HTML, as alive.js builds it
            reply["html"] = _html_patch(held[1], reply["d"])
        with self._arrived:  # a push that overtook the reply stays, as in alive.js
            if "error" not in reply and StateToken.parse(reply["state"]).seq >= StateToken.parse(self.state_token).seq:
                self.state_token = reply["state"]
                self.html = reply["html"]
                self._held = (StateToken.parse(self.state_token).seq, self.html)
        return reply

    def find(self, selector: str) -> list[_Node]:
        """The elements of this component matching the CSS `selector`, in document order."""
        groups = _parse_selector(selector)
        return [n for n in _parse_html(self.html or "").walk(into_components=False)
                if any(_css_match(n, chain) for chain in groups)]

    def _one(self, selector, attrs, action):
        """The one element `selector` finds, resolved to itself or the ancestor carrying one of `attrs`."""
        found = self.find(selector)
        targets = list({id(t): t for t in (next(filter(None, (n.closest(a) for a in attrs)), None)
                                             for n in found) if t is not None}.values())
        if len(targets) == 1:
            return targets[0]
        if not found:
            raise AssertionError(f"{action}: nothing in {self.name} matches {selector!r}")
        if not targets:
            raise AssertionError(f"{action}: {found[0].describe()} has no {' or '.join(attrs)} (nor has an ancestor)")
        raise AssertionError(f"{action}: {len(targets)} elements match {selector!r}: "
                             + ", ".join(t.describe() for t in targets) + "; give a selector that finds one")

    def click(self, target: str) -> dict[str, Any]:
        """Click the element whose text is `target` (or that the CSS selector `target` finds):
        send the `ws-click` of it or of its nearest ancestor with one, with its written arguments."""
        tree = _parse_html(self.html or "")
        wanted = " ".join(target.split())
        by_text = [n for n in tree.walk(into_components=False) if n.text == wanted and n.closest("ws-click")]
        targets = list({id(t): t for t in (n.closest("ws-click") for n in by_text)}.values())
        if len(targets) > 1:
            raise AssertionError(f"click({target!r}): {len(targets)} clickable elements have that text: "
                                 + ", ".join(t.describe() for t in targets) + "; give a CSS selector")
        if not targets:
            try:
                found = self.find(target)
            except ValueError:
                found = []
            if not found:
                clickable = [n.describe() for n in tree.walk(into_components=False) if "ws-click" in n.attrs]
                raise AssertionError(f"click({target!r}): no clickable element in {self.name} has that text "
                                     f"or matches it as a selector; there are: {', '.join(clickable) or 'none'}")
            targets = [self._one(target, ("ws-click",), f"click({target!r})")]
        method, args = _directive_call(targets[0], "ws-click")
        return self.call(method, *args)

    def type(self, selector: str, text: str) -> dict[str, Any]:
        """Type `text` into the field `selector` finds, as its events would send it: its `ws-model`
        property is set, or its `ws-input` (else `ws-change`) method is called with its written
        arguments and then the text."""
        found = self.find(selector)
        if len(found) == 1 and "ws-model" in found[0].attrs:
            return self.call("$model", found[0].attrs["ws-model"], text)
        field = self._one(selector, ("ws-input", "ws-change"), f"type({selector!r})")
        attr = "ws-input" if "ws-input" in field.attrs else "ws-change"
        method, args = _directive_call(field, attr)
        return self.call(method, *args, text)

    def submit(self, selector: str = "form", fields: Mapping[str, Any] | None = None,
               files: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Submit the form `selector` finds (or the form around it), as alive.js does for
        `ws-submit`: its method gets the form's fields as a dict, the values in the rendered
        HTML with `fields` put over them. Naming a field the form does not have is an error.
        `files` ({input name: (filename, bytes, content_type)}) are uploaded first, as the
        browser does (see upload()); a refused upload is returned as the reply."""
        form = self._one(selector, ("ws-submit",), f"submit({selector!r})")
        values, names = _form_fields(form)
        unknown = sorted(set(fields or ()) - names)
        if unknown:
            raise AssertionError(f"submit({selector!r}): the form has no field {', '.join(map(repr, unknown))} "
                                 f"(it has {', '.join(sorted(names)) or 'none'})")
        values.update(fields or {})
        if files:
            uploaded = self.upload(files)
            if "error" in uploaded:
                return uploaded
            values.update({k: {"$upload": ids[-1]} for k, ids in uploaded["files"].items()})
        method, args = _directive_call(form, "ws-submit")
        return self.call(method, *(args or [values]))

    def upload(self, files: Mapping[str, tuple[str, bytes, str]]) -> dict[str, Any]:
        """POST `files` ({input name: (filename, bytes, content_type)}) to /asok/upload for this
        component, as the browser does before a ws-submit with chosen files. Returns the answer:
        {"files": {name: [upload id]}} (send {"$upload": id} as the field's value) or {"error": ...}."""
        fields = {"cid": self.cid, "component": self.name, "state": self.state_token, "csrf_token": self.csrf}
        return self.client.post("/asok/upload", data=fields, files=files).json()

    def press(self, selector: str, key: str) -> dict[str, Any]:
        """Press `key` ("Enter", "Escape", ...) in the element `selector` finds: its
        `ws-keydown.<key>` (or its nearest ancestor's) is called with its written arguments."""
        attr = "ws-keydown." + key.lower()
        method, args = _directive_call(self._one(selector, (attr,), f"press({selector!r}, {key!r})"), attr)
        return self.call(method, *args)


# ═══ 20. Running an app: load_app, serve_workers, the reloader ════════════════════════════════════

def load_app(app_dir: str | os.PathLike = ".") -> Asok:
    """The app of a folder: `app` from its app.py if there is one, else a plain Asok(app_dir)."""
    root = Path(app_dir).resolve()
    if not root.is_dir():
        raise SystemExit(f"asok: {root} is not a folder")
    _warn_if_alive_js_is_missing()
    app_file = root / "app.py"
    if not app_file.is_file():
        if not (root / "src").is_dir():
            log.warning("%s is not an app: it has no app.py and no src/ folder (src/pages, src/components), "
                        "so every page is a 404; serve the app's folder (or a folder of apps)", root)
        app = Asok(root)
        _ = app.components  # imported now: errors show at start-up
        return app
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location("app", app_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["app"] = module  # so that components can `from app import helper`
    spec.loader.exec_module(module)
    app = getattr(module, "app", None)
    if not isinstance(app, Asok):
        raise SystemExit(f"asok: {app_file} must define `app = Asok(__file__)`")
    _ = app.components  # imported now that app.py has run: errors show at start-up
    return app


def _warn_if_alive_js_is_missing():
    """Once per process: without alive.js beside asok.py, pages render but nothing is live."""
    global _alive_js_checked
    if not _alive_js_checked and not ALIVE_JS.is_file():
        log.warning("alive.js is missing beside asok.py (%s): pages render, but no live component "
                    "works; copy alive.js there from asok", ALIVE_JS)
    _alive_js_checked = True


_alive_js_checked = False
_folder_apps = {}


def __getattr__(name):
    """`APP_DIR=myapp uvicorn asok:asgi` (or `gunicorn asok:wsgi`): serve a folder app with no
    app.py of one's own. The folder comes from APP_DIR (default: the current folder)."""
    if name not in ("asgi", "wsgi"):
        raise AttributeError(f"module 'asok' has no attribute {name!r}")
    app_dir = os.environ.get("APP_DIR", ".")
    app = _folder_apps.get(app_dir) or _folder_apps.setdefault(app_dir, load_app(app_dir))
    return app.asgi if name == "asgi" else app


WORKER_QUICK_DEATH = 2.0    # a worker that dies sooner than this after its start counts as a crash
WORKER_MAX_CRASHES = 5      # crashes in a row after which `--workers` gives up


def _cannot_listen(host, port, exc):
    """The one message for a socket asok cannot bind (one worker, --workers, the gallery)."""
    if exc.errno == errno.EADDRINUSE:
        return SystemExit(f"asok: port {port} on {host} is already in use (another server?); "
                          "choose another with --port")
    return SystemExit(f"asok: cannot listen on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}")


def serve_workers(app_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, workers: int = 2) -> int:
    """`python asok.py serve --workers N`: this process binds the socket and forks N workers;
    each loads the app and serves on the shared socket (the kernel hands each connection to
    one of them). A worker that dies is replaced; SIGTERM or SIGINT stops them all, each
    draining its connections as a single server does. Returns the exit status."""
    try:
        sock = socket.create_server((host, port), backlog=1024)
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from None
    children, crashes, stopping = {}, 0, []
    slots = memoryview(mmap.mmap(-1, 8 * workers)).cast("q")  # shared with the children it forks

    def stop(signum, frame):
        stopping.append(signum)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    master = os.getpid()

    def spawn(index):
        global _worker_slots
        slots[index] = 1 << 62  # not serving yet: the others take what comes; its listener writes 0
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            _worker_slots = (slots, index, master)
            status = 1
            try:
                asyncio.run(serve(load_app(app_dir), sock=sock))
                status = 0
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                os._exit(status)
        children[pid] = (time.monotonic(), index)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("%d workers on http://%s:%d (pid %d)", workers, host, sock.getsockname()[1], os.getpid())
    for index in range(workers):
        spawn(index)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started, index = children.pop(pid, (None, 0))
        if started is None or stopping:
            continue
        slots[index] = 1 << 62  # until its replacement serves, the dead worker takes none
        crashes = crashes + 1 if time.monotonic() - started < WORKER_QUICK_DEATH else 0
        log.warning("worker %d exited (%s); starting another", pid, _exit_text(status))
        if crashes >= WORKER_MAX_CRASHES:
            log.error("workers keep dying at start-up; stopping")
            stop(signal.SIGTERM, None)
            stopping.append("crashes")
            continue
        time.sleep(min(crashes * 0.5, 2.0))
        spawn(index)
    sock.close()
    return 1 if "crashes" in stopping else 0


def _exit_text(status):
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def _worker_count(value):
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"--workers takes a number of processes (1 or more) or 'auto', not {value!r}")
    return count


def _watched_files(root):
    files = {Path(__file__).resolve()}
    files.update(p for p in Path(root).rglob("*.py") if ".asok" not in p.parts)
    stamps = {}
    for path in files:
        try:
            stamps[path] = path.stat().st_mtime_ns
        except OSError:
            pass
    return stamps


RELOAD_POLL = 0.5  # seconds between two looks at the watched files' modification times


def _run_reloader(argv, root):
    """Run the server in a child process; restart it when a .py file of the app changes. A
    server that exits on its own (a SyntaxError in a component, say) is started again at the
    next change, as Flask's and uvicorn's reloaders do; only SIGINT / SIGTERM stop the reloader."""
    args = [a for a in argv if a != "--reload"]

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    child = None
    try:
        while True:
            stamps = _watched_files(root)
            child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args])
            while child.poll() is None and _watched_files(root) == stamps:
                time.sleep(RELOAD_POLL)
            if child.poll() is None:
                log.info("a .py file changed; restarting")
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                continue
            code = child.returncode
            log.error("the server exited (%s); it starts again when a .py file changes",
                      f"killed by signal {-code}" if code < 0 else f"status {code}")
            while _watched_files(root) == stamps:
                time.sleep(RELOAD_POLL)
            log.info("a .py file changed; starting the server")
    except KeyboardInterrupt:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)
            child.wait()
        return 0


# ═══ 21. The examples gallery and the shared stylesheet ═══════════════════════════════════════════

# /asok/asok.css: the stylesheet every example links (and any page may):
# `<link rel="stylesheet" href="/asok/asok.css">`. Plain elements look deliberate without
# classes; `asok-loading` (a component waiting for the server) and `asok-disconnected` (on
# <html> while the live socket is down) are shown.
ASOK_CSS = """\
:root { color-scheme: light dark; --fg: #1b2230; --muted: #5d6676; --bg: #f5f6f8; --card: #fff;
  --line: #d8dce3; --accent: #2d63d8; --on-accent: #fff; --danger: #c0392b; --ok: #1f7a45; --radius: 10px; }
@media (prefers-color-scheme: dark) { :root { --fg: #e5e8ee; --muted: #9aa3b1; --bg: #15181d;
  --card: #1d2128; --line: #343b46; --accent: #6b9bff; --on-accent: #0d1420; --danger: #ff7b6b; --ok: #5fd08a; } }
*, *::before, *::after { box-sizing: border-box; }
html { font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--fg); background: var(--bg); -webkit-text-size-adjust: 100%; }
body { max-width: 44rem; margin: 0 auto; padding: 2.5rem 1.25rem 4rem; }
h1, h2, h3 { line-height: 1.2; margin: 1.5em 0 .5em; }
h1 { font-size: 2rem; margin-top: 0; letter-spacing: -.015em; }
h1 + p { color: var(--muted); margin-top: -.25rem; }
p, ul, ol, form, table, pre { margin: 0 0 1rem; }
a { color: var(--accent); text-underline-offset: .15em; }
small, .muted { color: var(--muted); }
.error { color: var(--danger); font-size: .925rem; margin: -.4rem 0 .75rem; }
.ok { color: var(--ok); font-weight: 600; }
code, pre { font: .875em/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--card);
  border: 1px solid var(--line); border-radius: 5px; }
code { padding: .1em .35em; }
pre { padding: .75rem 1rem; overflow: auto; }
pre code { border: 0; padding: 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid var(--line); }
[data-asok-component] { background: var(--card); border: 1px solid var(--line); border-radius: var(--radius);
  padding: 1.25rem 1.5rem; margin: 1.25rem 0; box-shadow: 0 1px 2px rgb(0 0 0 / .04); transition: opacity .2s; }
[data-asok-component] [data-asok-component] { background: none; border: 0; border-radius: 0; box-shadow: none;
  padding: 0; margin: 0; }  /* only the outermost component is a card */
[data-asok-component] > :first-child, [data-asok-component] > :first-child > :first-child { margin-top: 0; }
[data-asok-component] > :last-child, [data-asok-component] > :last-child > :last-child { margin-bottom: 0; }
[data-asok-component] ul { padding-left: 1.25rem; }
[data-asok-component] li { padding: .1rem 0; }
ul:has(> li > input[type=checkbox]) { padding-left: 0; list-style: none; }
button, input, select, textarea { font: inherit; color: inherit; }
button { cursor: pointer; padding: .5rem 1.05rem; margin: 0 .4rem .4rem 0; border: 1px solid var(--accent);
  border-radius: 7px; background: var(--accent); color: var(--on-accent); font-weight: 600; line-height: 1.2; }
button:hover { filter: brightness(1.1); }
button:active { transform: translateY(1px); }
button:disabled { opacity: .5; cursor: not-allowed; }
button.secondary, li button { background: transparent; color: var(--accent); }
li button { border-color: transparent; padding: .2rem .55rem; margin: 0; }
li button:hover { border-color: var(--line); }
input:not([type=checkbox], [type=radio], [type=range], [type=file]), select, textarea {
  width: min(100%, 24rem); padding: .5rem .7rem; margin: 0 .4rem .4rem 0; border: 1px solid var(--line);
  border-radius: 7px; background: var(--card); line-height: 1.3; }
textarea { min-height: 6rem; }
input[type=checkbox], input[type=radio] { width: 1.1rem; height: 1.1rem; margin: 0 .5rem 0 0;
  vertical-align: -.15rem; accent-color: var(--accent); }
:is(button, input, select, textarea, a):focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
:is(input, select, textarea):focus { border-color: var(--accent); }
label { display: block; margin: 0 0 .8rem; font-weight: 500; }
label > :is(input, select, textarea) { display: block; margin-top: .3rem; font-weight: 400; }
label:has(> input[type=checkbox], > input[type=radio]) { display: inline-flex; align-items: center; }
/* a component waiting for the server's reply; a quick reply shows nothing */
.asok-loading { opacity: .55; cursor: progress; transition-delay: .15s; }
/* the live socket is down and alive.js is reconnecting */
html.asok-disconnected body::before { content: "Reconnecting\\2026"; position: fixed; z-index: 1000; top: .75rem;
  left: 50%; transform: translateX(-50%); padding: .35rem 1rem; border-radius: 999px; background: #b3261e;
  color: #fff; font-size: .875rem; font-weight: 600; box-shadow: 0 2px 10px rgb(0 0 0 / .25); }
html.asok-disconnected [data-asok-component] { opacity: .6; filter: grayscale(.7); }
input[type=file] { max-width: 100%; }
/* a phone (360 px and up): less space around the page and the cards */
@media (max-width: 30rem) { body { padding: 1.5rem .9rem 3rem; } [data-asok-component] { padding: 1rem; } }
"""
_ASOK_CSS_ETAG = '"' + hashlib.sha256(ASOK_CSS.encode()).hexdigest()[:16] + '"'


def _stylesheet(request):
    """The response for /asok/asok.css (the text above; revalidated with its ETag)."""
    headers = [("ETag", _ASOK_CSS_ETAG), ("Cache-Control", "no-cache")]
    if _ASOK_CSS_ETAG in request.headers.get("if-none-match", ""):
        return Response(b"", 304, headers, content_type=None)
    return Response(ASOK_CSS, 200, headers, content_type="text/css; charset=utf-8")


def gallery_apps(folder: str | os.PathLike) -> list[Path]:
    """The app folders inside `folder`, sorted by name: each subfolder with an app.py or a
    src/ folder. [] when `folder` is an app itself (it has app.py or src/)."""
    root = Path(folder)
    if not root.is_dir() or (root / "app.py").is_file() or (root / "src").is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                  and ((p / "app.py").is_file() or (p / "src").is_dir()))


def describe_app(folder: str | os.PathLike) -> str:
    """One line on what the app in `folder` shows, for the gallery: the content of a
    `<meta name="description">` in src/pages/index.html (else in a template under src/html),
    else the first line of app.py's docstring, else the page's <title>, else ""."""
    root = Path(folder)
    pages = [root / "src" / "pages" / "index.html", *sorted((root / "src" / "html").glob("*.html"))]
    texts = [p.read_text("utf-8", "replace") for p in pages if p.is_file()]
    for text in texts:
        meta = re.search(r"""<meta\s+name=["']description["']\s+content=(?:"([^"]*)"|'([^']*)')""", text, re.I)
        if meta:
            return html.unescape(meta.group(1) or meta.group(2) or "").strip()
    if (root / "app.py").is_file():
        try:
            doc = ast.get_docstring(ast.parse((root / "app.py").read_text("utf-8")))
        except (SyntaxError, ValueError):
            doc = None
        if doc:
            return doc.strip().splitlines()[0]
    for text in texts:
        title = re.search(r"<title>([^<{]*)</title>", text, re.I)
        if title and title.group(1).strip():
            return html.unescape(title.group(1)).strip()
    return ""


_GALLERY_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>asok examples</title>
<link rel="stylesheet" href="/asok/asok.css">
<style>
.gallery { list-style: none; padding: 0; display: grid; gap: .75rem; }
.gallery a { display: block; padding: .9rem 1.2rem; background: var(--card); border: 1px solid var(--line);
  border-radius: var(--radius); color: inherit; text-decoration: none; }
.gallery a:hover { border-color: var(--accent); }
.gallery b { color: var(--accent); font-size: 1.1rem; }
.gallery span { display: block; color: var(--muted); }
</style>
</head>
<body>
<h1>asok examples</h1>
<p>Each one is a small app of its own, served here on its own port.
Run one alone with <code>python asok.py serve examples/NAME</code>.</p>
<ul class="gallery">
ITEMS
</ul>
</body>
</html>
"""


def _gallery_index(apps):
    """The index page's route: `apps` is [(name, description, port)]; the links keep the host
    the browser used and change the port."""
    def index(request):
        host = urlsplit("//" + (request.host or "127.0.0.1")).hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        items = "\n".join(f'<li><a href="{html.escape(f"{request.scheme}://{host}:{port}/")}"><b>{html.escape(name)}</b>'
                          f'<span>{html.escape(text)}</span></a></li>' for name, text, port in apps)
        return _GALLERY_PAGE.replace("ITEMS", items)
    return index


def _listen(host, port):
    return socket.create_server((host, port), backlog=1024)


GALLERY_PORT_TRIES = 100  # ports tried upwards from the last one taken before any free port will do


def _listen_from(host, port):
    """A socket on the first free port from `port` up (a few tries), else on any free port."""
    for candidate in range(port, min(port + GALLERY_PORT_TRIES, 65536)):
        with contextlib.suppress(OSError):
            return _listen(host, candidate)
    return _listen(host, 0)


def serve_gallery(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> int:
    """`python asok.py serve examples`: the index of `folder`'s apps on host:port, and each app
    on the next free port after the one before (port+1, port+2, ..., skipping those taken), all
    in this process. A browser sends its cookie for a host to every port, so they share one
    session: one signing key (SECRET_KEY, else `folder`/.asok/secret_key) and, for the apps
    keeping sessions in their default file store, one store in `folder`/.asok/sessions, so a
    session.regenerate() in one app (signing in) carries the others' state along."""
    folders = gallery_apps(folder)
    root = Path(folder).resolve()
    debug = os.environ.get("DEBUG", "").lower() in _TRUE
    source = ("the SECRET_KEY environment variable" if os.environ.get("SECRET_KEY")
              else "the development key (debug mode)" if debug else str(root / ".asok" / "secret_key"))
    if not os.environ.get("SECRET_KEY"):  # the same key for every app: the cookie ignores the port
        key = _load_master_keys(root, None, debug, [])[0]
        os.environ["SECRET_KEY"] = key.hex() if debug else key.decode()
    try:
        index_sock = _listen(host, port)
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from None
    servers, apps, next_port = [], [], index_sock.getsockname()[1] + 1
    for path in folders:
        sock = _listen_from(host, next_port) if port else _listen(host, 0)
        next_port = sock.getsockname()[1] + 1
        servers.append((load_app(path), sock))
        apps.append((path.name, describe_app(path), sock.getsockname()[1]))
    index = Asok(folder)
    index.route("/", name="gallery")(_gallery_index(apps))
    own = [app for app, _ in servers if type(app.sessions) is FileSessionStore
           and app.sessions.folder == app.root / ".asok" / "sessions"]
    if own:
        shared = FileSessionStore(root / ".asok" / "sessions", max(app.session_lifetime for app in own))
        for app in own:
            app.sessions = shared
    for app in (index, *(app for app, _ in servers)):
        app.key_source = source
        app.log_startup = lambda: None  # said once below, for them all
    log.info("gallery of %d apps in %s on http://%s:%d/", len(apps), root, host, index_sock.getsockname()[1])
    if not debug:
        log.info("signing key from %s, shared by the gallery's apps (one session cookie serves them all)", source)

    async def run():
        stop = asyncio.Event()
        await asyncio.gather(*(serve(app, sock=sock, stop=stop) for app, sock in [(index, index_sock), *servers]))

    asyncio.run(run())
    return 0


# ═══ 22. Command line: `python asok.py serve`, main() ═════════════════════════════════════════════

# What `python asok.py serve --help` lists under "environment"; add a line for a new variable.
ENVIRONMENT = [
    ("HOST", "default for --host"),
    ("PORT", "default for --port"),
    ("DEBUG", "true: the same as --debug"),
    ("SECRET_KEY", ("the signing key (default: one created once in APP_DIR/.asok/secret_key; "
                    "a fixed development key with --debug)")),
    ("SECRET_KEY_FALLBACKS", "old keys, comma-separated, still accepted (key rotation)"),
    ("FORWARDED_ALLOW_IPS", "proxy addresses whose Forwarded / X-Forwarded-* headers are trusted"),
    ("APP_DIR", "the folder `uvicorn asok:asgi` and `gunicorn asok:wsgi` serve (default: .)"),
]
SERVE_EXAMPLES = [
    ("python asok.py serve examples/counter", "the counter on http://127.0.0.1:8000"),
    ("python asok.py serve examples", "every example, and an index of them on http://127.0.0.1:8000"),
    ("python asok.py serve . --debug --reload", "work on the app in this folder"),
    ("PORT=9000 python asok.py serve myapp --workers auto", "one process per core, on port 9000"),
]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with the epilog's line breaks kept (the environment table, the examples)."""


def _epilog(examples, environment=()):
    """The "environment:" and "examples:" paragraphs of a help text."""
    lines = []
    if environment:
        width = max(len(name) for name, _ in environment) + 2
        lines += ["environment:"] + [line for name, text in environment for line in textwrap.wrap(
            text, 78, initial_indent=f"  {name:<{width}}", subsequent_indent=" " * (width + 2))] + [""]
    lines += ["examples:"] + [line for command, text in examples for line in (f"  # {text}", f"  {command}")]
    return "\n".join(lines)


def _port(value):
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535 (given: {value!r}, "
                                         "from --port or $PORT)")
    return port


def _parser():
    """The command line: `asok [--version] serve [APP_DIR] [options]`. Each option's help ends
    with its default; add an option with one `serve.add_argument(...)` line."""
    parser = argparse.ArgumentParser(
        prog="asok", formatter_class=_HelpFormatter,
        description="asok: a one-file, standard-library Python web framework with live components.",
        epilog=_epilog(SERVE_EXAMPLES + [("python asok.py serve --help", "every option of serve")]))
    parser.add_argument("--version", action="version",
                        version=f"asok {__version__} (Python {sys.version.split()[0]})")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", formatter_class=_HelpFormatter, help="serve an app folder with the built-in server",
        description="Serve APP_DIR with asok's built-in asyncio server (HTTP/1.1, WebSocket)\n"
                    "until SIGINT or SIGTERM.",
        epilog=_epilog(SERVE_EXAMPLES, ENVIRONMENT))
    env = os.environ
    serve.add_argument("app_dir", nargs="?", default=".", metavar="APP_DIR",
                       help="the app folder (src/pages, src/components, static, an optional app.py), "
                            "or a folder of app folders to serve as a gallery (default: the current folder)")
    serve.add_argument("--host", default=env.get("HOST", "127.0.0.1"),
                       help="address to listen on; 0.0.0.0 for every interface (default: $HOST, else 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=env.get("PORT", "8000"),
                       help="port to listen on (default: $PORT, else 8000)")
    serve.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                       help="processes sharing the socket, or 'auto' for one per core (default: 1)")
    serve.add_argument("--reload", action="store_true",
                       help="restart the server when a .py file of the app changes (default: off)")
    serve.add_argument("--debug", action="store_true",
                       help="tracebacks on error pages, templates re-read when changed, a fixed development "
                            "key (default: off; DEBUG=true turns it on)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info", metavar="LEVEL",
                       help=f"the lowest level of asok's log lines: {', '.join(LOG_LEVELS)} (default: info)")
    serve.add_argument("--no-access-log", action="store_true",
                       help="do not log a line per request (default: each request is logged)")
    parser.set_defaults(command_parsers=commands.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python asok.py ...`: parse the command line and run it; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    opts, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the parser of the command they follow, so its usage is the one shown
        after_command = opts.command is not None and argv.index(opts.command) < argv.index(unknown[0])
        (opts.command_parsers[opts.command] if after_command else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if opts.command is None:
        parser.print_help()
        return 0
    log.setLevel(opts.log_level.upper())
    if opts.no_access_log:
        access_log.setLevel(logging.WARNING)
    if opts.debug:
        os.environ["DEBUG"] = "true"
    if opts.reload:
        return _run_reloader(argv, opts.app_dir)
    if gallery_apps(opts.app_dir):
        if opts.workers > 1:
            raise SystemExit(f"asok: {opts.app_dir} holds several apps (a gallery), served by one process; "
                             "drop --workers, or serve one app")
        return serve_gallery(opts.app_dir, opts.host, opts.port)
    if opts.workers > 1:
        return serve_workers(opts.app_dir, opts.host, opts.port, opts.workers)
    app = load_app(opts.app_dir)
    try:
        asyncio.run(serve(app, opts.host, opts.port))
    except OSError as exc:
        raise _cannot_listen(opts.host, opts.port, exc) from None
    return 0


class _LogHandler(logging.StreamHandler):
    """asok's own handler on the `asok` logger: writes asok's records to stderr with a time,
    process id and level, as long as the root logger has no handler (`python asok.py serve`,
    uvicorn, gunicorn). Once an application or pytest gives the root logger a handler, records
    go there only (they propagate as usual), so nothing is printed twice and the root logger
    is never configured by asok."""

    _asok = True

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
                                            "%Y-%m-%d %H:%M:%S"))

    @property
    def stream(self):
        return sys.stderr  # looked up each time: the stderr of the moment, as logging.lastResort does

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record):
        if not logging.getLogger().handlers:
            super().emit(record)


if not any(getattr(h, "_asok", False) for h in log.handlers):
    log.addHandler(_LogHandler())
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


_component_module = types.ModuleType("asok.component", "asok's component API (asok is one module).")
_component_module.Component = Component
_component_module.exposed = exposed
if __name__ == "__main__":
    sys.modules.setdefault("asok", sys.modules["__main__"])
sys.modules.setdefault("asok.component", _component_module)
del _component_module  # reached as asok.component; not a name of its own

if __name__ == "__main__":
    sys.exit(main())
