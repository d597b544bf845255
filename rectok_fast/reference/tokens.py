"""References of the MAE-style token ops: ``gather_tokens`` (keep the visible tokens) and ``restore_tokens``
(insert mask tokens and un-shuffle)."""

from __future__ import annotations

import torch

from ._upcast import up


def _take(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) or (N, D) / (1, N, D) broadcast over the batch of ids (B, K) -> (B, K, D)."""
    B = ids.shape[0]
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.shape[0] == 1 and B != 1:
        x = x.expand(B, -1, -1)
    return torch.gather(x, 1, ids.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_tokens(
    x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None, *, upcast: bool = False
) -> torch.Tensor:
    """``out[b, k] = x[b, ids_keep[b, k]] (+ pos[ids_keep[b, k]])``.

    x: (B, N, D) (or (N, D) / (1, N, D) for a table shared by the batch, e.g. RoPE rows);
    ids_keep: (B, K) int; pos: optional (N, D) or (1, N, D) added before gathering.  Returns (B, K, D)
    in the promoted dtype of ``x`` and ``pos`` (``upcast``: the sum computed in fp32 first).
    """
    out = _take(x, ids_keep)
    if pos is not None:
        dtype = torch.promote_types(x.dtype, pos.dtype)
        out = (up(out, upcast) + up(_take(pos, ids_keep), upcast)).to(dtype)
    return out


def restore_tokens(
    visible: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """The decoder's mask-token insertion (MAE): append N-K copies of ``mask_token`` to the K
    visible tokens and reorder so that token i takes element ``ids_restore[b, i]``; then ``+ pos``.

    visible: (B, K, D); ids_restore: (B, N) int (a permutation of 0..N-1);
    mask_token: (D,) or (1, 1, D); pos: optional (N, D) or (1, N, D).  Returns (B, N, D) in the
    promoted dtype of ``visible`` and ``pos`` (``upcast``: the ``+ pos`` computed in fp32 first).
    """
    B, K, D = visible.shape
    N = ids_restore.shape[1]
    # Same values as cat([visible, N-K mask tokens]).gather(ids_restore), written without a tensor of
    # N-K rows: under torch.compile with a dynamic K, N-K = 0 or 1 would specialise and recompile.
    idx = ids_restore.long()
    mt = mask_token.reshape(1, 1, D).to(visible.dtype)
    if K == 0:  # everything masked: there is no visible row to gather from
        out = mt.expand(B, N, D) + visible.sum() * 0  # keep `visible` in the graph (zero gradient)
    else:
        taken = torch.gather(visible, 1, idx.clamp(max=K - 1).unsqueeze(-1).expand(-1, -1, D))
        out = torch.where((idx < K).unsqueeze(-1), taken, mt)
    if pos is not None:
        dtype = torch.promote_types(out.dtype, pos.dtype)
        out = (up(out, upcast) + up(pos.reshape(1, N, D), upcast)).to(dtype)
    return out
