"""The factory that picks a scorer: :func:`get_scorer`.

``CT_TRIAGE_SCORER`` chooses: ``hybrid`` (default: classical lungs, lesions the 2D network
shipped with the package confirms, :mod:`worker.scoring.hybrid`; ``CT_TRIAGE_LESION_WEIGHTS``
may name other weights; ``CT_TRIAGE_MASS_EXCLUSION`` and ``CT_TRIAGE_LESION_HU_NORMALISATION`` are
its options), ``classical`` (HU rules only, transparent, needs no weights) or
``unet`` (a small 3D U-Net whose weights come from ``CT_TRIAGE_UNET_WEIGHTS``; nothing
is downloaded). Scorers are cached per process; a changed weights file
(path, mtime or size) builds a new one. Importing this module does not import torch:
the implementation modules (which do) are imported when a scorer is first built.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ct_triage.errors import ConfigError
from worker.scoring.base import Scorer

if TYPE_CHECKING:  # pragma: no cover
    from ct_triage.settings import Settings

_cache: dict[tuple, Scorer] = {}
_cache_lock = threading.Lock()


def get_scorer(settings: Settings) -> Scorer:
    """The scorer ``settings.scorer`` names (cached per process; a changed weights
    file is reloaded). Raises ConfigError for an unknown name or unusable weights."""
    kind = (settings.scorer or "hybrid").strip().lower()
    weights = Path(settings.unet_weights or "")
    if kind == "classical":
        key: tuple = ("classical",)
    elif kind == "hybrid":
        path = Path(settings.lesion_weights).expanduser() if settings.lesion_weights else _shipped_lesion_weights()
        options = (str(getattr(settings, "lesion_hu_normalisation", "off")),
                   str(getattr(settings, "mass_exclusion", "report")))
        try:
            stat = path.stat()
            key = ("hybrid", str(path.resolve()), stat.st_mtime_ns, stat.st_size, *options)
        except OSError:
            key = ("hybrid", str(path), None, None, *options)
    elif kind == "unet":
        if not settings.unet_weights:
            raise ConfigError(
                "CT_TRIAGE_SCORER=unet needs CT_TRIAGE_UNET_WEIGHTS (a weights file written by "
                "`ct-triage train`); nothing is downloaded"
            )
        path = Path(settings.unet_weights).expanduser()
        try:
            stat = path.stat()
            key = ("unet", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = ("unet", str(path), None, None)
    else:
        raise ConfigError(f"CT_TRIAGE_SCORER must be classical, hybrid or unet, got {settings.scorer!r}")
    with _cache_lock:
        scorer = _cache.get(key)
        if scorer is None:
            if kind == "classical":
                from worker.scoring.classical import ClassicalScorer  # imports torch: only when used

                scorer = ClassicalScorer()
            elif kind == "hybrid":
                from worker.scoring.hybrid import HybridScorer  # imports torch: only when used

                scorer = HybridScorer(Path(key[1]), hu_normalisation=key[4], mass_mode=key[5])
            else:
                from worker.scoring.unet import UNetScorer  # imports torch: only when used

                scorer = UNetScorer(weights)
            _cache[key] = scorer
    return scorer


def _shipped_lesion_weights() -> Path:
    """The weights file shipped in the package (``worker/scoring/weights/lesion_net.pt``),
    named without importing :mod:`worker.scoring.lesion_net` (which imports torch)."""
    return Path(__file__).resolve().parent / "weights" / "lesion_net.pt"


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
