"""`megaflow eval`: score a model (base, or base + a training checkpoint) on evaluation prompts
with deterministic ODE sampling, and draw base-vs-trained frames side by side.

A checkpoint's EMA of the trainable weights (`train.ema_decay`) is evaluated by default when it has
one (`load_model(..., ema=False)`, `megaflow eval --no-ema`: the raw trained weights); the report
records which (`weights`).

Sampling reuses the adapter (`encode_prompts`, `velocity`, `decode`) and `megaflow.sampling`
(Euler `ode` steps on the recipe's grid). The initial noise of prompt p, sample k is a function
of `(seed, p, k)` only, so the base and the trained model start from the same noise.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from megaflow.config import Config
from megaflow.data.prompts import PromptSet
from megaflow.errors import ConfigError, DataError, ModelLoadError
from megaflow.models import get_adapter, resolve_model_path
from megaflow.models.base import Conditioning, ModelAdapter
from megaflow.models.random_model import folder_transformer_loader
from megaflow.monitor.progress import progress
from megaflow.rewards import RewardSet
from megaflow.sampling import flow_sigmas, step
from megaflow.seeds import generator
from megaflow.trainer.ema import read_ema, weights_used
from megaflow.trainer.state import COMPLETE_MARKER, complete_checkpoints

#: The shapes world's held-out prompts (`megaflow.demo.world.split_prompts(0)[1]`) with their attributes.
HELD_OUT_PROMPTS = "demo_heldout.jsonl"

#: Files that mark a training checkpoint (see `megaflow.trainer.state`).


@dataclass
class EvalReport:
    """Scores of one model: the weighted total and each component / attribute, averaged."""

    label: str
    overall: float
    components: dict[str, float]
    per_prompt: dict[str, float]
    videos: torch.Tensor = field(repr=False)  #: [P·S, F, 3, H, W] in [0, 1], prompt-major
    weights: str = "base"  #: "base", or a checkpoint's "ema" or raw "trained" weights; "renderer" for truth
    #: Each prompt's components (scores, sub-scores and monitored metrics such as `quality/*`).
    per_prompt_components: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready scores (no videos)."""
        return {"model": self.label, "weights": self.weights, "overall": self.overall, "components": self.components,
                "per_prompt": self.per_prompt, "per_prompt_components": self.per_prompt_components}


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's output folder (its newest `checkpoints/iteration_*`)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint folder {path} does not exist; give a run's output folder "
                             "(e.g. runs/demo) or one of its checkpoints/iteration_NNNNNN folders")
    if (path / COMPLETE_MARKER).is_file():
        return path
    found = complete_checkpoints(path, warn=True)
    if not found:
        raise ModelLoadError(f"{path} holds no complete megaflow checkpoint (no {COMPLETE_MARKER}, no complete "
                             "checkpoints/iteration_* folder); train first, e.g. `megaflow train --config demo`")
    return found[-1]


def load_model(cfg: Config, checkpoint: Path | None, device: torch.device, *, ema: bool = True) -> ModelAdapter:
    """The recipe's base model in fp32, with the checkpoint's LoRA or full transformer if given:
    its EMA weights when it has them and `ema`, else the trained ones (`weights_used`)."""
    folder = resolve_model_path(cfg.model.path, cfg.model.family)
    adapter = get_adapter(cfg.model.family).from_pretrained(
        folder, dtype=torch.float32, device=device,
        transformer_loader=folder_transformer_loader(folder, device, cfg.seed))
    if checkpoint is None:
        return adapter
    info = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    try:
        adapter.load_trainable(checkpoint, lora=info.get("lora", True))
        if weights_used(checkpoint, ema) == "ema":
            _load_ema(adapter.transformer, checkpoint)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load checkpoint {checkpoint} into {cfg.model.path}: {e}") from e
    return adapter


#: A peft adapter's name inside a LoRA parameter name (`...lora_A.<adapter>.weight`): training names
#: it "default", `load_lora_adapter` "default_0"; dropped so the two name sets match.
_ADAPTER_NAME = re.compile(r"(\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector))\.[^.]+(?=\.|$)")


def _load_ema(transformer: torch.nn.Module, checkpoint: Path) -> None:
    """Copy the checkpoint's EMA (whole tensors, assembled from ZeRO-3 shards if need be) into the
    parameters it follows, matched by name (LoRA names without the adapter's name)."""
    named = {_ADAPTER_NAME.sub(r"\1", n): p for n, p in transformer.named_parameters()}
    averaged = {_ADAPTER_NAME.sub(r"\1", n): read for n, read in read_ema(checkpoint).items()}
    unknown = [n for n in averaged if n not in named]
    if unknown:
        raise KeyError(f"its EMA follows parameters the model does not have ({', '.join(unknown[:3])}); "
                       "evaluate the raw weights with --no-ema")
    with torch.no_grad():
        for name, read in averaged.items():
            tensor = read()
            if tensor.shape != named[name].shape:
                raise ValueError(f"its EMA tensor {name} has shape {tuple(tensor.shape)}, the model's "
                                 f"{tuple(named[name].shape)}")
            named[name].copy_(tensor.to(named[name].dtype))


@torch.no_grad()
def sample_videos(adapter: ModelAdapter, cfg: Config, prompts: Sequence[str], samples: int, seed: int,
                  batch: int = 16, show_progress: bool = True, desc: str = "eval") -> torch.Tensor:
    """ODE samples of every prompt: `float32 [len(prompts)·samples, F, 3, H, W]` in [0, 1]."""
    shape = adapter.latent_shape(cfg.video.frames, cfg.video.height, cfg.video.width)
    sigmas = flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift)
    keys = [(p, k) for p in range(len(prompts)) for k in range(samples)]
    use_cfg = cfg.sampling.guidance_scale > 1.0
    negative = adapter.encode_prompts([cfg.data.negative_prompt]) if use_cfg else None
    text = adapter.encode_prompts(list(prompts))
    embedded = cfg.sampling.embedded_guidance
    embedded = adapter.default_embedded_guidance if embedded is None else embedded
    out = []
    bar = progress(len(keys), desc, enabled=show_progress, unit="video")
    for start in range(0, len(keys), batch):
        chunk = keys[start:start + batch]
        idx = torch.tensor([p for p, _ in chunk])
        cond = Conditioning(text=text.select(idx), negative=None if negative is None else negative.expand(len(chunk)))
        x = torch.stack([torch.randn(shape, generator=generator(seed, "eval", p, k)) for p, k in chunk]).to(adapter.device)
        for i in range(cfg.sampling.num_steps):
            v = adapter.velocity(x, sigmas[i].expand(len(chunk)), cond, cfg.sampling.guidance_scale, embedded)
            x = step("ode", x, v, sigmas[i], sigmas[i + 1]).prev_sample
        out.append(adapter.decode(x.to(adapter.dtype)).float().cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


def score_videos(cfg: Config, videos: torch.Tensor, prompts: PromptSet, samples: int, label: str) -> EvalReport:
    """Score `videos [P·S, F, 3, H, W]` of `prompts` with the recipe's rewards (and their sub-scores,
    e.g. the shapes verifier's attributes)."""
    rewards = RewardSet(cfg.reward.components, cfg.reward.options)
    texts = [p for p in prompts.prompts for _ in range(samples)]
    meta = [{**prompts.metadata[i // samples], "prompt_slot": i // samples, "sample": i % samples}
            for i in range(len(texts))]
    scores = rewards.score(videos, texts, meta)
    total = rewards.weighted_sum(scores.components)
    values = {**scores.components, **scores.details, **rewards.monitor(videos, texts, meta)}
    rows = {p: slice(i * samples, (i + 1) * samples) for i, p in enumerate(prompts.prompts)}
    return EvalReport(label=label, overall=float(total.mean()),
                      components={k: float(v.mean()) for k, v in values.items()},
                      per_prompt={p: float(total[r].mean()) for p, r in rows.items()}, videos=videos,
                      per_prompt_components={p: {k: float(v[r].mean()) for k, v in values.items()}
                                             for p, r in rows.items()})


def ground_truth_videos(cfg: Config, prompts: PromptSet, samples: int, seed: int) -> torch.Tensor:
    """Clips of the shapes world's renderer for each prompt (`samples` each, prompt-major), the
    reference every score and quality metric is calibrated on: `[P·S, F, 3, H, W]`."""
    from megaflow.demo.verifier import target
    from megaflow.demo.world import render_clip

    v = cfg.video
    return torch.stack([render_clip(target(p, m), seed, k, v.frames, v.height, v.width)
                        for p, m in zip(prompts.prompts, prompts.metadata) for k in range(samples)])


def eval_prompts(cfg: Config, prompt_file: str | None = None) -> PromptSet:
    """The prompts to evaluate (with their metadata): `prompt_file` (text or JSONL), else the shapes
    world's held-out split when the recipe uses the `shapes` reward, else the recipe's own prompts."""
    if prompt_file:
        if not Path(prompt_file).is_file():
            raise DataError(f"prompt file '{prompt_file}' does not exist; give a text file with one prompt per "
                            "line (or JSONL prompt records)")
        return PromptSet.from_file(prompt_file)
    if "shapes" in cfg.reward.components:
        return PromptSet.from_file(HELD_OUT_PROMPTS)
    if cfg.data.prompt_file:
        return PromptSet.from_file(cfg.data.prompt_file)
    return PromptSet(cfg.data.prompts)


def labelled_checkpoints(checkpoints: str | Path | Sequence[str | Path] | None) -> list[tuple[str, Path]]:
    """`(label, path)` of each `[LABEL=]PATH`; unlabelled: "trained" when it is the only one, else
    its run folder's name."""
    if checkpoints is None:
        return []
    items = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    out = []
    for item in items:
        label, _, path = str(item).rpartition("=") if "=" in str(item) else ("", "", str(item))
        if not label:
            p = Path(path)
            run = p.parent.parent if p.parent.name == "checkpoints" else p
            label = "trained" if len(items) == 1 else run.name
        out.append((label, Path(path)))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels) or {"truth", "base"} & set(labels):
        raise ConfigError(f"checkpoint labels must be distinct and not 'truth' or 'base', got {labels}; "
                          "label them as LABEL=PATH")
    return out


def evaluate(cfg: Config, checkpoint: str | Path | Sequence[str | Path] | None = None, *,
             prompt_file: str | None = None, samples: int = 4, seed: int = 1234, show_progress: bool = True,
             ema: bool = True) -> list[EvalReport]:
    """Evaluate the base model and each checkpoint (`[LABEL=]PATH`, see `labelled_checkpoints`):
    `[truth?, base, *checkpoints]`; `truth`, the renderer's clips of the same prompts, comes first
    when the recipe uses the shapes world's verifier. A checkpoint report's `weights` says whether
    its EMA ("ema", the default when it has one and `ema`) or its raw weights ("trained") were used."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = [(label, find_checkpoint(path)) for label, path in labelled_checkpoints(checkpoint)]
    prompts = eval_prompts(cfg, prompt_file)
    reports = []
    if "shapes" in cfg.reward.components:
        report = score_videos(cfg, ground_truth_videos(cfg, prompts, samples, seed), prompts, samples, "truth")
        report.weights = "renderer"
        reports.append(report)
    for label, path in [("base", None)] + runs:
        adapter = load_model(cfg, path, device, ema=ema)
        videos = sample_videos(adapter, cfg, prompts.prompts, samples, seed, show_progress=show_progress,
                               desc=f"eval {label}")
        report = score_videos(cfg, videos, prompts, samples, label)
        report.weights = "base" if path is None else weights_used(path, ema)
        reports.append(report)
    return reports


def format_table(reports: Sequence[EvalReport], prompts: int, samples: int) -> str:
    """A plain-text table: one row per score (overall, then components), one column per model."""
    names = ["overall"] + list(reports[0].components)
    width = max(len(n) for n in names) + 2
    used = [f"{r.label}: {r.weights} weights" for r in reports if r.weights not in ("base", "renderer")]
    lines = [f"{prompts} prompts × {samples} samples, ODE sampling" + (f" ({'; '.join(used)})" if used else ""),
             "".ljust(width) + "".join(r.label.rjust(max(10, len(r.label) + 2)) for r in reports)]
    for n in names:
        vals = [r.overall if n == "overall" else r.components[n] for r in reports]
        lines.append(n.ljust(width) + "".join(f"{v:.3f}".rjust(max(10, len(r.label) + 2))
                                              for v, r in zip(vals, reports)))
    return "\n".join(lines)


def save_comparison(reports: Sequence[EvalReport], prompts: Sequence[str], samples: int, path: str | Path,
                    rows: int = 6, frame_step: int = 2, scale: int = 3) -> Path:
    """PNG: for the first `rows` prompts (sample 0), every `frame_step`-th frame of each model side by side."""
    from PIL import Image, ImageDraw

    rows = min(rows, len(prompts))
    frames = list(range(0, reports[0].videos.shape[1], frame_step))
    h, w = reports[0].videos.shape[-2:]
    cell_h, cell_w, gap, label_w, head = h * scale, w * scale, 12, 190, 20
    block_w = len(frames) * (cell_w + 2)
    img = Image.new("RGB", (label_w + len(reports) * (block_w + gap), head + rows * (cell_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for m, report in enumerate(reports):
        x0 = label_w + m * (block_w + gap)
        which = "" if report.weights in ("base", report.label) else f" [{report.weights}]"
        draw.text((x0, 4), f"{report.label}{which} (frames {frames[0]}..{frames[-1]})", fill=(0, 0, 0))
        for r in range(rows):
            video = report.videos[r * samples]
            for j, f in enumerate(frames):
                arr = (video[f].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
                img.paste(tile, (x0 + j * (cell_w + 2), head + r * (cell_h + 4)))
    for r in range(rows):
        draw.text((4, head + r * (cell_h + 4) + cell_h // 2 - 6), prompts[r], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path


def write_json(reports: Sequence[EvalReport], path: str | Path, **extra: Any) -> Path:
    """Write the reports (and `extra` fields) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, "results": [r.to_dict() for r in reports]}, indent=2))
    return path
