"""EMA of the trainable weights (`megaflow.trainer.ema`): the recurrence, swapping it into the
model, checkpoints (whole and ZeRO-3 shards), and eval / export using it unless told otherwise."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from megaflow.config import load_config, save_config
from megaflow.errors import ConfigError
from megaflow.trainer.ema import EMA, EMA_FILE, describe_weights, ema_info, has_ema, read_ema, weights_used
from megaflow.trainer.state import (COMPLETE_MARKER, check_resumable, load_checkpoint, read_trainer_state,
                                    save_checkpoint)

HERE = Path(__file__).parent


def _named(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("decay, every", [(0.0, 1), (1.0, 1), (1.5, 1), (-0.1, 1), (0.9, 0), (0.9, -2), (0.9, 1.5),
                                          (True, 1)])
def test_decay_and_interval_are_checked(decay, every):
    with pytest.raises(ValueError, match="decay must be|every must be"):
        EMA(_named(nn.Linear(2, 2)), decay=decay, every=every)


def test_update_follows_the_closed_form_recurrence_on_every_kth_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    d, every = 0.9, 2
    ema = EMA(_named(model), decay=d, every=every, zero_stage=0)
    theta = {n: [p.detach().clone()] for n, p in model.named_parameters()}  # θ_0: the EMA's start
    for step in range(1, 8):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.randn_like(p))
        assert ema.update(step) == (step % every == 0)
        if step % every == 0:
            for n, p in model.named_parameters():
                theta[n].append(p.detach().clone())
    assert ema.updates == 3  # steps 2, 4, 6
    state = ema.state_dict()["shadow"]
    for n, values in theta.items():
        k = len(values) - 1
        # ema_k = d^k θ_0 + (1 - d) Σ_{i=1..k} d^(k-i) θ_i, over the counted steps only
        expected = d ** k * values[0] + sum((1 - d) * d ** (k - i) * values[i] for i in range(1, k + 1))
        torch.testing.assert_close(state[n], expected, rtol=1e-6, atol=1e-6)
        assert state[n].dtype == torch.float32


def test_swapped_puts_the_ema_in_and_restores_the_trained_values_exactly():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).to(torch.bfloat16))  # fp32 swap and bf16 backup paths
    ema = EMA(_named(model), decay=0.5, every=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    averaged = {n: t.clone() for n, t in ema.state_dict()["shadow"].items()}
    assert not any(torch.equal(trained[n], averaged[n].to(trained[n].dtype)) for n in trained)
    x = torch.randn(5, 3)
    with ema.swapped():
        assert ema.is_swapped
        for n, p in model.named_parameters():
            assert torch.equal(p, averaged[n].to(p.dtype)), n
        assert all(torch.equal(ema.state_dict()["shadow"][n], averaged[n]) for n in averaged)  # still the EMA
        with pytest.raises(RuntimeError, match="inside EMA.swapped"):
            ema.update(2)
        with pytest.raises(RuntimeError, match="already active"):
            with ema.swapped():
                pass
        model[1](model[0](x).to(torch.bfloat16))  # the model runs on the EMA
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n]), n
    with pytest.raises(KeyError):
        with ema.swapped():
            raise KeyError("an exception inside still restores")
    assert not ema.is_swapped
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    assert all(torch.equal(ema.state_dict()["shadow"][n], averaged[n]) for n in averaged)


# ----------------------------------------------------------------------------- ZeRO-3 layout
def _fake_zero3_params(full: dict[str, torch.Tensor], rank: int, world: int) -> list[tuple[str, nn.Parameter]]:
    """Parameters laid out as DeepSpeed's ZeRO-3 partitions them: each an empty tensor with
    `ds_tensor` = rank's slice of the flattened parameter padded to a multiple of `world`."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    out = []
    for name, t in full.items():
        part = math.ceil(t.numel() / world)
        padded = torch.cat([t.reshape(-1), torch.zeros(part * world - t.numel())])
        p = nn.Parameter(torch.empty(0))
        p.ds_tensor = padded[rank * part:(rank + 1) * part].clone()
        p.ds_shape, p.ds_numel = t.shape, t.numel()
        p.ds_zero_partition_rank, p.ds_zero_partition_world_size = rank, world
        p.ds_status, p.ds_persist = ZeroParamStatus.NOT_AVAILABLE, False
        out.append((name, p))
    return out


def test_zero3_shards_are_exact_and_assemble_into_the_whole_ema(tmp_path):
    """Each rank keeps the EMA of its own partition; the checkpoint's shards assemble into the EMA
    of the whole parameters (padding cut), which eval and export read."""
    torch.manual_seed(2)
    world, d = 3, 0.8
    shapes = {"a.weight": (5, 2), "b.bias": (7,), "c": (2, 3, 2)}  # 10, 7, 12 elements: padded or not
    full = {n: torch.randn(s) for n, s in shapes.items()}
    whole = EMA([(n, nn.Parameter(t.clone())) for n, t in full.items()], decay=d)
    ranks = [EMA(_fake_zero3_params(full, r, world), decay=d, zero_stage=3) for r in range(world)]
    for step in (1, 2):
        new = {n: torch.randn(s) for n, s in shapes.items()}
        with torch.no_grad():
            for p, t in zip(whole._params, new.values()):
                p.copy_(t)
            for r, ema in enumerate(ranks):
                for p, (_, q) in zip(ema._params, _fake_zero3_params(new, r, world)):
                    p.ds_tensor.copy_(q.ds_tensor)
        whole.update(step)
        for ema in ranks:
            ema.update(step)
    for r, ema in enumerate(ranks):
        assert ema.save(tmp_path, rank=r).name == f"ema_rank{r}.safetensors"
    assert not (tmp_path / EMA_FILE).exists() and has_ema(tmp_path)
    assert ema_info(tmp_path)["layout"] == "zero3_partition" and ema_info(tmp_path)["updates"] == 2
    assembled = {n: read() for n, read in read_ema(tmp_path).items()}
    expected = whole.state_dict()["shadow"]
    assert assembled.keys() == expected.keys()
    for n in expected:
        assert assembled[n].shape == expected[n].shape
        torch.testing.assert_close(assembled[n], expected[n], rtol=0, atol=1e-6)
    # each rank reads its own shard back; a shard of another partition is refused
    fresh = EMA(_fake_zero3_params(full, 1, world), decay=d, zero_stage=3)
    fresh.load(tmp_path, rank=1)
    assert all(torch.equal(a, b) for a, b in zip(fresh._shadow, ranks[1]._shadow)) and fresh.updates == 2
    with pytest.raises(ValueError, match="partition 0 of 3"):
        fresh.load(tmp_path, rank=0)
    # swapping writes the partitions (what DeepSpeed gathers from)
    trained = [p.ds_tensor.clone() for p in fresh._params]
    with fresh.swapped():
        assert all(torch.equal(p.ds_tensor, s) for p, s in zip(fresh._params, ranks[1]._shadow))
    assert all(torch.equal(p.ds_tensor, t) for p, t in zip(fresh._params, trained))
    (tmp_path / "ema_rank2.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        read_ema(tmp_path)


def test_zero3_ema_needs_partitioned_parameters():
    with pytest.raises(ValueError, match="after deepspeed.initialize"):
        EMA(_named(nn.Linear(2, 2)), decay=0.9, zero_stage=3)


# ----------------------------------------------------------------------------- checkpoints, eval, export
def _train_steps(adapter, ema: EMA, steps: int) -> None:
    """Stand-in for training: new trainable values after each optimizer step, then the EMA update."""
    gen = torch.Generator().manual_seed(3)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in adapter.trainable_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        ema.update(step)


@pytest.fixture(scope="module", params=[True, False], ids=["lora", "full"])
def ema_run(request, tmp_path_factory, tiny_wan_dir):
    """A single-process checkpoint with an EMA and a trainer state, beside the run's config.yaml."""
    from megaflow.trainer.loop import load_adapter

    lora = request.param
    out = tmp_path_factory.mktemp("ema-run")
    cfg = load_config("tiny", [f"output_dir={out}", f"model.path={tiny_wan_dir}", f"model.lora={str(lora).lower()}"])
    save_config(cfg, out / "config.yaml")
    adapter = load_adapter(cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    ema = EMA(_named(adapter.transformer), decay=0.7, every=1)
    _train_steps(adapter, ema, 3)
    state = {"window": {"start": 4, "size": 2}, "note": "any JSON"}
    path = save_checkpoint(adapter, out, 3, optimizer=optimizer, ema=ema, trainer_state=state)
    trained = {n: p.detach().clone() for n, p in _named(adapter.transformer)}
    averaged = {n: t.clone() for n, t in ema.state_dict()["shadow"].items()}
    return dict(cfg=cfg, path=path, lora=lora, trained=trained, averaged=averaged, state=state, ema=ema)


def test_checkpoint_round_trip_of_the_ema_and_the_trainer_state(ema_run):
    from megaflow.trainer.loop import load_adapter

    path = ema_run["path"]
    meta = json.loads((path / COMPLETE_MARKER).read_text())
    assert meta["ema"] is True
    assert {EMA_FILE, "trainer_state.json"} <= set(meta["files"])  # sizes recorded: a truncated file is caught
    assert read_trainer_state(path) == ema_run["state"]
    saved = load_file(str(path / EMA_FILE))
    assert saved.keys() == ema_run["averaged"].keys()  # by parameter name, like trainable.safetensors
    assert saved.keys() == load_file(str(path / "trainable.safetensors")).keys()
    adapter = load_adapter(ema_run["cfg"], torch.device("cpu"))
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    ema = EMA(_named(adapter.transformer), decay=0.7, every=1)
    assert load_checkpoint(path, adapter, optimizer=optimizer, ema=ema) == 3
    assert ema.updates == 3
    assert all(torch.equal(ema.state_dict()["shadow"][n], t) for n, t in ema_run["averaged"].items())
    assert all(torch.equal(p, ema_run["trained"][n]) for n, p in _named(adapter.transformer))
    # a checkpoint without EMA or trainer state (as written before either existed)
    plain = save_checkpoint(adapter, path.parent.parent / "plain", 1, optimizer=optimizer)
    assert read_trainer_state(plain) == {} and not has_ema(plain) and weights_used(plain) == "trained"
    assert "no EMA" in describe_weights(plain)
    for refuse in (lambda: load_checkpoint(plain, adapter, optimizer=optimizer, ema=ema),
                   lambda: check_resumable(plain, family="wan", lora=ema_run["lora"], zero_stage=0, world_size=1,
                                           sp_size=1, ema=True)):
        with pytest.raises(ConfigError, match=r"has none.*train.ema_decay=null.*megaflow export"):
            refuse()
    check_resumable(path, family="wan", lora=ema_run["lora"], zero_stage=0, world_size=1, sp_size=1, ema=True)
    assert load_checkpoint(plain, adapter, optimizer=optimizer) == 1  # a run without EMA ignores it either way


def test_save_refuses_non_json_state_and_a_swapped_ema(ema_run, tmp_path):
    from megaflow.trainer.loop import load_adapter

    adapter = load_adapter(ema_run["cfg"], torch.device("cpu"))
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    with pytest.raises(TypeError):
        save_checkpoint(adapter, tmp_path, 1, optimizer=optimizer, trainer_state={"x": object()})
    assert not (tmp_path / "checkpoints").exists()
    ema = EMA(_named(adapter.transformer), decay=0.9)
    with ema.swapped(), pytest.raises(RuntimeError, match="inside EMA.swapped"):
        save_checkpoint(adapter, tmp_path, 1, optimizer=optimizer, ema=ema)


@pytest.mark.parametrize("use_ema", [True, False])
def test_eval_loads_the_ema_unless_no_ema(ema_run, use_ema):
    from megaflow.demo.evaluate import load_model

    adapter = load_model(ema_run["cfg"], ema_run["path"], torch.device("cpu"), ema=use_ema)
    expected = ema_run["averaged"] if use_ema else ema_run["trained"]
    assert weights_used(ema_run["path"], use_ema) == ("ema" if use_ema else "trained")
    got = dict(adapter.transformer.named_parameters())
    if ema_run["lora"]:  # load_lora_adapter names the adapter default_0, training "default"
        got = {n.replace(".default_0.", ".default."): p for n, p in got.items()}
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value.to(got[name].dtype), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("use_ema", [True, False])
def test_export_writes_the_ema_unless_no_ema(ema_run, tmp_path, use_ema, caplog):
    from megaflow.trainer.export import export_checkpoint
    from megaflow.trainer.loop import load_adapter

    caplog.set_level("INFO", logger="megaflow")
    out = export_checkpoint(ema_run["path"], tmp_path / "export", ema=use_ema)
    assert ("EMA weights" if use_ema else "raw trained weights") in caplog.text
    cfg = load_config(str(ema_run["path"].parent.parent / "config.yaml"), [f"model.init_weights={out}"])
    adapter = load_adapter(cfg, torch.device("cpu"))  # a new run started from the export
    expected = ema_run["averaged"] if use_ema else ema_run["trained"]
    for name, p in _named(adapter.transformer):
        torch.testing.assert_close(p, expected[name].to(p.dtype), rtol=0, atol=0, msg=name)


def test_cli_flags(ema_run, tmp_path):
    from megaflow.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["export", "x", "--output", "y", "--no-ema"]).no_ema
    assert not parser.parse_args(["export", "x", "--output", "y"]).no_ema
    assert parser.parse_args(["eval", "--config", "demo", "--no-ema"]).no_ema
    res = subprocess.run([sys.executable, "-m", "megaflow", "export", str(ema_run["path"]), "--output",
                          str(tmp_path / "e"), "--no-ema"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "raw trained weights" in res.stdout


# ----------------------------------------------------------------------------- real ZeRO-3
@pytest.mark.slow
def test_zero3_ema_with_deepspeed(tmp_path):
    """2 ranks on the CPU, ZeRO-3 LoRA (persistent parameters) and full fine-tune, and ZeRO-2 LoRA: the
    EMA of each rank's partitions equals the EMA of the whole weights, swapping it in changes what the
    model computes and restores it exactly, and the checkpoint's EMA (ZeRO-3: shards) assembles into
    the whole EMA for export and eval (see ema_zero3_worker.py)."""
    from megaflow.parallel.topology import free_port

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(HERE / "ema_zero3_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("EMA-ZERO3-OK") == 2, proc.stdout[-3000:]
