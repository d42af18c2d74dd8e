#!/usr/bin/env bash
# Bring up each machine of the Vagrantfile, run the suite in it, print one PASS/FAIL line each.
#   ./run-matrix.sh                      # all machines, libvirt
#   PROVIDER=virtualbox ./run-matrix.sh debian12 fedora
#   KEEP=1 ./run-matrix.sh               # leave the machines running (default: destroy after)
set -uo pipefail
cd "$(dirname "$0")"
provider=${PROVIDER:-libvirt}
machines=("$@")
[ ${#machines[@]} -gt 0 ] || machines=(debian12 ubuntu2204 ubuntu2404 fedora)
mkdir -p logs
lines=()
fail=0
for m in "${machines[@]}"; do
  echo "== $m ($provider): logs/$m.log"
  if vagrant status "$m" 2>/dev/null | grep -q "^$m *running"; then
    vagrant rsync "$m" >"logs/$m.log" 2>&1
    vagrant provision "$m" --provision-with test >>"logs/$m.log" 2>&1
  else
    vagrant up "$m" --provider="$provider" >"logs/$m.log" 2>&1
  fi
  line=$(grep -a -o 'interlock-matrix: .*' "logs/$m.log" | tail -1)
  [ -n "$line" ] || line="interlock-matrix: $m ? FAIL (no result: see logs/$m.log)"
  echo "$line"
  lines+=("$line")
  case "$line" in *" PASS "*) ;; *) fail=1 ;; esac
  [ -n "${KEEP:-}" ] || vagrant destroy -f "$m" >>"logs/$m.log" 2>&1
done
echo
printf '%s\n' "${lines[@]}"
exit $fail
