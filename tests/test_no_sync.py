"""Hot paths never read device values back to the host (DESIGN.md, "Performance before a GPU").

On the CPU there is no device to wait for, so the test watches for the Python calls that would sync
on a GPU: while :func:`no_host_reads` is active, ``Tensor.item``, ``__bool__``, ``__int__``,
``__float__``, ``__index__``, ``tolist``, ``cpu`` and ``numpy`` raise :class:`HostRead` when the
*calling* frame belongs to ``rectok_fast`` (its module name), except for the functions in
:data:`ALLOWED`.  Calls from torch, Triton's interpreter or the test itself pass.  Checked: every
fused op (forward + backward), a tokenizer micro-step and a DiT micro-step of the trainers (forward
+ backward; not the optimizer's own step, whose foreach path reads CPU step tensors), plus the
per-step host work around them (``draw_step_randomness``, the metric accumulator).  On a GPU the
same steps run under ``torch.cuda.set_sync_debug_mode("error")``, which also catches syncs made
inside torch's C++ (``nonzero``, boolean indexing, pageable copies).
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from pipeline_helpers import synthetic_latent_cache, tiny_dit_cfg, tiny_tokenizer_cfg

import rectok_fast.ops as ops
from rectok_fast._validate import check_index_range, trusted_indices

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy")

# (module, function) of rectok_fast code allowed to read device values, each with its reason.  Keep
# this short: a new entry needs a reason a reviewer accepts.
ALLOWED = {
    # logging: the accumulated means cross to the host once per log interval, not per step
    ("rectok_fast.utils.distributed", "pop_means"),
    # host-side time grids of the samplers (built on the host from Python floats, once per call)
    ("rectok_fast.sampling.solvers", "time_grid"),
}


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(allowed=ALLOWED):
    """Make host reads of tensors from ``rectok_fast`` code (outside ``allowed``) raise; yields the
    list of every violation seen (also those a caller's ``except`` swallowed)."""
    seen: list[str] = []
    orig = {m: getattr(torch.Tensor, m) for m in METHODS}

    def guard(name):
        fn = orig[name]

        def guarded(self, *args, **kwargs):
            frame = sys._getframe(1)
            mod = frame.f_globals.get("__name__", "")
            if (mod == "rectok_fast" or mod.startswith("rectok_fast.")) and (mod, frame.f_code.co_name) not in allowed:
                where = f"{mod}.{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
                seen.append(f"Tensor.{name} from {where}")
                raise HostRead(f"host read Tensor.{name} from {where}")
            return fn(self, *args, **kwargs)

        return guarded

    try:
        for m in METHODS:
            setattr(torch.Tensor, m, guard(m))
        yield seen
    finally:
        for m, fn in orig.items():
            setattr(torch.Tensor, m, fn)


# ----------------------------------------------------------------------------- the guard itself


def test_guard_catches_a_host_read_and_index_checks_stay_on_by_default():
    ids = torch.tensor([[0, 3]])
    with pytest.raises(HostRead, match="check_index_range"), no_host_reads():
        check_index_range("op", "ids", ids, 4)  # on by default: a clear error needs host values
    with no_host_reads() as seen, trusted_indices():
        check_index_range("op", "ids", ids, 4)
    assert seen == []
    with pytest.raises(ValueError, match=r"`ids` has entries in \[0, 3\], outside the valid range \[0, 3\)"):
        check_index_range("op", "ids", ids, 3)
    with trusted_indices(), pytest.raises(ValueError, match="outside"):
        check_index_range("op", "ids", ids, 3, force=True)  # the once-per-batch check of a trusting caller


def test_trusted_indices_nests_and_restores():
    from rectok_fast._validate import index_checks_enabled

    assert index_checks_enabled()
    with trusted_indices():
        assert not index_checks_enabled()
        with trusted_indices(False):
            assert index_checks_enabled()
        assert not index_checks_enabled()
    assert index_checks_enabled()


# ----------------------------------------------------------------------------- one call of every op


def _op_calls(device: str, backend: str):
    """(name, thunk) for every fused op at small shapes, forward + backward; ``backend`` for the Triton ops."""
    B, N, C, D, K = 2, 16, 8, 32, 12
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, grad=True):
        return torch.randn(*shape, device=device, generator=g).requires_grad_(grad)

    t = torch.rand(B, device=device, generator=g)
    seed = torch.tensor([7], device=device, dtype=torch.int64)  # a device seed, as the trainers pass it
    perm = torch.argsort(torch.rand(B, N, device=device, generator=g), dim=1)
    keep, restore = perm[:, :K].contiguous(), torch.argsort(perm, dim=1)
    kb = "cpp" if device == "cpu" else "auto"

    def fb(out):
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.backward([o.float().sum() for o in outs])

    calls = {
        "posterior_flow": lambda: fb(ops.posterior_flow(r(B, N, 2 * C), t, 1.0, seed=seed, backend=backend)),
        "flow_matching_loss": lambda: fb(
            ops.flow_matching_loss(r(B, N, C), r(B, N, C, grad=False), t, seed=seed, backend=backend)
        ),
        "flow_matching_xt": lambda: ops.flow_matching_xt(r(B, N, C, grad=False), t, seed=seed, backend=backend),
        "cosine_align_loss": lambda: fb(ops.cosine_align_loss(r(B, N, D), r(B, N, D, grad=False), backend=backend)),
        "kl_align_loss": lambda: fb(ops.kl_align_loss(r(B, N, D), r(B, N, D, grad=False), backend=backend)),
        "gaussian_kl": lambda: fb(ops.gaussian_kl(r(B, N, C), r(B, N, C), backend=backend)),
        "gather_tokens": lambda: fb(ops.gather_tokens(r(B, N, D), keep, r(1, N, D), backend=backend)),
        "restore_tokens": lambda: fb(ops.restore_tokens(r(B, K, D), restore, r(D), r(1, N, D), backend=backend)),
        "patchify": lambda: fb(ops.patchify(r(B, 3, 16, 16), 4, keep, backend=kb)),
        "unpatchify": lambda: fb(ops.unpatchify(r(B, N, 48), 4, 3, 4, backend=kb)),
    }
    return keep, list(calls.items())


def test_every_op_call_is_host_read_free(kernel_device):
    backend = "triton"  # the interpreter on the CPU, compiled kernels on a GPU
    keep, calls = _op_calls(kernel_device, backend)
    with no_host_reads() as seen, trusted_indices():  # indices made above: valid by construction
        for _, call in calls:
            call()
    assert seen == []
    # without trusted_indices the eager index checks are the only host reads, and they name themselves
    with no_host_reads() as seen:
        for name, call in calls:
            if name in ("gather_tokens", "restore_tokens", "patchify"):
                with pytest.raises(HostRead):
                    call()
            else:
                call()
    # the eager index-value checks (range, permutation, duplicates): gated by trusted_indices
    checks = ("_validate.check_index_range ", "ops.tokens._check_permutation ", "ops.patchify._check_ids ")
    assert seen and all(any(c in s for c in checks) for s in seen), seen


# ----------------------------------------------------------------------------- trainer micro-steps


def _tokenizer_trainer(tmp_path, device):
    from rectok_fast.train.tokenizer import TokenizerTrainer

    over = {"device": device, "data": {"global_batch_size": 4, "grad_accum": 2}}
    return TokenizerTrainer(tiny_tokenizer_cfg(str(tmp_path / "tok"), noise="kernel", **over))


def _dit_trainer(tmp_path, device):
    from rectok_fast.train.dit import DiTTrainer

    lat = synthetic_latent_cache(str(tmp_path / "lat"), n=16)
    over = {"device": device, "data": {"global_batch_size": 8, "grad_accum": 2}}
    return DiTTrainer(tiny_dit_cfg(str(tmp_path / "dit"), lat, noise="kernel", **over))


def _batches(tr, n=2):
    from rectok_fast.data.sampler import set_loader_epoch

    set_loader_epoch(tr.loader, 0, 0)
    return [b for b, _ in zip(iter(tr.loader), range(n))]


def _one_step_host_side(tr, batches):
    """What the training loop does per optimizer step, minus the optimizer: the step's randomness,
    every micro-step (forward + backward) and the metric accumulation (``Trainer.fit``)."""
    from rectok_fast.utils.distributed import MetricAccumulator

    acc = MetricAccumulator(tr.device)
    rnd = tr.draw_step_randomness(tr.global_batch)
    for m, batch in enumerate(batches):
        acc.add(**tr.micro_step(batch, rnd, m))
    acc.add(lr=tr.lr(tr.step))  # a Python float: stays on the host
    return acc


@pytest.mark.parametrize("which", ["tokenizer", "dit"])
def test_trainer_micro_steps_are_host_read_free(tmp_path, kernel_device, which):
    tr = (_tokenizer_trainer if which == "tokenizer" else _dit_trainer)(tmp_path, kernel_device)
    batches = _batches(tr, tr.accum)
    with no_host_reads() as seen:
        acc = _one_step_host_side(tr, batches)
    assert seen == []
    means = acc.pop_means()  # the allowed once-per-interval read
    assert means["lr"] == tr.lr(tr.step) and torch.isfinite(torch.tensor(means["loss"]))
    assert any(p.grad is not None for p in tr.model.parameters())


def test_metric_accumulator_makes_no_tensor_from_a_python_number(monkeypatch):
    """``acc.add(lr=lr)`` every optimizer step: a device tensor made from a Python float is a blocking
    host-to-device copy on a GPU.  Python numbers stay on the host until :meth:`pop_means`."""
    from rectok_fast.utils import distributed

    made = []
    for name in ("tensor", "as_tensor", "full", "scalar_tensor"):
        orig = getattr(torch, name)

        def spy(*a, _orig=orig, _name=name, **k):
            if sys._getframe(1).f_globals.get("__name__") == distributed.__name__:
                made.append(f"torch.{_name} in {sys._getframe(1).f_code.co_name}")
            return _orig(*a, **k)

        monkeypatch.setattr(torch, name, spy)
    acc = distributed.MetricAccumulator(torch.device("cpu"))
    for i in range(3):
        acc.add(loss=torch.tensor(float(i)))
        acc.add(lr=0.1 * (i + 1))
    assert made == []
    means = acc.pop_means()
    assert means["lr"] == pytest.approx(0.2) and means["loss"] == pytest.approx(1.0)
    assert made == ["torch.tensor in pop_means"]  # once per log interval


# ----------------------------------------------------------------------------- the same on a GPU


@pytest.mark.cuda_only
@pytest.mark.parametrize("which", ["ops", "tokenizer", "dit"])
def test_no_device_sync_on_gpu(tmp_path, which):
    """On a GPU: after a warm-up (Triton compiles, autotuning, allocator growth), the same steps under
    ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronizing CUDA call."""
    if which == "ops":
        keep, calls = _op_calls("cuda", "triton")

        def run():
            with trusted_indices():
                for _, call in calls:
                    call()
    else:
        tr = (_tokenizer_trainer if which == "tokenizer" else _dit_trainer)(tmp_path, "cuda")
        batches = [[x.cuda(non_blocking=False) if torch.is_tensor(x) else x for x in b] for b in _batches(tr, tr.accum)]

        def run():
            _one_step_host_side(tr, batches)

    run()
    run()
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()
