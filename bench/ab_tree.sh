#!/usr/bin/env bash
# Makes the untracked A/B trees of `bench/gpu_run.sh ab` on this machine, each this checkout's
# HEAD with one or more patches applied:
#   bash bench/ab_tree.sh NAME PATCH [PATCH...]    -> ./ab_NAME
# It uses `patch -p1`: `git apply` run inside a subfolder of the checkout silently skips every
# path outside that folder, which once left a "patched" tree identical to HEAD. Fails unless
# every patch applies cleanly and the tree then differs from HEAD. The trees stay untracked
# (the device tool copies them with the working tree); remove them when done.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: bash bench/ab_tree.sh NAME PATCH [PATCH...]" >&2; exit 2; }
name=$1; shift
repo=$(git rev-parse --show-toplevel)
tree="$repo/ab_$name"
[[ ! -e $tree ]] || { echo "ab_tree: $tree exists; remove it first" >&2; exit 1; }
mkdir "$tree"
git -C "$repo" archive HEAD | tar -x -C "$tree"
for p in "$@"; do
  patch -p1 --forward --no-backup-if-mismatch -s -d "$tree" < "$(realpath "$p")" \
    || { echo "ab_tree: $p does not apply to HEAD" >&2; rm -rf "$tree"; exit 1; }
done
mkdir -p /tmp/ab_tree_head && rm -rf /tmp/ab_tree_head/* && git -C "$repo" archive HEAD | tar -x -C /tmp/ab_tree_head
if diff -rq /tmp/ab_tree_head "$tree" > /dev/null; then
  echo "ab_tree: the patches changed nothing" >&2; rm -rf "$tree"; exit 1
fi
echo "ab_$name: HEAD $(git -C "$repo" rev-parse --short HEAD) + $*; changed: $(diff -rq /tmp/ab_tree_head "$tree" | sed "s#.*/ab_tree_head/##; s# and .*##; s#Only in .*: ##" | tr '\n' ' ')"
