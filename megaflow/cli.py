"""Command line: `megaflow train|plan|bench ...` (also `python -m megaflow`)."""
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
    trainer = Trainer(cfg, show_progress=not args.no_progress, resume=args.resume)
    history = trainer.train()
    if trainer.topo.is_main:
        if trainer.stopped_by:
            print(f"stopped by {trainer.stopped_by} after iteration {trainer.start_iteration + len(history)} with a "
                  f"checkpoint; continue with the same command and --resume auto")
        elif history:
            print(f"done: {len(history)} iterations, final reward/mean {history[-1]['reward/mean']:.4f}; "
                  f"logs in {trainer.output_dir / 'logs'} (tensorboard --logdir {trainer.output_dir / 'logs'})")
        else:
            print(f"nothing to do: the run already finished its {cfg.train.iterations} iterations")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from megaflow.config import load_config
    from megaflow.data.text_cache import preprocess

    cfg = load_config(args.config, list(args.set or []))
    result = preprocess(cfg, batch_size=args.batch_size, show_progress=not args.no_progress)
    if result.rank == 0:
        print(f"text cache {result.folder}: {result.encoded} of the recipe's {result.items} prompts / negative "
              f"prompt / images encoded now ({result.world_size} process(es), {result.seconds:.1f}s), "
              f"{result.entries} entries in {result.shards} shard(s), {result.nbytes / 2**20:.2f} MiB; train with "
              f"--set data.text_cache={result.folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from megaflow.trainer.ema import describe_weights
    from megaflow.trainer.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, args.config, ema=not args.no_ema)
    print(f"exported {describe_weights(args.checkpoint, not args.no_ema)} of {args.checkpoint} to {out}")
    return 0


def _convert_reward(args: argparse.Namespace) -> int:
    from megaflow.rewards.convert import convert_reward

    out = convert_reward(args.kind, args.src, args.dst, args.base)
    print(f"wrote {args.kind} reward folder {out}; use it as reward.options.{args.kind}.path")
    return 0


def _reward_server(args: argparse.Namespace) -> int:
    from megaflow.rewards.server import serve_command

    return serve_command(args.reward, args.set_option or [], host=args.host, port=args.port,
                         token_env=args.token_env, max_mb=args.max_mb, device=args.device)


def _bench(args: argparse.Namespace) -> int:
    if args.target == "kernels":
        from megaflow.bench.kernels import main as bench_kernels

        return bench_kernels(args.rest)
    if args.target == "algorithms":
        from megaflow.bench.algorithms import main as bench_algorithms

        return bench_algorithms(args.rest)
    if args.target == "train":
        from megaflow.bench.train import main as bench_train

        return bench_train(args.rest)
    raise MegaflowError(f"unknown benchmark '{args.target}'")


def _plan(args: argparse.Namespace) -> int:
    import json

    from megaflow.plan import load_plan_config, plan

    cfg = load_plan_config(args.config, list(args.set or []))
    report = plan(cfg, args.gpus, args.gpu_memory, recipe=args.config, host_memory=args.host_memory,
                  gpus_per_node=args.gpus_per_node, reserve=args.reserve, mfu=args.mfu, peak_tflops=args.gpu_peak_tflops)
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaflow", description="Online GRPO-family RL for flow-matching video models")
    # The DeepSpeed launcher inserts --local_rank=N before the subcommand; the rank comes from
    # the LOCAL_RANK environment variable, which every launcher sets.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run GRPO training from a recipe")
    train.add_argument("--config", required=True, help="built-in recipe name (e.g. tiny) or a YAML path")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set train.iterations=3")
    train.add_argument("--output-dir", help="where logs, checkpoints and the resolved config go")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument("--resume", metavar="auto|DIR", default=None,
                       help="continue from the newest complete checkpoint under the output dir (auto) or from DIR")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(func=_train)

    prep = sub.add_parser("preprocess", help="encode a recipe's prompts once into data.text_cache (then training "
                                             "loads no text encoder)")
    prep.add_argument("--config", required=True, help="built-in recipe name (e.g. tiny) or a YAML path")
    prep.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override a config key (repeatable); data.text_cache names the cache folder")
    prep.add_argument("--batch-size", type=int, default=8, help="prompts per text-encoder call (default 8)")
    prep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    prep.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    prep.set_defaults(func=_preprocess)

    export = sub.add_parser("export", help="consolidated trainable weights (diffusers layout) from a checkpoint")
    export.add_argument("checkpoint", help="a checkpoints/iteration_NNNNNN directory (single-process or DeepSpeed)")
    export.add_argument("--output", required=True, help="folder for pytorch_lora_weights.safetensors or transformer/")
    export.add_argument("--config", help="the run's config.yaml (default: the one next to checkpoints/)")
    export.add_argument("--no-ema", action="store_true",
                        help="export the raw trained weights even when the checkpoint has an EMA of them (default: "
                             "the EMA when present)")
    export.set_defaults(func=_export)

    convert = sub.add_parser("convert-reward", help="convert a published reward checkpoint into a folder megaflow loads")
    convert.add_argument("kind", help="which reward's checkpoint (hpsv2, imagereward)")
    convert.add_argument("src", help="the published checkpoint file")
    convert.add_argument("dst", help="the folder to write (new or empty)")
    convert.add_argument("--base", help="the transformers folder the checkpoint was trained from (config, tokenizer, "
                                        "processor), where the kind needs one")
    convert.set_defaults(func=_convert_reward)

    rserver = sub.add_parser("reward-server", help="serve registered rewards over HTTP (JSON) for the remote reward")
    rserver.add_argument("--reward", action="append", required=True, metavar="NAME",
                         help="a registered reward to serve (repeatable)")
    rserver.add_argument("--set-option", action="append", metavar="NAME.KEY=VALUE",
                         help="an option of a served reward, VALUE read as YAML (repeatable), e.g. brightness.target=0.5")
    rserver.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1; any other is reachable from elsewhere: "
                              "use --token-env)")
    rserver.add_argument("--port", type=int, default=18090, help="port to listen on (default 18090; 0: any free one)")
    rserver.add_argument("--token-env", metavar="VAR",
                         help="NAME of an environment variable holding a token that every request must send as "
                              "'Authorization: Bearer <token>'")
    rserver.add_argument("--max-mb", type=float, default=512.0,
                         help="largest request body accepted, in MiB (default 512; larger ones get HTTP 413)")
    rserver.add_argument("--device", default=None, help="device for rewards that take one (e.g. cuda:1)")
    rserver.set_defaults(func=_reward_server)

    plan = sub.add_parser("plan", help="per-rank memory, communication and time of a recipe on a cluster, and the "
                                       "nearest layout that fits")
    plan.add_argument("--config", required=True, help="built-in recipe name (e.g. wan_t2v_14b) or a YAML path")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable), as train")
    plan.add_argument("--gpus", type=int, required=True, help="world size (GPUs in the job)")
    plan.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU in GiB (e.g. 80)")
    plan.add_argument("--host-memory", type=float, default=None, help="host memory per node in GiB (default: not checked)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    plan.add_argument("--reserve", type=float, default=0.1,
                      help="fraction of GPU memory kept for the CUDA context and fragmentation (default 0.1)")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the time estimate "
                                                             "(default 0.4)")
    plan.add_argument("--gpu-peak-tflops", type=float, default=989.0,
                      help="peak dense TFLOP/s of one GPU in the run's precision (default 989: H100/H200 bf16)")
    plan.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    plan.set_defaults(func=_plan)

    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("target", choices=["kernels", "algorithms", "train"], help="what to benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER,
                       help="options of the benchmark (see `megaflow bench kernels -h`, `megaflow bench algorithms -h`, "
                            "`megaflow bench train -h`)")
    bench.set_defaults(func=_bench)

    from megaflow.demo.cli import add_demo_commands

    add_demo_commands(sub)
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
