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
head=$(mktemp -d)
trap 'rm -rf "$head"' EXIT
git -C "$repo" archive HEAD | tar -x -C "$head"
mkdir "$tree"
git -C "$repo" archive HEAD | tar -x -C "$tree"
for p in "$@"; do
  patch -p1 --forward --no-backup-if-mismatch -s -d "$tree" < "$(realpath "$p")" \
    || { echo "ab_tree: $p does not apply to HEAD" >&2; rm -rf "$tree"; exit 1; }
done
# Changed files as paths in the tree: "Files A and B differ", and "Only in DIR: NAME" for a
# file a patch adds.
changed=$(diff -rq "$head" "$tree" | sed -e "s#^Files $head/\([^ ]*\) and .*#\1#" \
            -e "s#^Only in $tree/\{0,1\}\([^:]*\): \(.*\)#\1/\2#" -e "s#^/##" || true)
[[ -n $changed ]] || { echo "ab_tree: the patches changed nothing" >&2; rm -rf "$tree"; exit 1; }
echo "ab_$name: HEAD $(git -C "$repo" rev-parse --short HEAD) + $*; changed: $(echo $changed)"
