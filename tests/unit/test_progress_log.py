"""Progress where stderr is a log file: rich draws bars on terminals only, so a file gets plain lines."""

import io

from rich.console import Console
from rich.progress import Progress

import toolkit.console as output


def _capture(monkeypatch, terminal: bool) -> io.StringIO:
    sink = io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=sink, force_terminal=terminal, width=100))
    return sink


def test_a_file_gets_a_line_per_interval_with_count_and_status(monkeypatch):
    sink = _capture(monkeypatch, terminal=False)
    monkeypatch.setattr(output, "LOG_EVERY_S", 0.0)
    with output.progress(transient=True) as bar:
        task = bar.add_task("training", total=4, status="")
        bar.update(task, completed=1, status="loss 0.6931")
        bar.advance(task, 2)
    lines = sink.getvalue().splitlines()
    assert any(line.startswith("training: 1/4 after ") and line.endswith("loss 0.6931") for line in lines), lines
    assert any(line.startswith("training: 3/4 after ") for line in lines), lines


def test_lines_wait_for_the_interval(monkeypatch):
    sink = _capture(monkeypatch, terminal=False)
    monkeypatch.setattr(output, "LOG_EVERY_S", 3600.0)
    with output.progress(transient=True) as bar:
        task = bar.add_task("scoring", total=10, status="")
        for _ in range(10):
            bar.advance(task)
    assert "scoring:" not in sink.getvalue()


def test_a_terminal_keeps_rich_s_live_bar(monkeypatch):
    _capture(monkeypatch, terminal=True)
    assert type(output.progress()) is Progress
