"""Linear evaluation: LARS against a hand computation, loading any checkpoint, the frozen backbone."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import linear_eval
import train
from host_reads import count_host_reads
from model.backbones import backbone_state_dict, build_backbone
from model.checkpoint import CheckpointError
from model.distributed import DistContext
from model.frozen import BackboneChanged, check_unchanged, infer_arch, load_pretrained
from model.lars import LARS
from model.precision import Precision

TINY = ["--loader", "torch", "--image-size", "8", "--small-stem", "--dim", "128", "--pred-dim", "32", "-b", "50", "--no-progress", "-j", "0"]


def test_lars_one_step_matches_hand_computation():
    w0 = torch.tensor([[3.0, 4.0], [0.0, 0.0]])          # ‖w‖ = 5
    g0 = torch.tensor([[0.6, 0.0], [0.0, 0.8]])          # ‖g‖ = 1
    b0, gb = torch.tensor([0.0, 0.0]), torch.tensor([0.5, -0.5])
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    lr, eta, wd = 0.5, 0.001, 0.1
    opt = LARS([w, b], lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta)
    w.grad, b.grad = g0.clone(), gb.clone()
    opt.step()
    trust = eta * 5.0 / (1.0 + wd * 5.0 + 1e-8)         # You et al. 2017: η‖w‖ / (‖g‖ + β‖w‖)
    assert torch.allclose(w, w0 - lr * trust * (g0 + wd * w0), atol=1e-7)
    assert torch.allclose(b, b0 - lr * 1.0 * gb)         # ‖b‖ = 0: trust ratio 1 (apex LARC), no decay on 0
    # second step: momentum buffer = 0.9 · (first scaled grad) + this step's scaled grad
    buf = trust * (g0 + wd * w0)
    w1 = w.detach().clone()
    w.grad = g0.clone()
    opt.step()
    trust1 = eta * w1.norm() / (g0.norm() + wd * w1.norm() + 1e-8)
    assert torch.allclose(w, w1 - lr * (0.9 * buf + trust1 * (g0 + wd * w1)), atol=1e-7)


def test_lars_group_without_adaptation_is_plain_sgd():
    # the common rule (SimCLR/BYOL): biases and BN excluded from adaptation and decay
    w, b = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3))
    opt = LARS([{"params": [w]}, {"params": [b], "adapt": False, "weight_decay": 0.0}], lr=0.1, momentum=0.0,
               weight_decay=0.5)
    w.grad, b.grad = torch.full((3, 2), 2.0), torch.full((3,), 2.0)
    opt.step()
    assert torch.allclose(b, torch.full((3,), 1 - 0.1 * 2.0))
    trust = 0.001 * math.sqrt(6) / (math.sqrt(24) + 0.5 * math.sqrt(6) + 1e-8)
    assert torch.allclose(w, torch.full((3, 2), 1 - 0.1 * trust * (2.0 + 0.5)))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        LARS([w], lr=-1)


def test_classifier_epoch_makes_no_host_reads():
    # the hot path (forward, loss, LARS step, running sums) never waits for the device
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(256, 32, generator=g), torch.randint(0, 10, (256,), generator=g)
    head = linear_eval.linear_head(32, 10, seed=0)
    opt = LARS(head.parameters(), lr=1.0)
    batches = linear_eval.FeatureBatches(feats, labels, 64, seed=0, ctx=DistContext())
    with count_host_reads() as counts:
        sums = linear_eval.train_epoch(None, head, batches, opt, Precision("off", torch.device("cpu")), False)
    assert sum(counts.values()) == 0, counts
    assert sums[2].item() == 256 and 0 <= sums[1].item() <= 256


@pytest.mark.parametrize("arch,small", [("resnet18", True), ("resnet34", False), ("resnet50", False)])
def test_infer_arch_from_exported_tensors(arch, small):
    net, _ = build_backbone(arch, small)
    assert infer_arch(backbone_state_dict(net)) == (arch, small)


def test_load_pretrained_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "missing.pth")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither a train.py checkpoint"):
        load_pretrained(tmp_path / "other.pth")
    net, _ = build_backbone("resnet18", False)
    state = backbone_state_dict(net)
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="5x5 kernel"):
        load_pretrained(tmp_path / "odd.pth")


def test_check_unchanged_catches_bn_statistics_moving():
    net, _ = build_backbone("resnet18", True)
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    net(torch.randn(4, 3, 8, 8))
    check_unchanged(net, ref)  # eval mode: BN statistics untouched
    net.train()
    net(torch.randn(4, 3, 8, 8))
    with pytest.raises(BackboneChanged, match="running_mean"):
        check_unchanged(net, ref)


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory):
    """A randomly initialised small-stem resnet18, exported as train.py exports backbones."""
    path = tmp_path_factory.mktemp("random") / "backbone_resnet18.pth"
    torch.manual_seed(0)
    torch.save(backbone_state_dict(build_backbone("resnet18", True)[0]), path)
    return path


def test_frozen_random_backbone_gives_low_above_chance_accuracy(fmnist_slice, random_backbone, tmp_path):
    summary = linear_eval.main([str(random_backbone), "--data", str(fmnist_slice), "--image-size", "8",
                                "--cache-features", "--optimizer", "sgd", "--lr", "1", "-b", "60", "--epochs", "30",
                                "-j", "0", "--out", str(tmp_path / "le")])
    # 10 balanced classes: chance is 10%; a random 8 px backbone carries little (its kNN is ~20% here)
    assert 15.0 < summary["top1"] < 60.0, summary["top1"]
    assert summary["top5"] >= summary["top1"]


def test_augmented_path_never_changes_the_backbone(fmnist_slice, random_backbone, tmp_path, monkeypatch):
    checks = []
    real_check = linear_eval.check_unchanged

    def spy(backbone, reference):
        real_check(backbone, reference)
        checks.append(sum(v.numel() for v in reference.values()))
    monkeypatch.setattr(linear_eval, "check_unchanged", spy)
    summary = linear_eval.main([str(random_backbone), "--data", str(fmnist_slice), "--image-size", "8",
                                "--optimizer", "sgd", "--lr", "1", "-b", "100", "--epochs", "2", "-j", "0",
                                "--out", str(tmp_path / "le")])
    hist = summary["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    # every epoch compared all of the backbone's tensors (BN buffers included) with the file's
    assert checks == [sum(v.numel() for v in build_backbone("resnet18", True)[0].state_dict().values())] * 2
    assert hist[0]["lr"] == pytest.approx(1 * 100 / 256) and hist[1]["lr"] == pytest.approx(hist[0]["lr"] / 2)
    assert all(0 <= h["val_top1"] <= h["val_top5"] <= 100 and math.isfinite(h["train_loss"]) for h in hist)
    assert (tmp_path / "le" / "linear_checkpoint.pth").exists() and any((tmp_path / "le" / "tb").iterdir())


def test_cached_features_resume_equals_uninterrupted(fmnist_slice, random_backbone, tmp_path):
    common = [str(random_backbone), "--data", str(fmnist_slice), "--image-size", "8", "--cache-features",
              "-b", "100", "--lr", "2", "--epochs", "4", "-j", "0"]
    a = linear_eval.main(common + ["--out", str(tmp_path / "a")])
    linear_eval.main(common + ["--out", str(tmp_path / "b"), "--stop-after", "2"])
    b = linear_eval.main(common + ["--resume", str(tmp_path / "b" / "linear_checkpoint.pth")])
    ha = torch.load(tmp_path / "a" / "linear_checkpoint.pth", weights_only=True)["head"]
    hb = torch.load(tmp_path / "b" / "linear_checkpoint.pth", weights_only=True)["head"]
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    assert [h["val_top1"] for h in a["history"]] == [h["val_top1"] for h in b["history"]]
    ev = linear_eval.main(common + ["--resume", str(tmp_path / "a" / "linear_checkpoint.pth"), "--evaluate"])
    assert ev["top1"] == a["top1"]


def test_training_checkpoint_gives_its_view_size_and_fits_the_classifier(fmnist_slice, tmp_path):
    train.main(["--data", str(fmnist_slice), "--out", str(tmp_path / "run"), "--epochs", "1", "--no-knn", *TINY])
    pre = load_pretrained(tmp_path / "run" / "checkpoint.pth")
    assert (pre.kind, pre.arch, pre.small_stem, pre.image_size, pre.feat_dim) == ("checkpoint", "resnet18", True, 8, 512)
    bare = load_pretrained(tmp_path / "run" / "backbone_resnet18.pth")  # view size from the checkpoint beside it
    assert bare.kind == "backbone" and bare.image_size == 8
    assert all(torch.equal(bare.reference[k], pre.reference[k]) for k in pre.reference)
    summary = linear_eval.main([str(tmp_path / "run" / "checkpoint.pth"), "--data", str(fmnist_slice),
                                "--cache-features", "-b", "100", "--epochs", "2", "-j", "0", "--lr", "2"])
    assert summary["out"] == str(tmp_path / "run" / "linear_eval_cached") and summary["pretrained"]["image_size"] == 8
    other = tmp_path / "backbone_resnet34.pth"
    torch.save(backbone_state_dict(build_backbone("resnet34", True)[0]), other)
    with pytest.raises(ValueError, match="holds a classifier for a resnet18"):
        linear_eval.main([str(other), "--image-size", "8", "--data", str(fmnist_slice), "--cache-features",
                          "-b", "100", "--epochs", "3", "-j", "0",
                          "--resume", str(tmp_path / "run" / "linear_eval_cached" / "linear_checkpoint.pth")])


def cli(*args):
    return subprocess.run([sys.executable, "linear_eval.py", *args], capture_output=True, text=True, timeout=300)


def test_user_mistakes_give_one_line(fmnist_slice, random_backbone, tmp_path):
    res = cli(str(tmp_path / "nope.pth"), "--data", str(fmnist_slice))
    assert res.returncode != 0 and "nope.pth does not exist" in res.stderr and "Traceback" not in res.stderr
    res = cli(str(random_backbone), "--data", str(fmnist_slice))
    assert res.returncode != 0 and "records no view size" in res.stderr and "Traceback" not in res.stderr
    res = cli(str(random_backbone), "--data", str(tmp_path / "nodata"), "--image-size", "8")
    assert res.returncode != 0 and "nodata does not exist" in res.stderr and "Traceback" not in res.stderr
    res = cli(str(random_backbone), "--data", str(fmnist_slice), "--image-size", "8", "-j", "0")  # batch 4096 > 300
    assert res.returncode != 0 and "batch size 4096 is larger" in res.stderr and "Traceback" not in res.stderr


def test_two_processes_under_torchrun_match_one(fmnist_slice, random_backbone, tmp_path):
    # the global batch is split over 2 ranks and the DDP head averages their gradients: the same
    # classifier as one process with the same global batch, up to float rounding
    common = [str(random_backbone), "--data", str(fmnist_slice), "--image-size", "8", "--cache-features",
              "--optimizer", "sgd", "--lr", "1", "-b", "60", "--epochs", "3", "-j", "0", "--device", "cpu"]
    one = linear_eval.main(common + ["--out", str(tmp_path / "one")])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    res = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "linear_eval.py", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("epoch 3/3") == 1  # only rank 0 prints
    two = json.loads((tmp_path / "two" / "linear_eval.json").read_text())
    a = torch.load(tmp_path / "one" / "linear_checkpoint.pth", weights_only=True)["head"]
    b = torch.load(tmp_path / "two" / "linear_checkpoint.pth", weights_only=True)["head"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert [h["val_top1"] for h in two["history"]] == pytest.approx([h["val_top1"] for h in one["history"]], abs=0.34)


def test_dali_loader_feeds_the_classifier(fmnist_slice, random_backbone, tmp_path):
    pytest.importorskip("nvidia.dali")
    summary = linear_eval.main([str(random_backbone), "--data", str(fmnist_slice), "--image-size", "8", "--loader", "dali",
                                "--optimizer", "sgd", "--lr", "1", "-b", "60", "--epochs", "1", "-j", "1",
                                "--out", str(tmp_path / "le")])
    assert summary["history"][0]["epoch"] == 1 and math.isfinite(summary["history"][0]["train_loss"])
