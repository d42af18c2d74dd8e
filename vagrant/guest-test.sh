#!/usr/bin/env bash
# Vagrant provisioner 2 (as root in the box): a venv on the distribution's Python (with its
# system packages, where bcc and nftables live), `interlock doctor`, then the datapath suite.
# Ends with one line that run-matrix.sh collects:
#   interlock-matrix: <machine> <uname -r> PASS|FAIL (doctor: …; tests: …)
set -uo pipefail
name=${1:-$(hostname)}
repo=/interlock
venv=/opt/interlock/venv
py=$(command -v python3.13 python3.12 python3.11 2>/dev/null | head -1)
py=${py:-python3}

if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv --system-site-packages "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -e "$repo[test]" >/tmp/interlock-pip.log 2>&1 \
  || { tail -20 /tmp/interlock-pip.log; echo "interlock-matrix: $name $(uname -r) FAIL (pip install failed)"; exit 1; }

cd "$repo"
doctor=$("$venv/bin/python" -m interceptor.cli doctor 2>&1); drc=$?
echo "$doctor"
verdict=$(echo "$doctor" | grep -E 'checks passed' | tail -1)

log=/tmp/interlock-datapath.log
"$venv/bin/python" -m pytest -p no:cacheprovider -q -rs -m datapath tests/ 2>&1 | tee "$log"
trc=${PIPESTATUS[0]}
summary=$(grep -E '(passed|failed|error)' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')

if [ "$drc" -eq 0 ] && [ "$trc" -eq 0 ]; then result=PASS; else result=FAIL; fi
echo "interlock-matrix: $name $(uname -r) $result (doctor: ${verdict:-none}; tests: ${summary:-none})"
[ "$result" = PASS ]
