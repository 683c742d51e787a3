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


def format_queue_position(place) -> str:
    """A QueuePosition event as one line."""
    ahead = place.position - 1
    who = f"{ahead} request{'s' if ahead != 1 else ''} ahead" if ahead else "next"
    return f"queued ({place.priority or 'interactive'}): position {place.position} of {place.waiting}, {who}"


class QueueStatus:
    """While a request waits for admission: its queue position, one line per change (redrawn in
    place on a terminal), closed with a newline before the progress bars start."""

    def __init__(self, file: IO[str], disable: bool = False) -> None:
        self.file = file
        self.disable = disable
        self.last = ""
        self._open = False

    def update(self, place: Any) -> None:
        line = format_queue_position(place)
        self.last = line
        if self.disable:
            return
        if self.file.isatty():
            self.file.write("\r\x1b[K" + line)
            self._open = True
        else:
            self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        if self._open:
            self.file.write("\n")
            self.file.flush()
            self._open = False


def format_timings(info) -> str:
    lines = [f"{'stage':<22}{'wall ms':>10}{'compute ms':>12}{'queue ms':>10}{'bytes out':>11}{'bytes in':>11}"
             f"  variant  device"]
    for t in info.timings:
        lines.append(f"{t.stage:<22}{t.wall_ms:>10.1f}{t.compute_ms:>12.1f}{t.queue_ms:>10.1f}{t.bytes_sent:>11}"
                     f"{t.bytes_received:>11}  {t.variant:<8} {t.device}")
    cost = info.cost
    lines.append(f"{'total':<22}{info.total_ms:>10.1f}   device-seconds {cost.device_seconds:.3f}, "
                 f"queue-seconds {cost.queue_seconds:.3f}, bytes moved {cost.bytes_moved}")
    if info.trace_id:
        lines.append(f"trace {info.trace_id}")
    return "\n".join(lines)


def format_faces(report) -> str:
    """One image's face-detailing report as a short suffix: what stage 2 did and, with
    references, each detailed face's identity similarity."""
    if not report.detailed:
        return f"  faces: not detailed ({report.skipped_reason}; {report.faces_found} found)"
    detailed = [face for face in report.faces if not face.skipped]
    text = f"  faces: {len(detailed)} detailed of {report.faces_found} found"
    skipped = len(report.faces) - len(detailed)
    if skipped:
        text += f", {skipped} [SKIP]"
    similarities = [f"{face.identity_similarity:.2f}" if face.HasField("identity_similarity") else "-"
                    for face in detailed]
    if report.embedding_model:
        text += f"; identity similarity ({report.embedding_model}) " + " ".join(similarities)
    return text


def format_marking(marking) -> str:
    """What marks an image carries, as a short suffix."""
    mark = f"watermark {marking.watermark_method} {marking.watermark_payload}" if marking.watermarked \
        else f"no watermark ({marking.watermark_skipped_reason})"
    manifest = "C2PA signed" if marking.manifest else f"no C2PA ({marking.manifest_skipped_reason})"
    return f"  [{mark}; {manifest}]"


def _outcome(decision) -> str:
    from diffmesh.proto.v1 import safety_pb2

    return safety_pb2.SafetyOutcome.Name(decision.outcome).removeprefix("SAFETY_OUTCOME_")


def format_safety(report) -> str:
    """The safety report's lines: empty when the prompt and every image were allowed."""
    lines = []
    prompt = report.prompt
    if _outcome(prompt) != "ALLOW":
        lines.append(f"prompt {_outcome(prompt)}: {prompt.category} (score {prompt.score:.2f} >= {prompt.threshold:.2f}, "
                     f"policy {prompt.policy_version}) {prompt.reason}".rstrip())
    for image in report.images:
        if image.returned:
            continue
        decision = image.decision
        case = f"; review case {image.case_id}" if image.case_id else ""
        lines.append(f"image {image.index} withheld, {_outcome(decision)}: {decision.category} (score "
                     f"{decision.score:.2f} >= {decision.threshold:.2f}, policy {decision.policy_version}){case}")
    return "\n".join(lines)


def face_panels(photo, result, report):
    """The demo's face picture: the photo with each kept face's box (red) and crop (yellow), the
    masks the detailing used overlaid (cyan, by weight), and the final image, side by side.
    photo, result: uint8 [H, W, 3]; report: a FaceDetailingReport."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    boxes = Image.fromarray(photo).convert("RGB")
    draw = ImageDraw.Draw(boxes)
    weight = np.zeros(photo.shape[:2], dtype=np.float32)
    for face in report.faces:
        draw.rectangle([face.box.x1, face.box.y1, face.box.x2, face.box.y2], outline=(255, 0, 0), width=3)
        if face.skipped or not face.mask.data:
            continue
        crop = face.crop
        draw.rectangle([crop.x1, crop.y1, crop.x2, crop.y2], outline=(255, 220, 0), width=2)
        mask = np.asarray(Image.open(io.BytesIO(face.mask.data)).convert("L"), dtype=np.float32) / 255.0
        x1, y1 = int(crop.x1), int(crop.y1)
        region = weight[y1:y1 + mask.shape[0], x1:x1 + mask.shape[1]]
        np.maximum(region, mask[:region.shape[0], :region.shape[1]], out=region)
    cyan = np.array([0, 255, 255], dtype=np.float32)
    overlay = photo.astype(np.float32) * (1 - 0.6 * weight[..., None]) + cyan * 0.6 * weight[..., None]
    panels = [np.asarray(boxes), overlay.round().astype(np.uint8), result]
    gap = 8
    height = max(p.shape[0] for p in panels)
    canvas = np.full((height, sum(p.shape[1] for p in panels) + gap * (len(panels) - 1), 3), 255, dtype=np.uint8)
    x = 0
    for panel in panels:
        canvas[:panel.shape[0], x:x + panel.shape[1]] = panel
        x += panel.shape[1] + gap
    return canvas
