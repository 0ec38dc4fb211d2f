"""The phantom series a benchmark scores: its command-line options and one cached copy.

``--slices``, ``--rows``, ``--involvement`` and ``--seed`` pick the phantom
(``ct_triage_tools.phantom.write_phantom``); it is written once to
``<out>/phantom_<involvement>_<slices>x<rows>_s<seed>`` (bench/out is git-ignored) and
reused while its ``ground_truth.json`` is there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_phantom_arguments(parser: argparse.ArgumentParser, *, involvement: float, seed: int) -> None:
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--involvement", type=float, default=involvement)
    parser.add_argument("--seed", type=int, default=seed)


def cached_phantom(out: Path, involvement: float, slices: int, rows: int, seed: int) -> Path:
    """The phantom's folder, written first when it is not there yet."""
    folder = out / f"phantom_{involvement:g}_{slices}x{rows}_s{seed}"
    if not (folder / "ground_truth.json").exists():
        from ct_triage_tools.phantom import write_phantom

        print(f"writing phantom to {folder} ...", file=sys.stderr, flush=True)
        write_phantom(folder, involvement, slices=slices, rows=rows, seed=seed)
    return folder
