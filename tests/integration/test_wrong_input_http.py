"""Every wrong input a caller can send over HTTP gets a clear 4xx naming the problem."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import pytest

from tests.integration.conftest import Stack, start_stack
from tests.support.images import b64, png_bomb, png_bytes, sample_images, truncated
from toposerve.brokers.settings import Settings
from toposerve.deploy.profile import load_profile

IRIS = "/v1/models/iris/predict"
DIGITS = "/v1/models/digits_fast/predict"


def digit_png() -> bytes:
    return next(path for path, _ in sample_images() if path.suffix == ".png").read_bytes()


def digit_jpeg() -> bytes:
    return next(path for path, _ in sample_images() if path.suffix == ".jpg").read_bytes()


async def post(stack: Stack, path: str, **kwargs) -> tuple[int, str, str]:
    response = await stack.client.post(path, **kwargs)
    body = response.json()
    assert set(body) == {"error"}, body
    return response.status_code, body["error"]["code"], body["error"]["message"]


CASES = [
    # (id, path, request kwargs, status, code, words the message must contain)
    ("malformed-json", IRIS, {"content": b'{"instances": [[1,2,3,4]', "headers": {"content-type": "application/json"}},
     400, "invalid_json", ["not valid JSON"]),
    ("empty-body", IRIS, {"content": b"", "headers": {"content-type": "application/json"}},
     400, "invalid_json", ["empty"]),
    ("not-utf8", IRIS, {"content": b'{"instances": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
     400, "invalid_json", ["UTF-8"]),
    ("wrong-content-type", IRIS, {"content": b"<xml/>", "headers": {"content-type": "application/xml"}},
     415, "unsupported_media_type", ["application/xml"]),
    ("multipart", IRIS, {"files": {"f": ("a.txt", b"x")}}, 415, "unsupported_media_type", ["multipart/form-data"]),
    ("json-array-body", IRIS, {"json": [[5.1, 3.5, 1.4, 0.2]]}, 422, "invalid_request", ["JSON object"]),
    ("no-input", IRIS, {"json": {}}, 422, "invalid_request", ["exactly one"]),
    ("unknown-field", IRIS, {"json": {"instances": [[1, 2, 3, 4]], "extra": 1}}, 422, "invalid_request", ["extra"]),
    ("wrong-type", IRIS, {"json": {"instances": [["a", 2, 3, 4]]}}, 422, "invalid_request", ["instances.0.0"]),
    ("wrong-feature-count", IRIS, {"json": {"instances": [[5.1, 3.5, 1.4, 0.2], [1, 2, 3]]}},
     422, "invalid_input", ["instances[1]", "3 values", "expects 4"]),
    ("nan", IRIS, {"content": b'{"instances": [[5.1, NaN, 1.4, 0.2]]}', "headers": {"content-type": "application/json"}},
     422, "invalid_input", ["instances[0][1]", "finite"]),
    ("infinity", IRIS, {"content": b'{"instances": [[5.1, 1, Infinity, 0.2]]}'},
     422, "invalid_input", ["instances[0][2]", "finite"]),
    ("overflow", IRIS, {"content": b'{"instances": [[5.1, 1, 1e400, 0.2]]}'}, 422, "invalid_input", ["finite"]),
    ("too-big-for-float32", IRIS, {"json": {"instances": [[5.1, 1, 1e300, 0.2]]}}, 422, "invalid_input", ["float32"]),
    ("empty-instances", IRIS, {"json": {"instances": []}}, 422, "invalid_input", ["empty"]),
    ("too-many-rows", IRIS, {"json": {"instances": [[1.0, 2.0, 3.0, 4.0]] * 101}}, 413, "too_large", ["101 rows", "100"]),
    ("body-too-large", IRIS, {"content": b'{"instances": [' + b"[1,2,3,4]," * 40_000 + b"[1,2,3,4]]}"},
     413, "body_too_large", ["limit"]),
    ("unknown-model", "/v1/models/resnet/predict", {"json": {"instances": [[1, 2, 3, 4]]}},
     404, "unknown_model", ["resnet", "this profile serves"]),
    ("image-to-tabular-model", IRIS, {"json": {"image": "aGVsbG8="}}, 422, "invalid_input", ["instances"]),
    ("instances-to-image-model", DIGITS, {"json": {"instances": [[0.0] * 64]}}, 422, "invalid_input", ["image"]),
    ("both-inputs", DIGITS, {"json": {"instances": [[1, 2, 3, 4]], "image": "aGVsbG8="}},
     422, "invalid_request", ["exactly one", "instances and image"]),
    ("not-base64", DIGITS, {"json": {"image": "this is *not* base64!"}}, 422, "invalid_input", ["base64"]),
    ("not-an-image", DIGITS, {"json": {"image": b64(b"hello, I am a text file" * 10)}},
     422, "invalid_input", ["not a PNG or JPEG"]),
    ("gif-is-refused", DIGITS, {"json": {"image": b64(b"GIF89a" + b"\x00" * 40)}},
     422, "invalid_input", ["not a PNG or JPEG"]),
    ("truncated-png", DIGITS, {"json": {"image": b64(truncated(png_bytes((64, 64), "RGB"), 0.5))}},
     422, "invalid_input", ["truncated or corrupt"]),
    ("decompression-bomb", DIGITS, {"json": {"image": b64(png_bomb())}}, 413, "too_large", ["pixels", "limit"]),
    ("empty-image", DIGITS, {"json": {"image": ""}}, 422, "invalid_input", ["empty"]),
    # An integer literal past Python's 4,300-digit conversion limit (a ValueError, not a JSONDecodeError).
    ("huge-integer", IRIS, {"content": b'{"instances": [[' + b"9" * 5000 + b', 1, 2, 3]]}'},
     400, "invalid_json", ["cannot be read"]),
    ("gzip-bomb", IRIS, {"content": gzip.compress(b'{"instances": [' + b" " * 2_000_000 + b"]}"),
                         "headers": {"content-encoding": "gzip"}}, 413, "body_too_large", ["decompressed"]),
    ("not-gzip", IRIS, {"content": b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}', "headers": {"content-encoding": "gzip"}},
     400, "invalid_body", ["not valid gzip"]),
    ("truncated-gzip", IRIS, {"content": gzip.compress(b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}')[:-12],
                              "headers": {"content-encoding": "gzip"}}, 400, "invalid_body", ["truncated"]),
    ("unknown-encoding", IRIS, {"content": b"{}", "headers": {"content-encoding": "br"}},
     415, "unsupported_media_type", ["'br'", "gzip"]),
]


PROFILES = ["asynchronous", "synchronous", "web_single", "prep_pred", "sync_async"]


def _serves(profile: str, path: str) -> bool:
    model = path.split("/")[3]
    return model == "resnet" or model in load_profile(profile).models


def _cases() -> list:
    params = []
    for profile in PROFILES:
        for case_id, path, kwargs, status, code, words in CASES:
            if not _serves(profile, path):
                # The same input sent to the model this profile serves instead.
                path = path.replace("/iris/", "/digits_fast/") if "/iris/" in path else path
                if not _serves(profile, path) or "image" in case_id or "instances" in str(kwargs):
                    continue
            params.append(pytest.param(profile, path, kwargs, status, code, words, id=f"{profile}-{case_id}"))
    return params


@pytest.fixture
async def profile_stack(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, request.param):
        yield stack


@pytest.mark.parametrize(("profile_stack", "path", "kwargs", "status", "code", "words"), _cases(),
                         indirect=["profile_stack"])
async def test_wrong_input_gets_a_clear_4xx(profile_stack: Stack, path, kwargs, status, code, words) -> None:
    got_status, got_code, message = await post(profile_stack, path, **kwargs)
    assert (got_status, got_code) == (status, code), message
    for word in words:
        assert word in message, message


async def test_nothing_was_queued_for_refused_requests(async_stack: Stack) -> None:
    await post(async_stack, IRIS, json={"instances": [[1, 2, 3]]})
    assert await async_stack.runners["preprocess"].backlog() == 0


async def test_a_truncated_jpeg_is_refused_at_the_ingress(async_stack: Stack) -> None:
    """JPEG has no checksums: the ingress checks for the end marker and decodes files without one."""
    for keep in (0.3, 0.5, 0.9):
        response = await async_stack.client.post(DIGITS, json={"image": b64(truncated(digit_jpeg(), keep))})
        assert response.status_code == 422, keep
        assert "truncated or corrupt" in response.json()["error"]["message"]


async def test_curl_style_form_content_type_and_data_urls_are_accepted(async_stack: Stack) -> None:
    # `curl -d` sends application/x-www-form-urlencoded; the README's examples rely on it.
    response = await async_stack.client.post(
        IRIS, content=b'{"instances": [[5.1,3.5,1.4,0.2]]}',
        headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 202
    data_url = "data:image/png;base64," + b64(digit_png())
    response = await async_stack.client.post(DIGITS, json={"image": data_url})
    assert response.status_code == 202
    job = (await async_stack.client.get(response.headers["location"], params={"wait": 10})).json()
    assert job["status"] == "succeeded"


async def test_a_gzip_body_is_read_like_a_plain_one(async_stack: Stack) -> None:
    body = gzip.compress(b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}')
    response = await async_stack.client.post(IRIS, content=body, headers={"content-encoding": "gzip",
                                                                           "content-type": "application/json"})
    assert response.status_code == 202, response.text
    job = (await async_stack.client.get(response.headers["location"], params={"wait": 10})).json()
    assert job["status"] == "succeeded" and job["predictions"][0]["label"] == "setosa"

