"""How the CLI prints a response's timings (shared by `generate` and `demo`)."""
from __future__ import annotations


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
