"""Worker for test_full_save: `megaflow export`'s full fine-tune path on the ZeRO-3 checkpoint that
full_save_worker wrote, in a process of its own; prints its peak extra anonymous memory (sampled
every millisecond; the memory-mapped shards are page cache, not counted)."""
from __future__ import annotations

import ctypes
import json
import sys
import threading
import time
from pathlib import Path

from megaflow.trainer.export import _export_full, consolidated_state


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def main(work: str) -> None:
    work_dir = Path(work)
    checkpoint = work_dir / "checkpoint"
    state = consolidated_state(checkpoint)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before, peak, done = _rss_anon(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _export_full(checkpoint, state, work_dir / "base" / "transformer", work_dir / "exported")
    done.set()
    sampler.join()
    print("RESULT " + json.dumps({"export_extra": max(peak[0], _rss_anon()) - before}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
