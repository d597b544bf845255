"""The training loop shared by the tokenizer and DiT trainers.

Responsibilities: process group + device, seeding, the loader over global batches, the per-step
learning rate, gradient accumulation (``no_sync`` on all but the last micro-batch), autocast,
clipping, EMA, device-side loss accumulation (one all-reduce + one host read per log interval),
atomic checkpoints with every RNG state, bit-exact resume, progress bar and JSONL metrics.

Randomness that affects the loss (masks, flow times, noise, label drop-out) is drawn for the whole
*global* batch from a generator seeded identically on every rank, and each rank keeps the slice of
its samples (:meth:`Trainer.draw_step_randomness`, :func:`rectok_fast.data.sampler.slot_offset`).
So a run on W ranks computes exactly the single-process update for the same global batch, and a
resumed run continues exactly where the stopped one was.

With ``noise: kernel`` (the default on CUDA through ``noise: auto``) the noise of the fused ops
(posterior sample / flow noise, DiT x0) is not materialised: one int64 seed per step is drawn from
that shared generator (:meth:`Trainer.draw_noise_seed`) and each rank passes it with
``sample_offset`` = its slice start in the global batch (:meth:`Trainer.slice_start`), so the
in-kernel Philox stream gives every sample the numbers it would get in a single-process run.
``noise: materialized`` (the default on the CPU) keeps explicit noise tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import RunConfig, lr_for, save_config, steps_per_epoch, to_dict, total_steps
from ..data.sampler import build_loader, set_loader_epoch, slot_offset
from ..errors import CheckpointError, ConfigError, RunDirError, TrainingInterrupted
from ..ops import noise_stream_info
from ..utils.checkpoint import NOISE_STREAM_KEY, check_noise_stream, load_latest_checkpoint, save_checkpoint
from ..utils.distributed import DistInfo, MetricAccumulator, barrier, init_distributed
from ..utils.ema import EMA, _unwrap
from ..utils.log import MetricLogger, Progress, setup_logging, truncate_metrics
from ..utils.optim import lr_at, make_adamw, set_lr
from ..utils.rng import get_rng_state, seed_everything, set_rng_state

logger = logging.getLogger("rectok_fast.train")


def autocast_ctx(device: torch.device, amp: str, amp_cpu: bool = False):
    """bf16/fp16 autocast on CUDA (on the CPU only with ``amp_cpu``), else a no-op."""
    if amp == "none" or (device.type != "cuda" and not amp_cpu):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


NOISE_MODES = ("auto", "materialized", "kernel")


def resolve_noise_mode(mode: str, device: torch.device) -> str:
    """``noise`` config value -> ``"kernel"`` | ``"materialized"`` (``auto``: kernel on CUDA)."""
    if mode not in NOISE_MODES:
        raise ConfigError(f"noise must be one of {NOISE_MODES}, got {mode!r}")
    if mode == "auto":
        return "kernel" if device.type == "cuda" else "materialized"
    if mode == "kernel" and device.type != "cuda":
        from .._backend import triton_interpret

        if not triton_interpret():
            raise ConfigError(
                "noise=kernel needs the Triton kernels: a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                "use noise=materialized or noise=auto"
            )
    return mode


def _run_in_out(out: str) -> list[str]:
    """What in ``out`` belongs to an earlier run: checkpoints, metrics, an export."""
    found = []
    ck = os.path.join(out, "checkpoints")
    if os.path.isdir(ck) and any(n.endswith(".pt") and not n.startswith(".") for n in os.listdir(ck)):
        found.append(ck)
    m = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(m) and os.path.getsize(m) > 0:
        found.append(m)
    if os.path.isdir(os.path.join(out, "export")):
        found.append(os.path.join(out, "export"))
    return found


def check_run_dir(cfg: RunConfig, is_main: bool = True) -> None:
    """Refuse to start a fresh run into an ``out`` that holds one (its ``latest.pt`` would be
    overwritten by an older step and ``metrics.jsonl`` appended to) unless ``resume`` (continue it) or
    ``overwrite`` (its checkpoints, metrics and export are removed first, on the main rank)."""
    if cfg.resume:
        return
    found = _run_in_out(cfg.out)
    if not found:
        return
    if not cfg.overwrite:
        raise RunDirError(
            f"--out {cfg.out} already holds a run ({', '.join(os.path.basename(f) for f in found)}): "
            "pass --resume to continue it or --overwrite to start afresh (its checkpoints and metrics are deleted)"
        )
    if is_main:
        for f in found:
            shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
        logger.warning("--overwrite: removed %s", ", ".join(found))


def _all_ok(ok: bool) -> bool:
    """``ok`` of every rank (a barrier under torchrun; the identity on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


class _StopSignals:
    """SIGTERM / SIGINT set a flag that the loop reads at a step boundary (the step in flight finishes).

    A second SIGINT restores the default handler's behaviour (``KeyboardInterrupt`` at once).  Under
    torchrun the flag is max-reduced over ranks every step on a CPU (gloo) group, so every rank stops
    after the same step and the collective (FSDP) save cannot deadlock.  Handlers are installed only
    from the main thread and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, distributed: bool):
        self.signum = 0
        self.distributed = distributed
        self._old: dict = {}
        self._group = None
        self._flag = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        if self.distributed:
            import torch.distributed as dist

            try:
                self._group = dist.new_group(backend="gloo")  # CPU flag: no device sync per step
                self._flag = torch.zeros(1, dtype=torch.int32)
            except Exception:  # no gloo: the default group, with a tensor on its device
                self._group = None
                dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
                self._flag = torch.zeros(1, dtype=torch.int32, device=dev)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "received %s: stopping after the current step and writing a checkpoint (Ctrl-C again aborts at once)",
            signal.Signals(signum).name,
        )

    def requested(self) -> int:
        """The signal number when any rank got one, else 0 (a collective under torchrun)."""
        if not self.distributed:
            return self.signum
        import torch.distributed as dist

        self._flag.fill_(self.signum)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(self._flag.item())


class Trainer:
    """Subclasses implement :meth:`build` (models, dataset, optimizers), :meth:`draw_step_randomness`
    and :meth:`micro_step` (forward + backward of one micro-batch, returning its scalar losses)."""

    kind = "base"

    def __init__(self, cfg: RunConfig, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.device)
        self.device = self.dist.device
        check_run_dir(cfg, self.dist.is_main)
        barrier()
        setup_logging(cfg.out, self.dist.is_main)
        d = cfg.data
        denom = self.dist.world_size * d.grad_accum
        if d.global_batch_size % denom:
            raise ConfigError(
                f"data.global_batch_size={d.global_batch_size} is not divisible by world_size×grad_accum={denom}"
            )
        self.global_batch = d.global_batch_size
        self.micro = d.global_batch_size // denom
        self.accum = d.grad_accum
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.step = 0
        self._saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.ema: EMA | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.lr_mults: dict[str, float] = {}
        self.extra_generators: dict[str, torch.Generator] = {}
        self.peak_lr = lr_for(cfg.optim, self.global_batch)
        self.build()
        self.spe = steps_per_epoch(len(self.dataset), self.global_batch)
        self.total = total_steps(cfg.optim, self.spe)
        o = cfg.optim
        self.warmup = o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_frac * self.total))
        self.loader = build_loader(
            self.dataset,
            self.micro,
            rank=self.dist.rank,
            world=self.dist.world_size,
            accum=self.accum,
            seed=cfg.seed,
            num_workers=d.num_workers,
            pin_memory=d.pin_memory and self.device.type == "cuda",
        )
        self.noise_mode = resolve_noise_mode(cfg.noise, self.device)
        # kernel mode needs the Triton Philox stream (the reference path's stream cannot be offset)
        self.noise_backend = "triton" if self.noise_mode == "kernel" else "auto"
        self.rand = torch.Generator(device=self.device).manual_seed(cfg.seed + 12345)
        self.extra_generators["global"] = self.rand
        # model-internal randomness not covered by the global generator differs per rank
        torch.manual_seed(cfg.seed + 1000 * self.dist.rank + 1)
        if cfg.resume:
            self.try_resume()

    # ------------------------------------------------------------------ to implement

    def build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def draw_step_randomness(self, global_batch: int) -> dict[str, Any]:
        """Everything random for one optimizer step, for all ``global_batch`` samples (on every rank)."""
        return {}

    def micro_step(self, batch, rnd: dict[str, Any], m: int) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook after the optimizer step (e.g. periodic image grids)."""

    def train_models(self) -> dict[str, nn.Module]:
        """name -> module whose weights go into checkpoints (the main model under ``model``)."""
        return {"model": self.model}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ helpers

    def wrap_ddp(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        if not self.dist.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused)

    def slice_start(self, m: int) -> int:
        """Global index of the first sample of this rank's micro-batch ``m`` (the ``sample_offset``)."""
        return slot_offset(m, self.dist.rank, self.dist.world_size, self.micro)

    def slice_rnd(self, t: torch.Tensor, m: int) -> torch.Tensor:
        """This rank's micro-batch ``m`` slice of a global-batch tensor."""
        off = self.slice_start(m)
        return t[off : off + self.micro]

    def draw_noise_seed(self) -> torch.Tensor:
        """One (1,) int64 seed for the in-kernel noise of a step, from the shared generator (same on
        every rank; a device tensor, so a new seed never recompiles nor syncs)."""
        return torch.randint(0, 2**62, (1,), device=self.device, dtype=torch.int64, generator=self.rand)

    def autocast(self):
        o = self.cfg.optim
        return autocast_ctx(self.device, o.amp, o.amp_cpu)

    def make_optimizer(
        self, name: str, module: nn.Module, lr_mult: float = 1.0, weight_decay: float | None = None
    ) -> None:
        o = self.cfg.optim
        wd = o.weight_decay if weight_decay is None else weight_decay
        self.optimizers[name] = make_adamw(module, self.peak_lr * lr_mult, o.betas, wd)
        self.lr_mults[name] = lr_mult

    def lr(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(
            step,
            peak=self.peak_lr,
            total=self.total,
            schedule=o.schedule,
            warmup=self.warmup,
            min_lr=o.min_lr,
            decay_start=int(round(o.decay_start_epoch * self.spe)),
            decay_end=int(round(o.decay_end_epoch * self.spe)),
        )

    @property
    def epoch(self) -> int:
        return self.step // self.spe

    def active_params(self, name: str) -> list[nn.Parameter]:
        return [p for g in self.optimizers[name].param_groups for p in g["params"]]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "config": to_dict(self.cfg),
            "kind": self.kind,
            "world_size": self.dist.world_size,
            "rng": get_rng_state(self.extra_generators),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
        }
        for k, mod in self.train_models().items():
            state[k] = _unwrap(mod).state_dict()
        state["optimizer"] = state["optimizers"].get("model")
        state["model_ema"] = self.ema.module.state_dict() if self.ema is not None else None
        state.update(self.extra_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        for k, mod in self.train_models().items():
            _unwrap(mod).load_state_dict(state[k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        if self.ema is not None and state.get("model_ema") is not None:
            self.ema.module.load_state_dict(state["model_ema"])
        self.step = int(state["step"])
        if int(state.get("world_size", 1)) == self.dist.world_size:
            set_rng_state(state["rng"], self.extra_generators)
        else:  # the global generator is rank-independent; per-rank torch RNGs are re-seeded
            set_rng_state({**state["rng"], "torch": torch.get_rng_state(), "cuda": None}, self.extra_generators)
            logger.warning(
                "resuming on %d ranks a run saved on %d: per-rank RNG streams re-seeded",
                self.dist.world_size,
                state.get("world_size"),
            )
        self.load_extra_state(state)

    def try_resume(self) -> bool:
        found = load_latest_checkpoint(self.cfg.out, map_location=self.device)
        if found is None:
            logger.info("--resume: no checkpoint under %s/checkpoints, starting from scratch", self.cfg.out)
            return False
        path, state = found
        kind = state.get("kind")
        if kind != self.kind:
            what = f"a {kind!r} training checkpoint" if kind else f"no training run (keys: {sorted(state)[:8]})"
            raise CheckpointError(f"--resume: {path} holds {what}, not a {self.kind!r} one")
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as e:
            first = " ".join(str(e).split())[:240]
            raise CheckpointError(
                f"--resume: {path} does not match this run's config (model or optimizer differ: {first})"
            ) from e
        self._saved_step = self.step
        check_noise_stream(state, noise_stream_info(), mode=self.noise_mode, path=path)
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    def checkpoint_path(self) -> str:
        """Where the state of the last save is (``OUT/checkpoints/latest.pt``)."""
        return os.path.join(self.cfg.out, "checkpoints", "latest.pt")

    def save(self) -> None:
        self.write_checkpoint(self.state_dict)

    def write_checkpoint(self, state_fn) -> None:
        """``save_checkpoint(state_fn())`` on the main rank; every rank learns whether it worked, so a
        failed write (a full disk) raises on all ranks instead of leaving the others in a barrier.
        ``state_fn`` is called on the main rank only (gather a sharded state before: a collective)."""
        err: BaseException | None = None
        if self.dist.is_main:
            lg = self.cfg.log
            try:
                # every checkpoint records the noise stream: a resume under another one warns (check_noise_stream)
                state = {**state_fn(), NOISE_STREAM_KEY: noise_stream_info(), "noise_mode": self.noise_mode}
                save_checkpoint(
                    state, self.cfg.out, self.step, keep_last=lg.keep_last, milestone_every=lg.milestone_every
                )
            except Exception as e:
                err = e
        if not _all_ok(err is None) and err is None:
            raise CheckpointError(f"the main rank could not write the checkpoint of step {self.step} (see its error)")
        if err is not None:
            raise err

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train until ``optim``'s schedule ends or ``max_steps`` optimizer steps are done; returns the
        last logged metrics (plus ``step`` and ``seconds``)."""
        cfg, lg = self.cfg, self.cfg.log
        stop = self.total if cfg.max_steps is None else min(self.total, cfg.max_steps)
        if self.dist.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            save_config(cfg, os.path.join(cfg.out, "config.yaml"))
            if cfg.resume:  # the steps after the checkpoint (all, without one) are re-run: drop their old records
                truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), self.step)
        mlog = MetricLogger(
            cfg.out,
            enabled=self.dist.is_main,
            tensorboard=lg.tensorboard,
            wandb=lg.wandb,
            config=to_dict(cfg),
            project=lg.wandb_project,
        )
        label = f"{self.kind} stage {cfg.stage}" if self.kind == "tokenizer" else self.kind  # the bar's and log's name
        prog = Progress(self.step, stop, self.global_batch, enabled=lg.progress and self.dist.is_main, desc=label)
        acc = MetricAccumulator(self.device)
        logger.info(
            "%s: %d steps (%d/epoch, schedule %d), global batch %d = %d × %d ranks × %d accum, peak lr %.3g, device %s",
            label, stop - self.step, self.spe, self.total, self.global_batch, self.micro, self.dist.world_size, self.accum, self.peak_lr, self.device,
        )  # fmt: skip
        last: dict = {}
        t0 = time.perf_counter()
        try:
            with _StopSignals(self.dist.distributed) as stopper:
                last = self._loop(stop, prog, acc, mlog, stopper)
        finally:
            prog.close()
            mlog.close()
        last.update(step=self.step, seconds=time.perf_counter() - t0)
        return last

    def _loop(self, stop: int, prog, acc, mlog, stopper: _StopSignals) -> dict:
        lg = self.cfg.log
        last: dict = {}
        it = None
        cur_epoch = None
        while self.step < stop:
            if cur_epoch != self.epoch or it is None:
                cur_epoch = self.epoch
                set_loader_epoch(self.loader, cur_epoch, self.step % self.spe)
                it = iter(self.loader)
            lr = self.lr(self.step)
            for name, opt in self.optimizers.items():
                set_lr(opt, lr * self.lr_mults[name])
            rnd = self.draw_step_randomness(self.global_batch)
            for m in range(self.accum):
                batch = next(it)
                sync = m == self.accum - 1
                ctxs = [mod.no_sync() for mod in self.ddp_modules() if not sync]
                with contextlib.ExitStack() as stack:
                    for c in ctxs:
                        stack.enter_context(c)
                    losses = self.micro_step(batch, rnd, m)
                acc.add(**losses)
            self.optimizer_step()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.model)
            acc.add(lr=lr)
            if self.step % lg.log_every == 0 or self.step == stop:
                means = acc.pop_means()
                ips = prog.update(self.step, {k: v for k, v in means.items() if k != "lr"})
                last = {**means, "img_per_s": ips, "epoch": self.epoch}
                mlog.log(self.step, **last)
            else:
                prog.update(self.step)
            self.after_step()
            if self.step % lg.ckpt_every == 0 or self.step == stop:
                self.save()
                self._saved_step = self.step
            signum = stopper.requested()
            if signum:
                if self._saved_step != self.step:
                    self.save()
                    self._saved_step = self.step
                path = self.checkpoint_path()
                logger.warning(
                    "stopped by %s after step %d; checkpoint %s", signal.Signals(signum).name, self.step, path
                )
                raise TrainingInterrupted(signum, self.step, path)
        return last

    def ddp_modules(self) -> list[nn.Module]:
        mods = [getattr(m, "_orig_mod", m) for m in self.train_models().values()]  # see through torch.compile
        return [m for m in mods if isinstance(m, DDP)]

    def optimizer_step(self) -> None:
        clip = self.cfg.optim.grad_clip
        for name, opt in self.optimizers.items():
            if clip is not None and clip > 0 and name == "model":
                torch.nn.utils.clip_grad_norm_(self.active_params(name), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
