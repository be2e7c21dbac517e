#!/usr/bin/env bash
# Download the wheels a lent GPU machine lacks into .whl/ (git-ignored), and check that they and the project
# fit what one device `run` call carries (64 MiB). Run it here, on a machine with pip and PyPI:
#
#   bash tools/gpu_kit.sh            # then: the device tool's run, carry [".whl"], command "bash tools/gpu_check.sh"
#
# The GPU image ('cuda': Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, huggingface-hub 1.33,
# tokenizers 0.23.2, peft, pyarrow, ...) has no bitsandbytes, datasets or trl, nor datasets' dill and
# multiprocess: those travel at the versions constraints.txt pins (what the suite last passed with). Its
# transformers 5.17 is under pyproject's floor (5.17 cannot resume a multi-process CPU run; 5.18 can), so
# transformers travels at that floor: newer ones need huggingface-hub >= 2.4 and kernels, which the image lacks.
# peft travels as a fallback: tools/gpu_check.sh installs a carried wheel only where the image lacks the package
# or has it outside pyproject's range. Wheels for CPython 3.12 on manylinux x86_64; --no-deps: every wheel
# needed is named here (their other requirements are in the image; the check names any that is not).
# Exit status: non-zero when a download fails or the total is over 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PINNED=(bitsandbytes datasets dill multiprocess trl peft)  # at constraints.txt's versions
AT_FLOOR=(transformers)  # at pyproject.toml's floor
LIMIT=$((64 * 1024 * 1024))
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

pin() {  # pin NAME: NAME==VERSION from constraints.txt (names compared as pip does: case, '-', '_' and '.' alike)
  local want
  want=$(printf %s "$1" | tr 'A-Z_.' 'a-z--')
  while IFS= read -r line; do
    case "$line" in \#*|"") continue ;; esac
    [ "$(printf %s "${line%%==*}" | tr 'A-Z_.' 'a-z--')" = "$want" ] && { echo "$1==${line#*==}"; return; }
  done < constraints.txt
  echo "gpu_kit: constraints.txt pins no $1" >&2
  return 1
}

floor() {  # floor NAME: NAME==X from pyproject.toml's "NAME>=X..."
  local version
  version=$(sed -n "s/^ *\"$1>=\([0-9][0-9.]*\).*/\1/p" pyproject.toml | head -n 1)
  [ -n "$version" ] || { echo "gpu_kit: pyproject.toml gives no floor for $1" >&2; return 1; }
  echo "$1==$version"
}

specs=()
for p in "${PINNED[@]}"; do specs+=("$(pin "$p")"); done
for p in "${AT_FLOOR[@]}"; do specs+=("$(floor "$p")"); done
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${specs[@]}"

size_of() { stat -c %s "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "wheels in .whl/ (for the GPU image: CPython 3.12, manylinux x86_64):"
for w in .whl/*.whl; do printf '  %-72s %10s\n' "${w#.whl/}" "$(mib "$(size_of "$w")")"; done
wheels=$(size_of .whl/*.whl)
# what a run call carries besides .whl: tracked files and untracked ones git does not ignore
mapfile -d '' files < <(git ls-files -z --cached --others --exclude-standard)
project=0
for f in "${files[@]}"; do [ -f "$f" ] && project=$((project + $(stat -c %s "$f"))); done
total=$((wheels + project))
printf '%-24s %10s\n' "wheels" "$(mib "$wheels")" "project (git files)" "$(mib "$project")" \
  "carried in all" "$(mib "$total")" "limit of a run call" "$(mib "$LIMIT")"
if [ "$total" -gt "$LIMIT" ]; then
  echo "gpu_kit: $(mib "$total") is over the $(mib "$LIMIT") a run call carries" >&2
  exit 1
fi
echo "fits, $(mib $((LIMIT - total))) to spare. On the GPU machine: run with carry [\".whl\"] and the command: bash tools/gpu_check.sh"
