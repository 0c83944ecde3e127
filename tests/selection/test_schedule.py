"""Ratio schedules."""

import pytest


def test_ratio_schedules():
    from slm.selection import RatioSchedule, ratio_schedule

    assert ratio_schedule(0.6).at(7, 10) == 0.6 and ratio_schedule(0.6).is_constant
    lin = ratio_schedule({"schedule": "linear", "start": 1.0, "end": 0.6})
    assert [round(lin.at(s, 5), 6) for s in range(5)] == [1.0, 0.9, 0.8, 0.7, 0.6]
    cos = RatioSchedule("cosine", 1.0, 0.5)
    assert cos.at(0, 11) == 1.0 and cos.at(10, 11) == pytest.approx(0.5) and cos.at(5, 11) == pytest.approx(0.75)
    assert lin.label() == "linear-1.0-0.6"
    with pytest.raises(ValueError, match="selector.ratio.end must be in"):
        ratio_schedule({"schedule": "linear", "start": 1.0, "end": 0.0})
    with pytest.raises(ValueError, match="needs an end"):
        ratio_schedule({"schedule": "cosine", "start": 0.5})
    with pytest.raises(ValueError, match="unknown keys"):
        ratio_schedule({"schedule": "linear", "begin": 1.0})
