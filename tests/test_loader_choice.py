"""--loader auto: the cheapest installed loader, announced."""
import subprocess
import sys
from pathlib import Path

import torch

import train
from pipeline import pick_loader
from pipeline.sources.imagefolder import scan_image_folder
from pipeline.sources.shards import open_shards

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_auto_picks_dali_when_installed_torch_for_shards(fmnist_slice):
    assert pick_loader(scan_image_folder(fmnist_slice / "train"), CPU)[0] == "dali"  # make test installs DALI
    assert pick_loader(open_shards("x-{0..3}.tar", num_samples=4), CPU)[0] == "torch"
    assert train.parse_args([]).loader == "auto"


def test_without_dali_auto_falls_back_to_torch_and_says_why(fmnist_slice):
    hide_dali = ("import importlib.abc, sys\n"
                 "class Hide(importlib.abc.MetaPathFinder):\n"
                 "    def find_spec(self, name, path=None, target=None):\n"
                 "        if name == 'nvidia.dali' or name.startswith('nvidia.dali.'):\n"
                 "            raise ModuleNotFoundError(name)\n"
                 "sys.meta_path.insert(0, Hide())\n")
    code = hide_dali + (f"import torch; from pipeline import pick_loader; from pipeline.sources.imagefolder import "
                        f"scan_image_folder; print(pick_loader(scan_image_folder({str(fmnist_slice / 'train')!r}), "
                        f"torch.device('cpu')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("('torch', ") and "DALI is not installed" in res.stdout


def test_the_run_announces_the_loader_it_picked(fmnist_slice, tmp_path, capsys):
    train.main(["--data", str(fmnist_slice), "--out", str(tmp_path / "r"), "--image-size", "8", "--small-stem",
                "--dim", "64", "--pred-dim", "16", "-b", "100", "--epochs", "1", "--no-knn", "--no-progress"])
    assert "loader: dali (installed, the cheapest" in capsys.readouterr().out
