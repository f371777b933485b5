"""DVC stage `augment`: resized and albumentations-augmented images plus a manifest."""

import sys

from tlpipe.data.augmentation import augment_dataset
from tlpipe.stage_runner import stage_main

if __name__ == "__main__":
    sys.exit(
        stage_main(
            "augment",
            ["images", "split"],
            ["out"],
            lambda p, a: augment_dataset(a.images, a.split, p.augment, a.out),
        )
    )
