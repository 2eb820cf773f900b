"""The progress bar a person sees: redrawn in a terminal, a short log elsewhere."""

from __future__ import annotations

import io

from simpsons_ray.core import console


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_in_a_log_prints_each_tenth_once_and_no_duplicate_at_the_end():
    out = io.StringIO()
    bar = console.ProgressBar("label", "frames", stream=out)
    bar.update(0)  # total unknown: nothing yet
    for done in range(0, 1001, 10):
        bar.update(done, total=1000, estimated=done < 500)
    bar.close(note="3/3 episodes")
    lines = out.getvalue().splitlines()
    assert len(lines) == 11, lines  # 0%, 10%, ..., 100%
    assert "1,000/1,000 frames" in lines[-1] and "[" + "#" * 28 + "]" in lines[-1]
    assert "/~1,000 frames" in lines[1] and "ETA" in lines[1]


def test_bar_in_a_terminal_redraws_one_line():
    out = _Terminal()
    bar = console.ProgressBar("train", "epochs", total=5, stream=out, show_rate=False)
    for done in range(1, 6):
        bar.update(done)
    bar.close()
    text = out.getvalue()
    # The first update and the last are drawn; those between come faster than a redraw is due.
    assert text.count("\n") == 1 and text.count("\r") == 3, repr(text)
    assert "1/5 epochs" in text and "5/5 epochs" in text.splitlines()[-1] and "/s" not in text
