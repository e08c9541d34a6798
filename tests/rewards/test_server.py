"""The reward server and the `remote` reward: real servers on 127.0.0.1, JSON only."""
from __future__ import annotations

import http.client
import json
import pickle
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megaflow.errors import ConfigError, RewardError
from megaflow.rewards import RewardSet, available_rewards, build_reward, register_reward
from megaflow.rewards.base import _REGISTRY
from megaflow.rewards.server import RewardServer
from megaflow.rewards.wire import decode_video, decode_videos, encode_videos, json_safe_metadata

TOKEN_ENV = "MEGAFLOW_TEST_SERVER_TOKEN"
#: Videos travel as round(x * 255): each pixel moves by at most 0.5/255, and brightness (a mean of
#: luma) and contrast (a std of luma, 1-Lipschitz in the RMS norm) move by at most as much.
QUANT = 0.5 / 255 + 1e-6
FAST = {"timeout": 5.0, "retries": 1, "backoff": 0.01}


def rand_videos(batch: int = 4, frames: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Detailed:
    """A reward with sub-scores: mean pixel as the score, the first video's index as a detail."""

    def __call__(self, videos, prompts, metadata):
        return {"score": videos.flatten(1).mean(1), "prompt_len": torch.tensor([float(len(p)) for p in prompts]),
                "tag": torch.tensor([float(m.get("tag", -1)) for m in metadata])}


class Exploding:
    def __call__(self, videos, prompts, metadata):
        raise ValueError("the reward model ran out of memory")


class Overlap:
    """Records how many scorings ran at once."""

    def __init__(self) -> None:
        self.active = 0
        self.most = 0

    def __call__(self, videos, prompts, metadata):
        self.active += 1
        self.most = max(self.most, self.active)
        time.sleep(0.02)
        self.active -= 1
        return torch.zeros(videos.shape[0])


@pytest.fixture
def test_reward_registered():
    before = dict(_REGISTRY)
    register_reward("test_detailed")(Detailed)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)


@pytest.fixture
def servers():
    started: list[RewardServer] = []

    def start(rewards, **kwargs) -> RewardServer:
        server = RewardServer(rewards, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_registered_lazily():
    assert {"remote", "vlm_judge"} <= set(available_rewards())


def test_wire_round_trip_and_validation():
    videos = rand_videos(2, frames=2, size=8)
    wire = encode_videos(videos)
    assert wire[0]["shape"] == [2, 8, 8, 3] and wire[0]["dtype"] == "uint8"
    back = decode_videos(wire)
    assert back.shape == videos.shape and back.dtype == torch.float32 and back.is_contiguous()
    assert (back - videos).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(back, (videos * 255).round() / 255)
    good = wire[0]
    for bad, match in [
        ({**good, "shape": [2, 8, 8]}, "4 positive integers"),
        ({**good, "shape": [2, 8, 8, 0]}, "4 positive integers"),
        ({**good, "shape": [2, 8, True, 3]}, "4 positive integers"),
        ({**good, "shape": [2, 8, 3, 8]}, "end in 3"),
        ({**good, "dtype": "float32"}, "dtype must be 'uint8'"),
        ({**good, "data": 5}, "base64 string"),
        ({**good, "data": "!" * len(good["data"])}, "not valid base64"),
        ({**good, "data": good["data"][:-4]}, "needs 384 bytes"),
        ({"shape": good["shape"], "dtype": "uint8"}, "missing data"),
        ({**good, "extra": 1}, "unknown field"),
    ]:
        with pytest.raises(ValueError, match=match):
            decode_video(bad)
    with pytest.raises(ValueError, match="share one shape"):
        decode_videos([good, encode_videos(rand_videos(1, frames=1, size=8))[0]])
    assert decode_video(good).shape == (2, 8, 8, 3)


def test_metadata_made_json_safe():
    meta = [{"seed": np.int64(3), "scale": torch.tensor(0.5), "path": Path("/tmp/x.mp4"), "latent": torch.zeros(4, 4),
             "arr": np.zeros(3), "nan": float("nan"), "nested": {"a": [1, 2.5, "b"], 7: True, "bad": object()},
             "mixed": [1, torch.zeros(2)], "raw": b"bytes", "none": None},
            "not a dict"]
    safe = json_safe_metadata(meta, 2)
    assert safe == [{"seed": 3, "scale": 0.5, "path": "/tmp/x.mp4", "nested": {"a": [1, 2.5, "b"], "7": True},
                     "none": None}, {}]
    json.dumps(safe, allow_nan=False)


def test_round_trip_matches_local(servers):
    local = RewardSet({"brightness": 1.0, "contrast": 1.0})
    server = servers(local)
    videos, prompts, metadata = rand_videos(), ["a prompt"] * 4, [{}] * 4
    expected = local(videos, prompts, metadata)
    quantised = local((videos * 255).round() / 255, prompts, metadata)
    for name in ("brightness", "contrast"):
        remote = build_reward("remote", url=server.url, reward=name, **FAST)
        got = remote(videos, prompts, metadata)
        assert got.dtype == torch.float32 and got.shape == (4,)
        assert (got - expected[name]).abs().max() <= QUANT
        assert torch.allclose(got, quantised[name], atol=1e-6)
    # The URL as printed, or with /v1 or the endpoint path, all work.
    remote = build_reward("remote", url=server.url + "/v1/score/", reward="contrast", **FAST)
    assert torch.allclose(remote(videos, prompts, metadata), quantised["contrast"], atol=1e-6)


def test_details_pass_through(servers, test_reward_registered):
    server = servers(RewardSet({"test_detailed": 1.0, "brightness": 1.0}))
    remote = build_reward("remote", url=server.url, reward="test_detailed", **FAST)
    videos = rand_videos(3)
    out = remote(videos, ["a", "bb", "ccc"], [{"tag": 5}, {"tag": 6, "latent": torch.zeros(8)}, {}])
    assert set(out) == {"score", "prompt_len", "tag"}
    assert out["prompt_len"].tolist() == [1.0, 2.0, 3.0] and out["tag"].tolist() == [5.0, 6.0, -1.0]
    assert (out["score"] - videos.flatten(1).mean(1)).abs().max() <= QUANT
    # Through a RewardSet on the client side, the details are reported per component.
    client = RewardSet({"remote": 1.0}, {"remote": {"url": server.url, "reward": "test_detailed", **FAST}})
    scored = client.score(videos, ["a", "bb", "ccc"], [{}] * 3)
    assert set(scored.details) == {"remote/prompt_len", "remote/tag"}
    # Without a reward name, a server with two rewards is a config error naming them.
    with pytest.raises(ConfigError, match="choose one with option reward"):
        build_reward("remote", url=server.url, **FAST)(videos, ["a"] * 3, [{}] * 3)


def test_health(servers):
    server = servers({"brightness": build_reward("brightness")}, max_bytes=12345)
    assert get(server.url + "/v1/health") == (200, {"status": "ok", "rewards": ["brightness"], "max_bytes": 12345})
    status, body = get(server.url + "/nope")
    assert status == 404 and "no such path" in body["error"]


def _score_body(videos: list[dict[str, Any]] | Any, prompts: Any = None, **extra: Any) -> bytes:
    payload = {"prompts": ["p"] * (len(videos) if isinstance(videos, list) else 1) if prompts is None else prompts,
               "videos": videos, **extra}
    return json.dumps(payload).encode()


def test_bad_requests_are_400_and_server_keeps_serving(servers):
    server = servers({"brightness": build_reward("brightness")})
    url = server.url + "/v1/score"
    good = encode_videos(rand_videos(1, frames=2, size=8))[0]
    cases = [
        (b"{not json", "not JSON"),
        (pickle.dumps({"images": [b"\x00"], "prompts": ["p"]}), "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"videos": [good]}).encode(), "missing field 'prompts'"),
        (_score_body([good], images=[]), "unknown field(s) 'images'"),
        (_score_body([]), "non-empty list"),
        (_score_body([{**good, "data": "%" * len(good["data"])}]), "not valid base64"),
        (_score_body([{**good, "shape": [2, 8, 8]}]), "4 positive integers"),
        (_score_body([{**good, "shape": [2, 8, 9, 3]}]), "needs 432 bytes"),
        (_score_body([good], prompts=["a", "b"]), "1 videos but 2 prompts"),
        (_score_body([good], prompts=[3]), "list of strings"),
        (_score_body([good], metadata=[1]), "list of objects"),
        (_score_body([good], rewards=["hps"]), "not served here"),
    ]
    for body, match in cases:
        status, reply = post(url, body)
        assert status == 400, (body[:40], reply)
        assert match in reply["error"], (match, reply)
        assert get(server.url + "/v1/health")[0] == 200
    status, reply = post(url, _score_body([good, good], metadata=[{"a": 1}, {}]))
    assert status == 200 and len(reply["scores"]["brightness"]) == 2 and reply["details"] == {}


def test_no_pickle_anywhere():
    import megaflow.rewards.server as server_module
    import megaflow.rewards.wire as wire_module

    for module in (server_module, wire_module):
        source = Path(module.__file__).read_text()
        assert not re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle|marshal)", source, re.M)
        assert "torch.load" not in source and "pickle.loads" not in source


def test_oversized_body_is_413(servers):
    server = servers({"brightness": build_reward("brightness")}, max_bytes=1000)
    host, port = server.server_address[:2]
    # The reply comes from the header alone: the announced gigabyte is never sent.
    connection = http.client.HTTPConnection(host, port, timeout=5)
    connection.putrequest("POST", "/v1/score")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10**9))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit of 1000 bytes" in json.loads(response.read())["error"]
    connection.close()
    # A client that sends its whole (moderately) oversized body still reads the 413.
    status, reply = post(server.url + "/v1/score", b"x" * 50_000)
    assert status == 413
    assert get(server.url + "/v1/health")[0] == 200
    # The remote reward splits its requests to fit the limit, and refuses a video that cannot fit.
    server = servers({"brightness": build_reward("brightness")}, max_bytes=2000)
    remote = build_reward("remote", url=server.url, **FAST)
    videos = rand_videos(3, frames=1, size=12)  # 432 bytes, 576 base64 characters each
    local = build_reward("brightness")(videos, ["p"] * 3, [{}] * 3)
    assert (remote(videos, ["p"] * 3, [{}] * 3) - local).abs().max() <= QUANT
    with pytest.raises(RewardError, match="over the server's limit"):
        remote(rand_videos(1, frames=4, size=16), ["p"], [{}])


def test_token_required(servers, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    server = servers({"brightness": build_reward("brightness")}, token="s3cret-token")
    body = _score_body(encode_videos(rand_videos(1, size=8)))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        status, reply = post(server.url + "/v1/score", body, headers)
        assert status == 401 and "token" in reply["error"]
        assert get(server.url + "/v1/health", headers)[0] == 401
    assert post(server.url + "/v1/score", body, {"Authorization": "Bearer s3cret-token"})[0] == 200
    videos = rand_videos(2)
    good = build_reward("remote", url=server.url, token_env=TOKEN_ENV, **FAST)
    assert good(videos, ["p"] * 2, [{}] * 2).shape == (2,)
    with pytest.raises(RewardError, match=r"after 1 attempt; last failure: HTTP 401"):
        build_reward("remote", url=server.url, **FAST)(videos, ["p"] * 2, [{}] * 2)
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ConfigError, match=f"{TOKEN_ENV}, which is not set"):
        build_reward("remote", url=server.url, token_env=TOKEN_ENV)
    with pytest.raises(ConfigError, match="NAME of an environment variable"):
        build_reward("remote", url=server.url, token_env="s3cret-token")


def test_non_loopback_host_warns():
    with pytest.warns(RuntimeWarning, match="reachable from other machines.*no token is set"):
        server = RewardServer({"brightness": build_reward("brightness")}, host="0.0.0.0", port=0)
    server.close()


def test_reward_that_raises_is_500(servers):
    server = servers({"boom": Exploding(), "brightness": build_reward("brightness")})
    status, reply = post(server.url + "/v1/score", _score_body(encode_videos(rand_videos(1, size=8))))
    assert status == 500 and reply["error"] == "reward 'boom' raised ValueError: the reward model ran out of memory"
    remote = build_reward("remote", url=server.url, reward="boom", timeout=5, retries=1, backoff=0.01)
    with pytest.raises(RewardError, match=r"after 2 attempts; last failure: HTTP 500: .*ran out of memory"):
        remote(rand_videos(1), ["p"], [{}])
    assert get(server.url + "/v1/health")[0] == 200


def test_server_gone_mid_run(servers):
    server = servers({"brightness": build_reward("brightness")})
    remote = build_reward("remote", url=server.url, timeout=2, retries=2, backoff=0.01)
    videos = rand_videos(2)
    assert remote(videos, ["p"] * 2, [{}] * 2).shape == (2,)
    server.close()
    with pytest.raises(RewardError) as info:
        remote(videos, ["p"] * 2, [{}] * 2)
    message = str(info.value)
    assert server.url in message and "connection refused" in message and "after 3 attempts" in message


class _Garbage(BaseHTTPRequestHandler):
    """Health is fine; scoring answers with HTML (or, on /wrong, one score too few)."""

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self._send(json.dumps({"status": "ok", "rewards": ["x"]}).encode())

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.startswith("/wrong"):
            self._send(json.dumps({"scores": {"x": [0.5]}, "details": {}}).encode())
        else:
            self._send(b"<html>502 upstream</html>")


def test_garbage_replies_are_reward_errors():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(RewardError, match=re.escape(url) + r".*not valid JSON: '<html>502 upstream</html>'"):
            build_reward("remote", url=url, **FAST)(rand_videos(2), ["p"] * 2, [{}] * 2)
        import megaflow.rewards.server as server_module

        remote = build_reward("remote", url=url, **FAST)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(server_module, "SCORE_PATH", "/wrong")
            with pytest.raises(RewardError, match="wrong number of scores for x/score: expected 2, got 1"):
                remote(rand_videos(2), ["p"] * 2, [{}] * 2)
    finally:
        server.shutdown()
        server.server_close()


def test_client_thread_safe_and_scoring_serialised(servers):
    overlap = Overlap()
    server = servers({"brightness": build_reward("brightness"), "overlap": overlap})
    remote = build_reward("remote", url=server.url, reward="brightness", **FAST)
    counter = build_reward("remote", url=server.url, reward="overlap", **FAST)
    batches = [rand_videos(2, seed=s) for s in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda v: remote(v, ["p"] * 2, [{}] * 2), batches))
        list(pool.map(lambda v: counter(v, ["p"] * 2, [{}] * 2), batches))
    local = build_reward("brightness")
    for videos, got in zip(batches, results):
        assert (got - local(videos, ["p"] * 2, [{}] * 2)).abs().max() <= QUANT
    assert overlap.most == 1


def test_remote_bad_options():
    with pytest.raises(ConfigError, match="needs option url"):
        build_reward("remote")
    with pytest.raises(ConfigError, match="batch_size"):
        build_reward("remote", url="http://127.0.0.1:1", batch_size=0)
    with pytest.raises(ConfigError, match="frames must be one of"):
        build_reward("remote", url="http://127.0.0.1:1", frames="odd")


def test_cli_reward_server(monkeypatch, capsys):
    """`megaflow.cli.main(["reward-server", ...])` in a thread; Ctrl-C is simulated by ending
    serve_forever with KeyboardInterrupt, as the signal does in the main thread."""
    from megaflow.cli import main

    running: list[RewardServer] = []
    stop = threading.Event()
    serve_forever = RewardServer.serve_forever

    def serve_until_stopped(self, poll_interval=0.5):
        running.append(self)
        threading.Thread(target=lambda: (stop.wait(), self.shutdown()), daemon=True).start()
        serve_forever(self, poll_interval=0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(RewardServer, "serve_forever", serve_until_stopped)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(
        ["reward-server", "--reward", "brightness", "--set-option", "brightness.target=0.25", "--port", "0"])))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not running and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running, capsys.readouterr()
        url = running[0].url
        assert get(url + "/v1/health")[1]["rewards"] == ["brightness"]
        videos = rand_videos(2)
        got = build_reward("remote", url=url, **FAST)(videos, ["p"] * 2, [{}] * 2)
        expected = build_reward("brightness", target=0.25)(videos, ["p"] * 2, [{}] * 2)
        assert (got - expected).abs().max() <= QUANT
    finally:
        stop.set()
        thread.join(10)
    assert codes == [0]
    out = capsys.readouterr().out
    assert f"serving reward(s) brightness at {url} " in out and "Ctrl-C stops" in out and "stopped" in out
    with pytest.raises(urllib.error.URLError):
        get(url + "/v1/health")


def test_cli_bad_arguments(capsys):
    from megaflow.cli import main

    assert main(["reward-server", "--reward", "brightness", "--set-option", "contrast.x=1", "--port", "0"]) == 2
    assert "not among the served rewards" in capsys.readouterr().err
    assert main(["reward-server", "--reward", "nope", "--port", "0"]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err
    assert main(["reward-server", "--reward", "brightness", "--token-env", "MEGAFLOW_UNSET_VAR_X", "--port", "0"]) == 2
    assert "MEGAFLOW_UNSET_VAR_X, which is not set" in capsys.readouterr().err
