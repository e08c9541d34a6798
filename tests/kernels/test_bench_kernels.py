"""`megaflow bench kernels`: the quick run writes every row to JSON and appends to the markdown."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megaflow.bench.kernels import PHASES, TRITON_PENDING, main


def test_quick_bench_writes_rows_and_appends_markdown(tmp_path: Path) -> None:
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nearlier results\n", encoding="utf-8")
    out = tmp_path / "bench.json"
    try:
        assert main(["--quick", "--json", str(out), "--markdown", str(md)]) == 0
    finally:
        torch._dynamo.reset()
    data = json.loads(out.read_text(encoding="utf-8"))
    impls = ("eager", "compile") + (("triton",) if torch.cuda.is_available() else ())
    rows = data["rows"]
    assert {(r["impl"], r["phase"], r["batch"]) for r in rows} == {
        (i, p, b) for i in impls for p in PHASES for b in (1, 2)}
    assert len(rows) == len(impls) * len(PHASES) * 2
    for r in rows:
        assert r["shape"] == [4, 3, 8, 10] and r["ms"] > 0 and r["gbps"] > 0 and r["repeats"] >= 1
        if r["impl"] != "eager":
            assert r["max_abs_diff_vs_eager"] < 1e-3
    assert data["meta"]["versions"]["torch"] == torch.__version__
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nearlier results\n")
    section = text.split("## Fused SDE log-prob kernels", 1)[1]
    assert "| latent (per sample) | B | impl | phase |" in section
    assert section.count("| quick 4x3x8x10 |") == len(rows)
    assert (TRITON_PENDING in section) != torch.cuda.is_available()


def test_bench_creates_the_markdown_with_a_header(tmp_path: Path) -> None:
    md = tmp_path / "new.md"
    assert main(["--quick", "--impls", "eager", "--batches", "1", "--repeats", "1", "--markdown", str(md)]) == 0
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n") and text.count("| quick 4x3x8x10 | 1 | eager |") == 2


@pytest.mark.parametrize("argv, message", [
    (["--impls", "cuda"], "unknown cuda"),
    (["--batches", "0"], "positive integers"),
    (["--shapes", "16by21"], "not like 16x21x60x104"),
])
def test_bench_rejects_bad_arguments(argv: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=message):
        main(argv + ["--markdown", str(tmp_path / "unused.md")])
    assert not (tmp_path / "unused.md").exists()
