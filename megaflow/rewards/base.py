"""The reward protocol, the reward registry and `RewardSet`, a weighted group of rewards.

A reward scores decoded videos: `reward(videos, prompts, metadata) -> scores` with `videos`
float `[B, F, 3, H, W]` in [0, 1] (any float dtype, on any device), one prompt and one metadata
dict per video, and `scores` `[B]`, higher is better, or a mapping with the score under
`"score"` and named sub-scores `[B]` beside it (reported as metrics, not trained on). Rewards
are registered by name on a factory (a class or function taking keyword options and returning
the callable) and built from the recipe by name. Rewards that need heavy imports (transformers
models, HTTP clients) are registered lazily: their module is imported when first built.

A reward may also offer `monitor(videos, prompts, metadata) -> {metric: [B]}`: metrics that are
never trained on (e.g. the shapes world's quality metrics), computed on the sample videos during
training and on every video in evaluation.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, TypeVar, runtime_checkable

import torch

from megaflow.errors import ConfigError, RewardError

__all__ = [
    "Reward",
    "RewardScores",
    "RewardSet",
    "available_rewards",
    "build_reward",
    "register_lazy",
    "register_reward",
    "validate_videos",
]


@runtime_checkable
class Reward(Protocol):
    """A callable scoring videos `[B, F, 3, H, W]` in [0, 1]: returns scores `[B]`, higher is better."""

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor | Mapping[str, torch.Tensor]:
        """Score each video of `videos` `[B, F, 3, H, W]` given its prompt and metadata: `[B]` (or
        `{"score": [B], sub-score name: [B], ...}`)."""
        ...


RewardFactory = Callable[..., Reward]
F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[str, RewardFactory] = {}
#: Reward name -> the module that registers it when imported (rewards with heavy imports).
_LAZY: dict[str, str] = {}


def register_reward(name: str) -> Callable[[F], F]:
    """Class/function decorator registering a reward factory under `name` (unique)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a reward name must be a non-empty string, got {name!r}")

    def decorator(factory: F) -> F:
        previous = _REGISTRY.get(name)
        if previous is not None and _qualified(previous) != _qualified(factory):
            raise ValueError(
                f"reward name {name!r} is already registered by {_qualified(previous)}; "
                f"choose another name for {_qualified(factory)}"
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_lazy(name: str, module: str) -> None:
    """Declare that importing `module` registers the reward `name` (imported on first build)."""
    _LAZY[name] = module


def available_rewards() -> list[str]:
    """The registered reward names (lazy ones included), sorted."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def reward_factory(name: str) -> RewardFactory:
    """The factory registered as `name` (importing its module if it is lazy); ConfigError if unknown."""
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    factory = _REGISTRY.get(name)
    if factory is None:
        valid = available_rewards()
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown reward {name!r}.{hint} Available rewards: {', '.join(valid) or '(none)'}"
        )
    return factory


def _accepted_options(factory: RewardFactory) -> tuple[list[str], bool]:
    """The keyword options `factory` accepts, and whether it also takes arbitrary `**kwargs`."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return [], True
    names = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return names, var_kw


def check_reward_options(name: str, options: dict[str, Any]) -> RewardFactory:
    """The factory of `name` after checking that it accepts `options`; ConfigError otherwise."""
    factory = reward_factory(name)
    accepted, var_kw = _accepted_options(factory)
    described = ", ".join(accepted) if accepted else "(none)"
    if not var_kw:
        unexpected = sorted(set(options) - set(accepted))
        if unexpected:
            raise ConfigError(
                f"reward {name!r} got unexpected option(s) {', '.join(unexpected)}; "
                f"accepted options: {described}"
            )
        try:
            inspect.signature(factory).bind(**options)
        except TypeError as e:
            raise ConfigError(f"reward {name!r}: {e}; accepted options: {described}") from e
    return factory


def build_reward(name: str, **options: Any) -> Reward:
    """Build the registered reward `name` with its keyword `options`; ConfigError if either is bad."""
    factory = check_reward_options(name, options)
    accepted, _ = _accepted_options(factory)
    described = ", ".join(accepted) if accepted else "(none)"
    try:
        return factory(**options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"reward {name!r}: invalid options {options!r}: {e}; accepted options: {described}"
        ) from e


def validate_videos(videos: Any, prompts: Any = None, metadata: Any = None) -> None:
    """Check `videos` is float `[B, F, 3, H, W]`, finite, in [0, 1], with B prompts/metadata."""
    if not isinstance(videos, torch.Tensor):
        raise RewardError(f"videos must be a torch.Tensor, got {type(videos).__name__}")
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise RewardError(
            f"videos must have shape [B, F, 3, H, W], got {list(videos.shape)}"
        )
    if not videos.is_floating_point():
        raise RewardError(f"videos must be a float tensor in [0, 1], got dtype {videos.dtype}")
    if videos.numel() == 0:
        raise RewardError(f"videos is empty: shape {list(videos.shape)}")
    if not bool(torch.isfinite(videos).all()):
        raise RewardError("videos contain NaN or inf values")
    lo, hi = float(videos.min()), float(videos.max())
    if lo < 0.0 or hi > 1.0:
        raise RewardError(
            f"videos must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
            "(clamp the decoded output, or map [-1, 1] with (x + 1) / 2)"
        )
    batch = videos.shape[0]
    for label, seq in (("prompts", prompts), ("metadata", metadata)):
        if seq is not None and len(seq) != batch:
            raise RewardError(f"got {batch} videos but {len(seq)} {label}")


@dataclass
class RewardScores:
    """One scoring's results: each component's score `[B]` (what is trained on) and the named
    sub-scores `[B]` the components reported beside it (`"<component>/<sub>"`, metrics only)."""

    components: dict[str, torch.Tensor]
    details: dict[str, torch.Tensor] = field(default_factory=dict)


def score_reward(name: str, reward: Reward, videos: torch.Tensor, prompts: list[str],
                 metadata: list[dict[str, Any]]) -> RewardScores:
    """One reward's checked float32 CPU score `[B]` (`components[name]`) and sub-scores
    (`details["name/sub"]`); RewardError naming the reward if it raises or returns bad scores."""
    batch = videos.shape[0]
    try:
        out = reward(videos, prompts, metadata)
    except RewardError as e:
        raise RewardError(f"reward {name!r}: {e}") from e
    except Exception as e:
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
    result = RewardScores({})
    if isinstance(out, Mapping):
        if "score" not in out:
            raise RewardError(f"reward {name!r} returned a mapping without a 'score' entry (keys: {sorted(out)})")
        for sub, value in out.items():
            if sub != "score":
                result.details[f"{name}/{sub}"] = RewardSet._check_scores(f"{name}/{sub}", value, batch)
        out = out["score"]
    result.components[name] = RewardSet._check_scores(name, out, batch)
    return result


class RewardSet:
    """Named rewards with weights: raw per-component scores `[B]` and their weighted sum.

    Names and options are checked when the set is made, and the rewards built then too unless
    `lazy` (then on first use or `build()`, so only the ranks that score load reward models). `device`: passed
    to every reward whose factory takes a `device` option (unless its options set one);
    `offload`: move such rewards to the CPU between scorings (they must have `to(device)`).
    """

    def __init__(
        self,
        components: dict[str, float],
        options: dict[str, dict[str, Any]] | None = None,
        *,
        device: str | torch.device | None = None,
        offload: bool = False,
        lazy: bool = False,
    ) -> None:
        """Check each reward of `components` (name -> weight) with `options[name]` (if given)."""
        if not components:
            raise ConfigError(
                "no rewards configured: give at least one reward name with a weight "
                f"(available rewards: {', '.join(available_rewards())})"
            )
        options = dict(options or {})
        stray = sorted(set(options) - set(components))
        if stray:
            raise ConfigError(
                f"options given for reward(s) {', '.join(stray)} that are not among the "
                f"configured rewards {', '.join(components)}"
            )
        self.weights: dict[str, float] = {}
        self.options: dict[str, dict[str, Any]] = {}
        self.device = None if device is None else str(device)
        self.offload = bool(offload)
        self._rewards: dict[str, Reward] | None = None
        for name, weight in components.items():
            try:
                w = float(weight)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"reward {name!r}: weight must be a number, got {weight!r}") from e
            if not math.isfinite(w):
                raise ConfigError(f"reward {name!r}: weight must be finite, got {weight!r}")
            opts = options.get(name) or {}
            if not isinstance(opts, dict):
                raise ConfigError(
                    f"reward {name!r}: options must be a mapping, got {type(opts).__name__}"
                )
            opts = dict(opts)
            factory = check_reward_options(name, opts)
            if self.device is not None and "device" not in opts and "device" in _accepted_options(factory)[0]:
                opts["device"] = self.device
            self.options[name] = opts
            self.weights[name] = w
        if not lazy:
            self.build()

    def build(self) -> dict[str, Reward]:
        """Build every reward (once): name -> reward."""
        if self._rewards is None:
            self._rewards = {name: build_reward(name, **opts) for name, opts in self.options.items()}
        return self._rewards

    @property
    def rewards(self) -> dict[str, Reward]:
        """The built rewards, name -> reward (built now if they are not yet)."""
        return self.build()

    def _place(self, device: str | None) -> None:
        for reward in self.build().values():
            if device is not None and callable(getattr(reward, "to", None)):
                reward.to(device)

    def score(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardScores:
        """Score `videos` `[B, F, 3, H, W]`: each component's raw float32 CPU scores `[B]`, and
        the sub-scores the components report."""
        validate_videos(videos, prompts, metadata)
        result = RewardScores({})
        if self.offload:
            self._place(self.device)
        try:
            for name, reward in self.build().items():
                one = score_reward(name, reward, videos, prompts, metadata)
                result.components.update(one.components)
                result.details.update(one.details)
        finally:
            if self.offload:
                self._place("cpu")
        return result

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> dict[str, torch.Tensor]:
        """Score `videos` `[B, F, 3, H, W]`: each component's raw float32 CPU scores `[B]`."""
        return self.score(videos, prompts, metadata).components

    def monitor(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> dict[str, torch.Tensor]:
        """The untrained metrics `[B]` of the rewards that offer `monitor` (empty if none does)."""
        validate_videos(videos, prompts, metadata)
        out: dict[str, torch.Tensor] = {}
        for name, reward in self.build().items():
            if callable(getattr(reward, "monitor", None)):
                for metric, value in reward.monitor(videos, prompts, metadata).items():
                    out[metric] = self._check_scores(f"{name} {metric}", value, videos.shape[0])
        return out

    @staticmethod
    def _check_scores(name: str, out: Any, batch: int) -> torch.Tensor:
        """Convert a component's output to float32 CPU `[B]`, or raise RewardError."""
        if not isinstance(out, torch.Tensor):
            try:
                out = torch.as_tensor(out)
            except (TypeError, ValueError, RuntimeError) as e:
                raise RewardError(
                    f"reward {name!r} returned {type(out).__name__}, not a tensor of {batch} scores"
                ) from e
        if tuple(out.shape) != (batch,):
            raise RewardError(
                f"reward {name!r} returned shape {list(out.shape)}, expected [{batch}] "
                "(one score per video)"
            )
        if out.is_complex() or out.dtype == torch.bool:
            raise RewardError(f"reward {name!r} returned dtype {out.dtype}, expected real scores")
        out = out.detach().to(device="cpu", dtype=torch.float32)
        bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(
                f"reward {name!r} returned non-finite scores (NaN/inf) for sample(s) {bad}: "
                f"{out.tolist()}"
            )
        return out

    def weighted_sum(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of `weights[name] * scores[name]` over the components: float32 `[B]` (or `[B, V]`)."""
        missing = sorted(set(self.weights) - set(scores))
        extra = sorted(set(scores) - set(self.weights))
        if missing or extra:
            raise RewardError(
                f"weighted_sum needs exactly the components {sorted(self.weights)}; "
                f"missing {missing}, unexpected {extra}"
            )
        total: torch.Tensor | None = None
        for name, weight in self.weights.items():
            s = scores[name].to(torch.float32)
            if s.dim() not in (1, 2) or (total is not None and s.shape != total.shape):
                raise RewardError(
                    f"scores of reward {name!r} have shape {list(s.shape)}; "
                    "all components need the same shape [B] (or [B, V], V scores per sample)"
                )
            term = weight * s
            total = term if total is None else total + term
        assert total is not None
        return total

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={w:g}" for n, w in self.weights.items())
        return f"RewardSet({parts})"
