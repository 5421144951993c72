"""``extproc.formats.canonical_path`` and ``find_format``: every variant a lenient server routes
to an API reaches that API's format; other paths stay other paths."""

from __future__ import annotations

import pytest

from extproc.formats import all_formats, canonical_path, find_format


@pytest.mark.parametrize(("path", "canonical"), [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/completion%73", "/v1/chat/completions"),
    ("/v1/chat%2Fcompletions", "/v1/chat/completions"),
    ("/v1/chat/completion%2573", "/v1/chat/completions"),  # escaped twice
    ("/V1/Chat/Completions/", "/v1/chat/completions"),
    ("//v1///chat/completions", "/v1/chat/completions"),
    ("/v1/./chat/../chat/completions", "/v1/chat/completions"),
    ("/../../v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat;a=b/completions;c", "/v1/chat/completions"),
    ("/v1/chat%5Ccompletions", "/v1/chat/completions"),
    ("/v1/chat/completions?x=1#f", "/v1/chat/completions"),
    ("/", "/"),
    ("", "/"),
])
def test_canonical_path(path: str, canonical: str) -> None:
    assert canonical_path(path) == canonical


@pytest.mark.parametrize(("method", "path", "name"), [
    ("POST", "/v1/chat/completion%73", "openai.chat_completions"),
    ("post", "/v1/chat/completions", "openai.chat_completions"),
    ("POST", "/v1/message%73/", "anthropic.messages"),
    ("POST", "/v1/RESPONSES", "openai.responses"),
    ("POST", "/v1/completions/", "openai.completions"),
])
def test_variants_find_their_format(method: str, path: str, name: str) -> None:
    fmt = find_format(method, path, all_formats())
    assert fmt is not None and fmt.name == name


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/embeddings"), ("GET", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/extra"), ("POST", "/v1/threads/t1/messages"),
])
def test_other_paths_are_not_an_api(method: str, path: str) -> None:
    assert find_format(method, path, all_formats()) is None
