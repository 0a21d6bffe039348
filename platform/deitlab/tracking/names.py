"""Every run, tag and metric name deitlab records, in one place (the MLflow UI groups and filters by them).
"""
from __future__ import annotations

SWEEP_TAG = "deitlab.sweep"


KIND_TAG = "deitlab.kind"  # sweep | trial | teacher | train


TEACHER_ACC_TAG = "deitlab.accuracy"


PARENT_TAG = "mlflow.parentRunId"


MAX_PARAM_LENGTH = 6000


EPOCH_METRIC = "epoch"  # logged with every epoch's metrics: its history says which epochs MLflow has


RESUMED_FROM_TAG = "deitlab.resumed_from"


RESUMES_TAG = "deitlab.resumes"


DIVERGED_TAG = "deitlab.diverged"  # why a run stopped early: its loss became NaN/Inf


STOPPED_TAG = "deitlab.stopped_early"  # why a sweep's scheduler (ASHA) stopped a trial


LAST_FAILURE_TAG = "deitlab.last_failure"  # the last worker failure (rank and error), or why a trial's process died


WORKER_FAILURES_TAG = "deitlab.worker_failures"  # how many times the workers failed and restarted


WORKER_NODES_TAG = "deitlab.worker_nodes"  # each rank's Ray node


TRIAL_ID_TAG = "deitlab.trial_id"


TEACHER_ROLE_TAG = "deitlab.teacher_role"  # distillation | reference (agreement only)


PACK_TAG = "deitlab.pack"  # the pack (one Ray Train run) a trial trained in


PACK_SIZE_TAG = "deitlab.pack_size"


TEACHER_TAG = "deitlab.teacher"  # the teacher's label (a sweep's teacher name), or "none" (no distillation)


REFERENCE_TEACHER_TAG = "deitlab.reference_teacher"  # a `none` run's teacher: agreement is measured against it


MODEL_URI_TAG = "deitlab.model_uri"  # a teacher run's registered version


MODE_TAG = "deitlab.mode"


STUDENT_TAG = "deitlab.student"


TOKEN_TAG = "deitlab.token"  # whether the student has the distillation token


TEACHER_ARCH_TAG = "deitlab.teacher_arch"


TEACHER_GFLOPS_TAG = "deitlab.teacher_gflops"


BEST_EPOCH_TAG = "deitlab.best_epoch"  # the epoch of the run's best model


BEST_MODEL_URI_TAG = "deitlab.best_model_uri"  # models:/m-…: the run's best student as an MLflow logged model


DRIVER_TAG = "deitlab.driver"  # host:pid of the process running the sweep (what `sweep stop` signals)


TUNE_RUN_TAG = "deitlab.tune_run"  # the Tune experiment directory (under the run storage) of a sweep's latest start


JOB_TAG = "deitlab.ray_job_id"


SPEC_HASH_TAG = "deitlab.spec_hash"


TRIALS_TAG = "deitlab.trials"


TRIAL_NAMES_TAG = "deitlab.trial_names"  # a sweep parent's trial naming scheme (absent: the first, tokenTrue/False)


EXTENSIONS_TAG = "deitlab.extensions"


def best_metric_tag(metric: str) -> str:
    """The tag of the best value of `metric` (beside BEST_EPOCH_TAG)."""
    return f"deitlab.best_{metric}"


TEACHER_FAMILY_TAG = "deitlab.teacher_family"  # convnet | transformer: what the UI groups teachers by


TEACHER_SHA_TAG = "deitlab.teacher_sha256"  # SHA-256 of the file the teacher's weights came from
# The teacher-logit cache (core/teacher_cache.py), per run: what served its teacher batches, "read 40 of 40 batches"
TEACHER_CACHE_TAG = "deitlab.teacher_cache"
TEACHER_CACHE_KEY_TAG = "deitlab.teacher_cache.key"
TEACHER_CACHE_CHECKS_TAG = "deitlab.teacher_cache.checked"  # cached passes checked live on their first batch
TEACHER_FORWARDS_TAG = "deitlab.teacher_forwards"  # batches the teacher computed (0: all came from the cache)


GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: the UI shows it on the run page


GIT_ENV = "DEITLAB_GIT_COMMIT"  # set by `sweep submit`: a job's working_dir has no .git
