"""Named algorithms as compositions: an SDE kind, defaults, a step-plan builder, the rollout
program (chain or G²RPO's tree) and, where the algorithm has one, state that moves across
iterations (MixGRPO's window). The loop knows none of them by name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from megaflow.algorithms.windows import (
    WINDOW_STRATEGIES,
    advance_window,
    fast_window_start,
    initial_window_state,
    last_window_start,
    window_start,
)
from megaflow.errors import ConfigError
from megaflow.sampling.plans import StepPlan, leading_steps, random_steps, uniform_plan
from megaflow.sampling.schedule import flow_sigmas
from megaflow.seeds import generator

if TYPE_CHECKING:
    from megaflow.config import AlgorithmConfig, Config

#: Default noise level of each SDE kind when `algorithm.sde_kind` replaces the algorithm's own.
KIND_NOISE = {"flow_grpo": 0.7, "dance": 0.3, "cps": 0.8}


@dataclass(frozen=True)
class PlanContext:
    """What a plan is built from: the run's grid and options, the iteration's samples
    (`(slot, sample)` keys), the seed and the iteration."""

    num_steps: int
    shift: float
    fraction: float
    options: AlgorithmConfig
    sample_keys: Sequence[tuple[int, int]]
    group_size: int
    seed: int
    iteration: int

    @property
    def sigmas(self) -> torch.Tensor:
        return flow_sigmas(self.num_steps, self.shift)


@dataclass(frozen=True)
class Algorithm:
    """A GRPO variant. `options`: the `algorithm.*` keys it reads (setting another algorithm's
    option is an error). `advance(options, num_steps, state)` moves its state after an iteration."""

    name: str
    sde_kind: str
    noise_level: float
    timestep_fraction: float
    build_plan: Callable[[PlanContext, dict[str, Any]], StepPlan]
    options: tuple[str, ...] = ()
    program: str = "chain"
    initial_state: Callable[[], dict[str, Any]] = dict
    advance: Callable[[AlgorithmConfig, int, dict[str, Any]], dict[str, Any]] | None = None
    check: Callable[[Config], None] | None = None
    uses_fraction: bool = True

    def groups_per_prompt(self, options: AlgorithmConfig, num_steps: int) -> int:
        """Groups (and so G-sample sets) per prompt: G²RPO has one per branch step."""
        return len(branch_steps(options, num_steps)) if self.program == "tree" else 1

    def score_columns(self, options: AlgorithmConfig) -> int:
        """Videos scored per trained sample: G²RPO finishes each branch once per granularity."""
        return len(granularities(options)) if self.program == "tree" else 1

    def program_options(self, options: AlgorithmConfig) -> dict[str, Any]:
        """Keyword options of the rollout program (`megaflow.trainer.rollout.run_program`)."""
        return {"granularities": granularities(options)} if self.program == "tree" else {}

    def sample_keys(self, prompts: int, group_size: int, options: AlgorithmConfig, num_steps: int) -> list[tuple[int, int]]:
        """The iteration's `(slot, sample)` keys, prompt-major; sample `j` is in group `j // G` of its prompt."""
        per_prompt = group_size * self.groups_per_prompt(options, num_steps)
        return [(slot, j) for slot in range(prompts) for j in range(per_prompt)]


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise KeyError(name)
    return ALGORITHMS[name]


def group_ids(keys: Sequence[tuple[int, int]], group_size: int) -> torch.Tensor:
    """`[N]` long: the group of each `(slot, sample)` key, `(slot, sample // G)` numbered in order."""
    pairs = sorted({(slot, j // group_size) for slot, j in keys})
    index = {p: i for i, p in enumerate(pairs)}
    return torch.tensor([index[(slot, j // group_size)] for slot, j in keys], dtype=torch.long)


def groups_per_prompt(cfg: Config) -> int:
    """`Algorithm.groups_per_prompt` of the config's algorithm (1 for an unknown name: validation reports it)."""
    alg = ALGORITHMS.get(cfg.algorithm.name)
    return alg.groups_per_prompt(cfg.algorithm, cfg.sampling.num_steps) if alg else 1


def _opt(options: AlgorithmConfig, name: str, default: Any) -> Any:
    value = getattr(options, name)
    return default if value is None else value


# ---- chain algorithms -------------------------------------------------------------------------
def _flow_grpo_plan(ctx: PlanContext, state: dict[str, Any]) -> StepPlan:
    n = ctx.num_steps
    steps = leading_steps(n, ctx.fraction)
    return uniform_plan(ctx.sigmas, range(n), [steps] * len(ctx.sample_keys))


def _dance_grpo_plan(ctx: PlanContext, state: dict[str, Any]) -> StepPlan:
    trained = [random_steps(ctx.num_steps, ctx.fraction, generator(ctx.seed, "trained-steps", ctx.iteration, slot, sample))
               for slot, sample in ctx.sample_keys]
    return uniform_plan(ctx.sigmas, range(ctx.num_steps), trained)


def fast_window(options: AlgorithmConfig, num_steps: int) -> tuple[int, tuple[int, int]]:
    """flow_grpo_fast's `(window size, [lo, hi))` with the published defaults (2, [0, N/2))."""
    size = _opt(options, "sde_window_size", 2)
    lo, hi = _opt(options, "sde_window_range", [0, num_steps // 2])
    return size, (lo, hi)


def _fast_plan(ctx: PlanContext, state: dict[str, Any]) -> StepPlan:
    size, span = fast_window(ctx.options, ctx.num_steps)
    start = fast_window_start(size, span, seed=ctx.seed, iteration=ctx.iteration)
    window = tuple(range(start, start + size))
    return uniform_plan(ctx.sigmas, window, [window] * len(ctx.sample_keys))


def _check_fast(cfg: Config) -> None:
    n = cfg.sampling.num_steps
    size, (lo, hi) = fast_window(cfg.algorithm, n)
    if cfg.algorithm.sde_window_range is not None and len(cfg.algorithm.sde_window_range) != 2:
        raise ConfigError(f"algorithm.sde_window_range must be [lo, hi], got {cfg.algorithm.sde_window_range}")
    if size < 1 or not 0 <= lo < hi <= n or hi - lo < size:
        raise ConfigError(f"flow_grpo_fast needs 0 <= lo < hi <= sampling.num_steps={n} and a window of "
                          f"algorithm.sde_window_size={size} steps inside [lo, hi); got range [{lo}, {hi})")


@dataclass(frozen=True)
class MixWindow:
    """MixGRPO's resolved window options."""

    size: int
    stride: int
    interval: int
    strategy: str
    last_start: int


def mix_window(options: AlgorithmConfig, num_steps: int) -> MixWindow:
    """The published defaults: w 4, stride 1, τ 25, progressive."""
    size = _opt(options, "window_size", 4)
    return MixWindow(size=size, stride=_opt(options, "window_stride", 1),
                     interval=_opt(options, "window_shift_interval", 25),
                     strategy=_opt(options, "window_strategy", "progressive"),
                     last_start=last_window_start(num_steps, size))


def mix_window_steps(ctx: PlanContext, state: dict[str, Any]) -> tuple[int, ...]:
    """The SDE (and trained) steps of this iteration's MixGRPO window."""
    w = mix_window(ctx.options, ctx.num_steps)
    start = window_start(w.strategy, state, seed=ctx.seed, iteration=ctx.iteration, last_start=w.last_start)
    return tuple(range(start, start + w.size))


def _mix_plan(ctx: PlanContext, state: dict[str, Any]) -> StepPlan:
    window = mix_window_steps(ctx, state)
    return uniform_plan(ctx.sigmas, window, [window] * len(ctx.sample_keys))


def _mix_flash_plan(ctx: PlanContext, state: dict[str, Any]) -> StepPlan:
    from megaflow.sampling.dpm import flash_grid

    window = mix_window_steps(ctx, state)
    last = window[-1]
    sigmas = flash_grid(ctx.num_steps, ctx.shift, last, _opt(ctx.options, "flash_compression", 0.4))
    solvers = tuple("ode" if i < window[0] else "sde" if i <= last else "dpm2" for i in range(sigmas.numel() - 1))
    return StepPlan(sigmas, solvers, tuple(window for _ in ctx.sample_keys))


def _advance_mix(options: AlgorithmConfig, num_steps: int, state: dict[str, Any]) -> dict[str, Any]:
    w = mix_window(options, num_steps)
    return advance_window(w.strategy, state, interval=w.interval, stride=w.stride, last_start=w.last_start)


def _check_mix(cfg: Config) -> None:
    a = cfg.algorithm
    try:
        w = mix_window(a, cfg.sampling.num_steps)
    except ValueError as e:
        raise ConfigError(f"algorithm.window_size: {e}") from e
    if w.strategy not in WINDOW_STRATEGIES:
        raise ConfigError(f"algorithm.window_strategy must be one of {', '.join(WINDOW_STRATEGIES)}, got '{w.strategy}'")
    if w.stride < 0 or w.interval < 1:
        raise ConfigError(f"algorithm.window_stride must be >= 0 and algorithm.window_shift_interval >= 1, got "
                          f"{w.stride} and {w.interval}")
    r = _opt(a, "flash_compression", 0.4)
    if not 0 < r <= 1:
        raise ConfigError(f"algorithm.flash_compression must be in (0, 1], got {r}")


# ---- G²RPO --------------------------------------------------------------------------------------
def branch_steps(options: AlgorithmConfig, num_steps: int) -> tuple[int, ...]:
    """G²RPO's branch steps M (default 0..min(7, N−2)), sorted."""
    return tuple(sorted(_opt(options, "branch_steps", list(range(min(8, num_steps - 1))))))


def granularities(options: AlgorithmConfig) -> tuple[int, ...]:
    """G²RPO's ODE strides Λ (default {1, 2})."""
    return tuple(_opt(options, "granularities", [1, 2]))


def _g2rpo_plan(ctx: PlanContext, state: dict[str, Any]) -> StepPlan:
    ks = branch_steps(ctx.options, ctx.num_steps)
    trained = [(ks[j // ctx.group_size],) for _, j in ctx.sample_keys]
    return uniform_plan(ctx.sigmas, ks, trained)


def _check_g2rpo(cfg: Config) -> None:
    n = cfg.sampling.num_steps
    ks, lams = branch_steps(cfg.algorithm, n), granularities(cfg.algorithm)
    if not ks or len(set(ks)) != len(ks) or not all(0 <= k <= n - 2 for k in ks):
        raise ConfigError(f"algorithm.branch_steps must be distinct steps in 0..{n - 2} (sampling.num_steps={n}), got {list(ks)}")
    if not lams or len(set(lams)) != len(lams) or min(lams) < 1:
        raise ConfigError(f"algorithm.granularities must be distinct strides >= 1, got {list(lams)}")


register(Algorithm("flow_grpo", "flow_grpo", 0.7, 0.99, _flow_grpo_plan))
register(Algorithm("dance_grpo", "dance", 0.3, 0.6, _dance_grpo_plan))
register(Algorithm("flow_grpo_fast", "flow_grpo", 0.7, 1.0, _fast_plan, options=("sde_window_size", "sde_window_range"),
                   check=_check_fast, uses_fraction=False))
_MIX_OPTIONS = ("window_size", "window_stride", "window_shift_interval", "window_strategy")
register(Algorithm("mix_grpo", "flow_grpo", 0.7, 1.0, _mix_plan, options=_MIX_OPTIONS,
                   initial_state=initial_window_state, advance=_advance_mix, check=_check_mix, uses_fraction=False))
register(Algorithm("mix_grpo_flash", "flow_grpo", 0.7, 1.0, _mix_flash_plan, options=_MIX_OPTIONS + ("flash_compression",),
                   initial_state=initial_window_state, advance=_advance_mix, check=_check_mix, uses_fraction=False))
register(Algorithm("g2rpo", "flow_grpo", 0.7, 1.0, _g2rpo_plan, options=("branch_steps", "granularities"),
                   program="tree", check=_check_g2rpo, uses_fraction=False))

#: Options owned by some algorithm (setting one for an algorithm that ignores it is an error).
ALGORITHM_OPTIONS = tuple(sorted({o for alg in ALGORITHMS.values() for o in alg.options}))


def check_algorithm(cfg: Config) -> None:
    """Validate the algorithm's own options; ConfigError naming the key and the fix."""
    alg = ALGORITHMS[cfg.algorithm.name]
    for name in ALGORITHM_OPTIONS:
        if getattr(cfg.algorithm, name) is not None and name not in alg.options:
            owners = [a.name for a in ALGORITHMS.values() if name in a.options]
            raise ConfigError(f"algorithm.{name} is an option of {', '.join(owners)}, not of algorithm.name="
                              f"'{alg.name}'; remove it or choose one of those algorithms")
    if not alg.uses_fraction and cfg.algorithm.timestep_fraction is not None:
        raise ConfigError(f"algorithm.timestep_fraction does not apply to {alg.name} (its plan decides the trained "
                          "steps); remove it")
    if alg.check is not None:
        alg.check(cfg)


def resolved_sde_kind(cfg: Config) -> str:
    """The step kind the run samples with: `algorithm.sde_kind` or the algorithm's, with the `linear`
    noise schedule as its own kind (`flow_grpo_linear`)."""
    kind = cfg.algorithm.sde_kind or ALGORITHMS[cfg.algorithm.name].sde_kind
    return "flow_grpo_linear" if cfg.algorithm.noise_schedule == "linear" else kind


def resolved_noise_level(cfg: Config) -> float:
    """`algorithm.noise_level`, else the default of the run's SDE kind (0: the linear schedule has no knob)."""
    if cfg.algorithm.noise_schedule == "linear":
        return 0.0
    if cfg.algorithm.noise_level is not None:
        return cfg.algorithm.noise_level
    alg = ALGORITHMS[cfg.algorithm.name]
    return KIND_NOISE[cfg.algorithm.sde_kind] if cfg.algorithm.sde_kind else alg.noise_level


__all__ = ["ALGORITHMS", "Algorithm", "PlanContext", "branch_steps", "check_algorithm", "get_algorithm",
           "granularities", "group_ids", "groups_per_prompt", "resolved_noise_level", "resolved_sde_kind"]
