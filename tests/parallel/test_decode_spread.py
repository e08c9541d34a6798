"""VAE decoding spread over an SP group (`megaflow.parallel.decode`), 2 gloo ranks, tiny Wan."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaflow.parallel.decode import sample_shares, spread_decode
from megaflow.parallel.topology import free_port

#: Latents `[3, C, F, h, w]` of the tiny Wan model: a chunk of 3 samples over 2 ranks (2 + 1).
SHAPE = (3, 4, 3, 8, 8)


def _latents() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def _load(folder: str):
    from megaflow.models.wan import WanAdapter

    return WanAdapter.from_pretrained(folder, dtype=torch.float32, device="cpu", text_encoders=False)


def _worker(rank: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group = dist.new_group([0, 1])
        adapter = _load(folder)
        decoded: list[int] = []

        def decode(z: torch.Tensor) -> torch.Tensor:
            decoded.append(z.shape[0])
            return adapter.decode(z)

        z = _latents()
        result = {"chunk": spread_decode(decode, z, group),
                  # fewer samples than ranks: the second rank has nothing to decode
                  "one": spread_decode(decode, z[:1], group),
                  # bf16 videos (a bf16 run's VAE dtype) travel through gloo unchanged
                  "bf16": spread_decode(lambda x: adapter.decode(x).to(torch.bfloat16), z, group),
                  "decoded": decoded}
        torch.save(result, f"{out}.{rank}")
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


def test_sample_shares():
    assert sample_shares(3, 2) == [range(0, 2), range(2, 3)]
    assert sample_shares(1, 2) == [range(0, 1), range(1, 1)]
    assert sample_shares(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


def test_spread_decode_equals_one_rank_bitwise(tmp_path, tiny_wan_dir):
    torch.set_num_threads(1)
    expected = _load(tiny_wan_dir).decode(_latents())  # one rank decoding the whole chunk
    assert expected.shape == (3, 5, 3, 16, 16)
    out = str(tmp_path / "videos.pt")
    # forked ranks inherit the imported diffusers (spawned ones spent ~30 s each importing it here)
    mp.start_processes(_worker, args=(free_port(), str(tiny_wan_dir), out), nprocs=2, start_method="fork")
    leader, other = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    # each rank decoded only its share: chunk of 3 → 2 + 1, chunk of 1 → 1 + 0
    assert leader["decoded"] == [2, 1] and other["decoded"] == [1]
    assert other["chunk"] is None and other["one"] is None and other["bf16"] is None
    # exact: the adapter decodes one sample at a time, so batching and rank never change a video
    assert torch.equal(leader["chunk"], expected)
    assert torch.equal(leader["one"], expected[:1])
    assert leader["bf16"].dtype == torch.bfloat16 and torch.equal(leader["bf16"], expected.to(torch.bfloat16))
