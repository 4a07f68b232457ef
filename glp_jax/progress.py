"""Progress bars that stay readable in logs.

On a terminal: a normal tqdm bar. When stderr is not a TTY (CI, SLURM, nohup): the same
tqdm object (update, set_postfix, close work as usual), but each refresh is written as one
plain line, at most every GLP_LOG_INTERVAL seconds (default 15), with no carriage returns;
postfix changes (loss, rates) show up in the next timed line rather than adding lines.
"""

from __future__ import annotations

import os
import sys


class _LineWriter:
    """A tqdm output file: each refresh becomes one line instead of a carriage return."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total=None, desc: str = "", unit: str = "it", enabled: bool = True,
                 stream=None, **kwargs):
    """tqdm(total, desc, unit, ...) for terminals and logs alike; disabled when not enabled.
    `total` may be an iterable (iterate over the returned bar) or a count."""
    from tqdm.auto import tqdm

    if total is not None and not isinstance(total, int | float):
        kwargs["iterable"] = total
        total = len(total) if hasattr(total, "__len__") else None
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    interval = float(os.environ.get("GLP_LOG_INTERVAL", 15.0))
    opts = dict(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=tty,
                mininterval=kwargs.pop("mininterval", 0.5) if tty else interval,
                file=stream if tty else _LineWriter(stream), ascii=not tty)
    opts.update(kwargs)
    return tqdm(**opts) if tty else _log_bar_class(tqdm)(**opts)


def _log_bar_class(tqdm):
    """tqdm whose postfix updates wait for the next timed line instead of printing one."""

    class LogBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

        def set_postfix_str(self, s="", refresh=False):
            super().set_postfix_str(s, refresh=False)

    return LogBar


# Read by huggingface_hub (and through it transformers) and by datasets when they are imported.
THIRD_PARTY_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def quiet_third_party_bars(stream=None) -> bool:
    """When `stream` (stderr) is not a terminal, turn off the tqdm bars of transformers,
    datasets and huggingface_hub: their carriage returns garble CI and SLURM logs, and our
    own bars already report the long work in plain lines. A switch the user set is kept.
    Cheap: sets the variables those libraries read at import and calls the off switch of any
    already imported. Returns whether bars were turned off."""
    stream = stream or sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        return False
    for name in THIRD_PARTY_BAR_SWITCHES:
        os.environ.setdefault(name, "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "1":
        return False
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()
    return True
