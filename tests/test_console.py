"""What jobs print: one progress display (a bar on a terminal, a line per epoch otherwise) and result lines."""

from __future__ import annotations

import io

from camae.console import Progress, duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_one_line_per_epoch(capsys):
    progress = Progress(3, "epochs")
    progress.update(1, 12.4, "val/accuracy 0.250")
    progress.shrink(1)  # a trial stopped early: its epochs leave the total
    progress.update(1, 15.0)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[camae] epochs 1/3  12 img/s  ETA ") and lines[0].endswith("val/accuracy 0.250")
    assert lines[1].startswith("[camae] epochs 2/2  15 img/s  ETA 0s")


def test_progress_on_a_terminal_is_a_bar_with_lines_above_it(capsys):
    tty = Terminal()
    progress = Progress(4, "epochs", stream=tty)
    progress.update(2, 20.0)
    progress.write("lora r8 lr1e-3: best epoch 2")
    progress.update(2, 21.0)
    progress.close()
    shown = tty.getvalue()
    assert "\r" in shown and "4/4" in shown and "21 img/s" in shown
    assert shown.count("[camae] lora r8 lr1e-3: best epoch 2\n") == 1
    assert capsys.readouterr().out == ""  # nothing else on stdout


def test_durations_read_as_minutes_and_seconds():
    assert (duration(5.4), duration(59.6), duration(61), duration(3725)) == ("5s", "1m00s", "1m01s", "62m05s")
