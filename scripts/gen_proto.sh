#!/usr/bin/env bash
# Regenerates the committed Python modules of the wire contract from proto/.
# tests/unit/test_proto_generated.py checks that this gives no diff.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-proto}"
python -m grpc_tools.protoc -I proto --python_out="$out" --mypy_out="$out" \
  proto/edgefleet_proto/fleet.proto proto/edgefleet_proto/artifact.proto
python -m grpc_tools.protoc -I proto --python_out="$out" --mypy_out="$out" \
  --grpc_python_out="$out" --mypy_grpc_out="$out" proto/edgefleet_proto/inference.proto
