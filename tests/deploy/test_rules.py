"""The chart's PrometheusRule and Grafana dashboard, checked without a cluster.

The chart is rendered by the real Helm engine (helm-python-sdk) with both enabled; the
PrometheusRule's spec.groups become a rules file that `promtool check rules` lints and `promtool
test rules` runs against written series: for each alert, a case where it fires (with its exact
labels and annotations) beside series where it must not. Every metric name the rules and the
dashboard use must be one the code exports (the metric modules' collectors), every label they
match on must be a label of that metric or one the ServiceMonitor adds, and the dashboard's
queries must parse. promtool comes from Debian's prometheus package (.ci/run installs it); without
it the promtool tests skip with the reason.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

from diffmesh.runtime import metrics
from diffmesh.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "diffmesh"
DASHBOARD = CHART / "dashboards" / "diffmesh.json"
NAMESPACE = "diffmesh"
RELEASE = "mesh"
KUBE_VERSION = "1.33.0"
ENABLED = {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
           "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "diffmesh"}},
           "serviceMonitor": {"enabled": True},
           # Every install chooses how the safety stage signs images (the chart's defaults do not).
           "stages": {"safety": {"c2pa": {"secretName": "diffmesh-c2pa-signing"}}}}
ERRORS = "INTERNAL|UNKNOWN|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|UNIMPLEMENTED"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool not installed (Debian: apt-get install prometheus; .ci/run installs it)"
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return path


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    values = {**values, "stages": {**ENABLED["stages"], **values.get("stages", {})}}
    with helm.Config(storage_driver="memory") as cfg, helm.Chart.load(CHART) as chart:
        release = cfg.install(chart, RELEASE, values, dry_run="client", namespace=NAMESPACE)
    return [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]


def one(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return doc


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render(ENABLED)


@pytest.fixture(scope="module")
def rule(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "PrometheusRule")


@pytest.fixture(scope="module")
def rules_file(rule: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "diffmesh-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def all_rules(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def dashboard_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


# --- the chart renders them, only when asked ---------------------------------------------------

def test_both_are_off_by_default() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in render({})}
    assert not [k for k in kinds if k[0] == "PrometheusRule"] and ("ConfigMap", f"{RELEASE}-dashboard") not in kinds


def test_lint_strict_has_no_errors_with_both_enabled() -> None:
    report = helm.lint(CHART, ENABLED, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_prometheus_rule_is_a_well_formed_custom_resource(rule: dict[str, Any]) -> None:
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert rule["metadata"]["namespace"] == NAMESPACE and rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for item in group["rules"]:
            if "record" in item:
                assert set(item) == {"record", "expr"} and re.fullmatch(r"diffmesh:[a-z0-9_]+:[a-z0-9_]+", item["record"])
            else:
                assert set(item) == {"alert", "expr", "for", "labels", "annotations"}
                assert item["labels"]["severity"] in ("warning", "critical")
                assert item["annotations"]["summary"] and item["annotations"]["description"]
                assert re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", item["for"])


def test_the_alerts_asked_for_are_all_there(rule: dict[str, Any]) -> None:
    assert {r["alert"] for r in all_rules(rule) if "alert" in r} == set(ALERT_CASES)


def test_the_dashboard_configmap_carries_the_dashboard_file(docs: list[dict[str, Any]]) -> None:
    configmap = one(docs, "ConfigMap", "-dashboard")
    kubernetes_validate.validate(configmap, KUBE_VERSION, strict=True)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "diffmesh"}
    assert json.loads(configmap["data"]["diffmesh.json"]) == json.loads(DASHBOARD.read_text())


def test_the_dashboard_is_a_grafana_dashboard_with_every_panel_asked_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "namespace", "stage"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and panel["targets"]
    text = json.dumps(dashboard)
    for wanted in ("diffmesh_grpc_requests_total", "histogram_quantile(0.5", "histogram_quantile(0.95",
                   "diffmesh_queue_depth", "diffmesh_queue_wait_seconds_bucket", "diffmesh_denoise_steps_total",
                   "diffmesh_batch_size_bucket", "diffmesh_generation_device_seconds_total",
                   "diffmesh_images_generated_total", "by (stage, variant)", "diffmesh_gpu_memory_capacity_bytes"):
        assert wanted in text, wanted


def test_every_container_keeps_grpc_core_logs_to_errors(docs: list[dict[str, Any]]) -> None:
    """gRPC's C core writes plain text to stderr; it reads GRPC_VERBOSITY before the services
    can configure anything, so the pod's environment sets it (logs stay JSON lines)."""
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container["env"]}
            assert env["GRPC_VERBOSITY"] == "ERROR", deployment["metadata"]["name"]


# --- names and labels the code really exports -------------------------------------------------

def exported() -> dict[str, set[str]]:
    """Every sample name the code exports -> its label names (the metric modules' collectors)."""
    import services.orchestrator.shadow as shadow  # noqa: F401  (its metrics register on import)

    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names: dict[str, set[str]] = {}
    for module in (metrics, shadow):
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                (family,) = value.describe()
                labels = set(value._labelnames)  # the names it was declared with
                for suffix in suffixes[family.type]:
                    names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    for family in metrics.GpuMemoryCollector().describe():
        names[family.name] = {"device", "kind"} if family.name == "diffmesh_gpu_memory_bytes" else {"device"}
    return names


def target_labels(docs: list[dict[str, Any]]) -> set[str]:
    """What Prometheus adds to every series of a ServiceMonitor target: its own target labels plus
    the monitor's targetLabels, sanitised (app.kubernetes.io/component -> app_kubernetes_io_component)."""
    monitor = one(docs, "ServiceMonitor")
    added = {re.sub(r"[^a-zA-Z0-9_]", "_", name) for name in monitor["spec"]["targetLabels"]}
    return added | {"namespace", "job", "pod", "service", "endpoint", "container", "instance"}


SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')


def expressions(rule: dict[str, Any]) -> list[tuple[str, str]]:
    found = [(r.get("alert") or r["record"], r["expr"]) for r in all_rules(rule)]
    return found + [(f"dashboard: {title}", expr) for title, expr in dashboard_targets(json.loads(DASHBOARD.read_text()))]


def test_every_metric_the_rules_and_dashboard_use_is_exported_by_the_code(rule: dict[str, Any],
                                                                           docs: list[dict[str, Any]]) -> None:
    names = exported()
    assert "diffmesh_grpc_requests_total" in names and "diffmesh_shadow_comparisons_total" in names
    recorded = {r["record"] for r in all_rules(rule) if "record" in r}
    extra = target_labels(docs)
    for where, expr in expressions(rule):
        selectors = SELECTOR.findall(expr)
        assert selectors or re.search(r"\bdiffmesh:", expr), (where, expr)
        for metric, matchers in selectors:
            assert metric in names or metric in recorded, (where, metric)
            if metric in names:
                unknown = set(MATCHER.findall(matchers)) - names[metric] - extra
                assert not unknown, (where, metric, unknown)
        used = {token for token in re.findall(r"\bdiffmesh_[a-z0-9_]+", expr) if token not in extra}
        assert used <= set(names), (where, used - set(names))
        for name in re.findall(r"\bdiffmesh:[a-z0-9_:]+", expr):
            assert name in recorded, (where, name)
    for item in all_rules(rule):  # metric names the annotations point operators to
        for token in re.findall(r"\bdiffmesh_[a-z0-9_]+", json.dumps(item.get("annotations", {}))):
            assert token in names or token in extra, (item.get("alert"), token)


def test_the_slo_threshold_is_a_bucket_the_code_exports() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    slo = schema["properties"]["prometheusRule"]["properties"]["latencySLO"]["properties"]
    assert slo["thresholdSeconds"]["enum"] == list(metrics.LATENCY_BUCKETS)
    for threshold in (30, 2.5, 0.25):
        (rule,) = [d for d in render({"prometheusRule": {"enabled": True, "latencySLO": {"thresholdSeconds": threshold}}})
                   if d["kind"] == "PrometheusRule"]
        le = floatToGoString(threshold)  # how prometheus_client writes the bucket's bound
        records = [r["expr"] for r in all_rules(rule) if "record" in r]
        assert records and all(f'le="{le}"' in expr for expr in records), (threshold, records[0])
    with pytest.raises(Exception, match="thresholdSeconds"):
        render({"prometheusRule": {"enabled": True, "latencySLO": {"thresholdSeconds": 7}}})


def test_a_custom_selector_replaces_the_release_selector() -> None:
    (rule,) = [d for d in render({"prometheusRule": {"enabled": True, "selector": 'namespace="prod", team="ml"'}})
               if d["kind"] == "PrometheusRule"]
    for item in all_rules(rule):
        for metric, matchers in SELECTOR.findall(item["expr"]):
            if not metric.startswith("diffmesh:"):
                assert matchers.startswith('namespace="prod", team="ml"') and "job=~" not in matchers, item["expr"]


# --- promtool ---------------------------------------------------------------------------------

def test_promtool_check_rules(rule: dict[str, Any], rules_file: Path) -> None:
    result = subprocess.run([promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(all_rules(rule))} rules found" in result.stdout, result.stdout


def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each dashboard query, with Grafana's variables given example values."""
    substitutions = {"$__rate_interval": "5m", "$namespace": ".*", "$stage": ".*"}
    records = []
    for i, (title, expr) in enumerate(dashboard_targets(json.loads(DASHBOARD.read_text()))):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, (title, expr)
        records.append({"record": f"dashboard:query_{i}:check", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def target(stage: str, pod: int = 1, variant: str = "stable") -> dict[str, str]:
    """The labels a ServiceMonitor scrape gives a series of one stage's pod."""
    job = f"{RELEASE}-{stage.replace('_', '-')}" + ("-canary" if variant == "canary" else "")
    return {"namespace": NAMESPACE, "job": job, "pod": f"{job}-{pod}", "app_kubernetes_io_component": stage.replace("_", "-"),
            "diffmesh_io_variant": variant}


def requests(stage: str, method: str, code: str, values: str, **over: str) -> dict[str, str]:
    return series("diffmesh_grpc_requests_total", values, **{**target(stage), **over}, stage=stage,
                  method=f"/diffmesh.v1.{method}", code=code)


def latency(le: str | None, values: str) -> dict[str, str]:
    labels = {**target("orchestrator"), "stage": "orchestrator", "method": "/diffmesh.v1.Orchestrator/Generate"}
    if le is None:
        return series("diffmesh_grpc_request_duration_seconds_count", values, **labels)
    return series("diffmesh_grpc_request_duration_seconds_bucket", values, **labels, le=le)


def calls(stage: str, variant: str, code: str, values: str) -> dict[str, str]:
    return series("diffmesh_stage_calls_total", values, **target("orchestrator"), stage=stage, variant=variant, code=code)


def ready(stage: str, pod: int, values: str) -> dict[str, str]:
    return series("diffmesh_ready", values, **target(stage, pod), stage=stage)


def all_ready(values: str = "1x30", skip: tuple[str, ...] = ()) -> list[dict[str, str]]:
    return [ready(spec.name, 1, values) for spec in STAGES if spec.name not in skip]


def alert(name: str, at: str, expected: list[tuple[dict[str, str], dict[str, str]]]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name,
            "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations} for labels, annotations in expected]}


SLO_FAST = ("orchestrator requests over 30s burn the latency error budget 14.4x too fast (1h and 5m)",
            "SLO: 0.99 of requests within 30s. At this rate the 30-day budget lasts about 2 days.")
SLO_SLOW = ("orchestrator requests over 30s burn the latency error budget 6x too fast (6h and 30m)",
            "SLO: 0.99 of requests within 30s. At this rate the 30-day budget lasts about 5 days.")

# alert -> test cases: (input series, [(eval time, expected firing alerts: (labels, annotations))])
ALERT_CASES: dict[str, list[tuple[list[dict[str, str]], list[tuple[str, list]]]]] = {
    "DiffmeshHighErrorRatio": [(
        [requests("vae", "Vae/Decode", "OK", "0+54x30"), requests("vae", "Vae/Decode", "INTERNAL", "0+6x30"),
         # Pre-initialised at 0: a healthy stage's error series exists and stays flat.
         requests("text_encoder", "TextEncoder/Encode", "OK", "0+60x30"),
         requests("text_encoder", "TextEncoder/Encode", "INTERNAL", "0x30"),
         # Caller mistakes are not the mesh's failures.
         requests("denoiser", "Denoiser/Denoise", "OK", "0+30x30"),
         requests("denoiser", "Denoiser/Denoise", "INVALID_ARGUMENT", "0+30x30")],
        [("5m", []),  # pending: not yet 10m
         ("15m", [({"severity": "warning", "namespace": NAMESPACE, "stage": "vae", "diffmesh_io_variant": "stable"},
                   {"summary": "vae (stable) fails 10% of its requests",
                    "description": f"Requests ending with {ERRORS} over 5m, above 0.05."})])])],
    "DiffmeshLatencySLOFastBurn": [(
        [latency("30.0", "0+30x120"), latency(None, "0+60x120")],  # half of the requests over 30 s
        [("1m", []), ("10m", [({"severity": "critical", "namespace": NAMESPACE},
                               {"summary": SLO_FAST[0], "description": SLO_FAST[1]})])]),
        ([latency("30.0", "0+60x120"), latency(None, "0+60x120")], [("60m", [])])],  # all within 30 s
    "DiffmeshLatencySLOSlowBurn": [(
        [latency("30.0", "0+54x120"), latency(None, "0+60x120")],  # 10 % over: 10x burn, below the fast 14.4x
        [("10m", []), ("30m", [({"severity": "warning", "namespace": NAMESPACE},
                                {"summary": SLO_SLOW[0], "description": SLO_SLOW[1]})])])],
    "DiffmeshQueueSaturated": [(
        [series("diffmesh_queue_depth", "9x20", **target("denoiser", 1), stage="denoiser"),
         series("diffmesh_queue_capacity", "10x20", **target("denoiser", 1), stage="denoiser"),
         series("diffmesh_queue_depth", "2x20", **target("denoiser", 2), stage="denoiser"),
         series("diffmesh_queue_capacity", "10x20", **target("denoiser", 2), stage="denoiser"),
         # max_queue 0 (no queue): never a division by zero alert.
         series("diffmesh_queue_depth", "0x20", **target("vae", 1), stage="vae"),
         series("diffmesh_queue_capacity", "0x20", **target("vae", 1), stage="vae")],
        [("3m", []), ("10m", [({"severity": "warning", "namespace": NAMESPACE, "pod": "mesh-denoiser-1",
                                "stage": "denoiser"},
                               {"summary": "denoiser queue of mesh-denoiser-1 is 90% full",
                                "description": "Requests beyond max_queue are refused with RESOURCE_EXHAUSTED: "
                                               "scale the stage out or raise max_concurrency."})])])],
    "DiffmeshShedding": [(
        [requests("denoiser", "Denoiser/Denoise", "RESOURCE_EXHAUSTED", "0+60x20"),
         requests("vae", "Vae/Decode", "RESOURCE_EXHAUSTED", "0x20")],
        [("3m", []), ("10m", [({"severity": "warning", "namespace": NAMESPACE, "stage": "denoiser"},
                   {"summary": "denoiser refuses 1 requests/s at capacity (RESOURCE_EXHAUSTED)",
                    "description": "Admission control is shedding load: the stage's queue is full."})])])],
    "DiffmeshCanaryErrorRatioAboveStable": [(
        [calls("denoiser", "canary", "OK", "0+27x40"), calls("denoiser", "canary", "INTERNAL", "0+3x40"),
         calls("denoiser", "stable", "OK", "0+99x40"), calls("denoiser", "stable", "INTERNAL", "0+1x40"),
         # A canary as good as its stable.
         calls("vae", "canary", "OK", "0+99x40"), calls("vae", "canary", "UNAVAILABLE", "0+1x40"),
         calls("vae", "stable", "OK", "0+99x40"), calls("vae", "stable", "UNAVAILABLE", "0+1x40")],
        [("5m", []), ("25m", [({"severity": "warning", "namespace": NAMESPACE, "stage": "denoiser"},
                               {"summary": "denoiser canary fails 10% of the calls it gets, well above stable",
                                "description": "Roll back with stages.<stage>.canary.weight: 0 (calls to a failing "
                                               "canary fall back to stable: diffmesh_stage_fallbacks_total)."})])])],
    "DiffmeshStageNotReady": [
        ([*all_ready(skip=("denoiser", "vae")), ready("denoiser", 1, "0x30"), ready("denoiser", 2, "0x30")],
         [("1m", []), ("5m", [
             ({"severity": "critical", "namespace": NAMESPACE, "stage": stage},
              {"summary": f"No replica of {stage} is ready: every request needing it fails",
               "description": "diffmesh_ready is 0 (models loading, draining or failing) or absent (no pod is "
                              "scraped) for every replica."})
             for stage in ("denoiser", "vae")])]),  # denoiser: both pods at 0; vae: no series at all
        ([*all_ready(), ready("denoiser", 2, "0x30")], [("20m", [])]),  # one of two denoisers loading
    ],
    "DiffmeshPodNotReady": [(
        [*all_ready(), ready("denoiser", 2, "0x30")],
        [("10m", []), ("20m", [({"severity": "warning", "namespace": NAMESPACE, "pod": "mesh-denoiser-2",
                                 "stage": "denoiser"},
                                {"summary": "mesh-denoiser-2 (denoiser) has not been ready for a long time",
                                 "description": "Longer than a model load takes: look at the pod's start-up log "
                                                "lines."})])])],
    "DiffmeshGpuMemoryNearLimit": [(
        [series("diffmesh_gpu_memory_bytes", "95000000000x20", **target("denoiser", 1), device="cuda:0", kind="reserved"),
         series("diffmesh_gpu_memory_bytes", "99000000000x20", **target("denoiser", 1), device="cuda:0", kind="allocated"),
         series("diffmesh_gpu_memory_capacity_bytes", "100000000000x20", **target("denoiser", 1), device="cuda:0"),
         series("diffmesh_gpu_memory_bytes", "50000000000x20", **target("vae", 1), device="cuda:0", kind="reserved"),
         series("diffmesh_gpu_memory_capacity_bytes", "100000000000x20", **target("vae", 1), device="cuda:0")],
        [("5m", []), ("15m", [({"severity": "warning", "namespace": NAMESPACE, "pod": "mesh-denoiser-1",
                                "device": "cuda:0"},
                               {"summary": "mesh-denoiser-1 holds 95% of cuda:0 memory",
                                "description": "Larger batches or images may fail with CUDA out of memory: lower "
                                               "max_batch or the size limits, or use a larger GPU."})])])],
}


def unit_tests(rules_file: Path) -> dict[str, Any]:
    tests = []
    for name, cases in ALERT_CASES.items():
        for input_series, checks in cases:
            tests.append({"interval": "1m", "input_series": input_series,
                          "alert_rule_test": [alert(name, at, expected) for at, expected in checks]})
    return {"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": tests}


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not() -> None:
    for name, cases in ALERT_CASES.items():
        checks = [expected for _, case_checks in cases for _, expected in case_checks]
        assert any(checks) and not all(checks), name


def test_promtool_test_rules(rules_file: Path) -> None:
    tests = rules_file.parent / "diffmesh-rules.test.yaml"
    tests.write_text(yaml.safe_dump(unit_tests(rules_file), sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120,
                            cwd=rules_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_fails_on_a_wrong_expectation(rules_file: Path) -> None:
    """Guards the check above: an expectation the rules do not meet makes promtool fail."""
    wrong = unit_tests(rules_file)
    wrong["tests"][0]["alert_rule_test"][-1]["exp_alerts"][0]["exp_labels"]["stage"] = "text_encoder"
    tests = rules_file.parent / "wrong.test.yaml"
    tests.write_text(yaml.safe_dump(wrong, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120,
                            cwd=rules_file.parent)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr
