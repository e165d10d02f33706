"""train.py end to end on a slice of Fashion-MNIST: resume, learning, collapse, schedule, bad input."""
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import train
from model.loss import SimSiamLoss
from model.precision import Precision
from model.simsiam import SimSiam
from model.step import train_step
from model.training import recipe_sgd
from pipeline import build_loader, recipe

TINY = ["--loader", "torch", "--image-size", "8", "--small-stem", "--dim", "128", "--pred-dim", "32", "-b", "50", "--no-progress"]


def run(root, out, *extra):
    return train.main(["--data", str(root), "--out", str(out), *TINY, *extra])


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_after_epoch_1_equals_uninterrupted(fmnist_slice, tmp_path):
    run(fmnist_slice, tmp_path / "a", "--epochs", "2", "--no-knn", "-j", "0")
    run(fmnist_slice, tmp_path / "b", "--epochs", "2", "--no-knn", "-j", "2", "--stop-after", "1")
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    run(fmnist_slice, tmp_path / "b2", "--epochs", "2", "--no-knn", "-j", "2",
        "--resume", str(tmp_path / "b" / "checkpoint.pth"))
    a, b = weights(tmp_path / "a" / "checkpoint.pth"), weights(tmp_path / "b2" / "checkpoint.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the weights did move during epoch 2
    b1 = weights(tmp_path / "b" / "checkpoint.pth")
    assert not torch.equal(b1["backbone.conv1.weight"], b["backbone.conv1.weight"])


def test_short_run_lowers_loss_and_reports_knn(fmnist_slice, tmp_path, capsys):
    summary = run(fmnist_slice, tmp_path, "--epochs", "3", "--knn-bank", "300", "-j", "0")
    hist = summary["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert hist[3]["loss"] < hist[1]["loss"] < 0
    assert all(0 <= h["knn_top1"] <= 100 for h in hist)
    assert hist[3]["knn_top1"] > hist[0]["knn_top1"] + 3  # better than the randomly initialised backbone
    text = capsys.readouterr().out
    assert "random init: kNN top-1" in text and "checkpoint:" in text
    assert (tmp_path / "backbone_resnet18.pth").exists() and (tmp_path / "history.json").exists()
    assert any((tmp_path / "tb").iterdir())


def steps_z_std(batches, stop_gradient, steps=40):
    torch.manual_seed(0)
    model = SimSiam("resnet18", dim=256, pred_dim=64, small_image=True)
    opt = recipe_sgd(model, lr=0.2)
    crit = SimSiamLoss(stop_gradient=stop_gradient)
    precision = Precision("off", torch.device("cpu"))
    stats = [train_step(model, crit, iter([batches[i % len(batches)]]), opt, precision) for i in range(steps)]
    return [SimpleNamespace(loss=s.loss.item(), z_std=s.z_std.item()) for s in stats]


def test_without_stop_gradient_the_output_collapses(fmnist_slice):
    loader = build_loader("torch", source=fmnist_slice / "train", aug=recipe(8), batch_size=64, workers=0)
    batches = list(loader)
    healthy = steps_z_std(batches, True)
    collapsed = steps_z_std(batches, False)
    # paper Fig. 2: without stop-gradient the loss heads to -1 and the output std to 0
    assert collapsed[-1].z_std < 0.6 * collapsed[0].z_std
    assert collapsed[-1].z_std < 0.7 * healthy[-1].z_std
    assert healthy[-1].z_std > 0.8 * healthy[0].z_std > 0.5 / math.sqrt(256)
    assert collapsed[-1].loss < -0.75 and collapsed[-1].loss < healthy[-1].loss - 0.25


def test_lr_scaling_and_warmup():
    args = train.parse_args(["-b", "512", "--lr", "0.05"])
    assert args.batch_size * args.lr / 256 == pytest.approx(0.1) and args.warmup_epochs == 0
    big = train.parse_args(["-b", "4096", "--epochs", "100"])
    assert big.warmup_epochs == 10
    model = SimSiam("resnet18", dim=32, pred_dim=8, small_image=True)
    groups = model.param_groups(fix_pred_lr=True)
    enc, pred = train.lr_lambdas(groups, total_steps=100, warmup_steps=10)
    assert enc(0) == pytest.approx(0.1) and enc(9) == pytest.approx(1.0)
    assert enc(10) == pytest.approx(1.0) and enc(55) == pytest.approx(0.5) and enc(100) == pytest.approx(0.0)
    assert pred(5) == pytest.approx(0.6) and pred(99) == 1.0
    enc2, pred2 = train.lr_lambdas(model.param_groups(fix_pred_lr=False), 100, 0)
    assert pred2(50) == pytest.approx(enc2(50)) == pytest.approx(0.5)


def cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("setup,args,message", [
    (lambda p: None, [], "does not exist"),
    (lambda p: p.mkdir(), [], "has no train/ folder"),
    (lambda p: (p / "train" / "cat").mkdir(parents=True), [], "holds no image files"),
])
def test_bad_data_dirs_give_one_line(tmp_path, setup, args, message):
    root = tmp_path / "data"
    setup(root)
    res = cli("--data", str(root), *args)
    assert res.returncode != 0 and message in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_options_give_one_line(fmnist_slice, tmp_path):
    res = cli("--data", str(fmnist_slice), "-b", "1000", "--out", str(tmp_path / "r"))
    assert res.returncode != 0 and "batch size 1000 is larger than the 300 images" in res.stderr
    res = cli("--data", str(fmnist_slice), "--amp", "fp16", "--device", "cpu")
    assert res.returncode != 0 and "--amp fp16 needs a CUDA GPU" in res.stderr
    for bad in (tmp_path / "missing.pth", tmp_path / "damaged.pth"):
        if bad.name == "damaged.pth":
            bad.write_bytes(b"PK\x03\x04 truncated")
        res = cli("--data", str(fmnist_slice), "--resume", str(bad))
        assert res.returncode != 0 and str(bad) in res.stderr and "Traceback" not in res.stderr


def test_sync_bn_without_process_group_warns_and_trains(fmnist_slice, tmp_path):
    with pytest.warns(UserWarning, match="SyncBatchNorm needs CUDA|no torch.distributed process group"):
        summary = run(fmnist_slice, tmp_path, "--epochs", "1", "--no-knn", "-j", "0", "--sync-bn")
    assert math.isfinite(summary["history"][-1]["loss"])


def test_truncated_checkpoint_from_a_real_run_is_refused(fmnist_slice, tmp_path):
    run(fmnist_slice, tmp_path / "r", "--epochs", "1", "--no-knn", "-j", "0")
    ckpt = tmp_path / "r" / "checkpoint.pth"
    data = ckpt.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(train.CheckpointError, match="damaged"):
        run(fmnist_slice, tmp_path / "r2", "--epochs", "2", "--resume", str(tmp_path / "cut.pth"))
    assert ckpt.read_bytes() == data  # nothing lost


@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], "--lr must be a finite positive number"),
    (["--lr", "0"], "--lr must be a finite positive number"),
    (["--wd", "-1"], "--wd must be a finite non-negative number"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
])
def test_bad_numbers_refused_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(args)
    assert message in capsys.readouterr().err


def test_resume_with_other_model_options_names_the_option(fmnist_slice, tmp_path):
    run(fmnist_slice, tmp_path / "r", "--epochs", "1", "--no-knn", "-j", "0")
    with pytest.raises(train.CheckpointError, match="--arch resnet18, this run asks for resnet34"):
        run(fmnist_slice, tmp_path / "r2", "--epochs", "2", "--no-knn", "-a", "resnet34",
            "--resume", str(tmp_path / "r" / "checkpoint.pth"))
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(train.CheckpointError) as info:
        run(fmnist_slice, tmp_path / "r3", "--resume", str(tmp_path / "random.pth"))
    assert "weights_only=False" not in str(info.value) and len(str(info.value).splitlines()) == 1


def test_bad_files_are_listed_in_skipped_txt_or_stop_the_run(fmnist_slice, tmp_path, photo_dir, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(fmnist_slice, data)
    cls = sorted((data / "train").iterdir())[0]
    (cls / "truncated.jpg").write_bytes((next(cls.glob("*.jpg"))).read_bytes()[:100])
    gif = tmp_path / "x.gif"
    from PIL import Image
    Image.open(next(photo_dir.glob("*.jpg"))).convert("P").save(gif)
    shutil.copy(gif, cls / "disguised.jpg")  # a GIF named .jpg: PIL reads it, so every loader trains on it
    with pytest.warns(UserWarning, match="skipping 1 undecodable file"):
        summary = run(data, tmp_path / "r", "--epochs", "0", "--no-knn")
    listed = (tmp_path / "r" / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(cls / "truncated.jpg")] and summary["history"] == []
    assert train.cli(["--data", str(data), "--out", str(tmp_path / "e"), *TINY, "--on-bad-image", "error"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "truncated.jpg" in err and len(err.splitlines()) == 1
