"""The images the guard is measured against, built offline, and the separation figures."""

from __future__ import annotations

import numpy as np
import pytest

from tlpipe.evaluate.ood import FAR_PHOTO_CROPS, FAR_SHAPES, far_images, near_images, separation


def test_far_images_are_photograph_crops_and_shapes_at_the_models_size():
    images = far_images(48, seed=0)
    assert images.shape == (2 * FAR_PHOTO_CROPS + FAR_SHAPES, 48, 48, 3)
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 255
    assert len({image.tobytes() for image in images}) == len(images)  # no two alike
    np.testing.assert_array_equal(far_images(48, seed=0), images)  # seeded


def test_near_images_are_the_test_images_inverted_and_turned():
    test = np.zeros((2, 4, 4, 3), dtype=np.float32)
    test[:, 0, :, :] = 200  # a bright top row
    near = near_images(test)
    assert near.shape == test.shape
    assert (near[:, :, 0, :] == 55).all()  # the top row is now the left column, inverted
    assert (near[:, :, 1:, :] == 255).all()


def test_separation_reports_auroc_and_the_flagged_share():
    figures = separation(np.array([1.0, 2.0, 3.0]), np.array([2.5, 4.0, 5.0, 6.0]), cutoff=3.5)
    assert figures["n"] == 4 and figures["flagged"] == 0.75
    assert figures["auroc"] == pytest.approx(11 / 12)  # one pair out of order: (3.0, 2.5)
