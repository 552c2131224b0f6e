#!/usr/bin/env bash
# Incident drills on loopback (docs/operations.md), with the runbook's own commands:
#
#   key compromise: a federation of 3 SuperNodes (TLS + SuperNode authentication); site-2's
#     key is revoked while its SuperNode keeps running (the attacker's copy), site-1 rotates
#     its key; a run then trains with sites 0 and 1 only, a SuperNode started with the
#     revoked key is refused, and the revoked key cannot be registered again.
#   rollback: a central-DP run of 3 rounds (in-process simulation, as a coordinator
#     replaying a run would) is rolled back to round 1 and continues; its ledger's epsilon
#     after the rollback is >= before (never rewound) and its audit log verifies; a
#     tampered copy of the log fails verification.
#
# Usage: scripts/drill.sh [WORKDIR]   (default: a new temporary folder, kept for inspection)
# Prints "PASS <check>" per check; exits 1 at the first failed check, naming it.
# Every process it starts runs in its own session and is stopped by process group on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FL_APP_BIN:-$ROOT/.venv/bin}
[ -x "$BIN/fl-app" ] || BIN=$(dirname "$(command -v fl-app)")
export PATH="$BIN:$PATH"
W=${1:-$(mktemp -d "${TMPDIR:-/tmp}/fl-drill-XXXXXX")}
mkdir -p "$W/logs" "$W/home"
W=$(cd "$W" && pwd)
# An isolated ~/.flwr (connections, the CLI's state): the drill never touches the user's.
export HOME="$W/home" FLWR_HOME="$W/home/.flwr"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONUNBUFFERED=1
PY="$BIN/python"
T0=$SECONDS
echo "drill work folder: $W"

PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() { echo "PASS $1 ($((SECONDS - T0))s)"; }
fail() {
  echo "FAIL $1" >&2
  [ $# -lt 2 ] || { echo "--- last lines of $2:" >&2; tail -n 40 "$2" >&2 || true; }
  exit 1
}
# start NAME CMD...: run CMD in its own session (its group id is its PID), log to logs/NAME.log
start() {
  local name=$1
  shift
  setsid "$@" >"$W/logs/$name.log" 2>&1 </dev/null &
  PIDS+=("$!")
  disown "$!" # stopped by process group in cleanup; no job-control chatter
  eval "PID_${name//-/_}=$!"
}
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# nodes_json: the SuperLink's node list; node_status ID: that node's status (or "absent")
nodes_json() { flwr supernode ls drill --format json 2>/dev/null | "$PY" -c 'import sys; t=sys.stdin.read(); print(t[t.find("{"):])'; }
node_status() { nodes_json | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(*[n["status"] for n in d["nodes"] if n["node-id"]==sys.argv[1]] or ["absent"])' "$1"; }
wait_online() {
  local want=$1 n=0
  # Every `flwr supernode ls` costs ~1 s of CPU the SuperNodes need: poll every 2 s.
  for _ in $(seq 60); do
    n=$(nodes_json | "$PY" -c 'import json,sys; print(sum(n["status"]=="online" for n in json.load(sys.stdin)["nodes"]))' || echo 0)
    [ "$n" -ge "$want" ] && return 0
    sleep 2
  done
  echo "only $n of $want SuperNodes online" >&2
  return 1
}
registered_id() { sed -n 's/^registered node \([0-9]*\)$/\1/p' "$1"; }

# ---- key-compromise drill ------------------------------------------------------------
echo "== key-compromise drill"
fl-app deploy ca --out "$W/pki" >/dev/null
fl-app deploy server-cert --ca-dir "$W/pki" --out "$W/superlink" --san 127.0.0.1 --san localhost >/dev/null
for i in 0 1 2; do fl-app deploy node-key --out "$W/site-$i" --name "site-$i" >/dev/null; done
PORT=$(free_port)
start superlink fl-app deploy superlink --certs "$W/superlink" --host 127.0.0.1 --port "$PORT" \
  --database "$W/superlink/state.db"
for _ in $(seq 120); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.5; done
fl-app deploy connection --name drill --address "127.0.0.1:$PORT" --ca "$W/pki/ca.crt" >/dev/null
REG=()
for i in 0 1 2; do
  fl-app deploy register "$W/site-$i/site-$i.pub" --connection drill >"$W/logs/register-$i.out" &
  REG+=("$!")
done
wait "${REG[@]}"
ID0=$(registered_id "$W/logs/register-0.out")
ID1=$(registered_id "$W/logs/register-1.out")
ID2=$(registered_id "$W/logs/register-2.out")
[ -n "$ID0" ] && [ -n "$ID1" ] && [ -n "$ID2" ] || fail "register: three node ids" "$W/logs/superlink.log"
supernode() { # supernode NAME I KEY: site I's SuperNode (simulated partition I of 3)
  start "$1" fl-app deploy supernode --superlink "127.0.0.1:$PORT" --ca "$W/pki/ca.crt" --key "$3" \
    --node-config "partition-id=$2 num-partitions=3" --port "$(free_port)"
}
for i in 0 1 2; do supernode "supernode-$i" "$i" "$W/site-$i/site-$i"; done
wait_online 3 || fail "federation up: 3 SuperNodes online" "$W/logs/superlink.log"
pass "federation up: 3 SuperNodes online"

# Site 2's key is compromised: revoke it at once (its SuperNode, the attacker's copy, keeps running).
fl-app deploy revoke "$ID2" --connection drill >"$W/logs/revoke.out" || fail "revoke node $ID2" "$W/logs/revoke.out"
[ "$(node_status "$ID2")" = unregistered ] || fail "revoked node $ID2 listed as unregistered"
pass "revoked node listed as unregistered"
if fl-app deploy register "$W/site-2/site-2.pub" --connection drill >"$W/logs/reregister.out" 2>&1; then
  fail "a revoked key cannot be registered again" "$W/logs/reregister.out"
fi
pass "a revoked key cannot be registered again"

# Site 1 rotates its key (routine): new pair, rotate-key, restart its SuperNode with the new key.
fl-app deploy node-key --out "$W/site-1-v2" --name site-1 >/dev/null
fl-app deploy rotate-key "$W/site-1-v2/site-1.pub" --old-node-id "$ID1" --connection drill \
  >"$W/logs/rotate.out" || fail "rotate-key site-1" "$W/logs/rotate.out"
NEW1=$(registered_id "$W/logs/rotate.out")
[ "$(node_status "$ID1")" = unregistered ] || fail "rotated-out node $ID1 listed as unregistered"
kill -TERM -- "-$PID_supernode_1" 2>/dev/null || true
supernode supernode-1-v2 1 "$W/site-1-v2/site-1"
wait_online 2 || fail "site-1 back online with its new key" "$W/logs/supernode-1-v2.log"
[ "$(node_status "$NEW1")" = online ] || fail "site-1 online as node $NEW1" "$W/logs/supernode-1-v2.log"
pass "key rotated: site-1 online as node $NEW1, old node $ID1 unregistered"

# The others keep training: one round with sites 0 and 1.
fl-app deploy submit --connection drill --run-dir "$W/run-after-revoke" --timeout 240 \
  num_rounds=1 dataset.num_partitions=3 strategy.min_available_nodes=2 federated_eval_every=0 \
  >"$W/logs/submit.out" 2>"$W/logs/submit.err" || fail "run after revocation completes" "$W/logs/submit.err"
"$PY" - "$W/run-after-revoke" <<'EOF' || fail "run after revocation: 2 clients accepted, completed"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
summary = json.loads((run / "summary.json").read_text())
assert summary["status"] == "completed", summary["status"]
assert [r["clients_accepted"] for r in rounds] == [2], rounds
EOF
pass "the other sites keep training (1 round, 2 of 2 clients, completed)"

# A SuperNode presenting the revoked key is refused by the SuperLink (and exits non-zero).
set +e
timeout 90 fl-app deploy supernode --superlink "127.0.0.1:$PORT" --ca "$W/pki/ca.crt" \
  --key "$W/site-2/site-2" --node-config "partition-id=2 num-partitions=3" --port "$(free_port)" \
  >"$W/logs/revoked-restart.log" 2>&1
rc=$?
set -e
if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ]; then
  fail "SuperNode with the revoked key refused (exit $rc)" "$W/logs/revoked-restart.log"
fi
# Exit code 305 alone is any connection failure: require the SuperLink's refusal of the key.
grep -q "code: 2004\] Failed to activate SuperNode" "$W/logs/revoked-restart.log" ||
  fail "SuperNode with the revoked key: activation refused in its log" "$W/logs/revoked-restart.log"
grep -q "activate-node.*No SuperNode found with the given public key" "$W/logs/superlink.log" ||
  fail "SuperLink log: no live node for the revoked key" "$W/logs/superlink.log"
pass "a SuperNode with the revoked key is refused (exit $rc)"
cleanup
PIDS=()

# ---- rollback drill ------------------------------------------------------------------
echo "== rollback drill"
RUN="$W/rollback-run"
SIM=(privacy=central num_rounds=3 runtime=inprocess dataset.num_partitions=4)
fl-app simulate "${SIM[@]}" "hydra.run.dir=$RUN" >"$W/logs/sim.log" 2>&1 ||
  fail "central-DP run of 3 rounds" "$W/logs/sim.log"
ledger() { "$PY" -c 'import json,sys; s=json.load(open(sys.argv[1]+"/summary.json")); l=json.load(open(sys.argv[1]+"/privacy_ledger.json")); print(s["privacy"]["epsilon"], len(l["events"]), s["status"], s["rounds"])' "$1"; }
read -r EPS_BEFORE EVENTS_BEFORE STATUS ROUNDS <<<"$(ledger "$RUN")"
[ "$STATUS" = completed ] && [ "$ROUNDS" = 3 ] && [ "$EVENTS_BEFORE" = 3 ] ||
  fail "first run: completed, 3 rounds, 3 ledger events (got $STATUS, $ROUNDS, $EVENTS_BEFORE)"
fl-app simulate "${SIM[@]}" "hydra.run.dir=$RUN" "resume=$RUN" rollback_to=1 >"$W/logs/rollback.log" 2>&1 ||
  fail "rollback_to=1 continues" "$W/logs/rollback.log"
read -r EPS_AFTER EVENTS_AFTER STATUS ROUNDS <<<"$(ledger "$RUN")"
[ "$STATUS" = completed ] && [ "$ROUNDS" = 3 ] ||
  fail "rolled-back run completes its 3 rounds (got $STATUS, $ROUNDS)" "$W/logs/rollback.log"
pass "rollback_to=1: the run continued to round 3"
# Rounds 2 and 3 were released twice: 5 releases in the ledger, epsilon only grows.
[ "$EVENTS_AFTER" = 5 ] || fail "ledger keeps every release (5 events, got $EVENTS_AFTER)"
"$PY" -c 'import sys; b,a=map(float,sys.argv[1:]); sys.exit(0 if a>=b else 1)' "$EPS_BEFORE" "$EPS_AFTER" ||
  fail "epsilon never rewound ($EPS_AFTER < $EPS_BEFORE)"
pass "epsilon never rewound: $EPS_BEFORE before, $EPS_AFTER after (5 releases)"
fl-app audit verify "$RUN/audit.jsonl" >"$W/logs/verify.out" 2>&1 || fail "audit log verifies" "$W/logs/verify.out"
pass "audit log verifies"
# A tampered copy (round 1's cohort size changed, nothing else) fails verification.
sed '0,/"cohort_size":[0-9]*/s//"cohort_size":99/' "$RUN/audit.jsonl" >"$W/tampered.jsonl"
cmp -s "$RUN/audit.jsonl" "$W/tampered.jsonl" && fail "tampered copy differs from the log"
if fl-app audit verify "$W/tampered.jsonl" >"$W/logs/verify-tampered.out" 2>&1; then
  fail "a tampered audit log fails verification" "$W/logs/verify-tampered.out"
fi
grep -q "^BROKEN .*: line " "$W/logs/verify-tampered.out" ||
  fail "a tampered audit log: verify names the first broken line" "$W/logs/verify-tampered.out"
pass "a tampered audit log fails verification"
echo "all drills passed in $((SECONDS - T0))s"
