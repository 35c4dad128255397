#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the bundled data: GradSign and three baselines on
# 100 random NAS-Bench-201 archs, correlated with their CIFAR-10 test accuracy (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
gradsign correlate --space nb201 --dataset cifar10 --sample 100 --seed 0 \
    --proxies gradsign,synflow,naswot,params --workers 2 --out gradsign-out --json gradsign-out/correlate.json \
    --force "$@"  # a rerun replaces its own gradsign-out/ files (correlate alone refuses without --force)
