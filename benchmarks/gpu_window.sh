#!/usr/bin/env bash
# The GPU machine's measurements for issue 17, one step a device call, in the order they
# matter: each step fits one call's 10 minutes, unpacks the site bundle if this machine has
# not yet (a fresh machine measures in its first call), and writes under $OUT.
#   benchmarks/gpu_window.sh best8     the loop's candidates (every pair of flex/sdpa decode
#                                      attention and fused/eager prefill) beside `generate`,
#                                      8 frames, batch 128, 256 videos; carry .whl/one
#   benchmarks/gpu_window.sh grammar   the grammar's cost at 8 and 12 frames
#   benchmarks/gpu_window.sh t4        T4 settings (fp16, 15 GiB cap)
#   benchmarks/gpu_window.sh checks    gpu_smoke.py, and grammar_host.py on 16 cores
#   benchmarks/gpu_window.sh switch5   best8's plain rows under Python's default switch interval
#   benchmarks/gpu_window.sh matmul    the third decode attention (matmul) beside sdpa, eager prefill
#   benchmarks/gpu_window.sh bound     the grammar at 8 frames with the random model's texts run to
#                                      their bounds (--texts bound): the masks' worst case
# best8 keeps its rows on the machine (.fleetscribe/keep); the later steps run the loop with
# its fastest pair. A machine idle 30 s is given back bare: call the next step straight away.
# Each step stops its commands by WINDOW_S seconds (default 585); a command cut short has
# saved the rows it finished.
set -uo pipefail
step=${1:?usage: benchmarks/gpu_window.sh best8|grammar|t4|checks|switch5|matmul|bound}
case $step in best8 | grammar | t4 | checks | switch5 | matmul | bound) ;; *)
    echo "gpu_window: unknown step $step (best8, grammar, t4, checks, switch5, matmul, bound)" >&2
    exit 2
    ;;
esac
window=${WINDOW_S:-585}
out=${OUT:?run on the device machine, where OUT is set}
if [ ! -f /tmp/site/.unpacked ]; then
    [ -f .whl/one/site.tar.xz ] || { echo "gpu_window: no site bundle; carry .whl/one" >&2; exit 3; }
    mkdir -p /tmp/site && tar xJf .whl/one/site.tar.xz -C /tmp/site && touch /tmp/site/.unpacked
fi
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1
keep=.fleetscribe/keep
mkdir -p "$keep"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench=(python3 benchmarks/throughput.py --seed-videos 0 --work .fleetscribe/bench)

left() { echo $((window - SECONDS)); }

# `timeout` for what is left of the window; the log beside the output, its tail printed
measure() { # NAME COMMAND...
    local name=$1 seconds
    shift
    seconds=$(left)
    if ((seconds <= 0)); then # `timeout 0` would not stop it at all
        echo "$name: not run, the window is spent"
        return
    fi
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $? at ${SECONDS} s"
    tail -c 2000 "$out/$name.log"
}

# best8's fastest graph row (steady s/video where it has one) as the loop's arguments
chosen() {
    python3 - "$keep" <<'EOF'
import json, sys
from pathlib import Path

rows = []
for path in Path(sys.argv[1]).glob("best8*.json"):
    rows += json.loads(path.read_text()).get("rows", [])
graph = [r for r in rows if r.get("generation") == "graph" and "s_per_video" in r]
if graph:
    best = min(graph, key=lambda r: r.get("steady_s_per_video") or r["s_per_video"])
    print(f"--decode-attention {best['decode_attention']} --prefill {best['prefill']}")
EOF
}

pick=()
case $step in grammar | t4 | switch5 | bound)
    read -ra pick <<<"$(chosen)"
    echo "the loop: ${pick[*]:-its defaults}"
    ;;
esac

case $step in
best8)
    measure best8 "${bench[@]}" --settings h100 --videos 256 --batch-size 128 --frames 8 \
        --paths generate,graph --decode-attention flex,sdpa --prefill fused,eager \
        --out "$out/best8"
    cp "$out"/best8.json "$keep"/ 2>/dev/null
    ;;
grammar)
    measure grammar8_12 "${bench[@]}" --settings h100 --videos 128 --batch-size 128 \
        --frames 8,12 --paths generate,graph --grammar --grammar-steps 256 "${pick[@]}" \
        --out "$out/grammar8_12"
    ;;
t4)
    measure t4 "${bench[@]}" --settings t4 --t4-videos 38 --frames 8 --paths generate,graph \
        "${pick[@]}" --out "$out/t4"
    ;;
checks)
    whole=$window
    window=$((SECONDS + 300 < whole ? SECONDS + 300 : whole)) # the smoke leaves time for the host
    measure gpu_smoke python3 benchmarks/gpu_smoke.py --out "$out/gpu_smoke.jsonl"
    window=$whole
    measure grammar_host_16core python3 benchmarks/grammar_host.py --load 0,1,4 \
        --switch 5,0.5 --grammars max_chars,margin --out "$out/grammar_host_16core"
    ;;
switch5)
    measure switch5 "${bench[@]}" --settings h100 --videos 256 --batch-size 128 --frames 8 \
        --paths generate,graph "${pick[@]}" --switch-ms 5 --out "$out/switch5"
    ;;
matmul)
    measure matmul8 "${bench[@]}" --settings h100 --videos 256 --batch-size 128 --frames 8 \
        --paths generate,graph --decode-attention matmul,sdpa --prefill eager \
        --out "$out/matmul8"
    ;;
bound)
    measure bound8 "${bench[@]}" --settings h100 --videos 128 --batch-size 128 --frames 8 \
        --paths generate,graph --grammar --grammar-steps 256 --texts bound "${pick[@]}" \
        --out "$out/bound8"
    ;;
esac
