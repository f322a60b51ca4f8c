#!/usr/bin/env bash
# The claims grid (ablations/claims.yaml) on 2 CPU cores: two lanes side by side, one thread each, seed
# after seed. Lane A trains the 16-frame teacher (context_forcing, then cf_window on the same teacher and
# student); lane B the 4-frame one (self_forcing, infinite_rope on the same generator, longlive). Each
# variant is one `cf ablate` call, so a killed lane resumes from the stage cache when run again.
#   benchmarks/claims.sh 0 1 2                     # frame-relative positions (the grid's default)
#   ABLATION=claims_world benchmarks/claims.sh 0 1 2   # the same grid in world coordinates
#   LANE_A=cf_short,cf_no_erft LANE_B= benchmarks/claims.sh 0 1 2   # the C2/C3 remainder
#   ABLATION=teacher_curve LANE_A=t16_1k,t16_4k,t16_8k LANE_B=t4_1k,t4_4k,t4_8k benchmarks/claims.sh 0
#       # the teacher learning curve (its 2k cells are the claims grid's context_forcing and cf_short)
# Budgets are optimizer steps, set in the grid files; their minute caps are safety stops that mark a stage
# cut short in `cf tables`.
# Environment: CF (the cf command, default .venv/bin/cf), ABLATION (the grid, default claims), OUT (runs
# root, default runs), EXTRA (more key=value overrides; keep results-changing keys in a grid file, since
# the tables key rows by grid and variant), LANE_A / LANE_B (comma-separated variants).
# Logs: $OUT/claims-logs/.
set -u
CF=${CF:-.venv/bin/cf}
OUT=${OUT:-runs}
EXTRA=${EXTRA:-}
ABLATION=${ABLATION:-claims}
LANE_A=${LANE_A-context_forcing,cf_window}
LANE_B=${LANE_B-self_forcing,infinite_rope,longlive}
mkdir -p "$OUT/claims-logs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

lane() {  # lane NAME VARIANTS SEED...
    local name=$1 variants=$2
    shift 2
    [ -z "$variants" ] && return 0
    for seed in "$@"; do
        for v in ${variants//,/ }; do
            echo "$(date -u +%FT%TZ) lane $name seed $seed $v: start"
            # shellcheck disable=SC2086
            $CF ablate --ablation "$ABLATION" --variants "$v" --seed "$seed" --out "$OUT" trainer.threads=1 $EXTRA \
                > "$OUT/claims-logs/$ABLATION-$name-seed$seed-$v.log" 2>&1
            echo "$(date -u +%FT%TZ) lane $name seed $seed $v: exit $?"
        done
    done
}

lane A "$LANE_A" "$@" &
lane B "$LANE_B" "$@" &
wait
