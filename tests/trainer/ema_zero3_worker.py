"""Worker for test_ema.py::test_zero3_ema_with_deepspeed (2 ranks, DeepSpeed ZeRO-3 on the CPU).

For a ZeRO-3 LoRA run whose small parameters DeepSpeed keeps whole (persistent), a ZeRO-3 full
fine-tune whose parameters are all partitioned, and a ZeRO-2 LoRA run: four real optimizer steps
with an EMA updated every second step, then checks that
- the EMA of each rank's partitions, gathered, is the EMA of the whole weights;
- inside `swapped()` the gathered weights are the EMA and the model computes something else;
  afterwards weights and outputs are back bit for bit;
- the checkpoint's EMA (ZeRO-3: shards) assembles (`read_ema`, export, eval) into the whole EMA and
  loads back into a fresh EMA on every rank; `--no-ema` gives the trained weights.
Prints EMA-ZERO3-OK on every rank that passed."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megaflow.config import load_config, save_config
from megaflow.models.base import Conditioning
from megaflow.parallel.engine import (gathered, initialize_engine, load_ds_config, set_leaf_modules,
                                      zero3_transformer_loader)
from megaflow.parallel.topology import Mpu, init_topology
from megaflow.trainer.ema import EMA, read_ema
from megaflow.trainer.export import checkpoint_state
from megaflow.trainer.loop import load_adapter
from megaflow.trainer.state import load_checkpoint, read_trainer_state, save_checkpoint

DECAY, EVERY, STEPS = 0.6, 2, 4


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=what)


def run(mode: str, work: Path, model_dir: Path, topo) -> None:
    stage = 2 if mode == "zero2_lora" else 3
    lora = mode != "zero3_full"
    out = work / mode
    overrides = [f"model.path={model_dir}", f"output_dir={out}", f"parallel.zero_stage={stage}",
                 f"model.lora={str(lora).lower()}", "algorithm.kl_beta=0", "train.lr=3e-2", "train.weight_decay=0"]
    if mode == "zero3_lora":  # the small LoRA matrices are kept whole by DeepSpeed (persistent parameters)
        raw = json.loads((Path(__file__).parents[2] / "ds_configs" / "zero3.json").read_text())
        raw["zero_optimization"]["stage3_param_persistence_threshold"] = 100000
        ds_file = work / "zero3_persistent.json"
        if topo.rank == 0:
            ds_file.write_text(json.dumps(raw))
        dist.barrier()
        overrides.append(f"parallel.ds_config={ds_file}")
    cfg = load_config("tiny", overrides)
    if topo.rank == 0:
        save_config(cfg, out / "config.yaml")
    ds_config, adamw = load_ds_config(cfg, grad_accum_steps=1)
    adapter = load_adapter(cfg, torch.device("cpu"), zero3_transformer_loader(ds_config) if stage == 3 else None)
    if stage == 3:
        set_leaf_modules(adapter.transformer, adapter.block_classes)
    engine, _ = initialize_engine(adapter.transformer, adapter.trainable_parameters(), ds_config, adamw, Mpu(topo))
    adapter.engine = engine
    named = [(n, p) for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    persistent = sum(bool(getattr(p, "ds_persist", False)) for p in params)
    assert (persistent > 0) == (mode == "zero3_lora"), (mode, persistent)

    def whole() -> dict[str, torch.Tensor]:
        with gathered(params, stage):
            return {n: p.detach().float().clone() for n, p in named}

    ema = EMA(named, decay=DECAY, every=EVERY, zero_stage=stage)
    assert (ema.partition_world_size, ema.partition_rank) == ((2, topo.rank) if stage == 3 else (1, 0))
    reference = whole()
    cond = Conditioning(text=adapter.encode_prompts(["a red square moves left"]))
    shape = adapter.latent_shape(cfg.video.frames, cfg.video.height, cfg.video.width)
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(7))
    sigma = torch.tensor([0.7])
    for step in range(1, STEPS + 1):
        loss = adapter.velocity(x, sigma, cond).pow(2).mean()
        engine.backward(loss)
        engine.step()
        current = whole()
        if step % EVERY == 0:
            reference = {n: DECAY * reference[n] + (1 - DECAY) * current[n] for n in reference}
        assert ema.update(step) == (step % EVERY == 0)
    trained = whole()
    assert any(not torch.allclose(trained[n], reference[n]) for n in trained), "the EMA should lag the weights"

    with torch.no_grad():
        v_trained = adapter.velocity(x, sigma, cond)
        with ema.swapped():
            for n, t in whole().items():
                close(t, reference[n], f"{mode}: swapped-in {n}")
            v_ema = adapter.velocity(x, sigma, cond)
        v_again = adapter.velocity(x, sigma, cond)
    assert not torch.allclose(v_ema, v_trained), mode
    assert torch.equal(v_again, v_trained), mode
    for n, t in whole().items():
        assert torch.equal(t, trained[n]), f"{mode}: {n} not restored"

    path = save_checkpoint(adapter, out, STEPS, engine=engine, topo=topo, zero_stage=stage, ema=ema,
                           trainer_state={"window": STEPS})
    assert sorted(p.name for p in path.glob("ema*")) == (
        ["ema_rank0.safetensors", "ema_rank1.safetensors"] if stage == 3 else ["ema.safetensors"])
    assert read_trainer_state(path) == {"window": STEPS}
    assembled = {n: read() for n, read in read_ema(path).items()}
    assert assembled.keys() == reference.keys()
    for n in reference:
        close(assembled[n], reference[n], f"{mode}: assembled {n}")
    fresh = EMA(named, decay=DECAY, every=EVERY, zero_stage=stage)
    load_checkpoint(path, adapter, engine=engine, topo=topo, ema=fresh)
    assert fresh.updates == STEPS // EVERY
    assert all(torch.equal(a, b) for a, b in zip(fresh._shadow, ema._shadow)), mode
    dist.barrier()
    if topo.rank == 0:  # what export and eval read: the EMA by default, the trained weights with --no-ema
        for use_ema, expected in ((True, reference), (False, trained)):
            state = checkpoint_state(path, use_ema)
            for n in expected:
                close(state[n]().float(), expected[n], f"{mode}: export state {n} (ema={use_ema})")
        from megaflow.demo.evaluate import load_model

        plain = load_config(str(out / "config.yaml"), ["parallel.zero_stage=0", "parallel.ds_config=null"])
        model = load_model(plain, path, torch.device("cpu"))
        got = {n.replace(".default_0.", ".default."): p for n, p in model.transformer.named_parameters()}
        for n in reference:
            close(got[n].float(), reference[n], f"{mode}: eval {n}")
    dist.barrier()


def main(work: str) -> None:
    work_dir = Path(work)
    topo = init_topology(1, need_distributed=True)
    model_dir = work_dir / "model"
    if topo.rank == 0:
        from megaflow.models.tiny import write_tiny_wan

        write_tiny_wan(model_dir)
    dist.barrier()
    for mode in ("zero3_lora", "zero3_full", "zero2_lora"):
        run(mode, work_dir, model_dir, topo)
    print(f"EMA-ZERO3-OK rank {topo.rank}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
