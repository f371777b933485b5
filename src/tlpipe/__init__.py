"""tlpipe: a reproducible transfer-learning pipeline for image classification."""

import os

# Defaults a user can still override from the environment: TensorFlow's C++ start-up
# chatter buries the stages' own progress lines, and albumentations would otherwise
# ask PyPI for updates on every import, which offline runs must not wait on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
