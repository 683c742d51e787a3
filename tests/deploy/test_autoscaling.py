"""Autoscaling on the load, draining and capacity tiers, checked without a cluster.

The chart is rendered by the real Helm engine (helm-python-sdk) as in test_chart.py. Checked here:
each stage's autoscaling mode (cpu: an HPA on CPU; hpa-pods: an HPA on the Pods metrics
prometheus-adapter serves; keda: a KEDA ScaledObject and no HPA of the chart's), the per-replica
targets against the max_concurrency each stage's own config loader reads from the rendered env,
the PromQL the scalers run (evaluated by `promtool test rules` on written series: per replica,
draining pods left out, another release's series ignored), the prometheus-adapter rules, the drain
(preStop sleep, drain, terminationGracePeriodSeconds, a scale-down no faster than the drain), the
tiers profile (ci/tiers-values.yaml: weighted node affinity on-demand > spot, spot tolerations,
spread over capacity types, budgets) and the refusals of bad combinations. docs/autoscaling.md is
checked against what the chart renders.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from diffmesh.runtime.config import ServerConfig, load_config
from diffmesh.stages import STAGES
from tests.deploy.test_chart import (CHART, KUBE_VERSION, NAMESPACE, PROFILES, RELEASE, REVIEW_DB, ROOT, Rendered,
                                     _validate, chart, config_class, deep_merge, env_of, expected_mode,  # noqa: F401
                                     helm_config, install, render_release, rendered, renders, resolved_value_from,
                                     signed)

DOC = ROOT / "docs" / "autoscaling.md"
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
QUEUE_AWARE = ("hpa-pods", "keda")
# Every stage scaled by KEDA (the safety stage's queue in PostgreSQL, so that it scales too) and a
# canary of the denoiser with fewer compute slots, scaled on its own.
ALL_KEDA = {"autoscaling": {"gpuStageMode": "keda", "cpuStageMode": "keda"},
            "stages": {"safety": {"secretSettings": {"review_database_url": REVIEW_DB},
                                  "autoscaling": {"enabled": True}},
                       "denoiser": {"canary": {"enabled": True, "weight": 10, "settings": {"max_concurrency": 4},
                                               "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}}}}}


def flag(stage: str) -> str:
    return stage.replace("_", "-")


def mode_of(doc: dict[str, Any]) -> str:
    return doc["metadata"]["annotations"]["diffmesh.io/autoscaling-mode"]


def max_concurrency_of(rendered: Rendered, stage: str, variant: str = "stable") -> int:
    """The compute slots the stage's own settings loader reads from its rendered container."""
    (container,) = [c for s, v, _, c in rendered.deployments() if (s, v) == (stage, variant)]
    env = {k: v for k, v in env_of(container).items() if v is not None}
    env.update(resolved_value_from(container))
    return load_config(config_class(STAGES[stage]), [], environ=env).max_concurrency


def pods_metrics(hpa: dict[str, Any]) -> dict[str, str]:
    """An HPA's Pods metrics: metric name -> averageValue."""
    found = {}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods", metric
        assert metric["pods"]["target"]["type"] == "AverageValue"
        found[metric["pods"]["metric"]["name"]] = metric["pods"]["target"]["averageValue"]
    return found


def triggers(scaled: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {trigger["name"]: trigger for trigger in scaled["spec"]["triggers"] if "name" in trigger}


@pytest.fixture(scope="module")
def all_keda(chart: Any, helm_config: Any) -> Rendered:
    return render_release(chart, helm_config, ALL_KEDA)


# --- modes: defaults, hpa-pods, keda --------------------------------------------------------------

def test_defaults_scale_gpu_stages_on_their_load_and_cpu_stages_on_cpu(renders: dict[str, Rendered]) -> None:
    rendered = renders["defaults"]
    hpas = rendered.named("HorizontalPodAutoscaler")
    assert not rendered.of_kind("ScaledObject"), "KEDA is opt-in: the default install needs no CRD"
    adapter = rendered.merged["autoscaling"]["prometheusAdapter"]
    seen = set()
    for spec in STAGES:
        if not rendered.stage(spec.name)["autoscaling"]["enabled"]:
            assert f"{RELEASE}-{spec.flag}" not in hpas
            continue
        hpa = hpas[f"{RELEASE}-{spec.flag}"]
        seen.add(spec.gpu)
        if spec.gpu:
            assert mode_of(hpa) == "hpa-pods", spec.name
            targets = pods_metrics(hpa)
            assert set(targets) == {adapter["inFlightMetric"], adapter["queueDepthMetric"]}, spec.name
            # In flight per replica: the stage's compute slots, as its own config loader reads them.
            assert float(targets[adapter["inFlightMetric"]]) == max_concurrency_of(rendered, spec.name), spec.name
            assert float(targets[adapter["queueDepthMetric"]]) == rendered.stage(spec.name)["autoscaling"]["targetQueueDepth"]
        else:
            assert mode_of(hpa) == "cpu", spec.name
            (metric,) = hpa["spec"]["metrics"]
            assert metric == {"type": "Resource", "resource": {"name": "cpu", "target": {
                "type": "Utilization", "averageUtilization": rendered.stage(spec.name)["autoscaling"]["targetCPUUtilizationPercentage"]}}}
    assert seen == {True, False}
    # The denoiser's target is its batching concurrency (DenoiserConfig's 16 by default).
    denoiser = pods_metrics(hpas[f"{RELEASE}-denoiser"])
    assert denoiser[adapter["inFlightMetric"]] == "16"


def test_every_derived_target_is_the_max_concurrency_the_service_runs(all_keda: Rendered) -> None:
    """With targetInFlight 0 the threshold is the variant's compute slots. Each stage's own config
    loader reads max_concurrency from its rendered env, so a service default that changes without
    values.yaml stating it (the chart falls back to ServerConfig's 1) fails here."""
    scaled = all_keda.named("ScaledObject")
    assert set(scaled) == {f"{RELEASE}-{spec.flag}" for spec in STAGES} | {f"{RELEASE}-denoiser-canary"}
    for name, (stage, variant) in all_keda.expected_deployments().items():
        threshold = triggers(scaled[name])["in-flight"]["metadata"]["threshold"]
        assert float(threshold) == max_concurrency_of(all_keda, stage, variant), (name, threshold)
    assert triggers(scaled[f"{RELEASE}-denoiser-canary"])["in-flight"]["metadata"]["threshold"] == "4"
    assert ServerConfig().max_concurrency == 1, "the chart's fallback for a stage whose settings do not say"


def test_keda_mode_renders_a_scaled_object_and_no_hpa(all_keda: Rendered) -> None:
    assert not all_keda.of_kind("HorizontalPodAutoscaler"), "KEDA owns the HPA: the chart must not render one"
    server = all_keda.merged["autoscaling"]["prometheus"]["serverAddress"]
    for name, scaled in all_keda.named("ScaledObject").items():
        _validate(scaled)
        stage, variant = all_keda.expected_deployments()[name]
        bounds = all_keda.stage(stage)["autoscaling"] if variant == "stable" else all_keda.stage(stage)["canary"]["autoscaling"]
        spec = scaled["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (bounds["minReplicas"], bounds["maxReplicas"])
        assert spec["minReplicaCount"] >= 1, "no scale to zero: no queue waits in front of a stage without replicas"
        assert spec["pollingInterval"] == all_keda.merged["autoscaling"]["keda"]["pollingInterval"]
        found = triggers(scaled)
        assert set(found) == {"in-flight", "queue-depth"}
        for trigger in found.values():
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            assert trigger["metadata"]["serverAddress"] == server
            query = trigger["metadata"]["query"]
            assert f'namespace="{NAMESPACE}"' in query and f'job="{name}"' in query, query
            assert "authenticationRef" not in trigger
        assert "diffmesh_grpc_in_flight_requests{" in found["in-flight"]["metadata"]["query"]
        assert "diffmesh_queue_depth{" in found["queue-depth"]["metadata"]["query"]
        assert found["queue-depth"]["metadata"]["threshold"] == "2"
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["policies"], name


def test_keda_options_authentication_extra_triggers_and_no_queue_trigger(chart: Any, helm_config: Any) -> None:
    cron = {"type": "cron", "metadata": {"timezone": "Europe/Paris", "start": "0 8 * * 1-5",
                                         "end": "0 20 * * 1-5", "desiredReplicas": "4"}}
    rendered = render_release(chart, helm_config, {
        "autoscaling": {"gpuStageMode": "keda", "prometheus": {"serverAddress": "https://thanos.example:10902",
                                                               "matchers": {"cluster": "prod"}},
                        "keda": {"authenticationRef": {"name": "prometheus-auth", "kind": "ClusterTriggerAuthentication"}}},
        "stages": {"denoiser": {"autoscaling": {"extraTriggers": [cron], "targetInFlight": 12}},
                   "vae": {"autoscaling": {"targetQueueDepth": 0}}}})
    scaled = rendered.named("ScaledObject")
    for doc in scaled.values():
        _validate(doc)
    denoiser = scaled[f"{RELEASE}-denoiser"]["spec"]["triggers"]
    assert denoiser[-1] == cron
    (in_flight,) = [t for t in denoiser if t.get("name") == "in-flight"]
    assert in_flight["metadata"]["threshold"] == "12"
    assert in_flight["metadata"]["serverAddress"] == "https://thanos.example:10902"
    assert 'cluster="prod"' in in_flight["metadata"]["query"]
    assert in_flight["authenticationRef"] == {"name": "prometheus-auth", "kind": "ClusterTriggerAuthentication"}
    assert set(triggers(scaled[f"{RELEASE}-vae"])) == {"in-flight"}
    # CPU stages keep their CPU HPA beside the GPU stages' ScaledObjects.
    assert {mode_of(h) for h in rendered.of_kind("HorizontalPodAutoscaler")} == {"cpu"}


def test_hpa_pods_mode_on_any_stage(chart: Any, helm_config: Any) -> None:
    rendered = render_release(chart, helm_config, {"stages": {
        "orchestrator": {"autoscaling": {"mode": "hpa-pods", "targetInFlight": 48, "targetQueueDepth": 0}},
        "vae": {"autoscaling": {"mode": "cpu"}}}})
    hpas = rendered.named("HorizontalPodAutoscaler")
    adapter = rendered.merged["autoscaling"]["prometheusAdapter"]
    assert pods_metrics(hpas[f"{RELEASE}-orchestrator"]) == {adapter["inFlightMetric"]: "48"}
    assert mode_of(hpas[f"{RELEASE}-vae"]) == "cpu"
    assert hpas[f"{RELEASE}-vae"]["spec"]["metrics"][0]["type"] == "Resource"
    for hpa in hpas.values():
        kubernetes_validate.validate(hpa, KUBE_VERSION, strict=True)


def test_custom_metrics_replace_the_chart_metrics_in_hpa_modes(chart: Any, helm_config: Any) -> None:
    metric = {"type": "Pods", "pods": {"metric": {"name": "diffmesh_batch_occupancy"},
                                      "target": {"type": "AverageValue", "averageValue": "800m"}}}
    rendered = render_release(chart, helm_config, {"stages": {"denoiser": {"autoscaling": {"metrics": [metric]}}}})
    assert rendered.named("HorizontalPodAutoscaler")[f"{RELEASE}-denoiser"]["spec"]["metrics"] == [metric]


# --- the queries: per replica, ready pods only, this Deployment only ------------------------------

def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool not installed (Debian: apt-get install prometheus; .ci/run installs it)"
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return path


def series(name: str, pod: str, value: float, job: str = f"{RELEASE}-denoiser", namespace: str = NAMESPACE,
           **labels: str) -> dict[str, str]:
    all_labels = {"namespace": namespace, "job": job, "pod": pod, "stage": "denoiser", **labels}
    text = ",".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{text}}}", "values": f"{value}x20"}


DENOISE = "/diffmesh.v1.Denoiser/Denoise"
PREVIEW = "/diffmesh.v1.Denoiser/DenoiseStream"
# Pods a and b are ready; c drains (diffmesh_ready 0); d is another release's, e another namespace's.
INPUT = [
    series("diffmesh_grpc_in_flight_requests", "a", 10, method=DENOISE),
    series("diffmesh_grpc_in_flight_requests", "a", 3, method=PREVIEW),
    series("diffmesh_grpc_in_flight_requests", "b", 7, method=DENOISE),
    series("diffmesh_grpc_in_flight_requests", "c", 16, method=DENOISE),
    series("diffmesh_grpc_in_flight_requests", "d", 50, job="other-denoiser", method=DENOISE),
    series("diffmesh_grpc_in_flight_requests", "e", 50, namespace="staging", method=DENOISE),
    series("diffmesh_queue_depth", "a", 4), series("diffmesh_queue_depth", "b", 1),
    series("diffmesh_queue_depth", "c", 9), series("diffmesh_queue_depth", "d", 30, job="other-denoiser"),
    series("diffmesh_ready", "a", 1), series("diffmesh_ready", "b", 1), series("diffmesh_ready", "c", 0),
    series("diffmesh_ready", "d", 1, job="other-denoiser"), series("diffmesh_ready", "e", 1, namespace="staging"),
]


def run_promql_tests(tmp_path: Path, cases: list[dict[str, Any]], input_series: list[dict[str, str]]) -> None:
    tests = {"rule_files": [], "evaluation_interval": "1m",
             "tests": [{"interval": "30s", "input_series": input_series, "promql_expr_test": cases}]}
    path = tmp_path / "queries-test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_keda_queries_total_the_ready_pods_of_one_deployment(all_keda: Rendered, tmp_path: Path) -> None:
    """KEDA divides the query's value by the replica count (AverageValue): the query is the total
    over this Deployment's ready pods; a draining pod's calls and other releases' are left out."""
    found = triggers(all_keda.named("ScaledObject")[f"{RELEASE}-denoiser"])
    cases = [{"expr": found["in-flight"]["metadata"]["query"], "eval_time": "5m",
              "exp_samples": [{"labels": "{}", "value": 20}]},
             {"expr": found["queue-depth"]["metadata"]["query"], "eval_time": "5m",
              "exp_samples": [{"labels": "{}", "value": 5}]}]
    run_promql_tests(tmp_path, cases, INPUT)
    # No series at all (nothing scraped yet): 0, not an error KEDA would hold the count on.
    run_promql_tests(tmp_path, [{"expr": found["in-flight"]["metadata"]["query"], "eval_time": "5m",
                                 "exp_samples": [{"labels": "{}", "value": 0}]}],
                     [series("diffmesh_ready", "z", 1, job="unrelated")])


def adapter_rules(rendered: Rendered) -> list[dict[str, Any]]:
    (configmap,) = [d for d in rendered.of_kind("ConfigMap") if d["metadata"]["name"].endswith("-prometheus-adapter-rules")]
    kubernetes_validate.validate(configmap, KUBE_VERSION, strict=True)
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def test_prometheus_adapter_rules_serve_the_hpa_metrics_per_pod(renders: dict[str, Rendered], tmp_path: Path) -> None:
    assert not [d for d in renders["defaults"].of_kind("ConfigMap") if "adapter" in d["metadata"]["name"]]
    rendered = renders["gpu"]  # rulesConfigMap: true
    rules = adapter_rules(rendered)
    adapter = rendered.merged["autoscaling"]["prometheusAdapter"]
    served = {rule["name"]["as"]: rule for rule in rules}
    asked = set()
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        if mode_of(hpa) == "hpa-pods":
            asked |= set(pods_metrics(hpa))
    assert asked == {adapter["inFlightMetric"], adapter["queueDepthMetric"]} == set(served)
    cases = []
    for rule in rules:
        assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
        source = rule["name"]["matches"].strip("^$")
        assert rule["seriesQuery"] == f'{source}{{namespace!="",pod!=""}}'
        # The adapter substitutes these for one HPA's pods in one namespace.
        query = (rule["metricsQuery"].replace("<<.Series>>", source)
                 .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"a|b|c"')
                 .replace("<<.GroupBy>>", "namespace, pod"))
        expected = {"diffmesh_grpc_in_flight_requests": {"a": 13, "b": 7, "c": 16},
                    "diffmesh_queue_depth": {"a": 4, "b": 1, "c": 9}}[source]
        cases.append({"expr": query, "eval_time": "5m", "exp_samples": [
            {"labels": f'{{namespace="{NAMESPACE}", pod="{pod}"}}', "value": value} for pod, value in expected.items()]})
    run_promql_tests(tmp_path, cases, INPUT)


def test_the_queries_use_series_and_labels_the_code_exports(all_keda: Rendered, renders: dict[str, Rendered]) -> None:
    from tests.deploy.test_rules import MATCHER, SELECTOR, exported

    names = exported()
    monitor_labels = {"namespace", "job", "pod", "service", "endpoint", "container", "instance",
                      "app_kubernetes_io_component", "diffmesh_io_variant"}
    queries = [t["metadata"]["query"] for doc in all_keda.of_kind("ScaledObject") for t in doc["spec"]["triggers"]]
    queries += [rule["seriesQuery"] for rule in adapter_rules(renders["gpu"])]
    assert queries
    for query in queries:
        for metric, matchers in SELECTOR.findall(query):
            assert metric in names, f"{metric} is not a series the code exports ({query})"
            for label in MATCHER.findall(matchers):
                assert label in names[metric] | monitor_labels, f"{metric} has no label {label!r}"
    # The ServiceMonitor names each target's job after its Service, which is named like its Deployment.
    (monitor,) = renders["tiers"].of_kind("ServiceMonitor")
    assert "jobLabel" not in monitor["spec"]
    assert set(renders["tiers"].named("Service")) == set(renders["tiers"].named("Deployment"))


# --- draining -------------------------------------------------------------------------------------

def test_every_pod_sleeps_then_drains_within_its_grace(rendered: Rendered) -> None:
    pre_stop = rendered.merged["preStopSleepSeconds"]
    for stage, variant, deployment, container in rendered.deployments():
        pod = deployment["spec"]["template"]["spec"]
        values = rendered.stage(stage)
        if pre_stop:
            # The kubelet's own sleep action (Kubernetes >= 1.30): no shell or binary in the image.
            assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": pre_stop}}}, stage
        grace = pod["terminationGracePeriodSeconds"]
        if values["terminationGracePeriodSeconds"]:
            assert grace == values["terminationGracePeriodSeconds"]
        else:
            assert grace == math.ceil(values["gracePeriodS"]) + pre_stop + 10, (stage, grace)
        assert grace > values["gracePeriodS"] + pre_stop, stage


def test_long_calls_drain_for_the_request_deadline_by_default(renders: dict[str, Rendered]) -> None:
    """The orchestrator's calls are whole requests and a denoiser loop can take minutes: both drain
    for the deadline the orchestrator gives a request that carries none (request_timeout_s)."""
    from services.orchestrator.main import OrchestratorConfig

    timeout = OrchestratorConfig().request_timeout_s
    rendered = renders["defaults"]
    for stage in (STAGES.frontend().name, "denoiser"):
        (deployment,) = [d for s, v, d, _ in rendered.deployments() if (s, v) == (stage, "stable")]
        assert rendered.stage(stage)["gracePeriodS"] >= timeout, stage
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > timeout, stage
    notes = rendered.release["notes"]
    assert "is shorter than its request deadline" not in notes
    # The install notes warn when the frontend drains for less (ci/cpu-dev-values.yaml: 10 s).
    assert f"request_timeout_s, {timeout:g} s" in " ".join(renders["cpu-dev"].release["notes"].split())


def scale_behaviors(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    found = [(d["metadata"]["name"], d["spec"]["behavior"]) for d in rendered.of_kind("HorizontalPodAutoscaler")]
    found += [(d["metadata"]["name"], d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
              for d in rendered.of_kind("ScaledObject")]
    return found


def test_scale_down_is_no_faster_than_the_drain(rendered: Rendered) -> None:
    """By default a batch of pods (max(1, 25%)) goes per terminationGracePeriodSeconds (the API
    allows at most 1800), after a stabilization window: pods are not removed faster than they drain."""
    graces = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
              for d in rendered.of_kind("Deployment")}
    behaviors = scale_behaviors(rendered)
    assert behaviors or not any(rendered.stage(s)["autoscaling"]["enabled"] for s in rendered.enabled_stages())
    for name, behavior in behaviors:
        stage, _ = rendered.expected_deployments()[name]
        if rendered.stage(stage)["autoscaling"]["behavior"].get("scaleDown", {}).get("policies"):
            continue  # the operator's own policies
        down = behavior["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300, name
        assert down["selectPolicy"] == "Max"
        assert {p["type"] for p in down["policies"]} == {"Pods", "Percent"}
        for policy in down["policies"]:
            assert policy["periodSeconds"] == min(1800, graces[name]), (name, policy)
        assert {p["type"]: p["value"] for p in down["policies"]} == {"Pods": 1, "Percent": 25}


def test_behavior_values_merge_over_the_chart_default(chart: Any, helm_config: Any) -> None:
    rendered = render_release(chart, helm_config, {"stages": {"vae": {"autoscaling": {"behavior": {
        "scaleDown": {"stabilizationWindowSeconds": 900}, "scaleUp": {"stabilizationWindowSeconds": 30}}}}}})
    behavior = rendered.named("HorizontalPodAutoscaler")[f"{RELEASE}-vae"]["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 900
    assert behavior["scaleUp"] == {"stabilizationWindowSeconds": 30}
    assert behavior["scaleDown"]["policies"], "the chart's drain-paced policies stay"
    # values.yaml's denoiser keeps a replica through a lull longer than its model load.
    denoiser = render_release(chart, helm_config, {}).named("HorizontalPodAutoscaler")[f"{RELEASE}-denoiser"]
    assert denoiser["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600 >= DEFAULTS["stages"]["denoiser"]["startupSeconds"]


# --- the tiers profile: on-demand first, spot fallback, spread, budgets ---------------------------

SPOT_TAINTS = {("diffmesh.io/capacity", "spot"), ("kubernetes.azure.com/scalesetpriority", "spot"),
               ("cloud.google.com/gke-spot", "true")}


def test_tiers_profile_renders_and_validates(renders: dict[str, Rendered]) -> None:
    rendered = renders["tiers"]
    report = helm.lint(CHART, PROFILES["tiers"], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    kinds = {doc["kind"] for doc in rendered.docs}
    assert {"Deployment", "ScaledObject", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= kinds
    for doc in rendered.docs:
        _validate(doc)


def preferred_terms(pod: dict[str, Any]) -> list[tuple[int, dict[str, set[str]]]]:
    terms = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    return [(term["weight"], {e["key"]: set(e["values"]) for e in term["preference"]["matchExpressions"]})
            for term in terms]


def test_tiers_gpu_stages_prefer_on_demand_then_cheaper_spot(renders: dict[str, Rendered]) -> None:
    rendered = renders["tiers"]
    gpu_stages = {spec.name for spec in STAGES if spec.gpu}
    seen = set()
    for stage, variant, deployment, _ in rendered.deployments():
        pod = deployment["spec"]["template"]["spec"]
        tolerated = {(t["key"], t.get("value")) for t in pod.get("tolerations", [])}
        if stage not in gpu_stages:
            # CPU stages stay off spot: on-demand nodes, no spot toleration, no capacity preference.
            assert pod["nodeSelector"]["diffmesh.io/capacity"] == "on-demand", stage
            assert not tolerated & SPOT_TAINTS and "affinity" not in pod, stage
            continue
        seen.add(stage)
        assert SPOT_TAINTS <= tolerated, (stage, tolerated)
        assert all(t["effect"] == "NoSchedule" for t in pod["tolerations"])
        terms = preferred_terms(pod)
        weights = [weight for weight, _ in terms]
        assert weights == sorted(weights, reverse=True) and len(set(weights)) == len(weights), weights
        assert all(1 <= w <= 100 for w in weights)
        (first_weight, first), *fallbacks = terms
        assert first == {"diffmesh.io/capacity": {"on-demand"}} and first_weight == 100
        assert fallbacks and all(match["diffmesh.io/capacity"] == {"spot"} for _, match in fallbacks)
        products = [match["nvidia.com/gpu.product"] for _, match in fallbacks]
        assert products == [{"NVIDIA-L4"}, {"Tesla-T4"}], "spot pools in order of cost: L4, then the cheaper T4"
        # No hard requirement on capacity: with no on-demand GPU free, the pod takes spot.
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["nodeAffinity"]
        keys = [c["topologyKey"] for c in pod["topologySpreadConstraints"]]
        assert "diffmesh.io/capacity" in keys and "kubernetes.io/hostname" in keys, keys
    assert seen == gpu_stages


def test_tiers_reclaim_leaves_replicas_and_budgets(renders: dict[str, Rendered]) -> None:
    """One reclaimed node must not take a stage's last replica: every GPU stage keeps two at
    least, scaled by KEDA on its queue, and a budget lets one pod go at a time."""
    rendered = renders["tiers"]
    scaled = rendered.named("ScaledObject")
    pdbs = rendered.named("PodDisruptionBudget")
    for spec in STAGES:
        name = f"{RELEASE}-{spec.flag}"
        assert pdbs[name]["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        if not spec.gpu:
            continue
        assert scaled[name]["spec"]["minReplicaCount"] >= 2, spec.name
        assert pdbs[name]["spec"] == {**pdbs[name]["spec"], "maxUnavailable": 1}, spec.name
        assert expected_mode(rendered, spec.name) == "keda"
    # The safety stage's review queue is in PostgreSQL (its pod's SQLite would go with a spot node).
    (container,) = [c for s, _, _, c in rendered.deployments() if s == "safety"]
    assert "DIFFMESH_REVIEW_DATABASE_URL" in env_of(container)


def test_pool_affinity_and_spread_merge_with_the_stage_own(chart: Any, helm_config: Any) -> None:
    zone = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["eu-west-1a"]}]}]}}}
    anti = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 50, "podAffinityTerm": {
        "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "vae"}}}}]}}
    spread = {"topologyKey": "nvidia.com/gpu.product", "maxSkew": 2, "whenUnsatisfiable": "ScheduleAnyway"}
    values = deep_merge(PROFILES["tiers"], {"stages": {"vae": {"affinity": anti, "topologySpreadConstraints": [spread]},
                                                       "text_encoder": {"affinity": zone}}})
    rendered = Rendered(values, chart.merge_values(values), install(helm_config, chart, values))
    pods = {s: d["spec"]["template"]["spec"] for s, v, d, _ in rendered.deployments() if v == "stable"}
    assert pods["vae"]["affinity"]["podAntiAffinity"] == anti["podAntiAffinity"]
    assert pods["vae"]["affinity"]["nodeAffinity"] == PROFILES["tiers"]["gpuPool"]["affinity"]["nodeAffinity"]
    assert pods["vae"]["topologySpreadConstraints"][-1]["topologyKey"] == "nvidia.com/gpu.product"
    assert pods["denoiser"]["topologySpreadConstraints"][-1]["topologyKey"] == "diffmesh.io/capacity"
    assert pods["text_encoder"]["affinity"] == zone
    for doc in rendered.docs:
        _validate(doc)


# --- refusals ---------------------------------------------------------------------------------------

BAD: dict[str, tuple[dict[str, Any], str]] = {
    "unknown mode": ({"stages": {"denoiser": {"autoscaling": {"mode": "gpu-util"}}}}, "/stages/denoiser/autoscaling/mode"),
    "unknown gpu stage mode": ({"autoscaling": {"gpuStageMode": "auto"}}, "/autoscaling/gpuStageMode"),
    "negative in-flight target": ({"stages": {"vae": {"autoscaling": {"targetInFlight": -1}}}},
                                  "/stages/vae/autoscaling/targetInFlight"),
    "keda without a Prometheus": ({"autoscaling": {"gpuStageMode": "keda", "prometheus": {"serverAddress": ""}}},
                                  "/autoscaling/prometheus/serverAddress"),
    "bad window": ({"autoscaling": {"prometheus": {"window": "a minute"}}}, "/autoscaling/prometheus/window"),
    "bad matcher label": ({"autoscaling": {"prometheus": {"matchers": {"k8s-cluster": "prod"}}}},
                          "invalid propertyName 'k8s-cluster'"),
    "unknown autoscaling key": ({"autoscaling": {"provider": "keda"}}, "'provider' not allowed"),
    "HPA metrics under keda": (
        {"stages": {"denoiser": {"autoscaling": {"mode": "keda", "metrics": [{"type": "Pods", "pods": {}}]}}}},
        "stages.denoiser.autoscaling.metrics is an HPA MetricSpec list, but the stage's autoscaling mode is keda"),
    "KEDA triggers without keda": (
        {"stages": {"vae": {"autoscaling": {"extraTriggers": [{"type": "cron", "metadata": {}}]}}}},
        "stages.vae.autoscaling.extraTriggers are KEDA triggers, but the stage's autoscaling mode is hpa-pods"),
    "grace shorter than the drain": (
        {"stages": {"vae": {"gracePeriodS": 120, "terminationGracePeriodSeconds": 60}}},
        "stages.vae.terminationGracePeriodSeconds (60) must be longer than gracePeriodS (120) + preStopSleepSeconds (5)"),
    "grace equal to drain and preStop": (
        {"stages": {"text_encoder": {"gracePeriodS": 20, "terminationGracePeriodSeconds": 25}}},
        "stages.text_encoder.terminationGracePeriodSeconds (25) must be longer"),
    "negative grace": ({"stages": {"vae": {"terminationGracePeriodSeconds": -1}}},
                       "/stages/vae/terminationGracePeriodSeconds"),
    "pool spread with a selector of its own": (
        {"gpuPool": {"topologySpreadConstraints": [{"topologyKey": "x", "maxSkew": 1, "whenUnsatisfiable": "ScheduleAnyway",
                                                    "labelSelector": {}}]}}, "'labelSelector' not allowed"),
    "bad keda auth kind": ({"autoscaling": {"keda": {"authenticationRef": {"name": "a", "kind": "Secret"}}}},
                           "/autoscaling/keda/authenticationRef/kind"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_autoscaling_values_are_refused(case: str, chart: Any, helm_config: Any) -> None:
    values, reason = BAD[case]
    with pytest.raises(helm.HelmError) as raised:
        install(helm_config, chart, signed(values), name="bad")
    assert reason in " ".join(str(raised.value).split())


def test_notes_say_what_the_scalers_need(renders: dict[str, Rendered], all_keda: Rendered) -> None:
    defaults = " ".join(renders["defaults"].release["notes"].split())
    assert "Autoscaling (hpa-pods): denoiser, face, vae scale on the Pods metrics" in defaults
    assert "serviceMonitor.enabled is false" in defaults
    tiers = " ".join(renders["tiers"].release["notes"].split())
    assert "Autoscaling (keda): denoiser, face, safety, vae scale with KEDA ScaledObjects" in tiers
    assert "http://prometheus-operated.monitoring.svc:9090" in tiers and "serviceMonitor.enabled is false" not in tiers
    assert "Autoscaling (hpa-pods)" not in " ".join(all_keda.release["notes"].split())


# --- the operator's documentation matches the chart -------------------------------------------------

def test_docs_show_the_rendered_queries_rules_and_defaults(all_keda: Rendered, renders: dict[str, Rendered]) -> None:
    from services.orchestrator.clients import RETRY_ATTEMPTS

    text = DOC.read_text()
    found = triggers(all_keda.named("ScaledObject")[f"{RELEASE}-denoiser"])
    for name in ("in-flight", "queue-depth"):
        assert found[name]["metadata"]["query"] in text, f"docs/autoscaling.md lacks the rendered {name} query"
    rules = yaml.safe_dump({"rules": adapter_rules(renders["gpu"])}, sort_keys=False)
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    assert {"rules": adapter_rules(renders["gpu"])} in blocks, f"docs/autoscaling.md lacks the adapter rules:\n{rules}"
    for key in ("gpuStageMode", "cpuStageMode", "targetInFlight", "targetQueueDepth", "serverAddress",
                "rulesConfigMap", "extraTriggers", "preStopSleepSeconds", "terminationGracePeriodSeconds",
                "gracePeriodS", "ci/tiers-values.yaml", "cloud.google.com/gke-spot", "eks.amazonaws.com/capacityType",
                "kubernetes.azure.com/scalesetpriority", "karpenter.sh/capacity-type", "nvidia.com/gpu.product"):
        assert key in text, key
    # What the one retry layer does, as the code has it.
    assert f"{RETRY_ATTEMPTS} attempts" in text
    readme = (CHART / "README.md").read_text()
    assert "docs/autoscaling.md" in readme and "autoscaling.mode" in readme
