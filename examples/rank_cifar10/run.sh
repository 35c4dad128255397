#!/usr/bin/env bash
# The gradsign rank example: write 500 bundled CIFAR-10 images (50 per class) as an image folder in a
# temporary directory, then rank the candidates of candidates.py on a batch of 64 of them.
# Extra arguments go to gradsign rank, e.g. --out rank-out --json rank.json.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
folder="$(mktemp -d)/cifar10-images"
trap 'rm -rf "$(dirname "$folder")"' EXIT
python "$here/make_folder.py" "$folder" --per-class 50
gradsign rank --candidates "$here/candidates.py" --data "$folder" --proxies gradsign,synflow,naswot "$@"
