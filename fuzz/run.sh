#!/usr/bin/env bash
# Run every cargo-fuzz target for N seconds (default 60) on a STABLE toolchain.
# tests/run runs it for DRIFTLESS_FUZZ_SECONDS (default 15) per target and
# counts each target as a test (closing line: "fuzz: N passed, N failed").
# RUSTC_BOOTSTRAP=1 lets stable rustc accept the -Z flags cargo-fuzz passes;
# --sanitizer none avoids -Zsanitizer=address (needs a nightly-built std).
# --codegen-units 16: cargo-fuzz otherwise builds every crate as one codegen
# unit, and the agent's alone then took 10 of the build's minutes on two
# cores (3 with 16 units); the targets run 10-35 % fewer inputs per second,
# which a bounded run of seconds can spare. Build and run must pass the same
# flags, or each run rebuilds.
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
# Env: CARGO_TARGET_DIR (default /tmp/fuzz-target), FUZZ_LOG_DIR (default /tmp/fuzz-logs),
#      FUZZ_WORK_DIR (default /tmp/fuzz-corpus: where libFuzzer writes new inputs)
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(yaml json dotenv ini binary enc allowed_signers bundle_header template_refs repo_config role_file state_file rollout fleetlock_request loose_object inventory_json)
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/fuzz-target}"
logs="${FUZZ_LOG_DIR:-/tmp/fuzz-logs}"
# New inputs go to $work (first corpus dir); the checked-in seeds in corpus/ stay small.
work="${FUZZ_WORK_DIR:-/tmp/fuzz-corpus}"
mkdir -p "$logs" "$work"
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz: missing prerequisite: cargo-fuzz; install the test prerequisites with \`sudo tests/install-prereqs\` (or \`cargo install cargo-fuzz --locked\`)"
    echo "fuzz: 0 passed, ${#targets[@]} failed"
    exit 1
fi
flags=(--sanitizer none --codegen-units 16 --target-dir "$CARGO_TARGET_DIR")
if ! nice -n 10 cargo fuzz build "${flags[@]}"; then
    echo "fuzz: the targets do not build"
    echo "fuzz: 0 passed, ${#targets[@]} failed"
    exit 1
fi
status=0
passed=0
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "$work/$t"
    echo "== $t (${secs}s) log: $logs/$t.log"
    if ! nice -n 10 cargo fuzz run "$t" "$work/$t" "corpus/$t" "${flags[@]}" \
        -- -max_total_time="$secs" >"$logs/$t.log" 2>&1; then
        echo "!! $t failed (crash?): see $logs/$t.log and artifacts/$t/"
        grep -v '^ \{4,\}' "$logs/$t.log" | tail -30
        status=1
        failed=$((failed + 1))
    else
        passed=$((passed + 1))
    fi
    grep -E '^#[0-9]+.*(DONE|INITED)' "$logs/$t.log" | tail -1 || true
    grep -E 'Done [0-9]+ runs' "$logs/$t.log" || true
done
echo "fuzz: $passed passed, $failed failed"
exit $status
