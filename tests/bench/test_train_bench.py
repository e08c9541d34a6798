"""`megaflow bench train` on CPU with scaled random-weight models: every field of the row, the FLOP
figures equal to the analytic count of the run's config, the plain loop making the same transformer
calls as the rollout (what makes their ratio meaningful), and under ZeRO-3 with sequence
parallelism (two processes, Hunyuan) the gather rows."""
import json
import math
import os
import subprocess
import sys

import pytest

from megaflow.bench.train import main
from megaflow.models.flops import train_step_flops, transformer_flops
from megaflow.models.random_model import Scale, scaled_transformer_config
from megaflow.parallel.topology import free_port

SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--repeats", "1"]
#: What every row must report (the issue's list), each one set.
FIELDS = ("recipe", "family", "real_model", "scale", "video", "latent_shape", "video_tokens", "text_tokens", "sp",
          "dp", "chunk", "micro_batch", "grad_checkpointing", "zero_stage", "hpz_partition_size", "attention_backend",
          "precision", "dtype", "device", "transformer_config", "rollout_s_per_step_per_sample",
          "plain_s_per_step_per_sample", "rollout_vs_plain", "update_s_per_trained_step_per_sample",
          "update_vs_rollout", "rollout_flops_per_step_per_sample", "update_flops_per_trained_step_per_sample",
          "rollout_tflops_per_device", "update_tflops_per_device", "decode_s_per_sample", "peak_rollout_mib",
          "peak_plain_mib", "peak_update_mib", "peak_decode_mib", "rollout_transformer_calls",
          "plain_transformer_calls", "reward_status")
PEAKS = ("peak_rollout_mib", "peak_plain_mib", "peak_update_mib", "peak_decode_mib")
RATIOS = ("rollout_vs_plain", "update_vs_rollout")


def check_row(row, *, real_model, scale, family, steps, chunk, reward="ok"):
    missing = [k for k in FIELDS if row.get(k) is None]
    assert not missing, f"fields missing or unset: {missing}"
    assert row["real_model"] == real_model and row["scale"] == scale and row["family"] == family
    scaled = scaled_transformer_config(real_model, Scale.parse(scale))
    assert row["transformer_config"] == {k: v for k, v in scaled.items() if not k.startswith("_")}
    for key in RATIOS:
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    for key in PEAKS:
        assert row[key] > 0, (key, row[key])
    assert row["reward_status"].startswith(reward)
    scored = reward == "ok"
    assert (row["reward_s_per_sample"] is not None, row["peak_reward_mib"] is not None) == (scored, scored)
    # one chunk of micro-batch size: the rollout makes one call per step, like the plain loop
    cfg_batch = row["cfg_batch"]
    assert row["rollout_transformer_calls"] == row["plain_transformer_calls"] == steps
    assert row["rollout_transformer_rows"] == row["plain_transformer_rows"] == steps * chunk * cfg_batch
    assert row["num_steps"] == steps and row["chunk"] == chunk


def test_wan_on_cpu_writes_json_and_markdown(tmp_path, one_thread):
    """In process; the reward is a learned one whose weights are not here: reported, not fatal."""
    out, md = tmp_path / "train.json", tmp_path / "BENCH.md"
    scale = "width=0.1,depth=0.05"
    assert main(["--config", "wan_t2v_1_3b", "--scale", scale, *SMALL, "--steps", "3", "--chunk", "2",
                 "--set", "parallel.zero_stage=0", "--set", "reward.components={pickscore: 1.0}",
                 "--set", f"reward.options.pickscore.path={tmp_path / 'no-such-folder'}",
                 "--json", str(out), "--markdown", str(md)]) == 0
    payload = json.loads(out.read_text())
    row = payload["rows"][0]
    check_row(row, real_model="wan2.1_t2v_1.3b", scale=scale, family="wan", steps=3, chunk=2,
              reward="unavailable: ConfigError: reward 'pickscore'")
    assert row["reward_components"] == {"pickscore": 1.0}
    assert payload["meta"]["versions"]["torch"] and "CPU" in payload["meta"]["device"]
    assert row["precision"] == "fp32" and any("train.precision=fp32" in n for n in payload["meta"]["notes"])
    # latent 16×2×4×4 (Wan VAE 4×8×8), patch 1×2×2: 8 video tokens; UMT5's 512 text tokens; CFG doubles the batch
    assert row["latent_shape"] == [16, 2, 4, 4] and row["video_tokens"] == 8 and row["text_tokens"] == 512
    assert row["cfg_batch"] == 2
    forward = transformer_flops("wan", row["transformer_config"], batch=2, video_tokens=8, text_tokens=512)
    assert row["rollout_flops_per_step_per_sample"] == forward.total
    # the recipe: half the blocks checkpointed, KL β 0.004 adds the reference forward
    assert row["grad_checkpointing"] == 0.5 and row["kl_beta"] > 0 and row["update_forwards_per_trained_step"] == 2
    assert row["update_flops_per_trained_step_per_sample"] == pytest.approx(
        train_step_flops(forward, checkpoint_fraction=0.5) + forward.total, rel=1e-12)
    assert row["update_tflops_per_device"] == pytest.approx(
        row["update_flops_per_trained_step_per_sample"] / row["update_s_per_trained_step_per_sample"] / 1e12)
    assert row["peak_tflops"] is None and row["update_mfu"] is None  # CPU: no peak, MFU n/a
    text = md.read_text()
    assert "## Training phases (megaflow bench train)" in text and "MFU peak: n/a" in text
    assert "- reward: unavailable: ConfigError: reward 'pickscore'" in text
    line = next(l for l in text.splitlines() if l.startswith("| wan_t2v_1_3b |"))
    assert f"| wan2.1_t2v_1.3b @ {scale} |" in line and f"| {row['rollout_vs_plain']:.2f} | " in line


@pytest.mark.slow
def test_hunyuan_zero3_sequence_parallel_reports_gathers(tmp_path):
    """Two processes, the recipe's ZeRO-3 with the whole transformer gathered for the rollout, SP 2."""
    out = tmp_path / "train.json"
    scale = "width=0.1,depth=0.05"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megaflow", "bench", "train", "--config", "hunyuan_t2v", "--scale", scale, *SMALL, "--steps", "2",
           "--chunk", "1", "--set", "parallel.sp_size=2", "--set", "parallel.hpz_partition_size=1", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "DS_ACCELERATOR")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    row = json.loads(out.read_text())["rows"][0]
    check_row(row, real_model="hunyuan_video_t2v", scale=scale, family="hunyuan", steps=2, chunk=1)
    assert (row["zero_stage"], row["sp"], row["dp"], row["gather_weights"]) == (3, 2, 1, True)
    assert row["cfg_batch"] == 1 and row["update_forwards_per_trained_step"] == 1  # embedded guidance, no KL
    for key in ("zero3_rollout_per_layer_s_per_step_per_sample", "zero3_rollout_gathered_s_per_step_per_sample",
                "zero3_full_gather_s"):
        assert row[key] > 0, key
    assert math.isfinite(row["zero3_gather_s_per_rollout"])
    assert "| hunyuan_t2v | 2 (2×1) | 1 |" in proc.stdout  # the gather table, printed by rank 0 only
    assert proc.stdout.count("| hunyuan_t2v | hunyuan_video_t2v @") == 1
