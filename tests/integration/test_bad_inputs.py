"""The bad-input catalogue: realistic mistakes, each given to the real `deitlab` command in a folder of its own.

Every one must end in exactly one `error: …` line on stderr (nothing on stdout), exit code 2, no traceback, and leave
everything as it was: the folder's files (names, sizes, modification times), the S3 bucket's objects, no Ray job.
The cases below are the source of docs/bad-inputs.md; a test checks that the table there lists exactly these.
After changing a case, rewrite the table: `.venv/bin/python tests/integration/test_bad_inputs.py`.

Placeholders in arguments, files, environment and expected lines: {dir} is the case's folder (the command's working
directory), {s3} the moto S3 endpoint (host:port), {port} a local port nothing listens on, {busy} one that a program
listens on.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DEITLAB = Path(sys.executable).parent / "deitlab"
DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md"
CATEGORIES = ("spec", "CLI option", "storage URI", "credentials", "cluster address", "cluster resources",
              "corrupt image", "corrupt checkpoint")
BUCKET = "bad-inputs"
PARALLEL = 3  # subprocesses at once: most cases wait on Python imports, not on each other
TIMEOUT_S = 120

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    did: str  # what the user did, as the docs table says it
    args: tuple[str, ...]  # deitlab's arguments
    expect: str  # how the line on stderr starts
    files: dict[str, str] = field(default_factory=dict)  # written into the case's folder first; "@name": an asset
    env: dict[str, str | None] = field(default_factory=dict)  # None: removed from the environment
    secret: str | None = None  # text the command was given that must not be printed back
    cwd: str = ""  # where in the case's folder the command runs


# ------------------------------------------------------------------------------------------------------ the specs
STUDENT = "student: {patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}\n"
EXP = "name: e\n" + STUDENT + "distillation: {mode: none}\noptim: {epochs: 1}\n"
DISTIL = "name: e\n" + STUDENT + "teacher: {checkpoint: t.pt}\noptim: {epochs: 1}\n"  # + distillation: …
SWEEP = "name: s\nexperiment: exp.yaml\ngrid: {optim.lr: [0.001, 0.002]}\n"
FOLDER = "name: e\n" + STUDENT + "distillation: {mode: none}\ndata: {dataset: imagefolder, path: imgs, img_size: 16}\n"
AWS_FILES = {"aws/credentials": "[default]\naws_access_key_id = AKIAEXAMPLEKEY000000\n"
                                "aws_secret_access_key = example/secret/key/000000000000000000\n"}
# moto takes any key; both are set here so that a case can take one away
S3 = {"AWS_ENDPOINT_URL": "http://{s3}", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY000000",
      "AWS_SECRET_ACCESS_KEY": "example/secret/key/000000000000000000"}

PRETRAINED = "name: e\n" + STUDENT + "teacher: TEACHER\ndistillation: {mode: hard}\noptim: {epochs: 1}\n"
EMPTY_HUB = {"HF_HOME": "{dir}/hf", "HF_HUB_OFFLINE": "1"}  # a hub cache of the case's own ("@hub": one model)
URI_TEACHER = "name: e\n" + STUDENT + "teacher: {uri: 'URI'}\ndistillation: {mode: hard}\noptim: {epochs: 1}\n"
RAY_JOB_DIR = "session/runtime_resources/working_dir_files/_ray_pkg_0a1b2c3d"  # where Ray unpacks a job's working_dir

CASES = [
    # -------------------------------------------------------------------------------------------------- specs
    Case("spec-unknown-field", "spec", "`deitlab check exp.yaml` with a misspelt key: `temprature: 3`",
         ("check", "exp.yaml"), "error: exp.yaml: distillation.temprature: unknown field",
         {"exp.yaml": "name: e\ndistillation: {mode: none, temprature: 3}\n"}),
    Case("spec-wrong-type", "spec", "`deitlab train exp.yaml` with `optim: {epochs: ten}`",
         ("train", "exp.yaml"),
         "error: exp.yaml: optim.epochs: Input should be a valid integer, unable to parse string as an integer (got "
         "'ten')",
         {"exp.yaml": EXP.replace("epochs: 1", "epochs: ten")}),
    Case("spec-tau-zero", "spec", "`deitlab train exp.yaml` with `distillation: {mode: soft, tau: 0}`",
         ("train", "exp.yaml"),
         "error: exp.yaml: distillation.tau: Input should be greater than 0 (got 0)",
         {"exp.yaml": DISTIL + "distillation: {mode: soft, tau: 0}\n"}),
    Case("spec-lambda-above-one", "spec", "`deitlab train exp.yaml` with `distillation: {mode: hard, lambda: 1.5}`",
         ("train", "exp.yaml"),
         "error: exp.yaml: distillation.lambda: Input should be less than or equal to 1 (got 1.5)",
         {"exp.yaml": DISTIL + "distillation: {mode: hard, lambda: 1.5}\n"}),
    Case("spec-hard-without-teacher", "spec", "`deitlab train exp.yaml` with `mode: hard` and no `teacher:` section",
         ("train", "exp.yaml"), "error: exp.yaml: distillation mode 'hard' needs a 'teacher' section",
         {"exp.yaml": EXP.replace("mode: none", "mode: hard")}),
    Case("spec-unknown-mode", "spec", "`deitlab check exp.yaml` with `distillation: {mode: medium}`",
         ("check", "exp.yaml"),
         "error: exp.yaml: distillation.mode: Input should be 'none', 'soft' or 'hard' (got 'medium')",
         {"exp.yaml": "distillation: {mode: medium}\n"}),
    Case("spec-patch-does-not-tile", "spec", "`deitlab train exp.yaml` with `student: {patch_size: 5}` at 16 px",
         ("train", "exp.yaml"),
         "error: exp.yaml: student image size 16 is not a multiple of its patch size 5 (set student.patch_size)",
         {"exp.yaml": EXP.replace("patch_size: 4", "patch_size: 5")}),
    Case("spec-malformed-yaml", "spec", "`deitlab train exp.yaml` with an unclosed `{`",
         ("train", "exp.yaml"),
         "error: exp.yaml: malformed YAML at line 3, column 1: expected ',' or '}', but got '<stream end>' (while "
         "parsing a flow mapping)",
         {"exp.yaml": "name: e\ndistillation: {mode: hard\n"}),
    Case("spec-tab-indent", "spec", "`deitlab train exp.yaml` indented with a tab",
         ("train", "exp.yaml"),
         "error: exp.yaml: malformed YAML at line 3, column 1: found character '\\t' that cannot start any token "
         "(while scanning for the next token)",
         {"exp.yaml": "name: e\ndistillation:\n\tmode: none\n"}),
    Case("spec-empty-file", "spec", "`deitlab train exp.yaml` on an empty file",
         ("train", "exp.yaml"), "error: exp.yaml: the spec is empty", {"exp.yaml": ""}),
    Case("spec-missing-file", "spec", "`deitlab train exp.yml` (the file is `exp.yaml`)",
         ("train", "exp.yml"), "error: exp.yml: no such spec file", {"exp.yaml": EXP}),
    Case("spec-directory", "spec", "`deitlab train experiments` (a folder)",
         ("train", "experiments"), "error: experiments: a folder, not a spec file",
         {"experiments/exp.yaml": EXP}),
    Case("spec-sweep-given-to-train", "spec", "`deitlab train sweep.yaml` (a sweep spec)",
         ("train", "sweep.yaml"),
         "error: sweep.yaml: a sweep spec (it has 'grid'), not an experiment spec; use `deitlab sweep run` (or "
         "`deitlab check --kind sweep`)", {"sweep.yaml": SWEEP, "exp.yaml": EXP}),
    Case("spec-sweep-unknown-grid-key", "spec", "`deitlab sweep run sweep.yaml` with `grid: {distillation.temperature:"
                                                " [1, 4]}`",
         ("sweep", "run", "sweep.yaml"), "error: sweep.yaml: grid: distillation.temperature: unknown field",
         {"sweep.yaml": SWEEP.replace("optim.lr: [0.001, 0.002]", "distillation.temperature: [1, 4]"),
          "exp.yaml": EXP}),
    Case("spec-sweep-unknown-teacher", "spec", "`deitlab sweep plan sweep.yaml` whose grid names teacher `vit`, not"
                                               " in `teachers:`",
         ("sweep", "plan", "sweep.yaml"), "error: sweep.yaml: teacher 'vit' is not in 'teachers' (convnet)",
         {"sweep.yaml": SWEEP.replace("grid: {optim.lr: [0.001, 0.002]}",
                                      "teachers: {convnet: {checkpoint: t.pt}}\ngrid: {teacher: [convnet, vit],"
                                      " distillation.mode: [hard]}"), "exp.yaml": EXP}),
    Case("spec-unknown-timm-model", "spec", "`deitlab train exp.yaml` with `teacher: {arch: resnet_50x, pretrained:"
                                            " true}` (no such timm model)",
         ("train", "exp.yaml"), "error: exp.yaml: teacher.arch: unknown timm model 'resnet_50x' (see timm.list_models())",
         {"exp.yaml": PRETRAINED.replace("TEACHER", "{arch: resnet_50x, pretrained: true}")}),
    Case("spec-no-pretrained-weights", "spec", "`deitlab train exp.yaml` with `teacher: {arch: test_resnet.nosuch,"
                                               " pretrained: true}` (a tag timm has no weights for)",
         ("train", "exp.yaml"), "error: exp.yaml: teacher: timm has no pretrained weights named 'test_resnet.nosuch';"
                                " its pretrained tags: test_resnet.r160_in1k",
         {"exp.yaml": PRETRAINED.replace("TEACHER", "{arch: test_resnet.nosuch, pretrained: true}")}),
    Case("spec-pretrained-and-checkpoint", "spec", "`deitlab train exp.yaml` with `teacher: {arch: …, pretrained: true,"
                                                   " checkpoint: t.pt}`",
         ("train", "exp.yaml"), "error: exp.yaml: teacher: 'pretrained: true' takes its weights from timm; it cannot be"
                                " combined with 'checkpoint' (give one source)",
         {"exp.yaml": PRETRAINED.replace("TEACHER", "{arch: test_resnet.r160_in1k, pretrained: true, checkpoint: t.pt}")}),
    Case("spec-pretrained-not-cached", "spec", "`deitlab train exp.yaml` with a pretrained teacher whose weights are"
                                               " not in the Hugging Face cache, offline",
         ("train", "exp.yaml"), "error: teacher: model 'test_resnet.r160_in1k': its pretrained weights are neither in"
                                " the Hugging Face cache ({dir}/hf) nor reachable (LocalEntryNotFoundError); run"
                                " `deitlab teacher import test_resnet.r160_in1k` where the hub is reachable and name"
                                " the registered model, or set HF_HOME to a cache that holds them",
         {"exp.yaml": PRETRAINED.replace("TEACHER", "{arch: test_resnet.r160_in1k, pretrained: true}")}, env=EMPTY_HUB),
    Case("spec-teacher-classes-differ", "spec", "`deitlab train exp.yaml` with a pretrained 1000-class teacher"
                                                " (cached) on the 10 digits",
         ("train", "exp.yaml"), "error: teacher: 'test_resnet.r160_in1k' predicts 1000 classes, the data set has 10:"
                                " fine-tune it on this data first (`deitlab teacher train` with arch:"
                                " test_resnet.r160_in1k, pretrained: true) and distil from that",
         {"exp.yaml": PRETRAINED.replace("TEACHER", "{arch: test_resnet.r160_in1k, pretrained: true}"), "hf": "@hub"},
         env=EMPTY_HUB),
    Case("spec-repeated-aug-zero", "spec", "`deitlab train exp.yaml` with `data: {repeated_aug: 0}`",
         ("train", "exp.yaml"), "error: exp.yaml: data.repeated_aug: Input should be greater than or equal to 1 (got 0)",
         {"exp.yaml": EXP + "data: {repeated_aug: 0}\n"}),
    Case("cli-import-unknown-model", "CLI option", "`deitlab teacher import resnet_50x.a1 --name r50`",
         ("teacher", "import", "resnet_50x.a1", "--name", "r50"),
         "error: resnet_50x.a1: arch: unknown timm model 'resnet_50x' (see timm.list_models())", env=EMPTY_HUB),
    # -------------------------------------------------------------------------------------------- CLI options
    Case("cli-set-without-equals", "CLI option", "`deitlab train exp.yaml --set distillation.tau`",
         ("train", "exp.yaml", "--set", "distillation.tau"),
         "error: --set 'distillation.tau': expected KEY=VALUE, e.g. distillation.tau=3", {"exp.yaml": EXP}),
    Case("cli-set-bad-yaml", "CLI option", "`deitlab sweep plan sweep.yaml --set 'seeds=[0,1'`",
         ("sweep", "plan", "sweep.yaml", "--set", "seeds=[0,1"),
         "error: --set 'seeds=[0,1': value is not valid YAML (line 1, column 5: expected ',' or ']', but got '<stream "
         "end>' (while parsing a flow sequence))", {"sweep.yaml": SWEEP, "exp.yaml": EXP}),
    Case("cli-set-into-a-value", "CLI option", "`deitlab train exp.yaml --set optim.epochs.max=3`",
         ("train", "exp.yaml", "--set", "optim.epochs.max=3"),
         "error: --set optim.epochs.max: 'epochs' is a value, not a section", {"exp.yaml": EXP}),
    Case("cli-unknown-format", "CLI option", "`deitlab report my-sweep --format xml`",
         ("report", "my-sweep", "--format", "xml"), "error: --format 'xml': expected table, json or html"),
    Case("cli-unknown-kind", "CLI option", "`deitlab check exp.yaml --kind sweeps`",
         ("check", "exp.yaml", "--kind", "sweeps"), "error: --kind 'sweeps': expected one of experiment, sweep,"
                                                    " teacher", {"exp.yaml": EXP}),
    Case("cli-run-id-without-resume", "CLI option", "`deitlab train exp.yaml --run-id 0a1b2c` (no `--resume`)",
         ("train", "exp.yaml", "--run-id", "0a1b2c"), "error: --run-id is only used with --resume",
         {"exp.yaml": EXP}),
    Case("cli-unknown-option", "CLI option", "`deitlab train exp.yaml --worker 2`",
         ("train", "exp.yaml", "--worker", "2"),
         "error: No such option: --worker (Possible options: --workdir, --workers); see `deitlab train --help`",
         {"exp.yaml": EXP}),
    Case("cli-not-a-number", "CLI option", "`deitlab train exp.yaml --workers two`",
         ("train", "exp.yaml", "--workers", "two"),
         "error: Invalid value for '--workers': Input should be a valid integer, unable to parse string as an "
         "integer; see `deitlab train --help`", {"exp.yaml": EXP}),
    Case("cli-zero-workers", "CLI option", "`deitlab train exp.yaml --workers 0`",
         ("train", "exp.yaml", "--workers", "0"),
         "error: exp.yaml: run.workers: Input should be greater than 0 (got 0)",
         {"exp.yaml": EXP}),
    Case("cli-missing-argument", "CLI option", "`deitlab data pack imgs` (no destination)",
         ("data", "pack", "imgs"), "error: Missing argument 'dest'; see `deitlab data pack --help`",
         {"imgs": "@imagefolder"}),
    Case("cli-zero-shard-rows", "CLI option", "`deitlab data pack imgs packed --shard-rows 0`",
         ("data", "pack", "imgs", "packed", "--shard-rows", "0"),
         "error: --shard-rows and row groups must be at least 1 (got 0, 32)", {"imgs": "@imagefolder"}),
    # ------------------------------------------------------------------------------------------- storage URIs
    Case("storage-s3-without-bucket", "storage URI", "`deitlab train exp.yaml --set run.storage=s3://`",
         ("train", "exp.yaml", "--set", "run.storage=s3://"),
         "error: run.storage 's3://': no bucket; expected s3://bucket/prefix", {"exp.yaml": EXP}),
    Case("storage-unknown-scheme", "storage URI", "`deitlab train exp.yaml --set run.storage=gs://team/ckpt`",
         ("train", "exp.yaml", "--set", "run.storage=gs://team/ckpt"),
         "error: run.storage 'gs://team/ckpt': expected a local path or s3://bucket/prefix", {"exp.yaml": EXP}),
    Case("storage-no-such-bucket", "storage URI", "`deitlab train exp.yaml` with `run.storage: s3://no-such-bucket/"
                                                  "ckpt` (the bucket was never created)",
         ("train", "exp.yaml", "--set", "run.storage=s3://no-such-bucket/ckpt"),
         "error: run.storage 's3://no-such-bucket/ckpt': bucket 'no-such-bucket' does not exist", {"exp.yaml": EXP},
         env=S3),
    Case("storage-is-a-file", "storage URI", "`deitlab train exp.yaml --set run.storage=notes.txt` (a file)",
         ("train", "exp.yaml", "--set", "run.storage=notes.txt"),
         "error: run.storage '{dir}/notes.txt': exists and is not a folder", {"exp.yaml": EXP, "notes.txt": "x\n"}),
    Case("storage-artifacts-scheme", "storage URI", "`deitlab train exp.yaml --set run.artifacts=ftp://nas/mlflow`",
         ("train", "exp.yaml", "--set", "run.artifacts=ftp://nas/mlflow"),
         "error: exp.yaml: run.artifacts: 'ftp://nas/mlflow': expected s3://bucket/prefix or a"
         " directory", {"exp.yaml": EXP}),
    Case("storage-pack-without-bucket", "storage URI", "`deitlab data pack imgs s3:///packs`",
         ("data", "pack", "imgs", "s3:///packs"),
         "error: pack destination 's3:///packs': no bucket; expected s3://bucket/prefix", {"imgs": "@imagefolder"}),
    Case("storage-pack-no-such-bucket", "storage URI", "`deitlab data pack imgs s3://no-such-bucket/packs`",
         ("data", "pack", "imgs", "s3://no-such-bucket/packs"),
         "error: pack destination 's3://no-such-bucket/packs': bucket 'no-such-bucket' does not exist",
         {"imgs": "@imagefolder"}, env=S3),
    Case("storage-pack-unknown-scheme", "storage URI", "`deitlab data pack imgs gs://team/packs`",
         ("data", "pack", "imgs", "gs://team/packs"),
         "error: pack destination 'gs://team/packs': expected a local path or s3://bucket/prefix",
         {"imgs": "@imagefolder"}),
    Case("storage-pack-inside-source", "storage URI", "`deitlab data pack imgs imgs/packed`",
         ("data", "pack", "imgs", "imgs/packed"), "error: pack destination 'imgs/packed': inside the source folder",
         {"imgs": "@imagefolder"}),
    Case("storage-parquet-not-a-pack", "storage URI", "`deitlab train exp.yaml` with `data: {dataset: parquet, path:"
                                                      " imgs}` (an image folder, not a pack)",
         ("train", "exp.yaml"),
         "error: exp.yaml: data: parquet path '{dir}/imgs' has no meta.json (not a pack, or its packing did not "
         "finish)",
         {"exp.yaml": EXP + "data: {dataset: parquet, path: imgs}\n", "imgs": "@imagefolder"}),
    # -------------------------------------------------------------------------------------------- credentials
    Case("credentials-key-without-secret", "credentials", "`deitlab data pack imgs s3://bad-inputs/packs` with"
                                                          " `AWS_ACCESS_KEY_ID` set, `AWS_SECRET_ACCESS_KEY` not",
         ("data", "pack", "imgs", "s3://bad-inputs/packs"),
         "error: pack destination 's3://bad-inputs/packs': AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not; "
         "set both, or neither to use a profile or an instance role",
         {"imgs": "@imagefolder"}, env={**S3, "AWS_SECRET_ACCESS_KEY": None}),
    Case("credentials-secret-without-key", "credentials", "`deitlab train exp.yaml` with `run.storage: s3://bad-inputs/"
                                                          "ckpt`, `AWS_SECRET_ACCESS_KEY` set, `AWS_ACCESS_KEY_ID` not",
         ("train", "exp.yaml", "--set", "run.storage=s3://bad-inputs/ckpt"),
         "error: run.storage 's3://bad-inputs/ckpt': AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not; set "
         "both, or neither to use a profile or an instance role",
         {"exp.yaml": EXP}, env={**S3, "AWS_ACCESS_KEY_ID": None}),
    Case("credentials-unknown-profile", "credentials", "`AWS_PROFILE=reserach deitlab data pack imgs"
                                                       " s3://bad-inputs/packs` (a misspelt profile)",
         ("data", "pack", "imgs", "s3://bad-inputs/packs"),
         "error: pack destination 's3://bad-inputs/packs': AWS_PROFILE 'reserach' is in neither"
         " {dir}/aws/credentials nor {dir}/aws/config", {"imgs": "@imagefolder", **AWS_FILES},
         env={**S3, "AWS_PROFILE": "reserach", "AWS_SHARED_CREDENTIALS_FILE": "{dir}/aws/credentials",
              "AWS_CONFIG_FILE": "{dir}/aws/config"}),
    Case("credentials-in-storage-uri", "credentials", "`deitlab train exp.yaml` with `run.storage: s3://KEY:SECRET@"
                                                      "bucket/ckpt`",
         ("train", "exp.yaml", "--set", "run.storage=s3://AKIAEXAMPLEKEY000000:hunter2secret@team/ckpt"),
         "error: exp.yaml: run.storage: credentials do not belong in run.storage; set AWS_ACCESS_KEY_ID /"
         " AWS_SECRET_ACCESS_KEY (or a profile) in the environment", {"exp.yaml": EXP}, secret="hunter2secret"),
    Case("credentials-in-storage-query", "credentials", "`deitlab train exp.yaml` with `run.storage: s3://team/ckpt?"
                                                        "access_key=…&secret_key=…`",
         ("train", "exp.yaml", "--set", "run.storage=s3://team/ckpt?access_key=AKIAEXAMPLE&secret_key=hunter2secret"),
         "error: exp.yaml: run.storage: credentials do not belong in run.storage; set AWS_ACCESS_KEY_ID / "
         "AWS_SECRET_ACCESS_KEY (or a profile) in the environment", {"exp.yaml": EXP},
         secret="hunter2secret"),
    Case("credentials-in-pack-destination", "credentials", "`deitlab data pack imgs s3://KEY:SECRET@bucket/packs`",
         ("data", "pack", "imgs", "s3://AKIAEXAMPLEKEY000000:hunter2secret@bad-inputs/packs"),
         "error: pack destination: credentials do not belong in the URI; set AWS_ACCESS_KEY_ID /"
         " AWS_SECRET_ACCESS_KEY (or a profile) in the environment", {"imgs": "@imagefolder"},
         secret="hunter2secret"),
    Case("credentials-in-tracking-uri", "credentials", "`deitlab train exp.yaml` with `run.tracking_uri: http://alice:"
                                                       "PASSWORD@mlflow.internal:5000`",
         ("train", "exp.yaml", "--set", "run.tracking_uri=http://alice:hunter2secret@mlflow.internal:5000"),
         "error: exp.yaml: run.tracking_uri: credentials do not belong in the tracking URI; set "
         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment",
         {"exp.yaml": EXP}, secret="hunter2secret"),
    Case("credentials-token-in-tracking-option", "credentials", "`deitlab report my-sweep --tracking-uri"
                                                                " 'https://mlflow.internal/?token=…'`",
         ("report", "my-sweep", "--tracking-uri", "https://mlflow.internal/?token=hunter2secret"),
         "error: --tracking-uri: credentials do not belong in the tracking URI; set MLFLOW_TRACKING_USERNAME and "
         "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment", secret="hunter2secret"),
    Case("storage-workdir-in-ray-job-dir", "storage URI", "`ray job submit --working-dir . -- deitlab train exp.yaml"
                                                         " --workdir work`: a relative work directory, inside the"
                                                         " job's temporary copy of `.`",
         ("train", "exp.yaml", "--workdir", "work"),
         "error: the MLflow store would be kept in {dir}/" + RAY_JOB_DIR + "/work/mlflow.db, inside this Ray job's"
         " temporary working_dir, which Ray deletes: give an absolute --workdir outside it (or run.tracking_uri and"
         " run.storage)", {RAY_JOB_DIR + "/exp.yaml": EXP}, cwd=RAY_JOB_DIR),
    Case("storage-workdir-pseudo-fs", "storage URI", "`deitlab train exp.yaml --workdir /proc/deitlab` (a pseudo"
                                                     " file system, where even root cannot make folders)",
         ("train", "exp.yaml", "--workdir", "/proc/deitlab"),
         "error: the work directory (--workdir) '/proc/deitlab': cannot create folders in '/proc' (", {"exp.yaml": EXP}),
    Case("storage-teacher-cache-read-only", "storage URI", "`deitlab train exp.yaml --set"
                                                          " run.teacher_cache.storage=/proc/cache` (a place no run"
                                                          " can write its cache)",
         ("train", "exp.yaml", "--set", "run.teacher_cache.storage=/proc/cache"),
         "error: run.teacher_cache.storage '/proc/cache': cannot create folders in '/proc' (", {"exp.yaml": EXP}),
    Case("storage-teacher-cache-unreachable", "storage URI", "`deitlab sweep run sweep.yaml --set"
                                                             " experiment.run.teacher_cache.storage=s3://bad-inputs/"
                                                             "cache` with `AWS_ENDPOINT_URL` where nothing listens",
         ("sweep", "run", "sweep.yaml", "--set", "experiment.run.teacher_cache.storage=s3://bad-inputs/cache"),
         "error: run.teacher_cache.storage 's3://bad-inputs/cache': ", {"exp.yaml": EXP, "sweep.yaml": SWEEP},
         env={**S3, "AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"}),
    Case("cli-teacher-cache-rm-unknown-key", "CLI option", "`deitlab teacher cache rm 0123abcd` (a key that is not"
                                                           " there) in a work directory whose cache holds none",
         ("teacher", "cache", "rm", "0123abcd", "--storage", "cache"),
         "error: no teacher cache key '0123abcd' at cache (keys there: none)", {"cache/teacher_cache/.keep": ""}),
    Case("cli-teacher-cache-rm-nothing", "CLI option", "`deitlab teacher cache rm` with neither a key nor"
                                                       " `--older-than`",
         ("teacher", "cache", "rm", "--storage", "cache"), "error: give a KEY or --older-than DAYS (one of them)",
         {"cache/teacher_cache/.keep": ""}),
    Case("cli-teacher-cache-negative-age", "CLI option", "`deitlab teacher cache rm --older-than -3`",
         ("teacher", "cache", "rm", "--older-than", "-3", "--storage", "cache"),
         "error: --older-than -3: expected a number of days >= 0", {"cache/teacher_cache/.keep": ""}),
    Case("cli-teacher-cache-no-workdir", "CLI option", "`deitlab teacher cache list --workdir elsewhere` (no such"
                                                       " work directory)",
         ("teacher", "cache", "list", "--workdir", "elsewhere"),
         "error: no teacher cache in 'elsewhere': it has no ray_results/ folder; give --workdir or --storage"),
    Case("spec-teacher-unknown-registered-model", "spec", "`deitlab train exp.yaml` whose `teacher.uri` is"
                                                          " `models:/no-such-teacher/1`, in a work directory whose"
                                                          " store has other models",
         ("train", "exp.yaml"),
         "error: teacher URI 'models:/no-such-teacher/1': Registered Model with name=no-such-teacher not found",
         {"exp.yaml": URI_TEACHER.replace("URI", "models:/no-such-teacher/1"), "deitlab-work": "@store"}),
    Case("spec-teacher-model-without-store", "spec", "`deitlab train exp.yaml` whose `teacher.uri` is"
                                                     " `models:/digits-convnet/1`, in a folder where nothing was"
                                                     " recorded yet",
         ("train", "exp.yaml"),
         "error: teacher: no MLflow store at {dir}/deitlab-work/mlflow.db yet (nothing was recorded there): give the"
         " --workdir or run.tracking_uri where the model or run was recorded",
         {"exp.yaml": URI_TEACHER.replace("URI", "models:/digits-convnet/1")}),
    Case("ui-no-store", "CLI option", "`deitlab ui --workdir nowhere`, a folder where nothing was recorded",
         ("ui", "--workdir", "nowhere"), "error: no MLflow store at {dir}/nowhere/mlflow.db (give --workdir or"
                                         " --tracking-uri)"),
    Case("ui-workdir-and-tracking-uri", "CLI option", "`deitlab ui --workdir w --tracking-uri http://…` (two stores)",
         ("ui", "--workdir", "w", "--tracking-uri", "http://127.0.0.1:{port}"),
         "error: give --workdir or --tracking-uri, not both"),
    Case("ui-port-in-use", "CLI option", "`deitlab ui --port P` where another program listens on P",
         ("ui", "--port", "{busy}"), "error: --port {busy}: something already listens there; choose another port",
         {"deitlab-work": "@store"}),
    Case("ui-no-sweep-yet", "CLI option", "`deitlab ui` on a store that holds teachers but no sweep",
         ("ui",), "error: no sweep in the MLflow store at sqlite:///{dir}/deitlab-work/mlflow.db: run one (`deitlab"
                  " sweep run`) or name one that is there", {"deitlab-work": "@store"}),
    Case("ui-unknown-sweep", "CLI option", "`deitlab ui my-sweep` on a store without that sweep",
         ("ui", "my-sweep"), "error: no sweep 'my-sweep' in the MLflow store at sqlite:///{dir}/deitlab-work/"
                             "mlflow.db", {"deitlab-work": "@store"}),
    Case("spec-init-from-unknown-run", "spec", "`deitlab train exp.yaml` with `init_from: runs:/0123456789abcdef`, a"
                                               " run the work directory's store does not have",
         ("train", "exp.yaml"),
         "error: init_from 'runs:/0123456789abcdef': no MLflow run '0123456789abcdef' at 'sqlite:///{dir}/deitlab-work/"
         "mlflow.db'", {"exp.yaml": EXP + "init_from: runs:/0123456789abcdef\n", "deitlab-work": "@store"}),
    # --------------------------------------------------------------------------------------- cluster resources
    Case("resources-too-many-workers", "cluster resources", "`deitlab train exp.yaml --workers 4096` on a local Ray"
                                                            " (this machine's cores)",
         ("train", "exp.yaml", "--workers", "4096"),
         "error: run: 4096 worker(s) × 1 CPU can never start on the Ray cluster", {"exp.yaml": EXP}),
    Case("resources-too-many-cpus", "cluster resources", "`deitlab train exp.yaml --set run.cpus_per_worker=4096`",
         ("train", "exp.yaml", "--set", "run.cpus_per_worker=4096"),
         "error: run: 1 worker(s) × 4096 CPU can never start: no node of the Ray cluster", {"exp.yaml": EXP}),
    Case("resources-too-many-gpus", "cluster resources", "`deitlab train exp.yaml --set run.gpus_per_worker=4096`",
         ("train", "exp.yaml", "--set", "run.gpus_per_worker=4096"),
         "error: run: 1 worker(s) × 1 CPU + 4096 GPU can never start: no node of the Ray cluster", {"exp.yaml": EXP}),
    # ----------------------------------------------------------------------------------------- cluster address
    Case("cluster-tracking-server-unreachable", "cluster address", "`deitlab train exp.yaml --set"
                                                                " run.tracking_uri=http://127.0.0.1:PORT` (no server)",
         ("train", "exp.yaml", "--set", "run.tracking_uri=http://127.0.0.1:{port}"),
         "error: MLflow at http://127.0.0.1:{port}: cannot reach the tracking server", {"exp.yaml": EXP}),
    Case("cluster-submit-without-scheme", "cluster address", "`deitlab sweep submit sweep.yaml --address head:8265`",
         ("sweep", "submit", "sweep.yaml", "--address", "head:8265"),
         "error: --address 'head:8265': expected the Ray dashboard's URL, e.g. http://HEAD:8265",
         {"sweep.yaml": SWEEP, "exp.yaml": EXP}),
    Case("cluster-submit-bad-port", "cluster address", "`deitlab sweep submit sweep.yaml --address http://head:82a5`",
         ("sweep", "submit", "sweep.yaml", "--address", "http://head:82a5"),
         "error: --address 'http://head:82a5': the port is not a number from 1 to 65535",
         {"sweep.yaml": SWEEP, "exp.yaml": EXP}),
    Case("cluster-submit-unreachable", "cluster address", "`deitlab sweep submit sweep.yaml --address"
                                                          " http://127.0.0.1:PORT` (no cluster there)",
         ("sweep", "submit", "sweep.yaml", "--address", "http://127.0.0.1:{port}"),
         "error: --address 'http://127.0.0.1:{port}': cannot reach a Ray cluster there",
         {"sweep.yaml": SWEEP, "exp.yaml": EXP}),
    Case("cluster-stop-without-scheme", "cluster address", "`deitlab sweep stop my-sweep --address 10.0.0.5:8265`",
         ("sweep", "stop", "my-sweep", "--address", "10.0.0.5:8265"),
         "error: --address '10.0.0.5:8265': expected the Ray dashboard's URL, e.g. http://HEAD:8265"),
    Case("cluster-dashboard-as-ray-address", "cluster address", "`deitlab train exp.yaml --ray-address"
                                                                " http://head:8265` (the dashboard's URL)",
         ("train", "exp.yaml", "--ray-address", "http://head:8265"),
         "error: --ray-address 'http://head:8265': that is a dashboard URL (for `sweep submit --address`); give the"
         " cluster's GCS address, HEAD:6379, or ray://HEAD:10001", {"exp.yaml": EXP}),
    Case("cluster-ray-address-malformed", "cluster address", "`deitlab train exp.yaml --ray-address head:63790x`",
         ("train", "exp.yaml", "--ray-address", "head:63790x"),
         "error: --ray-address 'head:63790x': expected HEAD:PORT (the GCS, e.g. 10.0.0.5:6379) or ray://HEAD:10001",
         {"exp.yaml": EXP}),
    Case("cluster-ray-address-unreachable", "cluster address", "`deitlab train exp.yaml --ray-address"
                                                               " 127.0.0.1:PORT` (no cluster there)",
         ("train", "exp.yaml", "--ray-address", "127.0.0.1:{port}"),
         "error: --ray-address '127.0.0.1:{port}': no Ray cluster answers there", {"exp.yaml": EXP}),
    Case("cluster-ray-address-env", "cluster address", "`RAY_ADDRESS=127.0.0.1:PORT deitlab sweep run sweep.yaml`"
                                                       " (a stale `RAY_ADDRESS`)",
         ("sweep", "run", "sweep.yaml"), "error: RAY_ADDRESS '127.0.0.1:{port}': no Ray cluster answers there",
         {"sweep.yaml": SWEEP, "exp.yaml": EXP}, env={"RAY_ADDRESS": "127.0.0.1:{port}"}),
    # ------------------------------------------------------------------------------------------ corrupt images
    Case("image-pack-truncated-jpeg", "corrupt image", "`deitlab data pack imgs packed` with a truncated JPEG",
         ("data", "pack", "imgs", "packed"),
         "error: pack source 'imgs': 1 file(s) do not decode, e.g. train/b/2.jpg (",
         {"imgs": "@imagefolder", "imgs/train/b/2.jpg": "@truncated.jpg"}),
    Case("image-pack-web-page", "corrupt image", "`deitlab data pack imgs packed` where one `.jpg` is an HTML page",
         ("data", "pack", "imgs", "packed"),
         "error: pack source 'imgs': 1 file(s) do not decode, e.g. val/a/1.jpg (cannot identify image file",
         {"imgs": "@imagefolder", "imgs/val/a/1.jpg": "<html><body>403 Forbidden</body></html>\n"}),
    Case("image-pack-empty-class", "corrupt image", "`deitlab data pack imgs packed` with a class folder of no images",
         ("data", "pack", "imgs", "packed"),
         "error: pack source 'imgs': class folder(s) without images: val/c",
         {"imgs": "@imagefolder", "imgs/train/c/0.jpg": "@good.jpg", "imgs/val/c/readme.txt": "todo\n"}),
    Case("image-train-truncated-jpeg", "corrupt image", "`deitlab train exp.yaml` on `dataset: imagefolder` with a"
                                                        " truncated JPEG",
         ("train", "exp.yaml"), "error: imagefolder '{dir}/imgs': 1 file(s) do not decode, e.g. train/b/2.jpg (",
         {"exp.yaml": FOLDER, "imgs": "@imagefolder", "imgs/train/b/2.jpg": "@truncated.jpg"}),
    Case("image-sweep-empty-file", "corrupt image", "`deitlab sweep run sweep.yaml` on an image folder with a 0-byte"
                                                    " JPEG",
         ("sweep", "run", "sweep.yaml"),
         "error: imagefolder '{dir}/imgs': 1 file(s) do not decode, e.g. val/b/0.jpg (cannot identify image file",
         {"sweep.yaml": SWEEP, "exp.yaml": FOLDER, "imgs": "@imagefolder", "imgs/val/b/0.jpg": ""}),
    Case("image-train-no-val", "corrupt image", "`deitlab train exp.yaml` on an image folder without `val/`",
         ("train", "exp.yaml"), "error: exp.yaml: data: imagefolder path '{dir}/imgs' has no 'val/' folder",
         {"exp.yaml": FOLDER, "imgs/train/a/0.jpg": "@good.jpg"}),
    # ------------------------------------------------------------------------------------- corrupt checkpoints
    Case("checkpoint-teacher-truncated", "corrupt checkpoint", "`deitlab train exp.yaml` whose `teacher.checkpoint`"
                                                               " is cut off half way",
         ("train", "exp.yaml"),
         "error: teacher: {dir}/t.pt: not a readable model checkpoint (truncated: its zip directory is missing)",
         {"exp.yaml": DISTIL + "distillation: {mode: hard}\n", "t.pt": "@truncated.pt"}),
    Case("checkpoint-teacher-not-torch", "corrupt checkpoint", "`deitlab train exp.yaml` whose `teacher.checkpoint`"
                                                               " is a text file",
         ("train", "exp.yaml"),
         "error: teacher: {dir}/t.pt: not a readable model checkpoint (not a file torch.save wrote)",
         {"exp.yaml": DISTIL + "distillation: {mode: hard}\n", "t.pt": "version https://git-lfs.github.com/spec/v1\n"}),
    Case("checkpoint-teacher-missing", "corrupt checkpoint", "`deitlab train exp.yaml` whose `teacher.checkpoint`"
                                                             " does not exist",
         ("train", "exp.yaml"),
         "error: teacher: {dir}/t.pt: no such model checkpoint",
         {"exp.yaml": DISTIL + "distillation: {mode: hard}\n"}),
    Case("checkpoint-teacher-wrong-arch", "corrupt checkpoint", "`deitlab train exp.yaml` with `teacher: {arch:"
                                                                " resnet18, checkpoint: t.pt}`; t.pt holds test_resnet",
         ("train", "exp.yaml"),
         "error: teacher: {dir}/t.pt: checkpoint holds 'test_resnet', the spec asks for 'resnet18'",
         {"exp.yaml": DISTIL.replace("{checkpoint", "{arch: resnet18, checkpoint") + "distillation: {mode: hard}\n",
          "t.pt": "@teacher.pt"}),
    Case("checkpoint-teacher-wrong-classes", "corrupt checkpoint", "`deitlab train exp.yaml` on 5-class RGB data with"
                                                                   " a teacher trained on digits",
         ("train", "exp.yaml"),
         "error: teacher: {dir}/t.pt: teacher has 10 classes and 1 input channels, the data set has 5 and 3",
         {"exp.yaml": DISTIL + "distillation: {mode: hard}\ndata: {dataset: synthetic, synthetic_classes: 5}\n",
          "t.pt": "@teacher.pt"}),
    Case("checkpoint-sweep-teacher-truncated", "corrupt checkpoint", "`deitlab sweep run sweep.yaml` whose teacher"
                                                                     " `convnet` is a truncated file",
         ("sweep", "run", "sweep.yaml"),
         "error: teacher 'convnet': {dir}/t.pt: not a readable model checkpoint (truncated: its zip directory is "
         "missing)",
         {"sweep.yaml": SWEEP.replace("grid: {optim.lr: [0.001, 0.002]}",
                                      "teachers: {convnet: {checkpoint: t.pt}}\ngrid: {teacher: [convnet],"
                                      " distillation.mode: [soft, hard]}"),
          "exp.yaml": EXP, "t.pt": "@truncated.pt"}),
    Case("checkpoint-init-truncated", "corrupt checkpoint", "`deitlab train exp.yaml` with `init_from: student.pt`,"
                                                            " cut off half way",
         ("train", "exp.yaml"),
         "error: init_from {dir}/student.pt: not a readable checkpoint (truncated: its zip directory is missing)",
         {"exp.yaml": EXP + "init_from: student.pt\n", "student.pt": "@truncated.pt"}),
    Case("checkpoint-init-from-teacher", "corrupt checkpoint", "`deitlab train exp.yaml` with `init_from: t.pt`, a"
                                                               " convnet teacher's model file",
         ("train", "exp.yaml"),
         "error: init_from {dir}/t.pt: a 'test_resnet' model file without a ViT's patch and position embeddings,"
         " not a DeiT student's weights", {"exp.yaml": EXP + "init_from: t.pt\n", "t.pt": "@teacher.pt"}),
    Case("checkpoint-init-missing", "corrupt checkpoint", "`deitlab train exp.yaml` with `init_from: runs/best.pt`"
                                                          " that does not exist",
         ("train", "exp.yaml"), "error: exp.yaml: init_from: no checkpoint at '{dir}/runs/best.pt'",
         {"exp.yaml": EXP + "init_from: runs/best.pt\n"}),
    Case("checkpoint-init-empty-folder", "corrupt checkpoint", "`deitlab train exp.yaml` with `init_from: ckpt`, a"
                                                               " folder without a model file",
         ("train", "exp.yaml"),
         "error: init_from {dir}/ckpt: expected one .pt model file in the directory, found 0",
         {"exp.yaml": EXP + "init_from: ckpt\n", "ckpt/.keep": ""}),
]


# ----------------------------------------------------------------------------------------------------- running
def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under root: (kind, size, mtime) — a file or folder made, grown or touched shows."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        entries[str(path.relative_to(root))] = (path.is_dir(), 0 if path.is_dir() else info.st_size, info.st_mtime_ns)
    return entries


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The files cases are made of: a real image folder, a teacher's model file, and broken copies of both."""
    import io

    import torch
    from deitlab.core.models import build_classifier, write_model_file
    from PIL import Image

    root = tmp_path_factory.mktemp("assets")
    folder = root / "imagefolder"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (40 * i, 90 if label == "a" else 10, 10)).save(folder / split / label
                                                                                           / f"{i}.jpg")
    good = (folder / "train" / "a" / "0.jpg").read_bytes()
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, "JPEG")  # large enough that half of it lacks scan data
    torch.manual_seed(0)
    teacher = write_model_file(root / "teacher.pt", build_classifier("test_resnet", {}, 10, 1).state_dict(),
                               arch="test_resnet", model_kwargs={}, num_classes=10, in_chans=1)
    from hub import HubCache

    HubCache(root / "hub").add("test_resnet.r160_in1k")  # pretrained weights for 1000 classes
    _store_with_a_model(root / "store", teacher)
    files = {"good.jpg": good, "truncated.jpg": out.getvalue()[: len(out.getvalue()) // 2],
             "truncated.pt": teacher.read_bytes()[: teacher.stat().st_size // 2]}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {"imagefolder": folder, "teacher.pt": teacher, "hub": root / "hub", "store": root / "store",
            **{name: root / name for name in files}}


def _store_with_a_model(workdir: Path, model_file: Path) -> None:
    """A work directory as deitlab leaves it: an MLflow store with one registered teacher, `other-teacher`."""
    from deitlab.spec.schema import RunSpec
    from deitlab.tracking.store import Tracking

    tracking = Tracking.for_run(RunSpec(workdir=str(workdir)))
    tracking.experiment_id()
    run_id = tracking.start_run("teacher-other")
    model = tracking.log_model(run_id, [model_file], "teacher")
    tracking.register_teacher(run_id, model, "other-teacher", 0.5)
    tracking.end_run(run_id)


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    from conftest import s3_client

    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="existing/readme.txt", Body=b"already here\n")
    return client


def _s3_state(client) -> dict[str, str]:
    return {f"{b['Name']}/{o['Key']}": o["ETag"] for b in client.list_buckets()["Buckets"]
            for o in client.list_objects_v2(Bucket=b["Name"]).get("Contents", [])}


def _prepare(case: Case, folder: Path, assets: dict[str, Path], values: dict[str, str]) -> None:
    import shutil

    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content.startswith("@"):
            source = assets[content[1:]]
            if source.is_dir():
                shutil.copytree(source, path, dirs_exist_ok=True)
            else:
                shutil.copyfile(source, path)
        else:
            path.write_text(_fill(content, values), encoding="utf-8")


def _run(case: Case, folder: Path, values: dict[str, str]) -> list[str]:
    """Run one case; the list of what went wrong (empty: it behaved)."""
    # this machine's own cluster and AWS settings stay out: each case sets what it is about
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "PYTEST_", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL",
                                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"))}
    env.update(NO_COLOR="1", TERM="dumb", COLUMNS="160")
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = _fill(value, values)
    before = _tree(folder)
    time.sleep(0.01)  # a write right after the snapshot still gets a later mtime
    started = time.monotonic()
    try:
        result = subprocess.run([str(DEITLAB), *(_fill(a, values) for a in case.args)], cwd=folder / case.cwd, env=env,
                                capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [f"still running after {TIMEOUT_S} s"]
    took = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    expected = _fill(case.expect, values)
    problems = []
    if result.returncode != 2:
        problems.append(f"exit code {result.returncode}, not 2")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, not 1")
    elif not lines[0].startswith(expected):
        problems.append(f"the line does not start with {expected!r}")
    if result.stdout:
        problems.append(f"printed on stdout: {result.stdout[:300]!r}")
    if "Traceback" in result.stdout + result.stderr:
        problems.append("a traceback")
    if case.secret and case.secret in result.stdout + result.stderr:
        problems.append("printed the secret it was given")
    changed = sorted(set(before.items()) ^ set(_tree(folder).items()))
    if changed:
        problems.append(f"changed files: {sorted({name for name, _ in changed})}")
    if problems:
        problems.append(f"stderr: {result.stderr[-1500:]!r} ({took:.1f} s)")
    return problems




def test_every_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, assets, bucket, s3_endpoint):
    import socket

    from conftest import free_port

    with socket.socket() as busy:  # a port another program listens on, for as long as the cases run
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"s3": s3_endpoint, "port": str(free_port()), "busy": str(busy.getsockname()[1])}
        folders = {}
        for case in CASES:
            folders[case.id] = tmp_path / case.id
            folders[case.id].mkdir()
            _prepare(case, folders[case.id], assets, {**values, "dir": str(folders[case.id])})
        s3_before = _s3_state(bucket)
        with ThreadPoolExecutor(PARALLEL) as pool:
            outcomes = dict(zip((c.id for c in CASES), pool.map(
                lambda c: _run(c, folders[c.id], {**values, "dir": str(folders[c.id])}), CASES)))
        failed = {case_id: problems for case_id, problems in outcomes.items() if problems}
        report = "\n".join(f"{case_id}: " + "; ".join(problems) for case_id, problems in failed.items())
        assert not failed, f"{len(failed)} of {len(CASES)} bad inputs misbehaved:\n{report}"
        assert _s3_state(bucket) == s3_before, "a case wrote to S3"


# ---------------------------------------------------------------------------------------------------- the table
HEADER = ("| id | category | what the user did | what deitlab prints (start of the line) |\n"
          "|---|---|---|---|")


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _uncode(cell: str) -> str:
    cell = cell.strip()
    if cell.startswith("`` ") and cell.endswith(" ``"):
        cell = cell[3:-3]
    elif cell.startswith("`") and cell.endswith("`"):
        cell = cell[1:-1]
    return cell.replace("\\|", "|")


def table() -> str:
    """The docs table of CASES, one row per case."""
    rows = [f"| {c.id} | {c.category} | {c.did.replace('|', chr(92) + '|')} | {_code(c.expect)} |" for c in CASES]
    return "\n".join([HEADER, *rows])


def _documented() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| ") or line.startswith(("| id ", "|---")):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append((cells[0], cells[1], cells[2].replace("\\|", "|"), _uncode(cells[3])))
    return rows


def test_the_docs_table_lists_exactly_these_cases():
    documented = _documented()
    assert [r[0] for r in documented] == [c.id for c in CASES], "ids differ: regenerate the table (see the docstring)"
    assert documented == [(c.id, c.category, c.did, c.expect) for c in CASES]
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    per_category = {k: sum(c.category == k for c in CASES) for k in CATEGORIES}
    assert set(c.category for c in CASES) == set(CATEGORIES) and min(per_category.values()) >= 3, per_category


if __name__ == "__main__":  # rewrite the docs table from CASES, keeping the text above it
    text = DOC.read_text(encoding="utf-8")
    DOC.write_text(text[:text.index(HEADER.splitlines()[0])] + table() + "\n", encoding="utf-8")
