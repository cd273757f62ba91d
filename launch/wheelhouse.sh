#!/usr/bin/env bash
# A wheelhouse for GPU nodes without internet: kosmos's wheel and every package the node's own
# Python environment lacks, downloaded once on a machine that has internet (a login node).
#
#   launch/wheelhouse.sh WHEELHOUSE [EXTRAS]          # EXTRAS default: eval
#
# Run it in the node's own environment (the same container image or modules as the compute nodes:
# the same Python, platform and torch), from the repository. torch, CUDA, NCCL and whatever else
# the image has are not downloaded: pip's resolver is asked what an install would add to this
# environment, and only that is fetched (as wheels; a package published only as source is built
# into one here). pytest is added, for `launch/gpu_selfcheck.sh`. The size depends on the image:
# on an image with torch and its CUDA libraries it is the pure-Python stack of DeepSpeed, open_clip
# (with timm), webdataset, sentencepiece, tensorboard and, with the `eval` extra, pycocoevalcap
# (about 100 MB of its own: the Java scorers), matplotlib, scikit-learn and scikit-image; the script
# prints the total when done. Copy the folder to the cluster's shared filesystem.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 WHEELHOUSE [EXTRAS]" >&2
  exit 2
fi
wheelhouse=$1 extras=${2:-eval}
python=${PYTHON:-python}
mkdir -p "$wheelhouse"
report=$(mktemp)
trap 'rm -f "$report"' EXIT

# kosmos itself, as a wheel.
"$python" -m pip wheel --no-deps --wheel-dir "$wheelhouse" .
# What installing it (and pytest) would add to this environment: name==version of each package.
"$python" -m pip install --dry-run --quiet --report "$report" ".[$extras]" pytest
"$python" - "$report" > "$wheelhouse/requirements.txt" <<'PY'
import json, sys

for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if meta["name"].lower() != "kosmos":
        print(f"{meta['name']}=={meta['version']}")
PY
if [[ -s $wheelhouse/requirements.txt ]]; then
  "$python" -m pip wheel --no-deps --wheel-dir "$wheelhouse" -r "$wheelhouse/requirements.txt"
fi
echo "$(ls "$wheelhouse"/*.whl | wc -l) wheels, $(du -sh "$wheelhouse" | cut -f1) in $wheelhouse"
