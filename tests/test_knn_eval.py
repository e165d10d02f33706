"""kNN evaluation: the vote on known features, and knn_eval.py against the monitor of a real run."""
import subprocess
import sys

import torch
import torch.nn.functional as F

import knn_eval
import train
from model.evaluate import knn_top1, topk_correct

TINY = ["--loader", "torch", "--image-size", "8", "--small-stem", "--dim", "128", "--pred-dim", "32", "-b", "50", "--no-progress", "-j", "0"]


def one_hot_set(n, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return F.one_hot(labels, classes).float(), labels


def test_knn_on_one_hot_label_features_is_perfect_and_on_shuffled_labels_chance():
    bank, bank_labels = one_hot_set(3000, seed=0)
    query, query_labels = one_hot_set(2000, seed=1)
    assert knn_top1(bank, bank_labels, query, query_labels, k=200, temperature=0.1) == 100.0
    shuffled = query_labels[torch.randperm(len(query_labels), generator=torch.Generator().manual_seed(2))]
    acc = knn_top1(bank, bank_labels, query, shuffled, k=200, temperature=0.1)
    assert 7.0 < acc < 13.0, acc  # chance is 10%; the std of 2000 draws is 0.7 points


def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, (1, 2, 5)).tolist() == [1.0, 2.0, 3.0]


def test_knn_eval_equals_the_monitors_last_score(fmnist_slice, tmp_path, capsys):
    summary = train.main(["--data", str(fmnist_slice), "--out", str(tmp_path), "--epochs", "1", "--knn-bank", "120",
                          "--seed", "3", *TINY])
    monitor = summary["history"][-1]["knn_top1"]
    for name in ("checkpoint.pth", "backbone_resnet18.pth"):  # the seed comes from the run's checkpoint
        result = knn_eval.main([str(tmp_path / name), "--data", str(fmnist_slice), "--knn-bank", "120", "-j", "0"])
        assert result["knn_top1"] == monitor and result["bank"] == 120 and result["queries"] == 300
    whole = knn_eval.main([str(tmp_path / "checkpoint.pth"), "--data", str(fmnist_slice), "-j", "0", "--probe", "--pixels"])
    assert whole["bank"] == 300  # the whole train split by default
    assert whole["pixels_knn_top1"] > 30.0 and 0 <= whole["probe_top1"] <= 100
    assert "kNN top-1" in capsys.readouterr().out


def test_knn_eval_user_mistakes_give_one_line(fmnist_slice, tmp_path):
    res = subprocess.run([sys.executable, "knn_eval.py", str(tmp_path / "none.pth"), "--data", str(fmnist_slice)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "none.pth does not exist" in res.stderr and "Traceback" not in res.stderr
