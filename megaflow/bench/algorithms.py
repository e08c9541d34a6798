"""`megaflow bench algorithms`: the four systems' algorithms side by side on the demo world.

Every algorithm trains the shipped demo model (its `demo_<algorithm>` recipe) for the same number of
iterations from the same seeds, on the shapes verifier, which cannot be hacked by the usual
shortcuts; then its checkpoint is scored on the held-out prompts with `megaflow eval`'s code.
Times are reported as ratios to `dance_grpo` measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from megaflow.bench.kernels import _append_markdown, _device_name, _versions

#: Bench name → (recipe, extra overrides). `+guard` variants add GRPO-Guard to the algorithm's recipe.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dance_grpo": ("demo_dance_grpo", ()),
    "flow_grpo": ("demo_flow_grpo", ()),
    "flow_grpo_fast": ("demo_flow_grpo_fast", ()),
    "mix_grpo": ("demo_mix_grpo", ()),
    "mix_grpo_flash": ("demo_mix_grpo_flash", ()),
    "mix_grpo_flash_star": ("demo_mix_grpo_flash_star", ()),
    "g2rpo": ("demo_g2rpo", ()),
}
GUARD = ("algorithm.loss=grpo_guard",)
BASELINE = "dance_grpo"


@dataclass
class RunResult:
    """One (variant, seed) run: its per-iteration metrics and its held-out score."""

    variant: str
    seed: int
    history: list[dict[str, float]] = field(repr=False)
    eval_overall: float
    eval_components: dict[str, float]
    train_s: float

    def at_time(self, seconds: float) -> float:
        """Training reward of the last iteration finished within `seconds` of training (NaN: none)."""
        elapsed, reward = 0.0, math.nan
        for m in self.history:
            elapsed += m["time/iteration_s"]
            if elapsed > seconds:
                break
            reward = m["reward/mean"]
        return reward


def variant_overrides(name: str) -> tuple[str, list[str]]:
    """The recipe and overrides of a bench variant (`<algorithm>` or `<algorithm>+guard`)."""
    base, _, suffix = name.partition("+")
    if base not in VARIANTS or suffix not in ("", "guard"):
        raise SystemExit(f"megaflow bench algorithms: unknown variant '{name}'; choose from "
                         f"{', '.join(VARIANTS)} (optionally with +guard)")
    recipe, extra = VARIANTS[base]
    return recipe, [*extra, *(GUARD if suffix else ())]


def run_variant(name: str, seed: int, iterations: int, output: Path, overrides: list[str], eval_samples: int,
                eval_seed: int) -> RunResult:
    """Train one variant from `seed` and score its final checkpoint on the held-out prompts."""
    from megaflow.config import load_config
    from megaflow.demo.evaluate import eval_prompts, load_model, sample_videos, score_videos
    from megaflow.trainer.loop import Trainer

    recipe, extra = variant_overrides(name)
    out = output / f"{name}_seed{seed}"
    cfg = load_config(recipe, [*extra, f"seed={seed}", f"train.iterations={iterations}", f"output_dir={out}",
                               "train.sample_every=0", "train.save_every=0", "train.keep_checkpoints=1", *overrides])
    t0 = time.perf_counter()
    history = Trainer(cfg, show_progress=False).train()
    train_s = time.perf_counter() - t0
    prompts = eval_prompts(cfg)
    adapter = load_model(cfg, out / "checkpoints" / f"iteration_{iterations:06d}", torch.device("cpu"))
    report = score_videos(cfg, sample_videos(adapter, cfg, prompts.prompts, eval_samples, eval_seed, show_progress=False),
                          prompts, eval_samples, name)
    return RunResult(name, seed, history, report.overall, report.components, train_s)


def base_score(overrides: list[str], eval_samples: int, eval_seed: int) -> dict[str, float]:
    """The untrained demo model's held-out score (overall and per component)."""
    from megaflow.config import load_config
    from megaflow.demo.evaluate import eval_prompts, load_model, sample_videos, score_videos

    cfg = load_config("demo", overrides)
    prompts = eval_prompts(cfg)
    adapter = load_model(cfg, None, torch.device("cpu"))
    report = score_videos(cfg, sample_videos(adapter, cfg, prompts.prompts, eval_samples, eval_seed, show_progress=False),
                          prompts, eval_samples, "base")
    return {"overall": report.overall, **report.components}


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[RunResult], base: dict[str, float]) -> list[dict[str, Any]]:
    """One row per variant: NFEs, time per iteration (and its ratio to dance_grpo), the training
    reward's first and last iterations, the held-out score and gain (mean and sd over seeds), and
    the training reward reached at the wall-clock every variant had (the fastest's total time)."""
    names = list(dict.fromkeys(r.variant for r in runs))
    per = {n: [r for r in runs if r.variant == n] for n in names}
    # iteration 1 pays one-time costs (first forward, allocator); time the rest
    sec = {n: _mean([m["time/iteration_s"] for r in rs for m in r.history[1:]] or
                    [m["time/iteration_s"] for r in rs for m in r.history]) for n, rs in per.items()}
    budget = min(_mean([sum(m["time/iteration_s"] for m in r.history) for r in rs]) for rs in per.values())
    rows = []
    for n, rs in per.items():
        evals = [r.eval_overall for r in rs]
        rows.append({
            "variant": n,
            "seeds": len(rs),
            "nfe_rollout": _mean([m["nfe/rollout_per_sample"] for r in rs for m in r.history]),
            "nfe_train": _mean([m["nfe/train_per_sample"] for r in rs for m in r.history]),
            "s_per_iteration": sec[n],
            "time_ratio": sec[n] / sec[BASELINE] if BASELINE in sec else math.nan,
            "train_reward_first": _mean([r.history[0]["reward/mean"] for r in rs]),
            "train_reward_last": _mean([_mean([m["reward/mean"] for m in r.history[-3:]]) for r in rs]),
            "reward_at_equal_time": _mean([r.at_time(budget) for r in rs]),
            "equal_time_s": budget,
            "eval": _mean(evals),
            "eval_sd": _sd(evals),
            "eval_gain": _mean(evals) - base["overall"],
            "eval_components": {k: _mean([r.eval_components[k] for r in rs]) for k in rs[0].eval_components},
            "ratio_max_dev": max(m.get("policy/ratio_max_dev", 0.0) for r in rs for m in r.history),
        })
        comps = rows[-1]["eval_components"]
        # the largest fall of a quality metric below the base model's: a run that hacks shows here
        rows[-1]["quality_drop"] = max([base[k] - comps[k] for k in comps if k.startswith("quality/") and k in base],
                                       default=math.nan)
    return rows


def format_table(rows: list[dict[str, Any]], base: dict[str, float]) -> list[str]:
    """Markdown table of `summarize`'s rows."""
    keys = [k for k in rows[0]["eval_components"] if "/" in k] if rows else []
    # the reward's attributes, then the held-out quality metrics (`quality/*`, never trained on)
    attrs = sorted(keys, key=lambda k: (k.startswith("quality/"), k))
    head = ("| algorithm | seeds | NFE rollout / train per sample | s / iter vs dance_grpo | train reward first → last"
            f" | reward at {rows[0]['equal_time_s']:.0f} s | held-out (base {base['overall']:.3f}) | gain | "
            + " | ".join(a.split("/", 1)[1] for a in attrs) + " | largest quality fall |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(attrs) + 1)]
    for r in rows:
        comps = " | ".join(f"{r['eval_components'][a]:.3f}" for a in attrs)
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['nfe_rollout']:.2f} / {r['nfe_train']:.0f} | "
                     f"{r['time_ratio']:.2f}x | {r['train_reward_first']:.3f} → {r['train_reward_last']:.3f} | "
                     f"{r['reward_at_equal_time']:.3f} | {r['eval']:.3f} ± {r['eval_sd']:.3f} | "
                     f"{r['eval_gain']:+.3f} | {comps} | {r['quality_drop']:+.3f} |")
    base_attrs = " | ".join(f"{base[a]:.3f}" for a in attrs)
    lines.append(f"| base model | | | | | | {base['overall']:.3f} | | {base_attrs} | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the algorithm bench; print the table, write JSON under --output and append to --markdown."""
    parser = argparse.ArgumentParser(prog="megaflow bench algorithms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default=",".join(VARIANTS),
                        help="variants, comma-separated; `<algorithm>+guard` adds GRPO-Guard (default: every algorithm)")
    parser.add_argument("--guard", action="store_true", help="also run every algorithm with +guard")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--iterations", type=int, default=100, help="iterations per run (default: the demo's 100)")
    parser.add_argument("--eval-samples", type=int, default=4, help="held-out samples per prompt (default 4)")
    parser.add_argument("--eval-seed", type=int, default=1234, help="seed of the held-out samples' noise")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run (repeatable)")
    parser.add_argument("--output", default="runs/bench_algorithms", help="folder for the runs and results.json")
    parser.add_argument("--markdown", help="append the table to this file (e.g. BENCHMARKS.md)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    if args.guard:
        names += [f"{n}+guard" for n in names if "+" not in n]
    for n in names:
        variant_overrides(n)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    base = base_score(args.overrides, args.eval_samples, args.eval_seed)
    runs = []
    for n in names:
        for seed in seeds:
            t0 = time.perf_counter()
            runs.append(run_variant(n, seed, args.iterations, output, args.overrides, args.eval_samples, args.eval_seed))
            print(f"{n} seed {seed}: held-out {runs[-1].eval_overall:.3f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    rows = summarize(runs, base)
    table = format_table(rows, base)
    print("\n".join(table))
    command = "megaflow bench algorithms " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command.strip(),
            "device": _device_name(torch.device("cpu")), "versions": _versions(), "iterations": args.iterations,
            "seeds": seeds, "eval_samples": args.eval_samples}
    (output / "results.json").write_text(json.dumps({"meta": meta, "base": base, "rows": rows,
                                                     "runs": [asdict(r) for r in runs]}, indent=1))
    if args.markdown:
        section = [f"## Algorithms on the demo world, {meta['date']}", "",
                   f"- command: `{meta['command']}`", f"- device: {meta['device']}",
                   "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
                   f"- each row: {args.iterations} iterations from each of seeds {seeds} on the demo model (recipes "
                   "`demo_<algorithm>`), then its final weights on the 8 held-out prompts × "
                   f"{args.eval_samples} samples; mean ± sd over seeds",
                   "- s / iter: mean time per iteration after the first, as a ratio to dance_grpo in this run; "
                   "reward at equal time: the training reward of the last iteration each run finished within the "
                   "fastest variant's total training time",
                   "- first update of every iteration exactly on-policy: max |ratio − 1| over all runs = "
                   f"{max(r['ratio_max_dev'] for r in rows):.1e}", ""]
        _append_markdown(Path(args.markdown), "\n".join(section + table) + "\n")
    return 0
