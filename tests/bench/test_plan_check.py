"""`megaflow.bench.plan_check`: the plan against GPU-measured peaks (bench/gpu.sh)."""
from __future__ import annotations

import json

import pytest


def test_plan_check_compares_the_plan_with_the_largest_gpu_phase_peak(tmp_path):
    """`megaflow.bench.plan_check` (bench/gpu.sh): the plan's device total against the largest
    measured phase peak; a CPU bench row (no GPU peaks) is refused with the reason."""
    from megaflow.bench.plan_check import compare, main

    row = {"recipe": "wan_t2v_1_3b", "model_path": "random:wan2.1_t2v_1.3b", "video": [33, 480, 832],
           "peak_rollout_gib_allocated": 20.0, "peak_update_gib_allocated": 30.0, "peak_decode_gib_allocated": 10.0}
    plan = {"device_total": 33.0 * 2**30}
    result = compare(plan, {"rows": [row]})
    assert result["measured_gib"] == 30.0 and abs(result["error"] - 0.1) < 1e-12
    cpu_row = {**row, **{f"peak_{p}_gib_allocated": None for p in ("rollout", "update", "decode")}}
    with pytest.raises(ValueError, match="CPU"):
        compare(plan, {"rows": [cpu_row]})
    (tmp_path / "p.json").write_text(json.dumps(plan))
    (tmp_path / "b.json").write_text(json.dumps({"rows": [row]}))
    assert main([str(tmp_path / "p.json"), str(tmp_path / "b.json"), "--markdown", str(tmp_path / "m.md")]) == 0
    assert "| wan_t2v_1_3b | random:wan2.1_t2v_1.3b | 33x480x832 | 33.00 | 30.00 | +10.0 % |" in (tmp_path / "m.md").read_text()
