#!/usr/bin/env bash
# Source trees for the NAME@DIR variants of benchmarks/ab_compare.py, made here from git (the GPU machine gets a
# copy of the working tree, not the repository):
#
#   scripts/ab_trees.sh old=main ilp=wip/softmax-ilp     # ab_old/, ab_ilp/ at the repo root
#   scripts/ab_trees.sh --clean                          # removes every ab_*/
#
# Each tree is `git archive REF` without benchmarks/results, notes and asv results (the device copy stays small).
# ab_*/ is git-ignored, so pass the trees to the device tool's `carry` (at most 8 paths), then run e.g.
#   python3 benchmarks/ab_compare.py --runs 3 --variant old@ab_old= --variant ilp@ab_ilp= -- --dims 128
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: $0 NAME=REF ... | --clean" >&2; exit 2; }
[ $# -gt 0 ] || usage
if [ "$1" = --clean ]; then
  [ $# -eq 1 ] || usage
  rm -rf ab_*/
  exit 0
fi
git rev-parse --git-dir >/dev/null 2>&1 || { echo "$0: $PWD is not a git repository" >&2; exit 2; }
names=" "
for spec in "$@"; do  # every spec checked before any tree is touched
  name=${spec%%=*} ref=${spec#*=}
  [[ $spec == *=* && $name =~ ^[A-Za-z0-9_.]+$ && -n $ref ]] \
    || { echo "$0: $spec: expected NAME=REF with NAME of letters, digits, '_' or '.'" >&2; exit 2; }
  [[ $names != *" $name "* ]] || { echo "$0: $spec: NAME $name given twice" >&2; exit 2; }
  names+="$name "
  git rev-parse --verify -q "$ref^{commit}" >/dev/null || { echo "$0: $spec: $ref is not a commit" >&2; exit 2; }
done
for spec in "$@"; do
  name=${spec%%=*} ref=${spec#*=}
  rm -rf "ab_$name" && mkdir "ab_$name"
  git archive "$ref" | tar -x -C "ab_$name"
  rm -rf "ab_$name/benchmarks/results" "ab_$name/notes" "ab_$name/asv_benchmarks/results"
  echo "ab_$name: $(git rev-parse --short "$ref") ($ref)"
done
