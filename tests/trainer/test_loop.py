"""End-to-end properties of the single-process trainer on the tiny Wan model."""
import json

import pytest
import torch
from diffusers import WanPipeline

from megaflow.config import load_config
from megaflow.trainer.loop import Trainer

REQUIRED_METRICS = [
    "reward/mean", "reward/std", "reward/brightness/mean", "reward/brightness/std", "advantage/zero_std_groups",
    "loss/total", "loss/policy", "loss/kl", "policy/ratio_mean", "policy/ratio_max_dev", "policy/clip_frac", "policy/approx_kl",
    "optim/grad_norm", "optim/lr", "nfe/rollout_per_sample", "nfe/train_per_sample", "time/rollout_s",
    "time/reward_s", "time/reward_exposed_s", "time/update_s", "time/iteration_s", "memory/peak_gb",
]


def make_trainer(tmp_path, model_dir, *overrides):
    cfg = load_config("tiny", [f"output_dir={tmp_path}", f"model.path={model_dir}", "train.iterations=1",
                               "train.sample_every=0", *overrides])
    return Trainer(cfg, show_progress=False)


@pytest.mark.parametrize("algorithm", ["flow_grpo", "dance_grpo"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_first_ratio_is_exactly_one_at_micro_batch_4(tmp_path, tiny_wan_dir, algorithm, precision):
    trainer = make_trainer(tmp_path, tiny_wan_dir, f"algorithm.name={algorithm}", "rollout.chunk_size=4",
                           "train.micro_batch_size=4", f"train.precision={precision}", "train.lr=1e-2")
    # Two optimizer steps per iteration: the first window is on-policy, the second is not.
    trainer.cfg.train.grad_accum = 1
    trainer.update_settings = type(trainer.update_settings)(**{**trainer.update_settings.__dict__, "grad_accum": 1})
    first = trainer.run_iteration(0)
    assert first["policy/ratio_max_dev"] == 0.0
    assert first["optim/steps"] == 2.0
    assert first["policy/ratio_mean"] != 1.0  # the off-policy second window moved
    second = trainer.run_iteration(1)
    assert second["policy/ratio_max_dev"] == 0.0


def test_noise_and_rewards_do_not_depend_on_chunk_size(tmp_path, tiny_wan_dir):
    def rollout(chunk, fraction):
        trainer = make_trainer(tmp_path / f"c{chunk}-{fraction}", tiny_wan_dir, f"rollout.chunk_size={chunk}",
                               "train.micro_batch_size=1", f"algorithm.timestep_fraction={fraction}")
        latents, scores = [], []
        decode, score = trainer.adapter.decode, trainer.rewards.score
        trainer.adapter.decode = lambda x: latents.append(x.clone()) or decode(x)
        trainer.rewards.score = lambda v, p, m: scores.append(score(v, p, m)) or scores[-1]
        trainer.run_iteration(0)
        return torch.cat(latents), torch.cat([s.components["brightness"] for s in scores])

    # Every step trained: every velocity is evaluated per micro-batch, so the samples are bit-identical.
    lat1, r1 = rollout(1, 1.0)
    lat4, r4 = rollout(4, 1.0)
    assert torch.equal(lat1, lat4)
    # The VAE decodes a chunk as one batch (4 vs 1), which changes convolution rounding only.
    torch.testing.assert_close(r1, r4, rtol=0, atol=1e-6)
    # Default plan: the untrained last step runs as one batch of 4 vs 1 (GEMM rounding only).
    lat1, r1 = rollout(1, 0.99)
    lat4, r4 = rollout(4, 0.99)
    torch.testing.assert_close(lat1, lat4, rtol=0, atol=1e-5)
    torch.testing.assert_close(r1, r4, rtol=0, atol=1e-5)


def test_tensorboard_and_jsonl_carry_every_metric(tmp_path, tiny_wan_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tmp_path, tiny_wan_dir, "train.iterations=2", "train.sample_every=1")
    history = trainer.train()
    acc = EventAccumulator(str(tmp_path / "logs"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2]
    for name in REQUIRED_METRICS:
        assert name in tags["scalars"], name
        events = acc.Scalars(name)
        assert [e.step for e in events] == [1, 2]
        for event, line, metrics in zip(events, lines, history):
            assert event.value == pytest.approx(line[name], rel=1e-6, abs=1e-12)
            assert line[name] == pytest.approx(metrics[name])
    assert "samples/videos" in tags["images"]
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "iteration_000002" / "megaflow_checkpoint.json").is_file()


def test_trained_lora_loads_into_wan_pipeline_and_changes_its_output(tmp_path, tiny_wan_dir):
    trainer = make_trainer(tmp_path, tiny_wan_dir, "train.iterations=4", "train.lr=3e-2",
                           "algorithm.clip_range=0.2", "model.lora_rank=8")
    history = trainer.train()
    ckpt = tmp_path / "checkpoints" / "iteration_000004"
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    base = pipe("a red ball", num_frames=5, height=16, width=16, num_inference_steps=3, output_type="pt",
                generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(ckpt)
    tuned = pipe("a red ball", num_frames=5, height=16, width=16, num_inference_steps=3, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).frames
    assert tuned.shape == base.shape == (1, 5, 3, 16, 16)
    assert not torch.allclose(tuned, base)
    assert history[-1]["optim/grad_norm"] > 0


def test_full_finetune_with_kl_saves_a_loadable_transformer(tmp_path, tiny_wan_dir):
    from diffusers import WanTransformer3DModel

    trainer = make_trainer(tmp_path, tiny_wan_dir, "model.lora=false", "algorithm.kl_beta=0.1", "train.lr=1e-2",
                           "train.iterations=2", "train.grad_accum=1", "train.micro_batch_size=2",
                           "rollout.chunk_size=4")
    history = trainer.train()
    assert history[0]["policy/ratio_max_dev"] == 0.0
    assert history[0]["nfe/train_per_sample"] == 2 * history[0]["nfe/rollout_per_sample"] - 2
    assert history[-1]["loss/kl"] > 0  # the policy has moved away from the frozen reference
    saved = WanTransformer3DModel.from_pretrained(tmp_path / "checkpoints" / "iteration_000002" / "transformer")
    for (name, p), q in zip(trainer.adapter.transformer.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(p, q), name
    pipe = WanPipeline.from_pretrained(tiny_wan_dir, transformer=saved)
    video = pipe("a red ball", num_frames=5, height=16, width=16, num_inference_steps=2, output_type="pt").frames
    assert video.shape == (1, 5, 3, 16, 16)
