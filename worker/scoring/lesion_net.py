"""The learned 2D lesion network: its definition, its input mapping and a checksummed loader.

What
    A small 2D U-Net (``LesionNet``) that maps one lung-cropped axial slice, gray levels
    as in a lung-windowed 8-bit image, to a per-pixel lesion logit (ground glass and
    consolidation together, the COVID-SemiSeg definition). It runs at a fixed square
    input of ``config["size"]`` pixels (the crop is resized to it and the probability
    resized back). Trained by ``ct_triage_tools.train_lesion`` (``ct-triage train
    --lesion``); the model card is ``worker/scoring/weights/MODEL_CARD.md``.

Why 2D and why this size
    The only real COVID-19 lesion masks reachable are 2D slices (COVID-SemiSeg: 50 + 24
    radiologist-drawn, 1600 pseudo-labelled slices of 20 volumes), so the network sees
    one slice at a time. The width (``base`` 16 channels, 4 levels) and input size keep a
    forward pass of ~250 lung slices of a 512x512x300 CT within a few seconds on a
    2-core CPU, beside the classical lung step.

HU to gray (the mapping applied at inference on real HU volumes)
    The training images are 8-bit lung-windowed slices without HU, from three sources
    that window differently. Each source's window was fitted from its tissue peaks
    (``gray = (HU - low) / (high - low) * 255``; ``ct_triage_tools/train_lesion.py:
    fit_window`` prints the table):

    =================  ======================  ==========================  ============
    tissue             HU (real CT, mode)      gray, coronacases.org       gray, MedSeg
    =================  ======================  ==========================  ============
    outside air        -997.5                  0 (0.5th percentile)        14.5
    lung parenchyma    -872.5                  14                          44
    soft tissue        +37.5                   100                         253 (saturated)
    =================  ======================  ==========================  ============

    coronacases.org (two thirds of the pseudo-labelled slices): least squares over the
    three peaks, -1019..+1676 HU. MedSeg (the radiologist-drawn ``train/`` and ``val/``):
    soft tissue saturates, so the fit is from air and lung, -1059..+21 HU. Radiopaedia's
    crops hold no outside air and saturate soft tissue, so no window can be fitted; they
    are lung-windowed already and are used as they are.

    The network's input window is MedSeg's, ``WINDOW_LOW_HU, WINDOW_HIGH_HU = -1059, 21``.
    It is the window of the radiologist labels and of the yardstick (``val/`` is then
    scored as it is). Training re-windows the coronacases images into it: gray -> HU by
    their fitted window, then HU -> gray by the network's. Their lung peak, 14, lands on
    44, MedSeg's own, and their soft tissue saturates as MedSeg's does. At inference,
    ``hu_to_gray`` maps the CT's HU by that same window.

    Why it matters: the earlier file was trained on the images as they came and mapped
    HU by the pooled fit (-1019..+1676, the coronacases window). Alone, it found 9 / 18 /
    22 % of the phantoms' 20 / 45 / 85 % ground glass and 8.8 % of the lungs on the real
    COVID-19 slices of COVID-19-NY-SBU. Trained and applied in one frame, the same
    network and recipe find 12 / 27 / 38 % and 11.6 % (see the model card).
    The window a file was trained with is stored with it (``meta["window_hu"]``), and
    the scorer maps HU by the file's window.

Weights
    ``weights/lesion_net.pt`` (package data) with ``weights/lesion_net.pt.sha256``. The
    loader hashes the file and refuses it, naming both digests, when the hash does not
    match; only then does it call ``torch.load(..., weights_only=True)`` (tensors and
    plain containers only, no pickled code). Nothing is ever downloaded.

This module imports nothing else of the package but the torch-only U-Net parts
(:mod:`worker.scoring.unet_blocks`), so offline tools can use it alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from worker.scoring.unet_blocks import ConvBlock, unet_levels, unet_pass

NAME = "ct-triage-lesion2d"
FORMAT = "ct-triage-lesion2d/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "lesion_net.pt"

# -- HU -> gray window (fitted; see the module docstring) --------------------------------
WINDOW_LOW_HU = -1059.0
WINDOW_HIGH_HU = 21.0

# -- input normalisation of gray/255 (dataset mean and spread, rounded) -------------------
GRAY_MEAN = 0.45
GRAY_STD = 0.25

DEFAULT_CONFIG = {"base": 16, "levels": 4, "size": 128}


class WeightsError(RuntimeError):
    """A weights file that cannot be used (missing, altered, foreign, wrong shape)."""


Window = tuple[float, float]


def hu_to_gray(hu: torch.Tensor | np.ndarray, window: Window = (WINDOW_LOW_HU, WINDOW_HIGH_HU)) -> torch.Tensor:
    """Gray levels in [0, 1] (gray/255) of HU values by ``window`` (HU at gray 0 and 255);
    the default is the network input window; a weights file names its own (``meta``)."""
    low, high = window
    t = torch.as_tensor(hu, dtype=torch.float32)
    return ((t - low) / (high - low)).clamp_(0.0, 1.0)


def window_of(meta: dict, path: Path | str = "weights") -> Window:
    """The HU window a weights file was trained with (``meta["window_hu"]``), checked."""
    window = meta.get("window_hu")
    try:
        low, high = (float(v) for v in window)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise WeightsError(f"lesion weights {path} name no HU window (meta window_hu={window!r})") from None
    if not (-2000.0 <= low < high <= 4000.0):
        raise WeightsError(f"lesion weights {path} name an impossible HU window {window!r}")
    return low, high


def _block(cin: int, cout: int) -> ConvBlock:
    return ConvBlock(cin, cout, 2, norm=nn.BatchNorm2d, activation=lambda: nn.ReLU(inplace=True))


class LesionNet(nn.Module):
    """2D U-Net on a half-resolution grid, with a full-resolution edge refinement.

    A stride-2 stem takes the ``size``-pixel input to ``size/2``; a U-Net of ``levels``
    resolutions (``base`` channels doubling) runs there (four fifths of the cost of a
    full-resolution U-Net is saved, which is what makes a CPU forward pass cheap); its
    last features are upsampled back and fused with a thin (``EDGE`` channels)
    full-resolution branch so lesion margins follow the image. One logit channel."""

    EDGE = 8

    def __init__(self, base: int = 16, levels: int = 4, size: int = 128):
        super().__init__()
        if base < 1 or levels < 2 or size % (2 ** levels):
            raise ValueError(f"LesionNet: bad config base={base} levels={levels} size={size}")
        self.base, self.levels, self.size = int(base), int(levels), int(size)
        chans = [base * 2 ** i for i in range(levels)]
        e = self.EDGE
        self.edge = nn.Sequential(nn.Conv2d(1, e, 3, padding=1, bias=False), nn.BatchNorm2d(e),
                                  nn.ReLU(inplace=True))
        self.stem = nn.Sequential(nn.Conv2d(1, base, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(base), nn.ReLU(inplace=True))
        self.down, self.up, self.fuse = unet_levels(base, chans, 2, _block)
        self.to_full = nn.ConvTranspose2d(chans[0], e, 2, stride=2)
        self.refine = nn.Sequential(nn.Conv2d(2 * e, e, 3, padding=1, bias=False), nn.BatchNorm2d(e),
                                    nn.ReLU(inplace=True))
        self.head = nn.Conv2d(e, 1, 1)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) of gray/255 images (N, 1, H, W); H, W multiples of 2**levels."""
        x0 = (gray - GRAY_MEAN) / GRAY_STD
        x = unet_pass(self.stem(x0), self.down, self.up, self.fuse, 2)
        x = self.refine(torch.cat([self.to_full(x), self.edge(x0)], dim=1))
        return self.head(x)

    def config(self) -> dict:
        return {"base": self.base, "levels": self.levels, "size": self.size}


def probability(model: LesionNet, gray: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Lesion probability of gray/255 images (N, 1, S, S) at the model's size; with
    ``flip`` the mean of the image and its left-right mirror (test-time augmentation)."""
    p = torch.sigmoid(model(gray))
    if flip:
        p = 0.5 * (p + torch.sigmoid(model(gray.flip(-1))).flip(-1))
    return p


def predict_images(model: LesionNet, images: list[torch.Tensor], *, batch: int = 16,
                   flip: bool = True) -> list[torch.Tensor]:
    """Probability maps (H, W) of gray/255 images (H, W) of any size: each is resized to
    the model's square input, scored in batches and the probability resized back."""
    s = model.size
    out: list[torch.Tensor] = []
    dev = next(model.parameters()).device
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        x = torch.stack([F.interpolate(im[None, None].float(), size=(s, s), mode="bilinear",
                                       align_corners=False, antialias=True)[0]
                         for im in chunk]).to(dev)
        p = probability(model, x, flip=flip)
        for im, pi in zip(chunk, p):
            out.append(F.interpolate(pi[None], size=tuple(im.shape), mode="bilinear",
                                     align_corners=False)[0, 0].cpu())
    return out


def fold_batch_norm(model: LesionNet) -> LesionNet:
    """The model for inference with each BatchNorm folded into the convolution before it
    (same outputs up to float rounding; ~15 % less CPU time). In place; eval mode."""
    model.eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            bias = bn.bias.detach() - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias.detach() * scale
            conv.weight = nn.Parameter(conv.weight.detach() * scale[:, None, None, None])
            conv.bias = nn.Parameter(bias)
            seq[i + 1] = nn.Identity()
    return model


# -- weights files -------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".sha256")


def expected_sha256(path: Path) -> str:
    """The digest recorded beside ``path`` (``<hex>  <name>`` as sha256sum writes it)."""
    side = checksum_path(path)
    if not side.is_file():
        raise WeightsError(f"lesion weights {path}: checksum file {side} is missing; refusing to load")
    text = side.read_text(encoding="ascii", errors="replace").split()
    if not text or len(text[0]) != 64 or any(c not in "0123456789abcdef" for c in text[0].lower()):
        raise WeightsError(f"lesion weights {path}: checksum file {side} holds no SHA-256 digest")
    return text[0].lower()


def load_weights(path: Path | None = None, *, verify: bool = True) -> tuple[LesionNet, dict]:
    """The network and its metadata from a weights file, checksum verified first.

    Raises ``WeightsError`` naming the file for a missing, altered (digest mismatch),
    unreadable or foreign file."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise WeightsError(f"lesion weights {path} do not exist (write them with `ct-triage train --lesion`)")
    if verify:
        want = expected_sha256(path)
        got = sha256_of(path)
        if got != want:
            raise WeightsError(
                f"lesion weights {path} were altered: SHA-256 {got} does not match the recorded "
                f"{want} ({checksum_path(path).name}); refusing to load"
            )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"lesion weights {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "state_dict" not in blob:
        raise WeightsError(f"lesion weights {path} are not a {FORMAT} file")
    meta = dict(blob.get("meta") or {})
    meta["window_hu"] = list(window_of(meta, path))
    try:
        model = LesionNet(**dict(blob.get("config") or DEFAULT_CONFIG))
        state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
        model.load_state_dict(state)
    except Exception as exc:
        raise WeightsError(f"lesion weights {path} do not fit the network: {exc}") from exc
    model.eval()
    return model, meta


def save_weights(model: LesionNet, path: Path, meta: dict | None = None, *, half: bool = True) -> str:
    """Write the weights file (float16 tensors when ``half``) and its ``.sha256``; returns the digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().clone()
        state[k] = v.half() if (half and v.is_floating_point()) else v
    meta = dict(meta or {})
    meta.setdefault("window_hu", [WINDOW_LOW_HU, WINDOW_HIGH_HU])
    blob = {"format": FORMAT, "config": model.config(), "state_dict": state, "meta": meta}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    digest = sha256_of(path)
    checksum_path(path).write_text(f"{digest}  {path.name}\n", encoding="ascii")
    return digest
