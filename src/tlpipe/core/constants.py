"""Names shared across packages: the splits and the MLflow tags tlpipe writes and reads.

A tag written by one package and read by another is spelled once, here; renaming
one means renaming it in MLflow stores that already hold runs, so they stay put.
"""

from __future__ import annotations

# the splits, in the order stages and reports list them
TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)

# where a user's own data lives, each dataset tracked by DVC (`dvc add`): the download stage
# declares this folder as a dependency, so a change to any input reruns it
SOURCES_DIR = "data/sources"

# MLflow tags on stage runs (core.tracking)
STAGE_TAG = "tlpipe.stage"
ROLE_TAG = "tlpipe.role"  # "pipeline" on the parent run of one dvc repro
EXECUTION_TAG = "tlpipe.execution"
DVC_EXPERIMENT_TAG = "tlpipe.dvc_experiment"  # the DVC experiment's name, on its pipeline run
PARAMS_DIGEST_TAG = "tlpipe.params_digest"
DATA_DIGEST_TAG = "tlpipe.data_digest"
GIT_COMMIT_TAG = "tlpipe.git_commit"
GIT_DIRTY_TAG = "tlpipe.git_dirty"
INPUT_TAG_PREFIX = "tlpipe.input."  # + path: the input's digest
OUTPUT_TAG_PREFIX = "tlpipe.output."  # + path: the output's digest
INPUT_RUN_TAG_PREFIX = "tlpipe.input_run."  # + path: the run that produced that input
CACHED_TAG_PREFIX = "tlpipe.cached."  # + stage, on the parent: the run whose outputs DVC reused

# on evaluate runs
WEIGHTS_TAG = "tlpipe.weights"  # train_frozen.weights: "none" marks a from-scratch baseline
MODEL_DIGEST_TAG = "tlpipe.model_digest"  # also on registered model versions
LOGGED_MODEL_TAG = "tlpipe.logged_model_id"  # the raw-image pyfunc model the run logged

# on registered model versions and promote runs (ops.registry)
METRIC_TAG_PREFIX = "tlpipe.metric."  # + metric name
DECISION_TAG = "tlpipe.decision"
CHALLENGER_VERSION_TAG = "tlpipe.challenger_version"
