"""The Helm chart (deploy/helm/diffmesh) and the Dockerfile, checked without a cluster.

Each values set is installed as a client-side dry run by the real Helm engine (helm-python-sdk,
Helm v4 as a C library, the chart's values.schema.json included), linted strictly, and every
rendered object is validated against the Kubernetes 1.33 OpenAPI schemas in strict mode
(kubernetes-validate: unknown fields fail). Then the structure the mesh relies on is asserted:
one Deployment per enabled stage and variant, headless Services, gRPC probes, GPU placement only
on GPU stages, HPAs and PDBs, drain times, security context, the orchestrator's routing env.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "diffmesh"
CI = CHART / "ci"
KUBE_VERSION = "1.33.0"
NAMESPACE = "diffmesh"
RELEASE = "mesh"
STAGES = ("text_encoder", "denoiser", "vae", "orchestrator", "face", "safety")
GPU_RESOURCE = "nvidia.com/gpu"


def _ci(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI / name).read_text()) or {}


# Every stage (face and safety included) with a canary, to render the widest chart.
ALL_STAGES = {
    "stages": {
        **{stage: {"canary": {"enabled": True, "weight": 5}} for stage in STAGES},
        "face": {"enabled": True, "canary": {"enabled": True, "weight": 50}},
        "safety": {"enabled": True, "canary": {"enabled": True, "weight": 100}},
    },
    "serviceMonitor": {"enabled": True},
    "registry": {"source": "configMap", "models": {"sd15": {"path": "sd15"}, "abs": {"path": "/data/x"}}},
}

PROFILES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "canary-denoiser": _ci("canary-denoiser-values.yaml"),
    "cpu-dev": _ci("cpu-dev-values.yaml"),
    "gpu": _ci("gpu-values.yaml"),
    "all-stages": ALL_STAGES,
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate mapping keys (kubectl would reject them)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            assert key not in seen, f"duplicate key {key!r} at line {key_node.start_mark.line + 1}"
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse(manifest: str) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.load_all(manifest, Loader=_UniqueKeyLoader) if doc]
    assert docs == [doc for doc in yaml.safe_load_all(manifest) if doc]
    return docs


class Rendered:
    """One values set: the values Helm merged, the release (manifest, notes) and its objects."""

    def __init__(self, values: dict[str, Any], merged: dict[str, Any], release: dict[str, Any]):
        self.values = values
        self.merged = merged
        self.release = release
        self.docs = parse(release["manifest"])

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def named(self, kind: str) -> dict[str, dict[str, Any]]:
        return {doc["metadata"]["name"]: doc for doc in self.of_kind(kind)}

    def stage(self, name: str) -> dict[str, Any]:
        return self.merged["stages"][name]

    def enabled_stages(self) -> list[str]:
        return [stage for stage in STAGES if self.stage(stage)["enabled"]]

    def expected_deployments(self) -> dict[str, tuple[str, str]]:
        """Deployment name -> (stage, variant) that the values ask for."""
        expected = {}
        for stage in self.enabled_stages():
            base = f"{RELEASE}-{stage.replace('_', '-')}"
            expected[base] = (stage, "stable")
            if self.stage(stage)["canary"]["enabled"]:
                expected[f"{base}-canary"] = (stage, "canary")
        return expected

    def deployments(self) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
        """(stage, variant, deployment, its container) for each Deployment."""
        expected = self.expected_deployments()
        for name, deployment in self.named("Deployment").items():
            stage, variant = expected[name]
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            yield stage, variant, deployment, container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """Literal env values (valueFrom entries map to None)."""
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def install(cfg: Any, chart: Any, values: dict[str, Any], name: str = RELEASE) -> dict[str, Any]:
    return cfg.install(chart, name, values, dry_run="client", namespace=NAMESPACE)


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def helm_config() -> Iterator[Any]:
    with helm.Config(storage_driver="memory") as cfg:
        yield cfg


@pytest.fixture(scope="module")
def renders(chart: Any, helm_config: Any) -> dict[str, Rendered]:
    return {profile: Rendered(values, chart.merge_values(values), install(helm_config, chart, values))
            for profile, values in PROFILES.items()}


@pytest.fixture(params=sorted(PROFILES))
def rendered(request: pytest.FixtureRequest, renders: dict[str, Rendered]) -> Rendered:
    return renders[request.param]


# --- Helm: lint, schemas -----------------------------------------------------------------------

@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_lint_strict_has_no_errors(profile: str) -> None:
    report = helm.lint(CHART, PROFILES[profile], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # severity 2 = warning, 3 = error (strict lint already counts warnings as errors)
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_schema_violations() -> None:
    report = helm.lint(CHART, {"stages": {"denoiser": {"replicas": -1}}}, strict=True,
                       kube_version=f"v{KUBE_VERSION}")
    assert report["errors"], "lint accepted a negative replica count"


def _validate_service_monitor(doc: dict[str, Any]) -> None:
    """kubernetes-validate has no schemas for CRDs: check the ServiceMonitor's shape ourselves."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "targetLabels", "podTargetLabels",
                         "jobLabel", "sampleLimit"}
    assert spec["selector"]["matchLabels"] and all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                                 "metricRelabelings", "honorLabels"}
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint[key])


def _validate(doc: dict[str, Any]) -> None:
    if doc["kind"] == "ServiceMonitor":
        _validate_service_monitor(doc)
    else:
        # SchemaNotFoundError (an API removed in 1.33, a typo in apiVersion) fails the test too.
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_every_object_validates_against_kubernetes_schemas(rendered: Rendered) -> None:
    assert rendered.docs
    for doc in rendered.docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        _validate(doc)


def test_helm_test_pod_validates(chart: Any) -> None:
    # Hooks are not part of an install's manifest: render the test pod directly.
    rendered = chart.render({}, name=RELEASE, namespace=NAMESPACE)
    (source,) = [text for path, text in rendered.items() if path.endswith("tests/test-health.yaml")]
    (pod,) = parse(source)
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert env_of(container)["TARGET"] == f"dns:///{RELEASE}-orchestrator:50051"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_validator_is_strict(renders: dict[str, Rendered]) -> None:
    """Guards the check above: strict mode must reject an unknown field and an unknown API."""
    deployment = renders["defaults"].of_kind("Deployment")[0]
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)
    removed = {"apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(removed, KUBE_VERSION, strict=True)


# --- the schema and the template refuse bad values ---------------------------------------------

# values -> a fragment of the error Helm must raise (schema violations name the JSON pointer).
BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "negative replicas": ({"stages": {"denoiser": {"replicas": -1}}}, "/stages/denoiser/replicas"),
    "negative canary replicas": ({"stages": {"vae": {"canary": {"replicas": -2}}}}, "/stages/vae/canary/replicas"),
    "canary weight 150": ({"stages": {"denoiser": {"canary": {"enabled": True, "weight": 150}}}},
                          "/stages/denoiser/canary/weight"),
    "negative canary weight": ({"stages": {"denoiser": {"canary": {"weight": -1}}}}, "/stages/denoiser/canary/weight"),
    "unknown stage": ({"stages": {"upscaler": {"enabled": True}}}, "'upscaler' not allowed"),
    "unknown stage field": ({"stages": {"vae": {"replica": 3}}}, "'replica' not allowed"),
    "unknown top-level key": ({"replicaCount": 3}, "'replicaCount' not allowed"),
    "port out of range": ({"stages": {"vae": {"port": 70000}}}, "/stages/vae/port"),
    "gpu not a boolean": ({"stages": {"text_encoder": {"gpu": "yes"}}}, "/stages/text_encoder/gpu"),
    "hpa min 0": ({"stages": {"vae": {"autoscaling": {"minReplicas": 0}}}}, "/stages/vae/autoscaling/minReplicas"),
    "hpa max < min": ({"stages": {"vae": {"autoscaling": {"minReplicas": 4, "maxReplicas": 2}}}},
                      "maxReplicas (2) < minReplicas (4)"),
    "bad pdb": ({"stages": {"vae": {"pdb": {"maxUnavailable": "half"}}}}, "/stages/vae/pdb/maxUnavailable"),
    "grace not shorter than termination": (
        {"stages": {"denoiser": {"gracePeriodS": 70, "terminationGracePeriodSeconds": 75}}},
        "stages.denoiser.terminationGracePeriodSeconds (75) must be longer"),
    "root user": ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    "uid 0": ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    "writable root filesystem": ({"containerSecurityContext": {"readOnlyRootFilesystem": False}},
                                 "/containerSecurityContext/readOnlyRootFilesystem"),
    "setting owned by the chart": ({"stages": {"vae": {"settings": {"port": 1234}}}},
                                   "stages.vae.settings.port is set by the chart"),
    "routing setting owned by the chart": (
        {"stages": {"orchestrator": {"settings": {"denoiser_canary_weight": 5}}}},
        "settings.denoiser_canary_weight is set by the chart"),
    "shadow percent 101": ({"stages": {"vae": {"canary": {"enabled": True, "shadowPercent": 101}}}},
                           "/stages/vae/canary/shadowPercent"),
    "setting with a map value": ({"settings": {"log_level": {"x": 1}}}, "/settings/log_level"),
    "unknown models source": ({"models": {"source": "s3"}}, "/models/source"),
    "volume source without a volume": ({"models": {"source": "volume"}}, "/models/volume"),
    "configMap registry without models": ({"registry": {"source": "configMap"}}, "/registry"),
    "orchestrator without a vae": ({"stages": {"vae": {"enabled": False}}}, "orchestrator needs the vae stage"),
    "bad image digest": ({"image": {"digest": "latest"}}, "/image/digest"),
    "bad otel sampler": ({"otel": {"tracesSampler": "sometimes"}}, "/otel/tracesSampler"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_rejected(case: str, chart: Any, helm_config: Any) -> None:
    values, reason = BAD_VALUES[case]
    with pytest.raises(helm.HelmError) as raised:
        install(helm_config, chart, values, name="bad")
    assert reason in " ".join(str(raised.value).split())


def test_missing_stage_can_be_external(chart: Any, helm_config: Any) -> None:
    release = install(helm_config, chart, {"stages": {"vae": {"enabled": False, "address": "vae.gpu-pool:50063"}}})
    deployments = {doc["metadata"]["name"]: doc for doc in parse(release["manifest"]) if doc["kind"] == "Deployment"}
    assert f"{RELEASE}-vae" not in deployments
    (container,) = deployments[f"{RELEASE}-orchestrator"]["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["DIFFMESH_VAE_ADDRESS"] == "vae.gpu-pool:50063"


# --- structure ---------------------------------------------------------------------------------

def test_one_deployment_per_enabled_stage_and_variant(rendered: Rendered) -> None:
    assert set(rendered.named("Deployment")) == set(rendered.expected_deployments())
    for stage, variant, deployment, container in rendered.deployments():
        assert container["args"] == [f"services.{stage}"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["diffmesh.io/variant"] == variant
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"grpc": rendered.stage(stage)["port"], "metrics": rendered.stage(stage)["metricsPort"]}
        env = env_of(container)
        assert env["DIFFMESH_PORT"] == str(ports["grpc"])
        assert env["DIFFMESH_METRICS_PORT"] == str(ports["metrics"])
        assert env["DIFFMESH_HOST"] == "0.0.0.0"


def test_disabled_stages_render_nothing(renders: dict[str, Rendered]) -> None:
    names = [doc["metadata"]["name"] for doc in renders["defaults"].docs]
    assert not [name for name in names if "face" in name or "safety" in name]
    wide = [doc["metadata"]["name"] for doc in renders["all-stages"].docs]
    assert f"{RELEASE}-face-canary" in wide and f"{RELEASE}-safety" in wide


def test_every_service_is_headless_and_matches_one_deployment(rendered: Rendered) -> None:
    services = rendered.named("Service")
    deployments = rendered.named("Deployment")
    assert set(services) == set(deployments)
    for name, service in services.items():
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"].get("publishNotReadyAddresses", False) is False
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
            assert port["port"] == container_ports[port["name"]]
        # Service selectors of the two variants must not overlap, or canary pods would take
        # stable traffic through DNS.
        for other_name, other in services.items():
            if other_name != name:
                assert not other["spec"]["selector"].items() <= pod_labels.items()


def test_grpc_probes_on_every_container(rendered: Rendered) -> None:
    for stage, _, deployment, container in rendered.deployments():
        probe_port = rendered.stage(stage)["probePort"] or rendered.stage(stage)["port"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": probe_port}, (stage, probe)
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= rendered.stage(stage)["startupSeconds"]


def test_gpu_placement_only_on_gpu_stages(rendered: Rendered) -> None:
    pool = rendered.merged["gpuPool"]
    gpu_taints = {t["key"] for t in pool["tolerations"]}
    gpu_labels = set(pool["nodeSelector"].items())
    seen = {True: 0, False: 0}
    for stage, _, deployment, container in rendered.deployments():
        gpu = rendered.stage(stage)["gpu"]
        seen[gpu] += 1
        pod = deployment["spec"]["template"]["spec"]
        resources = container.get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        node_selector = pod.get("nodeSelector", {})
        tolerations = {t["key"] for t in pod.get("tolerations", [])}
        env = env_of(container)
        if gpu:
            count = rendered.stage(stage)["gpuCount"]
            assert limits[GPU_RESOURCE] == count and requests[GPU_RESOURCE] == count
            assert pool["nodeSelector"].items() <= node_selector.items()
            assert gpu_taints <= tolerations
            assert env["DIFFMESH_DEVICE"] == "cuda"
            assert pod.get("runtimeClassName", "") == pool["runtimeClassName"]
        else:
            assert GPU_RESOURCE not in limits and GPU_RESOURCE not in requests
            assert not gpu_labels & set(node_selector.items())
            assert not gpu_taints & tolerations
            assert "runtimeClassName" not in pod
            assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
            assert env["DIFFMESH_DEVICE"] == "cpu"
            assert rendered.merged["cpuPool"]["nodeSelector"].items() <= node_selector.items()
    if rendered.values is PROFILES["cpu-dev"]:
        assert seen[True] == 0
    elif rendered.values is PROFILES["defaults"]:
        assert seen == {True: 2, False: 2}


def test_text_encoder_on_cpu_denoiser_on_gpu_by_default(renders: dict[str, Rendered]) -> None:
    deployments = renders["defaults"].named("Deployment")
    te = deployments[f"{RELEASE}-text-encoder"]["spec"]["template"]["spec"]
    dn = deployments[f"{RELEASE}-denoiser"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in te and "tolerations" not in te
    assert dn["containers"][0]["resources"]["limits"][GPU_RESOURCE] == 1
    assert dn["containers"][0]["image"] == "ghcr.io/diffmesh/diffmesh:0.1.0-cuda"
    assert te["containers"][0]["image"] == "ghcr.io/diffmesh/diffmesh:0.1.0-cpu"


def test_an_hpa_and_a_pdb_per_stage(rendered: Rendered) -> None:
    hpas = rendered.named("HorizontalPodAutoscaler")
    pdbs = rendered.named("PodDisruptionBudget")
    deployments = rendered.named("Deployment")
    expected_hpas = set()
    for name, (stage, variant) in rendered.expected_deployments().items():
        scaling = rendered.stage(stage)["autoscaling"] if variant == "stable" \
            else rendered.stage(stage)["canary"]["autoscaling"]
        if scaling["enabled"]:
            expected_hpas.add(name)
            assert "replicas" not in deployments[name]["spec"], "the HPA owns the replica count"
        else:
            values = rendered.stage(stage) if variant == "stable" else rendered.stage(stage)["canary"]
            assert deployments[name]["spec"]["replicas"] == values["replicas"]
    assert set(hpas) == expected_hpas
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    stage_pdbs = {f"{RELEASE}-{stage.replace('_', '-')}" for stage in rendered.enabled_stages()
                  if rendered.stage(stage)["pdb"]["enabled"]}
    assert set(pdbs) == stage_pdbs
    for name, pdb in pdbs.items():
        selected = [d for d in deployments.values()
                    if pdb["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert {d["metadata"]["name"] for d in selected} <= {name, f"{name}-canary"} and selected
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])
    if rendered.values is PROFILES["defaults"]:
        assert len(hpas) == len(pdbs) == 4


def test_termination_grace_is_longer_than_the_drain(rendered: Rendered) -> None:
    for stage, _, deployment, container in rendered.deployments():
        pod = deployment["spec"]["template"]["spec"]
        drain = float(env_of(container)["DIFFMESH_GRACE_PERIOD_S"])
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert drain == rendered.stage(stage)["gracePeriodS"]
        assert pod["terminationGracePeriodSeconds"] > drain + pre_stop, stage


def test_security_context_non_root_read_only(rendered: Rendered) -> None:
    for _, _, deployment, container in rendered.deployments():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["automountServiceAccountToken"] is False
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        assert env_of(container)["HOME"].startswith("/tmp")
        assert mounts[rendered.merged["models"]["mountPath"]]["readOnly"] is True
        # Every mount but /tmp is read-only.
        assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp")


def test_models_and_registry_mounts(rendered: Rendered) -> None:
    merged = rendered.merged
    configmaps = rendered.named("ConfigMap")
    for _, _, deployment, container in rendered.deployments():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        models = volumes[mounts["models"]["name"]] if "models" in mounts else None
        assert models is not None
        source = merged["models"]["source"]
        if source == "pvc":
            assert models["persistentVolumeClaim"] == {"claimName": merged["models"]["pvc"]["claimName"],
                                                       "readOnly": True}
        elif source == "hostPath":
            assert models["hostPath"]["path"] == merged["models"]["hostPath"]["path"]
        registry = env_of(container)["DIFFMESH_REGISTRY"]
        mounted_under = [m["mountPath"] for m in container["volumeMounts"] if registry.startswith(m["mountPath"] + "/")]
        assert mounted_under, f"DIFFMESH_REGISTRY={registry} is on no mounted volume"
        if merged["registry"]["source"] == "configMap":
            name = volumes["registry"]["configMap"]["name"]
            content = yaml.safe_load(configmaps[name]["data"]["registry.yaml"])
            assert content["models"] and all(spec["path"].startswith("/") for spec in content["models"].values())
            assert "checksum/registry" in deployment["spec"]["template"]["metadata"]["annotations"]
        else:
            assert registry == f"{merged['models']['mountPath']}/{merged['registry']['path']}"
            assert not configmaps


def test_orchestrator_env_points_at_the_stage_services(rendered: Rendered) -> None:
    services = rendered.named("Service")
    orchestrators = [(variant, c) for stage, variant, _, c in rendered.deployments() if stage == "orchestrator"]
    assert orchestrators
    for _, container in orchestrators:
        env = env_of(container)
        for stage in STAGES:
            if stage == "orchestrator":
                continue
            values = rendered.stage(stage)
            prefix = f"DIFFMESH_{stage.upper()}"
            if not values["enabled"]:
                assert f"{prefix}_ADDRESS" not in env
                continue
            stable = f"{RELEASE}-{stage.replace('_', '-')}"
            assert env[f"{prefix}_ADDRESS"] == f"{stable}:{values['port']}"
            assert values["port"] in [p["port"] for p in services[stable]["spec"]["ports"] if p["name"] == "grpc"]
            if values["canary"]["enabled"]:
                assert env[f"{prefix}_CANARY_ADDRESS"] == f"{stable}-canary:{values['port']}"
                assert f"{stable}-canary" in services
                # percentages in values and in the orchestrator's settings alike
                assert float(env[f"{prefix}_CANARY_WEIGHT"]) == values["canary"]["weight"]
                assert float(env[f"{prefix}_SHADOW_PERCENT"]) == values["canary"]["shadowPercent"]
            else:
                assert not {f"{prefix}_CANARY_ADDRESS", f"{prefix}_CANARY_WEIGHT", f"{prefix}_SHADOW_PERCENT"} & set(env)


@pytest.mark.parametrize("profile", ["canary-denoiser", "all-stages", "gpu"])
def test_orchestrator_config_accepts_the_rendered_env(profile: str, renders: dict[str, Rendered]) -> None:
    """The orchestrator's own settings loader reads the rendered env: names, types, bounds and the
    canary weight's unit (a percentage) line up with services/orchestrator/main.py."""
    import dataclasses

    from diffmesh.runtime.config import load_config
    from services.orchestrator.main import OrchestratorConfig

    fields = {field.name: field for field in dataclasses.fields(OrchestratorConfig)}
    rendered = renders[profile]
    for stage in ("text_encoder", "denoiser", "vae"):
        assert fields[f"{stage}_canary_weight"].metadata["max"] == 100, "canary weights are percentages"
    (container,) = [c for stage, variant, _, c in rendered.deployments()
                    if stage == "orchestrator" and variant == "stable"]
    env = {k: v for k, v in env_of(container).items() if v is not None}
    config = load_config(OrchestratorConfig, [], environ=env)
    assert config.host == "0.0.0.0" and config.port == 50051
    routes = {route.stage: route for route in config.routes()}
    for stage, route in routes.items():
        values = rendered.stage(stage)
        base = f"{RELEASE}-{stage.replace('_', '-')}"
        assert route.stable == f"{base}:{values['port']}"
        if values["canary"]["enabled"]:
            assert route.canary == f"{base}-canary:{values['port']}"
            assert route.canary_weight == values["canary"]["weight"]
            if f"{stage}_shadow_percent" in fields:
                assert getattr(config, f"{stage}_shadow_percent") == values["canary"]["shadowPercent"]
        else:
            assert not route.canary and route.canary_weight == 0


def test_shared_settings_load_in_every_stage(rendered: Rendered) -> None:
    from diffmesh.runtime.config import ServerConfig, load_config

    for stage, variant, _, container in rendered.deployments():
        env = {k: v for k, v in env_of(container).items() if v is not None}
        config = load_config(ServerConfig, [], environ=env)
        assert config.host == "0.0.0.0"
        assert config.port == rendered.stage(stage)["port"]
        assert config.metrics_port == rendered.stage(stage)["metricsPort"]
        assert config.grace_period_s == rendered.stage(stage)["gracePeriodS"]
        assert config.variant == variant
        assert config.registry == env["DIFFMESH_REGISTRY"]


def test_default_ports_match_the_services() -> None:
    """values.yaml's ports are the services' own defaults (read from services/<stage>/main.py)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for stage in ("text_encoder", "denoiser", "vae", "orchestrator"):
        tree = ast.parse((ROOT / "services" / stage / "main.py").read_text())
        defaults = {node.target.id: node.value.args[0].value for node in ast.walk(tree)
                    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "setting"
                    and node.value.args and isinstance(node.value.args[0], ast.Constant)}
        assert values["stages"][stage]["port"] == defaults["port"], stage
        if stage == "orchestrator":
            for target in ("text_encoder", "denoiser", "vae"):
                assert {f"{target}_address", f"{target}_canary_address", f"{target}_canary_weight"} <= set(defaults)


def test_canary_variant_overrides(renders: dict[str, Rendered]) -> None:
    rendered = renders["canary-denoiser"]
    containers = {(stage, variant): c for stage, variant, _, c in rendered.deployments()}
    stable, canary = containers[("denoiser", "stable")], containers[("denoiser", "canary")]
    assert canary["image"].endswith(":0.2.0-rc1-cuda") and stable["image"].endswith(":0.1.0-cuda")
    assert env_of(canary)["DIFFMESH_MAX_BATCH"] == "8" and "DIFFMESH_MAX_BATCH" not in env_of(stable)
    assert env_of(canary)["DIFFMESH_VARIANT"] == "canary"
    deployments = rendered.named("Deployment")
    assert deployments[f"{RELEASE}-denoiser-canary"]["spec"]["replicas"] == 1


def test_network_policy_only_orchestrator_reaches_stage_grpc(rendered: Rendered) -> None:
    policies = rendered.named("NetworkPolicy")
    assert set(policies) == {f"{RELEASE}-{s.replace('_', '-')}" for s in rendered.enabled_stages()}
    deployments = rendered.named("Deployment")
    orchestrator_labels = deployments[f"{RELEASE}-orchestrator"]["spec"]["template"]["metadata"]["labels"]
    for stage in rendered.enabled_stages():
        name = f"{RELEASE}-{stage.replace('_', '-')}"
        spec = policies[name]["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        for variant_name in (name, f"{name}-canary"):
            if variant_name in deployments:
                pod_labels = deployments[variant_name]["spec"]["template"]["metadata"]["labels"]
                assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
        grpc_rules = [r for r in spec["ingress"] if r["ports"] == [{"port": "grpc", "protocol": "TCP"}]]
        metrics_rules = [r for r in spec["ingress"] if r["ports"] == [{"port": "metrics", "protocol": "TCP"}]]
        assert len(grpc_rules) == 1 and len(grpc_rules) + len(metrics_rules) == len(spec["ingress"])
        if stage == "orchestrator":
            assert grpc_rules[0].get("from", []) == rendered.merged["networkPolicy"]["orchestratorFrom"]
        else:
            (peer,) = grpc_rules[0]["from"]
            assert set(peer) == {"podSelector"}
            assert peer["podSelector"]["matchLabels"].items() <= orchestrator_labels.items()
        for rule in metrics_rules:
            assert rule["from"] == rendered.merged["networkPolicy"]["metricsFrom"]


def test_topology_spread_selects_its_own_pods(rendered: Rendered) -> None:
    enabled = rendered.merged["topologySpread"]["enabled"]
    for _, _, deployment, _ in rendered.deployments():
        template = deployment["spec"]["template"]
        constraints = template["spec"].get("topologySpreadConstraints", [])
        assert bool(constraints) == enabled
        for constraint in constraints:
            assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_observability_and_tls_from_values(renders: dict[str, Rendered]) -> None:
    gpu = renders["gpu"]
    for stage, variant, deployment, container in gpu.deployments():
        env = env_of(container)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
        assert env["OTEL_SERVICE_NAME"] == f"diffmesh-{stage.replace('_', '-')}"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.05"
        assert f"diffmesh.variant={variant}" in env["OTEL_RESOURCE_ATTRIBUTES"]
        assert "deployment.environment=prod" in env["OTEL_RESOURCE_ATTRIBUTES"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert mounts["/etc/diffmesh/tls"]["readOnly"] is True
        assert volumes[mounts["/etc/diffmesh/tls"]["name"]]["secret"]["secretName"] == "diffmesh-mesh-tls"
        # The services serve mTLS from the mounted files; probes go to the plaintext health-only port.
        assert (env["DIFFMESH_TLS_CERT_FILE"], env["DIFFMESH_TLS_KEY_FILE"], env["DIFFMESH_TLS_CA_FILE"]) == (
            "/etc/diffmesh/tls/tls.crt", "/etc/diffmesh/tls/tls.key", "/etc/diffmesh/tls/ca.crt")
        probe_port = gpu.stage(stage)["probePort"]
        assert probe_port and env["DIFFMESH_HEALTH_PORT"] == str(probe_port)
        assert container["readinessProbe"]["grpc"]["port"] == probe_port
    (monitor,) = gpu.of_kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for service in gpu.of_kind("Service"):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert "metrics" in [p["name"] for p in service["spec"]["ports"]]
    for _, _, _, container in renders["defaults"].deployments():
        env = env_of(container)
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env and env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
        assert "/etc/diffmesh/tls" not in [m["mountPath"] for m in container["volumeMounts"]]
        assert "DIFFMESH_TLS_CERT_FILE" not in env and "DIFFMESH_HEALTH_PORT" not in env
    assert not renders["defaults"].of_kind("ServiceMonitor")


def test_notes_explain_how_to_call_the_mesh(renders: dict[str, Rendered]) -> None:
    notes = renders["defaults"].release["notes"]
    assert "grpcurl -plaintext" in notes
    assert "diffmesh.v1.Orchestrator/Generate" in notes
    assert f"port-forward svc/{RELEASE}-orchestrator 50051:50051" in notes


def test_long_release_names_stay_valid_dns_labels(chart: Any, helm_config: Any) -> None:
    name = "a-very-long-release-name-for-the-diffmesh-chart-xyz"  # 51 characters
    release = install(helm_config, chart, ALL_STAGES, name=name)
    for doc in parse(release["manifest"]):
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


# --- Dockerfile --------------------------------------------------------------------------------

def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_runs_as_non_root() -> None:
    instructions = _dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    assert any(keyword == "USER" for keyword, _ in instructions[last_from:]), "the final stage runs as root"


def test_dockerfile_pins_torch_before_the_project() -> None:
    runs = [args for keyword, args in _dockerfile_instructions() if keyword == "RUN"]
    torch = [i for i, args in enumerate(runs) if re.search(r"pip install .*\btorch==2\.13\.0\b", args)]
    project = [i for i, args in enumerate(runs) if re.search(r"pip install .*(-r |/src\b|\s\.(\s|$))", args)]
    assert torch and project
    assert torch[0] < min(project)
    # No other torch requirement anywhere (an unpinned one could pull another build).
    mentions = re.findall(r"(?<![\w.-])torch(?:[=<>~!]=?\S*)?(?![\w.-])", " ".join(runs))
    assert mentions and set(mentions) == {"torch==2.13.0"}, mentions


def test_dockerfile_variants_stage_args_and_no_models() -> None:
    instructions = _dockerfile_instructions()
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"ARG VARIANT=cpu", text) and "cuda)" in text
    copies = [args for keyword, args in instructions if keyword in ("COPY", "ADD")]
    assert copies
    for args in copies:
        assert not re.search(r"(^|[\s/])\.?models\b", args), f"models baked into the image: {args}"
        assert not args.split()[0] in (".", "./")
    entrypoint = [args for keyword, args in instructions if keyword == "ENTRYPOINT"][-1]
    assert entrypoint == '["python", "-m"]'
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".models", ".mesh", "out", ".git", ".pytest_cache", ".hypothesis"} <= ignored
