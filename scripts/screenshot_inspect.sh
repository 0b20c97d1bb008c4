#!/usr/bin/env bash
# Render a trime-inspect page in headless Chromium and save a PNG.
#
#   scripts/screenshot_inspect.sh PAGE.html OUT.png [WIDTH] [HEIGHT]
#
# Needs Chromium (Debian/Ubuntu: apt-get update && apt-get install -y chromium) and, to
# shrink the PNG, Pillow (pip install pillow; optional). The page is self-contained, so no
# network is used.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 PAGE.html OUT.png [WIDTH=1600] [HEIGHT=1000]" >&2
  exit 2
fi
page=$1
out=$2
width=${3:-1600}
height=${4:-1000}
if [ ! -f "$page" ]; then
  echo "error: $page: no such page (write one with trime-inspect ... --out $page)" >&2
  exit 2
fi
browser=""
for b in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$b" >/dev/null 2>&1; then browser=$b; break; fi
done
if [ -z "$browser" ]; then
  echo "error: no Chromium found; install it with: apt-get update && apt-get install -y chromium" >&2
  exit 2
fi
abs=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")
mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# --virtual-time-budget lets the page's script run before the capture
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --user-data-dir="$tmp/profile" --window-size="${width},${height}" --virtual-time-budget=3000 \
  --screenshot="$tmp/shot.png" "file://$abs" >/dev/null 2>&1 || true
if [ ! -s "$tmp/shot.png" ]; then
  echo "error: $browser did not write a screenshot of $page" >&2
  exit 1
fi
python - "$tmp/shot.png" "$out" <<'EOF' || cp "$tmp/shot.png" "$out"
import sys
try:
    from PIL import Image
except ImportError:  # keep Chromium's PNG as it is
    sys.exit(1)
img = Image.open(sys.argv[1]).convert("RGB")
img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(sys.argv[2] + ".tmp.png", optimize=True)
import os
os.replace(sys.argv[2] + ".tmp.png", sys.argv[2])
EOF
echo "wrote $out ($(du -k "$out" | cut -f1) KB)"
