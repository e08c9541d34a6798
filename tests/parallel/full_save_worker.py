"""Worker for test_full_save (2 ranks): a ZeRO-3 full fine-tune of a Wan transformer with many
blocks is saved (a) streamed module by module, as `save_checkpoint` does, and (b) the old way,
gathering the whole transformer on every rank; it reports each one's peak extra memory (the rise
of the process's peak RSS over what it held before) and writes the engine checkpoint that
`megaflow export` reads."""
from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel

from megaflow.config import load_config
from megaflow.models.streaming import save_model_streaming
from megaflow.parallel.engine import gathered, initialize_engine, load_ds_config, zero3_transformer_loader
from megaflow.parallel.topology import Mpu, init_topology
from megaflow.trainer.state import COMPLETE_MARKER, ENGINE_TAG

#: 16 blocks of 4.2 M parameters (16.8 MB in fp32 each): 270 MB of transformer.
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=4,
              text_dim=32, freq_dim=32, ffn_dim=2048, num_layers=16, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", rope_max_seq_len=64)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_extra(fn) -> int:
    """Bytes the process's peak RSS rose above its RSS before `fn()`: freed heap memory is handed
    back first (else `fn` could reuse it unseen), then the peak is reset."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def main(work: str) -> None:
    work_dir = Path(work)
    topo = init_topology(1, need_distributed=True)
    base = work_dir / "base" / "transformer"
    if topo.rank == 0:
        torch.manual_seed(0)
        WanTransformer3DModel(**CONFIG).save_pretrained(base)
    dist.barrier()
    cfg = load_config("tiny", ["parallel.zero_stage=3", "model.lora=false"])
    ds_config, adamw = load_ds_config(cfg, grad_accum_steps=1)
    model = zero3_transformer_loader(ds_config)(WanTransformer3DModel, base, torch.float32).requires_grad_(True)
    params = list(model.parameters())
    engine, _ = initialize_engine(model, params, ds_config, adamw, Mpu(topo))
    block_bytes = sum(p.ds_numel * 4 for p in model.blocks[0].parameters())
    total_bytes = sum(p.ds_numel * 4 for p in params)
    write = topo.rank == 0

    streamed = peak_extra(lambda: save_model_streaming(model, work_dir / "streamed", write=write,
                                                       gather=lambda ps: gathered(ps, 3)))

    def whole() -> None:
        with gathered(params, 3):
            if write:
                model.save_pretrained(work_dir / "whole")

    old = peak_extra(whole)
    checkpoint = work_dir / "checkpoint"
    engine.save_checkpoint(str(checkpoint / "engine"), tag=ENGINE_TAG, save_latest=False)
    peaks = [None] * topo.world_size
    dist.all_gather_object(peaks, {"streamed": streamed, "whole": old})
    if write:
        (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"iteration": 0, "lora": False, "deepspeed": True,
                                                              "files": {}}))
        print("RESULT " + json.dumps({"peaks": peaks, "block_bytes": block_bytes, "total_bytes": total_bytes}),
              flush=True)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
