"""`megaflow plan`: its memory estimate against measured peaks of real trainer iterations on CPU,
its verdicts for the real recipes, and its config validation (the same errors as `train`).

Measurement: a Trainer on `random:wan2.1_t2v_1.3b@width=0.25,depth=0.1` (9×64×64 video, 512 text
tokens, 2 samples, 2 steps). To measure a steady-state iteration, the AdamW states are created
before (one step on zero gradients) and, inside the measured block, the gradients a previous
iteration leaves until the next update; `measure_peak_bytes` around that and `run_iteration(0)`
gives the peak bytes allocated above what was live on entry, compared with the plan's
iteration-time items (`PlanReport.iteration_total`: gradients, activations, text conditioning,
chunk latents, rollout store). The resident items (weights, optimizer states) and the gradients
are compared with the trainer's tensors exactly.
"""
from __future__ import annotations

import pytest
import torch

from megaflow.config import load_config
from megaflow.errors import ConfigError

MiB = 2**20
MODEL = "random:wan2.1_t2v_1.3b@width=0.25,depth=0.1"
COMMON = [
    f"model.path={MODEL}", "train.iterations=1", "train.sample_every=0", "train.save_every=0",
    "data.prompt_file=null", "data.prompts=[a red ball rolling, a blue cube spinning]", "data.prompts_per_iteration=1",
    "data.negative_prompt=blurry", "video.frames=9", "video.height=64", "video.width=64", "sampling.num_steps=2",
    "rollout.group_size=2", "rollout.chunk_size=2", "rollout.best_of=null", "algorithm.timestep_fraction=1.0",
    "algorithm.kl_beta=0", "reward.components={brightness: 1.0}", "parallel.zero_stage=0", "parallel.sp_size=1",
    "parallel.hpz_partition_size=1", "train.grad_accum=null", "train.precision=fp32", "model.lora_rank=4",
]
LAYOUTS = {
    "LoRA, CFG, micro 2, no ckpt": ["sampling.guidance_scale=4.5", "train.micro_batch_size=2",
                                    "train.grad_checkpointing=0"],
    "LoRA, no CFG, micro 1, ckpt 1": ["sampling.guidance_scale=1.0", "train.micro_batch_size=1",
                                      "train.grad_checkpointing=1.0"],
    "full FT, CFG, micro 1, ckpt 0.5": ["model.lora=false", "sampling.guidance_scale=4.5", "train.micro_batch_size=1",
                                        "train.grad_checkpointing=0.5"],
}
ROWS: list[tuple[str, float, float]] = []


@pytest.fixture(scope="module")
def plan_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("plan-cache"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_estimate_matches_a_measured_iteration(layout, tmp_path, plan_cache, monkeypatch, one_thread):
    from megaflow.bench.memory import measure_peak_bytes
    from megaflow.plan import estimate
    from megaflow.trainer.loop import Trainer

    monkeypatch.setenv("MEGAFLOW_CACHE", plan_cache)
    cfg = load_config("wan_t2v_1_3b", [*COMMON, *LAYOUTS[layout], f"output_dir={tmp_path}"])
    trainer = Trainer(cfg, show_progress=False)
    params = trainer.adapter.trainable_parameters()
    for p in params:                        # AdamW creates its states at the first step: do it now
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    # After the Trainer the random folder exists; CPU convolutions allocate their im2col buffers.
    report = estimate(cfg, 1, 80, convolution_workspace=True)
    # Resident items: exactly the trainer's tensors.
    transformer = sum(t.nbytes for t in trainer.adapter.transformer.parameters())
    states = sum(t.nbytes for s in trainer.optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert report.device["transformer weights"] == transformer
    assert report.device["AdamW states fp32"] == states
    assert report.device["gradients fp32"] == sum(p.numel() * 4 for p in params)
    with measure_peak_bytes() as mem:
        for p in params:                    # a previous iteration's gradients live until the update
            p.grad = torch.zeros_like(p)    # (allocated inside: the profiler misses frees of older blocks)
        trainer.run_iteration(0)
    estimated = report.iteration_total()
    error = estimated / mem.peak - 1
    ROWS.append((layout, estimated / MiB, mem.peak / MiB))
    print(f"\n{'layout':<34}{'estimate':>10}{'measured':>10}{'error':>8}")
    for name, e, m in ROWS:
        print(f"{name:<34}{e:>8.1f}Mi{m:>8.1f}Mi{e / m - 1:>+8.1%}")
    assert abs(error) < 0.15, (layout, report.device, report.assumptions["activation_phases_GiB"], mem.peak)


# ---- the real recipes, the CLI, validation ----------------------------------------------------


def test_wan_14b_full_finetune_on_one_gpu_does_not_fit_and_the_nearest_layout_does():
    from megaflow.plan import estimate, load_plan_config, plan

    overrides = ["model.lora=false", "parallel.sp_size=1", "parallel.hpz_partition_size=1"]
    cfg = load_plan_config("wan_t2v_14b", overrides)
    report = plan(cfg, 1, 80)
    assert not report.fits and report.device_total > 80 * 2**30
    assert report.device["transformer weights (ZeRO-3 partition)"] > 14e9 * 4  # 14B fp32 trainable weights
    assert report.nearest is not None
    nearer = estimate(load_plan_config("wan_t2v_14b", overrides + report.nearest["overrides"]), 1, 80)
    assert nearer.fits and nearer.device_total == pytest.approx(report.nearest["device_total"])


def test_lora_wan_1_3b_fits_one_gpu_through_the_cli(tmp_path, capsys):
    import json

    from megaflow.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "wan_t2v_1_3b", "--gpus", "1", "--gpu-memory", "80", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["fits"] and report["nearest"] is None
    assert report["device_total"] < 0.9 * 80 * 2**30
    # LoRA rank 32 on the 8 attention linears (1536 → 1536) of the 30 blocks, fp32 gradients (ZeRO-2, 1 rank)
    assert report["device"]["gradients fp32 (partition)"] == 30 * 8 * 32 * (1536 + 1536) * 4
    assert "verdict: fits" in capsys.readouterr().out


@pytest.mark.parametrize("gpus, sp", [(6, 4), (32, 8)])
def test_an_invalid_layout_is_the_same_config_error_as_train(gpus, sp):
    from megaflow.config import validate_parallel
    from megaflow.parallel.ulysses import check_heads_divisible
    from megaflow.plan import plan

    cfg = load_config("wan_t2v_1_3b", [f"parallel.sp_size={sp}"])
    with pytest.raises(ConfigError) as expected:
        validate_parallel(cfg, gpus)
        check_heads_divisible(12, sp)           # Wan 2.1 1.3B: 12 heads (Trainer's check under SP)
    with pytest.raises(ConfigError) as got:
        plan(cfg, gpus, 80)
    assert str(got.value) == str(expected.value)


def test_activations_are_linear_in_tokens(plan_cache, monkeypatch):
    """The fitted per-token lines (two token counts) predict a third count's measurement."""
    import math

    from megaflow.plan import _measure_point, latent_shape, measure_activations, model_shape, video_tokens

    monkeypatch.setenv("MEGAFLOW_CACHE", plan_cache)
    cfg = load_config("wan_t2v_1_3b", [*COMMON, "video.width=128", "train.grad_checkpointing=0"])
    shape = model_shape(cfg)
    act = measure_activations(cfg, shape)
    C, F, H, W = latent_shape(cfg, shape)
    third = (C, F, H, W // 4)
    point = _measure_point(cfg, shape, third, shape.text_tokens, torch.float32)
    x = video_tokens("wan", shape.config, third)
    kind = "WanTransformerBlock"
    for line, measured in ((act.saved[kind], point["saved"][kind]), (act.checkpointed[kind], point["ckpt"][kind]),
                           (act.base, point["base_saved"]), (act.rollout, point["rollout"])):
        assert math.isclose(line[0] + line[1] * x, measured, rel_tol=0.01), (line, x, measured)


def test_without_the_model_folder_the_vae_is_priced_as_with_it(tmp_path, monkeypatch):
    """No folder on disk (a real recipe before its download, `random:` before a run wrote it): the
    plan prices the family's released VAE structure, exactly as the folder's own VAE; a sliced
    decode prices every chunk size with one VAE run."""
    from megaflow import plan as plan_module
    from megaflow.models.random_model import Scale, random_model_folder, write_random_model

    monkeypatch.setenv("MEGAFLOW_CACHE", str(tmp_path))
    name, scale = "hunyuan_video_t2v", Scale(width=0.05, depth=0.04)
    layout = [f"model.path=random:{name}@{scale.label}", "video.frames=9", "video.height=64", "video.width=64",
              "parallel.sp_size=1", "parallel.hpz_partition_size=1", "rollout.gather_weights=false"]
    cfg = load_config("hunyuan_t2v", layout)
    runs = []
    decode_run = plan_module._decode_run
    monkeypatch.setattr(plan_module, "_decode_run", lambda *a: runs.append(a[2]) or decode_run(*a))
    cache: dict = {}
    without = plan_module.estimate(cfg, 1, 80, _cache=cache)
    assert plan_module.model_shape(cfg).folder is None
    assert any("released AutoencoderKLHunyuanVideo structure" in n for n in without.notes)
    one_sample = load_config("hunyuan_t2v", [*layout, "rollout.chunk_size=1", "train.micro_batch_size=1"])
    smaller = plan_module.estimate(one_sample, 1, 80, _cache=cache)
    assert runs == [1]  # sliced: one sample's VAE run served both chunk sizes
    decode = lambda report: report.assumptions["activation_phases_GiB"]["VAE decode"]
    assert 0 < decode(smaller) < decode(without)

    write_random_model(name, scale, random_model_folder(name, scale))
    with_folder = plan_module.estimate(cfg, 1, 80)
    assert plan_module.model_shape(cfg).folder is not None
    assert with_folder.device["VAE"] == without.device["VAE"] > 0
    assert decode(with_folder) == decode(without)
