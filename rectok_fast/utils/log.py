"""Run logging: JSONL metrics, tqdm progress bars with images/s and ETA, optional TensorBoard / W&B.

Log records of ``rectok_fast`` go through :func:`tqdm.tqdm.write` (what
``tqdm.contrib.logging.logging_redirect_tqdm`` does for a block of code, here for the whole process), so
an INFO line printed while a bar is shown lands on its own line above the bar instead of being glued
onto it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

logger = logging.getLogger("rectok_fast.train")


class _StderrHandler(logging.StreamHandler):
    """Records to whatever ``sys.stderr`` is at each record (not the one at creation, so a redirected or
    replaced stderr -- pytest's capture, a wrapper -- never gets a closed stream), through
    ``tqdm.write`` so that a line printed while a progress bar is shown lands above the bar."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                sys.stderr.write(msg + self.terminator)
            else:
                tqdm.write(msg, file=sys.stderr)
            self.flush()
        except Exception:
            self.handleError(record)


def setup_logging(out_dir: str | None, is_main: bool = True) -> None:
    """INFO to stderr (main rank) and ``OUT/log.txt``."""
    root = logging.getLogger("rectok_fast")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_rectok", False) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(fmt)
        h._rectok = True
        root.addHandler(h)
        if out_dir and is_main:
            os.makedirs(out_dir, exist_ok=True)
            fh = logging.FileHandler(os.path.join(out_dir, "log.txt"))
            fh.setFormatter(fmt)
            fh._rectok = True
            root.addHandler(fh)
    root.propagate = False


def truncate_metrics(path: str, step: int) -> int:
    """Drop the records of ``path`` (a ``metrics.jsonl``) with ``step`` after ``step``: a resumed run
    re-runs them.  Rewrites the file atomically; unparsable lines (a record cut by a kill) go too.
    Returns the number of records removed."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                s = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if s <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp_{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
        logger.info("metrics.jsonl: dropped %d record(s) after step %d (re-run after the resume)", dropped, step)
    return dropped


class MetricLogger:
    """Writes one JSON object per line to ``OUT/metrics.jsonl`` (main rank only) and mirrors scalars to
    TensorBoard / W&B when requested and installed (a clear warning otherwise, never a crash)."""

    def __init__(
        self,
        out_dir: str,
        enabled: bool = True,
        tensorboard: bool = False,
        wandb: bool = False,
        config: dict | None = None,
        project: str = "rectok_fast",
    ):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception as e:  # tensorboard not installed
                logger.warning("TensorBoard requested but unavailable (%s); logging to JSONL only", e)
        if wandb:
            try:
                import wandb as _wandb

                self.wandb = _wandb.init(project=project, dir=out_dir, config=config or {}, resume="allow")
            except Exception as e:
                logger.warning("W&B requested but unavailable (%s); logging to JSONL only", e)

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in metrics.items():
            if isinstance(v, int | float):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_bar(total: int | None, desc: str, unit: str = "img", *, enabled: bool = True, initial: int = 0, **kw: Any):
    """A tqdm bar on stderr with rate and ETA (``disable`` when not ``enabled``, e.g. on ranks > 0).

    On a terminal it redraws freely; in a log file (CI, cluster jobs) it prints one line per 30 s."""
    from tqdm.auto import tqdm

    interval = 0.1 if sys.stderr.isatty() else 30.0
    opts = dict(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        smoothing=0.1,
        file=sys.stderr,
        mininterval=interval,
        maxinterval=max(10.0, interval),
        disable=not enabled,
    )
    return tqdm(**{**opts, **kw})


class Progress:
    """tqdm bar over optimizer steps showing images/s, the latest losses and the ETA."""

    def __init__(self, start: int, total: int, images_per_step: int, enabled: bool = True, desc: str = "train"):
        self.images_per_step = images_per_step
        self.bar = None
        self._t0 = time.perf_counter()
        self._s0 = start
        if enabled:
            self.bar = progress_bar(total, desc, unit="step", initial=start)

    def update(self, step: int, metrics: dict[str, float] | None = None) -> float:
        """Advance to ``step`` (1-based count of finished steps); returns images/s since start."""
        dt = max(1e-9, time.perf_counter() - self._t0)
        ips = (step - self._s0) * self.images_per_step / dt
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics is not None:
                post = {"img/s": f"{ips:.1f}"}
                post.update({k: f"{v:.4g}" for k, v in metrics.items()})
                self.bar.set_postfix(post, refresh=False)
        return ips

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
