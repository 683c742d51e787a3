"""The CLI's progress display: one bar per phase of the flow."""
from __future__ import annotations

import io

from diffmesh.cli.render import PhaseBars
from diffmesh.proto.v1 import orchestrator_pb2


def test_one_progress_bar_per_phase_each_complete():
    out = io.StringIO()
    bars = PhaseBars(out)
    for phase, total in (("", 4), ("faces", 3)):  # the base pass (unnamed) then a second pass
        for step in range(1, total + 1):
            bars.update(orchestrator_pb2.StepProgress(step=step, total_steps=total, phase=phase))
    bars.close()
    assert list(bars.bars) == ["base", "faces"]
    assert [(bar.n, bar.total) for bar in bars.bars.values()] == [(4, 4), (3, 3)]
    text = out.getvalue()
    assert "base: 100%" in text and "faces: 100%" in text
