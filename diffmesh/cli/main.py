"""The `diffmesh` command: models, serve, generate, up/down, demo, callers."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from diffmesh.cli.callers import add_commands as add_callers_commands
from diffmesh.cli.render import PhaseBars, QueueStatus, format_faces, format_marking, format_safety, format_timings
from diffmesh.cli.safety import add_commands as add_safety_commands
from diffmesh.stages import STAGES

DEFAULT_MODELS_ROOT = Path(".models")
DEFAULT_MESH_DIR = Path(".mesh")


def _models(args: argparse.Namespace) -> int:
    from diffmesh.models.registry import ModelError, Registry

    if args.models_command == "build-tiny":
        from diffmesh.models.tiny import build_tiny_models

        start = time.perf_counter()
        built = build_tiny_models(Path(args.root))
        for model_id, path in sorted(built.items()):
            print(f"{model_id}\t{path}")
        print(f"registry: {Path(args.root) / 'registry.yaml'} ({time.perf_counter() - start:.1f}s)")
        return 0
    try:
        registry = Registry.load(Path(args.registry))
    except ModelError as exc:
        print(f"diffmesh models list: {exc}", file=sys.stderr)
        return 1
    # Tab-separated: id, kind, (an adapter's base,) path. The path is always the last column so
    # scripts can cut it whatever the kind; nothing is checked on disk, so an unmounted volume
    # still lists.
    for model_id in registry.ids():
        spec = registry.specs[model_id]
        columns = [model_id, spec.kind.value, *([spec.base] if spec.base else []), str(spec.path)]
        print("\t".join(columns))
    return 0


def _serve(args: argparse.Namespace, rest: Sequence[str]) -> int:
    return STAGES[args.stage].main_module().main(list(rest))


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from diffmesh.client import (IncompleteStream, MeshClient, build_request, collect_stream, field_violations,
                                 retry_pushback_ms)

    out = Path(args.out)
    fmt = args.format or (out.suffix.lstrip(".").lower() or "png")
    try:
        request = build_request(
            args.prompt, negative_prompt=args.negative_prompt, model=args.model, width=args.width,
            height=args.height, steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance,
            seed=args.seed, count=args.count, strength=args.strength, output_format=fmt, prompt_2=args.prompt_2,
            negative_prompt_2=args.negative_prompt_2, clip_skip=args.clip_skip, literal_prompt=args.literal_prompt,
            timesteps=_int_list(args.timesteps), timestep_anchors=_anchors(args.timestep_anchors),
            timestep_spacing=args.spacing or "", sigma_schedule=args.sigmas or "",
            guidance_rescale=args.guidance_rescale, change_map=Path(args.change_map) if args.change_map else None,
            mask=Path(args.mask) if args.mask else None, mask_feather=args.mask_feather,
            paste_back=args.paste_back, preview_every=args.preview_every or (1 if args.preview_dir else 0),
            init_image=Path(args.init_image) if args.init_image else None,
            reference_faces=[Path(face) for face in args.face], face_weight=args.face_weight,
            detail_faces=args.detail_faces, base_image=Path(args.base_image) if args.base_image else None,
            face_detailing=_face_detailing(args))
    except (OSError, ValueError) as exc:
        print(f"diffmesh generate: {exc}", file=sys.stderr)
        return 2
    bars = PhaseBars(sys.stderr, disable=args.json)
    queue = QueueStatus(sys.stderr, disable=args.json)

    def on_progress(progress) -> None:
        queue.close()
        bars.update(progress)
        if args.preview_dir:
            _write_previews(Path(args.preview_dir), progress)

    try:
        with MeshClient(args.address, api_key=args.api_key or None) as client:
            # The images come as their own (chunked) events; collect_stream reassembles them.
            result = collect_stream(client.generate_stream(request, timeout=args.timeout), on_progress,
                                    queue.update)
    except IncompleteStream as exc:
        print(f"diffmesh generate: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        queue.close()
        print(f"diffmesh generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        pushback = retry_pushback_ms(exc)
        if pushback is not None:
            print(f"  retry after {pushback} ms (grpc-retry-pushback-ms)", file=sys.stderr)
        for violation in field_violations(exc):
            where = f" (stage {violation.stage})" if violation.stage else ""
            print(f"  {violation.field}: {violation.reason} (got {violation.value}){where}", file=sys.stderr)
        return 1
    finally:
        queue.close()
        bars.close()
    # Named by the image's index (its seed's position): a withheld image leaves its name unused.
    names = _output_paths(out, max([args.count or 1, *(image.index + 1 for image in result.images)]))
    paths = [names[image.index] for image in result.images]
    for path, image in zip(paths, result.images):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.image.data)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        info = MessageToDict(result.info, preserving_proto_field_name=True)
        info["images"] = [{"path": str(p), "seed": img.seed, "index": img.index, "width": img.image.width,
                           "height": img.image.height, "mime_type": img.image.mime_type,
                           **({"faces": _face_report(img.faces)} if img.HasField("faces") else {}),
                           **({"marking": MessageToDict(img.marking, preserving_proto_field_name=True)}
                              if img.HasField("marking") else {})}
                          for p, img in zip(paths, result.images)]
        print(json.dumps(info, indent=2))
    else:
        for path, image in zip(paths, result.images):
            print(f"{path}  seed={image.seed}{format_faces(image.faces) if image.HasField('faces') else ''}"
                  f"{format_marking(image.marking) if image.HasField('marking') else ''}")
        safety = format_safety(result.info.safety) if result.info.HasField("safety") else ""
        if safety:
            print(safety)
        print(format_timings(result.info))
    return 0


# generate's face-detailing flags -> FaceDetailing fields (flag dest, field name).
_FACE_OPTIONS = (("face_prompt", "prompt"), ("face_negative_prompt", "negative_prompt"),
                 ("face_confidence", "confidence"), ("face_min_ratio", "min_ratio"), ("face_max_ratio", "max_ratio"),
                 ("face_max", "max_faces"), ("face_padding", "padding"), ("face_size", "size"),
                 ("face_max_magnification", "max_magnification"), ("face_dilate", "mask_dilate"),
                 ("face_blur", "mask_blur"), ("face_strength", "strength"), ("face_guidance", "guidance_scale"),
                 ("face_steps", "steps"), ("face_scheduler", "scheduler"), ("face_merge_step", "start_merge_step"),
                 ("face_style_strength", "style_strength"), ("trigger_word", "trigger_word"),
                 ("face_model", "face_model"), ("identity_model", "identity_model"))


def _face_detailing(args: argparse.Namespace) -> dict | None:
    from diffmesh.proto.v1 import orchestrator_pb2

    fields = {name: getattr(args, dest) for dest, name in _FACE_OPTIONS if getattr(args, dest) is not None}
    if args.face_mask:
        fields["mask_shape"] = orchestrator_pb2.FaceMaskShape.Value(f"FACE_MASK_SHAPE_{args.face_mask.upper()}")
    if args.face_anchors:
        fields["timestep_anchors"] = _anchors(args.face_anchors)
    if args.no_color_match:
        fields["color_match"] = False
    return fields or None


def _face_report(report) -> dict:
    from google.protobuf.json_format import MessageToDict

    info = MessageToDict(report, preserving_proto_field_name=True)
    for face in info.get("faces", []):
        face.pop("mask", None)  # PNG bytes: not for a terminal
    return info


def _faces(args: argparse.Namespace) -> int:
    """`diffmesh faces IMAGE`: the face analysis as JSON, in-process from the registry's face pack,
    or from a running face stage with --address."""
    from diffmesh.imaging import decode_image
    from diffmesh.errors import InvalidArgument

    try:
        pixels = decode_image(Path(args.image).read_bytes(), "image")
    except (OSError, InvalidArgument) as exc:
        print(f"diffmesh faces: {exc}", file=sys.stderr)
        return 2
    if args.address:
        faces, model_id, dim = _faces_remote(args, pixels)
    else:
        faces, model_id, dim = _faces_local(args, pixels)
    if faces is None:
        return 1
    print(json.dumps({"image": args.image, "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
                      "model": model_id, "embedding_dim": dim, "faces": faces}, indent=2))
    return 0


def _face_json(face, embeddings: bool) -> dict:
    from google.protobuf.json_format import MessageToDict

    from diffmesh.runtime import codec

    info = MessageToDict(face, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for name in ("embedding", "normed_embedding"):
        info.pop(name, None)
        if embeddings and face.HasField(name):
            info[name] = [round(float(v), 6) for v in codec.to_numpy(getattr(face, name), name)]
    return info


def _faces_local(args: argparse.Namespace, pixels):
    from diffmesh.models.registry import Kind, ModelError, Registry
    from services.face.analysis import load_face_pack
    from services.face.servicer import detected_face_message

    try:
        registry = Registry.load(Path(args.registry))
        model_id = args.model or (registry.ids(kinds=(Kind.FACE_ANALYSIS,)) or [""])[0]
        if not model_id:
            raise ModelError(f"registry {args.registry} has no face_analysis pack")
        pack = load_face_pack(registry.get(model_id))
    except ModelError as exc:
        print(f"diffmesh faces: {exc}", file=sys.stderr)
        return None, "", 0
    found = pack.analyze(pixels, min_score=args.min_score)
    return [_face_json(detected_face_message(face), args.embeddings) for face in found], model_id, pack.embedding_dim


def _faces_remote(args: argparse.Namespace, pixels):
    import grpc

    from diffmesh.proto.v1 import face_pb2, face_pb2_grpc
    from diffmesh.runtime import codec

    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = face_pb2_grpc.FaceServiceStub(channel).Analyze(
                face_pb2.AnalyzeRequest(model_id=args.model, images=[codec.from_numpy(pixels)],
                                        min_score=args.min_score), timeout=60)
        except grpc.RpcError as exc:
            print(f"diffmesh faces: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return None, "", 0
    return [_face_json(face, args.embeddings) for face in reply.images[0].faces], reply.model_id, reply.embedding_dim


def _int_list(text: str | None) -> list[int] | None:
    return [int(part) for part in text.split(",") if part.strip()] if text else None


def _anchors(text: str | None) -> list[int] | None:
    from diffmesh.models.timesteps import FACE_DETAIL_ANCHORS

    return list(FACE_DETAIL_ANCHORS) if text == "default" else _int_list(text)


def _write_previews(folder: Path, progress) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "" if progress.phase in ("", "base") else f"{progress.phase}-"
    for index, preview in enumerate(progress.previews):
        (folder / f"{prefix}step-{progress.step:04d}-{index}.jpg").write_bytes(preview.data)


def _schedulers(args: argparse.Namespace) -> int:
    from diffmesh.models.schedulers import list_schedulers

    for spec in list_schedulers(aliases=args.aliases):
        print(f"{spec.name:<34}{spec.summary()}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from diffmesh.mesh import LocalMesh

    workdir = Path(args.dir)
    if (workdir / "state.json").exists():
        print(f"a mesh is already up ({workdir / 'state.json'}); run `make down` first", file=sys.stderr)
        return 1
    try:
        replicas = {stage: int(n) for stage, n in (_stage_option(o, "replicas") for o in args.replicas)}
        canaries = {stage: float(w or 20) for stage, w in (_stage_option(o, "canary") for o in args.canary)}
    except ValueError as exc:
        print(f"diffmesh up: {exc}", file=sys.stderr)
        return 2
    mesh = LocalMesh(registry=Path(args.registry).resolve(), workdir=workdir, replicas=replicas, canaries=canaries)
    mesh.start(detach=True)
    mesh.save_state()
    try:
        mesh.wait_ready(args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"diffmesh up: {exc}", file=sys.stderr)
        LocalMesh.stop_saved(workdir)
        return 1
    for instance in mesh.instances():
        weight = f"  weight {canaries[instance.stage]:g}%" if instance.variant == "canary" else ""
        print(f"{instance.name:<20}{mesh.address(instance.name)}  {instance.variant}{weight}")
    print(f"logs: {mesh.log_dir}/")
    print(f"try:  diffmesh generate --prompt 'a photo of a cat' --address {mesh.address('orchestrator')}")
    return 0


def _stage_option(option: str, flag: str) -> tuple[str, str]:
    backends = [spec.name for spec in STAGES.backends()]
    stage, _, value = option.partition("=")
    if stage not in backends:
        raise ValueError(f"--{flag} {option}: stage must be one of {', '.join(backends)}")
    if flag == "replicas" and (not value.isdigit() or int(value) < 1):
        raise ValueError(f"--replicas {option}: expected STAGE=N with N >= 1")
    if flag == "canary" and value and not 0 <= float(value) <= 100:
        raise ValueError(f"--canary {option}: the weight is a percentage in [0, 100]")
    return stage, value


def _down(args: argparse.Namespace) -> int:
    from diffmesh.mesh import LocalMesh

    stopped = LocalMesh.stop_saved(Path(args.dir))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from diffmesh.cli.demo import run_demo

    return run_demo(Path(args.root), Path(args.out), args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmesh", description="A gRPC inference mesh for diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="build and list models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build-tiny", help="write the deterministic tiny model set")
    build.add_argument("--root", default=str(DEFAULT_MODELS_ROOT))
    listing = models_sub.add_parser("list", help="print each model id with its kind, an adapter's base and its path")
    listing.add_argument("--registry", default=str(DEFAULT_MODELS_ROOT / "registry.yaml"))

    serve = sub.add_parser("serve", help="run one stage (flags after the stage go to it; --help lists them)",
                           add_help=False)
    serve.add_argument("stage", choices=STAGES.names())

    gen = sub.add_parser("generate", help="generate images through a running mesh")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--prompt-2", help="SDXL: prompt for the second text encoder")
    gen.add_argument("--negative-prompt-2", help="SDXL: negative prompt for the second text encoder")
    gen.add_argument("--clip-skip", type=int, help="skip this many final CLIP layers")
    gen.add_argument("--literal-prompt", action="store_true", help="no (word:1.3) weighting syntax")
    gen.add_argument("--timesteps", help="explicit descending timesteps, comma-separated")
    gen.add_argument("--timestep-anchors", help="anchors interpolated to --steps ('default': the face-detailing set)")
    gen.add_argument("--spacing", choices=("leading", "trailing", "linspace"), help="timestep spacing")
    gen.add_argument("--sigmas", choices=("karras", "exponential"), help="sigma schedule")
    gen.add_argument("--guidance-rescale", type=float)
    gen.add_argument("--change-map", help="grey image: 0 keeps a pixel, 255 regenerates it (with --init-image)")
    gen.add_argument("--mask", help="black/white inpaint mask, white regenerates (with --init-image)")
    gen.add_argument("--mask-feather", type=float, help="feather the mask by this many pixels")
    gen.add_argument("--paste-back", action="store_true", help="kept pixels are the init image's exactly")
    gen.add_argument("--preview-every", type=int, help="a preview every N steps")
    gen.add_argument("--preview-dir", help="write the previews here (every step unless --preview-every)")
    gen.add_argument("--model", default="")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--scheduler", default="")
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--count", type=int)
    gen.add_argument("--init-image", help="image file to start from (img2img)")
    gen.add_argument("--strength", type=float)
    gen.add_argument("--format", choices=("png", "jpeg", "webp"), help="default: from --out's extension")
    gen.add_argument("--out", default="out/image.png", help="with --count N: PATH-0.ext, PATH-1.ext, ...")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--api-key", default=os.environ.get("DIFFMESH_API_KEY", ""),
                     help="API key sent as 'authorization: Bearer <key>' (default: $DIFFMESH_API_KEY, which keeps "
                          "it out of the process list)")
    gen.add_argument("--timeout", type=float, default=600.0)
    gen.add_argument("--json", action="store_true", help="print the response metadata as JSON")
    faces = gen.add_argument_group("faces", "two-stage generation: re-render each face (face detailing), with the "
                                            "identity of reference photos (PhotoMaker V2)")
    faces.add_argument("--face", action="append", default=[], metavar="PATH", help="a reference photo; repeatable")
    faces.add_argument("--face-weight", type=int, help="count each reference this many times (1-4)")
    faces.add_argument("--detail-faces", action="store_true", help="detail the faces without references")
    faces.add_argument("--base-image", help="detail the faces of this photo instead of generating the base")
    faces.add_argument("--face-prompt", help="per-face prompts: [SEP] between faces (reading order), [SKIP] skips one")
    faces.add_argument("--face-negative-prompt")
    faces.add_argument("--face-confidence", type=float, help="minimum detection score (default 0.3)")
    faces.add_argument("--face-min-ratio", type=float, help="minimum face area / image area")
    faces.add_argument("--face-max-ratio", type=float, help="maximum face area / image area")
    faces.add_argument("--face-max", type=int, help="keep the k largest faces")
    faces.add_argument("--face-padding", type=float, help="context around each face, share of its size (0.5)")
    faces.add_argument("--face-size", type=int, help="detailing size (default: the model's, 1024 for SDXL)")
    faces.add_argument("--face-max-magnification", type=float, help="never upscale a crop more than this (4)")
    faces.add_argument("--face-mask", choices=("ellipse", "landmarks"), help="soft mask shape")
    faces.add_argument("--face-dilate", type=int, help="grow (negative: shrink) the mask, pixels (4)")
    faces.add_argument("--face-blur", type=float, help="mask blur radius, pixels (4)")
    faces.add_argument("--face-strength", type=float, help="denoise strength (0.4)")
    faces.add_argument("--face-guidance", type=float, help="CFG scale of the detailing pass (4)")
    faces.add_argument("--face-steps", type=int, help="steps of the detailing schedule (20)")
    faces.add_argument("--face-scheduler", help="scheduler of the detailing pass (default: the request's)")
    faces.add_argument("--face-anchors", help="detailing timestep anchors ('default': 999, 845, ..., 13)")
    faces.add_argument("--face-merge-step", type=int, help="identity joins after this step (10)")
    faces.add_argument("--face-style-strength", type=float, help="or: identity joins after this %% of the steps")
    faces.add_argument("--trigger-word", help="PhotoMaker's trigger word (img)")
    faces.add_argument("--face-model", help="face_analysis pack id")
    faces.add_argument("--identity-model", help="identity_encoder id")
    faces.add_argument("--no-color-match", action="store_true", help="paste faces back without colour matching")

    analyze = sub.add_parser("faces", help="print an image's face analysis as JSON")
    analyze.add_argument("image")
    analyze.add_argument("--registry", default=str(DEFAULT_MODELS_ROOT / "registry.yaml"))
    analyze.add_argument("--model", default="", help="face_analysis pack id (default: the registry's first)")
    analyze.add_argument("--address", help="ask a running face stage (host:port) instead of loading the pack here")
    analyze.add_argument("--min-score", type=float, default=0.0)
    analyze.add_argument("--embeddings", action="store_true", help="include the identity embeddings")

    schedulers = sub.add_parser("schedulers", help="list the scheduler names")
    schedulers.add_argument("--aliases", action="store_true", help="include diffusers class names")

    up = sub.add_parser("up", help="start a local mesh that stays up (make up)")
    up.add_argument("--registry", default=str(DEFAULT_MODELS_ROOT / "registry.yaml"))
    up.add_argument("--dir", default=str(DEFAULT_MESH_DIR))
    up.add_argument("--timeout", type=float, default=180.0)
    up.add_argument("--replicas", action="append", default=[], metavar="STAGE=N",
                    help="stable processes of a stage (default 1); repeatable")
    up.add_argument("--canary", action="append", default=[], metavar="STAGE[=WEIGHT]",
                    help="add a canary process for a stage serving WEIGHT percent (default 20); repeatable")
    down = sub.add_parser("down", help="stop the mesh `up` started (make down)")
    down.add_argument("--dir", default=str(DEFAULT_MESH_DIR))

    add_safety_commands(sub)  # safety, provenance, review: each sets its handler
    add_callers_commands(sub)  # callers hash-key / new-key / check

    demo = sub.add_parser("demo", help="build tiny models, start the mesh, generate, stop (make demo)")
    demo.add_argument("--root", default=str(DEFAULT_MODELS_ROOT))
    demo.add_argument("--out", default="out/demo.png")
    demo.add_argument("--model", default="tiny-sdxl")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return _serve(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"models": _models, "generate": _generate, "up": _up, "down": _down, "demo": _demo,
                "schedulers": _schedulers, "faces": _faces}
    handler = getattr(args, "handler", None) or handlers[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
