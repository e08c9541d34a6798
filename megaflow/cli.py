"""Command line: `megaflow train|bench ...` (also `python -m megaflow`)."""
from __future__ import annotations

import argparse
import logging
import sys

from megaflow.errors import MegaflowError


def _train(args: argparse.Namespace) -> int:
    from megaflow.config import load_config
    from megaflow.trainer.loop import Trainer

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, show_progress=not args.no_progress)
    history = trainer.train()
    last = history[-1]
    print(f"done: {len(history)} iterations, final reward/mean {last['reward/mean']:.4f}; "
          f"logs in {trainer.output_dir / 'logs'} (tensorboard --logdir {trainer.output_dir / 'logs'})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.target == "kernels":
        from megaflow.bench.kernels import main as bench_kernels

        return bench_kernels(args.rest)
    raise MegaflowError(f"unknown benchmark '{args.target}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaflow", description="Online GRPO-family RL for flow-matching video models")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run GRPO training from a recipe")
    train.add_argument("--config", required=True, help="built-in recipe name (e.g. tiny) or a YAML path")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set train.iterations=3")
    train.add_argument("--output-dir", help="where logs, checkpoints and the resolved config go")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(func=_train)

    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("target", choices=["kernels"], help="what to benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see `megaflow bench kernels -h`)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MegaflowError as e:
        print(f"megaflow: error: {e}", file=sys.stderr)
        return 2
