"""eval/progress.py: a tqdm bar on a terminal, a few `key:value` lines in a log, nothing when disabled."""
import io
from types import SimpleNamespace

import pytest
from tqdm import tqdm

from eval import progress as progress_module
from eval.progress import LineProgress, packable_progress_bar, progress_bar


@pytest.fixture
def clock(monkeypatch):
    """A fake monotonic clock: each reading `clock.step` seconds after the last."""
    state = SimpleNamespace(t=0.0, step=0.0)

    def monotonic() -> float:
        state.t += state.step
        return state.t
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=monotonic))
    return state


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fields(line: str) -> dict[str, str]:
    return dict(field.split(":", 1) for field in line.split())


def updates(bar, count: int) -> None:
    for _ in range(count):
        bar.update(1)
    bar.close()


@pytest.mark.parametrize("seconds_per_reading", [0.0, 1.0])
def test_off_a_terminal_a_few_lines_with_the_final_count_and_no_carriage_returns(clock, seconds_per_reading):
    clock.step = seconds_per_reading
    out = io.StringIO()
    # the call of eval/stream.py and eval/lora.py, with a log file instead of a terminal
    bar = progress_bar(total=1000, desc="lora ttt", unit="tok", unit_scale=True, disable=False, leave=False, file=out)
    assert isinstance(bar, LineProgress)
    updates(bar, 1000)
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and 1 <= len(lines) <= 12, lines
    assert all(line.startswith("progress:lora_ttt done:") for line in lines)
    last = fields(lines[-1])
    assert last["done"] == "1000/1000" and last["pct"] == "100" and last["rate"].endswith("tok/s")
    if seconds_per_reading:  # a slow loop shows each tenth, with the time left; a fast one only its end
        assert len(lines) == 10
        first = fields(lines[0])
        assert first["done"] == "100/1000" and first["pct"] == "10" and float(first["eta_s"]) > 0
    else:
        assert len(lines) == 1


def test_iteration_context_manager_and_a_loop_that_stops_early(clock):
    clock.step = 1.0
    out = io.StringIO()
    assert list(progress_bar(range(7), desc="quantize", unit="tensor", file=out)) == list(range(7))
    assert out.getvalue().splitlines()[-1].startswith("progress:quantize done:7/7 pct:100 ")

    out = io.StringIO()
    with progress_bar(total=100, desc="seeds", unit="seed", file=out) as bar:
        bar.update(5)
    (line,) = out.getvalue().splitlines()  # one line, at close: where the loop ended
    assert fields(line)["done"] == "5/100" and fields(line)["pct"] == "5"

    out = io.StringIO()  # no total: the final line only
    assert list(progress_bar(iter(range(50)), desc="decode", file=out)) == list(range(50))
    (line,) = out.getvalue().splitlines()
    assert line.startswith("progress:decode done:50/? elapsed_s:")


def test_disabled_prints_nothing_and_a_terminal_gets_the_tqdm_bar():
    for disable in (True, None):  # None: tqdm's meaning, the bar on a terminal only
        out = io.StringIO()
        updates(progress_bar(total=1000, desc="x", disable=disable, file=out), 1000)
        assert list(progress_bar([1, 2], disable=disable, file=out)) == [1, 2]
        assert out.getvalue() == ""

    terminal = Terminal()
    bar = progress_bar(total=10, desc="x", file=terminal)
    assert isinstance(bar, tqdm)
    updates(bar, 10)
    assert "\r" in terminal.getvalue()
    terminal = Terminal()
    updates(progress_bar(total=10, disable=True, file=terminal), 10)
    assert terminal.getvalue() == ""


def test_the_packable_bar_is_progress_bar_in_the_kit_and_a_terminal_only_tqdm_in_the_packed_program(monkeypatch):
    out = io.StringIO()
    assert isinstance(packable_progress_bar(range(3), desc="q", file=out), LineProgress)
    monkeypatch.setattr(progress_module, "packed", lambda: True)
    bar = packable_progress_bar(range(3), desc="q", file=out, disable=True)
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    # packed: a bar on a terminal, and in a log nothing (no '\r' frames; the program's own lines mark its stages)
    log, terminal = io.StringIO(), Terminal()
    for file in (log, terminal):
        updates(packable_progress_bar(total=10, desc="q", file=file), 10)
    assert log.getvalue() == "" and "\r" in terminal.getvalue() and "q:" in terminal.getvalue()
