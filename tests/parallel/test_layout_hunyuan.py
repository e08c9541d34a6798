"""Layout invariance of HunyuanVideo: the tiny recipe in one process and as dp=2 × sp=2 with ZeRO-3
on 4 ranks under the DeepSpeed launcher, one iteration in fp32. The SP ranks shard both the video
and the text tokens (`HunyuanSequenceParallel`); the run adds true CFG to the embedded guidance, so
the negative prompt's own (shorter) mask meets the sharded text. Compared as
tests/parallel/test_layout.py's first iteration: rewards to 1e-6 relative, loss and grad norm to
1e-5, the saved LoRA weights to 1e-5 of each tensor's scale.

The first rollout agrees to the bit because the sharded joint attention sums its keys in the
one-process order ([video; text]; measured: with the gathered order [video_0; text_0; video_1;
text_1] the velocity moves by 8e-7 and the advantages, which divide by the tiny model's reward
spread of 0.02, by 1e-6). SkyReels-V1 I2V runs the same sharded transformer with the image latents
concatenated on channels before the patch embedding; its launcher run is left out to keep this file
near 90 s (measured by hand like this test: bit-identical rollout, grad norm 2e-9, LoRA 3e-6)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megaflow.models.tiny import tiny_model_dir
from megaflow.parallel.topology import free_port

LORA = "pytorch_lora_weights.safetensors"
# Adam's first step is lr·g/(|g|+eps): eps=1e-3 makes it linear in the gradient, so the weights
# compare the gradients themselves (see test_layout.py).
COMMON = ("train.iterations=1", "train.save_every=1", "train.keep_checkpoints=0", "train.precision=fp32",
          "train.adam_eps=1e-3", "train.sample_every=0", "sampling.guidance_scale=3.0",
          "data.negative_prompt=blurry, low quality")


def _args(model_dir: Path, output_dir: Path, *overrides: str) -> list[str]:
    args = ["--config", "tiny_hunyuan", "--output-dir", str(output_dir), "--no-progress",
            "--set", f"model.path={model_dir}"]
    for o in (*COMMON, *overrides):
        args += ["--set", o]
    return args


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.slow
def test_one_process_and_dp2_sp2_zero3_agree(tmp_path: Path, megaflow_launch) -> None:
    L = megaflow_launch
    model_dir = tiny_model_dir("hunyuan", cache_root=tmp_path / "cache")  # written once, before any rank starts
    single, dp2sp2 = tmp_path / "single", tmp_path / "dp2sp2"
    L.run(L.train_command(1, _args(model_dir, single)))
    L.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=4", f"--master_port={free_port()}",
           "--module", "megaflow", "train",
           *_args(model_dir, dp2sp2, "parallel.zero_stage=3", "parallel.sp_size=2", "train.grad_checkpointing=1.0")],
          timeout=600)

    (ref,), (got,) = L.metrics(single), L.metrics(dp2sp2)
    assert got["iteration"] == ref["iteration"] == 1
    assert got["policy/ratio_max_dev"] == ref["policy/ratio_max_dev"] == 0.0
    assert _rel(got["reward/mean"], ref["reward/mean"]) <= 1e-6
    assert _rel(got["reward/std"], ref["reward/std"]) <= 1e-6
    assert _rel(got["loss/total"], ref["loss/total"]) <= 1e-5
    assert _rel(got["optim/grad_norm"], ref["optim/grad_norm"]) <= 1e-5 and ref["optim/grad_norm"] > 0
    ours, theirs = (load_file(str(run / "checkpoints" / "iteration_000001" / LORA)) for run in (dp2sp2, single))
    assert ours.keys() == theirs.keys() and any("single_transformer_blocks" in k for k in theirs)
    assert not any("context_embedder" in k for k in theirs)  # the token refiner is not a default target
    moved = 0
    for key, w in theirs.items():
        scale = float(w.abs().max())
        assert float((ours[key] - w).abs().max()) <= 1e-5 * scale, key
        moved += int("lora_B" in key and scale > 0)
    assert moved > 0  # the update changed the weights being compared
