"""What ``autolr watch`` prints: decision lines rate-limited, the rest counted; live redraws throttled."""
from __future__ import annotations

import io
import re

import pytest

from autolr.view import DECISION_LINES_PER_SECOND, View


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def decision(seq: int) -> dict:
    return {"run": "runs/a", "seq": seq, "step": seq, "lr": 0.1, "scale": 1.0, "policy": "cosine",
            "reason": "cosine: factor 1 -> 0.99"}


def counted(text: str) -> tuple[int, int]:
    """(decision lines, decisions summed up in '... N more' lines)."""
    shown = len(re.findall(r"^runs/a: #\d+", text, re.M))
    more = sum(int(n) for n in re.findall(r"^\.\.\. (\d+) more decisions not shown", text, re.M))
    return shown, more


def test_a_burst_of_decisions_prints_a_few_lines_and_counts_the_rest(clock):
    out = io.StringIO()
    v = View(out, live=False, clock=clock)
    v("ready", {"runs": 1, "sources": 1, "mode": "inotify"})
    for seq in range(1, 100_001):  # catching up on a log where every row decides
        v("decision", decision(seq))
    v("caught_up", {"runs": 1})
    text = out.getvalue()
    assert counted(text) == (DECISION_LINES_PER_SECOND, 100_000 - DECISION_LINES_PER_SECOND)
    assert text.index("more decisions not shown") < text.index("caught up: 1 runs")
    assert len(text.splitlines()) < 2 * DECISION_LINES_PER_SECOND


def test_the_allowance_refills_over_time_and_nothing_goes_uncounted(clock):
    out = io.StringIO()
    v = View(out, live=False, clock=clock)
    seq = 0
    for second in range(5):  # 200 decisions a second for 5 s
        for _ in range(200):
            seq += 1
            clock.now += 1 / 200
            v("decision", decision(seq))
        v("tick", {})
    v("stopped", {})
    shown, more = counted(out.getvalue())
    assert shown + more == seq
    assert 5 * DECISION_LINES_PER_SECOND <= shown <= 6 * DECISION_LINES_PER_SECOND + 1


def test_a_few_decisions_are_all_printed(clock):
    out = io.StringIO()
    v = View(out, live=False, clock=clock)
    for seq in range(1, DECISION_LINES_PER_SECOND + 1):
        v("decision", decision(seq))
    v("stopped", {})
    assert counted(out.getvalue()) == (DECISION_LINES_PER_SECOND, 0)
    assert "more decisions" not in out.getvalue()


def test_live_table_is_redrawn_at_most_twice_a_second_on_decisions(clock):
    draws = []
    v = View(io.StringIO(), live=True, summaries=lambda: draws.append(1) or [], clock=clock)
    for seq in range(1000):
        clock.now += 0.001  # 1000 decisions in 1 s
        v("decision", decision(seq))
    assert 1 <= len(draws) <= 3
    v("tick", {})
    assert len(draws) <= 4


def test_output_that_fails_is_given_up_not_raised(tmp_path):
    """Regression: with stdout a closed pipe (| tee gone) or /dev/full, the daemon's event
    printer raised inside open_run: new runs only ever got their initial value (or the daemon
    exited at start). The printer now stops printing and the daemon goes on."""
    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    view = View(out=Broken(), live=False)
    view("run", {"run": "r", "policy": "auto", "control": "r/autolr.json"})  # no exception
    view("source", {"path": "r/m.jsonl", "reader": "jsonl"})
    assert view.out is None


def test_a_run_line_names_its_counter(tmp_path):
    """Regression (a helper's audit): an epoch-level log (Keras's CSVLogger) showed its epoch
    as "step" in ``autolr status`` and the live table."""
    from autolr.cli import main
    from click.testing import CliRunner

    for name, header, rows in (("keras", "epoch,loss", "0,1.0\n1,0.9\n"), ("steps", "step,loss", "0,1.0\n1,0.9\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.csv").write_text(f"{header}\n{rows}")
    assert CliRunner().invoke(main, ["watch", str(tmp_path), "--once"]).exit_code == 0
    out = CliRunner().invoke(main, ["status", str(tmp_path)]).stdout
    assert f"{tmp_path / 'keras'}  epoch 1 " in out and f"{tmp_path / 'steps'}  step 1 " in out, out
