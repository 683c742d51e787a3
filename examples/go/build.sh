#!/usr/bin/env bash
# Builds the Go example offline, from the contract in protos/: protoc with protoc-gen-go and
# protoc-gen-go-grpc generates the diffmesh.v1 package, and the Go toolchain builds in GOPATH mode
# against Debian's packaged modules (/usr/share/gocode: grpc-go, golang/protobuf 1.5, genproto),
# so no module proxy is needed. Debian packages: golang-go protobuf-compiler protoc-gen-go
# protoc-gen-go-grpc golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev
# golang-google-genproto-dev.
#
#   examples/go/build.sh [OUTPUT_BINARY]     (default: examples/go/bin/diffmesh-go-client)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
binary="${1:-$here/bin/diffmesh-go-client}"
gocode="${DEBIAN_GOCODE:-/usr/share/gocode}"

work="$(mktemp -d)"
mkdir -p "$work/src"
trap 'rm -rf "$work"' EXIT
# The generated package lands at its go_package import path under $work/src.
protoc -I "$repo/protos" --go_out="$work/src" --go-grpc_out="$work/src" \
    "$repo"/protos/diffmesh/v1/*.proto
mkdir -p "$work/src/diffmesh-example" "$(dirname "$binary")"
cp "$here/main.go" "$work/src/diffmesh-example/"
cd "$work/src/diffmesh-example"
GO111MODULE=off GOPATH="$work:$gocode" GOFLAGS= go build -o "$binary" .
echo "$binary"
