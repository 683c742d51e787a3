"""The `diffmesh` command: models, serve, generate, up/down, demo."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from diffmesh.cli.render import PhaseBars, format_timings
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

    from diffmesh.client import IncompleteStream, MeshClient, build_request, collect_stream, field_violations

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
            init_image=Path(args.init_image) if args.init_image else None)
    except (OSError, ValueError) as exc:
        print(f"diffmesh generate: {exc}", file=sys.stderr)
        return 2
    bars = PhaseBars(sys.stderr, disable=args.json)

    def on_progress(progress) -> None:
        bars.update(progress)
        if args.preview_dir:
            _write_previews(Path(args.preview_dir), progress)

    try:
        with MeshClient(args.address) as client:
            # The images come as their own (chunked) events; collect_stream reassembles them.
            result = collect_stream(client.generate_stream(request, timeout=args.timeout), on_progress)
    except IncompleteStream as exc:
        print(f"diffmesh generate: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"diffmesh generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        for violation in field_violations(exc):
            where = f" (stage {violation.stage})" if violation.stage else ""
            print(f"  {violation.field}: {violation.reason} (got {violation.value}){where}", file=sys.stderr)
        return 1
    finally:
        bars.close()
    paths = _output_paths(out, len(result.images))
    for path, image in zip(paths, result.images):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.image.data)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        info = MessageToDict(result.info, preserving_proto_field_name=True)
        info["images"] = [{"path": str(p), "seed": img.seed, "index": img.index, "width": img.image.width,
                           "height": img.image.height, "mime_type": img.image.mime_type}
                          for p, img in zip(paths, result.images)]
        print(json.dumps(info, indent=2))
    else:
        for path, image in zip(paths, result.images):
            print(f"{path}  seed={image.seed}")
        print(format_timings(result.info))
    return 0


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
    gen.add_argument("--timeout", type=float, default=600.0)
    gen.add_argument("--json", action="store_true", help="print the response metadata as JSON")

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
                "schedulers": _schedulers}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
