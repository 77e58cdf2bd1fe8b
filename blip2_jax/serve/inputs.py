"""Reading a request: the body (JSON, or a multipart upload), its fields against a route's schema, and
the image bytes. Every problem is a `RequestError` with the HTTP status and a message naming the field;
the app answers it as JSON `{"error": message}` and keeps serving.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
from typing import Any, Mapping, Optional

from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class RequestError(Exception):
    """A request the server answers with an error: `status` (4xx, or 503 while warming up or busy), a
    message for the client, and extra response headers (e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclasses.dataclass(frozen=True)
class Field:
    """One request field: its JSON type (`str`, `int`, `float`, or `bytes` for an image) and whether it
    must be present. An image is base64 text in JSON, a file part in a multipart upload."""

    kind: type
    required: bool = False


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bytes: "a base64 string"}


def _check_names(body: Mapping[str, Any], schema: Mapping[str, Field]) -> None:
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; this route takes "
                              f"{', '.join(map(repr, schema))}")
    missing = [name for name, f in schema.items() if f.required and body.get(name) is None]
    if missing:
        raise RequestError(400, f"missing field(s) {', '.join(map(repr, missing))}")


def check_fields(body: Any, schema: Mapping[str, Field]) -> dict:
    """The fields of a JSON body, typed as `schema` says (images decoded from base64 to bytes; a null
    value counts as absent)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    _check_names(body, schema)
    return {name: _typed(name, value, schema[name].kind) for name, value in body.items() if value is not None}


def _typed(name: str, value: Any, kind: type) -> Any:
    ok = {str: isinstance(value, str), bytes: isinstance(value, str),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
    if not ok:
        raise RequestError(400, f"field {name!r} must be {_TYPE_NAMES[kind]}, got {type(value).__name__}")
    if kind is float:
        if not math.isfinite(value):
            raise RequestError(400, f"field {name!r} must be a finite number, got {value}")
        return float(value)
    return decode_base64(name, value) if kind is bytes else value


def decode_base64(name: str, text: str) -> bytes:
    """Base64 (standard alphabet, whitespace ignored, an optional `data:...;base64,` prefix) -> bytes."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"field {name!r} is not valid base64 ({e})") from None
    if not data:
        raise RequestError(400, f"field {name!r} is empty")
    return data


def form_fields(parts, schema: Mapping[str, Field]) -> dict:
    """The fields of a multipart upload, `parts` = `(name, text or file bytes)`: the image as a file part
    (or base64 text), the other fields as text converted to the schema's type."""
    body: dict[str, Any] = {}
    for name, value in parts:
        if name in body:
            raise RequestError(400, f"field {name!r} given twice")
        body[name] = value
    _check_names(body, schema)
    return {name: _part(name, value, schema[name].kind) for name, value in body.items()}


def _part(name: str, value, kind: type) -> Any:
    if isinstance(value, bytes):
        if kind is not bytes:
            raise RequestError(400, f"field {name!r} must be a text part, got a file")
        if not value:
            raise RequestError(400, f"field {name!r} is an empty file")
        return value
    if kind is bytes:
        return decode_base64(name, value)
    if kind is str:
        return value
    try:
        return _typed(name, kind(value), kind)
    except ValueError:
        raise RequestError(400, f"field {name!r} must be {_TYPE_NAMES[kind]}, got {value!r}") from None


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Image bytes -> an RGB PIL image: 400 when they are not a whole image of `IMAGE_FORMATS`, 413 when
    it has more than `max_pixels` pixels (checked from the header, before decoding)."""
    try:
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise RequestError(400, f"field {name!r} is not an image ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"field {name!r} is not a readable image ({', '.join(IMAGE_FORMATS)}): "
                              f"{type(e).__name__}: {e}") from None
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"field {name!r}: {e}") from None
    width, height = im.size
    if width * height > max_pixels:
        raise RequestError(413, f"field {name!r}: the image is {width}x{height} = {width * height} pixels, "
                              f"more than this server's limit of {max_pixels}")
    try:
        im.load()
        return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise RequestError(400, f"field {name!r}: the image cannot be decoded (truncated or corrupt: "
                              f"{type(e).__name__}: {e})") from None
