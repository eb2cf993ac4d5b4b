#!/usr/bin/env bash
# Rehearses the Dockerfile's build stages without a Docker engine (part of `make docker-lint`): the same
# cargo-chef version, `cargo chef prepare` on the build context (the files git tracks under the paths
# .dockerignore lets in), `cargo chef cook` from the recipe alone, then the release build with --locked.
# It proves the recipe builds the dependency layer on its own and that only the workspace's crates are left to
# compile once the sources arrive. What it cannot rehearse: the base images, apt-get and the runtime stages.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
chef_version=$(sed -n 's/.*cargo install cargo-chef --locked --version \([0-9.]*\).*/\1/p' Dockerfile)
[ -n "$chef_version" ] || { echo "rehearse: no cargo-chef version in the Dockerfile" >&2; exit 1; }
if ! cargo chef --version 2>/dev/null | grep -q "$chef_version"; then
  cargo install -q cargo-chef --locked --version "$chef_version"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/planner" "$work/builder"

# Build context: what git tracks (uncommitted edits included) under the paths .dockerignore lets in (its `!` lines).
mapfile -t allowed < <(sed -n 's/^!\([^*]*\)$/\1/p' .dockerignore)
[ ${#allowed[@]} -gt 0 ] || { echo "rehearse: .dockerignore lets nothing in" >&2; exit 1; }
git ls-files -z --cached --others --exclude-standard -- "${allowed[@]}" | tar --null -T - -cf - | tar -xf - -C "$work/planner"
(cd "$work/planner" && cargo chef prepare --recipe-path recipe.json)
cp "$work/planner/recipe.json" "$work/builder/"
(cd "$work/builder" && cargo chef cook --release --locked --workspace --recipe-path recipe.json)
cp -r "$work/planner/." "$work/builder/"
compiled=$(cd "$work/builder" && cargo build --release --locked --workspace --bins 2>&1 | sed -n 's/^ *Compiling \([^ ]*\) .*/\1/p' | sort | tr '\n' ' ')
expected=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(" ".join(sorted(p["name"] for p in json.load(sys.stdin)["packages"])) + " ")')
[ -x "$work/builder/target/release/fanout" ] && [ -x "$work/builder/target/release/demo-backend" ] \
  || { echo "rehearse: the release build did not produce both binaries" >&2; exit 1; }
if [ "$compiled" != "$expected" ]; then
  echo "rehearse: after cook, the build compiled [$compiled], expected only the workspace [$expected]" >&2
  exit 1
fi
echo "rehearse: cargo-chef $chef_version recipe cooks the dependencies; the build then compiles only: $compiled"
