#!/usr/bin/env bash
# A/B benchmark of two builds of the native libraries in one device run: timings compare only
# on the same machine, and device time is scarce. Runs the normalization benchmark (no
# PyTorch) with JAXMPS_LIB_DIR=A, then B, AB_ROUNDS times, and prints each case's median
# native time under A and B and their ratio.
#
# Usage:  [AB_OPS="spatial_norm local_contrast_norm"] [BENCH_LAYOUTS="NHWC NCHW"] [AB_ROUNDS=1]
#         scripts/gpu_ab.sh A_DIR B_DIR [OUT_DIR]
# A directory may hold libjaxmps_cuda.so.xz instead of libjaxmps_cuda.so (two uncompressed CUDA
# libraries exceed the device tool's carry limit): it is unpacked, with the directory's other
# libraries, into a temporary directory. AB_LIB_PATH (a directory) is searched after A and B
# for the libraries they lack (e.g. A holds only its CUDA library). Writes
# OUT_DIR/ab_{A,B}_<round>.json and ab.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 A_DIR B_DIR [OUT_DIR]" >&2; exit 2; }
OUT=$(mkdir -p "${3:-benchmarks/gpu}" && cd "${3:-benchmarks/gpu}" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

unpack() {  # prints a directory holding the libraries of $1, uncompressed
  local src dir
  src=$(cd "$1" && pwd)
  if [ ! -e "$src/libjaxmps_cuda.so.xz" ]; then echo "$src"; return; fi
  dir=$(mktemp -d)
  for f in "$src"/*.so; do ln -s "$f" "$dir/"; done
  "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$src/libjaxmps_cuda.so.xz" "$dir/libjaxmps_cuda.so"
  echo "$dir"
}
declare -A LIB=([A]=$(unpack "$1") [B]=$(unpack "$2"))
status=0
for round in $(seq 1 "${AB_ROUNDS:-1}"); do
  for side in A B; do
    echo "== $(date +%T) round $round, $side: ${LIB[$side]}"
    # shellcheck disable=SC2086
    JAXMPS_LIB_DIR=${LIB[$side]}${AB_LIB_PATH:+:$AB_LIB_PATH} PYTHONPATH="$PWD" "$PY" scripts/gpu_bench.py --family norm \
      --no-torch --ops ${AB_OPS:-spatial_norm local_contrast_norm} \
      --layouts ${BENCH_LAYOUTS:-NHWC NCHW} --repeats ${BENCH_REPEATS:-10} \
      --json "$OUT/ab_${side}_$round.json" > "$OUT/ab_${side}_$round.log" 2>&1 || status=1
    tail -3 "$OUT/ab_${side}_$round.log"
  done
done
"$PY" - "$OUT" <<'PY' | tee "$OUT/ab.txt"
import glob, json, statistics, sys
out = sys.argv[1]
times = {}
for side in "AB":
    for path in sorted(glob.glob(f"{out}/ab_{side}_*.json")):
        for r in json.load(open(path))["results"]:
            key = (r["op"], r["mode"], r["dtype"], r["layout"])
            times.setdefault(key, {}).setdefault(side, []).append(r["times_s"]["native"])
print(f"{'op':22} {'mode':17} {'dtype':9} {'layout':6} {'A ms':>7} {'B ms':>7} {'B/A':>6}")
for key, t in sorted(times.items()):
    if "A" in t and "B" in t:
        a, b = statistics.median(t["A"]) * 1e3, statistics.median(t["B"]) * 1e3
        print(f"{key[0]:22} {key[1]:17} {key[2]:9} {key[3]:6} {a:7.3f} {b:7.3f} {b / a:6.3f}")
PY
exit $status
