"""`make bench`: per-hop overhead and mesh vs in-process, ratios measured in one run.

    python -m bench.run --out bench/results/bench.json

Prints a table (figure, measured, target, PASS/MISS) and writes every number as JSON. Always
exits 0 when the measurements ran: a missed target is a finding, not a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from bench.stats import Row, cpu_pressure, format_table, machine_info

ROOT = Path(__file__).resolve().parent.parent


def _hop_rows(hops: dict[str, Any]) -> list[Row]:
    rows = []
    for name, h in hops["payloads"].items():
        c, r = h["codec"], h["raw_bytes_floor"]
        shape = "x".join(map(str, h["shape"]))
        label = f"hop {name} [{shape}] {h['dtype']} {h['tensor_bytes'] / 1e6:.2f} MB"
        rows.append(Row(f"{label}: codec p50 / p95",
                        f"{c['p50_ms']:.3f} / {c['p95_ms']:.3f} ms ({c['MB_per_s_at_p50']:.0f} MB/s)",
                        f"<= {h['targets']['p50_ms_max']:.1f} ms p50" if h["targets"]["p50_ms_max"] else "",
                        h["pass_p50"]))
        rows.append(Row(f"{label}: raw-bytes floor p50 / p95",
                        f"{r['p50_ms']:.3f} / {r['p95_ms']:.3f} ms ({r['MB_per_s_at_p50']:.0f} MB/s)"))
        rows.append(Row(f"{label}: codec / raw (p50)",
                        f"{h['ratio_p50']:.2f}x (+{h['overhead_p50_ms']:.3f} ms; p95 {h['ratio_p95']:.2f}x)",
                        f"<= {h['targets']['ratio_p50_max']:.2f}x", h["pass_ratio"]))
    return rows


def _what_if_rows(hops: dict[str, Any]) -> list[Row]:
    rows = []
    for config, measured in hops["what_if"]["configurations"].items():
        for name, p in measured["payloads"].items():
            parts = [f"{v} {p[v]['ratio_p50']:.2f}x ({p[v]['p50_ms']:.2f} ms)" for v in ("codec", "proposed", "zero_copy")]
            rows.append(Row(f"what-if hop {name}, malloc {'tuned' if measured['malloc_tuned'] else 'default'}",
                            ", ".join(parts) + f"; raw {p['raw']['p50_ms']:.2f} ms", "<= 1.15x",
                            None))
    return rows


def _e2e_rows(e2e: dict[str, Any]) -> list[Row]:
    w, wo, m = e2e["in_process_with_png"], e2e["in_process_without_png"], e2e["mesh"]
    rows = [
        Row("e2e in-process (diffusers + PNG) p50 / p95", f"{w['p50_ms']:.1f} / {w['p95_ms']:.1f} ms"),
        Row("e2e in-process (diffusers, no PNG) p50 / p95", f"{wo['p50_ms']:.1f} / {wo['p95_ms']:.1f} ms"),
        Row("e2e mesh (unary Generate) p50 / p95", f"{m['p50_ms']:.1f} / {m['p95_ms']:.1f} ms"),
        *([] if e2e.get("complete", True) else
          [Row("e2e measured runs (time budget ran out)", str(e2e["runs"]), f">= {min(10, e2e['runs'] + 1)}", False)]),
        Row("e2e mesh / in-process+PNG (p50)",
            f"{e2e['ratio_p50']:.3f}x ({e2e['overhead_p50_ms']:+.1f} ms; p95 {e2e['ratio_p95']:.3f}x)",
            f"<= {e2e['target_ratio_p50_max']:.2f}x", e2e["pass"]),
        Row("e2e mesh / in-process without PNG (p50)", f"{e2e['ratio_p50_vs_without_png']:.3f}x"),
        *([Row("e2e mesh less its safety calls / in-process+PNG (p50)",
               f"{e2e['ratio_p50_without_safety_calls']:.3f}x (safety {e2e['safety_calls_ms_p50']:.1f} ms)")]
          if "ratio_p50_without_safety_calls" in e2e else []),
    ]
    attribution = e2e["mesh_attribution"]
    for stage, s in attribution["stages"].items():
        queue = f", queue {s['queue_ms_p50']:.1f}" if "queue_ms_p50" in s else ""
        rows.append(Row(f"  mesh stage {stage}: wall / compute (p50)",
                        f"{s['wall_ms_p50']:.1f} / {s['compute_ms_p50']:.1f} ms "
                        f"(outside compute {s['outside_compute_ms_p50']:.1f}{queue} ms)"))
    ph = e2e["in_process_phases_ms_p50"]
    rows.append(Row("  in-process: encode_prompt / steps+setup / vae.decode / postprocess / PNG (p50)",
                    f"{ph['encode_prompt']:.1f} / {ph['steps_and_setup (the rest of the call)']:.1f} / "
                    f"{ph['vae_decode']:.1f} / {ph['postprocess']:.1f} / {ph['png']:.1f} ms"))
    if e2e.get("mesh_denoiser_step_ms_p50_from_stream"):
        rows.append(Row("  mesh per denoising step (GenerateStream progress, p50)",
                        f"{e2e['mesh_denoiser_step_ms_p50_from_stream']:.2f} ms"))
    floor = attribution.get("grpc_health_check_round_trip_ms_p50") or {}
    if floor:
        rows.append(Row("  gRPC floor: health Check round trip per stage (p50)",
                        ", ".join(f"{s} {ms:.2f}" for s, ms in floor.items()) + " ms"))
    rows.append(Row("  mesh orchestrator outside stage calls (p50)",
                    f"{attribution['orchestrator_outside_stages_ms_p50']:.1f} ms"))
    rows.append(Row("  mesh client -> orchestrator hop (p50)",
                    f"{attribution['client_to_orchestrator_ms_p50']:.1f} ms"))
    rows.append(Row("  max pixel difference mesh vs in-process",
                    str(e2e["max_pixel_difference_mesh_vs_in_process"]), "<= 1",
                    e2e["max_pixel_difference_mesh_vs_in_process"] <= 1))
    return rows


def _extras_rows(extras: dict[str, Any]) -> list[Row]:
    t, p, s = extras["tracing"], extras["previews"], extras["denoiser_steps"]
    return [
        Row("tracing always_on / always_off (p50, unary Generate)",
            f"{t['ratio_p50']:.3f}x ({t['on']['p50_ms']:.1f} / {t['off']['p50_ms']:.1f} ms, "
            f"{t['spans_exported']} spans exported)", f"<= {t['target']:.2f}x", t["ratio_p50"] <= t["target"]),
        Row("previews every step / none (p50, GenerateStream)",
            f"{p['ratio_p50']:.3f}x ({p['on']['p50_ms']:.1f} / {p['off']['p50_ms']:.1f} ms; "
            f"{p['per_preview_ms']:.2f} ms per preview)"),
        Row("denoiser stage per step / diffusers loop per step (p50)",
            f"{s['ratio_p50']:.3f}x ({s['denoiser_stage_per_step']['p50_ms']:.2f} / "
            f"{s['diffusers_per_step']['p50_ms']:.2f} ms; {s['overhead_per_step_ms']:+.3f} ms per step)"),
    ]


def _serving_rows(serving: dict[str, Any]) -> list[Row]:
    rows = []
    for concurrency in ("1", "4", "8"):
        parts = []
        for mode in ("on", "off"):
            r = serving[f"batching_{mode}"]["rounds"][concurrency]
            parts.append(f"{mode} {r['images_per_s']:.2f} img/s (p50 {r['latency']['p50_ms']:.0f} / "
                         f"p95 {r['latency']['p95_ms']:.0f} ms)")
        rows.append(Row(f"serving concurrency {concurrency}, batching on / off", "; ".join(parts)))
    on, off = serving["speedup_vs_concurrency_1"]["on"], serving["speedup_vs_concurrency_1"]["off"]
    rows.append(Row("serving images/s at concurrency 8 / concurrency 1, batching on",
                    f"{on['8']:.2f}x (c4 {on['4']:.2f}x; off: c8 {off['8']:.2f}x, c4 {off['4']:.2f}x; "
                    f"c8 on / off {serving['c8_on_vs_off']:.2f}x)",
                    f">= {serving['target_speedup_c8_min']:.1f}x", serving["pass_speedup"]))
    lone_on, lone_off = serving["batching_on"]["lone"], serving["batching_off"]["lone"]
    rows.append(Row("serving lone request, batching on / off (median of back-to-back pairs)",
                    f"{serving['lone_paired_median_on_vs_off']:.3f}x (p50 {lone_on['p50_ms']:.0f} / "
                    f"{lone_off['p50_ms']:.0f} ms: {serving['lone_p50_on_vs_off']:.3f}x)",
                    f"<= {serving['target_lone_ratio_max']:.2f}x", serving["pass_lone"]))
    rows_per_call = serving["batching_on"].get("denoiser_rows_per_call")
    if rows_per_call:
        rows.append(Row("  denoiser UNet rows per call over the run, batching on (mean)",
                        f"{rows_per_call['mean_rows']:.2f} in {rows_per_call['calls']:.0f} calls"))
    return rows


def _denoiser_load_rows(load: dict[str, Any]) -> list[Row]:
    w = load["workload"]
    rows = []
    for concurrency in ("1", "4", "8"):
        on, off = (load[f"batching_{mode}"]["rounds"][concurrency] for mode in ("on", "off"))
        rows.append(Row(f"denoiser in-process ({w['device']}, {w['dtype']}) concurrency {concurrency}, on / off",
                        f"{on['images_per_s']:.2f} / {off['images_per_s']:.2f} img/s "
                        f"(p50 {on['latency']['p50_ms']:.0f} / {off['latency']['p50_ms']:.0f} ms)"))
    rows.append(Row("denoiser in-process c8 / c1 batching on; c8 on / off; lone p50 on / off",
                    f"{load['speedup_vs_concurrency_1']['on']['8']:.2f}x; {load['c8_on_vs_off']:.2f}x; "
                    f"{load['lone_p50_on_vs_off']:.3f}x"))
    return rows


def _faces_rows(faces: dict[str, Any]) -> list[Row]:
    rows = []
    for n, f in faces["faces_per_second"].items():
        rows.append(Row(f"face detailing, {n} face(s) in one image: faces/s batched / one per call (p50)",
                        f"{f['batched_faces_per_s']:.1f} / {f['one_per_call_faces_per_s']:.1f} "
                        f"({f['speedup_p50']:.2f}x; re-render {f['batched_rerender']['p50_ms']:.0f} / "
                        f"{f['one_per_call_rerender']['p50_ms']:.0f} ms)"))
    a, b = faces["analyze_grpc"], faces["analyze_in_process"]
    rows.append(Row(f"face stage Analyze on t1.jpg ({a['faces']} faces, {a['model']}) p50 / p95",
                    f"{a['p50_ms']:.1f} / {a['p95_ms']:.1f} ms (in-process {b['p50_ms']:.1f} ms)"))
    return rows


def _one_thread(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs `measure` with one torch thread, as the local mesh runs the denoiser (stage table)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure()
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench.json")
    parser.add_argument("--models", type=Path, default=ROOT / ".models", help="tiny model set root")
    parser.add_argument("--runs", type=int, default=30, help="measured end-to-end runs per side (>= 10)")
    parser.add_argument("--warmup", type=int, default=3, help="end-to-end warm-up runs per side")
    parser.add_argument("--hop-iters", type=int, default=200, help="measured hop iterations (>= 50)")
    parser.add_argument("--hop-warmup", type=int, default=20)
    parser.add_argument("--no-what-if", action="store_true", help="skip the tuned-malloc hop configuration")
    parser.add_argument("--mesh-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the mesh's stage processes (what-if runs), repeatable")
    parser.add_argument("--stage-threads", action="append", default=[], metavar="STAGE=N",
                        help="what-if: --torch-threads N for one mesh stage (e.g. vae=1), repeatable")
    parser.add_argument("--max-seconds", type=float, default=200.0,
                        help="time budget: past it the end-to-end part stops after its first 10 measured runs")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-hops", action="store_true")
    parser.add_argument("--skip-extras", action="store_true", help="skip tracing/previews/per-step ratios")
    parser.add_argument("--skip-faces", action="store_true", help="skip face detailing and analysis")
    parser.add_argument("--skip-serving", action="store_true", help="skip serving under load (batching on/off)")
    parser.add_argument("--serving-requests", type=int, default=16, help="requests per concurrency round")
    parser.add_argument("--skip-denoiser-load", action="store_true",
                        help="skip the in-process denoiser batching rounds (bench/denoiser_load.py)")
    args = parser.parse_args(argv)

    os.chdir(ROOT)  # LocalMesh runs `python -m services.<stage>` from here
    started = time.perf_counter()
    result: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    rows: list[Row] = []

    errors: dict[str, str] = {}
    if not args.skip_hops:
        from bench.hops import run_hops
        print(f"per-hop overhead: {args.hop_iters} iterations after {args.hop_warmup} warm-up, interleaved ...",
              flush=True)
        t0 = time.perf_counter()
        try:
            result["hops"] = run_hops(args.hop_iters, args.hop_warmup, what_if=not args.no_what_if)
            result["hops"]["elapsed_s"] = time.perf_counter() - t0
            rows += _hop_rows(result["hops"])
        except Exception as exc:  # noqa: BLE001 - report it, still run the rest and write the JSON
            errors["hops"] = f"{type(exc).__name__}: {exc}"

    if not args.skip_e2e:
        from bench.e2e import run_e2e
        print(f"end to end: {args.warmup} warm-up + {args.runs} measured runs per side, interleaved ...",
              flush=True)
        t0 = time.perf_counter()
        mesh_env = dict(item.split("=", 1) for item in args.mesh_env)
        try:
            stage_args = {stage: ["--torch-threads", n]
                          for stage, n in (item.split("=", 1) for item in args.stage_threads)}
            result["e2e"] = run_e2e(args.models, runs=args.runs, warmup=args.warmup, mesh_env=mesh_env,
                                    stage_args=stage_args,
                                    deadline=time.monotonic() - (time.perf_counter() - started) + args.max_seconds,
                                    hard_deadline=time.monotonic() - (time.perf_counter() - started)
                                    + 2 * args.max_seconds)
            result["e2e"]["elapsed_s"] = time.perf_counter() - t0
            rows += _e2e_rows(result["e2e"])
        except Exception as exc:  # noqa: BLE001
            errors["e2e"] = f"{type(exc).__name__}: {exc}"
    def part(name: str, message: str, measure: Callable[[], dict[str, Any]],
             to_rows: Callable[[dict[str, Any]], list[Row]]) -> None:
        """One more part of the bench: measured, timed and tabled; its failure is reported (and
        the rest still runs), never raised."""
        print(message, flush=True)
        t0 = time.perf_counter()
        try:
            result[name] = measure()
            result[name]["elapsed_s"] = time.perf_counter() - t0
            rows.extend(to_rows(result[name]))
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"{type(exc).__name__}: {exc}"

    if not args.skip_extras:
        from bench.extras import run_extras
        part("extras", "tracing on vs off, previews on vs off, denoiser per-step overhead ...",
             lambda: run_extras(args.models), _extras_rows)
    if not args.skip_faces:
        from bench.faces import run_faces
        part("faces", "face detailing: batched vs one face per call, N = 1, 2, 4; face analysis latency ...",
             lambda: run_faces(args.models), _faces_rows)
    if not args.skip_serving:
        from bench.serving import run_serving
        part("serving", "serving under load: concurrency 1, 4, 8 with step-level batching on and off ...",
             lambda: run_serving(args.models, requests=args.serving_requests), _serving_rows)
    if not args.skip_denoiser_load:
        from bench.denoiser_load import run_denoiser_load
        part("denoiser_load", "denoiser in-process: concurrency 1, 4, 8 with batching on and off ...",
             lambda: _one_thread(lambda: run_denoiser_load(args.models / "registry.yaml")), _denoiser_load_rows)
    result["errors"] = errors

    if "hops" in result and "what_if" in result["hops"]:
        rows += _what_if_rows(result["hops"])

    result["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["machine"]["cpu_pressure_at_end"] = cpu_pressure()
    result["elapsed_s"] = time.perf_counter() - started
    result["summary"] = [{"figure": r.name, "measured": r.value, "target": r.target, "status": r.status or None}
                         for r in rows]
    result["all_targets_met"] = all(r.ok for r in rows if r.ok is not None)

    m = result["machine"]
    load = m["load_average"] or [0.0]
    pressure = [p for p in (m.get("cpu_pressure"), m.get("cpu_pressure_at_end")) if p is not None]
    # PSI (share of time something waited for a CPU) when the kernel has it; the load average lags
    busy = any(p > 20.0 for p in pressure) if pressure else load[0] > (m["cpu_count"] or 1) * 0.75
    result["machine_was_busy"] = busy
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"diffmesh bench: {m['cpu_count']} CPUs ({m['cpu_model']}), torch {m['versions']['torch']}, "
          f"grpcio {m['versions']['grpcio']}, protobuf {m['versions']['protobuf']} ({m['protobuf_backend']}), "
          f"load average {', '.join(f'{x:.2f}' for x in load)}")
    print(format_table(rows))
    if busy:
        print(f"\nnote: the machine was busy (load average {load[0]:.2f} on {m['cpu_count']} CPUs at the start, "
              f"CPU pressure {', '.join(f'{p:.0f}%' for p in pressure)} at start/end): other processes shared "
              "the CPUs, so these figures are not trustworthy; rerun on a quiet machine")
    for part, error in errors.items():
        print(f"\n{part} could not be measured: {error}", file=sys.stderr)
    verdict = "every target met" if result["all_targets_met"] else "some targets missed (see MISS)"
    print(f"\nwrote {args.out} in {result['elapsed_s']:.0f}s; {verdict}"
          + (" (busy machine: not conclusive)" if busy else ""))
    # A missed target is a finding (exit 0); a part that could not run at all is a failure.
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
