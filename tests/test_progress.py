"""Progress output in logs: plain lines, no carriage returns, rates included."""

import io

from glp_jax.progress import progress_bar


def test_non_tty_progress_is_plain_lines(monkeypatch):
    monkeypatch.setenv("GLP_LOG_INTERVAL", "0")
    out = io.StringIO()
    bar = progress_bar(total=100, desc="work", unit="row", stream=out)
    for _ in range(4):
        bar.update(25)
    bar.set_postfix(loss="1.23")
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) >= 4
    assert lines[-1].startswith("work: 100%") and "row/s" in lines[-1] and "loss=1.23" in lines[-1]


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    bar = progress_bar(total=10, desc="x", stream=out, enabled=False)
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""


def test_iterable_progress_yields_every_item(monkeypatch):
    monkeypatch.setenv("GLP_LOG_INTERVAL", "0")
    out = io.StringIO()
    assert list(progress_bar(range(5), "it", stream=out)) == [0, 1, 2, 3, 4]
    assert out.getvalue().splitlines()[-1].startswith("it: 100%")


def test_postfix_updates_do_not_add_lines_in_logs(monkeypatch):
    monkeypatch.setenv("GLP_LOG_INTERVAL", "3600")
    out = io.StringIO()
    bar = progress_bar(total=1000, desc="train", unit="step", stream=out)
    for i in range(10):
        bar.update(1)
        bar.set_postfix(loss=f"{i:.1f}")
    assert len(out.getvalue().splitlines()) <= 1  # only the opening line
    bar.close()
    assert "loss=9.0" in out.getvalue().splitlines()[-1]
