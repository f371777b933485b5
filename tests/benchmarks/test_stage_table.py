"""benchmarks/stage_table.py's pure parts (images/s bases, measuring one command, the tables) and
benchmarks/gpu_benchmark.sh's argument handling and its refusal without a GPU. No model, no pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import precision_speed
import stage_table

REPO = Path(__file__).resolve().parents[2]
GPU_SCRIPT = REPO / "benchmarks" / "gpu_benchmark.sh"

COUNTS = {"raw": 5856, "split": 5856, "augmented": 5856, "train": 4708, "val": 524, "test": 624,
          "train_frozen_epochs": 12, "fine_tune_epochs": 3}  # fmt: skip


def stage(wall: float, images: int | None = None) -> dict:
    return {"wall_s": wall, "cpu_s": wall * 1.5, "peak_rss_mib": 900.0, "images": images,
            "images_per_s": stage_table.rate(images, wall)}  # fmt: skip


def run_result(label: str = "before", size: int = 128) -> dict:
    stages = {s: stage(10.0, stage_table.stage_images(s, COUNTS)) for s in stage_table.STAGES}
    return {
        "label": label,
        "runs": [
            {
                "recipe": "pneumoniamnist",
                "size": size,
                "counts": COUNTS,
                "stages": stages,
                "feature_pass": {"images": 5232, "seconds": 20.0, "images_per_s": 261.6},
                "probes": {
                    # a probe's rate is over its timed pass (fit_s), its wall over the whole process
                    "forward": {**stage(15.0, 4708), "fit_s": 14.0, "images_per_s": 336.3},
                    "naive_fit": {
                        **stage(30.0, 5232),
                        "fit_s": 29.0,
                        "images_per_s": 180.4,
                        "projected_frozen_phase_s": 348.0,
                    },
                },
                "total_wall_s": 70.0,
                "total_cpu_s": 105.0,
                "peak_rss_mib": 900.0,
                "test_roc_auc": 0.97712,
                "test_accuracy": 0.9,
            }
        ],
    }


def test_each_stage_divides_by_its_own_images():
    assert stage_table.stage_images("download", COUNTS) == 5856
    assert stage_table.stage_images("augment", COUNTS) == 5856
    assert stage_table.stage_images("train-frozen", COUNTS) == 4708 + 524  # the feature pass
    assert stage_table.stage_images("fine-tune", COUNTS) == 4708 * 3  # train images x epochs run
    assert stage_table.stage_images("evaluate", COUNTS) == 624
    assert stage_table.stage_images("report", COUNTS) is None
    assert stage_table.stage_images("fine-tune", {**COUNTS, "fine_tune_epochs": 0}) is None
    assert stage_table.rate(4708 * 3, 100.0) == 141.2
    assert stage_table.rate(None, 100.0) is None
    assert stage_table.rate(10, 0.0) is None


def test_every_rated_step_says_what_its_images_are():
    rated = [s for s in stage_table.STAGES if stage_table.stage_images(s, COUNTS)]
    assert set(rated) | set(stage_table.PROBES) <= set(stage_table.RATE_BASIS)


def test_image_counts_read_the_manifests_and_histories(tmp_path):
    def write(rel: str, header: str, rows: list[str]) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("\n".join([header, *rows]) + "\n")

    write("data/raw/manifest.csv", "path,label", ["a,0", "b,1", "c,1", "d,0"])
    write("data/split/manifest.csv", "path,split", ["a,train", "b,train", "c,val"])
    write("data/augmented/manifest.csv", "path,split", ["a,train", "a2,train", "b,train", "c,val", "d,test"])
    write("results/fine_tune/history.csv", "epoch,loss", ["1,0.5", "2,0.4"])
    counts = stage_table.image_counts(tmp_path)
    assert counts == {"raw": 4, "split": 3, "augmented": 5, "train": 3, "val": 1, "test": 1,
                      "train_frozen_epochs": 0, "fine_tune_epochs": 2}  # fmt: skip


def test_the_feature_pass_is_read_from_train_frozens_log(tmp_path):
    log = tmp_path / "train-frozen.log"
    log.write_text("Running stage 'train-frozen':\ntrain-frozen: 5232 feature vectors ready in 20.5s\n")
    assert stage_table.feature_pass(log) == {"images": 5232, "seconds": 20.5, "images_per_s": 255.2}
    log.write_text("feature cache reused\n")
    assert stage_table.feature_pass(log) is None


def test_measured_is_the_commands_own_memory_and_time(tmp_path):
    ballast = bytearray(400 * 2**20)  # this process is large, as a test worker holding TensorFlow is
    ballast[::4096] = b"a" * len(ballast[::4096])
    grow = "x = bytearray(300 * 2**20); x[::4096] = b'a' * len(x[::4096])"
    big = stage_table.measured([sys.executable, "-c", grow], tmp_path, dict(os.environ), tmp_path / "big.log")
    small = stage_table.measured(
        [sys.executable, "-c", "pass"], tmp_path, dict(os.environ), tmp_path / "s.log"
    )
    assert big["peak_rss_mib"] > 300 > small["peak_rss_mib"]  # neither this process's nor the largest so far
    del ballast
    assert big["wall_s"] >= 0 and big["cpu_s"] >= 0
    with pytest.raises(SystemExit, match="failed"):
        stage_table.measured([sys.executable, "-c", "raise SystemExit(4)"], tmp_path, dict(os.environ),
                             tmp_path / "fail.log")  # fmt: skip


def test_the_table_has_every_step_its_rate_and_the_summary():
    text = stage_table.tables([run_result()])
    lines = text.splitlines()
    assert lines[0].startswith("| label | recipe | px | total wall s")
    assert (
        "| before | pneumoniamnist | 128 | 70.0 | 105.0 | 900.0 | 0.977 | 261.6 | 336.3 | 180.4 | 348.0 |"
        in lines
    )
    assert "| before | pneumoniamnist | 128 | fine-tune | 10.0 | 15.0 | 14124 | 1412.4 | 900.0 |" in lines
    assert "| before | pneumoniamnist | 128 | report | 10.0 | 15.0 | - | - | 900.0 |" in lines
    assert any(
        line.startswith("| before | pneumoniamnist | 128 | (a) raw backbone forward |") for line in lines
    )
    assert any(line.startswith("| before | pneumoniamnist | 128 | (b) plain Keras fit") for line in lines)
    assert "fine-tune: train images x epochs run" in text
    for block in text.split("\n\n")[:2]:  # each table's rows as wide as its header
        assert len({line.count("|") for line in block.splitlines()}) == 1


def test_several_results_merge_into_one_table_and_precision_results_follow(tmp_path, capsys):
    precision = {"size": 128, "batch": 32, "variants": {"float32": {"forward_images_per_s": 334.0,
                 "train_images_per_s": 31.0}, "mixed_float16_xla": {"error": "no GPU"}}}  # fmt: skip
    paths = []
    for name, result in (("before", run_result("before")), ("after", run_result("after")), ("p", precision)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result))
    assert stage_table.main(["--table", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert out.count("| label | recipe | px | total wall s") == 1
    assert "| before | pneumoniamnist | 128 | 70.0" in out and "| after | pneumoniamnist | 128 | 70.0" in out
    assert "| float32 | 334.0 | 31.0 |" in out
    assert "| mixed_float16_xla | - | no GPU |" in out


def test_a_run_needs_a_recipe_and_well_formed_sets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        stage_table.main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        stage_table.main(["--recipe", "pneumoniamnist", "--set", "fine_tune.epochs"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_precision_speed_keeps_its_cpu_variants_and_knows_float16():
    assert precision_speed.CPU_VARIANTS == [
        "float32", "mixed_bfloat16", "onednn_bf16_math", "float32_xla", "mixed_bfloat16_xla"
    ]  # fmt: skip
    assert precision_speed.VARIANTS["mixed_float16"]["policy"] == "mixed_float16"
    assert precision_speed.VARIANTS["mixed_float16_xla"]["jit"] is True


def gpu_script(tmp_path: Path, *args: str, smi: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """The GPU script with ``nvidia-smi`` replaced: absent (None) or a fake printing ``smi``."""
    fake = tmp_path / "nvidia-smi"
    if smi is not None:
        fake.write_text(f"#!/bin/sh\nprintf '%s\\n' '{smi}'\n")
        fake.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    environ.update(NVIDIA_SMI=str(fake), **env)
    return subprocess.run(["bash", str(GPU_SCRIPT), *args], env=environ, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


GPU = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"


@pytest.mark.parametrize(
    ("smi", "env"),
    [
        (None, {}),
        ("No devices were found", {}),
        (GPU, {"CUDA_VISIBLE_DEVICES": ""}),
        (GPU, {"CUDA_VISIBLE_DEVICES": "-1"}),
    ],
    ids=["no-driver", "no-device", "hidden", "hidden-minus-one"],
)
def test_the_gpu_script_refuses_without_a_gpu_before_anything_else(tmp_path, smi, env):
    venv = tmp_path / "venv"
    done = gpu_script(tmp_path, "--venv", str(venv), smi=smi, **env)
    assert done.returncode == 3
    assert "no GPU" in done.stderr and "nothing was measured" in done.stderr
    assert not venv.exists()


def test_the_gpu_script_runs_the_stage_table_in_mixed_float16_mirrored_and_each_precision(tmp_path):
    venv = tmp_path / "venv"
    done = gpu_script(tmp_path, "--dry-run", "--venv", str(venv), "--sizes", "128 224", "--label", "after",
                      "--set", "fine_tune.unfreeze_blocks=3", smi=GPU)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not venv.exists()  # a dry run runs nothing
    lines = done.stdout.splitlines()
    table = next(line for line in lines if "stage_table.py --recipe" in line)
    for option in ("--recipe pneumoniamnist --recipe kermany --size 128 --size 224",
                   "train_frozen.mixed_precision=auto", "fine_tune.mixed_precision=auto",
                   "train_frozen.distribution=mirrored", "fine_tune.distribution=mirrored",
                   "--set fine_tune.unfreeze_blocks=3", "--label after",
                   "--out benchmarks/results/after_stage_table.json"):  # fmt: skip
        assert option in table
    speeds = [line for line in lines if "precision_speed.py" in line]
    assert len(speeds) == 2
    assert all("--variants float32 mixed_float16 float32_xla mixed_float16_xla" in line for line in speeds)
    assert any("tensorflow\\[and-cuda\\]==" in line for line in lines)
    assert "stage_table.py --table benchmarks/results/after_stage_table.json" in lines[-1]


@pytest.mark.parametrize(("args", "code"), [(["--help"], 0), (["--bogus"], 2), (["--sizes", "big"], 2)])
def test_the_gpu_script_checks_its_arguments(tmp_path, args, code):
    done = gpu_script(tmp_path, *args, smi=GPU)
    assert done.returncode == code
    if code == 0:
        assert "bash benchmarks/gpu_benchmark.sh" in done.stdout
