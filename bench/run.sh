#!/usr/bin/env bash
# The whole benchmark on one machine, in one go: speed ratios, the accuracy table, then the README section.
# Meant for one CUDA GPU (results are tagged with the card's name); on a CPU it takes hours.
#   bash bench/run.sh            # extra arguments go to bench/accuracy.py, e.g. --workers 8
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python bench/speed.py
python bench/accuracy.py "$@"
python bench/update_readme.py
echo "bench/run.sh: whole benchmark in $((SECONDS - start)) s"
