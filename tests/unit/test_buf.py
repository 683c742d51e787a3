"""The contract under buf: `buf lint` with the rule set buf.yaml states (STANDARD, deviations
listed there), and `buf breaking` against the released contract (protos/released/), so that
diffmesh.v1 cannot break silently. buf comes from npm (@bufbuild/buf); without it these skip."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import tools

REPO = tools.REPO
RELEASED = REPO / "protos" / "released" / "diffmesh-v1.json"
RELEASED_REF = REPO / "protos" / "released" / "diffmesh-v1.ref"


@pytest.fixture(scope="module")
def buf() -> Path:
    return tools.buf()


def run_buf(buf: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_lint_passes_with_the_stated_rule_set(buf):
    config = yaml.safe_load((REPO / "buf.yaml").read_text())
    assert config["lint"]["use"] == ["STANDARD"]
    done = run_buf(buf, "lint")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def test_every_listed_deviation_is_needed_and_only_those(buf, tmp_path):
    """Without its ignore_only list, lint fails exactly on the waived (rule, file) pairs: a waiver
    nothing needs any more, or a violation nobody listed, fails here."""
    config = yaml.safe_load((REPO / "buf.yaml").read_text())
    waived = {(rule, path) for rule, paths in config["lint"]["ignore_only"].items() for path in paths}
    strict = {**config, "lint": {"use": config["lint"]["use"]}}
    (tmp_path / "buf.yaml").write_text(yaml.safe_dump(strict))
    shutil.copytree(REPO / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("released"))
    done = run_buf(buf, "lint", "--error-format", "json", cwd=tmp_path)
    assert done.returncode != 0
    found = {(entry["type"], entry["path"]) for entry in map(json.loads, done.stdout.splitlines())}
    assert found == waived


def test_no_breaking_change_against_the_released_contract(buf):
    done = run_buf(buf, "breaking", "--against", str(RELEASED))
    assert done.returncode == 0, done.stdout + done.stderr


# Deliberate breaks a caller of the release would suffer, each in a copy of protos/.
BREAKS = {
    "renumbered field": ("orchestrator.proto", r"int32 index = 3;", "int32 index = 30;",
                         'field "3" with name "index" on message "GeneratedImage" was deleted'),
    "renamed rpc": ("orchestrator.proto", r"rpc GenerateStream\(", "rpc GenerateEvents(",
                    'RPC "GenerateStream" on service "Orchestrator" was deleted'),
    "changed field type": ("tensor.proto", r"repeated int64 shape = 2;", "repeated int32 shape = 2;",
                           'changed type from "int64" to "int32"'),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_a_deliberate_break_is_caught(buf, tmp_path, name):
    file, pattern, replacement, expected = BREAKS[name]
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("released"))
    proto = tmp_path / "protos" / "diffmesh" / "v1" / file
    text, count = re.subn(pattern, replacement, proto.read_text())
    assert count == 1, f"{pattern!r} not found once in {file}"
    proto.write_text(text)
    done = run_buf(buf, "breaking", "--against", str(RELEASED), cwd=tmp_path)
    assert done.returncode != 0
    assert expected in done.stdout, done.stdout + done.stderr


def test_released_image_is_what_the_released_commit_builds(buf, tmp_path):
    ref = RELEASED_REF.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{40}", ref), ref
    if not (REPO / ".git").exists() or subprocess.run(
            ["git", "cat-file", "-e", f"{ref}^{{commit}}"], cwd=REPO, capture_output=True).returncode != 0:
        tools.skip(f"commit {ref} is not in this clone's history (shallow clone?)")
    image = tmp_path / "image.json"
    done = run_buf(buf, "build", "--exclude-source-info", "-o", str(image), f".git#ref={ref},subdir=protos")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(image.read_text()) == json.loads(RELEASED.read_text())
