"""The Helm chart (deploy/helm/diffmesh) and the Dockerfile, checked without a cluster.

Each values set is installed as a client-side dry run by the real Helm engine (helm-python-sdk,
Helm v4 as a C library, the chart's values.schema.json included), linted strictly, and every
rendered object is validated against the Kubernetes 1.33 OpenAPI schemas in strict mode
(kubernetes-validate: unknown fields fail). Then the structure the mesh relies on is asserted:
one Deployment per enabled stage and variant, headless Services, gRPC probes, GPU placement only
on GPU stages, HPAs and PDBs, drain times, security context, the orchestrator's routing env.

The stage table (diffmesh/stages.py, STAGES) is the source of truth: the chart's stage entries,
ports, GPU placement, roles, container modules and the orchestrator's address env are checked
against it, and every DIFFMESH_* variable the chart renders must be a setting of the stage it is
rendered for (the services refuse unknown ones at start-up).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from diffmesh.runtime.config import CONFIG_FILE_ENV, ENV_PREFIX, ServerConfig
from diffmesh.stage_settings import config_class, main as stage_settings_main, settings_by_stage
from diffmesh.stages import STAGES, Need, Role, StageSpec, StageTable

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "diffmesh"
CI = CHART / "ci"
KUBE_VERSION = "1.33.0"
NAMESPACE = "diffmesh"
RELEASE = "mesh"
GPU_RESOURCE = "nvidia.com/gpu"


def _ci(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI / name).read_text()) or {}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's mergeOverwrite on deep copies: maps merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


C2PA_SECRET = "diffmesh-c2pa-signing"
# The least an install must say: how the safety stage signs the images it returns (the chart's
# defaults choose nothing, and the render fails without a choice).
SIGNED: dict[str, Any] = {"stages": {"safety": {"c2pa": {"secretName": C2PA_SECRET}}}}
REVIEW_DB = {"secretName": "diffmesh-review-db", "key": "url"}


def signed(values: dict[str, Any]) -> dict[str, Any]:
    """values over SIGNED: for the tests about something other than signing."""
    return deep_merge(SIGNED, values)


# Every stage of the table with a canary, to render the widest chart (a safety canary shares the
# review queue with the stable pods: PostgreSQL, not the pod's SQLite).
ALL_STAGES = signed({
    "stages": {spec.name: {"canary": {"enabled": True, "weight": 5 + 10 * i, "shadowPercent": i}}
               for i, spec in enumerate(STAGES)}
    | {"safety": {"canary": {"enabled": True, "weight": 5 + 10 * STAGES.names().index("safety"),
                             "shadowPercent": STAGES.names().index("safety")},
                  "secretSettings": {"review_database_url": REVIEW_DB}}},
    "serviceMonitor": {"enabled": True},
    "registry": {"source": "configMap", "models": {"sd15": {"path": "sd15"}, "abs": {"path": "/data/x"}}},
})

PROFILES: dict[str, dict[str, Any]] = {
    "defaults": SIGNED,
    "canary-denoiser": _ci("canary-denoiser-values.yaml"),
    "cpu-dev": _ci("cpu-dev-values.yaml"),
    "gpu": _ci("gpu-values.yaml"),
    "tiers": _ci("tiers-values.yaml"),
    "all-stages": ALL_STAGES,
}


def stage_values(values: dict[str, Any], name: str) -> dict[str, Any]:
    """A stage's effective values, as the templates compute them: stageDefaults < stages.<name>."""
    return deep_merge(values["stageDefaults"], values["stages"][name] or {})


def stage_of_component(component: str) -> str:
    """The stage name of a pod's app.kubernetes.io/component label (dashes back to underscores)."""
    return component.replace("-", "_")


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
        return stage_values(self.merged, name)

    def stage_names(self) -> list[str]:
        """The chart's stages (the keys of `stages`; the table tests check them against STAGES)."""
        return sorted(self.merged["stages"])

    def enabled_stages(self) -> list[str]:
        return [stage for stage in self.stage_names() if self.stage(stage)["enabled"]]

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


def render_release(chart: Any, cfg: Any, values: dict[str, Any]) -> Rendered:
    """values over SIGNED, installed (dry run) and parsed."""
    values = signed(values)
    return Rendered(values, chart.merge_values(values), install(cfg, chart, values))


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


# The ScaledObject fields of KEDA's CRD (keda.sh/v1alpha1, config/crd/bases/keda.sh_scaledobjects.yaml).
SCALED_OBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                      "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
SCALED_OBJECT_TRIGGER = {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}


def _validate_scaled_object(doc: dict[str, Any]) -> None:
    """kubernetes-validate has no schemas for CRDs: check the ScaledObject against KEDA's CRD
    ourselves, and its HPA behavior against the autoscaling/v2 schema (KEDA copies it into the HPA
    it creates)."""
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert all(isinstance(v, str) for v in doc["metadata"].get("labels", {}).values())
    spec = doc["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC and {"scaleTargetRef", "triggers"} <= set(spec), set(spec)
    assert set(spec["scaleTargetRef"]) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    assert isinstance(spec["scaleTargetRef"]["name"], str)
    for key in ("pollingInterval", "minReplicaCount", "maxReplicaCount", "cooldownPeriod"):
        if key in spec:
            assert isinstance(spec[key], int) and not isinstance(spec[key], bool) and spec[key] >= 0, key
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec.get("advanced", {})) <= {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount",
                                             "scalingModifiers"}
    hpa_config = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
    assert set(hpa_config) <= {"name", "behavior"}
    if "behavior" in hpa_config:
        probe = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "probe"},
                 "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                          "maxReplicas": 2, "behavior": hpa_config["behavior"]}}
        kubernetes_validate.validate(probe, KUBE_VERSION, strict=True)
    assert spec["triggers"]
    names = [trigger["name"] for trigger in spec["triggers"] if "name" in trigger]
    assert len(names) == len(set(names)), f"trigger names must be unique: {names}"
    for trigger in spec["triggers"]:
        assert set(trigger) <= SCALED_OBJECT_TRIGGER and {"type", "metadata"} <= set(trigger), set(trigger)
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["metadata"]
        assert trigger.get("metricType", "AverageValue") in ("AverageValue", "Value", "Utilization")
        if "authenticationRef" in trigger:
            assert set(trigger["authenticationRef"]) <= {"name", "kind"} and trigger["authenticationRef"]["name"]


def _validate(doc: dict[str, Any]) -> None:
    if doc["kind"] == "ServiceMonitor":
        _validate_service_monitor(doc)
    elif doc["kind"] == "ScaledObject":
        _validate_scaled_object(doc)
    else:
        # SchemaNotFoundError (an API removed in 1.33, a typo in apiVersion) fails the test too.
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_every_object_validates_against_kubernetes_schemas(rendered: Rendered) -> None:
    assert rendered.docs
    for doc in rendered.docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        _validate(doc)


def render_test_pod(chart: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Hooks are not part of an install's manifest: render the `helm test` pod directly."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    (source,) = [text for path, text in rendered.items() if path.endswith("tests/test-health.yaml")]
    (pod,) = parse(source)
    return pod


def test_helm_test_pod_validates(chart: Any) -> None:
    pod = render_test_pod(chart, SIGNED)
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    frontend = STAGES.frontend()
    assert env_of(container)["TARGET"] == f"dns:///{RELEASE}-{frontend.flag}:{frontend.default_port}"
    # It asks for the frontend's own gRPC service (the table's), not just the server's health.
    assert f'service="{frontend.service}"' in container["args"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("profile", ["gpu", "tls-on"])
def test_helm_test_pod_uses_the_plaintext_health_port_under_tls(profile: str, chart: Any, renders: dict[str, Rendered],
                                                                helm_config: Any) -> None:
    """Under mTLS the gRPC port wants a client certificate the test pod does not have: it must check
    the plaintext health-only port (probePort -> DIFFMESH_HEALTH_PORT) that the stage serves then,
    and the NetworkPolicy must let it in there."""
    frontend = STAGES.frontend()
    values = PROFILES["gpu"] if profile == "gpu" else signed({
        "tls": {"secretName": "mesh-tls"},
        "stages": {spec.name: {"probePort": spec.default_port + 100} for spec in STAGES}})
    pod = render_test_pod(chart, values)
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    (container,) = pod["spec"]["containers"]
    rendered = renders["gpu"] if profile == "gpu" else render_release(chart, helm_config, values)
    health_port = rendered.stage(frontend.name)["probePort"]
    assert health_port and health_port != frontend.default_port
    assert env_of(container)["TARGET"] == f"dns:///{RELEASE}-{frontend.flag}:{health_port}"
    (orchestrator,) = [c for stage, variant, _, c in rendered.deployments()
                       if stage == frontend.name and variant == "stable"]
    assert env_of(orchestrator)["DIFFMESH_HEALTH_PORT"] == str(health_port)
    assert env_of(orchestrator)["DIFFMESH_TLS_CA_FILE"], "the gRPC port is mTLS here"
    policy = rendered.named("NetworkPolicy")[f"{RELEASE}-{frontend.flag}"]
    (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": health_port, "protocol": "TCP"}]]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


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
    # A stage entry names its port (no shared default): a typo'd stage name is refused.
    "unknown stage": ({"stages": {"upscaler": {"enabled": True}}}, "at '/stages/upscaler': missing property 'port'"),
    "stage name not a table name": ({"stages": {"text-encoder": {"port": 50061}}}, "invalid propertyName 'text-encoder'"),
    "port in stageDefaults": ({"stageDefaults": {"port": 50000}}, "/stageDefaults/port"),
    "bad role": ({"stages": {"vae": {"role": "sidecar"}}}, "/stages/vae/role"),
    "two frontends": ({"stages": {"vae": {"role": "frontend"}}}, "exactly one stage must have role: frontend, got 2"),
    "global setting no stage has": ({"settings": {"max_bacth": 8}}, "invalid propertyName 'max_bacth'"),
    "stage setting the stage lacks": ({"stages": {"vae": {"settings": {"max_steps": 5}}}},
                                      "stages.vae.settings.max_steps is not a setting of the vae stage"),
    "canary setting the stage lacks": ({"stages": {"text_encoder": {"canary": {"settings": {"max_size": 64}}}}},
                                       "stages.text_encoder.canary.settings.max_size is not a setting of"),
    "tls without a health port": ({"tls": {"secretName": "mesh-tls"}},
                                  "probePort must be set when tls.secretName is"),
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
    "c2pa in stageDefaults": ({"stageDefaults": {"c2pa": {"secretName": "x"}}}, "/stageDefaults/c2pa"),
    "secret setting without a key": ({"stages": {"safety": {"secretSettings": {"prompt_hash_salt": {"secretName": "s"}}}}},
                                     "/stages/safety/secretSettings/prompt_hash_salt"),
    "setting both plain and from a secret": (
        {"stages": {"safety": {"settings": {"prompt_hash_salt": "pepper"},
                               "secretSettings": {"prompt_hash_salt": {"secretName": "s", "key": "salt"}}}}},
        "stages.safety: settings.prompt_hash_salt is also set by stages.safety.secretSettings"),
    "state_dir besides state.mountPath": ({"stages": {"safety": {"settings": {"state_dir": "/data"}}}},
                                          "settings.state_dir is also set by stages.safety.state.mountPath"),
    "c2pa paths besides the c2pa secret": ({"stages": {"safety": {"settings": {"c2pa_key": "/k.pem"}}}},
                                           "settings.c2pa_key is also set by stages.safety.c2pa.secretName"),
    "state volume with two sources": (
        {"stages": {"safety": {"state": {"volume": {"emptyDir": {}, "persistentVolumeClaim": {"claimName": "c"}}}}}},
        "/stages/safety/state/volume"),
    "merged state volume with two sources": (
        {"stageDefaults": {"state": {"volume": {"emptyDir": {"sizeLimit": "1Gi"}}}},
         "stages": {"safety": {"state": {"volume": {"persistentVolumeClaim": {"claimName": "c"}}}}}},
        "stages.safety.state.volume has 2 sources (emptyDir, persistentVolumeClaim)"),
    "relative state path": ({"stages": {"safety": {"state": {"mountPath": "var/state"}}}}, "/stages/safety/state/mountPath"),
    "extra volume named like the chart's": (
        {"stages": {"safety": {"extraVolumes": [{"name": "models", "emptyDir": {}}]}}},
        'stages.safety.extraVolumes: the volume name "models" is the chart\'s own'),
    "extra volume without a source": ({"stages": {"safety": {"extraVolumes": [{"name": "x"}]}}},
                                      "/stages/safety/extraVolumes/0"),
    "extra mount without a path": ({"stages": {"safety": {"extraVolumeMounts": [{"name": "x"}]}}},
                                   "/stages/safety/extraVolumeMounts/0"),
    "safety replicas on SQLite": ({"stages": {"safety": {"replicas": 3}}},
                                  "stages.safety: replicas: 3 with the embedded SQLite review queue"),
    "safety autoscaling on SQLite": ({"stages": {"safety": {"autoscaling": {"enabled": True}}}},
                                     "stages.safety: autoscaling.enabled with the embedded SQLite review queue"),
    "safety canary on SQLite": ({"stages": {"safety": {"canary": {"enabled": True}}}},
                                "stages.safety: canary.enabled with the embedded SQLite review queue"),
    "unknown egress key": ({"networkPolicy": {"egress": {"allow": []}}}, "'allow' not allowed"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_rejected(case: str, chart: Any, helm_config: Any) -> None:
    values, reason = BAD_VALUES[case]
    with pytest.raises(helm.HelmError) as raised:
        install(helm_config, chart, signed(values), name="bad")
    assert reason in " ".join(str(raised.value).split())


def test_stage_defaults_apply_under_every_stage(chart: Any, helm_config: Any) -> None:
    """stageDefaults is merged under each stage's own entry: a default reaches the stages that do
    not set the key, and a stage's own value (values.yaml or the user's) wins. The denoiser sorts
    first: were the merge to write into stageDefaults (no deepCopy), its annotation would leak into
    the stages rendered after it."""
    values = {"stageDefaults": {"podAnnotations": {"team": "ml"}, "startupSeconds": 900,
                                "autoscaling": {"targetCPUUtilizationPercentage": 55}},
              "stages": {"denoiser": {"podAnnotations": {"team": "denoiser"}}}}
    rendered = render_release(chart, helm_config, values)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for stage, _, deployment, _ in rendered.deployments():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["team"] == ("denoiser" if stage == "denoiser" else "ml"), stage
        own = defaults["stages"][stage]
        expected_startup = own.get("startupSeconds", 900)
        assert deployment["spec"]["progressDeadlineSeconds"] == expected_startup + 600, stage
    cpu_hpas = [hpa for hpa in rendered.of_kind("HorizontalPodAutoscaler")
                if hpa["metadata"]["annotations"]["diffmesh.io/autoscaling-mode"] == "cpu"]
    assert cpu_hpas, "the CPU stages scale on CPU by default"
    for hpa in cpu_hpas:
        assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 55


def test_missing_stage_can_be_external(chart: Any, helm_config: Any) -> None:
    release = install(helm_config, chart, signed({"stages": {"vae": {"enabled": False, "address": "vae.gpu-pool:50063"}}}))
    deployments = {doc["metadata"]["name"]: doc for doc in parse(release["manifest"]) if doc["kind"] == "Deployment"}
    assert f"{RELEASE}-vae" not in deployments
    (container,) = deployments[f"{RELEASE}-orchestrator"]["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["DIFFMESH_VAE_ADDRESS"] == "vae.gpu-pool:50063"


# --- structure ---------------------------------------------------------------------------------

def test_one_deployment_per_enabled_stage_and_variant(rendered: Rendered) -> None:
    assert set(rendered.named("Deployment")) == set(rendered.expected_deployments())
    for stage, variant, deployment, container in rendered.deployments():
        assert container["args"] == [STAGES[stage].package]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["diffmesh.io/variant"] == variant
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"grpc": rendered.stage(stage)["port"], "metrics": rendered.stage(stage)["metricsPort"]}
        env = env_of(container)
        assert env["DIFFMESH_PORT"] == str(ports["grpc"])
        assert env["DIFFMESH_METRICS_PORT"] == str(ports["metrics"])
        assert env["DIFFMESH_HOST"] == "0.0.0.0"


def test_disabled_stages_render_nothing(chart: Any, helm_config: Any, renders: dict[str, Rendered]) -> None:
    values = {"stages": {"text_encoder": {"enabled": False, "address": "te.shared:50061"}}}
    names = [doc["metadata"]["name"] for doc in parse(install(helm_config, chart, signed(values))["manifest"])]
    assert not [name for name in names if "text-encoder" in name]
    wide = [doc["metadata"]["name"] for doc in renders["all-stages"].docs]
    assert {f"{RELEASE}-{spec.flag}-canary" for spec in STAGES} <= set(wide)


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
        assert seen == {True: sum(spec.gpu for spec in STAGES), False: sum(not spec.gpu for spec in STAGES)}


def test_text_encoder_on_cpu_denoiser_on_gpu_by_default(renders: dict[str, Rendered]) -> None:
    deployments = renders["defaults"].named("Deployment")
    te = deployments[f"{RELEASE}-text-encoder"]["spec"]["template"]["spec"]
    dn = deployments[f"{RELEASE}-denoiser"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in te and "tolerations" not in te
    assert dn["containers"][0]["resources"]["limits"][GPU_RESOURCE] == 1
    assert dn["containers"][0]["image"] == "ghcr.io/diffmesh/diffmesh:0.1.0-cuda"
    assert te["containers"][0]["image"] == "ghcr.io/diffmesh/diffmesh:0.1.0-cpu"


def expected_mode(rendered: Rendered, stage: str) -> str:
    """The autoscaling mode a stage runs: its own, where auto is the GPU or CPU stages' mode."""
    mode = rendered.stage(stage)["autoscaling"]["mode"]
    if mode == "auto":
        mode = rendered.merged["autoscaling"]["gpuStageMode" if rendered.stage(stage)["gpu"] else "cpuStageMode"]
    return mode


def test_an_hpa_and_a_pdb_per_stage(rendered: Rendered) -> None:
    hpas = rendered.named("HorizontalPodAutoscaler")
    scaled_objects = rendered.named("ScaledObject")
    pdbs = rendered.named("PodDisruptionBudget")
    deployments = rendered.named("Deployment")
    expected_hpas, expected_scaled_objects = set(), set()
    for name, (stage, variant) in rendered.expected_deployments().items():
        scaling = rendered.stage(stage)["autoscaling"] if variant == "stable" \
            else rendered.stage(stage)["canary"]["autoscaling"]
        if scaling["enabled"]:
            # One autoscaler per Deployment: KEDA's (it creates the HPA itself) or the chart's HPA.
            (expected_scaled_objects if expected_mode(rendered, stage) == "keda" else expected_hpas).add(name)
            assert "replicas" not in deployments[name]["spec"], "the HPA owns the replica count"
        else:
            values = rendered.stage(stage) if variant == "stable" else rendered.stage(stage)["canary"]
            assert deployments[name]["spec"]["replicas"] == values["replicas"]
    assert set(hpas) == expected_hpas
    assert set(scaled_objects) == expected_scaled_objects
    assert not set(hpas) & set(scaled_objects)
    for name, scaled in scaled_objects.items():
        assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
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
        assert len(pdbs) == len(STAGES.names())
        # Every stage scales by default but safety, whose default review queue is one pod's SQLite.
        assert {name.removeprefix(f"{RELEASE}-") for name in hpas} == {
            spec.flag for spec in STAGES if spec.name != "safety"}


def test_termination_grace_is_longer_than_the_drain(rendered: Rendered) -> None:
    for stage, _, deployment, container in rendered.deployments():
        pod = deployment["spec"]["template"]["spec"]
        drain = float(env_of(container)["DIFFMESH_GRACE_PERIOD_S"])
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert drain == rendered.stage(stage)["gracePeriodS"]
        assert pod["terminationGracePeriodSeconds"] > drain + pre_stop, stage


def test_security_context_non_root_read_only(rendered: Rendered) -> None:
    for stage, _, deployment, container in rendered.deployments():
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
        # Every mount but /tmp and the stage's own state volume is read-only.
        writable = {"/tmp", rendered.stage(stage)["state"]["mountPath"]}
        assert all(m.get("readOnly") for path, m in mounts.items() if path not in writable), stage


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
    frontend = STAGES.frontend().name
    orchestrators = [(variant, c) for stage, variant, _, c in rendered.deployments() if stage == frontend]
    assert orchestrators
    for _, container in orchestrators:
        env = env_of(container)
        for spec in STAGES.backends():
            stage = spec.name
            values = rendered.stage(stage)
            prefix = f"{ENV_PREFIX}{stage.upper()}"
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
    for spec in STAGES.backends():
        assert fields[f"{spec.name}_canary_weight"].metadata["max"] == 100, "canary weights are percentages"
    (container,) = [c for stage, variant, _, c in rendered.deployments()
                    if stage == STAGES.frontend().name and variant == "stable"]
    env = {k: v for k, v in env_of(container).items() if v is not None}
    config = load_config(OrchestratorConfig, [], environ=env)
    assert config.host == "0.0.0.0" and config.port == STAGES.frontend().default_port
    routes = {route.stage: route for route in config.routes()}
    assert set(routes) == {spec.name for spec in STAGES.backends()}
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


def resolved_value_from(container: dict[str, Any]) -> dict[str, str]:
    """The DIFFMESH_* valueFrom entries as the kubelet would resolve them: a CPU limit of "2"
    (DIFFMESH_TORCH_THREADS), a Secret's value as a placeholder naming the Secret and key."""
    resolved = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if not item["name"].startswith(ENV_PREFIX) or not source:
            continue
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            resolved[item["name"]] = f"from-secret-{ref['name']}-{ref['key']}"
        else:
            assert set(source) == {"resourceFieldRef"}, item
            resolved[item["name"]] = "2"
    return resolved


def test_every_stage_loads_its_rendered_env(rendered: Rendered) -> None:
    """Each stage's own settings loader (its config class, which refuses unknown DIFFMESH_*
    variables) accepts what the chart renders for it, and reads the chart's ports and drain."""
    from diffmesh.runtime.config import load_config

    for stage, variant, _, container in rendered.deployments():
        env = {k: v for k, v in env_of(container).items() if v is not None}
        env.update(resolved_value_from(container))
        config = load_config(config_class(STAGES[stage]), [], environ=env)
        assert config.host == "0.0.0.0"
        assert config.port == rendered.stage(stage)["port"]
        assert config.metrics_port == rendered.stage(stage)["metricsPort"]
        assert config.grace_period_s == rendered.stage(stage)["gracePeriodS"]
        assert config.variant == variant
        assert config.registry == env["DIFFMESH_REGISTRY"]


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
    frontend = STAGES.frontend()
    orchestrator_labels = deployments[f"{RELEASE}-{frontend.flag}"]["spec"]["template"]["metadata"]["labels"]
    for stage in rendered.enabled_stages():
        name = f"{RELEASE}-{stage.replace('_', '-')}"
        spec = policies[name]["spec"]
        restricted = rendered.merged["networkPolicy"]["egress"]["enabled"]
        assert spec["policyTypes"] == (["Ingress", "Egress"] if restricted else ["Ingress"])
        assert ("egress" in spec) == restricted
        for variant_name in (name, f"{name}-canary"):
            if variant_name in deployments:
                pod_labels = deployments[variant_name]["spec"]["template"]["metadata"]["labels"]
                assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
        grpc_rules = [r for r in spec["ingress"] if r["ports"] == [{"port": "grpc", "protocol": "TCP"}]]
        metrics_rules = [r for r in spec["ingress"] if r["ports"] == [{"port": "metrics", "protocol": "TCP"}]]
        # Under TLS, the frontend's plaintext health-only port admits the `helm test` pod (only it).
        health_port = rendered.stage(stage)["probePort"]
        health_rules = [r for r in spec["ingress"] if r["ports"] == [{"port": health_port, "protocol": "TCP"}]]
        tested = stage == frontend.name and bool(rendered.merged["tls"]["secretName"]) and rendered.merged["tests"]["enabled"]
        assert len(health_rules) == (1 if tested else 0), stage
        for rule in health_rules:
            (peer,) = rule["from"]
            assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
        assert len(grpc_rules) == 1
        assert len(grpc_rules) + len(metrics_rules) + len(health_rules) == len(spec["ingress"])
        if stage == frontend.name:
            assert grpc_rules[0].get("from", []) == rendered.merged["networkPolicy"]["orchestratorFrom"]
        else:
            (peer,) = grpc_rules[0]["from"]
            assert set(peer) == {"podSelector"}
            assert peer["podSelector"]["matchLabels"].items() <= orchestrator_labels.items()
        for rule in metrics_rules:
            assert rule["from"] == rendered.merged["networkPolicy"]["metricsFrom"]


def test_topology_spread_selects_its_own_pods(rendered: Rendered) -> None:
    """The release-wide constraints (with topologySpread.enabled), then the pool's, then the
    stage's, each selecting the Deployment's own pods."""
    merged = rendered.merged
    for stage, _, deployment, _ in rendered.deployments():
        template = deployment["spec"]["template"]
        constraints = template["spec"].get("topologySpreadConstraints", [])
        pool = merged["gpuPool" if rendered.stage(stage)["gpu"] else "cpuPool"]
        expected = ((merged["topologySpread"]["constraints"] if merged["topologySpread"]["enabled"] else [])
                    + pool["topologySpreadConstraints"] + rendered.stage(stage)["topologySpreadConstraints"])
        assert [{k: v for k, v in c.items() if k not in ("labelSelector", "matchLabelKeys")}
                for c in constraints] == expected, stage
        for constraint in constraints:
            assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
            assert constraint["matchLabelKeys"] == ["pod-template-hash"]


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


# --- the safety stage: signing, state, review database, extra volumes, egress -----------------

SIGNING_REFUSED = "every returned image is C2PA-signed: set stages.safety.c2pa.secretName"


@pytest.mark.parametrize("values", [
    {},
    {"stages": {"safety": {"settings": {"c2pa_dev_chain": False}}}},
    # The canary is a pod of its own: it must sign too.
    {"stages": {"safety": {"settings": {"c2pa_dev_chain": True},
                           "secretSettings": {"review_database_url": REVIEW_DB},
                           "canary": {"enabled": True, "settings": {"c2pa_dev_chain": False}}}}},
], ids=["defaults", "dev chain off", "canary unsigned"])
def test_render_fails_without_c2pa_signing(values: dict[str, Any], chart: Any, helm_config: Any) -> None:
    with pytest.raises(helm.HelmError) as raised:
        install(helm_config, chart, values, name="unsigned")
    message = " ".join(str(raised.value).split())
    assert SIGNING_REFUSED in message
    assert "c2pa_dev_chain: true (a development chain, never in production)" in message


def test_signing_is_not_asked_of_a_release_without_safety(chart: Any, helm_config: Any) -> None:
    values = {"stages": {"safety": {"enabled": False, "address": "safety.shared:50065"}}}
    release = Rendered(values, chart.merge_values(values), install(helm_config, chart, values))
    assert f"{RELEASE}-safety" not in release.named("Deployment")
    (orchestrator,) = [c for stage, _, _, c in release.deployments() if stage == STAGES.frontend().name]
    assert env_of(orchestrator)["DIFFMESH_SAFETY_ADDRESS"] == "safety.shared:50065"


def container_of(rendered: Rendered, stage: str, variant: str = "stable") -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, container) of one stage's variant."""
    (found,) = [(d["spec"]["template"]["spec"], c) for s, v, d, c in rendered.deployments() if (s, v) == (stage, variant)]
    return found


def test_c2pa_secret_is_mounted_under_fixed_names(renders: dict[str, Rendered]) -> None:
    """gpu-values names a cert-manager style Secret (tls.crt, tls.key): the container reads it as
    chain.pem and key.pem, whatever the Secret's keys."""
    pod, container = container_of(renders["gpu"], "safety")
    env = env_of(container)
    assert env["DIFFMESH_C2PA_CERT_CHAIN"] == "/etc/diffmesh/c2pa/chain.pem"
    assert env["DIFFMESH_C2PA_KEY"] == "/etc/diffmesh/c2pa/key.pem"
    assert "DIFFMESH_C2PA_DEV_CHAIN" not in env
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["c2pa"] == {"name": "c2pa", "mountPath": "/etc/diffmesh/c2pa", "readOnly": True}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["c2pa"]["secret"] == {"secretName": C2PA_SECRET, "defaultMode": 0o440,
                                         "items": [{"key": "tls.crt", "path": "chain.pem"},
                                                   {"key": "tls.key", "path": "key.pem"}]}
    # Only the stage that signs gets the signing key.
    for stage, _, _, other in renders["gpu"].deployments():
        if stage != "safety":
            assert "c2pa" not in {m["name"] for m in other["volumeMounts"]}, stage


def test_dev_chain_profile_signs_in_the_state_volume(renders: dict[str, Rendered]) -> None:
    pod, container = container_of(renders["cpu-dev"], "safety")
    env = env_of(container)
    assert env["DIFFMESH_C2PA_DEV_CHAIN"] == "true"
    assert "DIFFMESH_C2PA_CERT_CHAIN" not in env and "c2pa" not in {v["name"] for v in pod["volumes"]}
    assert env["DIFFMESH_STATE_DIR"] == "/var/lib/diffmesh/safety"
    # The install says that this is no production signing; a release with a real chain does not.
    assert "signs images with a development C2PA chain" in renders["cpu-dev"].release["notes"]
    assert "development C2PA chain" not in renders["gpu"].release["notes"]


def test_state_volume_is_mounted_where_state_dir_points(rendered: Rendered) -> None:
    """A stage with state.mountPath gets one writable volume there and DIFFMESH_STATE_DIR; the
    others get neither (the table's stateful stages are the ones with a mountPath: see
    values_mismatches)."""
    for stage, variant, deployment, container in rendered.deployments():
        state = rendered.stage(stage)["state"]
        env = env_of(container)
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        if not state["mountPath"]:
            assert "DIFFMESH_STATE_DIR" not in env and "state" not in mounts and "state" not in volumes, stage
            continue
        assert env["DIFFMESH_STATE_DIR"] == state["mountPath"], (stage, variant)
        assert mounts["state"] == {"name": "state", "mountPath": state["mountPath"]}
        source = {k: v for k, v in volumes["state"].items() if k != "name"}
        assert source == (state["volume"] or {"emptyDir": {}}), (stage, variant)
    assert renders_state_of_safety(rendered)


def renders_state_of_safety(rendered: Rendered) -> bool:
    """Every profile that deploys safety mounts its state (the default SQLite queue's home)."""
    return "safety" not in rendered.enabled_stages() or bool(rendered.stage("safety")["state"]["mountPath"])


def test_state_volume_takes_any_volume_source(chart: Any, helm_config: Any) -> None:
    claim = {"persistentVolumeClaim": {"claimName": "diffmesh-safety-state"}}
    rendered = render_release(chart, helm_config, {"stages": {"safety": {
        "state": {"mountPath": "/data/safety", "volume": claim}, "strategy": {"type": "Recreate"}}}})
    pod, container = container_of(rendered, "safety")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "state"]
    assert volume == {"name": "state", **claim}
    assert env_of(container)["DIFFMESH_STATE_DIR"] == "/data/safety"
    assert {"name": "state", "mountPath": "/data/safety"} in container["volumeMounts"]
    for doc in rendered.docs:
        _validate(doc)


def test_review_database_and_salt_come_from_secrets(renders: dict[str, Rendered]) -> None:
    """gpu-values keeps the PostgreSQL URL and the prompt-hash salt in Secrets: the env carries a
    secretKeyRef, never a value, and with a shared database the stage autoscales."""
    rendered = renders["gpu"]
    _, container = container_of(rendered, "safety")
    by_name = {item["name"]: item for item in container["env"]}
    for name, (secret, key) in {"DIFFMESH_REVIEW_DATABASE_URL": ("diffmesh-review-db", "url"),
                                "DIFFMESH_PROMPT_HASH_SALT": ("diffmesh-safety-salt", "salt")}.items():
        assert by_name[name] == {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
    assert f"{RELEASE}-safety" in rendered.named("HorizontalPodAutoscaler")
    assert "postgresql://" not in rendered.release["manifest"]


def test_review_database_from_a_secret_allows_replicas_and_a_canary(chart: Any, helm_config: Any) -> None:
    rendered = render_release(chart, helm_config, {"stages": {"safety": {
        "secretSettings": {"review_database_url": REVIEW_DB}, "replicas": 3, "autoscaling": {"enabled": False},
        "canary": {"enabled": True, "weight": 10}}}})
    for variant in ("stable", "canary"):
        _, container = container_of(rendered, "safety", variant)
        (ref,) = [item["valueFrom"]["secretKeyRef"] for item in container["env"]
                  if item["name"] == "DIFFMESH_REVIEW_DATABASE_URL"]
        assert ref == {"name": REVIEW_DB["secretName"], "key": REVIEW_DB["key"]}
    assert rendered.named("Deployment")[f"{RELEASE}-safety"]["spec"]["replicas"] == 3


def test_extra_volumes_and_mounts_render(renders: dict[str, Rendered]) -> None:
    """gpu-values mounts the protected-identity gallery from a Secret with extraVolumes and
    extraVolumeMounts, and points gallery_file into it."""
    rendered = renders["gpu"]
    pod, container = container_of(rendered, "safety")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "safety-gallery"]
    assert volume == {"name": "safety-gallery", "secret": {"secretName": "diffmesh-safety-gallery", "defaultMode": 0o440}}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "safety-gallery"]
    assert mount == {"name": "safety-gallery", "mountPath": "/etc/diffmesh/safety-gallery", "readOnly": True}
    assert env_of(container)["DIFFMESH_GALLERY_FILE"].startswith(mount["mountPath"] + "/")
    for stage, _, deployment, other in rendered.deployments():
        if stage != "safety":
            assert "safety-gallery" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}


def test_extra_volumes_reach_any_stage_and_its_canary(chart: Any, helm_config: Any) -> None:
    config = {"name": "vae-tuning", "configMap": {"name": "vae-tuning"}}
    rendered = render_release(chart, helm_config, {"stages": {"vae": {
        "extraVolumes": [config], "extraVolumeMounts": [{"name": "vae-tuning", "mountPath": "/etc/vae", "readOnly": True}],
        "canary": {"enabled": True}}}})
    for variant in ("stable", "canary"):
        pod, container = container_of(rendered, "vae", variant)
        assert config in pod["volumes"]
        assert {"name": "vae-tuning", "mountPath": "/etc/vae", "readOnly": True} in container["volumeMounts"]
    for doc in rendered.docs:
        _validate(doc)


def test_egress_is_restricted_to_what_each_stage_needs(renders: dict[str, Rendered]) -> None:
    """gpu-values restricts egress: every stage may reach DNS and the collector; the orchestrator
    also its backends' gRPC ports (their pods, both variants); safety also its PostgreSQL."""
    rendered = renders["gpu"]
    policies = rendered.named("NetworkPolicy")
    egress_values = rendered.merged["networkPolicy"]["egress"]
    assert egress_values["enabled"]
    deployments = rendered.named("Deployment")
    frontend = STAGES.frontend().name
    for stage in rendered.enabled_stages():
        rules = policies[f"{RELEASE}-{stage.replace('_', '-')}"]["spec"]["egress"]
        dns, *rest = rules
        assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
        assert dns["to"] == egress_values["dns"]
        backend_rules = [r for r in rest if "podSelector" in r["to"][0] and len(r["to"][0]) == 1]
        own = rendered.stage(stage)["egress"]
        assert rest == backend_rules + egress_values["to"] + own, stage
        if stage == frontend:
            reached = {}
            for rule in backend_rules:
                (port,) = rule["ports"]
                for name, deployment in deployments.items():
                    if rule["to"][0]["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items():
                        reached[name] = port["port"]
            expected = {name: rendered.stage(s)["port"] for name, (s, _) in rendered.expected_deployments().items()
                        if s != frontend}
            assert reached == expected
        else:
            assert not backend_rules, stage
    (database,) = rendered.stage("safety")["egress"]
    assert database["ports"] == [{"port": 5432, "protocol": "TCP"}]
    assert all(not rendered.stage(s)["egress"] for s in rendered.enabled_stages() if s != "safety")


# --- the stage table: one declaration of the stages (diffmesh/stages.py) -----------------------

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def stage_env_names(spec: StageSpec) -> set[str]:
    """The DIFFMESH_* variables the stage's config loader accepts."""
    return {ENV_PREFIX + field.name.upper() for field in dataclasses.fields(config_class(spec))} | {CONFIG_FILE_ENV}


def values_mismatches(table: StageTable, values: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Where values.yaml (and the schema, if it lists stages) disagree with the stage table."""
    problems = []
    chart = set(values["stages"])
    for spec in table:
        if spec.name not in chart:
            gpu = ", gpu: true" if spec.gpu else ""
            role = ", role: frontend" if spec.role is Role.FRONTEND else ""
            problems.append(f"stage {spec.name!r} is in diffmesh/stages.py but has no entry under `stages:` in "
                            f"values.yaml (add `{spec.name}: {{port: {spec.default_port}{gpu}{role}}}`)")
    for name in sorted(chart - set(table.names())):
        problems.append(f"stage {name!r} has an entry in values.yaml but is not in diffmesh/stages.py STAGES")
    listed = schema["properties"]["stages"].get("properties")
    if listed is not None:
        for name in sorted(set(table.names()) - set(listed)):
            problems.append(f"stage {name!r} is in diffmesh/stages.py but not listed in values.schema.json")
        for name in sorted(set(listed) - set(table.names())):
            problems.append(f"stage {name!r} is listed in values.schema.json but not in diffmesh/stages.py STAGES")
    for spec in table:
        if spec.name not in chart:
            continue
        own = stage_values(values, spec.name)
        checks = [("port", own.get("port"), spec.default_port, "default_port"),
                  ("gpu", own["gpu"], spec.gpu, "gpu"),
                  ("role", own["role"], spec.role.value, "role"),
                  ("a state.mountPath", bool(own["state"]["mountPath"]), spec.stateful, "stateful")]
        if spec.role is Role.BACKEND:
            checks.append(("need", own["need"], spec.need.value, "need"))
        for key, chart_value, table_value, field in checks:
            if chart_value != table_value:
                problems.append(f"stage {spec.name!r}: values.yaml has {key}: {chart_value!r}, "
                                f"diffmesh/stages.py has {field}={table_value!r}")
    return problems


def gpu_placed(rendered: Rendered, deployment: dict[str, Any], container: dict[str, Any]) -> set[str]:
    """The GPU placement a pod got: the extended resource, the GPU pool's labels, taints, runtime."""
    pool = rendered.merged["gpuPool"]
    pod = deployment["spec"]["template"]["spec"]
    resources = container.get("resources", {})
    found = set()
    if GPU_RESOURCE in resources.get("limits", {}) or GPU_RESOURCE in resources.get("requests", {}):
        found.add(GPU_RESOURCE)
    if set(pool["nodeSelector"].items()) & set(pod.get("nodeSelector", {}).items()):
        found.add("nodeSelector")
    if {t["key"] for t in pool["tolerations"]} & {t["key"] for t in pod.get("tolerations", [])}:
        found.add("tolerations")
    if pod.get("runtimeClassName"):
        found.add("runtimeClassName")
    return found


def full_gpu_placement(rendered: Rendered) -> set[str]:
    """What gpu_placed finds on a GPU stage's pod, given the values' gpuPool."""
    pool = rendered.merged["gpuPool"]
    wanted = {GPU_RESOURCE, "nodeSelector" if pool["nodeSelector"] else "", "tolerations" if pool["tolerations"] else "",
              "runtimeClassName" if pool["runtimeClassName"] else ""}
    return wanted - {""}


def rendered_mismatches(table: StageTable, rendered: Rendered, gpu_as_in_table: bool) -> list[str]:
    """Where a rendered release disagrees with the stage table: a Deployment per enabled stage,
    running `python -m <spec.package>`; GPU placement only for gpu stages (and, with
    gpu_as_in_table, for every gpu stage); one address env per backend on the frontend."""
    problems = []
    by_stage: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {}
    for deployment in rendered.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        by_stage.setdefault(stage_of_component(labels["app.kubernetes.io/component"]), []).append(
            (labels["diffmesh.io/variant"], deployment, container))
    chart = rendered.merged["stages"]
    for name in sorted(set(by_stage) - set(table.names())):
        problems.append(f"Deployment {by_stage[name][0][1]['metadata']['name']} runs stage {name!r}, "
                        f"which is not in diffmesh/stages.py STAGES")
    for spec in table:
        if spec.name in chart and rendered.stage(spec.name)["enabled"] and spec.name not in by_stage:
            problems.append(f"stage {spec.name!r}: enabled but no Deployment rendered")
        for variant, deployment, container in by_stage.get(spec.name, []):
            where = f"stage {spec.name!r} ({variant})"
            if container.get("args") != [spec.package]:
                problems.append(f"{where}: the container runs `python -m {' '.join(container.get('args', []))}`, "
                                f"the table says `python -m {spec.package}`")
            placed = gpu_placed(rendered, deployment, container)
            if placed and not spec.gpu:
                problems.append(f"{where}: gpu=False in diffmesh/stages.py but the pod gets GPU placement "
                                f"({', '.join(sorted(placed))})")
            missing = full_gpu_placement(rendered) - placed
            if spec.gpu and gpu_as_in_table and missing:
                problems.append(f"{where}: gpu=True in diffmesh/stages.py but the pod lacks GPU placement "
                                f"({', '.join(sorted(missing))})")
    frontend = table.frontend()
    for variant, _, container in by_stage.get(frontend.name, []):
        env = env_of(container)
        rendered_addresses = {name for name in env if name.endswith("_ADDRESS") and not name.endswith("_CANARY_ADDRESS")}
        expected = set()
        for spec in table.backends():
            own = rendered.stage(spec.name) if spec.name in chart else {}
            if spec.need is Need.ALWAYS or own.get("enabled") or own.get("address"):
                expected.add(f"{ENV_PREFIX}{spec.name.upper()}_ADDRESS")
        for name in sorted(expected - rendered_addresses):
            problems.append(f"frontend {frontend.name!r} ({variant}): no {name} for backend "
                            f"{name[len(ENV_PREFIX):-len('_ADDRESS')].lower()!r}")
        for name in sorted(rendered_addresses - expected):
            problems.append(f"frontend {frontend.name!r} ({variant}): {name} is not the address of a backend "
                            f"of diffmesh/stages.py")
    return problems


def _keeps_table_gpu(rendered: Rendered) -> bool:
    # cpu-dev runs every stage on CPU on purpose; the other profiles keep the table's placement.
    return rendered.values is not PROFILES["cpu-dev"]


def test_chart_values_agree_with_the_stage_table() -> None:
    problems = values_mismatches(STAGES, VALUES, SCHEMA)
    assert not problems, "\n".join(problems)


def test_rendered_chart_agrees_with_the_stage_table(rendered: Rendered) -> None:
    problems = rendered_mismatches(STAGES, rendered, _keeps_table_gpu(rendered))
    assert not problems, "\n".join(problems)


def test_gpu_values_place_exactly_the_table_gpu_stages(renders: dict[str, Rendered]) -> None:
    for profile in ("defaults", "gpu"):
        rendered = renders[profile]
        for stage, variant, deployment, container in rendered.deployments():
            placed = gpu_placed(rendered, deployment, container)
            if STAGES[stage].gpu:
                assert placed == full_gpu_placement(rendered), (profile, stage, variant, placed)
            else:
                assert not placed, (profile, stage, variant, placed)


def test_stage_table_checks_name_the_stage_and_what_is_missing(renders: dict[str, Rendered],
                                                                chart: Any, helm_config: Any) -> None:
    """Guards the two checks above: a stage added to one side only is reported by name."""
    upscaler = StageSpec("upscaler", "services.upscaler.main", "diffmesh.v1.Upscaler", 50070, Role.BACKEND, gpu=True)
    wider = StageTable(STAGES.stages + (upscaler,))
    problems = "\n".join(values_mismatches(wider, VALUES, SCHEMA) + rendered_mismatches(wider, renders["gpu"], True))
    assert "stage 'upscaler' is in diffmesh/stages.py but has no entry under `stages:`" in problems
    assert "`upscaler: {port: 50070, gpu: true}`" in problems
    assert "no DIFFMESH_UPSCALER_ADDRESS for backend 'upscaler'" in problems

    narrower = StageTable(tuple(spec for spec in STAGES if spec.name != "vae"))
    problems = "\n".join(values_mismatches(narrower, VALUES, SCHEMA)
                         + rendered_mismatches(narrower, renders["gpu"], True))
    assert "stage 'vae' has an entry in values.yaml but is not in diffmesh/stages.py" in problems
    assert f"Deployment {RELEASE}-vae runs stage 'vae'" in problems
    assert "DIFFMESH_VAE_ADDRESS is not the address of a backend" in problems

    moved = StageTable(tuple(dataclasses.replace(spec, default_port=50099, gpu=not spec.gpu, module="services.x.main",
                                                 stateful=True)
                             if spec.name == "text_encoder" else spec for spec in STAGES))
    problems = "\n".join(values_mismatches(moved, VALUES, SCHEMA) + rendered_mismatches(moved, renders["gpu"], True))
    assert "stage 'text_encoder': values.yaml has port: 50061, diffmesh/stages.py has default_port=50099" in problems
    assert "stage 'text_encoder': values.yaml has gpu: False" in problems
    assert "stage 'text_encoder': values.yaml has a state.mountPath: False, diffmesh/stages.py has stateful=True" in problems
    assert "the table says `python -m services.x`" in problems
    assert ("stage 'text_encoder' (stable): gpu=True in diffmesh/stages.py but the pod lacks GPU placement "
            "(nodeSelector, nvidia.com/gpu, runtimeClassName, tolerations)") in problems

    # A chart stage the table lacks, rendered: reported as a Deployment of an unknown stage.
    values = {"stages": {"upscaler": {"port": 50070}}}
    extra = render_release(chart, helm_config, values)
    problems = "\n".join(rendered_mismatches(STAGES, extra, True))
    assert f"Deployment {RELEASE}-upscaler runs stage 'upscaler', which is not in diffmesh/stages.py" in problems
    assert "DIFFMESH_UPSCALER_ADDRESS is not the address of a backend" in problems


def test_config_classes_default_to_the_table_ports() -> None:
    for spec in STAGES:
        (port,) = [f for f in dataclasses.fields(config_class(spec)) if f.name == "port"]
        assert port.default == spec.default_port, spec.name


def test_rendered_diffmesh_env_are_settings_of_their_stage(rendered: Rendered) -> None:
    """The services refuse an unknown DIFFMESH_* variable at start-up: every one the chart renders
    for a stage (names only; valueFrom entries too) must be a setting of that stage's config."""
    problems = []
    for stage, variant, _, container in rendered.deployments():
        unknown = sorted(name for name in env_of(container)
                         if name.startswith(ENV_PREFIX) and name not in stage_env_names(STAGES[stage]))
        if unknown:
            problems.append(f"stage {stage!r} ({variant}): {', '.join(unknown)} rendered, not settings of "
                            f"{config_class(STAGES[stage]).__name__}")
    assert not problems, "\n".join(problems)


def test_the_charts_table_of_stage_settings_is_current() -> None:
    """files/stage-settings.json and the schema's shared names are generated from the config
    dataclasses; a setting added to a stage without regenerating them fails here."""
    assert stage_settings_main(["--check"]) == 0, "run `python -m diffmesh.stage_settings`"
    names = set(SCHEMA["definitions"]["sharedSettings"]["propertyNames"]["enum"])
    assert names == {name for names in settings_by_stage().values() for name in names}
    assert set(VALUES["settings"]) <= names


def test_a_global_setting_reaches_exactly_the_stages_that_have_it(chart: Any, helm_config: Any) -> None:
    """`settings` and `stageDefaults.settings` apply to every stage with the setting and skip the
    rest (a service refuses a DIFFMESH_* variable it does not know); a stage's own value wins."""
    values = {"settings": {"max_size": 1536, "max_prompt_chars": 900},
              "stageDefaults": {"settings": {"max_batch": 3}},
              "stages": {"vae": {"settings": {"max_size": 1024}}}}
    rendered = render_release(chart, helm_config, values)
    table = settings_by_stage()
    seen = set()
    for stage, variant, _, container in rendered.deployments():
        env = env_of(container)
        seen.add(stage)
        expected_size = "1024" if stage == "vae" else "1536"
        for name, value in (("max_size", expected_size), ("max_prompt_chars", "900"), ("max_batch", "3")):
            variable = ENV_PREFIX + name.upper()
            if name in table[stage]:
                assert env.get(variable) == value, (stage, variant, name)
            else:
                assert variable not in env, (stage, variant, name)
    assert {"orchestrator", "denoiser", "vae", "text_encoder"} <= seen


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


def _expose_comment_and_ports() -> tuple[str, list[int]]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    (index,) = [i for i, line in enumerate(lines) if line.startswith("EXPOSE ")]
    comment = []
    for line in reversed(lines[:index]):
        if not line.startswith("#"):
            break
        comment.insert(0, line.lstrip("# "))
    return " ".join(comment), [int(port) for port in lines[index].split()[1:]]


def test_dockerfile_import_check_reads_the_stage_table() -> None:
    """The build imports every stage's module from the table, not a hand-kept list."""
    runs = [args for keyword, args in _dockerfile_instructions() if keyword == "RUN"]
    checks = [match.group(1) for args in runs for match in re.finditer(r'python -c "([^"]*)"', args)
              if "diffmesh.stages" in match.group(1)]
    assert len(checks) == 1, "no `python -c` import check over diffmesh.stages in a RUN"
    tree = ast.parse(checks[0])  # valid Python, as `python -c` will run it
    imports = [(node.module, [alias.name for alias in node.names]) for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom)]
    assert ("diffmesh.stages", ["STAGES"]) in imports, checks[0]
    # Every spec of the table is imported: spec.main_module() for spec in STAGES.
    loops = [node for node in ast.walk(tree) if isinstance(node, ast.comprehension)
             and isinstance(node.iter, ast.Name) and node.iter.id == "STAGES"]
    calls = {node.func.attr for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert loops and "main_module" in calls, checks[0]
    # No hand-kept stage list anywhere in the build steps.
    for args in runs:
        for spec in STAGES:
            assert spec.module not in args, f"{spec.module} named by hand in the Dockerfile: {args}"
    # Everything the modules import is copied in before that check runs.
    copies = " ".join(args for keyword, args in _dockerfile_instructions() if keyword == "COPY")
    assert {spec.module.split(".")[0] for spec in STAGES} <= set(re.findall(r"\b(\w+) /src/", copies)) | {"diffmesh"}


def test_dockerfile_exposes_the_table_ports() -> None:
    comment, ports = _expose_comment_and_ports()
    metrics = VALUES["stageDefaults"]["metricsPort"]
    expected = {spec.default_port for spec in STAGES} | {metrics}
    assert set(ports) == expected, f"EXPOSE {ports}: the table's ports and metrics are {sorted(expected)}"
    for spec in STAGES:
        assert f"{spec.name} {spec.default_port}" in comment, f"the EXPOSE comment does not say `{spec.name} {spec.default_port}`"
    assert f"metrics {metrics}" in comment
    cmd = [args for keyword, args in _dockerfile_instructions() if keyword == "CMD"][-1]
    assert json.loads(cmd) == [STAGES.frontend().package]
