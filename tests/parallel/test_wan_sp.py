"""Ulysses sequence parallelism of the Wan transformer against the unsharded model (2 gloo ranks)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaflow.parallel.topology import free_port

#: Latent (frames, height, width): 3·4·4 = 48 tokens, and 3·3·3 = 27 tokens, which does not divide by 2.
SHAPES = [(3, 8, 8), (3, 6, 6)]


def _tiny_transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    return model.double()


def _run(x, t, text, model, sp):
    """Velocity, input gradient and parameter gradients of `sum(v * w)` for a fixed weight w."""
    x = x.clone().requires_grad_(True)
    if sp is None:
        v = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    else:
        tokens = sp.valid(model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0], x)
        v = sp.unshard(tokens, x)
    weight = torch.linspace(-1, 1, v.numel(), dtype=v.dtype).reshape(v.shape)
    (v * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return v.detach(), x.grad.detach(), grads


def _worker(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from megaflow.parallel.wan_sp import WanSequenceParallel

        out = []
        for f, h, w in SHAPES:
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(2, 4, f, h, w, generator=gen, dtype=torch.float64)
            t = torch.tensor([900.0, 300.0], dtype=torch.float64)
            text = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
            ref = _run(x, t, text, _tiny_transformer(), None)
            model = _tiny_transformer()
            sp = WanSequenceParallel(model, dist.group.WORLD)
            got = _run(x, t, text, model, sp)
            # Every SP rank back-propagates its own tokens: the ranks' gradients of the (replicated)
            # input and of the parameters add up to the full gradient.
            grad_x = got[1].clone()
            dist.all_reduce(grad_x)
            summed = {}
            for name, g in got[2].items():
                g = g.clone()
                dist.all_reduce(g)
                summed[name] = g
            out.append((ref[0], got[0], ref[1], grad_x, ref[2], summed))
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
    for (f, h, w), (v_ref, v_sp, gx_ref, gx_sp, gp_ref, gp_sp) in zip(SHAPES, out):
        tokens = f * (h // 2) * (w // 2)
        torch.testing.assert_close(v_sp, v_ref, rtol=1e-10, atol=1e-10, msg=f"output, {tokens} tokens")
        torch.testing.assert_close(gx_sp, gx_ref, rtol=1e-10, atol=1e-10, msg=f"input grad, {tokens} tokens")
        assert gp_ref.keys() == gp_sp.keys()
        for name in gp_ref:
            # Parts of diffusers' Wan compute in float32 (timestep projection, FP32LayerNorm), so
            # the float64 comparison holds to float32 rounding there.
            scale = float(gp_ref[name].abs().max())
            assert float((gp_sp[name] - gp_ref[name]).abs().max()) <= 1e-6 * scale, name
