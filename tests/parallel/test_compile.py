"""Regional torch.compile (`train.compile`, `megaflow.parallel.compile`): compiled blocks (inductor
on CPU) give the eager velocity and LoRA gradients, with activation checkpointing on one block, and
the trainer compiles the policy's and the KL reference's blocks."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from peft import LoraConfig

from megaflow.config import load_config
from megaflow.parallel.checkpointing import apply_activation_checkpointing
from megaflow.parallel.compile import compile_blocks
from megaflow.trainer.loop import Trainer


def is_compiled(block: torch.nn.Module) -> bool:
    """Whether `block.forward` is a `torch.compile` wrapper of the block's own forward."""
    original = getattr(block.forward, "_torchdynamo_orig_callable", None)
    return original is not None and original.__func__ is type(block).forward


@pytest.mark.slow
def test_compiled_blocks_match_eager_with_lora_and_checkpointing(tiny_wan_dir: Path) -> None:
    """Forward + backward of the tiny Wan transformer with LoRA, block 0 of 2 checkpointed: the
    compiled blocks reproduce the eager output and every LoRA gradient."""
    torch.manual_seed(0)
    eager = WanTransformer3DModel.from_pretrained(tiny_wan_dir / "transformer").requires_grad_(False)
    eager.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        assert len(apply_activation_checkpointing(model, (WanTransformerBlock,), 0.5)) == 1
    assert all(is_compiled(b) for b in compile_blocks(compiled, (WanTransformerBlock,)))
    g = torch.Generator().manual_seed(0)
    # the latent needs a gradient, so every block sees the same guards: one compiled variant
    x = torch.randn(2, 4, 2, 4, 4, generator=g).requires_grad_(True)
    inputs = dict(timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=torch.randn(2, 5, 32, generator=g))

    def run(model: WanTransformer3DModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(hidden_states=x, **inputs, return_dict=False)[0]
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    out, grads = run(eager)
    out_c, grads_c = run(compiled)
    assert grads.keys() == grads_c.keys() and len(grads) == 2 * 2 * 2 * 4  # blocks × attentions × (A, B) × targets
    # inductor fuses and reorders fp32 reductions: measured 3e-7 on outputs of ~2, 2e-6 on gradients of ~10
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    for name in grads:
        assert grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_compile_blocks_refuses_a_model_without_the_blocks() -> None:
    with pytest.raises(ValueError, match="Linear has no WanTransformerBlock blocks to compile"):
        compile_blocks(torch.nn.Linear(2, 2), (WanTransformerBlock,))


def test_trainer_compiles_policy_and_reference_blocks(tmp_path: Path) -> None:
    """train.compile=true: full fine-tuning with a KL reference gets both models' blocks compiled
    (lazily: nothing is traced before the first forward); activation checkpointing stays in place."""
    cfg = load_config("tiny", ["train.compile=true", "model.lora=false", "algorithm.kl_beta=0.01",
                               "train.grad_checkpointing=1.0", f"output_dir={tmp_path}"])
    trainer = Trainer(cfg, show_progress=False)
    adapter = trainer.adapter
    for model in (adapter.transformer, adapter._reference):
        blocks = [m for m in model.modules() if isinstance(m, adapter.block_classes)]
        assert blocks and all(is_compiled(b) for b in blocks)
    assert adapter.transformer.gradient_checkpointing
    eager = load_config("tiny", [f"output_dir={tmp_path / 'eager'}"])
    blocks = [m for m in Trainer(eager, show_progress=False).adapter.transformer.modules()
              if isinstance(m, adapter.block_classes)]
    assert blocks and not any(is_compiled(b) for b in blocks)
