"""Run one offline ``ct-triage`` command (:mod:`ct_triage_tools.commands`) in-process."""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stderr, redirect_stdout

from ct_triage.settings import Settings
from ct_triage_tools import commands


def run_tool_command(*argv: str, settings: Settings | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``ct-triage ARGV`` with ``settings`` (default: CPU)."""
    parser = argparse.ArgumentParser(prog="ct-triage")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.register(sub)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = args.func(args, settings or Settings.from_env({}, device="cpu"))
    return code, out.getvalue(), err.getvalue()
