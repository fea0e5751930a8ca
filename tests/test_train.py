"""The training models (small AlexNet, ResNet-20: shapes, parameter counts, shortcuts), the
tensorization plans of ``lotus_rt.train`` and ``lotus-rt train`` / ``cp-stability`` end to end on
tiny runs (subprocesses: MNIST subset and synthetic CIFAR-10 files)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import describe, run_python
from lotus_rt import train
from lotus_rt.nn.models import BasicBlock, resnet20, small_alexnet


def test_resnet20_shapes_parameters_and_shortcuts():
    model = resnet20(3)
    assert sum(p.numel() for p in model.parameters()) == 272_474  # 0.27M, He et al.'s ResNet-20 + 2 projections
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet20(1, num_classes=7)(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    projections = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(projections) == 2 and all(b.shortcut[0].kernel_size == (1, 1) for b in projections)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 21 and sum(c.kernel_size == (3, 3) for c in convs) == 19  # 6n + 1 with n = 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21


def test_small_alexnet_moved_and_the_demo_still_uses_it():
    from lotus_rt import demo
    assert demo.small_alexnet is small_alexnet
    assert sum(p.numel() for p in small_alexnet().parameters()) == 861_898
    assert small_alexnet(3, image_size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of 4"):
        small_alexnet(image_size=30)


def test_plans_of_each_mode():
    alex = small_alexnet()
    assert train.plan("alexnet", alex, "none") == []
    group = train.plan("alexnet", alex, "group")
    assert [(s.layers, s.format) for s in group] == [(["0", "3", "6"], "tucker"), (["9", "11"], "tt")]
    assert train.plan("alexnet", alex, "model", "cp", [0.1])[0].layers == ["0", "3", "6", "9", "11"]
    res = resnet20(1)
    steps = train.plan("resnet20", res, "group")
    assert [len(s.layers) for s in steps[:3]] == [6, 5, 5] and steps[-1].kind == "layer"
    assert len(train.plan("resnet20", res, "model")[0].layers) == 22
    with pytest.raises(ValueError, match="takes 1 or 4 ranks"):
        train.plan("resnet20", res, "group", ranks=[0.1, 0.2])
    with pytest.raises(ValueError, match="tensorize='whole' is not valid"):
        train.plan("alexnet", alex, "whole")
    assert train.parse_rank("0.1") == 0.1 and train.parse_rank("8") == 8 and train.parse_rank("2,8,8") == (2, 8, 8)
    with pytest.raises(ValueError, match="rank 'x'"):
        train.parse_rank("x")
    assert {"adam", "sgd"} <= set(train.OPTIMIZERS)


CLI = "import sys; from lotus_rt.cli import main; sys.exit(main(sys.argv[1:]))"


def test_lotus_rt_train_whole_resnet20_as_one_network_on_synthetic_cifar10(tmp_path):
    from lotus_rt.data.cifar10 import write_synthetic
    write_synthetic(tmp_path / "data" / "cifar-10-batches-py", per_batch=8)
    out = tmp_path / "out"
    proc = run_python(CLI, args=["train", "--model", "resnet20", "--data", "cifar10", "--tensorize", "model",
                                 "--epochs", "1", "--batch", "16", "--optimizer", "sgd", "--rank", "0.1",
                                 "--out", str(out)], env={"LOTUS_DATA_DIR": str(tmp_path / "data")}, timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert "dense epoch 1/1: loss" in proc.stdout and "model-tensorized + offloaded epoch 1/1" in proc.stdout
    report = json.loads((out / "resnet20_cifar10_model.json").read_text())
    assert report["config"]["train_images"] == 40 and report["config"]["optimizer"] == "sgd"
    assert [p["name"] for p in report["phases"]] == ["dense (torch)", "model-tensorized + offloaded", "dense (torch), 2 epochs"]
    assert all(len(p["epochs"]) == 1 for p in report["phases"]) and report["epoch_time_ratio_side_by_side"] > 0
    assert len(report["groups"]) == 1 and len(report["groups"][0]["layers"]) == 22  # 21 convolutions + fc
    assert report["compression"] > 3
    assert (out / "resnet20_cifar10_model.png").stat().st_size > 1000


def test_lotus_rt_train_errors_are_one_line_before_training(tmp_path, monkeypatch, capsys):
    from lotus_rt.cli import main
    monkeypatch.setenv("GOMP_SPINCOUNT", "30000")  # main() would set it in this process otherwise
    monkeypatch.delenv("LOTUS_DATA_DIR", raising=False)
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr()
    assert "CIFAR-10 not found" in err.err and str(tmp_path / "none") in err.err and "epoch" not in err.out
    assert main(["train", "--model", "resnet20", "--tensorize", "group", "--rank", "0.1", "--rank", "0.2"]) == 2
    err = capsys.readouterr()
    assert "takes 1 or 4 ranks" in err.err and "epoch" not in err.out
    assert main(["cp-stability", "--layer", "9"]) == 2  # a Linear: refused before any training
    assert "is not a Conv2d" in capsys.readouterr().err
    assert main(["train", "--model", "alexnet", "--tensorize", "group", "--optimizer", "dmrg"]) == 2
    err = capsys.readouterr()
    assert "--optimizer dmrg sweeps TT layers" in err.err and "epoch" not in err.out


def test_lotus_rt_train_fine_tunes_alexnet_by_dmrg_sweeps_over_its_tt_layer(tmp_path):
    out = tmp_path / "out"
    proc = run_python(CLI, args=["train", "--model", "alexnet", "--tensorize", "layer", "--optimizer", "dmrg",
                                 "--epochs", "1", "--batch", "32", "--train-size", "256", "--test-size", "64",
                                 "--out", str(out)], timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert "optimizer dmrg lr 0.05 (dense epochs: adam lr 0.001)" in proc.stdout
    report = json.loads((out / "alexnet_mnist_layer.json").read_text())
    config = report["config"]
    assert (config["optimizer"], config["dense_optimizer"], config["lr"]) == ("dmrg", "adam", 0.05)
    tuned = report["phases"][1]
    assert tuned["name"] == "layer-tensorized + offloaded" and len(tuned["epochs"]) == 1
    assert np.isfinite(tuned["epochs"][0]["loss"])
    assert report["dmrg"]["bond_updates"] == 256 // 32                 # one bond update per step
    (ranks,) = report["dmrg"]["tt_ranks"].values()
    assert ranks[0] == ranks[-1] == 1 and len(ranks) == 4
