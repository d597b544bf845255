"""Train the RecTok tokenizer (method §3), stage 1 (everything) or stage 2 (pixel decoder only).

    python -m rectok_fast.train.tokenizer --config configs/tokenizer/tiny.yaml --out runs/tok --data embedded
    torchrun --nproc-per-node 8 -m rectok_fast.train.tokenizer --config configs/tokenizer/rectok_bb_stage1.yaml \\
        --data /data/imagenet/train --out runs/rectok_bb_s1

Stage 1: ``L = MSE + w_P·P + w_KL·KL + w_sem·L_sem + w_G·L_G`` on [0, 1] images in fp32
(:class:`~rectok_fast.train.losses.TokenizerLoss`; the discriminator sees [0, 1] images too and keeps
per-GPU BatchNorm statistics), the GAN (weight 0.1) from ``loss.gan_start_epoch``.  Stage 2
(``stage: 2``): starts from ``model.init``, freezes all but the pixel decoder, no masking, γ = 0 (the
posterior is still sampled), KL and semantic losses off, GAN from the start.  The mask plan and the
flow times come from the model (:meth:`RecTok.sample_mask`, ``RecTok.noiser.draw_time``), drawn once
per global batch from the shared generator.
"""

from __future__ import annotations

import logging
import os

import torch

from ..config import RunConfig
from ..data.datasets import build_image_dataset
from ..errors import CheckpointError
from ..models.loading import build_rectok, load_tokenizer
from ..models.rectok import Mask
from ..utils.ema import EMA
from ..utils.images import save_grid
from .builders import build_teacher
from .cli_common import run_training_cli
from .common import Trainer
from .losses import PatchGANDiscriminator, PerceptualLoss, TokenizerLoss

logger = logging.getLogger("rectok_fast.train")


class TokenizerTrainer(Trainer):
    kind = "tokenizer"

    def __init__(self, cfg: RunConfig, dist_info=None):
        super().__init__(cfg, dist_info)  # build(); steps per epoch (for the GAN start) are known after it
        lc, stage1 = cfg.loss, cfg.stage == 1
        self.criterion = TokenizerLoss(
            l2=lc.l2,
            perceptual_weight=lc.perceptual if self.perceptual is not None else 0.0,
            kl=lc.kl if stage1 else 0.0,
            semantic=lc.semantic if self.use_sem else 0.0,
            gan=lc.gan,
            gan_start_step=self.gan_start_step,
            perceptual=self.perceptual,
        )

    def build(self) -> None:
        cfg, mc, lc = self.cfg, self.cfg.model, self.cfg.loss
        self.dataset = build_image_dataset(cfg.data, "train", seed=cfg.seed)
        model = build_rectok(mc, cfg.data.image_size)
        if mc.init:
            src = load_tokenizer(mc.init)
            missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
            if unexpected or [k for k in missing if not k.startswith("sem_decoders.")]:
                raise CheckpointError(
                    f"model.init {mc.init}: mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            logger.info("initialised from %s", mc.init)
        if cfg.stage == 2:
            model.freeze_all_but_decoder()
        model.to(self.device)
        model.seed_masking(cfg.seed)  # the mask ratio: one draw per global batch, identical on all ranks
        self.ema = EMA(model, cfg.optim.ema_decay)  # before attaching the teacher (not copied)
        self.use_sem = lc.semantic > 0 and cfg.stage == 1 and len(model.sem_decoders) > 0
        if self.use_sem:
            model.attach_teachers({mc.teacher: build_teacher(mc, self.device, cfg.data.image_size)})
        self.raw_model = model
        self.model = self.wrap_ddp(model, find_unused=True)  # mask token unused when nothing is masked
        if cfg.compile:  # the mask is drawn outside (draw_step_randomness), so the forward compiles whole
            self.model = torch.compile(self.model)
        self.make_optimizer("model", model)
        self.perceptual = None
        if lc.perceptual > 0 and lc.perceptual_enabled:
            self.perceptual = PerceptualLoss(lc.lpips_weight, lc.convnext_weight, lc.lpips_path, lc.convnext_path).to(
                self.device
            )
        self.disc = None
        if lc.gan > 0:
            # BatchNorm statistics stay per GPU under DDP (no SyncBatchNorm), as in the published runs
            self.raw_disc = PatchGANDiscriminator(3, lc.disc_channels, lc.disc_layers).to(self.device)
            self.disc = self.wrap_ddp(self.raw_disc)
            self.make_optimizer("disc", self.raw_disc, lr_mult=lc.disc_lr_mult)
        self.preview = None

    @property
    def gan_start_step(self) -> int:
        return 0 if self.cfg.stage == 2 else int(round(self.cfg.loss.gan_start_epoch * self.spe))

    def train_models(self):
        d = {"model": self.model}
        if self.disc is not None:
            d["disc"] = self.disc
        return d

    def extra_state(self) -> dict:
        return {"mask_rng": self.raw_model.mask_rng_state}

    def load_extra_state(self, state: dict) -> None:
        if "mask_rng" in state:
            self.raw_model.mask_rng_state = state["mask_rng"]

    def draw_step_randomness(self, G: int) -> dict:
        m = self.raw_model
        c = m.config
        N, C, dev, g = c.num_tokens, c.token_channels, self.device, self.rand
        masking = self.cfg.stage == 1 and c.mask_ratio > 0
        K = m.draw_num_kept() if masking else N
        # one plan for the global batch (each micro-batch takes its rows); none when every token is kept
        rnd = {"K": K, "mask": m.sample_mask(G, dev, num_kept=K, generator=g) if K < N else Mask(None, None)}
        if self.cfg.stage == 1 and c.gamma > 0:
            rnd["t"] = m.noiser.draw_time(G, device=dev, generator=g)
        else:
            rnd["t"] = torch.zeros(G, device=dev)
        if self.noise_mode == "kernel":  # posterior + flow noise made in the kernel from this seed
            rnd["seed"] = self.draw_noise_seed()
        else:
            rnd["eps_post"] = torch.randn(G, K, C, device=dev, generator=g)
            rnd["eps_flow"] = torch.randn(G, K, C, device=dev, generator=g)
        return rnd

    def micro_step(self, batch, rnd: dict, m: int) -> dict:
        from .._validate import trusted_indices
        images = batch[0].to(self.device, non_blocking=True)
        off = self.slice_start(m)
        mask = rnd["mask"].rows(off, off + self.micro)
        if self.noise_mode == "kernel":
            nz = {"seed": rnd["seed"], "sample_offset": self.slice_start(m), "flow_backend": self.noise_backend}
        else:
            nz = {"noise": (self.slice_rnd(rnd["eps_post"], m), self.slice_rnd(rnd["eps_flow"], m))}
        # the mask is a permutation made here (argsort): valid by construction, so the ops' per-call
        # index checks (each a host sync) are skipped
        with self.autocast(), trusted_indices():
            out = self.model(images, mask=mask, t=self.slice_rnd(rnd["t"], m), **nz)
        res = self.criterion(images, out, self.step, self.disc)
        losses = {**res.terms, "loss": res.loss}
        (res.loss / self.accum).backward()
        if res.disc_loss is not None:
            (res.disc_loss / self.accum).backward()
            losses["d"] = res.disc_loss
        if self.preview is None and self.dist.is_main:
            self.preview = images[:8].detach().clone()
        return {k: v.detach() for k, v in losses.items()}

    def after_step(self) -> None:
        every = self.cfg.log.image_every
        if not (every and self.step % every == 0 and self.dist.is_main and self.preview is not None):
            return
        ema = self.ema.module
        with torch.no_grad():
            rec = ema.eval()(self.preview).float().clamp(-1, 1)
        save_grid(
            torch.cat([self.preview, rec]) * 0.5 + 0.5,
            os.path.join(self.cfg.out, "images", f"recon_{self.step:08d}.png"),
            nrow=len(self.preview),
        )

    def export(self) -> str:
        """The EMA tokenizer in ``save_pretrained`` format under ``OUT/export`` (main rank)."""
        path = os.path.join(self.cfg.out, "export")
        if self.dist.is_main:
            m = self.ema.module
            m.teachers = {}
            m.save_pretrained(path)
        return path


def train_tokenizer(cfg: RunConfig) -> dict:
    """Build a :class:`TokenizerTrainer`, fit, export the EMA weights; returns the last metrics."""
    tr = TokenizerTrainer(cfg)
    metrics = tr.fit()
    metrics["export"] = tr.export()
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return run_training_cli(
        train_tokenizer,
        prog="rectok-fast train-tokenizer",
        doc=__doc__,
        default_config="tokenizer/tiny",
        kind="tokenizer",
        argv=argv,
    )


if __name__ == "__main__":  # the rectok-fast CLI's error handling (one-line user errors, 143/130 on signals)
    from rectok_fast.cli import run_as_main

    run_as_main("train-tokenizer")
