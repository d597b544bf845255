"""Tokenizer training losses (method §3): :class:`TokenizerLoss`, the stage-1/stage-2 composition the
trainer calls, and its parts beyond the fused ops: perceptual (LPIPS-VGG + ConvNeXt-S logits) and a
PatchGAN discriminator with hinge loss.

Perceptual weights are never downloaded here: they are read from an explicit path or from the
torchvision hub cache (``$TORCH_HOME/hub/checkpoints``) and the ``lpips`` package; when absent a
:class:`MissingWeightsError` says which file is needed and how to disable the term
(``loss.perceptual_enabled=false``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._constants import IMAGENET_MEAN, IMAGENET_STD
from ..errors import PathError

__all__ = [
    "ConvNeXtLogitLoss",
    "LPIPS",
    "MissingWeightsError",
    "PatchGANDiscriminator",
    "PerceptualLoss",
    "TokenizerLoss",
    "TokenizerLossOutput",
    "hinge_d_loss",
    "hinge_g_loss",
]

VGG16_FILE = "vgg16-397923af.pth"
CONVNEXT_S_FILE = "convnext_small-0c510722.pth"
LPIPS_LIN_FILE = "vgg.pth"


class MissingWeightsError(PathError):
    """Local weights a loss needs are not on disk (a user error: one line in the CLI); a FileNotFoundError."""


def _hub_checkpoints() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def find_weight(filename: str, path: str | None, extra_dirs: tuple[str, ...] = ()) -> str:
    """``path`` itself (a file), ``path/filename``, ``extra_dirs/filename`` or the torch hub cache; else raise."""
    cands = []
    if path:
        cands += [path] if os.path.isfile(path) else [os.path.join(path, filename)]
    cands += [os.path.join(d, filename) for d in extra_dirs] + [os.path.join(_hub_checkpoints(), filename)]
    for c in cands:
        if os.path.isfile(c):
            return c
    raise MissingWeightsError(
        f"perceptual loss: weight file {filename!r} not found (looked in: {', '.join(cands)}). Put it there "
        f"(e.g. download once on a machine with network and copy it), point loss.lpips_path / loss.convnext_path "
        f"at it, or disable the perceptual loss with loss.perceptual_enabled=false."
    )


def _lpips_package_dir() -> tuple[str, ...]:
    try:
        import lpips  # noqa: F401

        return (os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1"),)
    except ImportError:
        return ()


def _require_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the perceptual loss needs torchvision (pip install torchvision) or loss.perceptual_enabled=false"
        ) from e
    import torchvision.models as tvm

    return tvm


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018, the ``lpips`` package's v0.1 ``net='vgg'``) on [-1, 1] images.

    x, y: (B, 3, H, W) -> (B,) distances.  ``vgg_weights``/``lin_weights``: file paths (or None to
    look in ``path``, the lpips package and the torch hub cache).  ``pretrained=False`` builds random
    weights (tests only).
    """

    def __init__(self, path: str | None = None, pretrained: bool = True):
        super().__init__()
        _require_torchvision()
        from torchvision.models.vgg import cfgs, make_layers

        feats = make_layers(cfgs["D"], batch_norm=False)  # VGG16's conv trunk (the classifier is never used)
        if pretrained:
            sd = torch.load(find_weight(VGG16_FILE, path), map_location="cpu", weights_only=True)
            feats.load_state_dict({k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")})
        self.slices = nn.ModuleList([feats[0:4], feats[4:9], feats[9:16], feats[16:23], feats[23:30]])
        chans = (64, 128, 256, 512, 512)
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in chans])
        if pretrained:
            sd = torch.load(
                find_weight(LPIPS_LIN_FILE, path, _lpips_package_dir()), map_location="cpu", weights_only=True
            )
            for i, lin in enumerate(self.lins):
                lin.weight.data.copy_(sd[f"lin{i}.model.1.weight"])
        else:
            for lin in self.lins:
                nn.init.uniform_(lin.weight, 0.0, 0.1)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen / eval

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        b = x.shape[0]
        total = 0.0
        for sl, lin in zip(self.slices, self.lins):
            h = sl(h)
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = (f[:b] - f[b:]).pow(2)
            total = total + lin(d).mean(dim=(2, 3)).flatten()
        return total


class ConvNeXtLogitLoss(nn.Module):
    """MSE between torchvision ConvNeXt-S ImageNet logits of two [-1, 1] image batches -> (B,).

    Each batch is mapped to [0, 1], resized to 224 px with bilinear interpolation and antialias (as
    the released tokenizers were trained), then ImageNet-normalised.
    """

    def __init__(self, path: str | None = None, pretrained: bool = True):
        super().__init__()
        tvm = _require_torchvision()
        self.net = tvm.convnext_small(weights=None)
        if pretrained:
            self.net.load_state_dict(
                torch.load(find_weight(CONVNEXT_S_FILE, path), map_location="cpu", weights_only=True)
            )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> [0, 1] -> 224 px (bilinear, antialias; method §3) -> ImageNet-normalised -> logits."""
        x = x.float() * 0.5 + 0.5
        if x.shape[-1] != 224 or x.shape[-2] != 224:
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ty = self._logits(y)
        return (self._logits(x) - ty).pow(2).mean(1)


class PerceptualLoss(nn.Module):
    """method §3's ``P = (w_lpips·LPIPS + w_cnx·MSE(ConvNeXt logits)) / (w_lpips + w_cnx)``, batch-mean, 0-dim fp32."""

    def __init__(
        self,
        lpips_weight: float = 1.0,
        convnext_weight: float = 0.1,
        lpips_path: str | None = None,
        convnext_path: str | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        self.wl, self.wc = float(lpips_weight), float(convnext_weight)
        self.lpips = LPIPS(lpips_path, pretrained) if self.wl > 0 else None
        self.convnext = ConvNeXtLogitLoss(convnext_path, pretrained) if self.wc > 0 else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        if self.lpips is not None:
            total = total + self.wl * self.lpips(x, y).mean()
        if self.convnext is not None:
            total = total + self.wc * self.convnext(x, y).mean()
        return total / max(1e-12, self.wl + self.wc)

    def extra_repr(self) -> str:
        return f"lpips_weight={self.wl}, convnext_weight={self.wc}"


class PatchGANDiscriminator(nn.Module):
    """pix2pix / taming-transformers ``NLayerDiscriminator``: (B, 3, H, W) -> (B, 1, h, w) patch logits.

    Conv4×4/2 + LeakyReLU, then ``n_layers`` Conv4×4 (stride 2, the last stride 1) + BatchNorm +
    LeakyReLU with channels doubling up to 8×, then a Conv4×4/1 to one channel.  It is fed [0, 1]
    images (:class:`TokenizerLoss`).  Under data parallelism the BatchNorm statistics stay per GPU
    (plain ``BatchNorm2d``, never converted to ``SyncBatchNorm``), as in the published runs.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers += [nn.Conv2d(channels * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``½·(mean relu(1 - D(x)) + mean relu(1 + D(x̂)))``."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``L_G = -mean D(x̂)``."""
    return -logits_fake.float().mean()


# ----------------------------------------------------------------------------- the composition


@dataclass
class TokenizerLossOutput:
    """What :class:`TokenizerLoss` returns; every tensor is 0-dim fp32."""

    loss: torch.Tensor  # the generator objective, the sum of ``weighted``
    terms: dict[str, torch.Tensor]  # name -> unweighted term ("l2", "perceptual", "kl", "sem", "g")
    weighted: dict[str, torch.Tensor]  # name -> weight·term, the summands of ``loss``
    disc_loss: torch.Tensor | None  # the discriminator's hinge loss (None while the GAN is off)


class TokenizerLoss(nn.Module):
    """The RecTok stage-1/stage-2 loss composition of method §3, term by term.

    ``L = w_l2·MSE(x̂, x) + w_P·P(x̂, x) + w_KL·KL + w_sem·L_sem + w_G·L_G`` with
    ``L_G = −mean D(x̂)`` and the discriminator's ``½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))``.

    ``forward(images, outputs, step, discriminator=None)``:

    * ``images``: (B, 3, H, W) in **[-1, 1]** (the tokenizer's input range); ``outputs`` the
      :class:`rectok_fast.models.rectok.RecTokOutput` of the training forward (``reconstruction`` in
      the same [-1, 1] scale, ``kl``, ``sem_loss``).  Every term is computed in fp32 on images mapped
      to **[0, 1]** (``x·0.5 + 0.5``): the MSE, and the discriminator sees [0, 1] images for the
      generator term and for its own hinge loss alike.  ``P`` is :class:`PerceptualLoss` (LPIPS on
      the [-1, 1] pair, its own convention; ConvNeXt-S on [0, 1] at 224 px bilinear).
    * ``step``: the optimizer step; the GAN terms are on from ``gan_start_step``.
    * ``discriminator``: the :class:`PatchGANDiscriminator`, possibly DDP-wrapped.  The hinge loss
      runs through it as given (so DDP syncs its gradients); the generator term through the
      unwrapped module with its parameters frozen for that call (only the tokenizer gets gradients).

    A weight of 0 (or a missing perceptual module, or an output without ``sem_loss``) leaves the
    term out of ``terms`` and ``weighted``.  Stage 2 is the same module with ``kl = semantic = 0`` and
    ``gan_start_step = 0``.  The caller runs ``loss.backward()`` and ``disc_loss.backward()``.

    Example::

        crit = TokenizerLoss(perceptual=PerceptualLoss(), gan_start_step=100 * steps_per_epoch)
        res = crit(images, model(images), step, discriminator=disc)
        (res.loss + (res.disc_loss if res.disc_loss is not None else 0)).backward()
    """

    def __init__(
        self,
        *,
        l2: float = 1.0,
        perceptual_weight: float = 1.0,
        kl: float = 1e-6,
        semantic: float = 1.0,
        gan: float = 0.1,
        gan_start_step: int = 0,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        self.w = {"l2": float(l2), "perceptual": float(perceptual_weight), "kl": float(kl), "sem": float(semantic)}
        self.gan, self.gan_start_step = float(gan), int(gan_start_step)
        self.perceptual = perceptual if perceptual_weight > 0 else None

    def gan_active(self, step: int, discriminator: nn.Module | None) -> bool:
        """Whether the GAN terms are computed at ``step``."""
        return discriminator is not None and self.gan > 0 and step >= self.gan_start_step

    def forward(
        self, images: torch.Tensor, outputs, step: int, discriminator: nn.Module | None = None
    ) -> TokenizerLossOutput:
        recon = outputs.reconstruction.float()
        x01, r01 = images.float() * 0.5 + 0.5, recon * 0.5 + 0.5
        terms = {"l2": F.mse_loss(r01, x01)}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(recon, images)
        if self.w["kl"] > 0:
            terms["kl"] = outputs.kl.float()
        if self.w["sem"] > 0 and outputs.sem_loss is not None:
            terms["sem"] = outputs.sem_loss.float()
        weights = dict(self.w)
        disc_loss = None
        if self.gan_active(step, discriminator):
            raw = getattr(discriminator, "module", discriminator)  # DDP: the generator term skips its hooks
            raw.requires_grad_(False)
            terms["g"] = hinge_g_loss(raw(r01))
            raw.requires_grad_(True)
            weights["g"] = self.gan
            disc_loss = hinge_d_loss(discriminator(x01), discriminator(r01.detach()))
        weighted = {k: weights[k] * v for k, v in terms.items()}
        loss = weighted["l2"]
        for k in list(weighted)[1:]:
            loss = loss + weighted[k]
        return TokenizerLossOutput(loss, terms, weighted, disc_loss)

    def extra_repr(self) -> str:
        w = ", ".join(f"{k}={v}" for k, v in self.w.items())
        return f"{w}, gan={self.gan}, gan_start_step={self.gan_start_step}"
