"""`megaflow bench kernels`: time the fused SDE log-prob (Triton, eager torch, torch.compile).

For each latent shape and batch size it measures the forward and forward+backward of
`kind=flow_grpo` with `mean_ref` (loss `log_prob + 0.04·kl`), reporting the median time, the
achieved bandwidth (bytes a fused pass must move: the forward reads x, v, x_next, mean_ref; the
backward reads them again and writes dL/dv) and the peak memory beyond the inputs.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megaflow.kernels import sde_log_prob, sde_log_prob_torch
from megaflow.kernels.logprob import triton_import_error

SHAPES = {"wan-480x832x81": (16, 21, 60, 104), "hunyuan-720x1280x129": (16, 33, 90, 160)}
QUICK_SHAPES = {"quick": (4, 3, 8, 10)}
IMPLS = ("triton", "eager", "compile")
PHASES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KIND, SIGMA, SIGMA_NEXT, NOISE_LEVEL, KL_BETA = "flow_grpo", 0.7, 0.65, 0.7, 0.04
TRITON_PENDING = "Triton rows need a CUDA GPU; pending."
CPU_BIG_ELEMENTS = 20_000_000


@dataclass
class Row:
    """One measurement: `ms` is the median over `repeats` timed calls after warm-up."""

    shape_name: str
    shape: list[int]
    batch: int
    impl: str
    phase: str
    ms: float
    ms_min: float
    gbps: float
    peak_extra_mib: float | None
    first_call_s: float
    repeats: int
    max_abs_diff_vs_eager: float | None


def _parse_shapes(text: str | None, quick: bool) -> dict[str, tuple[int, ...]]:
    """`"16x21x60x104,16x33x90x160"` -> named per-sample latent shapes (defaults: Wan and HunyuanVideo)."""
    if not text:
        return dict(QUICK_SHAPES if quick else SHAPES)
    names = {dims: name for name, dims in SHAPES.items()}
    shapes = {}
    for item in text.split(","):
        try:
            dims = tuple(int(d) for d in item.strip().lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not like 16x21x60x104") from None
        if not dims or min(dims) < 1:
            raise SystemExit(f"--shapes: {item!r} needs positive sizes")
        shapes[names.get(dims, "x".join(map(str, dims)))] = dims
    return shapes


def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{flag}: expected positive integers, got {text!r}")
    return values


class PeakMemory:
    """Peak memory allocated beyond what was live on entry, in bytes (`extra`; None if unknown).

    CUDA: `torch.cuda.max_memory_allocated` minus the allocation on entry. CPU: peak resident set
    (VmHWM, reset through /proc/self/clear_refs; else RSS sampled every 0.5 ms) minus the RSS on
    entry, after `malloc_trim` returns freed heap pages; this counts allocator slack too.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra: int | None = None
        self._base = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._sampled = 0
        self._thread: threading.Thread | None = None

    @staticmethod
    def cpu_method() -> str:
        """How CPU peaks are measured here, in words."""
        if _proc_status("VmRSS") is None:
            return "unavailable (no /proc/self/status)"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "peak RSS (VmHWM reset via /proc/self/clear_refs) minus RSS before the call, after malloc_trim"
        except OSError:
            return "peak RSS (sampled every 0.5 ms from /proc/self/status) minus RSS before the call, after malloc_trim"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        base = _proc_status("VmRSS")
        if base is None:
            return self
        self._base = base
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_reset = True
        except OSError:
            self._sampled = base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _proc_status("VmRSS") or 0)
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._hwm_reset:
            self.extra = max(0, (_proc_status("VmHWM") or 0) - self._base)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.extra = max(0, max(self._sampled, _proc_status("VmRSS") or 0) - self._base)


def _proc_status(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes, or None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(shape: tuple[int, ...], batch: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Random `[batch, *shape]` latents: x, v, x_next, mean_ref."""
    g = torch.Generator(device=device).manual_seed(0)
    full = (batch,) + tuple(shape)
    return {name: torch.randn(full, generator=g, device=device, dtype=torch.float32).to(dtype)
            for name in ("x", "v", "x_next", "mean_ref")}


def _impl_fn(impl: str) -> Callable[..., object]:
    if impl == "eager":
        return sde_log_prob_torch
    if impl == "compile":
        torch._dynamo.reset()
        return torch.compile(sde_log_prob_torch, dynamic=False)
    return lambda *args, **kwargs: sde_log_prob(*args, backend="triton", **kwargs)


def _call(fn: Callable[..., object], t: dict[str, torch.Tensor], backward: bool) -> torch.Tensor:
    """One forward (no grad) or forward+backward; returns the detached log_prob `[B]`."""
    if not backward:
        with torch.no_grad():
            out = fn(KIND, t["x"], t["v"], t["x_next"], SIGMA, SIGMA_NEXT, noise_level=NOISE_LEVEL,
                     mean_ref=t["mean_ref"])
        return out.log_prob
    v = t["v"].detach().requires_grad_(True)
    out = fn(KIND, t["x"], v, t["x_next"], SIGMA, SIGMA_NEXT, noise_level=NOISE_LEVEL, mean_ref=t["mean_ref"])
    (out.log_prob + KL_BETA * out.kl).sum().backward()
    return out.log_prob.detach()


def measure(impl: str, shape_name: str, shape: tuple[int, ...], batch: int, dtype: torch.dtype,
            device: torch.device, repeats: int, warmup: int, eager_logp: dict[str, torch.Tensor]) -> list[Row]:
    """Forward and forward+backward rows for one implementation at one shape and batch size."""
    t = _inputs(shape, batch, dtype, device)
    numel, esize = t["x"].numel(), t["x"].element_size()
    fn = _impl_fn(impl)
    rows = []
    for phase in PHASES:
        backward = phase != "forward"
        _sync(device)
        start = time.perf_counter()
        logp = _call(fn, t, backward)
        _sync(device)
        first = time.perf_counter() - start
        for _ in range(max(0, warmup - 1)):
            _call(fn, t, backward)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            _call(fn, t, backward)
            _sync(device)
            times.append(time.perf_counter() - start)
        with PeakMemory(device) as mem:
            _call(fn, t, backward)
        if impl == "eager":
            eager_logp[phase] = logp
            diff = None
        else:
            diff = (logp.double() - eager_logp[phase].double()).abs().max().item() if phase in eager_logp else None
        moved = numel * esize * (9 if backward else 4)
        median = statistics.median(times)
        rows.append(Row(shape_name, list(shape), batch, impl, phase, median * 1e3, min(times) * 1e3,
                        moved / median / 1e9, None if mem.extra is None else mem.extra / 2**20, first, repeats, diff))
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception:
        versions["triton"] = "not importable"
    return versions


def format_table(rows: list[Row]) -> list[str]:
    """Markdown table lines; `vs eager` is the eager median time over this row's."""
    eager = {(r.shape_name, r.batch, r.phase): r.ms for r in rows if r.impl == "eager"}
    lines = ["| latent (per sample) | B | impl | phase | median ms | GB/s | vs eager | peak extra MiB |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        base = eager.get((r.shape_name, r.batch, r.phase))
        speed = f"{base / r.ms:.2f}x" if base else "-"
        mem = "n/a" if r.peak_extra_mib is None else f"{r.peak_extra_mib:.0f}"
        shape = f"{r.shape_name} {'x'.join(map(str, r.shape))}"
        lines.append(f"| {shape} | {r.batch} | {r.impl} | {r.phase} | {r.ms:.2f} | {r.gbps:.1f} | {speed} | {mem} |")
    return lines


def _markdown_section(meta: dict, rows: list[Row], notes: list[str]) -> str:
    lines = [f"## Fused SDE log-prob kernels, {meta['date']}", "",
             f"- command: `{meta['command']}`",
             f"- device: {meta['device']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- workload: kind={KIND} with mean_ref, loss log_prob + {KL_BETA}·kl, inputs {meta['dtype']}, "
             f"median of {meta['repeats']} timed calls after {meta['warmup']} warm-up",
             "- GB/s: bytes a fused pass moves (forward reads x, v, x_next, mean_ref; backward reads them "
             "again and writes dL/dv) over the median time",
             f"- peak extra memory: {meta['memory_method']}",
             "- compile: `torch.compile(sde_log_prob_torch, dynamic=False)`; the reference's host-side checks "
             "(sigma order, std > 0) are graph breaks"]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines + [""] + format_table(rows)) + "\n"


def _append_markdown(path: Path, section: str) -> None:
    if not path.exists() or not path.read_text(encoding="utf-8").strip():
        path.write_text("# Benchmarks\n\nMeasured results, newest last; each section was appended by the "
                        "command it names.\n", encoding="utf-8")
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + section)


def main(argv: list[str] | None = None) -> int:
    """Run the kernel benchmark; print a table, write JSON (--json) and append to --markdown."""
    parser = argparse.ArgumentParser(prog="megaflow bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help="per-sample latent shapes CxTxHxW, comma-separated "
                        "(default: Wan 480x832x81 16x21x60x104 and HunyuanVideo 720x1280x129 16x33x90x160)")
    parser.add_argument("--batches", help="batch sizes, comma-separated (default 1,4; 1,2 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default 20 on CUDA; on CPU 5, "
                        "3 above 20M elements)")
    parser.add_argument("--warmup", type=int,
                        help="untimed calls first, the first one compiles (default 3 CUDA, 1 CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="input dtype (default float32)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="subset of triton,eager,compile")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", type=Path, help="write the rows and metadata as JSON here")
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"),
                        help="append a section to this markdown file (default BENCHMARKS.md)")
    parser.add_argument("--no-markdown", action="store_true", help="do not append to the markdown file")
    parser.add_argument("--quick", action="store_true", help="a small smoke size (4x3x8x10, batch 1 and 2)")
    args = parser.parse_args(argv)

    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats: expected a positive integer, got {args.repeats}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    shapes = _parse_shapes(args.shapes, args.quick)
    batches = _parse_ints(args.batches or ("1,2" if args.quick else "1,4"), "--batches")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"--impls: unknown {', '.join(unknown)}; choose from {', '.join(IMPLS)}")
    notes = []
    if "triton" in impls and device.type != "cuda":
        impls.remove("triton")
        notes.append(f"Running on CPU: torch paths only (eager, compile). {TRITON_PENDING}")
    elif "triton" in impls and triton_import_error() is not None:
        impls.remove("triton")
        notes.append(f"triton does not import ({triton_import_error()}): Triton rows skipped.")
    if not impls:
        raise SystemExit("--impls: nothing left to run on this device")
    impls.sort(key=lambda i: (i != "eager", IMPLS.index(i)))  # eager first: the others are checked against it
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    dtype = DTYPES[args.dtype]
    memory_method = ("torch.cuda.max_memory_allocated minus the allocation on entry (inputs); forward+backward "
                     "includes dL/dv" if device.type == "cuda" else PeakMemory.cpu_method())
    for note in notes:
        print(note)

    rows: list[Row] = []
    big = False
    for shape_name, shape in shapes.items():
        for batch in batches:
            elements = batch * int(torch.tensor(shape).prod())
            big = big or elements > CPU_BIG_ELEMENTS
            repeats = args.repeats or (20 if device.type == "cuda" else (3 if elements > CPU_BIG_ELEMENTS else 5))
            eager_logp: dict[str, torch.Tensor] = {}
            for impl in impls:
                print(f"  {shape_name} B={batch} {impl} ...", file=sys.stderr, flush=True)
                rows.extend(measure(impl, shape_name, shape, batch, dtype, device, repeats, warmup, eager_logp))

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "megaflow bench kernels" + ("" if not argv else " " + " ".join(argv)),
        "device": _device_name(device),
        "versions": _versions(),
        "dtype": args.dtype,
        "repeats": str(args.repeats) if args.repeats else ("20" if device.type == "cuda" else
                                                            "5 (3 above 20M elements)" if big else "5"),
        "warmup": warmup,
        "memory_method": memory_method,
        "notes": notes,
    }
    table = format_table(rows)
    print("\n".join(table))
    print(f"peak extra memory: {memory_method}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if not args.no_markdown:
        _append_markdown(args.markdown, _markdown_section(meta, rows, notes))
        print(f"appended to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
