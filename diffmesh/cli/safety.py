"""`diffmesh safety ...`, `diffmesh provenance` and `diffmesh review ...`.

check-prompt and check-image run the policy here, in this process (for policy authors and
scripts: no mesh needed); review talks to a running safety stage, whose database may be
PostgreSQL. Every result is one JSON object per line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

DEFAULT_SAFETY_ADDRESS = "127.0.0.1:50065"


def _decision_json(decision: Any, **extra: Any) -> dict[str, Any]:
    return {"decision": decision.outcome.name, "category": decision.category, "score": round(float(decision.score), 4),
            "threshold": round(float(decision.threshold), 4), "policy_version": decision.policy_version,
            "source": decision.source.value, "reason": decision.reason, **extra}


def _prompts(args: argparse.Namespace) -> Iterator[str]:
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                yield line.strip()
    if args.text:
        yield args.text


def _check_prompt(args: argparse.Namespace) -> int:
    from services.safety.policy import PolicyError, load_policy
    from services.safety.prompt_policy import PromptPolicy, SentenceEncoder

    try:
        policy = load_policy(args.policy)
    except (PolicyError, OSError) as exc:
        print(f"diffmesh safety check-prompt: {exc}", file=sys.stderr)
        return 2
    prompts = list(_prompts(args))
    if not prompts:
        print("diffmesh safety check-prompt: give TEXT or --file F (one prompt per line)", file=sys.stderr)
        return 2
    checker = PromptPolicy(policy, SentenceEncoder(args.encoder or None))
    decisions = checker.check([("prompt", prompt) for prompt in prompts])
    for line, decision in enumerate(decisions, 1):
        # The line number, not the text: the output may go where prompts must not.
        print(json.dumps(_decision_json(decision, line=line)))
    return 0


def _check_image(args: argparse.Namespace) -> int:
    from diffmesh.errors import InvalidArgument
    from diffmesh.imaging import decode_image
    from services.safety.gallery import load_gallery
    from services.safety.image_policy import ImagePolicy
    from services.safety.nsfw import NsfwDetector
    from services.safety.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.policy)
    except (PolicyError, OSError) as exc:
        print(f"diffmesh safety check-image: {exc}", file=sys.stderr)
        return 2
    gallery_path = args.gallery or policy.gallery.path
    checker = ImagePolicy(policy, NsfwDetector(args.nsfw_model or None), load_gallery(gallery_path) if gallery_path else None)
    status = 0
    for path in args.paths:
        try:
            pixels = decode_image(Path(path).read_bytes(), path)
        except (OSError, InvalidArgument) as exc:
            print(f"diffmesh safety check-image: {path}: {exc}", file=sys.stderr)
            status = 1
            continue
        verdict = checker.check(pixels, (), field=path)
        print(json.dumps(_decision_json(verdict.decision, path=path, detections=verdict.detections,
                                        decisions=[_decision_json(d) for d in verdict.decisions],
                                        faces_checked=False)))
    return status


MIME_BY_SUFFIX = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def provenance_report(path: Path, trust_anchors: bytes | None = None, method: str = "dwtDctSvd",
                      original_size: tuple[int, int] | None = None,
                      expected_payload: str = "") -> dict[str, Any]:
    """A returned image's C2PA manifest (read and validated by c2pa) and its decoded watermark.
    The manifest records the generated size: a resized copy is scaled back to it before the
    watermark is decoded (dwtDctSvd does not survive a resize otherwise). A copy whose manifest
    was stripped (any re-encode drops it) needs `original_size` for that, and `expected_payload`
    (from the reply's marking) to say whether the mark is present."""
    import io

    import numpy as np
    from PIL import Image

    from services.safety.provenance import read_manifest
    from services.safety.watermark import Watermarker

    data = path.read_bytes()
    report = read_manifest(data, MIME_BY_SUFFIX.get(path.suffix.lower(), "image/png"), trust_anchors)
    facts = report.facts
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    size = (pixels.shape[1], pixels.shape[0])
    watermarker = Watermarker(facts.watermark_method, facts.watermark_bits) if facts is not None \
        else Watermarker(method)
    expected = (facts.width, facts.height) if facts is not None else original_size
    watermark: dict[str, Any] = {"method": watermarker.method, "bits": watermarker.bits,
                                 "scaled_back_from": list(size) if expected and expected != size else None}
    if min(size) < 256 and (expected is None or min(expected) < 256):
        watermark["decoded_payload"] = None
        watermark["note"] = "image smaller than 256x256: no invisible watermark"
    else:
        bits = watermarker.decode(pixels, expected)  # 0/1 per payload bit
        watermark["decoded_payload"] = np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex()
        payload = facts.watermark_payload if facts is not None and facts.watermark_payload else expected_payload
        if payload:
            check = watermarker.verify(pixels, bytes.fromhex(payload), expected)
            watermark.update(expected_payload=payload, matching_bits=check.matching_bits,
                             threshold=check.threshold, present=check.present)
    return {"path": str(path), "manifest": {"state": report.state, "errors": report.errors,
                                            "active_manifest": report.active_manifest}, "watermark": watermark}


def _provenance(args: argparse.Namespace) -> int:
    anchors = Path(args.trust_anchors).read_bytes() if args.trust_anchors else None
    size = None
    if args.original_size:
        width, _, height = args.original_size.partition("x")
        size = (int(width), int(height))
    try:
        report = provenance_report(Path(args.path), anchors, args.method, size, args.payload)
    except OSError as exc:
        print(f"diffmesh provenance: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=None if args.compact else 2, default=str))
    return 0


# --- review: talks to the safety stage ---------------------------------------------------------
def _stub(args: argparse.Namespace):
    import grpc

    from diffmesh.proto.v1 import safety_pb2_grpc

    channel = grpc.insecure_channel(args.address)
    return channel, safety_pb2_grpc.SafetyServiceStub(channel)


def _case_json(case: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(case, preserving_proto_field_name=True)


def _review(args: argparse.Namespace) -> int:
    import grpc

    from diffmesh.proto.v1 import common_pb2, safety_pb2

    channel, stub = _stub(args)
    try:
        if args.review_command == "list":
            status = {"pending": safety_pb2.REVIEW_STATUS_PENDING, "approved": safety_pb2.REVIEW_STATUS_APPROVED,
                      "rejected": safety_pb2.REVIEW_STATUS_REJECTED, "all": 0}[args.status]
            for case in stub.ListCases(safety_pb2.ListCasesRequest(status=status, limit=args.limit),
                                       timeout=args.timeout).cases:
                print(json.dumps(_case_json(case)))
        elif args.review_command == "show":
            case = stub.GetCase(safety_pb2.GetCaseRequest(case_id=args.case_id, include_image=bool(args.image)),
                                timeout=args.timeout).case
            if args.image:
                Path(args.image).write_bytes(case.image.data)
                case.ClearField("image")
            print(json.dumps(_case_json(case), indent=2))
        elif args.review_command in ("approve", "reject"):
            decision = safety_pb2.REVIEW_STATUS_APPROVED if args.review_command == "approve" \
                else safety_pb2.REVIEW_STATUS_REJECTED
            case = stub.DecideCase(safety_pb2.DecideCaseRequest(case_id=args.case_id, decision=decision,
                                                                reviewer=args.reviewer, note=args.note),
                                   timeout=args.timeout).case
            print(json.dumps(_case_json(case)))
        elif args.review_command == "release":
            fmt = {"png": common_pb2.PNG, "jpeg": common_pb2.JPEG, "webp": common_pb2.WEBP}[args.format]
            reply = stub.ReleaseCase(safety_pb2.ReleaseCaseRequest(case_id=args.case_id, format=fmt),
                                     timeout=args.timeout)
            Path(args.out).write_bytes(reply.image.image.data)
            print(json.dumps({"case_id": args.case_id, "out": args.out,
                              "marking": _case_json(reply.image.marking)}))
        else:  # purge
            print(json.dumps({"purged": stub.PurgeExpiredCases(safety_pb2.PurgeExpiredCasesRequest(),
                                                               timeout=args.timeout).purged}))
        return 0
    except grpc.RpcError as exc:
        print(f"diffmesh review {args.review_command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()


def add_commands(sub: argparse._SubParsersAction, default_policy: str = "") -> None:
    """Adds `safety`, `provenance` and `review` to the CLI, each with its handler (args.handler)."""
    from services.safety.policy import DEFAULT_POLICY_PATH  # YAML and dataclasses only: cheap to import

    default_policy = default_policy or str(DEFAULT_POLICY_PATH)
    safety = sub.add_parser("safety", help="run the safety policy on prompts or images (here, no mesh)")
    safety_sub = safety.add_subparsers(dest="safety_command", required=True)
    prompt = safety_sub.add_parser("check-prompt", help="one JSON decision per prompt")
    prompt.add_argument("text", nargs="?", help="the prompt")
    prompt.add_argument("--file", help="one prompt per line ('-': stdin; '#' lines are skipped)")
    prompt.add_argument("--policy", default=default_policy)
    prompt.add_argument("--encoder", default="", help="sentence-encoder directory (default: the bundled MiniLM)")
    image = safety_sub.add_parser("check-image", help="one JSON decision per image (NSFW labels; no face checks)")
    image.add_argument("paths", nargs="+")
    image.add_argument("--policy", default=default_policy)
    image.add_argument("--gallery", default="")
    image.add_argument("--nsfw-model", default="")

    provenance = sub.add_parser("provenance", help="print a returned image's watermark payload and C2PA manifest")
    provenance.add_argument("path")
    provenance.add_argument("--trust-anchors", help="PEM of trusted root certificates (the dev root: "
                                                    ".mesh/safety/c2pa/c2pa-dev-root.pem)")
    provenance.add_argument("--method", default="dwtDctSvd", help="watermark method when the file has no manifest")
    provenance.add_argument("--original-size", help="WxH the image was generated at, for a copy without its "
                                                    "manifest (resized and re-encoded): it is scaled back first")
    provenance.add_argument("--payload", default="", help="hex payload to verify against when the manifest is gone")
    provenance.add_argument("--compact", action="store_true", help="one line")

    review = sub.add_parser("review", help="work the review queue of a running safety stage")
    review.add_argument("--address", default=DEFAULT_SAFETY_ADDRESS)
    review.add_argument("--timeout", type=float, default=30.0)
    review_sub = review.add_subparsers(dest="review_command", required=True)
    listing = review_sub.add_parser("list")
    listing.add_argument("--status", choices=("pending", "approved", "rejected", "all"), default="pending")
    listing.add_argument("--limit", type=int, default=50)
    show = review_sub.add_parser("show")
    show.add_argument("case_id")
    show.add_argument("--image", help="write the case's image here")
    for name in ("approve", "reject"):
        decide = review_sub.add_parser(name)
        decide.add_argument("case_id")
        decide.add_argument("--reviewer", required=True)
        decide.add_argument("--note", default="")
    release = review_sub.add_parser("release", help="fetch an approved case's image, watermarked and signed")
    release.add_argument("case_id")
    release.add_argument("--out", required=True)
    release.add_argument("--format", choices=("png", "jpeg", "webp"), default="png")
    review_sub.add_parser("purge", help="delete cases past retention now")

    prompt.set_defaults(handler=_check_prompt)
    image.set_defaults(handler=_check_image)
    provenance.set_defaults(handler=_provenance)
    review.set_defaults(handler=_review)
