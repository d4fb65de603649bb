"""What the command lines share: their ``--help`` format, transformers' progress bars, the CPU's name."""
from __future__ import annotations

import argparse
import contextlib
import platform
from typing import Iterator


@contextlib.contextmanager
def loading_bars(show: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") off inside the block unless ``show``; restored
    after it."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was, hub_was_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    if not show:
        hf_logging.disable_progress_bar()  # switches huggingface_hub's bars off too
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()
            if hub_was_off:
                hub_utils.disable_progress_bars()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where there is none (None, off) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is empty on Linux), else what
    ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
