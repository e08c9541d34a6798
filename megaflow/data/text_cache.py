"""Precomputed prompt embeddings: `megaflow preprocess` encodes a recipe's prompts once, and
training (`data.text_cache`) reads them instead of loading the text encoders.

A cache folder holds the embeddings of one text encoding (one `ModelAdapter.text_fingerprint`:
family, frozen dtype, encoder configs, tokenizer files, template, crop, length):

    PATH/fingerprint.json        the fingerprint the embeddings were made with
    PATH/index.json              key → shard (and the prompt or image it came from), rebuilt from the
                                 shards' headers by rank 0 after every writing run
    PATH/shards/*.safetensors    one file per rank and writing run (≤ 1024 entries / 256 MiB each)

Keys are content addresses: `sha256(fingerprint hash, "text", prompt)` for a prompt and
`sha256(fingerprint hash, "image", shape, pixels)` for a conditioning image (the float pixels the
trainer loads at the video size), so editing, reordering or extending the prompt file never
misaligns anything, and a prompt shared by several files is stored once.

Tensors of an entry, in the frozen dtype the adapter's `encode_prompts` returns (bf16 for a
`train.precision=bf16` run, fp32 otherwise: a cached embedding is then bit-identical to the online
one, and a cache is only used with the dtype it was made in):

- `{key}.embeds [n, D]`: the prompt's tokens only. Families that zero the embeddings past a
  prompt's end (Wan) store the rows up to the last nonzero one and get zeros back, which is
  lossless. Families whose transformer masks the padding out (`text_padding_masked`: HunyuanVideo)
  store the `n` masked-in rows; the padding comes back as zeros with the mask `arange(L) < n`,
  which the transformer cannot tell apart (it never reads masked embeddings). Families that attend
  to every padded token (FLUX, SD3) keep them all.
- `{key}.pooled [P]` when the family has a pooled vector; `{key}.mask [L]` when the mask cannot be
  rebuilt from the length (none of today's families).
- `{key}.image [...]`: an I2V family's image-encoder output (`cached_image_key`: Wan I2V's CLIP-vision
  embeddings). The VAE latents of the image (Wan I2V's latent condition, SkyReels' image latents) are
  not cached: they depend on the video size and frame count, are large float32 latent videos, and the
  VAE is loaded for decoding anyway.

Every file is written to a temporary name and renamed into place (`os.replace`), so a reader sees a
whole file or none; an interrupted run leaves shards that the next run's index merge picks up.
Under `torchrun` / `deepspeed` rank r encodes every world-th item and writes its own shards; rank 0
merges the index after a barrier (the folder must be shared by the ranks, as a run's output folder is).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megaflow.errors import ConfigError, DataError
from megaflow.models.base import TextConditioning

if TYPE_CHECKING:
    from megaflow.config import Config
    from megaflow.data.prompts import PromptSet
    from megaflow.models.base import ModelAdapter

log = logging.getLogger("megaflow")

FORMAT = "megaflow-text-cache/1"
FINGERPRINT_FILE = "fingerprint.json"
INDEX_FILE = "index.json"
SHARDS_DIR = "shards"
#: A shard is written once it holds this many entries or bytes.
SHARD_ENTRIES = 1024
SHARD_BYTES = 256 * 2**20
#: Prompts per `encode_prompts` call in `megaflow preprocess`.
DEFAULT_BATCH_SIZE = 8


class TextCacheError(DataError):
    """A text cache that cannot serve this run: another encoding, or missing prompts."""


class TextCacheMissing(TextCacheError):
    """Prompts (or images) the cache does not hold."""


# ---- keys and fingerprints -------------------------------------------------------------
def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """sha256 of the fingerprint's canonical JSON."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def text_key(fp_hash: str, prompt: str) -> str:
    """The content key of a prompt's embeddings under the encoding `fp_hash`."""
    return hashlib.sha256(f"{fp_hash}\0text\0{prompt}".encode()).hexdigest()[:32]


def image_key(fp_hash: str, image: torch.Tensor) -> str:
    """The content key of a conditioning image `[3, H, W]` (the float pixels the encoder sees)."""
    pixels = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"{fp_hash}\0image\0{tuple(pixels.shape)}\0".encode())
    h.update(memoryview(pixels.numpy()).cast("B"))
    return h.hexdigest()[:32]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_differences(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one readable line each (`max_sequence_length: cache 16,
    this run 8`; `tokenizer/tokenizer.json: different file`)."""
    a, b = _flatten(cached), _flatten(current)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        group, _, name = key.partition(".")
        if group == "files":
            what = ("not in the cache's model" if key not in a else "not in this run's model" if key not in b
                    else "different file content")
            lines.append(f"{name}: {what}")
        elif group == "weights":
            lines.append(f"weight file {name}: size in the cache's model {a.get(key)}, in this run's {b.get(key)}")
        else:
            lines.append(f"{name or group}: cache {a.get(key)!r}, this run {b.get(key)!r}")
    return lines


# ---- atomic files ----------------------------------------------------------------------
def _tmp(path: Path) -> Path:
    """A hidden temporary name next to `path` (never matched by `*.json` / `*.safetensors`)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and `os.replace`."""
    tmp = _tmp(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- packing one prompt ----------------------------------------------------------------
def pack_text(text: TextConditioning, i: int, *, masked: bool) -> dict[str, torch.Tensor]:
    """Row `i` of a text branch as the tensors a shard stores (see the module docstring)."""
    embeds = text.embeds[i].detach().cpu()
    out: dict[str, torch.Tensor] = {}
    if masked and text.mask is not None:
        mask = text.mask[i].detach().cpu().ne(0)
        n = int(mask.sum())
        if not bool(mask[:n].all()):  # not a prefix: keep the mask and every row
            n = embeds.shape[0]
            out["mask"] = text.mask[i].detach().cpu().clone()
    else:
        rows = embeds.reshape(embeds.shape[0], -1).ne(0).any(dim=1).nonzero()
        n = int(rows[-1]) + 1 if len(rows) else 0
        if text.mask is not None:
            out["mask"] = text.mask[i].detach().cpu().clone()
    out["embeds"] = embeds[:n].clone()
    if text.pooled is not None:
        out["pooled"] = text.pooled[i].detach().cpu().clone()
    return out


@dataclass
class Layout:
    """What every text entry of a cache shares: the padded length `L` and the mask's dtype (None:
    the family has no mask; rebuilt as `arange(L) < n` for masked families)."""

    length: int
    mask_dtype: str | None

    @classmethod
    def of(cls, text: TextConditioning) -> "Layout":
        return cls(int(text.embeds.shape[1]), None if text.mask is None else str(text.mask.dtype).removeprefix("torch."))

    def to_json(self) -> dict[str, Any]:
        return {"length": self.length, "mask_dtype": self.mask_dtype}


# ---- the cache -------------------------------------------------------------------------
@dataclass
class Item:
    """One thing to cache: a prompt (`kind="text"`) or a conditioning image (`kind="image"`,
    `source` its path, `pixels` once loaded)."""

    kind: str
    source: str
    key: str = ""
    pixels: torch.Tensor | None = field(default=None, repr=False)


class TextCache:
    """One cache folder, opened for the encoding `fingerprint` (`ModelAdapter.text_fingerprint`)."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any], *, masked: bool = False) -> None:
        self.folder = Path(folder).expanduser()
        self.fingerprint = fingerprint
        self.hash = fingerprint_hash(fingerprint)
        self.masked = masked
        self.entries: dict[str, dict[str, str]] = {}
        self.layout: Layout | None = None
        self._handles: dict[str, Any] = {}

    @classmethod
    def for_adapter(cls, folder: str | Path, adapter: "ModelAdapter", *, create: bool) -> "TextCache":
        """The cache at `folder` for `adapter`'s encoding (no encoder weights needed); `create`
        makes the folder if it has no cache yet. `TextCacheError` for another encoding's cache."""
        cache = cls(folder, adapter.text_fingerprint(), masked=adapter.text_padding_masked)
        cache.check_fingerprint(create=create)
        cache.reload()
        return cache

    @property
    def shards_dir(self) -> Path:
        return self.folder / SHARDS_DIR

    def check_fingerprint(self, *, create: bool) -> None:
        """`TextCacheError` unless the folder's fingerprint is this encoding's (naming what differs);
        a folder without one is created (`create`) or an error."""
        path = self.folder / FINGERPRINT_FILE
        if not path.is_file():
            if not create:
                raise TextCacheError(
                    f"data.text_cache={self.folder} holds no text cache (no {FINGERPRINT_FILE}); write it with "
                    f"`megaflow preprocess` and this run's --config / --set options, or set "
                    f"data.text_cache_missing=fill to encode the prompts at start-up")
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"format": FORMAT, "fingerprint": self.fingerprint}, indent=1,
                                          sort_keys=True) + "\n")
            return
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("format") != FORMAT:
                raise ValueError(f"format {stored.get('format')!r}, expected {FORMAT!r}")
            cached = stored["fingerprint"]
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise TextCacheError(f"{path} is not a megaflow text cache fingerprint ({exc}); point data.text_cache "
                                 "at a folder `megaflow preprocess` wrote, or at a new folder") from exc
        if cached != self.fingerprint:
            diff = fingerprint_differences(cached, self.fingerprint)
            raise TextCacheError(
                f"the text cache {self.folder} was made with another text encoding than this run's model: "
                + "; ".join(diff) + ". Its embeddings would not be this model's: use another data.text_cache "
                "folder for this model and settings (`megaflow preprocess` fills it), or delete this one")

    # ---- index -------------------------------------------------------------------------
    def reload(self) -> None:
        """Read `index.json` (an absent index is an empty cache)."""
        path = self.folder / INDEX_FILE
        if not path.is_file():
            self.entries, self.layout = {}, None
            return
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TextCacheError(f"cannot read {path} ({exc}); rerun `megaflow preprocess`, which rebuilds it") from exc
        if index.get("fingerprint") != self.hash:
            raise TextCacheError(f"{path} belongs to another encoding than {self.folder / FINGERPRINT_FILE}; "
                                 "rerun `megaflow preprocess`, which rebuilds it from the shards")
        self.entries = index.get("entries", {})
        layout = index.get("layout")
        self.layout = None if layout is None else Layout(int(layout["length"]), layout["mask_dtype"])

    def merge_index(self) -> None:
        """Rebuild `index.json` from the index and the shards' headers (rank 0, after every writer
        finished): entries of shards that are gone are dropped, new shards added (first one wins)."""
        from safetensors import safe_open

        self.reload()
        present = {p.name for p in self.shards_dir.glob("*.safetensors")}
        entries = {k: e for k, e in self.entries.items() if e["shard"] in present}
        known = {e["shard"] for e in entries.values()}
        layout = self.layout
        for name in sorted(present - known):
            with safe_open(str(self.shards_dir / name), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("fingerprint") != self.hash:
                raise TextCacheError(f"shard {self.shards_dir / name} was written for another encoding; "
                                     "remove it (or the whole cache folder) and rerun `megaflow preprocess`")
            if meta.get("layout"):
                shard_layout = Layout(**json.loads(meta["layout"]))
                if layout is not None and shard_layout != layout:
                    raise TextCacheError(f"shard {self.shards_dir / name} has layout {shard_layout}, the cache {layout}")
                layout = shard_layout
            for key, (kind, source) in json.loads(meta["entries"]).items():
                entries.setdefault(key, {"shard": name, "kind": kind, "source": source})
        index = {"format": FORMAT, "fingerprint": self.hash, "layout": None if layout is None else layout.to_json(),
                 "entries": dict(sorted(entries.items()))}
        write_atomic(self.folder / INDEX_FILE, json.dumps(index, indent=0, ensure_ascii=False) + "\n")
        self.reload()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def nbytes(self) -> int:
        """Bytes of the shards on disk."""
        return sum(p.stat().st_size for p in self.shards_dir.glob("*.safetensors"))

    # ---- reading -----------------------------------------------------------------------
    def _tensor(self, key: str, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        shard = self.entries[key]["shard"]
        if shard not in self._handles:
            path = self.shards_dir / shard
            if not path.is_file():
                raise TextCacheError(f"the text cache index names {path}, which is gone; rerun `megaflow preprocess`")
            handle = safe_open(str(path), framework="pt")  # memory-mapped; kept open
            self._handles[shard] = (handle, set(handle.keys()))
        handle, names = self._handles[shard]
        tensor_name = f"{key}.{name}"
        return handle.get_tensor(tensor_name) if tensor_name in names else None

    def _missing_error(self, what: str, sources: Sequence[str]) -> TextCacheMissing:
        shown = "; ".join(repr(s) for s in sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
        return TextCacheMissing(
            f"{len(sources)} {what} not in the text cache {self.folder}: {shown}. Encode them with `megaflow "
            "preprocess` and this run's --config / --set options (it adds what is missing), or set "
            "data.text_cache_missing=fill to encode them at start-up")

    def text(self, prompts: Sequence[str], device: torch.device | str | None = None) -> TextConditioning:
        """The prompts' text branch, re-padded to the family's layout (as `encode_prompts` gives it)."""
        keys = [text_key(self.hash, p) for p in prompts]
        missing = [p for p, k in zip(prompts, keys) if k not in self.entries]
        if missing:
            raise self._missing_error("prompt(s)", missing)
        layout = self.layout
        if layout is None:
            raise TextCacheError(f"the text cache {self.folder} has no layout in its index; rerun `megaflow preprocess`")
        rows = [(self._tensor(k, "embeds"), self._tensor(k, "mask"), self._tensor(k, "pooled")) for k in keys]
        first = rows[0][0]
        embeds = first.new_zeros(len(rows), layout.length, first.shape[-1])
        for i, (e, _, _) in enumerate(rows):
            embeds[i, : e.shape[0]] = e
        mask = None
        if layout.mask_dtype is not None:
            dtype = getattr(torch, layout.mask_dtype)
            positions = torch.arange(layout.length)
            mask = torch.stack([(m if m is not None else positions < e.shape[0]).to(dtype) for e, m, _ in rows])
        pooled = None if rows[0][2] is None else torch.stack([p for _, _, p in rows])
        text = TextConditioning(embeds, mask, pooled)
        return text if device is None else text.to(device)

    def images(self, images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The cached image-encoder outputs `[P, ...]` of conditioning images `[P, 3, H, W]`."""
        keys = [image_key(self.hash, image) for image in images]
        missing = [str(i) for i, k in enumerate(keys) if k not in self.entries]
        if missing:
            raise self._missing_error("conditioning image(s) (batch positions)", missing)
        out = torch.stack([self._tensor(k, "image") for k in keys])
        return out if device is None else out.to(device)


class ShardWriter:
    """Buffers entries and writes them as shards of at most `SHARD_ENTRIES` entries / `SHARD_BYTES`."""

    def __init__(self, cache: TextCache, rank: int) -> None:
        self.cache, self.rank = cache, rank
        self.tensors: dict[str, torch.Tensor] = {}
        self.sources: dict[str, tuple[str, str]] = {}
        self.layout: Layout | None = None
        self.nbytes = 0
        self.written: list[Path] = []

    def add(self, key: str, kind: str, source: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.tensors[f"{key}.{name}"] = t.contiguous()
            self.nbytes += t.numel() * t.element_size()
        self.sources[key] = (kind, source)
        if len(self.sources) >= SHARD_ENTRIES or self.nbytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.sources:
            return
        self.cache.shards_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache.shards_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-r{self.rank:04d}-{uuid.uuid4().hex[:8]}.safetensors"
        meta = {"format": FORMAT, "fingerprint": self.cache.hash,
                "layout": "" if self.layout is None else json.dumps(self.layout.to_json()),
                "entries": json.dumps(self.sources, ensure_ascii=False)}
        tmp = _tmp(path)
        try:
            save_file(self.tensors, str(tmp), metadata=meta)
            os.chmod(tmp, 0o644)  # readable by the other users of a shared cache, like the JSON files
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.written.append(path)
        self.tensors, self.sources, self.nbytes = {}, {}, 0


# ---- planning and encoding -------------------------------------------------------------
def plan_items(prompts: "PromptSet", negative_prompt: str, *, images: bool) -> list[Item]:
    """Everything a run conditions on that the cache holds, each once, in a fixed order: the
    negative prompt, the prompts in file order, then (`images`: the family caches an image
    encoder's output) the prompts' distinct images."""
    texts = list(dict.fromkeys([negative_prompt, *prompts.prompts]))
    items = [Item("text", t) for t in texts]
    if images and prompts.images is not None:
        items += [Item("image", s) for s in dict.fromkeys(str(p) for p in prompts.images)]
    return items


def find_missing(cache: TextCache, items: Sequence[Item], *, video: tuple[int, int] | None) -> list[Item]:
    """The items the cache lacks (images loaded at the video size `(height, width)` to key them)."""
    from megaflow.data.images import load_image

    missing = []
    for item in items:
        if item.kind == "text":
            item.key = text_key(cache.hash, item.source)
        else:
            item.pixels = load_image(item.source, *video)
            item.key = image_key(cache.hash, item.pixels)
        if item.key not in cache:
            missing.append(item)
    return missing


def encode_items(cache: TextCache, adapter: "ModelAdapter", items: Sequence[Item], *, rank: int,
                 batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = True) -> list[Path]:
    """Encode `items` (found missing) and write them as this rank's shards; returns the shards."""
    from megaflow.monitor.progress import progress

    writer = ShardWriter(cache, rank)
    texts = [it for it in items if it.kind == "text"]
    images = [it for it in items if it.kind == "image"]
    bar = progress(len(items), "encoding prompts", enabled=show_progress, unit="prompt")
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = texts[start:start + batch_size]
                text = adapter.encode_prompts([it.source for it in batch])
                writer.layout = writer.layout or Layout.of(text)
                for i, it in enumerate(batch):
                    writer.add(it.key, "text", it.source, pack_text(text, i, masked=adapter.text_padding_masked))
                bar.update(len(batch))
            for it in images:
                encoded = adapter.encode_images(it.pixels[None].to(adapter.device))[0]
                writer.add(it.key, "image", it.source, {"image": encoded.detach().cpu().clone()})
                bar.update(1)
        writer.flush()
    finally:
        bar.close()
    return writer.written


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather(local: list[Any]) -> list[Any]:
    """Every rank's list, concatenated in rank order (the local list in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(local)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


def _fill(cache: TextCache, adapter: "ModelAdapter", items: Sequence[Item], *, rank: int, batch_size: int,
          show_progress: bool) -> list[Path]:
    """Encode this rank's missing `items` into the cache; collective: after every rank wrote its
    shards, rank 0 merges the index, and every rank reloads it."""
    written = encode_items(cache, adapter, items, rank=rank, batch_size=batch_size, show_progress=show_progress)
    _barrier()
    if rank == 0:
        cache.merge_index()
    _barrier()
    cache.reload()
    return written


def open_for_training(cfg: "Config", adapter: "ModelAdapter", prompts: "PromptSet", *,
                      show_progress: bool = True) -> TextCache:
    """The run's cache (`data.text_cache`), checked against the model's encoding and the run's
    prompts, negative prompt and images (collective under a launch: each rank checks every
    world-th item). Missing items raise `TextCacheMissing` naming them, or with
    `data.text_cache_missing=fill` are encoded (the encoders loaded for it and freed after)."""
    fill = cfg.data.text_cache_missing == "fill"
    rank, world = _rank_world()
    cache = TextCache.for_adapter(cfg.data.text_cache, adapter, create=fill)
    items = plan_items(prompts, cfg.data.negative_prompt, images=adapter.cached_image_key is not None)
    video = (cfg.video.height, cfg.video.width)
    mine = find_missing(cache, items[rank::world], video=video)
    missing = _gather([(it.kind, it.source) for it in mine])
    if not missing:
        return cache
    if not fill:
        texts = [s for k, s in missing if k == "text"]
        images = [s for k, s in missing if k == "image"]
        if texts:
            raise cache._missing_error("prompt(s)", texts)
        raise cache._missing_error("conditioning image(s)", images)
    had_encoders = adapter.has_text_encoders
    if mine:
        adapter.load_text_encoders()
    t0 = time.perf_counter()
    _fill(cache, adapter, mine, rank=rank, batch_size=DEFAULT_BATCH_SIZE, show_progress=show_progress)
    if not had_encoders:
        adapter.unload_text_encoders()
    if rank == 0:
        log.info("data.text_cache_missing=fill: encoded %d missing prompt(s)/image(s) into %s in %.1fs",
                 len(missing), cache.folder, time.perf_counter() - t0)
    still = find_missing(cache, items[rank::world], video=video)
    if still:
        raise cache._missing_error("item(s) (after filling)", [it.source for it in still])
    return cache


# ---- megaflow preprocess ---------------------------------------------------------------
class _ConfigOnlyTransformer(nn.Module):
    """Stands in for the transformer while preprocessing: its config (what the adapters read at
    load time) and dtype, no weights, so encoding the prompts never reads the transformer."""

    def __init__(self, model_cls: type, folder: Path, dtype: torch.dtype) -> None:
        import inspect

        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        params = inspect.signature(model_cls.__init__).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        stored = {k: v for k, v in model_cls.load_config(str(folder)).items() if not k.startswith("_")}
        self.config = FrozenDict({**defaults, **stored})
        self.dtype = dtype


def init_distributed() -> tuple[int, int, int]:
    """`(rank, world, local rank)`: torch.distributed started from the launcher's environment
    (`torchrun`, `deepspeed`: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) with nccl on CUDA and
    gloo otherwise, when launched with several processes; `(0, 1, 0)` for one process. (Plain
    torch.distributed: encoding needs no DeepSpeed, whose CPU start-up compiles a kernel.)"""
    from datetime import timedelta

    from megaflow.parallel.topology import launched_world_size

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    if launched_world_size() > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
        os.environ.setdefault("WORLD_SIZE", str(launched_world_size()))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=30))
    rank, world = _rank_world()
    return rank, world, local_rank


def frozen_dtype(cfg: "Config") -> torch.dtype:
    """The dtype of the frozen parts (text encoders included) of a run: `load_adapter`'s."""
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


@dataclass
class PreprocessResult:
    folder: Path
    entries: int  #: entries in the cache after the run
    encoded: int  #: entries this run added to the cache (all ranks)
    items: int  #: items of the recipe (prompts, negative prompt, images)
    nbytes: int  #: shard bytes on disk
    shards: int
    seconds: float
    world_size: int
    rank: int  #: this process's rank (the summary is rank 0's to print)


def preprocess(cfg: "Config", *, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = True) -> PreprocessResult:
    """`megaflow preprocess`: encode every prompt of the recipe (its prompt file or list), its
    negative prompt, and for Wan I2V each prompt image's CLIP-vision embeddings, into
    `data.text_cache`, skipping what is already there. One process, or every rank of a
    `torchrun` / `deepspeed` launch (rank r encodes every world-th item; gloo without CUDA)."""
    from megaflow.config import validate_config
    from megaflow.data.prompts import PromptSet
    from megaflow.models import get_adapter, resolve_model_path

    validate_config(cfg)
    if not cfg.data.text_cache:
        raise ConfigError("megaflow preprocess writes the cache folder named by data.text_cache; set it, e.g. "
                          "--set data.text_cache=/path/to/cache (and the same key in the training run)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    prompts = (PromptSet.from_file(cfg.data.prompt_file, seed=cfg.seed) if cfg.data.prompt_file
               else PromptSet(cfg.data.prompts, seed=cfg.seed))
    started = not (dist.is_available() and dist.is_initialized())
    rank, world, local_rank = init_distributed()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    adapter = get_adapter(cfg.model.family).from_pretrained(
        resolve_model_path(cfg.model.path, cfg.model.family), dtype=frozen_dtype(cfg), device=device,
        transformer_loader=_ConfigOnlyTransformer)
    # Every rank's fingerprint file write is identical (atomic): no rank waits for another to create it.
    cache = TextCache.for_adapter(cfg.data.text_cache, adapter, create=True)
    if rank == 0:  # index the shards an interrupted run left, so that they are not encoded again
        cache.merge_index()
    _barrier()
    cache.reload()
    before = len(cache)
    items = plan_items(prompts, cfg.data.negative_prompt, images=adapter.cached_image_key is not None)
    mine = find_missing(cache, items[rank::world], video=(cfg.video.height, cfg.video.width))
    _fill(cache, adapter, mine, rank=rank, batch_size=batch_size, show_progress=show_progress)
    # What all ranks added, from the merged index: no tensor collective is the last one before the
    # process exits (gloo's worker threads may still release its Python-owned tensors while the
    # interpreter shuts down, an abort at exit); barriers carry no Python tensors.
    encoded = len(cache) - before
    if started and dist.is_initialized():
        dist.destroy_process_group()
    return PreprocessResult(folder=cache.folder.resolve(), entries=len(cache), encoded=encoded, items=len(items),
                            nbytes=cache.nbytes(), shards=len(list(cache.shards_dir.glob("*.safetensors"))),
                            seconds=time.perf_counter() - t0, world_size=world, rank=rank)

