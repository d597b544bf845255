"""Seeds, sample offsets and the materialised noise of the in-kernel Gaussian stream.

The stream itself (Philox-4x32 counters, the Box–Muller transform) is defined in
:mod:`rectok_fast.kernels.philox`, its constants (version, rounds, lane width) in
:mod:`rectok_fast.kernels._stream` (no triton); this module holds the host side shared by
:mod:`rectok_fast.ops.posterior_flow` and :mod:`rectok_fast.ops.flow_matching`:

* seeds: a Python ``int`` travels to the kernels as an int64 kernel scalar (no tensor, no
  host-to-device copy, no sync; excluded from specialisation, so a new seed never recompiles); an
  integer tensor is read by the kernel on the device (capturable in a CUDA graph with a seed that
  changes between replays).  With neither, a seed is drawn on the device (``torch.randint``).
* ``sample_offset`` validation (counters are keyed by the *global* sample index);
* :func:`noise_stream_info`, what a training checkpoint records about the stream.
"""

from __future__ import annotations

import torch

from .._backend import kernels, triton_interpret
from ..kernels._stream import FM_LANE, NOISE_STREAM_VERSION, PHILOX_ROUNDS, PHILOX_ROUNDS_ALLOWED, check_rounds
from ._launch import cdiv, next_power_of_2

__all__ = [
    "FM_LANE",
    "NOISE_STREAM_VERSION",
    "PHILOX_ROUNDS",
    "PHILOX_ROUNDS_ALLOWED",
    "check_rounds",
    "noise_stream_info",
]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_I64 = 2**63


def noise_stream_info(philox_rounds: int = PHILOX_ROUNDS) -> dict[str, int]:
    """``{"version": NOISE_STREAM_VERSION, "philox_rounds": ...}``: what identifies the in-kernel
    noise stream (record it in a checkpoint; the same seed under another version is other noise)."""
    return {"version": NOISE_STREAM_VERSION, "philox_rounds": check_rounds("noise_stream_info", philox_rounds)}


def seed_args(op: str, seed, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """``(seed_tensor, seed_int)`` for the ops: ``(None, seed)`` for a Python int (a kernel scalar;
    values in [2**63, 2**64) wrap to int64), ``((1,) int64 tensor on device, 0)`` for an integer
    tensor.  Raises ``TypeError`` / ``ValueError`` naming ``seed``."""
    if isinstance(seed, bool):
        raise TypeError(f"{op}: `seed` must be an int or an integer tensor, got bool")
    if isinstance(seed, int):
        if not -_I64 <= seed < 2 * _I64:
            raise ValueError(f"{op}: `seed` must fit in 64 bits, got {seed}")
        return None, seed - 2 * _I64 if seed >= _I64 else seed
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in _INT_DTYPES:
            raise TypeError(f"{op}: `seed` tensor must have an integer dtype, got {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"{op}: `seed` tensor must have exactly one element, got shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"{op}: `seed` is on {seed.device} but the data is on {device}")
        return seed.reshape(1).to(torch.int64), 0
    raise TypeError(f"{op}: `seed` must be an int or an integer tensor, got {type(seed).__name__}")


def default_seed(device: torch.device) -> torch.Tensor:
    """A fresh (1,) int64 seed drawn from torch's default generator on ``device`` (no host sync)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def reference_generator(seed, device: torch.device, op: str = "noise") -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (the reference path's own stream;
    a tensor seed is read back to the host here, once per call).  ``seed`` is validated exactly as on
    the fused path (:func:`seed_args`: an int in [-2**63, 2**64) or a one-element integer tensor on
    ``device``; bools, floats, strings raise naming ``op``)."""
    if seed is None:
        return None
    seed_args(op, seed, device)
    s = int(seed.reshape(-1)[0].item()) if isinstance(seed, torch.Tensor) else int(seed)
    g = torch.Generator(device=device)
    g.manual_seed(s % 2**64)
    return g


def check_sample_offset(op: str, sample_offset, batch: int) -> None:
    """Validate ``sample_offset`` (a non-negative int, or a SymInt under compile): the global sample
    index ``sample_offset + b`` must fit in int64."""
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, (int, torch.SymInt)):
        raise TypeError(f"{op}: `sample_offset` must be an int, got {type(sample_offset).__name__}")
    if sample_offset < 0:
        raise ValueError(f"{op}: `sample_offset` must be >= 0, got {sample_offset}")
    if sample_offset + batch > _I64 - 1:
        raise ValueError(f"{op}: `sample_offset`={sample_offset} puts the global sample index past int64")


def check_offset_usage(op: str, sample_offset, noise_given: bool, chosen: str) -> None:
    """``sample_offset`` only shifts the seeded Triton stream: reject it where it would be ignored."""
    if sample_offset == 0:
        return
    if noise_given:
        raise ValueError(
            f"{op}: `sample_offset` applies to the in-kernel noise stream; with explicit `noise` pass "
            "the rows of the global noise instead"
        )
    if chosen == "reference":
        raise ValueError(
            f"{op}: `sample_offset` needs the Triton stream; the reference path draws from a torch.Generator "
            "that cannot be offset (use backend='triton' or pass explicit `noise`)"
        )


def posterior_tiles(N: int, C: int, groups: int = 1024) -> tuple[int, int, int]:
    """(BLOCK_P token pairs, BLOCK_C channels, num_warps) of the posterior kernels: a function of
    the compile target (the interpreter gets big tiles to keep the program count low)."""
    pairs = next_power_of_2(max(1, (N + 1) // 2))
    if triton_interpret():
        block_c = min(next_power_of_2(C), 1024)
        return max(1, min(pairs, 8192 // block_c)), block_c, 4
    # ``groups`` Philox groups (2·groups elements) per program of 4 warps: 1024 (16 elements per
    # thread) amortise the per-thread key schedule and index math (fewest SASS per element in the
    # compile-only report; 70-170 registers depending on the mode, no spills)
    block_c = min(next_power_of_2(C), 128)
    return max(1, min(pairs, groups // block_c)), block_c, 4


def posterior_grid(B: int, N: int, C: int, block_p: int, block_c: int) -> tuple[int, int, int]:
    """(pair blocks, channel blocks, partials per sample) for a (B, N, C) latent; the samples are
    grid dim 2, launched in chunks of :data:`MAX_GRID_Z` (see :func:`batch_chunks`)."""
    nb, cb = cdiv(N, 2 * block_p), cdiv(C, block_c)
    return nb, cb, nb * cb


#: CUDA's limit on grid dims 1 and 2
MAX_GRID_Z = 65535


def batch_chunks(B: int):
    """``(b_base, count)`` launches covering B samples on grid dim 2 (one launch unless B > 65535)."""
    for b0 in range(0, B, MAX_GRID_Z):
        yield b0, min(MAX_GRID_Z, B - b0)


def flow_rows(M: int) -> tuple[int, int]:
    """(ROWS chunks of 4·FM_LANE elements per program, num_warps) of the flow-matching kernels."""
    chunks = cdiv(max(M, 1), 4 * FM_LANE)
    if triton_interpret():
        return min(next_power_of_2(chunks), 8), 4
    # one chunk of 4·FM_LANE = 2048 elements per program of 4 warps (16 per thread, ~70 registers);
    # two chunks save ~3 SASS per element at ~125 registers (compile-only report)
    return 1, 4


def check_flow_row(op: str, M: int) -> None:
    if M > 2**31 - 4 * FM_LANE:
        raise ValueError(f"{op}: at most {2**31 - 4 * FM_LANE} elements per sample are supported, got {M}")


def launch_posterior_noise(
    seed_t: torch.Tensor | None, seed_int: int, shape, device, dtype, sample_offset: int, rounds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise (eps_post, eps_flow) of ``shape`` = (B, N, C) (``flow_noise``)."""
    B, N, C = (int(s) for s in shape)
    a = torch.empty((B, N, C), device=device, dtype=dtype)
    b = torch.empty_like(a)
    if a.numel() == 0:
        return a, b
    block_p, block_c, warps = posterior_tiles(N, C)
    g0, g1, P = posterior_grid(B, N, C, block_p, block_c)
    for b0, nb in batch_chunks(B):
        kernels("posterior_flow").posterior_noise_kernel[(g0, g1, nb)](
            seed_t if seed_t is not None else a,
            a,
            b,
            N,
            C,
            P,
            seed_int,
            int(sample_offset),
            b0,
            SEED_IN_PTR=seed_t is not None,
            ROUNDS=rounds,
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=warps,
        )
    return a, b


def launch_flow_noise(
    seed_t: torch.Tensor | None, seed_int: int, B: int, M: int, device, dtype, sample_offset: int, rounds: int
) -> torch.Tensor:
    """Materialise the flow-matching x0 of B rows of M elements as a (B, M) tensor (``flow_matching_noise``)."""
    out = torch.empty((B, M), device=device, dtype=dtype)
    if out.numel() == 0:
        return out
    rows, warps = flow_rows(M)
    kernels("flow_matching").flow_noise_kernel[(B, cdiv(M, 4 * FM_LANE * rows))](
        seed_t if seed_t is not None else out,
        out,
        M,
        seed_int,
        int(sample_offset),
        SEED_IN_PTR=seed_t is not None,
        ROUNDS=rounds,
        ROWS=rows,
        LANE=FM_LANE,
        EVEN=M % (4 * FM_LANE * rows) == 0,
        num_warps=warps,
    )
    return out
