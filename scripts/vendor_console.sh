#!/usr/bin/env bash
# Refresh the console's vendored charting library from npm (the console works offline,
# so its assets live in the repository). Usage: scripts/vendor_console.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-4.6.2}"
dest=controller/console/static/vendor
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "chart.js@$version" >/dev/null && tar xzf chart.js-*.tgz)
cp "$work/package/dist/chart.umd.min.js" "$dest/chart.umd.min.js" 2>/dev/null \
  || cp "$work/package/dist/chart.umd.js" "$dest/chart.umd.min.js"
cp "$work/package/LICENSE.md" "$dest/chart.js.LICENSE.md"
echo "chart.js $version" > "$dest/VERSIONS"
echo "vendored chart.js $version into $dest" >&2
