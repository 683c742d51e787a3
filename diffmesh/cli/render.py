"""How the CLI shows a request: progress bars per phase, and the response's timings (shared by
`generate` and `demo`)."""
from __future__ import annotations

from typing import IO, Any


class PhaseBars:
    """One progress bar per phase of the flow ("base", then "faces", ...), each created when its
    phase's first step arrives, stacked in arrival order."""

    def __init__(self, file: IO[str], disable: bool = False) -> None:
        self.file = file
        self.disable = disable
        self.bars: dict[str, Any] = {}

    def update(self, progress: Any) -> None:
        from tqdm import tqdm

        phase = progress.phase or "base"
        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=progress.total_steps, unit="it", desc=phase, file=self.file,
                                          disable=self.disable, position=len(self.bars), leave=True)
        bar.update(progress.step - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def format_timings(info) -> str:
    lines = [f"{'stage':<14}{'wall ms':>10}{'compute ms':>12}{'queue ms':>10}{'bytes out':>11}{'bytes in':>11}"
             f"  variant  device"]
    for t in info.timings:
        lines.append(f"{t.stage:<14}{t.wall_ms:>10.1f}{t.compute_ms:>12.1f}{t.queue_ms:>10.1f}{t.bytes_sent:>11}"
                     f"{t.bytes_received:>11}  {t.variant:<8} {t.device}")
    cost = info.cost
    lines.append(f"{'total':<14}{info.total_ms:>10.1f}   device-seconds {cost.device_seconds:.3f}, "
                 f"queue-seconds {cost.queue_seconds:.3f}, bytes moved {cost.bytes_moved}")
    if info.trace_id:
        lines.append(f"trace {info.trace_id}")
    return "\n".join(lines)
