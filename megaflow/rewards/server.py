"""A reward server (`megaflow reward-server`) and its client, the reward `remote`.

The server hosts registered rewards (a reward model on its own GPU, or shared by several
trainers) behind a small JSON-over-HTTP protocol; nothing is ever pickled or unpickled.

    GET  /v1/health -> {"status": "ok", "rewards": [NAME, ...], "max_bytes": N}
    POST /v1/score  <- {"prompts": [str] * B, "videos": [wire video] * B,
                        "metadata": [dict] * B (optional), "rewards": [NAME, ...] (optional: default all)}
                    -> {"scores": {NAME: [float] * B}, "details": {"NAME/sub": [float] * B}}

Videos use the wire format of `megaflow.rewards.wire` (uint8 channels last, base64; all videos
of a request share one shape) and are decoded to float32 `[B, F, 3, H, W]` in [0, 1].
Errors are JSON `{"error": reason}`: 400 for a malformed request (not JSON, missing or unknown
fields, bad video), 401 for a missing or wrong token, 404 for another path, 411 without a
Content-Length, 413 for a body over the limit (answered from the header, before the body is read),
500 when a reward raises. The server keeps serving after any of them.

Security: it binds to 127.0.0.1 by default and warns for any other address; with a token every
request needs `Authorization: Bearer <token>` (compared in constant time), health included.
Requests are decoded in parallel, but scoring holds one lock (one model, many client threads).
Memory: a body of N bytes holds about 0.75 N bytes of uint8 pixels, decoded to 3 N bytes of
float32, so `max_bytes` (default 512 MiB) bounds what one request can make the server allocate.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import socket
import sys
import threading
import time
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping, Sequence

import torch

from megaflow.errors import ConfigError, RewardError
from megaflow.rewards.base import Reward, RewardSet, register_reward, score_reward, validate_videos
from megaflow.rewards.frames import check_frames, frame_indices
from megaflow.rewards.wire import (
    HTTPFailure,
    decode_videos,
    encode_videos,
    is_loopback,
    json_safe_metadata,
    request_json,
    retrying,
    secret_from_env,
    truncate,
)

__all__ = ["DEFAULT_MAX_BYTES", "RemoteReward", "RewardServer", "serve", "serve_command"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
SCORE_PATH = "/v1/score"
HEALTH_PATH = "/v1/health"
_REQUEST_FIELDS = {"prompts", "videos", "metadata", "rewards"}
#: After an early error reply, at most this much of an unread body is discarded (so that the
#: client, still sending, reads the reply instead of a reset connection), for at most 2 s.
_DRAIN_BYTES = 16 * 1024 * 1024


class BadRequest(ValueError):
    """A request the server refuses: HTTP `status` with `reason`."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


# ------------------------------------------------------------------------------------------ server


class RewardServer(ThreadingHTTPServer):
    """An HTTP server scoring videos with `rewards` (name -> reward, or a RewardSet).

    `start()` serves from a background thread, `serve_forever()` from this one; `close()` stops."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        rewards: Mapping[str, Reward] | RewardSet,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        """Bind to `host:port` (0: any free port); see `serve` for the arguments."""
        if isinstance(rewards, RewardSet):
            rewards = rewards.rewards
        if not rewards:
            raise ConfigError("the reward server needs at least one reward")
        self.rewards: dict[str, Reward] = dict(rewards)
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError("the reward server's token must be a non-empty string (or None for no token)")
        self.token = token
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ConfigError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.score_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if not is_loopback(host):
            advice = "" if token else " and no token is set: anyone who can reach it can use it (set one with --token-env)"
            warnings.warn(
                f"the reward server listens on {host}, reachable from other machines{advice}; "
                "bind to 127.0.0.1 unless that is what you want",
                RuntimeWarning,
                stacklevel=2,
            )
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), _Handler)

    @property
    def url(self) -> str:
        """The base URL, e.g. `http://127.0.0.1:18090` (give it to the `remote` reward as url)."""
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (a client that hung up mid-reply): one log line, no traceback."""
        error = sys.exc_info()[1]
        logger.warning("connection from %s failed: %s: %s", client_address, type(error).__name__, error)

    def start(self) -> "RewardServer":
        """Serve from a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="megaflow-reward-server", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (if serving) and release the port."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "rewards": list(self.rewards), "max_bytes": self.max_bytes}

    def parse(self, body: bytes) -> tuple[torch.Tensor, list[str], list[dict[str, Any]], list[str]]:
        """A score request's videos, prompts, metadata and reward names; BadRequest with the reason."""
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the body is not JSON ({type(e).__name__}: {truncate(str(e), 120)}); "
                             "send {\"prompts\": [...], \"videos\": [...]} as JSON") from None
        if not isinstance(payload, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(payload).__name__}")
        unknown = sorted(set(payload) - _REQUEST_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; expected {sorted(_REQUEST_FIELDS)}")
        for key in ("prompts", "videos"):
            if key not in payload:
                raise BadRequest(f"missing field {key!r}")
        try:
            videos = decode_videos(payload["videos"])
        except ValueError as e:
            raise BadRequest(f"bad videos: {e}") from None
        batch = videos.shape[0]
        prompts = payload["prompts"]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise BadRequest("prompts must be a list of strings")
        if len(prompts) != batch:
            raise BadRequest(f"got {batch} videos but {len(prompts)} prompts")
        metadata = payload.get("metadata")
        if metadata is None:
            metadata = [{} for _ in range(batch)]
        if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
            raise BadRequest("metadata must be a list of objects (one per video)")
        if len(metadata) != batch:
            raise BadRequest(f"got {batch} videos but {len(metadata)} metadata entries")
        names = payload.get("rewards")
        if names is None:
            names = list(self.rewards)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise BadRequest("rewards must be a non-empty list of served reward names")
        missing = [n for n in names if n not in self.rewards]
        if missing:
            raise BadRequest(f"reward(s) {', '.join(map(repr, missing))} not served here; served: {list(self.rewards)}")
        return videos, prompts, metadata, names

    def score(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]], names: Sequence[str]
    ) -> dict[str, Any]:
        """Score with the rewards `names` (one scoring at a time): the reply of `POST /v1/score`."""
        validate_videos(videos, prompts, metadata)
        scores: dict[str, list[float]] = {}
        details: dict[str, list[float]] = {}
        with self.score_lock:
            for name in names:
                one = score_reward(name, self.rewards[name], videos, prompts, metadata)
                scores[name] = one.components[name].tolist()
                details.update({k: v.tolist() for k, v in one.details.items()})
        return {"scores": scores, "details": details}


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"
    server_version = "megaflow-reward-server"
    timeout = 300  # seconds per socket read while receiving a request
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, payload: Mapping[str, Any], *, close: bool = False) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _refuse(self, status: int, reason: str, unread: int = 0) -> None:
        """Reply `status` with `reason` before reading the body, then drop the connection."""
        if status >= 500:
            logger.warning("%s: %s", self.path, reason)
        self._reply(status, {"error": reason}, close=True)
        if unread > 0:
            self._discard(unread)

    def _discard(self, unread: int) -> None:
        """Read and drop at most `_DRAIN_BYTES` of an unread body for at most 2 s."""
        deadline = time.monotonic() + 2.0
        left = min(unread, _DRAIN_BYTES)
        try:
            self.connection.settimeout(0.5)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {token}".encode("utf-8"))

    def _content_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.strip().isdigit():
            return None
        return int(raw)

    def do_GET(self) -> None:  # noqa: N802 - the base class's naming
        path = urllib.parse.urlsplit(self.path).path
        if not self._authorized():
            self._refuse(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'")
        elif path == HEALTH_PATH:
            self._reply(200, self.server.health())
        else:
            self._refuse(404, f"no such path {path!r}; use GET {HEALTH_PATH} or POST {SCORE_PATH}")

    def do_POST(self) -> None:  # noqa: N802 - the base class's naming
        path = urllib.parse.urlsplit(self.path).path
        length = self._content_length()
        unread = length or 0
        if not self._authorized():
            return self._refuse(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'", unread)
        if path != SCORE_PATH:
            return self._refuse(404, f"no such path {path!r}; use POST {SCORE_PATH} or GET {HEALTH_PATH}", unread)
        if self.headers.get("Transfer-Encoding") or length is None:
            return self._refuse(411, "the request needs a Content-Length header (chunked bodies are not accepted)")
        if length > self.server.max_bytes:
            return self._refuse(
                413,
                f"the body is {length} bytes, over this server's limit of {self.server.max_bytes} bytes "
                "(send fewer videos per request, or restart the server with a larger --max-mb)",
                unread,
            )
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return
        try:
            videos, prompts, metadata, names = self.server.parse(body)
        except BadRequest as e:
            return self._reply(e.status, {"error": str(e)})
        del body
        try:
            result = self.server.score(videos, prompts, metadata, names)
        except Exception as e:  # noqa: BLE001 - any reward failure becomes a 500 with its message
            logger.exception("scoring failed")
            message = str(e) if isinstance(e, RewardError) else f"{type(e).__name__}: {e}"
            return self._reply(500, {"error": message})
        self._reply(200, result)


def serve(
    rewards: Mapping[str, Reward] | RewardSet,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    on_ready: Any = None,
) -> None:
    """Serve `rewards` (name -> reward, or a RewardSet) on `host:port` until Ctrl-C.

    `token`: when given, every request needs `Authorization: Bearer <token>`. `max_bytes`: larger
    request bodies are refused (413). `on_ready(server)` is called once the port is bound."""
    server = RewardServer(rewards, host, port, token, max_bytes)
    try:
        if on_ready is not None:
            on_ready(server)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _parse_options(names: Sequence[str], assignments: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`NAME.KEY=VALUE` assignments (VALUE read as YAML) as {name: {key: value}}."""
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        target, sep, raw = assignment.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not name or not key:
            raise ConfigError(f"--set-option needs NAME.KEY=VALUE, got {assignment!r}")
        if name not in names:
            raise ConfigError(f"--set-option {assignment!r}: {name!r} is not among the served rewards {list(names)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        options.setdefault(name, {})[key] = value
    return options


def serve_command(
    names: Sequence[str],
    assignments: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 18090,
    token_env: str | None = None,
    max_mb: float = DEFAULT_MAX_BYTES / 2**20,
    device: str | None = None,
) -> int:
    """`megaflow reward-server`: build the rewards `names`, print the URL, serve until Ctrl-C."""
    names = list(names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"--reward {', '.join(duplicates)} given more than once")
    if not (isinstance(max_mb, (int, float)) and math.isfinite(max_mb) and max_mb > 0):
        raise ConfigError(f"--max-mb must be a positive number, got {max_mb!r}")
    token = secret_from_env(token_env, owner="megaflow reward-server", option="--token-env")
    rewards = RewardSet({n: 1.0 for n in names}, _parse_options(names, assignments), device=device)

    def ready(server: RewardServer) -> None:
        print(
            f"serving reward(s) {', '.join(names)} at {server.url} (POST {server.url}{SCORE_PATH}, "
            f"GET {server.url}{HEALTH_PATH}){'; token required' if token else ''}; Ctrl-C stops",
            flush=True,
        )

    serve(rewards, host, port, token, int(max_mb * 2**20), on_ready=ready)
    print("reward server stopped", flush=True)
    return 0


# ------------------------------------------------------------------------------------------ client


def _positive(name: str, value: Any, *, integer: bool = False, zero_ok: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if zero_ok else value > 0) and (not integer or float(value) == int(value))
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"reward 'remote': option {name} must be {kind} {'>= 0' if zero_ok else '> 0'}, got {value!r}")
    return int(value) if integer else float(value)


@register_reward("remote")
class RemoteReward:
    """A reward scored by a `megaflow reward-server`; thread-safe.

    Options:
      url: the server's base URL as it prints it, e.g. `http://127.0.0.1:18090`.
      reward: which served reward (default: the only one the server serves). (Not called `name`:
        `build_reward(name, **options)` takes `name` itself.)
      token_env: the NAME of an environment variable holding the server's token (none by default).
      timeout: seconds per request (each socket operation), default 300.
      retries: extra attempts after a failed request (default 2): connection errors, timeouts,
        5xx replies and malformed replies are retried, other 4xx replies are not.
      backoff: seconds before the first retry, doubling each time (default 1).
      batch_size: at most this many videos per request (default 8); fewer when the server's
        body limit needs it.
      frames: which frames to send (`first|middle|last|uniform:K|all`, default all); the served
        reward sees only those.

    Returns the served reward's scores `[B]` (float32, CPU) and, when it reports sub-scores,
    `{"score": ..., sub: ...}`. Failures raise RewardError naming the URL and the last failure.
    """

    def __init__(
        self,
        url: str | None = None,
        reward: str | None = None,
        token_env: str | None = None,
        timeout: float = 300.0,
        retries: int = 2,
        backoff: float = 1.0,
        batch_size: int = 8,
        frames: str = "all",
    ) -> None:
        """Check the options and read the token (see the class docstring); the server is first
        contacted on the first scoring."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError("reward 'remote' needs option url: the reward server's base URL as "
                              f"`megaflow reward-server` prints it, e.g. http://127.0.0.1:18090 (got {url!r})")
        base = url.rstrip("/")
        for suffix in (SCORE_PATH, HEALTH_PATH, "/v1"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        self.url = base
        if reward is not None and (not isinstance(reward, str) or not reward):
            raise ConfigError(f"reward 'remote': option reward must be a served reward's name, got {reward!r}")
        self.reward = reward
        self.token_env = token_env
        token = secret_from_env(token_env, owner="reward 'remote'", option="option token_env")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = _positive("timeout", timeout)
        self.retries = _positive("retries", retries, integer=True, zero_ok=True)
        self.backoff = _positive("backoff", backoff, zero_ok=True)
        self.batch_size = _positive("batch_size", batch_size, integer=True)
        self.frames = check_frames(frames)
        self._lock = threading.Lock()
        self._server_info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, reward={self.reward!r})"

    def _fail(self, what: str, failure: HTTPFailure) -> RewardError:
        return RewardError(f"remote reward server {self.url}: {what} failed{failure.tried()}; last failure: {failure}")

    def _info(self) -> dict[str, Any]:
        """The server's health reply (fetched once) with the chosen reward's name under `name`."""
        with self._lock:
            if self._server_info is not None:
                return self._server_info

            def attempt() -> dict[str, Any]:
                reply = request_json(self.url + HEALTH_PATH, headers=self._headers, timeout=self.timeout)
                served = reply.get("rewards") if isinstance(reply, dict) else None
                if not isinstance(served, list) or not all(isinstance(n, str) for n in served) or not served:
                    raise HTTPFailure(f"health reply has no list of rewards: {truncate(str(reply))}")
                return reply

            try:
                info = retrying(attempt, retries=self.retries, backoff=self.backoff)
            except HTTPFailure as failure:
                raise self._fail(f"GET {HEALTH_PATH}", failure) from None
            served = info["rewards"]
            if self.reward is None and len(served) != 1:
                raise ConfigError(f"reward 'remote': the server at {self.url} serves {served}; "
                                  "choose one with option reward")
            name = self.reward if self.reward is not None else served[0]
            if name not in served:
                raise ConfigError(f"reward 'remote': the server at {self.url} does not serve {name!r}; it serves {served}")
            max_bytes = info.get("max_bytes")
            self._server_info = {
                "name": name,
                "max_bytes": max_bytes if isinstance(max_bytes, int) and max_bytes > 0 else None,
            }
            return self._server_info

    def _chunks(self, sizes: list[int], max_bytes: int | None) -> list[range]:
        """Consecutive sample ranges of at most `batch_size` samples whose bodies fit `max_bytes`."""
        chunks, start, total = [], 0, 256
        for i, size in enumerate(sizes):
            if max_bytes is not None and size + 256 > max_bytes:
                raise RewardError(
                    f"remote reward server {self.url}: one video is {size / 2**20:.1f} MiB encoded, over the "
                    f"server's limit of {max_bytes / 2**20:.1f} MiB; restart it with a larger --max-mb or "
                    "send fewer frames (option frames)"
                )
            if i > start and (i - start >= self.batch_size or (max_bytes is not None and total + size > max_bytes)):
                chunks.append(range(start, i))
                start, total = i, 256
            total += size
        chunks.append(range(start, len(sizes)))
        return chunks

    def _post(self, name: str, body: bytes, count: int) -> dict[str, list[float]]:
        """Scores of one request: {"score": [count], sub: [count]}, with retries."""

        def attempt() -> dict[str, list[float]]:
            reply = request_json(self.url + SCORE_PATH, headers=self._headers, timeout=self.timeout, body=body)
            scores = reply.get("scores") if isinstance(reply, dict) else None
            if not isinstance(scores, dict) or name not in scores:
                raise HTTPFailure(f"reply has no scores for {name!r}: {truncate(str(reply))}")
            out = {"score": scores[name]}
            details = reply.get("details") or {}
            if isinstance(details, dict):
                out.update({k[len(name) + 1:]: v for k, v in details.items() if k.startswith(name + "/")})
            for key, values in out.items():
                if not isinstance(values, list) or len(values) != count:
                    got = len(values) if isinstance(values, list) else type(values).__name__
                    raise HTTPFailure(f"wrong number of scores for {name}/{key}: expected {count}, got {got}")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in values):
                    raise HTTPFailure(f"scores for {name}/{key} are not all finite numbers: {truncate(str(values))}")
            return out

        try:
            return retrying(attempt, retries=self.retries, backoff=self.backoff)
        except HTTPFailure as failure:
            raise self._fail(f"POST {SCORE_PATH} ({count} videos)", failure) from None

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Score `videos` `[B, F, 3, H, W]` on the server: float32 `[B]`, or a mapping with sub-scores."""
        batch = videos.shape[0]
        if len(prompts) != batch:
            raise RewardError(f"remote reward got {batch} videos but {len(prompts)} prompts")
        info = self._info()
        name = info["name"]
        chosen = videos if self.frames == "all" else videos[:, frame_indices(self.frames, videos.shape[1])]
        wire = encode_videos(chosen)
        meta = json_safe_metadata(metadata, batch)
        items = [(w, json.dumps(str(p)), json.dumps(m)) for w, p, m in zip(wire, prompts, meta)]
        sizes = [len(w["data"]) + 100 + len(p) + len(m) for w, p, m in items]
        results: dict[str, list[float]] = {}
        for chunk in self._chunks(sizes, info["max_bytes"]):
            body = json.dumps({
                "prompts": [str(prompts[i]) for i in chunk],
                "videos": [wire[i] for i in chunk],
                "metadata": [meta[i] for i in chunk],
                "rewards": [name],
            }).encode("utf-8")
            out = self._post(name, body, len(chunk))
            if results and set(out) != set(results):
                raise RewardError(f"remote reward server {self.url}: sub-scores changed between requests "
                                  f"({sorted(results)} then {sorted(out)})")
            for key, values in out.items():
                results.setdefault(key, []).extend(values)
        tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in results.items()}
        return tensors["score"] if len(tensors) == 1 else tensors

