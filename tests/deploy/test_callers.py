"""The orchestrator's caller admission in the Helm chart (stages.orchestrator.callers), checked
without a cluster, with the real Helm engine as in test_chart.py.

Checked here: a default install renders no callers file (admission open, and the notes say so);
with callers.secretName the Secret is a secret volume mounted read-only as a directory (never a
subPath, which the kubelet never updates: an edit would not reach the hot reload) in the stable
and canary orchestrator pods only, DIFFMESH_CALLERS_FILE points inside it, reloadSeconds and
batchEvery become DIFFMESH_CALLERS_RELOAD_S / DIFFMESH_BATCH_EVERY only when given, the
orchestrator's own settings loader accepts the rendered env (with a callers file where it points),
the renders lint strictly and validate against the Kubernetes schemas, and the schema and the
template refuse what does not fit (an unknown key, callers on a backend, a setting given twice).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import helm_python as helm
import pytest

from diffmesh.runtime.config import ENV_PREFIX, load_config
from diffmesh.stages import STAGES
from tests.deploy.test_chart import (CHART, KUBE_VERSION, NAMESPACE, PROFILES, RELEASE, ROOT, Rendered,  # noqa: F401
                                     _validate, chart, container_of, env_of, helm_config, install, render_release,
                                     renders, signed, stage_env_names)

FRONTEND = STAGES.frontend().name
CALLERS_SECRET = "diffmesh-callers"
CALLERS_ENV = {f"{ENV_PREFIX}CALLERS_FILE", f"{ENV_PREFIX}CALLERS_RELOAD_S", f"{ENV_PREFIX}BATCH_EVERY"}
# Under mTLS every stage needs a plaintext health port (the kubelet's probes).
TLS = {"tls": {"secretName": "mesh-tls"},
       "stages": {spec.name: {"probePort": spec.default_port + 100} for spec in STAGES}}


def with_callers(callers: dict[str, Any], *, canary: bool = True, tls: bool = False) -> dict[str, Any]:
    values: dict[str, Any] = {"stages": {FRONTEND: {"callers": callers}}}
    if canary:
        values["stages"][FRONTEND]["canary"] = {"enabled": True}
    if tls:
        values = {"tls": TLS["tls"], "stages": {name: dict(TLS["stages"][name], **values["stages"].get(name, {}))
                                                for name in TLS["stages"]}}
    return values


FULL = with_callers({"secretName": CALLERS_SECRET, "key": "policy.yaml", "reloadSeconds": 0.5, "batchEvery": 3},
                    tls=True)
PLAIN = with_callers({"secretName": CALLERS_SECRET})


@pytest.fixture(scope="module")
def callers_renders(chart: Any, helm_config: Any) -> dict[str, Rendered]:
    return {"full": render_release(chart, helm_config, FULL), "plain": render_release(chart, helm_config, PLAIN)}


def callers_volume_and_mount(pod: dict[str, Any], container: dict[str, Any]) -> tuple[list[dict[str, Any]],
                                                                                        list[dict[str, Any]]]:
    """The pod's volumes sourced from the callers Secret, and the container's mounts of them."""
    volumes = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == CALLERS_SECRET]
    names = {v["name"] for v in volumes}
    return volumes, [m for m in container["volumeMounts"] if m["name"] in names]


def test_default_render_has_no_callers_file(renders: dict[str, Rendered]) -> None:
    rendered = renders["defaults"]
    assert rendered.stage(FRONTEND)["callers"]["secretName"] == ""
    for stage, variant, deployment, container in rendered.deployments():
        pod = deployment["spec"]["template"]["spec"]
        assert not CALLERS_ENV & set(env_of(container)), (stage, variant)
        assert "callers" not in {v["name"] for v in pod["volumes"]}, (stage, variant)
        assert "callers" not in {m["name"] for m in container["volumeMounts"]}, (stage, variant)
    notes = " ".join(rendered.release["notes"].split())
    assert f"Caller admission is open (stages.{FRONTEND}.callers.secretName is empty)" in notes
    assert "callers file is key" not in notes


@pytest.mark.parametrize("variant", ["stable", "canary"])
def test_callers_secret_is_a_directory_mount_in_both_variants(variant: str, callers_renders: dict[str, Rendered]) -> None:
    pod, container = container_of(callers_renders["full"], FRONTEND, variant)
    (volume,), (mount,) = callers_volume_and_mount(pod, container)
    # A Secret volume, projecting the chosen key under a fixed name.
    assert set(volume) == {"name", "secret"}
    assert volume["secret"]["items"] == [{"key": "policy.yaml", "path": "callers.yaml"}]
    assert volume["secret"]["defaultMode"] == 0o440
    # Read-only, a directory: no subPath (a subPath mount never sees the Secret's updates).
    assert mount["readOnly"] is True
    assert "subPath" not in mount and "subPathExpr" not in mount
    mount_dir = PurePosixPath(mount["mountPath"])
    assert mount_dir.is_absolute() and mount_dir.suffix == "", mount_dir
    # The file the orchestrator reads is inside that directory, under the projected name.
    callers_file = PurePosixPath(env_of(container)[f"{ENV_PREFIX}CALLERS_FILE"])
    assert callers_file.parent == mount_dir
    assert callers_file.name == volume["secret"]["items"][0]["path"]
    # No other mount of the container covers the same path.
    others = [m for m in container["volumeMounts"] if m is not mount]
    assert not [m for m in others if PurePosixPath(m["mountPath"]) in (mount_dir, *mount_dir.parents)
                or mount_dir in PurePosixPath(m["mountPath"]).parents]


def test_canary_gets_the_same_callers_as_stable(callers_renders: dict[str, Rendered]) -> None:
    rendered = callers_renders["full"]
    stable_pod, stable = container_of(rendered, FRONTEND, "stable")
    canary_pod, canary = container_of(rendered, FRONTEND, "canary")
    assert callers_volume_and_mount(stable_pod, stable) == callers_volume_and_mount(canary_pod, canary)
    picked = {name: value for name, value in env_of(stable).items() if name in CALLERS_ENV}
    assert picked == {name: value for name, value in env_of(canary).items() if name in CALLERS_ENV}
    assert set(picked) == CALLERS_ENV


def test_only_the_orchestrator_gets_the_callers_file(callers_renders: dict[str, Rendered]) -> None:
    for profile in ("full", "plain"):
        rendered = callers_renders[profile]
        assert {stage for stage, _, _, _ in rendered.deployments()} > {FRONTEND}
        for stage, variant, deployment, container in rendered.deployments():
            volumes, mounts = callers_volume_and_mount(deployment["spec"]["template"]["spec"], container)
            has = bool(volumes) or bool(mounts) or bool(CALLERS_ENV & set(env_of(container)))
            assert has == (stage == FRONTEND), (profile, stage, variant)


def test_reload_and_batch_every_are_rendered_only_when_given(callers_renders: dict[str, Rendered]) -> None:
    _, full = container_of(callers_renders["full"], FRONTEND)
    env = env_of(full)
    assert env[f"{ENV_PREFIX}CALLERS_RELOAD_S"] == "0.5"
    assert env[f"{ENV_PREFIX}BATCH_EVERY"] == "3"
    pod, plain = container_of(callers_renders["plain"], FRONTEND)
    env = env_of(plain)
    assert env[f"{ENV_PREFIX}CALLERS_FILE"].startswith("/")
    assert f"{ENV_PREFIX}CALLERS_RELOAD_S" not in env and f"{ENV_PREFIX}BATCH_EVERY" not in env
    # `key` defaults to callers.yaml.
    (volume,), _ = callers_volume_and_mount(pod, plain)
    assert volume["secret"]["items"] == [{"key": "callers.yaml", "path": "callers.yaml"}]
    # Each variable once (a setting rendered twice would be ambiguous).
    names = [item["name"] for item in plain["env"]]
    assert len(names) == len(set(names))


CALLERS_FILE = """\
callers:
  - name: search-backend
    api_key_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    priority: interactive
  - name: nightly-batch
    mtls_subject: "CN=nightly,O=acme"
    priority: batch
"""


@pytest.mark.parametrize("profile", ["full", "plain"])
def test_orchestrator_loads_the_rendered_callers_env(profile: str, callers_renders: dict[str, Rendered],
                                                     tmp_path: Path) -> None:
    """The orchestrator's own settings loader reads the rendered env (names, types, bounds), with
    a callers file where DIFFMESH_CALLERS_FILE points (here: a temporary copy). A caller identified
    by certificate alone needs the client CA that tls.secretName provides: without TLS the
    orchestrator refuses it, which is what the notes warn about."""
    from services.orchestrator.main import OrchestratorConfig

    rendered = callers_renders[profile]
    _, container = container_of(rendered, FRONTEND)
    env = {k: v for k, v in env_of(container).items() if v is not None}
    assert {name for name in env if name.startswith(ENV_PREFIX)} <= stage_env_names(STAGES[FRONTEND])
    for name in ("DIFFMESH_TLS_CERT_FILE", "DIFFMESH_TLS_KEY_FILE", "DIFFMESH_TLS_CA_FILE"):
        if name in env:
            env[name] = str(tmp_path / PurePosixPath(env[name]).name)
    callers = tmp_path / PurePosixPath(env[f"{ENV_PREFIX}CALLERS_FILE"]).name
    callers.write_text(CALLERS_FILE)
    env[f"{ENV_PREFIX}CALLERS_FILE"] = str(callers)
    if profile == "full":
        config = load_config(OrchestratorConfig, [], environ=env)
        assert config.callers_file == str(callers)
        assert config.callers_reload_s == 0.5 and config.batch_every == 3
    else:
        from diffmesh.runtime.config import ConfigError

        with pytest.raises(ConfigError, match="callers_file"):
            load_config(OrchestratorConfig, [], environ=env)
        callers.write_text(CALLERS_FILE.split("  - name: nightly-batch")[0])
        config = load_config(OrchestratorConfig, [], environ=env)
        assert config.callers_file == str(callers)
        assert (config.callers_reload_s, config.batch_every) == (2.0, 4), "the service's defaults"


def test_notes_name_the_secret_and_warn_without_a_client_ca(callers_renders: dict[str, Rendered]) -> None:
    full = " ".join(callers_renders["full"].release["notes"].split())
    plain = " ".join(callers_renders["plain"].release["notes"].split())
    assert f'key "policy.yaml" of Secret "{CALLERS_SECRET}"' in full
    assert f'key "callers.yaml" of Secret "{CALLERS_SECRET}"' in plain
    assert "Caller admission is open" not in full and "Caller admission is open" not in plain
    warning = f"WARNING: stages.{FRONTEND}.callers.secretName is set but tls.secretName is not"
    assert warning in plain
    assert warning not in full


@pytest.mark.parametrize("profile", ["full", "plain"])
def test_callers_renders_validate_against_kubernetes_schemas(profile: str, callers_renders: dict[str, Rendered]) -> None:
    rendered = callers_renders[profile]
    assert rendered.of_kind("Deployment")
    for doc in rendered.docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        _validate(doc)


@pytest.mark.parametrize("profile", ["full", "plain"])
def test_callers_renders_lint_strict(profile: str) -> None:
    values = signed(FULL if profile == "full" else PLAIN)
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# values -> a fragment of the error Helm must raise (schema violations name the JSON pointer).
BAD_CALLERS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown callers key": (with_callers({"secretName": CALLERS_SECRET, "secret": "x"}), "'secret' not allowed"),
    "callers in stageDefaults": ({"stageDefaults": {"callers": {"secretName": CALLERS_SECRET}}},
                                 "/stageDefaults/callers"),
    "batchEvery 0": (with_callers({"secretName": CALLERS_SECRET, "batchEvery": 0}),
                     f"/stages/{FRONTEND}/callers/batchEvery"),
    "fractional batchEvery": (with_callers({"secretName": CALLERS_SECRET, "batchEvery": 1.5}),
                              f"/stages/{FRONTEND}/callers/batchEvery"),
    "negative reloadSeconds": (with_callers({"secretName": CALLERS_SECRET, "reloadSeconds": -1}),
                               f"/stages/{FRONTEND}/callers/reloadSeconds"),
    "key with a slash": (with_callers({"secretName": CALLERS_SECRET, "key": "a/b.yaml"}),
                         f"/stages/{FRONTEND}/callers/key"),
    "callers on a backend": ({"stages": {"vae": {"callers": {"secretName": CALLERS_SECRET}}}},
                             "stages.vae.callers (secretName): caller admission is the frontend's"),
    "reloadSeconds without a file": (with_callers({"reloadSeconds": 5}),
                                     f"stages.{FRONTEND}.callers: reloadSeconds and batchEvery apply to a callers file"),
    "callers_file besides the callers secret": (
        {"stages": {FRONTEND: {"callers": {"secretName": CALLERS_SECRET}, "settings": {"callers_file": "/x.yaml"}}}},
        f"settings.callers_file is also set by stages.{FRONTEND}.callers.secretName"),
    "batch_every in settings and in callers": (
        {"stages": {FRONTEND: {"callers": {"secretName": CALLERS_SECRET, "batchEvery": 2},
                               "canary": {"settings": {"batch_every": 5}}}}},
        f"canary.settings.batch_every is also set by stages.{FRONTEND}.callers.batchEvery"),
    "extra volume named callers": (
        {"stages": {FRONTEND: {"extraVolumes": [{"name": "callers", "emptyDir": {}}]}}},
        f'stages.{FRONTEND}.extraVolumes: the volume name "callers" is the chart\'s own'),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLERS))
def test_bad_callers_values_are_rejected(case: str, chart: Any, helm_config: Any) -> None:
    values, reason = BAD_CALLERS[case]
    with pytest.raises(helm.HelmError) as raised:
        install(helm_config, chart, signed(values), name="bad")
    assert reason in " ".join(str(raised.value).split())


def test_callers_file_in_settings_without_the_secret_still_renders(chart: Any, helm_config: Any) -> None:
    """A callers file mounted another way (extraVolumes) is the stage's own setting, as for any
    other: the chart adds no mount of its own then."""
    values = {"stages": {FRONTEND: {
        "settings": {"callers_file": "/etc/acme/callers/callers.yaml", "batch_every": 2},
        "extraVolumes": [{"name": "acme-callers", "configMap": {"name": "acme-callers"}}],
        "extraVolumeMounts": [{"name": "acme-callers", "mountPath": "/etc/acme/callers", "readOnly": True}]}}}
    pod, container = container_of(render_release(chart, helm_config, values), FRONTEND)
    env = env_of(container)
    assert env[f"{ENV_PREFIX}CALLERS_FILE"] == "/etc/acme/callers/callers.yaml"
    assert env[f"{ENV_PREFIX}BATCH_EVERY"] == "2"
    assert "callers" not in {v["name"] for v in pod["volumes"]}


def _yaml_blocks(text: str) -> list[dict[str, Any]]:
    import re

    import yaml

    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


@pytest.mark.parametrize("doc", ["docs/admission.md", "deploy/helm/diffmesh/README.md"])
def test_documented_callers_values_render_as_described(doc: str, chart: Any, helm_config: Any) -> None:
    """The callers example of docs/admission.md ("Helm") and of the chart README renders, and the
    path the text gives for DIFFMESH_CALLERS_FILE is the rendered one."""
    text = (ROOT / doc).read_text()
    (values,) = [block for block in _yaml_blocks(text)
                 if isinstance(block, dict) and "callers" in block.get("stages", {}).get(FRONTEND, {})]
    callers = values["stages"][FRONTEND]["callers"]
    _, container = container_of(render_release(chart, helm_config, values), FRONTEND)
    env = env_of(container)
    assert f"{ENV_PREFIX}CALLERS_FILE" in env
    assert env[f"{ENV_PREFIX}CALLERS_FILE"] in text
    assert env[f"{ENV_PREFIX}CALLERS_RELOAD_S"] == str(callers["reloadSeconds"])
    assert env[f"{ENV_PREFIX}BATCH_EVERY"] == str(callers["batchEvery"])
    if doc.startswith("docs/"):
        assert text.index("## Helm") < text.index(env[f"{ENV_PREFIX}CALLERS_FILE"])
