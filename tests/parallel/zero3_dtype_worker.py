"""Worker for test_zero3_dtypes (2 ranks): builds the ZeRO-3 trainer in fp32 and in bf16 and
compares every gathered parameter and buffer with a plain `from_pretrained` of the same dtype;
runs one bf16 iteration and prints its metrics."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel

import megaflow.trainer.loop as loop
from megaflow.config import load_config


def compare(trainer: loop.Trainer, model_dir: str, dtype: torch.dtype) -> dict:
    """Parameters and buffers of the ZeRO-3 transformer that differ from a plain load, by dtype or value."""
    plain = WanTransformer3DModel.from_pretrained(Path(model_dir) / "transformer", torch_dtype=dtype)
    ours = trainer.adapter.transformer
    plain_params = dict(plain.named_parameters())
    report = {"params": 0, "fp32_params": 0, "dtype_mismatch": [], "value_mismatch": [], "buffer_mismatch": []}
    for name, param in ours.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        ref = plain_params[key]
        with deepspeed.zero.GatheredParameters([param]):
            report["params"] += 1
            report["fp32_params"] += int(param.ds_tensor.dtype == torch.float32)
            if param.dtype != ref.dtype or param.ds_tensor.dtype != ref.dtype:
                report["dtype_mismatch"].append([name, str(param.ds_tensor.dtype), str(ref.dtype)])
            elif not torch.equal(param.data, ref.data):
                report["value_mismatch"].append(name)
    plain_buffers = dict(plain.named_buffers())
    for name, buf in ours.named_buffers():
        ref = plain_buffers[name]
        if buf.dtype != ref.dtype or not torch.equal(buf, ref):
            report["buffer_mismatch"].append([name, str(buf.dtype), str(ref.dtype)])
    report["plain_fp32_params"] = sum(int(p.dtype == torch.float32) for p in plain.parameters())
    return report


def main(model_dir: str, output_dir: str) -> None:
    results = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = load_config("tiny", [f"train.precision={precision}", "train.iterations=1", "train.sample_every=0",
                                   "parallel.zero_stage=3", f"model.path={model_dir}",
                                   f"output_dir={output_dir}/{precision}"])
        trainer = loop.Trainer(cfg, show_progress=False)
        results[precision] = compare(trainer, model_dir, dtype)
        if precision == "bf16":
            results["bf16_metrics"] = trainer.run_iteration(0)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
