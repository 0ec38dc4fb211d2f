"""Which torch device scoring runs on, and the process-wide torch settings it needs.

``CT_TRIAGE_DEVICE`` is ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``.
Asking for ``cuda`` on a machine without it is a configuration error (the message
says so) rather than a silent fall back: a GPU worker that quietly runs on the CPU
would miss its turnaround without anyone knowing why.

Determinism: scoring must give the same numbers for the same input. Every torch
operation the scorers use is deterministic on the CPU; on CUDA we ask torch for
deterministic algorithms (``warn_only`` so an op without a deterministic kernel
warns instead of failing) and disable the cuDNN autotuner.

A scorer loads its network on the CPU and keeps one copy per device it is asked to
run on (:class:`ModelCopies`), made on first use from the CPU model's configuration
and weights.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ct_triage.errors import ConfigError

M = TypeVar("M")

_configured = False
_lock = threading.Lock()


def cpu_threads() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def configure_torch() -> None:
    """Threads and determinism, once per process."""
    global _configured
    with _lock:
        if _configured:
            return
        import torch

        torch.set_num_threads(cpu_threads())
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        # only where CUDA is: the call imports torch's compiler stack (~1.5 s of a cold
        # start on 2 cores), and every op the scorers use is deterministic on the CPU
        if cuda_available():
            with contextlib.suppress(Exception):  # pragma: no cover - very old torch
                torch.use_deterministic_algorithms(True, warn_only=True)
        _configured = True


def cuda_available() -> bool:
    import torch

    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - broken driver
        return False


def resolve_device(requested: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cpu``/``cuda`` as asked.

    Raises ConfigError for an unknown value or ``cuda`` without a CUDA device.
    """
    value = (requested or "auto").strip().lower()
    if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
        raise ConfigError(f"CT_TRIAGE_DEVICE must be auto, cpu or cuda, got {requested!r}")
    configure_torch()
    if value == "cpu":
        return "cpu"
    if value == "auto":
        return "cuda" if cuda_available() else "cpu"
    if not cuda_available():
        raise ConfigError(
            f"CT_TRIAGE_DEVICE={requested} but torch sees no CUDA device "
            "(driver missing, CPU-only torch build, or CUDA_VISIBLE_DEVICES empty); "
            "use auto or cpu"
        )
    return value


def describe_device(device: str) -> str:
    """A short human description, e.g. ``cuda (NVIDIA H100 80GB HBM3)``."""
    if device.startswith("cuda"):
        import torch

        try:
            return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        except Exception:  # pragma: no cover
            return device
    return f"cpu ({cpu_threads()} threads)"


class ModelCopies(Generic[M]):
    """One copy of a network per device: the loaded CPU model, and for any other device
    a model of the same class and ``config()`` with the same weights, moved there and
    put in eval mode on first use.

    With ``prepare`` (an in-place inference rewrite, e.g. folding BatchNorm into the
    convolutions), every copy, the CPU one included, is built from the untouched loaded
    model and then prepared: a prepared model's weights no longer fit a fresh model of
    its class, so copies are never made from one."""

    def __init__(self, cpu_model: M, prepare: Callable[[M], M] | None = None):
        self._source = cpu_model
        self._prepare = prepare
        self._models: dict[str, M] = {} if prepare else {"cpu": cpu_model}

    def on(self, device: str) -> M:
        if device not in self._models:
            import torch

            source: Any = self._source
            model = type(source)(**source.config())
            model.load_state_dict(source.state_dict())
            model = model.to(torch.device(device)).eval()
            self._models[device] = self._prepare(model) if self._prepare else model
        return self._models[device]
