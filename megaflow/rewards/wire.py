"""The JSON wire format of megaflow's reward server and its clients, and the HTTP plumbing they share.

Nothing here unpickles anything: requests and replies are plain JSON.

**Videos.** One video `[F, 3, H, W]` float in [0, 1] travels as
`{"shape": [F, H, W, 3], "dtype": "uint8", "data": "<base64 of the F*H*W*3 bytes>"}`: channels
last, quantised with `round(x * 255)` (so each pixel is off by at most 0.5/255 after the round
trip). `decode_video` checks everything and raises `ValueError` with the reason: `shape` a list
of 4 positive integers ending in 3, `dtype` exactly `"uint8"`, `data` valid base64 (standard
alphabet, padded) whose byte count equals the product of the shape.

**Metadata.** Per-video metadata dicts are made JSON-safe by `json_safe_metadata`:

- `None`, `bool`, `int`, `str` and finite `float` are kept; NaN and inf floats are dropped;
- numpy scalars, 0-d numpy arrays and 0-d tensors become the Python number (then as above);
- `pathlib` paths become their string;
- dicts keep their `str` keys (int/float/bool keys become strings, others are dropped) with
  values converted recursively; lists and tuples become lists, and a list with any
  element that cannot be converted is dropped as a whole (so positions keep their meaning);
- anything else is dropped: tensors and arrays with dimensions (latents, embeddings), bytes,
  sets, arbitrary objects, and anything nested deeper than 32 levels.

A dropped value removes its key; nothing is ever sent as `repr()`.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import PurePath
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch

from megaflow.errors import ConfigError

__all__ = [
    "HTTPFailure",
    "decode_video",
    "decode_videos",
    "encode_video",
    "encode_videos",
    "is_loopback",
    "json_safe",
    "json_safe_metadata",
    "request_json",
    "retrying",
    "secret_from_env",
    "truncate",
]

WIRE_DTYPE = "uint8"
_MAX_DEPTH = 32
_DROP = object()


# --------------------------------------------------------------------------------------- videos


def _to_uint8(videos: torch.Tensor) -> np.ndarray:
    """`videos` `[..., 3, H, W]` float in [0, 1] as uint8 channels-last numpy `[..., H, W, 3]`."""
    x = torch.mul(videos.detach().to(device="cpu", dtype=torch.float32), 255.0)  # a new tensor
    x = x.clamp_(0.0, 255.0).round_().to(torch.uint8)
    return np.ascontiguousarray(x.movedim(-3, -1).numpy())


def encode_video(video: torch.Tensor) -> dict[str, Any]:
    """One video `[F, 3, H, W]` float in [0, 1] as a wire video (uint8, channels last, base64)."""
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[1] != 3:
        shape = list(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"a video to encode must be a tensor [F, 3, H, W], got {shape}")
    return _wire(_to_uint8(video))


def _wire(frames: np.ndarray) -> dict[str, Any]:
    return {
        "shape": [int(s) for s in frames.shape],
        "dtype": WIRE_DTYPE,
        "data": base64.b64encode(frames.tobytes()).decode("ascii"),
    }


def encode_videos(videos: torch.Tensor) -> list[dict[str, Any]]:
    """Videos `[B, F, 3, H, W]` float in [0, 1] as a list of B wire videos."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] != 3:
        shape = list(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos to encode must be a tensor [B, F, 3, H, W], got {shape}")
    frames = _to_uint8(videos)
    return [_wire(frames[b]) for b in range(frames.shape[0])]


def decode_video(obj: Any) -> np.ndarray:
    """A wire video as uint8 numpy `[F, H, W, 3]`; ValueError with the reason if it is malformed."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"a video must be an object with shape, dtype and data, got {type(obj).__name__}")
    missing = [k for k in ("shape", "dtype", "data") if k not in obj]
    if missing:
        raise ValueError(f"a video needs the fields shape, dtype and data; missing {', '.join(missing)}")
    extra = sorted(set(obj) - {"shape", "dtype", "data"})
    if extra:
        raise ValueError(f"a video has unknown field(s) {', '.join(map(str, extra))}")
    shape = obj["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ValueError(f"a video's shape must be a list of 4 positive integers [F, H, W, 3], got {shape!r:.100}")
    if shape[3] != 3:
        raise ValueError(f"a video's shape must end in 3 channels [F, H, W, 3], got {shape}")
    if obj["dtype"] != WIRE_DTYPE:
        raise ValueError(f"a video's dtype must be {WIRE_DTYPE!r}, got {obj['dtype']!r:.100}")
    data = obj["data"]
    if not isinstance(data, str):
        raise ValueError(f"a video's data must be a base64 string, got {type(data).__name__}")
    expected = math.prod(shape)
    # Check the size before decoding: base64 of n bytes is 4 * ceil(n / 3) characters.
    if len(data) != 4 * -(-expected // 3):
        raise ValueError(
            f"a video's data has {len(data)} base64 characters, but shape {shape} needs {expected} bytes "
            f"({4 * -(-expected // 3)} characters)"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"a video's data is not valid base64: {e}") from None
    if len(raw) != expected:
        raise ValueError(f"a video's data has {len(raw)} bytes, but shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def decode_videos(objs: Any) -> torch.Tensor:
    """A non-empty list of wire videos of one shape as float32 `[B, F, 3, H, W]` in [0, 1].

    ValueError naming the video and the reason if any is malformed or the shapes differ."""
    if not isinstance(objs, list) or not objs:
        raise ValueError(f"videos must be a non-empty list of videos, got {type(objs).__name__}"
                         + (" (empty)" if isinstance(objs, list) else ""))
    arrays = []
    for i, obj in enumerate(objs):
        try:
            arrays.append(decode_video(obj))
        except ValueError as e:
            raise ValueError(f"video {i}: {e}") from None
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(
                f"video {i} has shape {list(arrays[-1].shape)} but video 0 has {list(arrays[0].shape)}; "
                "a request's videos must share one shape"
            )
    stacked = torch.from_numpy(np.stack(arrays))  # [B, F, H, W, 3] uint8
    return stacked.permute(0, 1, 4, 2, 3).contiguous().to(torch.float32).div_(255.0)


# ------------------------------------------------------------------------------------- metadata


def json_safe(value: Any, _depth: int = 0) -> Any:
    """`value` converted to plain JSON types as the module docstring describes, or `_DROP`."""
    if _depth > _MAX_DEPTH:
        return _DROP
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else _DROP
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim != 0:
            return _DROP
        try:
            item = value.item()
        except (ValueError, RuntimeError, TypeError):
            return _DROP
        if isinstance(item, (np.generic, np.ndarray, torch.Tensor, complex, bytes)):
            return _DROP
        return json_safe(item, _depth + 1)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, (bool, int, float)) and not isinstance(key, str):
                key = json.dumps(key) if isinstance(key, bool) else str(key)
            if not isinstance(key, str):
                continue
            converted = json_safe(item, _depth + 1)
            if converted is not _DROP:
                out[key] = converted
        return out
    if isinstance(value, (list, tuple)):
        items = [json_safe(item, _depth + 1) for item in value]
        return _DROP if any(item is _DROP for item in items) else items
    return _DROP


def json_safe_metadata(metadata: Sequence[Any] | None, batch: int) -> list[dict[str, Any]]:
    """`batch` JSON-safe metadata dicts (empty ones where `metadata` is None or an entry is not a dict)."""
    if metadata is None:
        return [{} for _ in range(batch)]
    out = []
    for entry in metadata:
        converted = json_safe(entry) if isinstance(entry, Mapping) else {}
        out.append(converted if isinstance(converted, dict) else {})
    return out


# ------------------------------------------------------------------------------------ HTTP utils

T = TypeVar("T")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIXES = ("sk-", "sk_", "hf_", "gsk_", "xai-", "Bearer ")


def secret_from_env(env_name: Any, *, owner: str, option: str) -> str | None:
    """The secret held by the environment variable named `env_name` (None if `env_name` is None).

    ConfigError starting with `owner` (e.g. "reward 'vlm_judge'") and naming `option`, never
    quoting the value, if `env_name` is not an environment variable name, looks like a key itself,
    or names a variable that is unset or empty."""
    if env_name is None or env_name == "":
        return None
    looks_like_key = (
        not isinstance(env_name, str)
        or not _ENV_NAME.fullmatch(env_name)
        or env_name.startswith(_KEY_PREFIXES)
        or len(env_name) > 64
    )
    if looks_like_key:
        raise ConfigError(
            f"{owner}: {option} must be the NAME of an environment variable that holds the secret "
            "(letters, digits and _), and the value given is not one: it looks like the secret itself, which "
            "is not repeated here. Secrets never go in recipes or command lines, where they are saved and "
            f"logged: export MY_SECRET=... and give {option} MY_SECRET"
        )
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(
            f"{owner}: {option} names the environment variable {env_name}, which is "
            f"{'empty' if value == '' else 'not set'}; export {env_name}=<the secret> before starting"
        )
    return value


def retrying(call: Callable[[], T], *, retries: int, backoff: float) -> T:
    """`call()`, tried again up to `retries` times while it raises a retryable HTTPFailure, sleeping
    `backoff * 2**i` seconds before retry i + 1. The last failure is re-raised with `attempts` set."""
    attempt = 0
    while True:
        try:
            return call()
        except HTTPFailure as failure:
            attempt += 1
            failure.attempts = attempt
            if not failure.retryable or attempt > retries:
                raise
        time.sleep(backoff * 2 ** (attempt - 1))


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP address) is this machine's loopback interface."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPFailure(Exception):
    """One failed HTTP exchange: what went wrong (a sentence), and whether a retry may help."""

    def __init__(self, message: str, *, retryable: bool = True, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.attempts = 1

    def tried(self) -> str:
        """The phrase ' after N attempts', for messages."""
        return f" after {self.attempts} attempt{'s' if self.attempts != 1 else ''}"


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_MAX_REPLY_BYTES = 256 * 1024 * 1024


def _reason(body: bytes) -> str:
    """The server's reason in an error reply: its JSON `error` field, else the text, truncated."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict) and "error" in parsed:
            error = parsed["error"]
            if isinstance(error, dict) and isinstance(error.get("message"), str):  # OpenAI's form
                error = error["message"]
            text = error if isinstance(error, str) else json.dumps(error)
    except ValueError:
        pass
    return truncate(text, 300) or "(empty body)"


def truncate(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters (with how much was cut), as a quoted repr."""
    if len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} characters)"
    return repr(text)


def request_json(
    url: str,
    payload: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    body: bytes | None = None,
) -> Any:
    """POST `payload` as JSON (or `body`, already encoded) to `url` — GET if both are None — and
    return the parsed JSON reply. Raises HTTPFailure describing the failure: the HTTP status and
    the server's reason, a timeout, a refused or dropped connection, or a reply that is not JSON.

    Proxies from the environment are ignored for loopback hosts. `timeout` bounds each socket
    operation (connecting, and every read), not the whole exchange."""
    if body is None and payload is not None:
        body = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    request.add_header("Accept", "application/json")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    host = urllib.parse.urlsplit(url).hostname or ""
    opener = _NO_PROXY_OPENER if is_loopback(host) else urllib.request.build_opener()
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read(_MAX_REPLY_BYTES + 1)
    except urllib.error.HTTPError as e:
        try:
            detail = e.read(64 * 1024)
        except (OSError, http.client.HTTPException):
            detail = b""
        finally:
            e.close()
        # Client errors other than timeouts, conflicts and rate limits will not change on a retry.
        retryable = e.code >= 500 or e.code in (408, 409, 429)
        raise HTTPFailure(f"HTTP {e.code}: {_reason(detail)}", retryable=retryable, status=e.code) from None
    except urllib.error.URLError as e:
        raise HTTPFailure(_describe_os_error(e.reason, timeout)) from None
    except (TimeoutError, socket.timeout) as e:
        raise HTTPFailure(_describe_os_error(e, timeout)) from None
    except (OSError, http.client.HTTPException) as e:
        raise HTTPFailure(_describe_os_error(e, timeout)) from None
    if len(raw) > _MAX_REPLY_BYTES:
        raise HTTPFailure(f"reply larger than {_MAX_REPLY_BYTES >> 20} MiB")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return_text = raw[:2000].decode("utf-8", errors="replace")
        raise HTTPFailure(f"reply is not valid JSON: {truncate(return_text)}") from None


def _describe_os_error(reason: Any, timeout: float) -> str:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(reason, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return f"connection closed by the server ({type(reason).__name__}: {reason})"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return str(reason)
