"""torch.compile: the DiT^DH training step (forward + backward) and sampling compile with
``fullgraph=True`` and do not recompile from step to step (dynamo's frame counter proves it).

On the CPU the graphs are checked with the ``aot_eager`` backend (dynamo + AOTAutograd, which is
where graph breaks and recompiles come from; Inductor's C++ codegen would take minutes here); the
GPU tests run Inductor and CUDA graphs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

from rectok_fast.models.ditdh import DiTDH, training_loss
from rectok_fast.sampling import sample


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; see tests/test_ditdh.py
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(n)


def tiny(device="cpu") -> DiTDH:
    torch.manual_seed(0)
    m = DiTDH(in_channels=8, input_size=4, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 2), num_classes=5)
    for p in m.parameters():  # leave the zero init so gradients reach every parameter
        torch.nn.init.normal_(p, std=0.05)
    return m.to(device)


def _grads(m):
    return {k: p.grad.clone() for k, p in m.named_parameters()}


def test_training_step_compiles_without_recompiles():
    """Reference path (CPU): explicit t/noise → same loss and grads as eager; 4 steps, one graph."""
    m = tiny().train()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(x1, y, t, x0):
        return training_loss(m, x1, y, t=t, noise=x0, label_drop=0.0)

    cstep = torch.compile(step, backend=cnt, fullgraph=True)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        x1, x0 = torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 8, 4, 4, generator=g)
        t, y = torch.rand(3, generator=g), torch.randint(0, 6, (3,), generator=g)
        opt.zero_grad()
        eager = step(x1, y, t, x0)
        eager.backward()
        g_eager = _grads(m)
        opt.zero_grad()
        loss = cstep(x1, y, t, x0)
        loss.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
        for k, v in _grads(m).items():
            torch.testing.assert_close(v, g_eager[k], rtol=1e-4, atol=1e-6, msg=k)
        opt.step()
    assert cnt.frame_count == 1


def test_training_step_random_parts_compile():
    """Default path: times, label drop-out and x0 drawn inside the graph; no recompiles across steps."""
    m = tiny().train()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    cstep = torch.compile(lambda x1, y: training_loss(m, x1, y), backend=cnt, fullgraph=True)
    losses = []
    for _ in range(3):
        loss = cstep(torch.randn(4, 8, 4, 4), torch.randint(0, 5, (4,)))
        loss.backward()
        losses.append(loss.item())
    assert cnt.frame_count == 1
    assert len(set(losses)) == 3  # fresh randomness each step, not baked into the graph


def test_training_step_fused_path_compiles(kernel_device):
    """The fused Triton flow-matching ops (interpreter on CPU) inside the compiled step, tensor seeds."""
    m = tiny(kernel_device).train()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(x1, y, t, seed):
        return training_loss(m, x1, y, t=t, seed=seed, label_drop=0.0, backend="triton")

    cstep = torch.compile(step, backend=cnt, fullgraph=True)
    for i in range(3):
        x1 = torch.randn(2, 8, 4, 4, device=kernel_device)
        y = torch.randint(0, 5, (2,), device=kernel_device)
        t = torch.rand(2, device=kernel_device)
        seed = torch.tensor([100 + i], device=kernel_device)
        m.zero_grad()
        loss = cstep(x1, y, t, seed)
        loss.backward()
        g_c = _grads(m)
        m.zero_grad()
        eager = step(x1, y, t, seed)
        eager.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
        for k, p in m.named_parameters():
            torch.testing.assert_close(g_c[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
    assert cnt.frame_count == 1


@pytest.mark.parametrize("guidance", [None, "cfg", "autoguidance"])
def test_sampling_compiles_once(guidance):
    m = tiny().eval()
    guide = tiny().eval() if guidance == "autoguidance" else None
    if guide is not None:
        for p in guide.parameters():
            p.data.mul_(0.5)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    noise, y = torch.randn(2, 8, 4, 4), torch.tensor([1, 3])
    kw = dict(guidance=guidance, scale=1.5, guide_model=guide)
    out = sample(m, noise, y, 6, compile={"backend": cnt}, **kw)
    assert cnt.frame_count == 1  # one graph for all 6 steps (times are tensors)
    torch.testing.assert_close(out, sample(m, noise, y, 6, **kw), rtol=1e-5, atol=1e-5)


def test_import_compiles_and_queries_nothing():
    code = (
        "import torch, torch._dynamo.utils as u\n"
        "import rectok_fast.models.ditdh, rectok_fast.sampling\n"
        "from rectok_fast.models import DiTDH\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "assert not any(u.counters['stats'].values()), dict(u.counters['stats'])\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.cuda_only
def test_inductor_training_step_and_cudagraph_sampling_gpu():
    m = tiny("cuda").train()
    cstep = torch.compile(lambda x1, y, t, x0: training_loss(m, x1, y, t=t, noise=x0, label_drop=0.0), fullgraph=True)
    x1, x0 = torch.randn(4, 8, 4, 4, device="cuda"), torch.randn(4, 8, 4, 4, device="cuda")
    t, y = torch.rand(4, device="cuda"), torch.randint(0, 5, (4,), device="cuda")
    loss = cstep(x1, y, t, x0)
    loss.backward()
    eager = training_loss(m, x1, y, t=t, noise=x0, label_drop=0.0)
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-5)
    m.eval()
    noise, yy = torch.randn(2, 8, 4, 4, device="cuda"), torch.tensor([1, 3], device="cuda")
    ref = sample(m, noise, yy, 8, guidance="cfg", scale=1.5)
    out = sample(m, noise, yy, 8, guidance="cfg", scale=1.5, compile="reduce-overhead")
    out2 = sample(m, noise, yy, 8, guidance="cfg", scale=1.5, compile="reduce-overhead")
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out2, out)
