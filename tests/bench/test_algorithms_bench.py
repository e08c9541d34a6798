"""`megaflow bench algorithms`: the summary arithmetic (time ratios to dance_grpo, reward at equal
wall-clock, held-out gain) and the files it writes, on recorded runs; the training and evaluation it
calls are the trainer's and `megaflow eval`'s own, tested in tests/trainer and tests/demo."""
import json
import math

import pytest

import megaflow.bench.algorithms as bench
from megaflow.bench.algorithms import RunResult, summarize


def run(variant, seed, rewards, seconds, evaluated, purity=0.9):
    history = [{"reward/mean": r, "time/iteration_s": s, "nfe/rollout_per_sample": 8.0, "nfe/train_per_sample": 4.0,
                "policy/ratio_max_dev": 0.0}
               for r, s in zip(rewards, seconds)]
    return RunResult(variant, seed, history, evaluated, {"shapes": evaluated, "shapes/color": 0.5,
                                                         "quality/purity": purity}, sum(seconds))


BASE = {"overall": 0.4, "shapes/color": 0.3, "quality/purity": 0.95}


def test_summary_ratios_equal_time_reward_and_gain():
    runs = [run("dance_grpo", 0, [0.1, 0.2, 0.3, 0.4], [9.0, 4.0, 4.0, 4.0], 0.50),
            run("dance_grpo", 1, [0.1, 0.2, 0.3, 0.5], [9.0, 4.0, 4.0, 4.0], 0.60),
            run("mix_grpo", 0, [0.2, 0.3, 0.5, 0.6], [5.0, 2.0, 2.0, 2.0], 0.70, purity=0.80),
            run("mix_grpo", 1, [0.2, 0.4, 0.5, 0.7], [5.0, 2.0, 2.0, 2.0], 0.80, purity=0.70)]
    rows = {r["variant"]: r for r in summarize(runs, BASE)}
    assert rows["dance_grpo"]["time_ratio"] == 1.0 and rows["mix_grpo"]["time_ratio"] == 0.5  # first iteration excluded
    # the fastest variant trained 11 s in all: dance_grpo had finished only its first iteration by then
    assert rows["mix_grpo"]["equal_time_s"] == 11.0
    assert rows["dance_grpo"]["reward_at_equal_time"] == pytest.approx(0.1)
    assert rows["mix_grpo"]["reward_at_equal_time"] == pytest.approx(0.65)
    assert rows["mix_grpo"]["eval"] == pytest.approx(0.75) and rows["mix_grpo"]["eval_gain"] == pytest.approx(0.35)
    assert rows["mix_grpo"]["eval_sd"] == pytest.approx(math.sqrt(0.005))
    assert rows["dance_grpo"]["train_reward_last"] == pytest.approx((0.2 + 0.3 + 0.4 + 0.2 + 0.3 + 0.5) / 6)
    # the faster, higher-reward variant hacks: its purity fell 0.2 below the base model's, and the table says so
    assert rows["mix_grpo"]["quality_drop"] == pytest.approx(0.2)
    assert rows["dance_grpo"]["quality_drop"] == pytest.approx(0.05)
    table = bench.format_table(list(rows.values()), BASE)
    assert table[0].endswith("| color | purity | largest quality fall |")
    assert table[3].endswith("| 0.500 | 0.750 | +0.200 |")


def test_main_writes_json_and_appends_markdown(tmp_path, monkeypatch):
    recorded = []

    def fake_run(name, seed, iterations, output, overrides, samples, eval_seed):
        recorded.append((name, seed, iterations, tuple(overrides)))
        return run(name, seed, [0.1, 0.2], [2.0, 1.0 if name == "dance_grpo" else 0.5], 0.5 + seed / 10)

    monkeypatch.setattr(bench, "run_variant", fake_run)
    monkeypatch.setattr(bench, "base_score", lambda overrides, samples, seed: BASE)
    md = tmp_path / "B.md"
    assert bench.main(["--algorithms", "dance_grpo,mix_grpo", "--guard", "--seeds", "0,1", "--iterations", "2",
                       "--output", str(tmp_path / "out"), "--markdown", str(md), "--set", "train.lr=1e-4"]) == 0
    assert [r[0] for r in recorded] == ["dance_grpo"] * 2 + ["mix_grpo"] * 2 + ["dance_grpo+guard"] * 2 + ["mix_grpo+guard"] * 2
    assert all(r[2] == 2 and r[3] == ("train.lr=1e-4",) for r in recorded)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["variant"] for r in result["rows"]][:2] == ["dance_grpo", "mix_grpo"]
    assert result["rows"][1]["time_ratio"] == 0.5
    text = md.read_text()
    assert "max |ratio − 1| over all runs = 0.0e+00" in text
    assert "## Algorithms on the demo world" in text and "| mix_grpo+guard | 2 |" in text and "0.50x" in text
    assert bench.variant_overrides("g2rpo+guard") == ("demo_g2rpo", ["algorithm.loss=grpo_guard"])
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.main(["--algorithms", "mix_grop"])
