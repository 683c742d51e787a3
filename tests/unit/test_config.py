"""Configuration: flags > env > YAML file > defaults, and start-up errors that name the culprit."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from diffmesh.runtime.config import ConfigError, ServerConfig, load_config, setting
from diffmesh.runtime.server import run_stage


@dataclasses.dataclass
class DemoConfig(ServerConfig):
    """A stage's settings, for tests."""

    label: str = setting("default-label", "a string")
    count: int = setting(3, "an int", min=0, max=100)
    ratio: float = setting(0.5, "a float", min=0, max=1)
    enabled: bool = setting(False, "a bool")
    tags: list[str] = setting(["a", "b"], "a list")
    mode: str = setting("fast", "a choice", choices=("fast", "slow"))

    def validate(self) -> None:
        if self.enabled and not self.tags:
            raise ConfigError("tags: must not be empty when enabled is set")


def _yaml(tmp_path: Path, text: str, name: str = "settings.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_any_source() -> None:
    config = load_config(DemoConfig, [], environ={})
    assert config == DemoConfig()
    assert (config.label, config.count, config.ratio, config.enabled, config.tags, config.mode) == (
        "default-label", 3, 0.5, False, ["a", "b"], "fast")
    assert config.port == 50050 and config.log_level == "INFO"
    # list defaults are not shared between instances
    config.tags.append("c")
    assert DemoConfig().tags == ["a", "b"]


# field -> (YAML text value, its parsed value, env value, its parsed value, flag value, its parsed value)
PRECEDENCE = {
    "label": ("from-file", "from-file", "from-env", "from-env", "from-flag", "from-flag"),
    "count": ("7", 7, "8", 8, "9", 9),
    "ratio": ("0.25", 0.25, "0.5e0", 0.5, "1", 1.0),
    "enabled": ("true", True, "no", False, "on", True),
    "tags": ("[x, y]", ["x", "y"], "p, q,,r ", ["p", "q", "r"], "only", ["only"]),
    "port": ("6000", 6000, "6001", 6001, "6002", 6002),
}


@pytest.mark.parametrize("name", sorted(PRECEDENCE))
def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path, name: str) -> None:
    file_text, file_value, env_text, env_value, flag_text, flag_value = PRECEDENCE[name]
    path = _yaml(tmp_path, f"{name}: {file_text}\n")
    env_name = "DIFFMESH_" + name.upper()
    flag = "--" + name.replace("_", "-")

    assert getattr(load_config(DemoConfig, ["--config", str(path)], environ={}), name) == file_value
    from_env = load_config(DemoConfig, ["--config", str(path)], environ={env_name: env_text})
    assert getattr(from_env, name) == env_value
    from_flag = load_config(DemoConfig, ["--config", str(path), flag, flag_text],
                            environ={env_name: env_text})
    assert getattr(from_flag, name) == flag_value
    assert type(getattr(from_flag, name)) is type(flag_value)
    # a source only overrides the settings it names
    assert from_flag.mode == "fast" and from_env.max_queue == 64


def test_sources_combine_per_setting(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "label: f\ncount: 1\nratio: 0.1\nmax-queue: 5\n")
    config = load_config(DemoConfig, ["--count", "3"],
                         environ={"DIFFMESH_CONFIG": str(path), "DIFFMESH_RATIO": "0.9",
                                  "UNRELATED": "x"})
    assert (config.label, config.count, config.ratio, config.max_queue) == ("f", 3, 0.9, 5)


def test_unknown_diffmesh_env_is_a_start_up_error_like_an_unknown_yaml_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DemoConfig, [], environ={"DIFFMESH_MAX_QEUE": "3", "OTHER_MAX_QEUE": "x"})
    message = str(info.value)
    assert message.startswith("env DIFFMESH_MAX_QEUE: unknown setting") and "DIFFMESH_MAX_QUEUE" in message
    # DIFFMESH_CONFIG names the file, and variables of other programs are none of our business.
    assert load_config(DemoConfig, [], environ={"DIFFMESH_CONFIG": "", "HOME": "/"}) == DemoConfig()


def test_a_setting_of_another_stage_in_the_environment_stops_the_start(clean_env, monkeypatch, capsys) -> None:
    from services.vae.main import VaeStage, VaeConfig

    monkeypatch.setenv("DIFFMESH_CACHE_SIZE", "10")  # the text_encoder's setting, not the vae's
    assert run_stage(VaeStage, VaeConfig, []) == 2
    assert "env DIFFMESH_CACHE_SIZE: unknown setting" in capsys.readouterr().err


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    env_file = _yaml(tmp_path, "label: env-file\n", "a.yaml")
    flag_file = _yaml(tmp_path, "label: flag-file\n", "b.yaml")
    config = load_config(DemoConfig, ["--config", str(flag_file)], environ={"DIFFMESH_CONFIG": str(env_file)})
    assert config.label == "flag-file"


def test_yaml_native_types_and_empty_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "count: 4.0\nratio: 1\nenabled: yes\ntags: [1, two]\nlabel: 12\n")
    config = load_config(DemoConfig, ["--config", str(path)], environ={})
    assert (config.count, config.ratio, config.enabled, config.tags, config.label) == (4, 1.0, True, ["1", "two"], "12")
    assert load_config(DemoConfig, ["--config", str(_yaml(tmp_path, "", "empty.yaml"))], environ={}) == DemoConfig()


def test_validate_hook_runs_after_loading() -> None:
    with pytest.raises(ConfigError, match="tags"):
        load_config(DemoConfig, ["--enabled", "true", "--tags", " , "], environ={})
    assert load_config(DemoConfig, ["--enabled", "true"], environ={}).enabled is True


def _error(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(DemoConfig, argv, environ=environ or {})
    return str(info.value)


@pytest.mark.parametrize("argv, environ, expected", [
    ([], {"DIFFMESH_COUNT": "abc"}, ["count", "env DIFFMESH_COUNT", "'abc'", "int"]),
    (["--count", "2.5"], {}, ["count", "flag --count", "'2.5'"]),
    ([], {"DIFFMESH_RATIO": "half"}, ["ratio", "env DIFFMESH_RATIO", "'half'", "float"]),
    (["--enabled", "maybe"], {}, ["enabled", "flag --enabled", "'maybe'", "bool"]),
    (["--port", "70000"], {}, ["port", "flag --port", "70000", "65535"]),
    ([], {"DIFFMESH_PORT": "-1"}, ["port", "env DIFFMESH_PORT", "-1"]),
    (["--count", "101"], {}, ["count", "flag --count", "101"]),
    (["--ratio", "1.5"], {}, ["ratio", "flag --ratio", "1.5"]),
    (["--dtype", "float8"], {}, ["dtype", "flag --dtype", "'float8'", "float16"]),
    ([], {"DIFFMESH_MODE": "medium"}, ["mode", "env DIFFMESH_MODE", "'medium'", "fast, slow"]),
    (["--log-level", "debug"], {}, ["log_level", "flag --log-level", "'debug'"]),
    (["--max-message-mb", "2"], {}, ["max_message_mb", "flag --max-message-mb", "2"]),
])
def test_bad_values_name_setting_source_and_value(argv: list[str], environ: dict[str, str],
                                                 expected: list[str]) -> None:
    message = _error(argv, environ)
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize("text, expected", [
    ("count: true\n", ["count", "True"]),
    ("count: 1.5\n", ["count", "1.5"]),
    ("ratio: false\n", ["ratio", "False"]),
    ("tags: 5\n", ["tags", "5"]),
    ("label: [a, b]\n", ["label", "['a', 'b']"]),
    ("label: {a: 1}\n", ["label", "{'a': 1}"]),
    ("enabled: 2\n", ["enabled", "2"]),
    ("dtype: float8\n", ["dtype", "float8"]),
])
def test_bad_file_values_name_the_file(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = _yaml(tmp_path, text)
    message = _error(["--config", str(path)])
    for part in [*expected, f"file {path}"]:
        assert part in message, (part, message)


def test_unknown_yaml_key(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "port: 1\nprot: 2\n")
    message = _error(["--config", str(path)])
    assert "'prot'" in message and str(path) in message and "port" in message


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    message = _error(["--config", str(missing)])
    assert str(missing) in message and "cannot read" in message
    message = _error([], {"DIFFMESH_CONFIG": str(tmp_path)})  # a directory
    assert str(tmp_path) in message and "cannot read" in message


def test_malformed_yaml(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "port: [1, 2\nlabel: x\n")
    message = _error(["--config", str(path)])
    assert str(path) in message and "not valid YAML" in message


@pytest.mark.parametrize("text, kind", [("- port\n- 1\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_yaml_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = _yaml(tmp_path, text)
    message = _error(["--config", str(path)])
    assert str(path) in message and "mapping" in message and kind in message


def test_unknown_flag_is_rejected_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_config(DemoConfig, ["--no-such-setting", "1"], environ={})
    assert info.value.code == 2
    assert "--no-such-setting" in capsys.readouterr().err


# --- the real service configs -------------------------------------------------------------------


def _service_configs() -> dict[str, tuple[type, int]]:
    from services.denoiser.main import DenoiserConfig
    from services.orchestrator.main import OrchestratorConfig
    from services.text_encoder.main import TextEncoderConfig
    from services.vae.main import VaeConfig

    return {"denoiser": (DenoiserConfig, 50062), "orchestrator": (OrchestratorConfig, 50051),
            "vae": (VaeConfig, 50063), "text_encoder": (TextEncoderConfig, 50061)}


@pytest.mark.parametrize("service", ["denoiser", "orchestrator", "vae", "text_encoder"])
def test_service_configs_load_with_defaults(service: str) -> None:
    cls, port = _service_configs()[service]
    config = load_config(cls, [], environ={})
    assert isinstance(config, ServerConfig) and config.port == port
    assert config == cls()
    # every setting has help text, so --help documents it
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))
    overridden = load_config(cls, ["--port", "7000"], environ={"DIFFMESH_MAX_QUEUE": "3"})
    assert (overridden.port, overridden.max_queue) == (7000, 3)


@pytest.mark.parametrize("service, argv, setting_name", [
    ("denoiser", ["--max-steps", "0"], "max_steps"),
    ("denoiser", ["--max-batch", "many"], "max_batch"),
    ("denoiser", ["--port", "65536"], "port"),
    ("vae", ["--png-compress-level", "10"], "png_compress_level"),
    ("vae", ["--max-batch", "0"], "max_batch"),
    ("text_encoder", ["--cache-size", "-1"], "cache_size"),
    ("text_encoder", ["--dtype", "float8"], "dtype"),
    ("orchestrator", ["--default-strength", "0"], "default_strength"),
    ("orchestrator", ["--denoiser-canary-weight", "150"], "denoiser_canary_weight"),
    ("orchestrator", ["--vae-shadow-percent", "-1"], "vae_shadow_percent"),
    ("orchestrator", ["--denoiser-address", "a.example:1,b.example:1"], "denoiser_address"),
    ("orchestrator", ["--max-size", "4"], "max_size"),
])
def test_service_configs_reject_bad_values(service: str, argv: list[str], setting_name: str) -> None:
    cls, _ = _service_configs()[service]
    with pytest.raises(ConfigError) as info:
        load_config(cls, argv, environ={})
    assert str(info.value).startswith(setting_name + ":")
    assert argv[1] in str(info.value)


def test_orchestrator_validate() -> None:
    cls, _ = _service_configs()["orchestrator"]
    with pytest.raises(ConfigError, match="default_steps"):
        load_config(cls, ["--default-steps", "200"], environ={})
    assert load_config(cls, ["--default-steps", "200", "--max-steps", "200"], environ={}).default_steps == 200
    assert load_config(cls, ["--default-steps", "150"], environ={}).default_steps == 150

    for stage in ("text_encoder", "denoiser", "vae"):
        flag = f"--{stage.replace('_', '-')}-canary-weight"
        with pytest.raises(ConfigError, match=f"{stage}_canary_weight"):
            load_config(cls, [flag, "0.1"], environ={})
        with pytest.raises(ConfigError, match=f"{stage}_address"):
            load_config(cls, [f"--{stage.replace('_', '-')}-address", ""], environ={})
    config = load_config(cls, ["--vae-canary-weight", "25", "--vae-canary-address", "10.0.0.9:1",
                               "--vae-shadow-percent", "5"], environ={})
    vae = {route.stage: route for route in config.routes()}["vae"]
    assert (vae.stable, vae.canary, vae.canary_weight, vae.shadow_percent) == ("127.0.0.1:50063", "10.0.0.9:1", 25, 5)
    limits = config.limits()
    assert limits.max_init_image_bytes == 32 * 1024 * 1024 and limits.default_steps == 30


# --- run_stage -----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DIFFMESH_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("argv, expected", [
    (["--port", "notaport"], ["port", "'notaport'", "flag --port"]),
    (["--max-concurrency", "0"], ["max_concurrency", "0"]),
])
def test_run_stage_exits_2_on_a_bad_setting(clean_env: None, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], expected: list[str]) -> None:
    made: list[Any] = []
    code = run_stage(lambda config: made.append(config), DemoConfig, argv, "diffmesh-demo")
    assert code == 2
    assert made == []  # never got as far as building the stage
    err = capsys.readouterr().err
    assert "diffmesh-demo: configuration error" in err
    for part in expected:
        assert part in err, (part, err)


def test_run_stage_reads_the_environment(clean_env: None, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DIFFMESH_COUNT", "many")
    assert run_stage(lambda config: None, DemoConfig, [], "diffmesh-demo") == 2
    assert "env DIFFMESH_COUNT" in capsys.readouterr().err


def test_channel_targets_for_one_name_or_several_replicas() -> None:
    from diffmesh.runtime.channels import channel_target

    assert channel_target("denoiser.ns.svc:50062") == "dns:///denoiser.ns.svc:50062"
    assert channel_target("10.0.0.1:1, 10.0.0.2:1") == "ipv4:10.0.0.1:1,10.0.0.2:1"
    assert channel_target("[::1]:5,[fe80::1]:6") == "ipv6:[::1]:5,[fe80::1]:6"
    assert channel_target("ipv4:1.2.3.4:5") == "ipv4:1.2.3.4:5"
    with pytest.raises(ValueError, match="IP:port"):
        channel_target("a.example:1,b.example:1")
    with pytest.raises(ValueError, match="mix"):
        channel_target("10.0.0.1:1,[::1]:2")
