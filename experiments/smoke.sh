#!/usr/bin/env bash
# Every preset at the smallest scale, end to end on digits: teachers, deit_table3, teacher_comparison, tau_lambda and
# transfer (from a student trained here). One epoch per trial, one seed: it checks that the presets run, not results.
#   bash experiments/smoke.sh [WORKDIR]        (about 10 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")"
W=$(realpath -m "${1:-smoke-work}")
D=${DEITLAB:-deitlab}
quick=(--set experiment.optim.epochs=1 --set 'seeds=[0]' --workdir "$W")
$D teacher train teacher_convnet.yaml teacher_vit.yaml --set optim.epochs=2 --workdir "$W"
$D teacher train teacher_convnet.yaml --set name=digits-convnet-32 --set data.img_size=32 --set optim.epochs=2 \
   --workdir "$W"
$D sweep run deit_table3.yaml "${quick[@]}"
$D sweep run teacher_comparison.yaml "${quick[@]}"
$D sweep run tau_lambda.yaml "${quick[@]}"
run_id=$($D train digits_student.yaml --set distillation.mode=none --set optim.epochs=1 --workdir "$W" \
         | sed -n 's/.*(MLflow run \([0-9a-f]*\)).*/\1/p')
$D sweep run transfer.yaml "${quick[@]}" --set "experiment.init_from=runs:/$run_id"
for sweep in deit-table3 teacher-comparison tau-lambda transfer; do
  $D report "$sweep" --workdir "$W"
done
