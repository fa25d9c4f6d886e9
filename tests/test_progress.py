"""Long passes show where they are; short ones stay quiet."""
from common.metrics import with_progress


def test_a_long_pass_prints_position_and_eta(capsys):
    assert list(with_progress(range(4), "caching features", every_seconds=0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("caching features [1/4] eta 0:00:00")
    assert lines[-1].startswith("caching features [4/4]")


def test_a_pass_of_unknown_length_prints_elapsed_time(capsys):
    list(with_progress(iter(range(2)), "evaluation", every_seconds=0))
    assert capsys.readouterr().out.splitlines()[-1] == "evaluation [2] 0:00:00 so far"


def test_a_short_pass_prints_nothing(capsys):
    assert list(with_progress(range(100), "evaluation")) == list(range(100))
    assert capsys.readouterr().out == ""
