"""Reward `vlm_judge`: a vision-language model served behind an OpenAI-compatible chat endpoint
(UnifiedReward on sglang or vLLM, or any other) rates each video from a few of its frames.

For each video, one `POST {url}/chat/completions` goes out with the chosen frames as PNG data URLs
followed by the rubric (the template with the prompt filled in), at temperature 0. The score is
the number the `score_pattern` regex captures in the reply (its last match), mapped from
`score_range` to [0, 1]. Requests run concurrently on a thread pool.

A reply without a score, with a score outside `score_range`, an HTTP error or a timeout is a
failed request and is retried (`retries` more times, waiting `backoff * 2**i` seconds before
retry i + 1; client errors such as 401 or 404 are not retried). When a sample has no score left
after that, the reward raises `RewardError` naming the endpoint, the sample and the last failure:
a missing score is never silently a 0.

Example recipe entry (UnifiedReward-7b-v1.5 on sglang, started with `--api-key "$JUDGE_KEY"`):

    reward:
      components: {vlm_judge: 1.0}
      options:
        vlm_judge: {url: http://127.0.0.1:17140/v1, model: UnifiedReward-7b-v1.5, api_key_env: JUDGE_KEY}
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from megaflow.errors import ConfigError, RewardError
from megaflow.rewards.base import register_reward
from megaflow.rewards.frames import check_frames, frame_indices
from megaflow.rewards.wire import HTTPFailure, request_json, retrying, secret_from_env, truncate

__all__ = ["DEFAULT_SCORE_PATTERN", "DEFAULT_TEMPLATE", "VLMJudgeReward"]

#: megaflow's default rubric; `{prompt}` is replaced by the video's prompt (no other field is filled in).
DEFAULT_TEMPLATE = (
    "The images above are frames taken in order from one AI-generated video. The video was generated "
    'for this text prompt:\n"{prompt}"\n\n'
    "Judge the video on two things together: how faithfully it shows what the prompt asks for (subjects, "
    "attributes, counts, actions, setting, style), and its visual quality (sharpness, plausible anatomy "
    "and physics, consistency between frames, no artifacts or distortions). Give a score from 1 to 5: "
    "1 = unrelated to the prompt or badly broken, 2 = poor, 3 = acceptable with clear flaws, 4 = good "
    "with minor flaws, 5 = excellent and fully faithful. Explain briefly, then finish with one last "
    "line of exactly this form:\nFinal Score: X\nwhere X is a number from 1 to 5."
)
#: Parses `Final Score: 4`, `final score: 3.5`, `**Final Score:** 4` (the last match counts).
DEFAULT_SCORE_PATTERN = r"(?i)final\s+score\s*[:：]?\s*\**\s*([-+]?\d+(?:\.\d+)?)"


def _number(name: str, value: Any, *, low: float | None = None, integer: bool = False,
            strict_low: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"reward 'vlm_judge': option {name} must be a number, got {value!r}")
    if integer and float(value) != int(value):
        raise ConfigError(f"reward 'vlm_judge': option {name} must be an integer, got {value!r}")
    v = int(value) if integer else float(value)
    if not math.isfinite(v) or (low is not None and (v <= low if strict_low else v < low)):
        bound = f"> {low:g}" if strict_low else f">= {low:g}"
        raise ConfigError(f"reward 'vlm_judge': option {name} must be a finite number {bound}, got {value!r}")
    return v


@register_reward("vlm_judge")
class VLMJudgeReward:
    """A VLM judge behind an OpenAI-compatible chat-completions endpoint; scores in [0, 1].

    Options:
      url: the API base URL, e.g. `http://127.0.0.1:17140/v1` (requests go to `{url}/chat/completions`).
      model: the served model name (sglang/vLLM `--served-model-name`, e.g. `UnifiedReward-7b-v1.5`).
      api_key_env: the NAME of an environment variable holding the API key, sent as
        `Authorization: Bearer`; none by default. The key itself is never accepted as an option.
      frames: which frames are shown (`first|middle|last|uniform:K|all`), default `uniform:4`: a
        few frames let the judge see motion and consistency at a modest token cost.
      image_size: each frame is resized so its longer side is this many pixels (aspect kept), or to
        exactly `[width, height]`; null keeps the decoded size. Default 512.
      template: the rubric, with `{prompt}` where the prompt goes (default: `DEFAULT_TEMPLATE`).
      score_pattern: a regex with one group capturing the score (default `Final Score: <number>`).
      score_range: `[lo, hi]` of the judge's scale, mapped linearly to [0, 1]; default [1, 5].
        A parsed score outside it is a failed reply.
      concurrency: requests in flight at once (default 8).
      timeout: seconds per request (each socket operation), default 120.
      retries: extra attempts per sample after a failure (default 2).
      backoff: seconds before the first retry, doubling each time (default 1).
      temperature: sampling temperature (default 0).
      max_tokens: the reply's token limit (default 1024; a reply cut before its score fails).
    """

    def __init__(
        self,
        url: str | None = None,
        model: str | None = None,
        api_key_env: str | None = None,
        frames: str = "uniform:4",
        image_size: int | Sequence[int] | None = 512,
        template: str = DEFAULT_TEMPLATE,
        score_pattern: str = DEFAULT_SCORE_PATTERN,
        score_range: Sequence[float] = (1.0, 5.0),
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        api_key: Any = None,
    ) -> None:
        """Check the options and read the API key from the environment (see the class docstring)."""
        if api_key is not None:
            raise ConfigError(
                "reward 'vlm_judge': the API key is never accepted as an option (it would be saved with the run's "
                "config and logs); export it in an environment variable and give that variable's NAME as "
                "api_key_env"
            )
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(
                "reward 'vlm_judge' needs option url: the OpenAI-compatible API base URL, e.g. "
                f"http://127.0.0.1:17140/v1 (got {url!r})"
            )
        self.url = url.rstrip("/")
        self.endpoint = self.url + "/chat/completions"
        if not isinstance(model, str) or not model:
            raise ConfigError(
                "reward 'vlm_judge' needs option model: the name the endpoint serves the judge under "
                f"(e.g. UnifiedReward-7b-v1.5; see GET {self.url}/models), got {model!r}"
            )
        self.model = model
        self.api_key_env = api_key_env
        self._api_key = secret_from_env(api_key_env, owner="reward 'vlm_judge'", option="option api_key_env")
        self.frames = check_frames(frames)
        self.image_size = self._check_size(image_size)
        if not isinstance(template, str) or "{prompt}" not in template:
            raise ConfigError("reward 'vlm_judge': option template must be a string containing {prompt}, "
                              f"got {template!r:.200}")
        self.template = template
        if not isinstance(score_pattern, str):
            raise ConfigError(f"reward 'vlm_judge': option score_pattern must be a regex string, got {score_pattern!r}")
        try:
            self.score_pattern = re.compile(score_pattern)
        except re.error as e:
            raise ConfigError(f"reward 'vlm_judge': option score_pattern {score_pattern!r} is not a regex: {e}") from e
        if self.score_pattern.groups != 1:
            raise ConfigError(f"reward 'vlm_judge': option score_pattern must have exactly one group (the score), "
                              f"{score_pattern!r} has {self.score_pattern.groups}")
        if isinstance(score_range, (str, bytes)) or not hasattr(score_range, "__len__") or len(score_range) != 2:
            raise ConfigError(f"reward 'vlm_judge': option score_range must be [lo, hi], got {score_range!r}")
        lo, hi = (_number("score_range", v) for v in score_range)
        if not lo < hi:
            raise ConfigError(f"reward 'vlm_judge': option score_range needs lo < hi, got {score_range!r}")
        self.score_range = (lo, hi)
        self.concurrency = _number("concurrency", concurrency, low=1, integer=True)
        self.timeout = _number("timeout", timeout, low=0, strict_low=True)
        self.retries = _number("retries", retries, low=0, integer=True)
        self.backoff = _number("backoff", backoff, low=0)
        self.temperature = _number("temperature", temperature, low=0)
        self.max_tokens = _number("max_tokens", max_tokens, low=1, integer=True)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _check_size(size: Any) -> tuple[int, int] | int | None:
        if size is None:
            return None
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size >= 1:
            return int(size)
        if (
            isinstance(size, (list, tuple))
            and len(size) == 2
            and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in size)
        ):
            return (int(size[0]), int(size[1]))
        raise ConfigError("reward 'vlm_judge': option image_size must be a positive integer (the longer side), "
                          f"[width, height], or null (keep the size), got {size!r}")

    def __repr__(self) -> str:
        # Never shows the key.
        return f"VLMJudgeReward(url={self.url!r}, model={self.model!r}, frames={self.frames!r})"

    # ----------------------------------------------------------------------------- requests

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="megaflow-vlm-judge")
            return self._executor

    def close(self) -> None:
        """Stop the request threads (a later call starts them again)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _frame_size(self, width: int, height: int) -> tuple[int, int]:
        if self.image_size is None:
            return width, height
        if isinstance(self.image_size, tuple):
            return self.image_size
        scale = self.image_size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def _png_urls(self, frames: np.ndarray) -> list[str]:
        """Frames uint8 `[K, H, W, 3]` as PNG data URLs, resized to `image_size`."""
        urls = []
        for frame in frames:
            image = Image.fromarray(frame)
            size = self._frame_size(image.width, image.height)
            if size != image.size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=3)
            urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
        return urls

    def build_request(self, frames: np.ndarray, prompt: str) -> dict[str, Any]:
        """The chat-completions request for one video's frames uint8 `[K, H, W, 3]` and its prompt."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": url}} for url in self._png_urls(frames)
        ]
        content.append({"type": "text", "text": self.template.replace("{prompt}", prompt)})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def parse_reply(self, reply: Any) -> float:
        """The raw score in a chat-completions reply; HTTPFailure (retryable) if there is none."""
        try:
            message = reply["choices"][0]["message"]
            text = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise HTTPFailure(f"reply has no choices[0].message: {truncate(str(reply))}") from None
        if isinstance(text, list):  # content given as parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        if not isinstance(text, str):
            raise HTTPFailure(f"reply's message has no text content: {truncate(str(message))}")
        matches = self.score_pattern.findall(text)
        if not matches:
            raise HTTPFailure(f"no score matching {self.score_pattern.pattern!r} in the reply {truncate(text)}")
        try:
            value = float(matches[-1])
        except ValueError:
            raise HTTPFailure(f"score {matches[-1]!r} is not a number in the reply {truncate(text)}") from None
        lo, hi = self.score_range
        if not (math.isfinite(value) and lo <= value <= hi):
            raise HTTPFailure(f"score {value:g} is outside score_range [{lo:g}, {hi:g}] in the reply {truncate(text)}")
        return value

    def _score_one(self, frames: np.ndarray, prompt: str) -> float:
        """One sample's raw score, with retries; raises the last HTTPFailure when they run out."""
        encoded = json.dumps(self.build_request(frames, prompt)).encode("utf-8")
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

        def attempt() -> float:
            return self.parse_reply(request_json(self.endpoint, headers=headers, timeout=self.timeout, body=encoded))

        return retrying(attempt, retries=self.retries, backoff=self.backoff)

    def __call__(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Judge `videos` `[B, F, 3, H, W]`: `{"score": [B] in [0, 1], "raw": [B] on the judge's scale}`."""
        if len(prompts) != videos.shape[0]:
            raise RewardError(f"vlm_judge got {videos.shape[0]} videos but {len(prompts)} prompts")
        chosen = videos[:, frame_indices(self.frames, videos.shape[1])]
        frames = (
            (chosen.detach().to(device="cpu", dtype=torch.float32).clamp(0, 1) * 255.0)
            .round().to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous().numpy()
        )
        pool = self._pool()
        futures: list[Future[float]] = [
            pool.submit(self._score_one, frames[b], str(prompts[b])) for b in range(frames.shape[0])
        ]
        raw: list[float] = []
        failures: list[tuple[int, BaseException]] = []
        for b, future in enumerate(futures):
            try:
                raw.append(future.result())
            except Exception as e:  # noqa: BLE001 - reported below with the sample
                failures.append((b, e))
                raw.append(float("nan"))
        if failures:
            b, error = failures[0]
            tried = error.tried() if isinstance(error, HTTPFailure) else ""
            others = f" ({len(failures) - 1} other sample(s) failed too)" if len(failures) > 1 else ""
            last = str(error) if isinstance(error, HTTPFailure) else f"{type(error).__name__}: {error}"
            raise RewardError(
                f"vlm_judge at {self.endpoint}: sample {b} (prompt {truncate(str(prompts[b]), 80)}) got no score"
                f"{tried}; last failure: {last}{others}"
            )
        raw_t = torch.tensor(raw, dtype=torch.float32)
        lo, hi = self.score_range
        return {"score": (raw_t - lo) / (hi - lo), "raw": raw_t}
