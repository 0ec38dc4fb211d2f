"""The U-Net parts both learned networks are built from, for 2D or 3D.

What
    ``ConvBlock``: two (3-wide convolution without bias, norm, activation) layers, the
    norm and activation chosen by the network (``worker.scoring.unet``: GroupNorm of at
    most 4 groups and LeakyReLU(0.1), 3D; ``worker.scoring.lesion_net``: BatchNorm and
    ReLU, 2D). ``unet_levels`` builds the encoder blocks (channels ``chans``), the
    2-stride transposed convolutions and the fusing blocks of the decoder; ``unet_pass``
    runs them (2-wide max pooling between encoder levels, skip connections
    concatenated before each fusing block).

Why here
    One definition of the U-Net shape instead of one per network. The attribute names
    (``net``, ``down``, ``up``, ``fuse``) and the order in which layers are made are
    those the networks had when the shipped weights (``weights/lesion_net.pt``) were
    written: they are the state-dict keys the checksum-verified file is loaded by, and
    the order in which training draws the initial weights.

Imports torch and nothing else of the package.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
UP = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
POOL = {2: F.max_pool2d, 3: F.max_pool3d}


class ConvBlock(nn.Module):
    """conv 3, norm, activation, conv 3, norm, activation (``dims`` 2 or 3)."""

    def __init__(self, cin: int, cout: int, dims: int, norm: Callable[[int], nn.Module],
                 activation: Callable[[], nn.Module]):
        super().__init__()
        conv = CONV[dims]
        self.net = nn.Sequential(
            conv(cin, cout, 3, padding=1, bias=False),
            norm(cout),
            activation(),
            conv(cout, cout, 3, padding=1, bias=False),
            norm(cout),
            activation(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def unet_levels(cin: int, chans: list[int], dims: int, block: Callable[[int, int], nn.Module]
                ) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList]:
    """(down, up, fuse): an encoder block per entry of ``chans`` (input ``cin`` channels),
    then, deepest first, a transposed convolution and a fusing block per decoder level."""
    down = nn.ModuleList()
    for c in chans:
        down.append(block(cin, c))
        cin = c
    up = nn.ModuleList()
    fuse = nn.ModuleList()
    for i in range(len(chans) - 1, 0, -1):
        up.append(UP[dims](chans[i], chans[i - 1], 2, stride=2))
        fuse.append(block(chans[i - 1] * 2, chans[i - 1]))
    return down, up, fuse


def unet_pass(x: torch.Tensor, down: nn.ModuleList, up: nn.ModuleList, fuse: nn.ModuleList,
              dims: int) -> torch.Tensor:
    """Features of the finest level after the encoder and decoder built by :func:`unet_levels`."""
    pool = POOL[dims]
    skips = []
    for i, block in enumerate(down):
        x = block(x)
        if i < len(down) - 1:
            skips.append(x)
            x = pool(x, 2)
    for up_i, fuse_i in zip(up, fuse):
        x = fuse_i(torch.cat([up_i(x), skips.pop()], dim=1))
    return x
