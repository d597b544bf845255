"""The constants that define the in-kernel noise stream (see :mod:`.philox`), without triton.

They are part of the stream's definition, so they sit beside the kernels; this module imports
nothing, so :mod:`rectok_fast.ops` (defaults, checkpoint records) reads them where triton is absent.
"""

from __future__ import annotations

#: Version of the noise stream (counter layout, transform and constants of :mod:`.philox`).
#: Training checkpoints record it; a resume under a different version regenerates different noise.
#: Version 1 (before 2026-12) used one Philox-4x32-10 call per element and Triton's
#: ``tl.randn`` transform (one Box–Muller output of each pair).
NOISE_STREAM_VERSION = 2

#: Default Philox rounds of the stream.  ``PHILOX_ROUNDS_ALLOWED`` are the values the kernels accept.
PHILOX_ROUNDS = 10
PHILOX_ROUNDS_ALLOWED = (7, 10)

#: Lane width ``W`` of the flow-matching counter layout (part of the stream definition).
FM_LANE = 512


def check_rounds(op: str, rounds: int) -> int:
    """Validate a Philox round count (a Python int) for ``op``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds not in PHILOX_ROUNDS_ALLOWED:
        raise ValueError(f"{op}: `philox_rounds` must be one of {PHILOX_ROUNDS_ALLOWED}, got {rounds!r}")
    return rounds


__all__ = ["FM_LANE", "NOISE_STREAM_VERSION", "PHILOX_ROUNDS", "PHILOX_ROUNDS_ALLOWED", "check_rounds"]
