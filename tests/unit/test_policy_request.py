"""Reading what a decision needs from the raw request: the body, the model (from the hint,
the path or the body) and the client's metadata; every malformed input is a 400 naming it."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from sidecar.model import RequestAttrs
from sidecar.policy.request import (
    MAX_METADATA_BYTES,
    MAX_MODEL_LENGTH,
    BadRequest,
    model_of,
    parse_body,
    parse_metadata,
    request_model,
    split_provider,
)


def attrs(
    method: str = "POST",
    path: str = "/openai/v1/chat/completions",
    body: Any = None,
    hint: str = "",
) -> RequestAttrs:
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return RequestAttrs(method, path, {}, raw, model_hint=hint)


# -- the body ---------------------------------------------------------------------------


def test_a_body_is_a_json_object() -> None:
    assert parse_body(b'{"model": "gpt-4o", "n": [1]}') == {"model": "gpt-4o", "n": [1]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "request body is required"),
        (b"", "request body is required"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"gpt-4o"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused(body: bytes | None, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_body(body)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"model": "gpt-4o", "model": "gpt-4o-mini"}', "model"),
        # Written differently, the same name once decoded.
        (b'{"model": "gpt-4o", "mod\\u0065l": "gpt-4o-mini"}', "model"),
        (b'{"model": "gpt-4o", "max_tokens": 1, "max_tokens": 100000}', "max_tokens"),
        (
            b'{"model": "m", "generationConfig": {"candidateCount": 1, "candidateCount": 8}}',
            "candidateCount",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "role": "system"}]}', "role"),
        # UTF-16, which json reads like UTF-8.
        ('{"model": "a", "model": "b"}'.encode("utf-16"), "model"),
    ],
)
def test_a_body_naming_a_member_twice_is_refused(body: bytes, key: str) -> None:
    # Parsers differ on which of the two counts; the sidecar could judge one model (or
    # limit) while the provider serves the other.
    with pytest.raises(BadRequest, match=f"the member '{key}' appears twice"):
        parse_body(body)
    with pytest.raises(BadRequest, match="appears twice"):
        request_model(attrs(body=body), "/openai/")


def test_a_repeated_name_in_different_objects_is_not_a_duplicate() -> None:
    body = b'{"model": "m", "messages": [{"role": "user"}, {"role": "model"}]}'
    assert parse_body(body)["messages"][1] == {"role": "model"}
    assert parse_body(b'\xef\xbb\xbf{"model": "m"}') == {"model": "m"}  # a UTF-8 BOM


def test_a_long_duplicated_name_is_cut_in_the_message() -> None:
    name = "k" * 10_000
    with pytest.raises(BadRequest) as raised:
        parse_body(f'{{"{name}": 1, "{name}": 2}}'.encode())
    assert len(str(raised.value)) < 200


def test_the_model_is_a_non_blank_string_kept_without_surrounding_space() -> None:
    assert model_of({"model": "  gpt-4o "}) == "gpt-4o"
    assert model_of({"model": "m" * MAX_MODEL_LENGTH}) == "m" * MAX_MODEL_LENGTH


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "no 'model' string"),
        ({"model": None}, "no 'model' string"),
        ({"model": 4}, "no 'model' string"),
        ({"model": ["gpt-4o"]}, "no 'model' string"),
        ({"model": "   "}, "no 'model' string"),
        ({"model": "m" * (MAX_MODEL_LENGTH + 1)}, "too long"),
    ],
)
def test_a_missing_or_malformed_model_is_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        model_of(data)


# -- where the model comes from ---------------------------------------------------------


def test_a_post_to_a_provider_names_its_model_in_the_body() -> None:
    body = {"model": "gpt-4o", "messages": []}
    assert request_model(attrs(body=body), "/openai/") == ("gpt-4o", body)


def test_a_post_to_a_provider_without_a_model_is_refused() -> None:
    with pytest.raises(BadRequest, match="required"):
        request_model(attrs(body=None), "/openai/")
    with pytest.raises(BadRequest, match="no 'model' string"):
        request_model(attrs(body={"messages": []}), "/openai/")


def test_a_request_naming_no_model_is_identity_only() -> None:
    # Listing models, reading a file: nothing to price, nothing to refuse.
    assert request_model(attrs("GET", "/openai/v1/models"), "/openai/") is None
    assert request_model(attrs("DELETE", "/openai/v1/files/f1"), "/openai/") is None
    assert request_model(attrs("GET", "/healthz"), None) is None


def test_a_put_naming_a_model_is_decided_like_a_post() -> None:
    body = {"model": "gpt-4o"}
    assert request_model(attrs("PUT", body=body), "/openai/") == ("gpt-4o", body)
    assert request_model(attrs("PATCH", body=body), "/openai/") == ("gpt-4o", body)


def test_the_hint_names_the_model_when_there_is_no_body() -> None:
    assert request_model(attrs(hint=" gpt-4o "), "/openai/") == ("gpt-4o", {})
    # The hint is used as is: the body is not read at all.
    assert request_model(attrs(body=b"{", hint="gpt-4o"), "/openai/") == ("gpt-4o", {})


def test_the_path_names_the_model_and_must_agree_with_the_body_and_the_hint() -> None:
    path = "/gemini/v1beta/models/gemini-2.5-pro:generateContent"
    assert request_model(attrs(path=path, body={"contents": []}), "/gemini/") == (
        "gemini-2.5-pro",
        {"contents": []},
    )
    # The same name in another case is the same model.
    assert request_model(attrs(path=path, body={"model": "Gemini-2.5-PRO"}), "/gemini/")
    assert request_model(attrs(path=path, hint="gemini-2.5-pro"), "/gemini/") == (
        "gemini-2.5-pro",
        {},
    )
    disagree = re.escape("the path names model 'gemini-2.5-pro' and the body")
    with pytest.raises(BadRequest, match=disagree):
        request_model(attrs(path=path, body={"model": "gemini-2.5-flash"}), "/gemini/")
    with pytest.raises(BadRequest, match=re.escape("and x-sidecar-model 'gemini-2.5-flash'")):
        request_model(attrs(path=path, hint="gemini-2.5-flash"), "/gemini/")


def test_a_path_model_without_a_body_needs_no_body() -> None:
    path = "/gemini/v1beta/models/gemini-2.5-pro:countTokens"
    assert request_model(attrs(path=path, body=None), "/gemini/") == ("gemini-2.5-pro", {})


def test_the_path_is_only_read_behind_a_provider_prefix() -> None:
    path = "/v1beta/models/gemini-2.5-pro:generateContent"
    assert request_model(attrs(path=path, body={"model": "gpt-4o"}), None) == (
        "gpt-4o",
        {"model": "gpt-4o"},
    )


def test_a_provider_prefixed_model_names_its_provider_when_configured() -> None:
    known = {"openai": object(), "anthropic": object()}
    assert split_provider("openai/gpt-4o", known) == ("openai", "gpt-4o")
    assert split_provider("meta/llama-3", known) == (None, "meta/llama-3")
    assert split_provider("@cf/meta/llama-3", known) == (None, "@cf/meta/llama-3")
    assert split_provider("openai/", known) == (None, "openai/")
    assert split_provider("gpt-4o", known) == (None, "gpt-4o")


# -- metadata ---------------------------------------------------------------------------


def test_metadata_values_become_strings() -> None:
    header = '{"team": "search", "run": 7, "ratio": 0.5, "ci": true, "dry": false}'
    assert parse_metadata({"cf-aig-metadata": header}) == {
        "team": "search",
        "run": "7",
        "ratio": "0.5",
        "ci": "true",
        "dry": "false",
    }
    assert parse_metadata({}) == {}
    assert parse_metadata({"cf-aig-metadata": "{}"}) == {}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("{", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('"team"', "must be a JSON object"),
        ('{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6}', "more than 5 keys"),
        ('{"a": {"nested": 1}}', "value for 'a' must be a string, number or bool"),
        ('{"a": [1]}', "value for 'a'"),
        ('{"a": null}', "value for 'a'"),
        ('{"a": "' + "x" * MAX_METADATA_BYTES + '"}', "too large"),
        ("[" * 1000, "not valid JSON"),
        ('{"team": "ml", "team": "free"}', "the member 'team' appears twice"),
    ],
)
def test_malformed_metadata_is_refused(header: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_metadata({"cf-aig-metadata": header})
