"""Per-rank peak memory of one Wan transformer forward + backward, sp=1 vs sp=2 (CPU RSS).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 1 tests/parallel/measure_sp_memory.py
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/parallel/measure_sp_memory.py

A tiny-width Wan transformer (so weights are negligible) on a 9×64×64 latent: 9,216 video tokens,
where activations dominate. Prints, per rank, the RSS growth during the step (peak RSS after the
step minus the RSS before it, MiB).
"""
from __future__ import annotations

import resource

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel

from megaflow.parallel.wan_sp import WanSequenceParallel


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    dist.init_process_group("gloo")
    sp = dist.get_world_size()
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=512, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    helper = WanSequenceParallel(model, dist.group.WORLD) if sp > 1 else None
    x = torch.randn(2, 4, 9, 64, 64)
    t = torch.tensor([500.0, 500.0])
    text = torch.randn(2, 16, 32)
    model(hidden_states=x[:, :, :1, :8, :8], timestep=t, encoder_hidden_states=text, return_dict=False)
    before = rss_mib()
    out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    if helper is not None:
        out = helper.valid(out, x)
    out.square().mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = 9 * 32 * 32
    print(f"sp={sp} rank={dist.get_rank()} tokens={tokens} rss_before={before:.0f}MiB peak={peak:.0f}MiB "
          f"step_growth={peak - before:.0f}MiB", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
