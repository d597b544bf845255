"""The in-kernel Gaussian noise stream shared by ``posterior_flow`` and ``flow_matching`` (version 2).

Everything here is plain ``tl`` integer and fp32 arithmetic (Philox rounds, bit manipulation,
polynomials evaluated with ``tl.fma``): no libdevice function, no inline asm, no table, no branch,
so the Triton interpreter on a CPU runs the same arithmetic as a GPU.  The two agree bit for bit
except where the interpreter rounds an ``fma`` twice (it evaluates ``x*y + z`` in fp32), i.e. to
within a few ulp; on one platform the stream is a pure function of (seed, counter).

**Generator.**  Philox-4x32 (Salmon, Moraes, Dror, Shaw, SC'11) with ``PHILOX_ROUNDS`` rounds
(10, the authors' recommended margin; they report 7 already passes BigCrush — 7 is accepted by the
kernels as an option but is a *different* stream).  Key ``(lo32(seed), hi32(seed))`` of the int64
seed; 128-bit counter ``(c0, c1, c2, c3)``.

**Counters** (both int64-safe; a group never straddles two samples, so a batch slice called with
``sample_offset = i`` draws exactly rows ``i:`` of the whole batch, whatever the per-sample size):

* posterior / flow noise of a ``(B, N, C)`` latent: element group = (global sample ``s``, token
  pair ``n // 2``, channel ``c``); counter ``(c, (n // 2) | 2**31, lo32(s), hi32(s))``.
* flow-matching x0 of a ``(B, M)`` row (``M < 2**31``): ``m = q·4W + j·W + r`` (``W = FM_LANE``,
  ``j`` in 0..3, ``r < W``); element group ``g = q·W + r``; counter ``(g, 0, lo32(s), hi32(s))``
  (bit 31 of ``c1`` separates the two families, so equal seeds give independent posterior and
  flow-matching noise).

**Normals.**  The four words ``(w0, w1, w2, w3)`` of one Philox call give two Box–Muller pairs
``(x_a, y_a) = bm(w0, w1)`` and ``(x_b, y_b) = bm(w2, w3)``:

* posterior: ``eps_post[2p] = x_a, eps_post[2p+1] = y_a, eps_flow[2p] = x_b, eps_flow[2p+1] = y_b``
  (tokens ``2p`` and ``2p + 1`` of one channel);
* flow matching: ``x0`` of lanes ``j = 0, 1, 2, 3`` is ``x_a, y_a, x_b, y_b``.

``bm(wr, wa) = (r·cos φ, r·sin φ)``: ``r = sqrt(-2·ln u)`` with ``u = fp32(wr | 1)·2**-32`` in
``(0, 1]`` (``ln`` from the fp32 exponent plus a degree-8 polynomial of the mantissa reduced to
[√½, √2), ``sqrt`` correctly rounded); ``φ = h·π/2`` with ``h = 2 + (wa >> 9)·2**-22 − 3`` in ``[-1, 1)`` (degree-9
sine / degree-8 cosine polynomials, no argument reduction needed), and bit 0 of ``wa`` negates the
cosine (the other half-turn): the angles are exactly the uniform grid of 2**24 points on the circle.  Absolute error of each normal against
the exact transform of the same ``u, φ``: below 1e-6 (relative error of the radius about 1e-7).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# the stream's constants (version, rounds, lane width) live in a module without triton
from ._stream import FM_LANE, NOISE_STREAM_VERSION, PHILOX_ROUNDS, PHILOX_ROUNDS_ALLOWED, check_rounds  # noqa: F401

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

# Philox-4x32 multipliers and Weyl key increments (Salmon et al. 2011, table 2)
_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)
_POSTERIOR_TAG = tl.constexpr(0x80000000)

# -2·ln(1 + t) = t·(L0 + t·(L1 + ... )) on t in [√½ − 1, √2 − 1]: max relative error 1.7e-7
_L0 = tl.constexpr(-1.9999998358106317)
_L1 = tl.constexpr(1.0000068866950365)
_L2 = tl.constexpr(-0.6667121380143415)
_L3 = tl.constexpr(0.49943112922652066)
_L4 = tl.constexpr(-0.3976852927376114)
_L5 = tl.constexpr(0.344250123447691)
_L6 = tl.constexpr(-0.3267586923991875)
_L7 = tl.constexpr(0.20756372109955543)
_TWO_LN2 = tl.constexpr(1.3862943611198906)
# sin(π/2·h) = h·(S0 + h²·(S1 + ...)) on h in [-1, 1]: max rel error 6.7e-9
_S0 = tl.constexpr(1.570796320148253)
_S1 = tl.constexpr(-0.6459637620614673)
_S2 = tl.constexpr(0.07968992967480848)
_S3 = tl.constexpr(-0.0046741612700554325)
_S4 = tl.constexpr(0.0001516802181775745)
# cos(π/2·h) = C0 + h²·(C1 + ...) on h in [-1, 1]: max abs error 4.7e-8
_C0 = tl.constexpr(0.9999999538570702)
_C1 = tl.constexpr(-1.2336982200123825)
_C2 = tl.constexpr(0.25365076412423393)
_C3 = tl.constexpr(-0.020810653711734073)
_C4 = tl.constexpr(0.0008582023234872671)


@triton.jit
def philox_key(SEED, seed_int, SEED_IN_PTR: tl.constexpr):
    """The Philox key ``(lo32(seed), hi32(seed))`` (uint32 scalars).  The seed is loaded from
    ``SEED`` ((1,) int64) when SEED_IN_PTR, else it is the int64 kernel scalar ``seed_int``."""
    if SEED_IN_PTR:
        s = tl.load(SEED).to(tl.int64)
    else:
        s = seed_int.to(tl.int64)
    return s.to(tl.uint32), (s >> 32).to(tl.uint32)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr):
    """``ROUNDS`` rounds of Philox-4x32 on the uint32 counter ``(c0, c1, c2, c3)`` with key ``(k0, k1)``."""
    for _ in tl.static_range(ROUNDS):
        # one 32x32 -> 64-bit product per multiplier (a single wide multiply on the GPU)
        p0 = c0.to(tl.uint64) * _M0
        p2 = c2.to(tl.uint64) * _M1
        c0 = (p2 >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (p0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = p2.to(tl.uint32)
        c3 = p0.to(tl.uint32)
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def _f32(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def bm_radius(w):
    """``sqrt(-2·ln u)``, ``u = fp32(w | 1)·2**-32`` in (0, 1]: fp32 in [0, 6.67] for uint32 ``w``.

    ``v = fp32(w | 1) = 2**k·m`` with ``m`` in [√½, √2) (the usual logf reduction, integer ops
    only), so ``-2·ln u = -2·ln2·(k − 32) − 2·ln m`` and near ``u = 1`` (k = 32) no cancellation
    occurs: the radius keeps its relative accuracy down to 0, and ``r² >= 0`` exactly."""
    v = (w | 1).to(tl.float32)  # [1, 2**32], round to nearest
    ix = v.to(tl.uint32, bitcast=True) + 0x004AFB0D  # + (bits(1) − bits(√½)): carries iff m >= √2
    e = _f32((ix >> 23) | 0x4B000000) - 8388767.0  # 2**23 + 127 + 32: k − 32, in [-32, 0]
    t = _f32((ix & 0x7FFFFF) + 0x3F3504F3) - 1.0  # m − 1, in [√½ − 1, √2 − 1)
    p = tl.fma(t, _L7, _L6)
    p = tl.fma(t, p, _L5)
    p = tl.fma(t, p, _L4)
    p = tl.fma(t, p, _L3)
    p = tl.fma(t, p, _L2)
    p = tl.fma(t, p, _L1)
    p = tl.fma(t, p, _L0)
    return tl.sqrt_rn(tl.fma(e, -_TWO_LN2, t * p))


@triton.jit
def _half_turn(w):
    """``h`` in [-1, 1) (2**23 values, step 2**-22) from the top 23 bits of ``w``: the angle is
    ``φ = h·π/2``.  Together with the cosine's sign from bit 0 the angles form the uniform grid of
    2**24 points on the circle, exactly."""
    return _f32((w >> 9) | 0x40000000) - 3.0


@triton.jit
def bm_angle_cos(w):
    """``±cos φ`` of the angle of ``w`` (see module doc; bit 0 of ``w`` is the sign), fp32."""
    h = _half_turn(w)
    h2 = h * h
    c = tl.fma(h2, _C4, _C3)
    c = tl.fma(h2, c, _C2)
    c = tl.fma(h2, c, _C1)
    c = tl.fma(h2, c, _C0)
    return _f32(c.to(tl.uint32, bitcast=True) ^ (w << 31))


@triton.jit
def bm_angle_sin(w):
    """``sin φ`` of the angle of ``w`` (see module doc), fp32."""
    h = _half_turn(w)
    h2 = h * h
    s = tl.fma(h2, _S4, _S3)
    s = tl.fma(h2, s, _S2)
    s = tl.fma(h2, s, _S1)
    s = tl.fma(h2, s, _S0)
    return h * s


@triton.jit
def box_muller(wr, wa):
    """The Box–Muller pair ``(x, y)`` of the words ``(wr, wa)`` (see module doc)."""
    r = bm_radius(wr)
    return r * bm_angle_cos(wa), r * bm_angle_sin(wa)


@triton.jit
def zero_like_layout(like):
    """A uint32 zero of ``like``'s shape that *depends* on ``like`` (a loaded tile).

    Adding it to a Philox counter makes Triton's layout propagation, which flows forward from
    loads, compute the whole noise chain in the loads' (vectorised) register layout; without it the
    four normals of one Philox call, each used by its own consumer, are computed in the default
    layout and moved through shared memory.  ``(bits >> (w - 1)) >> 1`` is 0 for every ``w``-bit
    value; the LLVM backend folds it away, so it costs no instruction.
    """
    W: tl.constexpr = like.dtype.primitive_bitwidth
    if W == 16:
        bits = like.to(tl.uint16, bitcast=True)
        return ((bits >> 15) >> 1).to(tl.uint32)
    elif W == 32:
        bits = like.to(tl.uint32, bitcast=True)
        return (bits >> 31) >> 1
    else:
        bits = like.to(tl.uint64, bitcast=True)
        return ((bits >> 63) >> 1).to(tl.uint32)


@triton.jit
def sample_words(sample):
    """``(lo32(s), hi32(s))`` of an int64 global sample index (c2, c3 of every counter)."""
    s = sample.to(tl.int64)
    return s.to(tl.uint32), (s >> 32).to(tl.uint32)


@triton.jit
def posterior_normals(
    k0, k1, s_lo, s_hi, pair, c, zero, ROUNDS: tl.constexpr, NEED_POST: tl.constexpr, NEED_FLOW: tl.constexpr
):
    """(eps_post, eps_flow) of tokens ``2·pair`` and ``2·pair + 1``, channel ``c`` (broadcast
    shapes), of the sample with words ``(s_lo, s_hi)``: ``(ep_even, ep_odd, ef_even, ef_odd)``.
    ``zero``: a uint32 zero tile of the (pair, c) shape (:func:`zero_like_layout` of a loaded tile,
    or any zero).  A pair that is not NEED_* is not computed (zeros stand in for it)."""
    # only c0 carries the tile's shape (and the loads' layout); the other words broadcast
    c0 = c.to(tl.uint32) + zero
    c1 = pair.to(tl.uint32) | _POSTERIOR_TAG
    w0, w1, w2, w3 = philox4x32(c0, c1, s_lo, s_hi, k0, k1, ROUNDS)
    pe = zero.to(tl.float32)
    po = pe
    fe = pe
    fo = pe
    if NEED_POST:
        pe, po = box_muller(w0, w1)
    if NEED_FLOW:
        fe, fo = box_muller(w2, w3)
    return pe, po, fe, fo


@triton.jit
def flow_normals(k0, k1, s_lo, s_hi, g, zero, ROUNDS: tl.constexpr):
    """x0 of lanes 0..3 of flow-matching element group ``g`` (int32 tensor, < 2**31) of the
    sample with words ``(s_lo, s_hi)``; ``zero`` as in :func:`posterior_normals`."""
    # c1, c2, c3 are scalars: the first two rounds are partly per-program (uniform) work
    c0 = g.to(tl.uint32) + zero
    w0, w1, w2, w3 = philox4x32(c0, s_lo * 0, s_lo, s_hi, k0, k1, ROUNDS)
    x0, x1 = box_muller(w0, w1)
    x2, x3 = box_muller(w2, w3)
    return x0, x1, x2, x3


@triton.jit
def to_store(x, ty: tl.constexpr):
    """``x`` cast to the output element type ``ty``, rounding to nearest even on every backend.

    The Triton interpreter (<= 3.8) truncates an fp32 -> bf16 cast where GPUs round to nearest
    even; under the interpreter (``_INTERPRET``, fixed at import like every kernel) the rounding is
    done here in integer arithmetic, so CPU tests see the GPU's numbers.  Compiled kernels use the
    native conversion."""
    if _INTERPRET and ty == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(nan, (bits >> 16) | 0x40, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ty)
