"""The `vlm_judge` reward against a fake OpenAI-compatible server on 127.0.0.1."""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest
import torch
from PIL import Image

from megaflow.errors import ConfigError, RewardError
from megaflow.rewards import available_rewards, build_reward

KEY_ENV = "MEGAFLOW_TEST_JUDGE_KEY"
KEY = "test-secret-123"


def chat(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def score_from_prompt(n: int, payload: dict[str, Any]) -> tuple[int, Any, float]:
    """Answer 'Final Score: X' where the prompt is 'score X'."""
    text = payload["messages"][0]["content"][-1]["text"]
    x = re.search(r"score (\d(?:\.\d+)?)", text).group(1)
    return 200, chat(f"The video is fine.\nFinal Score: {x}"), 0.0


class FakeOpenAI(ThreadingHTTPServer):
    """Records each request; `respond(n, payload) -> (status, reply (dict or text), delay_s)`."""

    daemon_threads = True

    def __init__(self, respond: Callable[[int, dict[str, Any]], tuple[int, Any, float]]) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out closed the socket: nothing to report


class _FakeHandler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            n = len(self.server.requests)
            self.server.requests.append({"path": self.path, "headers": dict(self.headers), "json": payload})
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            status, reply, delay = self.server.respond(n, payload)
            time.sleep(delay)
            body = (json.dumps(reply) if isinstance(reply, dict) else reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if isinstance(reply, dict) else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            with self.server.lock:
                self.server.in_flight -= 1


@pytest.fixture
def fake():
    servers: list[FakeOpenAI] = []

    def start(respond: Callable[[int, dict[str, Any]], tuple[int, Any, float]] = score_from_prompt) -> FakeOpenAI:
        server = FakeOpenAI(respond)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def judge(server: FakeOpenAI, **options: Any):
    options = {"url": server.url, "model": "UnifiedReward-test", "timeout": 5.0, "retries": 0, "backoff": 0.01,
               **options}
    return build_reward("vlm_judge", **options)


def videos(batch: int, frames: int = 4, height: int = 16, width: int = 24) -> torch.Tensor:
    """Frame f of every video is a solid grey of level f / (frames - 1)."""
    levels = torch.linspace(0, 1, frames).view(1, frames, 1, 1, 1)
    return levels.expand(batch, frames, 3, height, width).clone()


def test_registered_lazily():
    assert "vlm_judge" in available_rewards()


def test_request_format_auth_and_scores(fake, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server = fake()
    reward = judge(server, api_key_env=KEY_ENV, frames="uniform:2", image_size=32)
    prompts = ["a cat, score 1", "a dog, score 3.5", "a bird, score 5"]
    out = reward(videos(3), prompts, [{}] * 3)
    assert torch.allclose(out["raw"], torch.tensor([1.0, 3.5, 5.0]))
    assert torch.allclose(out["score"], torch.tensor([0.0, 0.625, 1.0]))
    assert out["score"].dtype == torch.float32 and out["score"].shape == (3,)
    assert len(server.requests) == 3
    seen_prompts = set()
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        assert request["headers"]["Content-Type"] == "application/json"
        body = request["json"]
        assert body["model"] == "UnifiedReward-test" and body["temperature"] == 0
        (message,) = body["messages"]
        assert message["role"] == "user"
        *images, text = message["content"]
        assert text["type"] == "text"
        assert "Final Score" in text["text"] and "{prompt}" not in text["text"]
        seen_prompts.update(p for p in prompts if f'"{p}"' in text["text"])
        # uniform:2 of 4 frames: the first (black) and the last (white), longer side resized to 32.
        assert len(images) == 2
        for image, level in zip(images, (0, 255)):
            assert image["type"] == "image_url"
            url = image["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True)))
            assert png.format == "PNG" and png.size == (32, 21) and png.mode == "RGB"
            assert png.getpixel((5, 5)) == (level, level, level)
    assert seen_prompts == set(prompts)
    assert KEY not in repr(reward)


def test_custom_template_pattern_and_range(fake):
    server = fake(lambda n, p: (200, chat("Rating = 7 / 10"), 0.0))
    reward = judge(server, template="Rate {prompt} out of 10", score_pattern=r"Rating = (\d+)",
                   score_range=[0, 10], frames="first", image_size=None)
    out = reward(videos(1), ["a fox"], [{}])
    assert out["score"].tolist() == pytest.approx([0.7])
    body = server.requests[0]["json"]
    assert body["messages"][0]["content"][-1]["text"] == "Rate a fox out of 10"
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (24, 16)
    assert "Authorization" not in server.requests[0]["headers"]


def test_requests_run_concurrently(fake):
    server = fake(lambda n, p: (200, chat("Final Score: 4"), 0.3))
    reward = judge(server, concurrency=4)
    start = time.perf_counter()
    out = reward(videos(4), ["score 4"] * 4, [{}] * 4)
    elapsed = time.perf_counter() - start
    assert out["raw"].tolist() == [4.0] * 4
    assert server.max_in_flight >= 2
    assert elapsed < 4 * 0.3


def test_timeout_retried_then_reward_error(fake):
    server = fake(lambda n, p: (200, chat("Final Score: 3"), 1.0))
    reward = judge(server, timeout=0.15, retries=2, backoff=0.01)
    with pytest.raises(RewardError) as info:
        reward(videos(1), ["score 3"], [{}])
    message = str(info.value)
    assert f"{server.url}/chat/completions" in message
    assert "sample 0" in message and "timed out after 0.15 s" in message and "after 3 attempts" in message
    assert len(server.requests) == 3


def test_unparsable_reply_is_an_error_quoting_it(fake):
    server = fake(lambda n, p: (200, chat("I cannot judge this video, sorry."), 0.0))
    reward = judge(server, retries=1, backoff=0.01)
    with pytest.raises(RewardError) as info:
        reward(videos(2), ["score 2", "score 2"], [{}] * 2)
    message = str(info.value)
    assert "I cannot judge this video, sorry." in message and "after 2 attempts" in message
    assert server.url in message and "sample 0" in message and "1 other sample(s) failed" in message
    assert len(server.requests) == 4


def test_score_outside_range_is_an_error(fake):
    server = fake(lambda n, p: (200, chat("Final Score: 9"), 0.0))
    with pytest.raises(RewardError, match=r"score 9 is outside score_range \[1, 5\]"):
        judge(server)(videos(1), ["x"], [{}])


def test_non_json_and_http_errors(fake):
    server = fake(lambda n, p: (502, "<html>bad gateway</html>", 0.0))
    with pytest.raises(RewardError, match=r"HTTP 502: '<html>bad gateway</html>'"):
        judge(server, retries=1)(videos(1), ["x"], [{}])
    assert len(server.requests) == 2
    server = fake(lambda n, p: (200, "not json at all", 0.0))
    with pytest.raises(RewardError, match="not valid JSON: 'not json at all'"):
        judge(server)(videos(1), ["x"], [{}])
    # A wrong key is not retried.
    server = fake(lambda n, p: (401, {"error": {"message": "invalid api key"}}, 0.0))
    with pytest.raises(RewardError, match="after 1 attempt; last failure: HTTP 401: 'invalid api key'"):
        judge(server, retries=3)(videos(1), ["x"], [{}])
    assert len(server.requests) == 1


def test_fails_once_then_succeeds(fake):
    def flaky(n: int, payload: dict[str, Any]) -> tuple[int, Any, float]:
        return (503, {"error": "warming up"}, 0.0) if n == 0 else (200, chat("Final Score: 2"), 0.0)

    server = fake(flaky)
    out = judge(server, retries=1, backoff=0.01)(videos(1), ["x"], [{}])
    assert out["raw"].tolist() == [2.0]
    assert len(server.requests) == 2


def test_connection_refused_names_endpoint():
    reward = build_reward("vlm_judge", url="http://127.0.0.1:9/v1", model="m", retries=1, backoff=0.01, timeout=1)
    with pytest.raises(RewardError, match=r"http://127.0.0.1:9/v1/chat/completions.*connection refused"):
        reward(videos(1), ["x"], [{}])


def test_api_key_never_accepted_as_option(monkeypatch):
    secret = "sk-proj-abcdef0123456789"
    with pytest.raises(ConfigError, match="never accepted") as info:
        build_reward("vlm_judge", url="http://127.0.0.1:1/v1", model="m", api_key=secret)
    assert secret not in str(info.value)
    for looks_like_key in (secret, "hf_abcdefghijklmnop", "Bearer abc", "abc def"):
        with pytest.raises(ConfigError, match="NAME of an environment variable") as info:
            build_reward("vlm_judge", url="http://127.0.0.1:1/v1", model="m", api_key_env=looks_like_key)
        assert looks_like_key not in str(info.value)


def test_missing_env_var_is_config_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{KEY_ENV}, which is not set"):
        build_reward("vlm_judge", url="http://127.0.0.1:1/v1", model="m", api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(ConfigError, match=f"{KEY_ENV}, which is empty"):
        build_reward("vlm_judge", url="http://127.0.0.1:1/v1", model="m", api_key_env=KEY_ENV)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"url": None}, "needs option url"),
        ({"model": ""}, "needs option model"),
        ({"template": "no prompt field"}, r"containing \{prompt\}"),
        ({"score_pattern": r"Final Score: \d"}, "exactly one group"),
        ({"score_pattern": "("}, "not a regex"),
        ({"score_range": [5, 1]}, "lo < hi"),
        ({"frames": "some"}, "frames must be one of"),
        ({"image_size": 0}, "image_size"),
        ({"concurrency": 0}, "concurrency"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_bad_options(options, match):
    base = {"url": "http://127.0.0.1:1/v1", "model": "m"}
    with pytest.raises(ConfigError, match=match):
        build_reward("vlm_judge", **{**base, **options})
