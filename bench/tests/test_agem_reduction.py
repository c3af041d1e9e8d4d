"""bench/agem_reduction.py runs, checks its reduction against torch.dot and prints a line per round
(a smoke test on the tiny shapes; no speed asserted)."""
from __future__ import annotations

import pytest

from bench import agem_reduction
from cnl_ext.ops import native_backend


def test_agem_reduction_prints_a_line_per_round(capsys):
    reason = native_backend.unavailable_reason()
    if reason:
        pytest.skip(reason)
    agem_reduction.main(["--params", "tiny", "--rounds", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("backend native")
    assert len(lines) == 3 and all(line.startswith("agem_dots ") and "torch.dot flat" in line for line in lines[1:])
