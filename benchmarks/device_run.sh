#!/usr/bin/env bash
# One device-machine call: install, check and benchmark flashcomm on this host's GPUs.
#
#   bash benchmarks/device_run.sh STAGES [NP]
#
# STAGES is a comma list run in order: info, checks (full GPU checks at NP
# ranks), checks-ll (LL protocol and timeouts only), checks-staged (the staged two-shot), hier-checks and
# hier-bench (hierarchical all-reduce, 2 GPUs as 2 nodes, NCCL on sockets), llab (lossless bench with
# the flag protocol, then with LL), checks23 (quick checks at 2 and 3 ranks), checks-q (quick checks at NP ranks), tune,
# tune-range (env TUNE_MIN, TUNE_MAX: those rows re-tuned into the shipped table), bench, verify,
# accuracy, bench-ab (5 sizes, 7 repeats), rot-ab (issue 21: rotation exact, then its price: rotate off vs on), torch-lite (torch checks, example, eager cost under torchrun), minilm (the MiniLM study on GPUs, compared with the CPU run), model, pytest (the pytest GPU wrapper), checks-quick, faults (the fault matrix; env FAULTS), eager (host
# cost per eager call vs NCCL and by launch path, eager_host.py), torch (torchrun checks, tp_mlp
# example, eager cost under torchrun), table (issue 19: `mpirun -n 2 flashcomm bench` logs checked for
# cut cells), and the
# kernel-profiling stages: ll-ab (the poison protocol's cost in the LL kernels; env BASE_KERNELS), rot-kab (issue 21:
# rotation's price under several kernel builds in one run; env BASE_KERNELS, MID_KERNELS, ROT_ROUNDS, ROT_VARIANTS), variants (kernel_variants.py; env BASE_KERNELS,
# VARIANTS, CASES, DEFINE_SETS), solo (kernel_solo.py on one GPU; env SOLO_BYTES, SOLO_BITS,
# SOLO_SHAPE, SOLO_ALGO (twoshot, oneshot, staged), SOLO_PROTOCOL (flag, ll), SOLO_WORLD, SOLO_ROTATE (off, on, both), SOLO_GROUP, SOLO_DTYPE,
# SOLO_MAX_BLOCKS, SOLO_SLOT_KIB, SOLO_DEFINE_SETS, BASE_KERNELS),
# loopback (one GPU: tests/gpu/test_loopback_gpu.py, env KERNEL_DIR), loopback-time (loopback_time.py; env
# LOOPBACK_CASES, LOOPBACK_VARIANTS), ncu (Nsight Compute sections of the solo kernel; env NCU_KERNEL, NCU_BITS, NCU_BYTES,
# NCU_SECTIONS and the SOLO_ ones), ncu-rot (issue 21: the solo staged two-shot profiled rotation off and on)
# and ncu-src (its per-instruction source counters as CSV); transports (issue 17; one stage per device call):
# host-checks, host-transport, isolated-checks and isolated-transport (one GPU visible per
# rank), isolated-bench, host-bench (vs NCCL-SHM), host-tune, host-model; hier-parts (issue 20: the hierarchical
# all-reduce's encode/all-gather/decode apart; env HIER_SIZES); node-solo (one GPU: its inter-node kernels
# timed alone, env NODE_SIZES, NODE_BITS, NODE_ROTATE).
# pytest-gpu (alias pytest): the GPU checks as named pytest tests at NP ranks (env PYTEST_GPU, PYTEST_GPU_ARGS,
# PYTEST_GPU_BUDGET; see the stage).
# NP defaults to the GPU count.
# Logs and JSON land in $OUT (the device tool brings them back).
set -uo pipefail
STAGES=${1:-info,checks}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
export FLASHCOMM_TIMEOUT_S=${FLASHCOMM_TIMEOUT_S:-20}
export TERM=dumb NO_COLOR=1  # logs, not a live terminal (Open MPI gives ranks a pty)
OUT=${OUT:-/tmp/flashcomm-out}
mkdir -p "$OUT"
LOG="$OUT/run.log"
NG=$(nvidia-smi -L | wc -l)
NP=${2:-$NG}
TAG=$(date +%Y%m%d-%H%M)
MPI="mpirun --bind-to none --oversubscribe -n"

log() { echo "=== $(date +%T) $*" | tee -a "$LOG"; }
run() {  # run LIMIT_S CMD...: bounded, output to the log
  local limit=$1; shift
  log "$*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 60
  local rc=${PIPESTATUS[0]}
  log "rc=$rc"
  return 0
}

python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/flashcomm-pip.log 2>&1 \
  || { log "pip install failed; using PYTHONPATH"; export PYTHONPATH=$PWD; FC_MAIN=cli.main; }
FC="python3 -m ${FC_MAIN:-flashcomm_cupy.cli.main}"  # uninstalled, the checkout's cli/ is the package "cli"

for stage in ${STAGES//,/ }; do
  case $stage in
    info)
      run 60 nvidia-smi topo -m
      run 60 python3 -c "import cupy, mpi4py, numpy; from cupy.cuda import nccl; print('cupy', cupy.__version__, 'nccl', nccl.get_version(), 'mpi4py', mpi4py.__version__, 'numpy', numpy.__version__)"
      run 120 $MPI "$NP" $FC info --json "$OUT/info-$NP.json" ;;
    checks)
      run 360 $MPI "$NP" python3 tests/gpu/gpu_checks.py ;;
    checks-ll)
      run 200 $MPI "$NP" python3 tests/gpu/gpu_checks.py --only ll,timeout ;;
    llab)  # A/B of the signalling protocols (flag, then LL), same harness, NCCL in each run
      for p in flag ll; do
        run 200 $MPI "$NP" $FC bench -b 4K -e 16M -f 4 --bits none,4,8 --algo oneshot,twoshot --protocol $p \
          --json "$OUT/llab-$p-${NP}x-$TAG.json"
      done ;;
    checks-staged)  # the staged two-shot (exactness, mixed with the plain kernel, timeout) plus the quick exact sweep
      run 300 $MPI "$NP" python3 tests/gpu/gpu_checks.py --quick --only staged,exact,groups,timeout ;;
    faults)  # the fault matrix of docs/reliability.md (late/dead peers, graphs, epochs, subnormals, ...)
      run 420 $MPI "$NP" python3 tests/gpu/fault_checks.py ${FAULTS:+--only "$FAULTS"} ;;
    checks-fast)
      run 300 $MPI "$NP" python3 tests/gpu/gpu_checks.py --only codec,exact,groups,api ;;
    checks-rest)
      run 300 $MPI "$NP" python3 tests/gpu/gpu_checks.py --only many,graphs,large,timeout ;;
    hier-checks)  # hierarchical backend: 2 GPUs as 2 nodes of 1 GPU, NCCL forced onto sockets
      run 400 env FLASHCOMM_RANKS_PER_NODE=1 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 \
        $MPI 2 python3 tests/gpu/hierarchical_checks.py ;;
    hier-bench)  # issue 20's target: hierarchical vs flat NCCL, both on sockets, fp16, graph timing
      run 400 env FLASHCOMM_RANKS_PER_NODE=1 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 \
        $MPI 2 $FC bench --backend gpu -b 1M -e 256M -f 4 -d float16 --bits none,4,8,4/8 --algo auto,hierarchical -G 1 \
        --json "$OUT/bench-hier-2x1-$TAG.json" ;;
    checks23)
      # on a fresh machine two ranks compile every kernel module (~2 min) before checking
      run 240 $MPI 2 python3 tests/gpu/gpu_checks.py --quick --large-mib 64
      [ "$NG" -ge 3 ] && run 200 $MPI 3 python3 tests/gpu/gpu_checks.py --quick --large-mib 64 ;;
    tune)  # this card's NP-rank rows merged into a copy of the shipped table ($OUT/tuning.json: the next default.json)
      [ -f "$OUT/tuning.json" ] || cp flashcomm_cupy/tuning/default.json "$OUT/tuning.json"
      run 300 $MPI "$NP" $FC tune -o "$OUT/tuning.json"
      export FLASHCOMM_TUNING="$OUT/tuning.json" ;;
    tune-range)  # re-tune TUNE_MIN..TUNE_MAX into a copy of the shipped table (other rows kept)
      cp flashcomm_cupy/tuning/default.json "$OUT/tuning.json"
      run 300 $MPI "$NP" $FC tune -b "${TUNE_MIN:-256K}" -e "${TUNE_MAX:-16M}" -o "$OUT/tuning.json"
      export FLASHCOMM_TUNING="$OUT/tuning.json" ;;
    bench)
      run 200 $MPI "$NP" $FC bench -b 4K -e 256M -f 4 --bits none,8,4,4/8 --eager \
        --json "$OUT/bench-${NP}x-$TAG.json" --plot "$OUT/bench-${NP}x.png" ;;
    bench-ab)  # the reliability issue's before/after rows: 5 sizes, 7 repeats, NCCL in the same run
      run 200 $MPI "$NP" $FC bench -b 4K -e 256M -f 16 --bits none,8,4 -r 7 --json "$OUT/bench-ab-${NP}x-$TAG.json" ;;
    bench2)
      run 120 $MPI 2 $FC bench -b 4K -e 256M -f 4 --bits none,8,4,4/8 \
        --json "$OUT/bench-2x-$TAG.json" ;;
    rot-ab)  # issue 21, rotation's price: rotation bit for bit against the reference (encode/decode kernels at
      # 16/32-element units and groups 32-1024, every codec/dtype/algorithm, the LL kernels with sentinel,
      # infinite and signed-zero inputs, the staged two-shot), then rotate off vs on in one bench (whose
      # correctness pass checks every row, 16M and 256M included) and the price per row; env ROT_CHECKS: the
      # sections to run (the bench's own check still covers the staged kernel without "staged"); ROT_GROUPS: the
      # group sizes to price, one bench each (default 128)
      run 330 $MPI "$NP" python3 tests/gpu/gpu_checks.py --quick --only "${ROT_CHECKS:-codec,exact,groups,ll,staged}"
      for g in ${ROT_GROUPS:-128}; do  # e.g. ROT_GROUPS="128 32": INT6 g32 is the INT6 mode the MiniLM study keeps
        run 200 $MPI "$NP" $FC bench -b 4K -e 256M -f 16 --bits 8,6,4 --group-size "$g" --rotate both -r 5 \
          --json "$OUT/rot-ab-${NP}x-g$g-$TAG.json"
        run 30 python3 benchmarks/rotation_price.py "$OUT/rot-ab-${NP}x-g$g-$TAG.json"
      done
      # what this host's NVRTC allocated (sass_diff.py's numbers come from nvcc on the team machine)
      run 120 python3 benchmarks/kernel_resources.py --json "$OUT/kernel-resources-$TAG.json" ;;
    verify)
      run 300 $MPI "$NP" $FC verify --json "$OUT/verify-${NP}x.json" ;;
    verify-short)
      run 100 $MPI "$NP" $FC verify --lengths 1,4099,1048583 --datatype float16,bfloat16 --rotate both \
        --symmetric off ;;
    accuracy)
      run 150 $MPI "$NP" $FC accuracy --backend gpu --data outliers --group-size 128 --symmetric off \
        --elements 65536 --json "$OUT/accuracy-gpu-${NP}x.json" ;;
    minilm)  # docs/accuracy.md "A real model": the MiniLM study on GPUs, on the CPU run's corpus, then the comparison.
      # The model wheel (84 MB) cannot travel in one call: see docs/accuracy.md for the two-part carry into /tmp/minilm.
      [ -d /tmp/minilm/site ] && export PYTHONPATH=/tmp/minilm/site${PYTHONPATH:+:$PYTHONPATH}
      CPU_JSON=${MINILM_CPU_JSON:-benchmarks/results/minilm-cpu-2ranks.json}
      # --algo twoshot: the CPU backend's auto; the GPU's auto runs one-shot for these messages (one quantization
      # instead of two), which a comparison must not mix (minilm.compare refuses it)
      run 450 $MPI "$NP" $FC accuracy --model minilm --backend gpu --corpus "$CPU_JSON" --algo "${MINILM_ALGO:-twoshot}" \
        --json "$OUT/minilm-gpu-${NP}x.json" --plot "$OUT/minilm-gpu-${NP}x.png"
      run 60 python3 -m flashcomm_cupy.minilm.compare "$CPU_JSON" "$OUT/minilm-gpu-${NP}x.json" ;;
    model)
      run 150 env NP="$NP" LAYERS="${LAYERS:-80}" REPEATS="${REPEATS:-3}" \
        bash benchmarks/model_sweep.sh "$OUT/model-${NP}x-$TAG.json" ;;
    eager)  # host cost per eager call: Communicator.all_reduce (CuPy, torch) vs NCCL, and by launch path
      run 400 $MPI "$NP" python3 benchmarks/eager_host.py --calls 200 --repeats 7 --paths --json "$OUT/eager-${NP}x-$TAG.json" ;;
    torch)  # issue 18: torch bootstrap without MPI, custom ops in graphs and torch.compile, TP example, eager cost
      TORCHRUN="python3 -m torch.distributed.run --standalone --nproc-per-node $NP"
      run 400 $TORCHRUN tests/gpu/torch_gpu_checks.py
      run 200 $MPI "$NP" python3 tests/gpu/torch_gpu_checks.py
      run 300 $TORCHRUN examples/tp_mlp.py --graph
      run 200 $MPI "$NP" python3 examples/tp_mlp.py --iters 50
      run 400 $TORCHRUN benchmarks/eager_host.py --calls 200 --repeats 7 --json "$OUT/eager-torchrun-${NP}x-$TAG.json" ;;
    torch-lite)  # the torch stage without the mpirun repeats: checks and the example under torchrun, eager cost
      TORCHRUN="python3 -m torch.distributed.run --standalone --nproc-per-node $NP"
      run 400 $TORCHRUN tests/gpu/torch_gpu_checks.py
      run 300 $TORCHRUN examples/tp_mlp.py --graph
      run 300 $TORCHRUN benchmarks/eager_host.py --calls 200 --repeats 7 --json "$OUT/eager-torchrun-${NP}x-$TAG.json" ;;
    variants)
      run 420 $MPI "$NP" python3 benchmarks/kernel_variants.py ${BASE_KERNELS:+--base-dir "$BASE_KERNELS"} \
        ${VARIANTS:+--variants "$VARIANTS"} ${CASES:+--only "$CASES"} --json "$OUT/variants-${NP}x-$TAG.json" ;;
    ll-ab)  # what the poison protocol costs the LL kernels (4 KB-1 MB): the shipped kernels, the LL hooks of
      # fc_profile.cuh (no start-time poison read; no end vote/fill), and BASE_KERNELS (e.g. an untracked
      # `git archive db65e49 kernels_cu`, the kernels before the protocol: timing only) in one run
      run 420 $MPI "$NP" python3 benchmarks/kernel_variants.py ${BASE_KERNELS:+--base-dir "$BASE_KERNELS"} \
        --variants "base,full,ll-no-read,ll-no-fail,ll-neither" \
        --define-sets "ll-no-read=FC_PROFILE_LL_NO_POISON_READ;ll-no-fail=FC_PROFILE_LL_NO_FAIL_PATH;ll-neither=FC_PROFILE_LL_NO_POISON_READ FC_PROFILE_LL_NO_FAIL_PATH" \
        --only "ll 4K 1shot,ll 4K 2shot,ll 1M 1shot,ll 1M 2shot,llq int4 4K,llq int4 1M" --repeats 7 \
        --json "$OUT/ll-ab-${NP}x-$TAG.json" ;;
    rot-kab)  # issue 21, rotation's price per kernel build, all in one run (kernel_variants.py --cases rot): INT8 and
      # INT6, groups 128 and 512, rotation off and on, 4 KB-256 MB at the shipped table's launches, under BASE_KERNELS
      # (e.g. an untracked `git archive <rev> kernels_cu`: the kernels before), MID_KERNELS (optional: an intermediate
      # build, label "mid"), the shipped kernels ("full") and the shipped kernels with every rotation's butterflies run
      # 3 times ("rot3", timing only: wrong results; against "full", what the rotation's arithmetic costs);
      # ROT_ROUNDS sweeps (default 2), variants in turn within each; prints rotation's price per build
      run 560 $MPI "$NP" python3 benchmarks/kernel_variants.py ${BASE_KERNELS:+--base-dir "$BASE_KERNELS"} \
        ${MID_KERNELS:+--kernel-dirs "mid=$MID_KERNELS"} --cases rot --rounds "${ROT_ROUNDS:-2}" \
        --variants "${ROT_VARIANTS:-base,mid,full,rot3}" --define-sets "rot3=FC_PROFILE_ROT_TIMES=3" --repeats 7 \
        --json "$OUT/rot-kab-${NP}x-$TAG.json" ;;
    hier-parts)  # issue 20: the hierarchical all-reduce's parts timed apart (2 GPUs as 2 nodes, NCCL on sockets)
      run 300 env FLASHCOMM_RANKS_PER_NODE=1 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 $MPI "$NP" \
        python3 benchmarks/hier_parts.py --sizes "${HIER_SIZES:-16M,64M,256M}" --bits 4,8 --json "$OUT/hier-parts-${NP}x-$TAG.json" ;;
    loopback)  # one GPU: the flash kernels at 2-8 simulated ranks against the reference, and their failure paths
      run 400 python3 -m pytest tests/gpu/test_loopback_gpu.py -q -p no:cacheprovider -rfE \
        --junitxml "$OUT/loopback.xml" ${KERNEL_DIR:+--kernel-dir "$KERNEL_DIR"} ;;
    loopback-time)  # one GPU: kernel builds timed against each other at 2 simulated ranks (loopback_time.py)
      run 300 python3 benchmarks/loopback_time.py --cases "${LOOPBACK_CASES:-ll,llq}" \
        --variants "${LOOPBACK_VARIANTS:-nofail=FC_PROFILE_LL_NO_FAIL_PATH}" ;;
    solo)  # one GPU: compute + HBM side of the kernels (kernel_solo.py), A/B against BASE_KERNELS
      run 240 python3 benchmarks/kernel_solo.py --bytes "${SOLO_BYTES:-256M,16M}" --bits "${SOLO_BITS:-4,8,none}" \
        --algo "${SOLO_ALGO:-twoshot}" --world "${SOLO_WORLD:-4}" --rotate "${SOLO_ROTATE:-off}" \
        --group-size "${SOLO_GROUP:-128}" --dtype "${SOLO_DTYPE:-float16}" --shape "${SOLO_SHAPE:-256,264,2}" --max-blocks "${SOLO_MAX_BLOCKS:-264}" --slot-kib "${SOLO_SLOT_KIB:-48}" \
        --protocol "${SOLO_PROTOCOL:-flag}" \
        ${BASE_KERNELS:+--base-dir "$BASE_KERNELS"} ${SOLO_DEFINE_SETS:+--define-sets "$SOLO_DEFINE_SETS"} ;;
    ncu)  # Nsight Compute on the solo kernel (details into the log)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      FLASHCOMM_KERNEL_LINEINFO=1 run 300 "$NCU" --clock-control none -k "regex:${NCU_KERNEL:-fc_twoshot}" -s 2 -c 1 \
        ${NCU_SECTIONS:---section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section Occupancy --section ComputeWorkloadAnalysis \
        --section InstructionStats --section SourceCounters} \
        python3 benchmarks/kernel_solo.py --iters 1 --bytes "${NCU_BYTES:-256M}" --bits "${NCU_BITS:-4}" --shape "${SOLO_SHAPE:-256,264,2}" \
        --algo "${SOLO_ALGO:-twoshot}" --world "${SOLO_WORLD:-4}" --rotate "${SOLO_ROTATE:-off}" \
        --group-size "${SOLO_GROUP:-128}" --protocol "${SOLO_PROTOCOL:-flag}" ;;
    node-solo)  # one GPU: the hierarchical path's inter-node kernels timed alone (after every fc_node.cuh change)
      run 300 python3 benchmarks/node_solo.py --sizes "${NODE_SIZES:-16M,64M,256M}" --bits "${NODE_BITS:-4,8,6,none}" \
        --rotate "${NODE_ROTATE:-both}" --json "$OUT/node-solo-$TAG.json" ;;
    ncu-rot)  # issue 21: Nsight Compute on the solo staged two-shot, rotation off and on (pipes, stalls, opcodes)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      for r in off on; do
        run 200 "$NCU" --clock-control none -k regex:fc_twoshot -s 2 -c 1 --print-details all \
          --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats \
          --section WarpStateStats --section SchedulerStats --section Occupancy \
          python3 benchmarks/kernel_solo.py --iters 1 --bytes "${NCU_BYTES:-256M}" --bits "${NCU_BITS:-6}" \
          --shape "${SOLO_SHAPE:-256,264,2}" --algo staged --world "${SOLO_WORLD:-2}" --rotate $r \
          --group-size "${SOLO_GROUP:-128}"
      done ;;
    ncu-src)  # per-SASS-instruction source counters of the solo kernel, as CSV (env NCU_KERNEL, a regex;
              # NCU_TAG names the file; NCU_BYTES, NCU_BITS and the SOLO_ ones as in ncu, SOLO_PROTOCOL ll for LL kernels)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      CSV="$OUT/ncu-source${NCU_TAG:+-$NCU_TAG}.csv"
      log "ncu source page -> $CSV"
      FLASHCOMM_KERNEL_LINEINFO=1 timeout -k 10 300 "$NCU" --clock-control none --cache-control none \
        -k "regex:${NCU_KERNEL:-fc_twoshot}" -s 2 -c 1 --section SourceCounters --section WarpStateStats \
        --page source --csv --print-source sass \
        python3 benchmarks/kernel_solo.py --iters 1 --bytes "${NCU_BYTES:-256M}" --bits "${NCU_BITS:-4}" \
        --shape "${SOLO_SHAPE:-256,264,2}" --algo "${SOLO_ALGO:-twoshot}" --world "${SOLO_WORLD:-4}" \
        --rotate "${SOLO_ROTATE:-off}" --group-size "${SOLO_GROUP:-128}" --protocol "${SOLO_PROTOCOL:-flag}" \
        > "$CSV" 2>>"$LOG"
      log "rc=$? ($(wc -l < "$CSV") lines)" ;;
    table)  # issue 19: `mpirun -n 2 flashcomm bench` as a user types it (Open MPI gives each rank an
            # 80-column pty), as a log and on a 60-column terminal; both logs checked for cut cells
            # and control codes by benchmarks/check_table_log.py (expected: "OK: 45 rows" each: 9 sizes x 5)
      FLASHCOMM=$(command -v flashcomm || echo "$FC")
      log "mpirun -n 2 flashcomm bench > $OUT/table-2x.log"
      timeout -k 10 300 env -u NO_COLOR TERM=xterm-256color mpirun -n 2 $FLASHCOMM bench > "$OUT/table-2x.log" 2>&1
      log "rc=$?"
      if command -v script >/dev/null; then
        log "the same on a 60-column terminal (script) > $OUT/table-2x-pty60.log"
        timeout -k 10 300 env -u NO_COLOR TERM=xterm-256color script -qec \
          "stty cols 60 rows 40; mpirun -n 2 $FLASHCOMM bench" "$OUT/table-2x-pty60.log" > /dev/null 2>&1
        log "rc=$?"
      fi
      run 30 python3 benchmarks/check_table_log.py "$OUT"/table-2x*.log ;;
    checks-q)  # the quick sweep of every section at NP ranks (3-8 rank runs)
      run 300 $MPI "$NP" python3 tests/gpu/gpu_checks.py --quick --large-mib 64 ;;
    checks-quick)
      run 240 $MPI "$NP" python3 tests/gpu/gpu_checks.py --quick --only codec,exact,groups ;;
    pytest|pytest-gpu)  # the GPU checks as named pytest tests (tests/multi_gpu.py) at NP ranks, one mpiexec per
      # test module.  env PYTEST_GPU: test files or node ids (default tests/gpu; all of it takes longer than one
      # device call: pick modules), PYTEST_GPU_ARGS: more options (--gpu-quick, -k EXPR, --gpu-worlds 2,3).
      # Into $OUT (few files come back): the JUnit XML, summary.json, and the launches' logs and rank records as a tarball.
      R=/tmp/flashcomm-pytest-gpu-$NP; rm -rf "$R"
      eval "PARGS=(${PYTEST_GPU_ARGS:-})"  # shell words, so -k "a or b" stays one argument
      run 560 env COLUMNS=250 python3 -m pytest ${PYTEST_GPU:-tests/gpu} -m gpu -p no:cacheprovider -rA \
        --gpu-worlds "$NP" --gpu-budget "${PYTEST_GPU_BUDGET:-480}" --gpu-results "$R" \
        --junitxml "$OUT/pytest-gpu-$NP.xml" "${PARGS[@]}"
      [ -f "$R/summary.json" ] && cp "$R/summary.json" "$OUT/pytest-gpu-$NP-summary.json"
      [ -d "$R" ] && tar -czf "$OUT/pytest-gpu-$NP-logs.tar.gz" -C "$R" . ;;
    # ---- transports (issue 17): host memory, and one GPU visible per rank (IPC through virtual-memory handles)
    host-checks)  # the full gpu_checks under the host transport
      run 540 $MPI "$NP" -x FLASHCOMM_TRANSPORT=host python3 tests/gpu/gpu_checks.py ;;
    host-transport)  # stale-read stress and virtual-memory handles beside it, then a killed rank: nothing may
      # stay in /dev/shm
      run 300 $MPI "$NP" -x FLASHCOMM_TRANSPORT=host python3 tests/gpu/transport_checks.py --expect host --vmm
      run 120 $MPI "$NP" -x FLASHCOMM_TRANSPORT=host python3 tests/gpu/transport_checks.py --expect host --kill
      run 10 bash -c 'left=$(ls /dev/shm | grep "^flashcomm-"); [ -z "$left" ] && echo "OK: nothing left in /dev/shm" || echo "FAIL: left in /dev/shm: $left"' ;;
    isolated-checks)  # one GPU visible per rank: the full checks over IPC (virtual-memory handles where legacy
      # handles cannot be opened)
      run 540 $MPI "$NP" bash -c 'CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK exec python3 tests/gpu/gpu_checks.py' ;;
    isolated-transport)  # one GPU visible per rank: stale reads over IPC, virtual-memory handles, then host memory
      run 270 $MPI "$NP" bash -c 'CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK exec python3 tests/gpu/transport_checks.py --expect ipc --vmm'
      run 270 $MPI "$NP" -x FLASHCOMM_TRANSPORT=host bash -c 'CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK exec python3 tests/gpu/transport_checks.py --expect host' ;;
    isolated-bench)  # the same bench with every GPU visible and with one GPU per rank (must be within noise)
      run 270 $MPI "$NP" $FC bench -b 4K -e 256M -f 4 --bits none,8,4,4/8 --json "$OUT/bench-visible-${NP}x-$TAG.json"
      run 270 $MPI "$NP" bash -c "CUDA_VISIBLE_DEVICES=\$OMPI_COMM_WORLD_LOCAL_RANK exec $FC bench -b 4K -e 256M -f 4 \
        --bits none,8,4,4/8 --json $OUT/bench-isolated-${NP}x-$TAG.json" ;;
    host-bench)  # the host transport against NCCL-SHM (the bench sets NCCL_P2P_DISABLE=1 for its NCCL), then
      # which NCCL transport the baseline really used (NCCL_DEBUG lines "via SHM" vs "via P2P")
      run 450 $MPI "$NP" $FC bench --transport host -b 4K -e 256M -f 4 --bits none,8,4,4/8 --eager \
        --json "$OUT/bench-host-${NP}x-$TAG.json"
      run 120 bash -c "$MPI $NP -x NCCL_DEBUG=INFO $FC bench --transport host -b 64K -e 64K --bits 4 -r 1 -n 2 -w 1 2>&1 \
        | grep -E 'via (SHM|P2P|NET)|transport host' | sort | uniq -c | head -12" ;;
    host-tune)  # host-transport rows ("N/host") into a copy of the shipped table (or the one tune made before)
      [ -f "$OUT/tuning.json" ] || cp flashcomm_cupy/tuning/default.json "$OUT/tuning.json"
      run 500 $MPI "$NP" $FC tune --transport host -o "$OUT/tuning.json"
      export FLASHCOMM_TUNING="$OUT/tuning.json" ;;
    host-model)  # the TTFT study with the host transport (NCCL-SHM baseline)
      run 500 env NP="$NP" LAYERS="${LAYERS:-80}" REPEATS="${REPEATS:-3}" EXTRA="--transport host" \
        bash benchmarks/model_sweep.sh "$OUT/model-host-${NP}x-$TAG.json" ;;
    *) log "unknown stage $stage" ;;
  esac
done
log "done"
