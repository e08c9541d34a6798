"""Layout invariance of the image families (FLUX.1, SD3.5) through the real launchers: one process
vs dp=2 × sp=2 with ZeRO-3 and activation checkpointing on 4 ranks (`deepspeed --num_gpus 4`),
one iteration of each family's tiny recipe in fp32, compared like test_layout.py's first
iteration. Two runs in all: this file, run as a script, calls `megaflow train` for both
families one after the other, in one plain process and in one 4-rank launch."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import megaflow
from megaflow.models.tiny import write_tiny_pipeline
from megaflow.parallel.topology import free_port

FAMILIES = ("flux", "sd3")
LORA = "pytorch_lora_weights.safetensors"
# adam_eps=1e-3 makes Adam's first step linear in the gradient (see test_layout.py).
COMMON = ("train.iterations=1", "train.precision=fp32", "train.adam_eps=1e-3", "train.sample_every=0",
          "train.keep_checkpoints=0")
LAYOUT = ("parallel.zero_stage=3", "parallel.sp_size=2", "train.grad_checkpointing=1.0")
#: Ends one run's arguments on the command line of this file run as a script (`_main`).
NEXT = "--next-run"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-images")
    return {family: write_tiny_pipeline(family, root / family) for family in FAMILIES}


def _args(family: str, model_dir: Path, output_dir: Path, *overrides: str) -> list[str]:
    args = ["train", "--config", f"tiny_{family}", "--output-dir", str(output_dir), "--no-progress",
            "--set", f"model.path={model_dir}"]
    for o in (*COMMON, *overrides):
        args += ["--set", o]
    return args


def _check(family: str, single: Path, layout: Path, metrics) -> None:
    """test_layout.py's first-iteration checks. The same kernels run on the same shapes, and the
    sharded joint attention sums its keys in one-process order, so the rollout agrees to the bit
    and the update differs only by the order of the cross-rank sums (measured: SD3 grad norm 3.4e-8
    and weights 3e-6 of their scale; FLUX 3.3e-8 and 3.2e-7; before FLUX's keys were put back in
    order its rewards were one float32 rounding apart, and the group's reward spread of 1.5e-3 made
    that 7.8e-6 in the weights)."""
    (ref,), (got,) = metrics(single), metrics(layout)
    assert got["iteration"] == 1 and ref["policy/ratio_max_dev"] == got["policy/ratio_max_dev"] == 0.0, family
    for key in ("reward/mean", "reward/std"):
        assert _rel(got[key], ref[key]) <= 1e-6, (family, key)
    for key in ("loss/total", "optim/grad_norm"):
        assert _rel(got[key], ref[key]) <= 1e-5, (family, key)
    assert ref["optim/grad_norm"] > 0, family
    theirs = load_file(str(single / "checkpoints" / "iteration_000001" / LORA))
    ours = load_file(str(layout / "checkpoints" / "iteration_000001" / LORA))
    assert ours.keys() == theirs.keys()
    moved = 0
    for key, w in theirs.items():
        scale = float(w.abs().max())
        assert float((ours[key] - w).abs().max()) <= 1e-5 * scale, (family, key)
        moved += int("lora_B" in key and scale > 0)
    assert moved > 0, family  # the update changed the weights being compared


@pytest.mark.slow
def test_one_process_and_dp2_sp2_zero3_agree_for_flux_and_sd3(tmp_path, model_dirs, megaflow_launch):
    L = megaflow_launch
    singles, layouts = [], []
    for family in FAMILIES:
        singles += [*_args(family, model_dirs[family], tmp_path / f"{family}-single"), NEXT]
        layouts += [*_args(family, model_dirs[family], tmp_path / f"{family}-dp2sp2", *LAYOUT), NEXT]
    # Run as a script, this file finds the megaflow this test imported, wherever that is installed.
    env = L.env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(megaflow.__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH")]))
    L.run([sys.executable, __file__, *singles], timeout=300, env=env)
    L.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "4", f"--master_port={free_port()}",
           __file__, *layouts], timeout=400, env=env)
    for family in FAMILIES:
        _check(family, tmp_path / f"{family}-single", tmp_path / f"{family}-dp2sp2", L.metrics)


def _main(argv: list[str]) -> int:
    """Script entry: `megaflow` with each NEXT-terminated argument list, one after the other in this
    process (the DeepSpeed launcher's `--local_rank=N` goes to each)."""
    from megaflow.cli import main

    local_rank = [a for a in argv if a.startswith("--local_rank")]
    runs: list[list[str]] = [[]]
    for a in argv:
        if a == NEXT:
            runs.append([])
        elif a not in local_rank:
            runs[-1].append(a)
    for args in filter(None, runs):
        code = main([*local_rank, *args])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
