"""`megaflow.kernels.sde_log_prob`: Triton kernel vs torch reference vs `sampling.step`; dispatcher.

Tests named `test_triton_*` run the real kernels (interpreted on CPU, see conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from megaflow.kernels import BACKENDS, KernelBackendError, LogProbOut, sde_log_prob, sde_log_prob_torch
from megaflow.kernels import logprob as dispatch
from megaflow.sampling import step

NOISE_LEVEL = {"flow_grpo": 0.7, "dance": 0.3, "cps": 0.8}
# flow_grpo_linear shares flow_grpo's coefficient path (`step_coefficients`); one test below covers it.
KINDS = tuple(NOISE_LEVEL)
SHAPE = (3, 4, 7, 9, 13)  # 3276 elements per sample: two 2048-element blocks, the second partial
FIELDS = ("log_prob", "kl", "ratio_norm")


@dataclass
class Case:
    """One step's inputs: tensors `[B, ...]`, per-sample sigmas `[B]`."""

    kind: str
    x: torch.Tensor
    v: torch.Tensor
    x_next: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    mean_ref: torch.Tensor | None
    mean_old: torch.Tensor | None

    def kwargs(self) -> dict:
        return dict(noise_level=NOISE_LEVEL[self.kind], mean_ref=self.mean_ref, mean_old=self.mean_old)


def make_case(kind: str, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", seed: int = 0, means: bool = True) -> Case:
    """x_next sampled by `sampling.step`; mean_ref / mean_old are the step mean plus noise of order std."""
    g = torch.Generator().manual_seed(seed)
    batch = shape[0]
    sigma = torch.linspace(0.9, 0.3, batch) if batch > 1 else torch.tensor([0.7])
    sigma_next = sigma - 0.05
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    out = step(kind, x, v, sigma, sigma_next, noise_level=NOISE_LEVEL[kind], noise=torch.randn(shape, generator=g))
    spread = out.std.reshape((-1,) + (1,) * (len(shape) - 1))
    mean_ref = out.mean + 0.5 * spread * torch.randn(shape, generator=g)
    mean_old = out.mean + 0.2 * spread * torch.randn(shape, generator=g)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return Case(kind, put(x), put(v), put(out.prev_sample), sigma.to(device), sigma_next.to(device),
                put(mean_ref) if means else None, put(mean_old) if means else None)


def run(case: Case, backend: str, partial: bool = False, loss_fields: tuple[str, ...] = FIELDS,
        ) -> tuple[LogProbOut, torch.Tensor]:
    """Outputs and dL/dv for L = Σ_fields Σ_samples w·field with distinct per-sample weights w."""
    v = case.v.detach().clone().requires_grad_(True)
    out = sde_log_prob(case.kind, case.x, v, case.x_next, case.sigma, case.sigma_next, partial=partial,
                       backend=backend, **case.kwargs())
    batch = case.x.shape[0]
    loss = torch.zeros((), device=case.x.device)
    for i, name in enumerate(loss_fields):
        value = getattr(out, name)
        if value is not None:
            weights = torch.linspace(0.5, 1.5, batch, device=value.device) * (1.0, 0.7, -1.3)[i]
            loss = loss + (weights * value).sum()
    loss.backward()
    return out, v.grad


def assert_outputs_close(got: LogProbOut, want: LogProbOut, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    for name in FIELDS + ("std", "count"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.dtype == torch.float32 and g.shape == w.shape, name
            torch.testing.assert_close(g, w.to(g.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_grads_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Elementwise closeness relative to the gradient's scale (fp32: rounding; bf16: the output cast)."""
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------- torch reference

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_step_log_prob_and_closed_forms(kind: str, dtype: torch.dtype) -> None:
    case = make_case(kind, dtype=dtype)
    out = sde_log_prob_torch(kind, case.x, case.v, case.x_next, case.sigma, case.sigma_next, **case.kwargs())
    st = step(kind, case.x, case.v, case.sigma, case.sigma_next, noise_level=NOISE_LEVEL[kind],
              prev_sample=case.x_next)
    torch.testing.assert_close(out.log_prob, st.log_prob, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.std, st.std)
    var2 = 2 * st.std**2
    kl = (st.mean - case.mean_ref.float()).pow(2).flatten(1).mean(1) / var2
    rn = (st.mean - case.mean_old.float()).pow(2).flatten(1).mean(1) / var2
    torch.testing.assert_close(out.kl, kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ratio_norm, rn, rtol=1e-5, atol=1e-6)
    assert out.count is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("partial", [False, True])
def test_reference_gradcheck_float64(kind: str, partial: bool) -> None:
    """float64 inputs make the reference compute in float64 (the float32 coefficients are exact
    constants there), so finite differences check the analytic gradient w.r.t. v."""
    case = make_case(kind, shape=(2, 3, 5), dtype=torch.float64, seed=1)

    def fields(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = sde_log_prob_torch(kind, case.x, v, case.x_next, case.sigma, case.sigma_next, partial=partial,
                                 **case.kwargs())
        assert out.log_prob.dtype == torch.float64
        return out.log_prob, out.kl, out.ratio_norm

    v = case.v.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fields, (v,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_reference_partial_sums_and_counts_give_the_means() -> None:
    case = make_case("flow_grpo")
    args = (case.kind, case.x, case.v, case.x_next, case.sigma, case.sigma_next)
    full = sde_log_prob_torch(*args, **case.kwargs())
    part = sde_log_prob_torch(*args, partial=True, **case.kwargs())
    assert torch.equal(part.count, torch.full((3,), float(case.x[0].numel())))
    for name in FIELDS:
        torch.testing.assert_close(getattr(part, name) / part.count, getattr(full, name), rtol=1e-5, atol=1e-6)


def test_reference_rejects_bad_input() -> None:
    case = make_case("cps", means=False)
    args = (case.x, case.v, case.x_next)
    with pytest.raises(ValueError, match="stochastic step kind"):
        sde_log_prob_torch("ode", *args, 0.5, 0.4, noise_level=0.0)
    with pytest.raises(ValueError, match="deterministic"):
        sde_log_prob_torch("cps", *args, 0.2, 0.0, noise_level=0.8)
    with pytest.raises(ValueError, match="x_next must have x's shape"):
        sde_log_prob_torch("cps", case.x, case.v, case.x_next[:, :2], 0.5, 0.4, noise_level=0.8)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_log_prob_torch("flow_grpo", *args, 1.0, 0.9, noise_level=0.7)


# ----------------------------------------------------------------------------- dispatcher

def test_backends_and_unknown_backend() -> None:
    assert BACKENDS == ("auto", "triton", "torch")
    case = make_case("dance", shape=(1, 4))
    with pytest.raises(ValueError, match="auto, triton, torch"):
        sde_log_prob("dance", case.x, case.v, case.x_next, 0.5, 0.4, noise_level=0.3, backend="cuda")


def test_auto_uses_the_reference_on_cpu_and_for_float64() -> None:
    case = make_case("flow_grpo")
    assert dispatch.resolve_backend("auto", [case.x]) == "torch"
    assert dispatch.resolve_backend("auto", [case.x.double()]) == "torch"
    got = sde_log_prob(case.kind, case.x, case.v, case.x_next, case.sigma, case.sigma_next, **case.kwargs())
    want = sde_log_prob_torch(case.kind, case.x, case.v, case.x_next, case.sigma, case.sigma_next, **case.kwargs())
    for name in FIELDS + ("std",):
        assert torch.equal(getattr(got, name), getattr(want, name))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    case = make_case("cps", shape=(2, 8))
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET=1.*backend='torch' or 'auto'"):
        sde_log_prob("cps", case.x, case.v, case.x_next, 0.5, 0.4, noise_level=0.8, backend="triton")


def test_triton_backend_reports_a_missing_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    case = make_case("cps", shape=(2, 8))
    with pytest.raises(KernelBackendError, match="needs the triton package.*backend='torch'"):
        sde_log_prob("cps", case.x, case.v, case.x_next, 0.5, 0.4, noise_level=0.8, backend="triton")


def test_triton_backend_reports_interpreter_set_too_late(monkeypatch: pytest.MonkeyPatch, triton_ready: None) -> None:
    from megaflow.kernels import logprob_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(logprob_triton, "interpreted", lambda: False)
    case = make_case("cps", shape=(2, 8))
    with pytest.raises(KernelBackendError, match="set after triton had been imported"):
        sde_log_prob("cps", case.x, case.v, case.x_next, 0.5, 0.4, noise_level=0.8, backend="triton")


# ----------------------------------------------------------------------------- Triton kernels

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("means", [True, False])
@pytest.mark.parametrize("partial", [False, True])
def test_triton_matches_reference_fp32(kind: str, means: bool, partial: bool, device: torch.device,
                                       triton_ready: None) -> None:
    case = make_case(kind, device=device, means=means)
    got, got_grad = run(case, "triton", partial=partial)
    want, want_grad = run(case, "torch", partial=partial)
    scale = 1e-5 * (case.x[0].numel() if partial else 1)
    assert_outputs_close(got, want, rtol=1e-5, atol=scale)
    assert_grads_close(got_grad, want_grad, rtol=1e-5)
    assert got_grad.dtype == torch.float32 and got_grad.shape == case.v.shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_step_log_prob(kind: str, dtype: torch.dtype, device: torch.device,
                                      triton_ready: None) -> None:
    """Low-precision inputs are upcast exactly, so the forward stays float32-accurate."""
    case = make_case(kind, dtype=dtype, device=device, means=False)
    out = sde_log_prob(kind, case.x, case.v, case.x_next, case.sigma, case.sigma_next, backend="triton",
                       noise_level=NOISE_LEVEL[kind])
    st = step(kind, case.x, case.v, case.sigma, case.sigma_next, noise_level=NOISE_LEVEL[kind],
              prev_sample=case.x_next)
    torch.testing.assert_close(out.log_prob, st.log_prob, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.std, st.std)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_matches_reference(dtype: torch.dtype, device: torch.device, triton_ready: None) -> None:
    case = make_case("flow_grpo", dtype=dtype, device=device)
    got, got_grad = run(case, "triton")
    want, want_grad = run(case, "torch")
    assert_outputs_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grad.dtype == dtype
    # Both gradients are rounded to the input dtype: allow one rounding step of that dtype.
    assert_grads_close(got_grad, want_grad, rtol=2 * torch.finfo(dtype).eps)


def test_triton_mixed_input_dtypes(device: torch.device, triton_ready: None) -> None:
    case = make_case("dance", device=device)
    case = replace(case, v=case.v.bfloat16(), mean_ref=case.mean_ref.half())
    got, got_grad = run(case, "triton")
    want, want_grad = run(case, "torch")
    assert_outputs_close(got, want)
    assert got_grad.dtype == torch.bfloat16
    assert_grads_close(got_grad, want_grad, rtol=2 * torch.finfo(torch.bfloat16).eps)


@pytest.mark.parametrize("shape", [(2, 5), (3, 1), (2, 2048), (2, 3, 1000, 3)])
def test_triton_block_edges(shape: tuple[int, ...], device: torch.device, triton_ready: None) -> None:
    """Fewer elements than a block, one element, exactly one block, many blocks with a tail."""
    case = make_case("flow_grpo", shape=shape, device=device)
    got, got_grad = run(case, "triton")
    want, want_grad = run(case, "torch")
    assert_outputs_close(got, want)
    assert_grads_close(got_grad, want_grad, rtol=1e-5)


def test_triton_small_blocks_exercise_the_reduction_loop(monkeypatch: pytest.MonkeyPatch, device: torch.device,
                                                         triton_ready: None) -> None:
    from megaflow.kernels import logprob_triton

    monkeypatch.setattr(logprob_triton, "BLOCK", 64)
    monkeypatch.setattr(logprob_triton, "REDUCE_BLOCK", 4)
    case = make_case("cps", shape=(2, 5, 201), device=device)  # 16 blocks, last one 45 elements
    got, got_grad = run(case, "triton")
    want, want_grad = run(case, "torch")
    assert_outputs_close(got, want)
    assert_grads_close(got_grad, want_grad, rtol=1e-5)


def test_triton_non_contiguous_inputs(device: torch.device, triton_ready: None) -> None:
    base = make_case("flow_grpo", shape=(6, 4, 9, 13), device=device)
    strided = replace(
        base,
        x=base.x[::2],  # batch stride only: used in place
        v=base.v.transpose(2, 3).contiguous().transpose(2, 3)[::2],  # element strides: copied
        x_next=base.x_next[::2],
        mean_ref=base.mean_ref.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)[::2],
        mean_old=base.mean_old[::2],
        sigma=base.sigma[::2], sigma_next=base.sigma_next[::2],
    )
    names = ("x", "v", "x_next", "mean_ref", "mean_old")
    dense = replace(strided, **{k: getattr(strided, k).contiguous() for k in names})
    assert not strided.v.is_contiguous() and not strided.x.is_contiguous()
    got, got_grad = run(strided, "triton")
    want, want_grad = run(dense, "torch")
    assert_outputs_close(got, want)
    assert got_grad.shape == strided.v.shape
    assert_grads_close(got_grad, want_grad, rtol=1e-5)


def test_triton_grad_through_a_view_of_v(device: torch.device, triton_ready: None) -> None:
    case = make_case("dance", shape=(2, 6, 10), device=device)
    grads = {}
    for backend in ("triton", "torch"):
        leaf = case.v.detach().transpose(1, 2).contiguous().requires_grad_(True)
        out = sde_log_prob("dance", case.x, leaf.transpose(1, 2), case.x_next, case.sigma, case.sigma_next,
                           backend=backend, **case.kwargs())
        (out.log_prob.sum() + out.kl.sum()).backward()
        grads[backend] = leaf.grad
    assert_grads_close(grads["triton"], grads["torch"], rtol=1e-5)


@pytest.mark.parametrize("loss_fields", [("log_prob",), ("kl",), ("ratio_norm",), ("kl", "ratio_norm")])
def test_triton_grad_of_each_output(loss_fields: tuple[str, ...], device: torch.device, triton_ready: None) -> None:
    """Outputs left out of the loss get no upstream gradient; the kernel skips their terms."""
    case = make_case("cps", device=device)
    _, got_grad = run(case, "triton", loss_fields=loss_fields)
    _, want_grad = run(case, "torch", loss_fields=loss_fields)
    assert_grads_close(got_grad, want_grad, rtol=1e-5)


def test_triton_flow_grpo_at_sigma_one(device: torch.device, triton_ready: None) -> None:
    case = make_case("flow_grpo", shape=(2, 50), device=device)
    sigma = torch.tensor([1.0, 0.8], device=device)
    args = ("flow_grpo", case.x, case.v, case.x_next, sigma, sigma - 0.1)
    got = sde_log_prob(*args, sigma_max=0.95, backend="triton", **case.kwargs())
    want = sde_log_prob_torch(*args, sigma_max=0.95, **case.kwargs())
    assert_outputs_close(got, want)


def test_triton_sequence_parallel_shards_sum_to_the_full_result(device: torch.device, triton_ready: None) -> None:
    """Partial sums and counts of token shards (as SP ranks hold them) add up to the full means."""
    case = make_case("flow_grpo", shape=(2, 4, 12, 9), device=device)
    v = case.v.detach().clone().requires_grad_(True)
    names = ("x", "v", "x_next", "mean_ref", "mean_old")
    totals = {name: 0.0 for name in FIELDS}
    count = 0.0
    for part in (slice(0, 5), slice(5, 12)):
        shard = {n: (v if n == "v" else getattr(case, n))[:, :, part] for n in names}
        out = sde_log_prob("flow_grpo", shard["x"], shard["v"], shard["x_next"], case.sigma, case.sigma_next,
                           noise_level=0.7, mean_ref=shard["mean_ref"], mean_old=shard["mean_old"],
                           partial=True, backend="triton")
        totals = {name: totals[name] + getattr(out, name) for name in FIELDS}
        count = count + out.count
    assert torch.equal(count, torch.full((2,), float(case.x[0].numel()), device=device))
    (totals["log_prob"] / count).sum().backward()
    want, want_grad = run(case, "torch", loss_fields=("log_prob",))
    for name in FIELDS:
        torch.testing.assert_close(totals[name] / count, getattr(want, name), rtol=1e-5, atol=1e-5)
    weights = torch.linspace(0.5, 1.5, 2, device=device).reshape(2, 1, 1, 1)
    assert_grads_close(v.grad * weights, want_grad, rtol=1e-5)


def test_triton_is_deterministic_and_batch_invariant(device: torch.device, triton_ready: None) -> None:
    """Rollout and update must agree bit for bit, whatever the batch each was computed in."""
    case = make_case("flow_grpo", device=device)
    first, first_grad = run(case, "triton")
    second, second_grad = run(case, "triton")
    for name in FIELDS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert torch.equal(first_grad, second_grad)
    for i in range(case.x.shape[0]):
        one = Case(case.kind, *(t[i:i + 1] for t in (case.x, case.v, case.x_next, case.sigma, case.sigma_next,
                                                     case.mean_ref, case.mean_old)))
        alone = sde_log_prob(one.kind, one.x, one.v, one.x_next, one.sigma, one.sigma_next, backend="triton",
                             **one.kwargs())
        for name in FIELDS:
            assert torch.equal(getattr(alone, name), getattr(first, name)[i:i + 1]), (name, i)


def test_triton_rejects_float64(device: torch.device, triton_ready: None) -> None:
    case = make_case("cps", shape=(2, 8), dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="backend='torch'"):
        sde_log_prob("cps", case.x, case.v, case.x_next, 0.5, 0.4, noise_level=0.8, backend="triton")


def test_kernels_compile_for_hopper_without_a_gpu(triton_import_error: str | None) -> None:
    """The interpreter accepts code the GPU compiler may reject: compile every variant for sm_90."""
    if triton_import_error is not None:
        pytest.skip(f"triton does not import here ({triton_import_error})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_for_gpu.py")
    proc = subprocess.run([sys.executable, str(script), "90"], env=env, cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled for sm_90" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_triton_suite_in_fresh_process(triton_import_error: str | None, triton_in_process: bool) -> None:
    """Runs the Triton tests in a fresh interpreter when this process imported triton too early."""
    if triton_import_error is not None:
        pytest.skip(f"triton does not import here ({triton_import_error})")
    if triton_in_process:
        pytest.skip("not needed: the Triton tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "triton and not fresh_process"]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_noise_schedule_through_the_kernels(backend: str, device: torch.device, request) -> None:
    """Flow-GRPO's Wan step (`flow_grpo_linear`, s = σ_max·σ) goes through the same coefficient path."""
    if backend == "triton":
        request.getfixturevalue("triton_ready")
    g = torch.Generator().manual_seed(5)
    x, v, noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    sigma = torch.linspace(0.9, 0.3, SHAPE[0])
    st = step("flow_grpo_linear", x, v, sigma, sigma - 0.05, sigma_max=0.95, noise=noise)
    out = sde_log_prob("flow_grpo_linear", x.to(device), v.to(device), st.prev_sample.to(device), sigma.to(device),
                       (sigma - 0.05).to(device), noise_level=0.0, sigma_max=0.95, backend=backend)
    torch.testing.assert_close(out.log_prob.cpu(), st.log_prob, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.std.cpu(), 0.95 * sigma * 0.05**0.5)
