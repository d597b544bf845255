"""Train DiT^DH on RecTok latents with flow matching (method §4).

    python -m rectok_fast.train.dit --config configs/dit/tiny.yaml data.latents=runs/latents --out runs/dit
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \\
        -m rectok_fast.train.dit --config configs/dit/ditdh_xl.yaml data.latents=/data/latents --out runs/xl distributed=fsdp

Data: the latent cache of ``cache-latents`` (``data.latents``: posterior moments, sampled on the fly
and normalised with the stored statistics) or online tokenisation of images with a frozen tokenizer
(``model.tokenizer``).  Loss: the fused flow-matching ops, with x0 either generated in the kernel
from a per-step seed and this rank's sample offset (``noise: kernel``, the default on CUDA) or passed
as a materialised tensor (``noise: materialized``); label drop-out to the null class with probability ``loss.label_dropout``; EMA; ``distributed: fsdp`` shards with FSDP2.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from ..config import RunConfig, to_dict
from ..data.datasets import build_image_dataset
from ..data.latents import LatentCacheDataset
from ..errors import ConfigError, DataError
from ..models.ditdh import label_drop_mask, training_loss
from ..models.loading import build_ditdh, load_dit, load_tokenizer
from ..ops.posterior_flow import posterior_flow
from ..sampling import sample
from ..schedules import training_time
from ..utils.ema import EMA
from ..utils.images import save_grid
from ..utils.modules import unwrap
from ..utils.rng import get_rng_state, set_rng_state
from .cli_common import run_training_cli
from .common import Trainer

logger = logging.getLogger("rectok_fast.train")


class DiTTrainer(Trainer):
    kind = "dit"

    def build(self) -> None:
        cfg, mc, d = self.cfg, self.cfg.model, self.cfg.data
        self.tokenizer = None
        if d.latents:
            self.dataset = LatentCacheDataset(d.latents)
            self.grid, self.channels = self.dataset.grid, self.dataset.channels
            mean, std = self.dataset.latent_mean, self.dataset.latent_std
            if mc.tokenizer:  # only for preview grids
                self.tokenizer = load_tokenizer(mc.tokenizer).to(self.device).eval().requires_grad_(False)
        else:
            if not mc.tokenizer:
                raise ConfigError(
                    "DiT training needs data.latents (a cache-latents directory) or model.tokenizer for online tokenisation"
                )
            self.tokenizer = load_tokenizer(mc.tokenizer).to(self.device).eval().requires_grad_(False)
            size = int(self.tokenizer.config.img_size)  # the tokenizer's input size, not the recipe's
            if d.image_size != size:
                logger.info(
                    "online tokenisation at the tokenizer's %d px (data.image_size=%d ignored)", size, d.image_size
                )
                d = dataclasses.replace(d, image_size=size)
            self.dataset = build_image_dataset(d, "train", seed=cfg.seed)
            self.grid, self.channels = self.tokenizer.grid, self.tokenizer.token_channels
            mean, std = self.tokenizer.latent_mean.cpu(), self.tokenizer.latent_std.cpu()
        if mean is None or std is None:
            raise DataError(
                "latent statistics missing: run `rectok-fast stats` on the tokenizer before caching / training"
            )
        self.scale = float(self.tokenizer.config.scale_factor) if self.tokenizer is not None else 1.0
        self.lat_mean = mean.float().to(self.device)
        self.lat_std = std.float().to(self.device)
        self.num_classes = self.data_num_classes(mc.num_classes)
        model = build_ditdh(mc, self.channels, self.grid, self.num_classes).to(self.device)
        if mc.init:
            model.load_state_dict(load_dit(mc.init).state_dict())
        self.raw_model = model
        self.ema = EMA(model, cfg.optim.ema_decay)
        self.fsdp = cfg.distributed == "fsdp" and self.dist.distributed
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard  # FSDP runs only: torch.distributed is heavy to import

            for blk in model.blocks:
                fully_shard(blk)
            fully_shard(model)
            self.model = model
        else:
            self.model = self.wrap_ddp(model)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.make_optimizer("model", model, weight_decay=cfg.optim.weight_decay)
        self.shift = float(model.default_shift)
        self.data_meta = {"grid": self.grid, "channels": self.channels, "num_classes": self.num_classes}

    def data_num_classes(self, configured: int) -> int:
        """The classes of the data (the latent cache's ``num_classes``, the image folder's classes), which
        the model must embed: ``model.num_classes`` only when the data does not say.  Labels outside
        ``[0, num_classes)`` (index ``num_classes`` is the CFG null class) are a data error."""
        n = int(getattr(self.dataset, "num_classes", 0) or 0)
        labels = getattr(self.dataset, "labels", None)
        top = int(labels.max()) if isinstance(labels, torch.Tensor) and labels.numel() else None
        if n <= 0:
            n = top + 1 if top is not None else configured
        if top is not None and (top >= n or int(labels.min()) < 0):
            raise DataError(
                f"data.latents {self.cfg.data.latents}: labels span [{int(labels.min())}, {top}] but the cache "
                f"declares {n} classes"
            )
        if n != configured:
            logger.info(
                "the data has %d classes: building a %d-class model (model.num_classes=%d ignored)", n, n, configured
            )
        return n

    def extra_state(self) -> dict:
        return {"data_meta": self.data_meta}

    def state_dict(self) -> dict:
        if not self.fsdp:
            return super().state_dict()
        from torch.distributed.checkpoint.state_dict import (  # FSDP runs only (heavy import)
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "config": to_dict(self.cfg),
            "kind": self.kind,
            "world_size": self.dist.world_size,
            "rng": get_rng_state(self.extra_generators),
            "model": get_model_state_dict(self.model, options=opts),
            "optimizers": {"model": get_optimizer_state_dict(self.model, self.optimizers["model"], options=opts)},
            "model_ema": self.ema.module.state_dict(),
            **self.extra_state(),
        }
        state["optimizer"] = state["optimizers"]["model"]
        return state

    def load_state_dict(self, state: dict) -> None:
        if not self.fsdp:
            return super().load_state_dict(state)
        from torch.distributed.checkpoint.state_dict import (  # FSDP runs only (heavy import)
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=opts)
        set_optimizer_state_dict(self.model, self.optimizers["model"], state["optimizers"]["model"], options=opts)
        self.ema.module.load_state_dict(state["model_ema"])
        self.step = int(state["step"])
        set_rng_state(state["rng"], self.extra_generators)

    def save(self) -> None:
        if not self.fsdp:
            return super().save()
        state = self.state_dict()  # collective: every rank takes part in gathering the full state
        self.write_checkpoint(lambda: state)  # main rank writes; a failure raises on every rank

    def draw_step_randomness(self, G: int) -> dict:
        """method §4's times (t = 1 data; ``t = u`` when s ≤ 1), x0 (or its seed), the posterior noise
        and the label drop-out, for the whole global batch."""
        dev, g = self.device, self.rand
        C, gr = self.channels, self.grid
        rnd = {"t": training_time(G, self.shift, device=dev, generator=g)}
        if self.noise_mode == "kernel":
            rnd["seed"] = self.draw_noise_seed()
        else:
            rnd["x0"] = torch.randn(G, C, gr, gr, device=dev, generator=g)
        rnd["eps_post"] = torch.randn(G, gr * gr, C, device=dev, generator=g)
        rnd["drop"] = label_drop_mask(G, self.cfg.loss.label_dropout, device=dev, generator=g)
        return rnd

    @torch.no_grad()
    def latents_from_batch(self, batch, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(moments or images, labels) -> normalised posterior samples (B, C, g, g) and labels (B,)."""
        x, y = batch
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.cfg.data.latents:
            moments = x.float()
        else:
            with self.autocast():
                moments = self.tokenizer.encode(x).float()
        C = self.channels
        t0 = torch.zeros(moments.shape[0], device=moments.device)  # γ = 0, t = 0: z_t = z = mean + std·eps
        z = posterior_flow(moments, t0, 0.0, noise=(eps, eps))[0]
        z = (z - self.lat_mean) * self.scale / self.lat_std
        return z.transpose(1, 2).reshape(z.shape[0], C, self.grid, self.grid).contiguous(), y

    def micro_step(self, batch, rnd: dict, m: int) -> dict:
        x1, y = self.latents_from_batch(batch, self.slice_rnd(rnd["eps_post"], m))
        if self.noise_mode == "kernel":  # x0 regenerated in-kernel (fwd + bwd of both ops), never stored
            nz = {"seed": rnd["seed"], "sample_offset": self.slice_start(m), "backend": self.noise_backend}
        else:
            nz = {"noise": self.slice_rnd(rnd["x0"], m)}
        loss = training_loss(
            self.model,
            x1,
            y,
            t=self.slice_rnd(rnd["t"], m),
            drop_mask=self.slice_rnd(rnd["drop"], m),
            autocast=self.autocast(),
            **nz,
        )
        (loss / self.accum).backward()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def preview(self, n: int = 16, steps: int = 25) -> torch.Tensor | None:
        """Class-conditional samples from the EMA model decoded by the tokenizer, [0, 1] (n, 3, H, W)."""
        if self.tokenizer is None:
            return None
        g = torch.Generator(device=self.device).manual_seed(0)
        noise = torch.randn(n, self.channels, self.grid, self.grid, device=self.device, generator=g)
        y = torch.arange(n, device=self.device) % self.num_classes
        lat = sample(self.ema.module.eval(), noise, y, steps)
        tok = self.tokenizer
        z = lat.flatten(2).transpose(1, 2) * self.lat_std / self.scale + self.lat_mean
        return (tok.decode(z).float() * 0.5 + 0.5).clamp(0, 1)

    def after_step(self) -> None:
        every = self.cfg.log.image_every
        if every and self.step % every == 0 and self.dist.is_main:
            imgs = self.preview()
            if imgs is not None:
                save_grid(imgs, os.path.join(self.cfg.out, "images", f"samples_{self.step:08d}.png"))

    def export(self) -> str:
        path = os.path.join(self.cfg.out, "export")
        if self.dist.is_main:
            unwrap(self.ema.module).save_pretrained(path)
        return path


def train_dit(cfg: RunConfig) -> dict:
    tr = DiTTrainer(cfg)
    metrics = tr.fit()
    metrics["export"] = tr.export()
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return run_training_cli(
        train_dit, prog="rectok-fast train-dit", doc=__doc__, default_config="dit/tiny", kind="dit", argv=argv
    )


if __name__ == "__main__":  # the rectok-fast CLI's error handling (one-line user errors, 143/130 on signals)
    from rectok_fast.cli import run_as_main

    run_as_main("train-dit")
