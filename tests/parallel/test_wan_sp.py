"""Ulysses sequence parallelism of the Wan transformer against the unsharded model (2 gloo ranks):
Wan 2.1 text-to-video and image-to-video, both in one spawn."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaflow.parallel.topology import free_port

#: Latent (frames, height, width): 3·4·4 = 48 tokens, and 3·3·3 = 27 tokens, which does not divide by 2.
SHAPES = [(3, 8, 8), (3, 6, 6)]
#: Tasks run by the workers: (name, model input channels, text tokens).
#: I2V: latent 4 + mask 2 (tiny VAE temporal factor) + image latent 4 channels in, 4 out, and
#: exactly 512 text tokens (diffusers' WanAttnProcessor hard-codes 512 text tokens in the I2V context).
TASKS = [("t2v", 4, 7), ("i2v", 4 + 2 + 4, 512)]
#: Parameters that only the image path reaches; their gradients prove it ran.
I2V_ONLY = ["condition_embedder.image_embedder.ff.net.0.proj.weight", "blocks.0.attn2.add_k_proj.weight",
            "blocks.1.attn2.add_v_proj.weight", "blocks.1.attn2.norm_added_k.weight"]


def _tiny_transformer(task: str):
    """The tiny T2V model, or the tiny I2V model of the research notes (A3)."""
    from diffusers import WanTransformer3DModel

    i2v = dict(in_channels=4 + 2 + 4, image_dim=16, added_kv_proj_dim=32) if task == "i2v" else dict(in_channels=4)
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64, **i2v)
    return model.double()


def _run(x, t, cond, model, sp):
    """Velocity, input gradient and parameter gradients of `sum(v * w)` for a fixed weight w. The
    sharded path takes the real tokens with the model input as `like` (`valid`) and rebuilds the
    4-channel velocity from the noisy latent `x[:, :4]` (`unshard`)."""
    x = x.clone().requires_grad_(True)
    out = model(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
    v = out if sp is None else sp.unshard(sp.valid(out, x), x[:, :4])
    weight = torch.linspace(-1, 1, v.numel(), dtype=v.dtype).reshape(v.shape)
    (v * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return v.detach(), x.grad.detach(), grads


def _refusals(model, x, t, cond) -> list[str]:
    """The messages of the inputs the sharded forward refuses (raised before any collective)."""
    from megaflow.errors import ConfigError

    messages = []
    bad = [dict(timestep=t[:, None].expand(-1, 3), **cond)]
    if "encoder_hidden_states_image" in cond:
        bad.append(dict(cond, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"][:, :16]))
    for kwargs in bad:
        try:
            model(hidden_states=x, return_dict=False, **kwargs)
        except (ConfigError, ValueError) as e:
            messages.append(str(e))
    return messages


def _worker(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from megaflow.parallel.wan_sp import WanSequenceParallel

        out = {}
        for task, channels, text_tokens in TASKS:
            for f, h, w in SHAPES:
                gen = torch.Generator().manual_seed(1)
                x = torch.randn(2, channels, f, h, w, generator=gen, dtype=torch.float64)
                t = torch.tensor([900.0, 300.0], dtype=torch.float64)
                cond = dict(encoder_hidden_states=torch.randn(2, text_tokens, 32, generator=gen, dtype=torch.float64))
                if task == "i2v":
                    cond["encoder_hidden_states_image"] = torch.randn(2, 17, 16, generator=gen, dtype=torch.float64)
                ref = _run(x, t, cond, _tiny_transformer(task), None)
                model = _tiny_transformer(task)
                sp = WanSequenceParallel(model, dist.group.WORLD)
                got = _run(x, t, cond, model, sp)
                # Every SP rank back-propagates its own tokens: the ranks' gradients of the (replicated)
                # input and of the parameters add up to the full gradient (one flat all_reduce).
                grads = [got[1]] + list(got[2].values())
                flat = torch.cat([g.flatten() for g in grads])
                dist.all_reduce(flat)
                grad_x, *parts = [
                    piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)]
                summed = dict(zip(got[2], parts))
                # shard_latent → unshard round trip, with the model input (C_in channels) as `like`.
                round_trip = sp.unshard(sp.shard_latent(ref[0]), x)
                out[f"{task} {f * (h // 2) * (w // 2)} tokens"] = dict(
                    v_ref=ref[0], v_sp=got[0], gx_ref=ref[1], gx_sp=grad_x, gp_ref=ref[2], gp_sp=summed,
                    round_trip=round_trip, refusals=_refusals(model, x, t, cond))
        if rank == 0:
            torch.save(out, path)
        dist.barrier()  # neither rank tears gloo down while the other still uses it (seen: SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_wan_sp2_matches_sp1_output_and_gradients(tmp_path):
    path = str(tmp_path / "out.pt")
    try:
        mp.start_processes(_worker, args=(free_port(), path), nprocs=2, start_method="spawn")
    except mp.ProcessExitedException as e:
        # A worker killed by a signal (not by a failed check, which raises ProcessRaisedException):
        # gloo aborted a rank once in 39 runs on a 2-core AMD EPYC ("terminate called without
        # an active exception"). Run once more; a second crash fails the test.
        if e.signal_name != "SIGABRT":
            raise
        mp.start_processes(_worker, args=(free_port(), path), nprocs=2, start_method="spawn")
    out = torch.load(path, weights_only=True)
    assert len(out) == len(TASKS) * len(SHAPES)
    for case, r in out.items():
        assert r["v_ref"].shape[1] == 4, case
        torch.testing.assert_close(r["v_sp"], r["v_ref"], rtol=1e-10, atol=1e-10, msg=f"output, {case}")
        torch.testing.assert_close(r["gx_sp"], r["gx_ref"], rtol=1e-10, atol=1e-10, msg=f"input grad, {case}")
        torch.testing.assert_close(r["round_trip"], r["v_ref"], rtol=0, atol=0, msg=f"round trip, {case}")
        assert r["gp_ref"].keys() == r["gp_sp"].keys(), case
        for name in r["gp_ref"]:
            # Parts of diffusers' Wan compute in float32 (timestep projection, FP32LayerNorm, and for
            # I2V the image embedder's FP32LayerNorms), so the float64 comparison holds to float32
            # rounding there.
            scale = float(r["gp_ref"][name].abs().max())
            assert float((r["gp_sp"][name] - r["gp_ref"][name]).abs().max()) <= 1e-6 * scale, f"{name}, {case}"
        if case.startswith("i2v"):
            for name in I2V_ONLY:
                assert float(r["gp_ref"][name].abs().max()) > 0, f"the image path got no gradient: {name}, {case}"
        assert any("one timestep per sample" in m for m in r["refusals"]), case
        assert any("exactly 512" in m for m in r["refusals"]) == case.startswith("i2v"), case
