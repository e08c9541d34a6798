"""The demo's subcommands: `megaflow pretrain-demo` and `megaflow eval` (registered by megaflow.cli)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megaflow.errors import ConfigError


def _pretrain_demo(args: argparse.Namespace) -> int:
    from megaflow.demo import BASE_MODEL_DIR
    from megaflow.demo.pretrain import PretrainSettings, pretrain

    settings = PretrainSettings(seed=args.seed)
    for name in ("vae_steps", "dit_steps", "clips"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(settings, name, value)
    if args.caption_noise is not None:
        if not 0 <= args.caption_noise <= 1:
            raise ConfigError(f"--caption-noise must be in [0, 1], got {args.caption_noise}")
        settings.caption_noise = args.caption_noise
    output = Path(args.output) if args.output else BASE_MODEL_DIR
    record = pretrain(output, settings, show_progress=not args.no_progress)
    print(f"wrote {output} in {record['total_seconds']:.0f} s (VAE reconstruction MSE {record['vae_mse']:.5f}, "
          f"flow-matching loss {record['transformer_loss']:.4f})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from megaflow.config import load_config
    from megaflow.demo.evaluate import (eval_prompts, evaluate, find_checkpoint, format_table, labelled_checkpoints,
                                        save_comparison, write_json)

    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    cfg = load_config(args.config, list(args.set or []))
    prompts = eval_prompts(cfg, args.prompts)
    t0 = time.perf_counter()
    reports = evaluate(cfg, args.checkpoint or [], prompt_file=args.prompts, samples=args.samples, seed=args.seed,
                       show_progress=not args.no_progress, ema=not args.no_ema)
    seconds = time.perf_counter() - t0
    print(format_table(reports, len(prompts), args.samples))
    prompts = prompts.prompts
    out_dir = Path(cfg.output_dir) / "eval"
    image = save_comparison(reports, prompts, args.samples, args.image or out_dir / "base_vs_trained.png")
    extra = {"config": args.config, "checkpoint": args.checkpoint, "prompts": prompts, "samples": args.samples,
             "seed": args.seed, "seconds": round(seconds, 1)}
    path = write_json(reports, args.json or out_dir / "eval.json", **extra)
    print(json.dumps({**extra, "results": [r.to_dict() for r in reports]}))
    for label, checkpoint in labelled_checkpoints(args.checkpoint or []):
        from megaflow.trainer.ema import describe_weights

        print(f"{label} model: {describe_weights(find_checkpoint(checkpoint), not args.no_ema)}")
    print(f"frames: {image}; scores: {path}")
    return 0


def add_demo_commands(sub: argparse._SubParsersAction) -> None:
    """Register `pretrain-demo` and `eval` on the top-level subparsers."""
    pre = sub.add_parser("pretrain-demo", help="pretrain the demo's tiny shapes-world Wan model (~23 min on a 2-core CPU)")
    pre.add_argument("--output", help="model folder to write (default: the package's megaflow/demo/base_model)")
    pre.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and training (default 0)")
    pre.add_argument("--vae-steps", type=int, help="VAE training steps (default 1000)")
    pre.add_argument("--dit-steps", type=int, help="transformer training steps (default 5000)")
    pre.add_argument("--clips", type=int, help="training clips rendered (default 768)")
    pre.add_argument("--caption-noise", type=float, help="probability that each attribute of a training caption is "
                                                          "replaced by a random one (default 0.5)")
    pre.add_argument("--no-progress", action="store_true", help="hide progress bars")
    pre.set_defaults(func=_pretrain_demo)

    ev = sub.add_parser("eval", help="score a model (and a checkpoint) on held-out prompts with ODE sampling")
    ev.add_argument("--config", required=True, help="built-in recipe name (e.g. demo) or a YAML path")
    ev.add_argument("--checkpoint", action="append", metavar="[LABEL=]PATH",
                    help="a run's output folder or one of its checkpoints/iteration_* folders, optionally labelled "
                         "(repeatable: every checkpoint is a column; default: evaluate only the base model)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    ev.add_argument("--prompts", help="text file of evaluation prompts (default: the shapes world's held-out "
                                      "prompts for recipes using the shapes reward, else the recipe's prompts)")
    ev.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    ev.add_argument("--seed", type=int, default=1234, help="seed of the initial noise (default 1234)")
    ev.add_argument("--json", help="where to write the scores (default OUTPUT_DIR/eval/eval.json)")
    ev.add_argument("--image", help="where to write the side-by-side frames (default OUTPUT_DIR/eval/base_vs_trained.png)")
    ev.add_argument("--no-ema", action="store_true", help="evaluate the checkpoint's raw trained weights even when it "
                                                           "has an EMA of them (default: the EMA when present)")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev.set_defaults(func=_eval)
