"""MAE-style random token masking: one plan type (:class:`Mask`) for RecTok and for any other encoder.

A plan is ``ids_keep`` (B, K), the visible token indices of each sample, and ``ids_restore``
(B, N), the inverse permutation (token ``i`` of the image takes element ``ids_restore[:, i]`` of
``[visible tokens, mask tokens]``); :attr:`Mask.token_mask` is the (B, N) bool "was masked" map.
:class:`rectok_fast.nn.TokenGather` takes ``ids_keep``, :class:`rectok_fast.nn.MaskTokenRestore`
takes ``ids_restore`` (or, for encoders that overwrite masked tokens in place, ``token_mask``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Mask", "random_masking"]


class Mask(NamedTuple):
    """A masking plan: ``ids_keep`` (B, K) visible token indices, ``ids_restore`` (B, N) the inverse
    permutation (token i of the image takes element ``ids_restore[:, i]`` of [visible, mask tokens]).
    ``Mask(None, None)`` is "no masking"."""

    ids_keep: torch.Tensor | None
    ids_restore: torch.Tensor | None

    @property
    def num_kept(self) -> int | None:
        """K, the visible tokens per sample (None without masking)."""
        return None if self.ids_keep is None else self.ids_keep.shape[1]

    @property
    def token_mask(self) -> torch.Tensor | None:
        """(B, N) bool, True where the token is masked (``ids_restore >= K``); None without masking."""
        if self.ids_restore is None or self.ids_keep is None:
            return None
        return self.ids_restore >= self.ids_keep.shape[1]

    def rows(self, start: int, stop: int) -> Mask:
        """The plan of samples ``start:stop`` (a micro-batch of a global batch's plan), with the kept
        dim of ``ids_keep`` marked dynamic again (a slice does not inherit the mark)."""
        if self.ids_keep is None:
            return self
        ids_keep = self.ids_keep[start:stop]
        torch._dynamo.maybe_mark_dynamic(ids_keep, 1)
        return Mask(ids_keep, self.ids_restore[start:stop])


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"random_masking: `{name}` must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"random_masking: `{name}` must be >= {lo}, got {value}")
    return value


def random_masking(
    batch: int,
    num_tokens: int,
    ratio: float | None = None,
    *,
    num_kept: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mark_dynamic: bool = False,
) -> Mask:
    """MAE's per-sample random masking plan (one K for the batch).

    ``ids_shuffle = argsort(rand(B, N))`` (from ``generator`` when given, on ``device``),
    ``ids_restore = argsort(ids_shuffle)``, ``ids_keep = ids_shuffle[:, :K]``.

    Args:
        batch, num_tokens: B and N.
        ratio: the masked fraction in [0, 1); ``K = int(N·(1 − ratio))`` (MAE's ``len_keep``).
        num_kept: K directly (in [1, N]) instead of ``ratio`` (exactly one of the two).
        generator: the ``torch.Generator`` the permutation is drawn from (torch's default when None).
        device: where the plan lives.
        mark_dynamic: mark the kept dim of ``ids_keep`` dynamic for ``torch.compile`` (a new K then
            does not recompile).

    Returns:
        :class:`Mask` (``ids_keep`` (B, K) int64, ``ids_restore`` (B, N) int64; ``.token_mask``).
    """
    _check_int("batch", batch, 0)
    _check_int("num_tokens", num_tokens, 1)
    if (ratio is None) == (num_kept is None):
        raise ValueError("random_masking: pass exactly one of `ratio` and `num_kept`")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"random_masking: `ratio` must be a float in [0, 1), got {ratio!r}")
        K = int(num_tokens * (1 - float(ratio)))
        if K < 1:
            raise ValueError(f"random_masking: `ratio`={ratio} keeps no token of {num_tokens}")
    else:
        K = _check_int("num_kept", num_kept, 1)
        if K > num_tokens:
            raise ValueError(f"random_masking: `num_kept` must be in [1, {num_tokens}], got {K}")
    ids_shuffle = torch.argsort(torch.rand(batch, num_tokens, device=device, generator=generator), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :K].contiguous()
    if mark_dynamic:
        torch._dynamo.maybe_mark_dynamic(ids_keep, 1)
    return Mask(ids_keep, ids_restore)
