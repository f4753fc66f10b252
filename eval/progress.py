"""Progress of long loops: tqdm's bar on a terminal, a few `key:value` lines when output goes to a log or a pipe.

A bar redrawn into a file is hundreds of '\\r' frames on one line. Off a terminal, `progress_bar` prints instead one
line each time another tenth of the total is done (at least PROGRESS_GAP_S after the previous line), and one with
the final count when the total is reached or the loop ends early, such as

    progress:gptq_hessians done:32/64 pct:50 elapsed_s:12.3 rate:2.6batch/s eta_s:12.3

`progress_bar(total=n, desc=..., unit="tok", unit_scale=True, disable=not progress, leave=False)` takes tqdm's
arguments and is used like it: `.update(k)`, `.close()`, `with`, and iteration over `progress_bar(iterable, ...)`.

Code inlined into the packed train_gpt.py (tools/quant/gptq.py, tools/quant/calibrate.py, eval/) calls
packable_progress_bar instead: the same in the kit; in the packed program tqdm's own bar on a terminal and nothing
off one, ~60 code bytes instead of ~600 for LineProgress (every code byte there is a model byte less;
tests/test_pack.py holds it to a limit). The packed program's own key:value lines mark its stages in a log.
"""
from __future__ import annotations

import importlib
import math
import sys
import time

from tqdm import tqdm

from submission.config import packed

PROGRESS_GAP_S = 1.0  # seconds between lines at least: a loop done within a second prints its final line only


class LineProgress:
    """The part of tqdm's interface the kit uses, printing `progress:<desc> done:<n>/<total> ...` lines (none when
    quiet: a disabled bar)."""

    def __init__(self, iterable, total, desc, unit, unit_scale, file, quiet):
        self.iterable, self.unit, self.unit_scale, self.file, self.quiet = iterable, unit, unit_scale, file, quiet
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc = "_".join(desc.split())  # one token: the line stays `key:value` pairs
        self.n = self.shown = self.tenths = 0  # done; done at the last line; tenths of the total shown
        self.start = self.last = time.monotonic()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:  # also when the loop breaks or raises: the line says where it stopped
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.n += n
        tenths = int(10 * self.n / self.total) if self.total else 0
        if tenths > self.tenths and (self.n >= self.total or time.monotonic() - self.last >= PROGRESS_GAP_S):
            self.tenths = tenths
            self._line()

    def close(self):
        """The final count unless a line showed it already: a loop that stopped early shows where."""
        if self.n != self.shown:
            self._line()
        self.quiet = True

    def _line(self):
        now = time.monotonic()
        elapsed = now - self.start
        rate = self.n / max(elapsed, 1e-9)
        scale = min(int(math.log10(rate)) // 3, 4) if self.unit_scale and rate >= 1000 else 0  # 1.2Mtok/s
        fields = [f"progress:{self.desc}", f"done:{self.n}/{self.total or '?'}"]
        if self.total:
            fields.append(f"pct:{100 * self.n // self.total}")
        fields += [f"elapsed_s:{elapsed:.1f}", f"rate:{rate / 1000 ** scale:.3g}{' kMGT'[scale].strip()}{self.unit}/s"]
        if self.total and 0 < self.n < self.total:
            fields.append(f"eta_s:{(self.total - self.n) / rate:.1f}")
        if not self.quiet:
            print(" ".join(fields), file=self.file or sys.stderr, flush=True)
        self.shown, self.last = self.n, now


def progress_bar(iterable=None, *, total=None, desc="", unit="it", unit_scale=False, disable=False, leave=True,
                 file=None):
    """tqdm's bar when `file` (default: stderr) is a terminal, else a LineProgress; nothing shown when disable is
    True. disable=None is tqdm's meaning: the bar on a terminal, nothing anywhere else."""
    if not disable and getattr(file or sys.stderr, "isatty", bool)():
        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave, file=file)
    return LineProgress(iterable, total, desc, unit, unit_scale, file, disable is None or disable)


def packable_progress_bar(*args, disable=False, **kwargs):
    """progress_bar for code inlined into the packed train_gpt.py: there it is tqdm's own bar on a terminal and none
    in a log or a pipe (tqdm's disable=None), so LineProgress is not packed (looked up by name, it is pruned from the
    bundle: ~600 code bytes that would be model bytes) and no log fills with '\\r' frames."""
    if packed():
        return tqdm(*args, disable=disable or None, **kwargs)
    return importlib.import_module("eval.progress").progress_bar(*args, disable=disable, **kwargs)
