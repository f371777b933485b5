"""medmnist_catalog: the published MedMNIST table, its URLs and MD5s, and the datasets it refuses."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from tlpipe.core.errors import PipelineError
from tlpipe.data.medmnist_catalog import DATASETS, medmnist_url


def test_url_and_md5_for_pneumoniamnist():
    assert medmnist_url("pneumoniamnist", 28) == (
        "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        "28209eda62fecd6e6a2d98b1501bb15f",
    )
    assert medmnist_url("pneumoniamnist", 224) == (
        "https://zenodo.org/records/10519652/files/pneumoniamnist_224.npz?download=1",
        "d6a3c71de1b945ea11211b03746c1fe1",
    )


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(PipelineError, match="unknown MedMNIST dataset 'pneumonia'") as err:
        medmnist_url("pneumonia", 28)
    assert "pneumoniamnist" in str(err.value) and "dermamnist" in str(err.value)


def test_unknown_size_is_refused(monkeypatch):
    with pytest.raises(PipelineError, match="has no size 32"):
        medmnist_url("pneumoniamnist", 32)
    only_28 = replace(DATASETS["dermamnist"], md5={28: DATASETS["dermamnist"].md5[28]})
    monkeypatch.setitem(DATASETS, "dermamnist", only_28)
    with pytest.raises(PipelineError, match="dermamnist has no size 224; available: 28"):
        medmnist_url("dermamnist", 224)


def test_multi_label_dataset_is_refused():
    with pytest.raises(PipelineError, match="multi-label"):
        medmnist_url("chestmnist", 28)


def test_table_is_well_formed():
    md5s = [md5 for info in DATASETS.values() for md5 in info.md5.values()]
    assert all(re.fullmatch(r"[0-9a-f]{32}", md5) for md5 in md5s)
    assert len(set(md5s)) == len(md5s)  # a copy-paste slip would repeat one
    for name, info in DATASETS.items():
        assert set(info.md5) <= {28, 64, 128, 224}, name
        assert len(set(info.labels)) == len(info.labels) >= 2, name
        assert not any("/" in label for label in info.labels), name  # labels become folder names
    assert DATASETS["pneumoniamnist"].labels == ("normal", "pneumonia")
    assert len(DATASETS["pathmnist"].labels) == 9 and len(DATASETS["organamnist"].labels) == 11
