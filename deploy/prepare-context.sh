#!/usr/bin/env bash
# Fill deploy/context/ (never committed) for an image build on a machine like CI's:
#   - the torch CPU wheel from pip's find-links folder (else the image pulls torch from
#     the PyTorch CPU index)
#   - the CA bundle the host's pip verifies the package index with (pip config global.cert
#     or PIP_CERT), for sites behind a TLS-inspecting proxy
# Idempotent; hard links when the wheel is on the same file system.
set -euo pipefail
cd "$(dirname "$0")/context"
links=${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}
for folder in $links /opt/wheels; do
  for wheel in "$folder"/torch-2.13.0+cpu-cp311-*.whl; do
    [ -f "$wheel" ] || continue
    name=$(basename "$wheel")
    [ -f "$name" ] || ln "$wheel" "$name" 2>/dev/null || cp "$wheel" "$name"
    break 2
  done
done
cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  cmp -s "$cert" ca-bundle.crt 2>/dev/null || cp "$cert" ca-bundle.crt
fi
ls -1 . >&2
