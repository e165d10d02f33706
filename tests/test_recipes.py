"""--recipe: each named recipe builds the model, optimiser and augmentation of its source; explicit
flags win; a short run of the default recipe learns on real Fashion-MNIST.

The expected values are written out here from the sources (paper §4 / appendix A / appendix D, the
official main_simsiam.py; the measured default's table in bench/results/2026-12-03-default-search/),
not read from train.RECIPES, so a wrong table fails.
"""
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

import train
from model.distributed import DistContext
from pipeline.backends.torch import view_transform

CPU = DistContext(device=torch.device("cpu"))

# stem: conv1 kernel, max-pool kept; head: projector Linear widths, predictor widths; optimiser: batch,
# lr actually used (base x B / 256), wd, momentum; augmentation: crop area, jitter p and ranges,
# grayscale p, blur p (None: no blur op).
EXPECTED = {
    "imagenet": dict(conv1=7, maxpool=True, proj=[(512, 2048), (2048, 2048), (2048, 2048)], pred=[(2048, 512), (512, 2048)],
                     batch=512, lr=0.05 * 512 / 256, wd=1e-4, momentum=0.9,
                     crop=(0.2, 1.0), jitter_p=0.8, jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2, blur_p=0.5),
    "cifar": dict(conv1=3, maxpool=False, proj=[(512, 2048), (2048, 2048)], pred=[(2048, 512), (512, 2048)],
                  batch=512, lr=0.03 * 512 / 256, wd=5e-4, momentum=0.9,
                  crop=(0.2, 1.0), jitter_p=0.8, jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2, blur_p=None),
    "fmnist": dict(conv1=7, maxpool=True, proj=[(512, 512), (512, 512)], pred=[(512, 128), (128, 512)],
                   batch=128, lr=0.2 * 128 / 256, wd=5e-4, momentum=0.9,
                   crop=(0.5, 1.0), jitter_p=0.8, jitter=(0.4, 0.4, 0.0, 0.0), grayscale_p=0.0, blur_p=None),
}


def linears(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def built_from(argv: list[str]):
    """What train.main builds for ``argv``: (args, model, optimiser, the view transform's ops)."""
    args = train.parse_args(argv)
    built, _, optimizer = train.build_model(args, CPU)
    return args, built.model, optimizer, view_transform(train.augment_config(args)).transforms


def read_back(model, optimizer, ops) -> dict:
    """The EXPECTED fields, read from the built objects (``ops``: the view transform's ops in order)."""
    def one(kind, inner=None):
        found = [t for t in ops if isinstance(t, kind) and (inner is None or isinstance(t.transforms[0], inner))]
        assert len(found) <= 1
        return found[0] if found else None

    def strength(r, centre=1.0):
        return 0.0 if r is None else round(r[1] - centre, 6)
    crop, gray = one(v2.RandomResizedCrop), one(v2.RandomGrayscale)
    jitter_op, blur = one(v2.RandomApply, v2.ColorJitter), one(v2.RandomApply, v2.GaussianBlur)
    jitter = jitter_op.transforms[0]
    enc = optimizer.param_groups[0]
    return dict(
        conv1=model.backbone.conv1.kernel_size[0], maxpool=isinstance(model.backbone.maxpool, nn.MaxPool2d),
        proj=linears(model.projector), pred=linears(model.predictor),
        lr=enc["lr"], wd=enc["weight_decay"], momentum=enc["momentum"],
        crop=tuple(crop.scale), jitter_p=jitter_op.p,
        jitter=(strength(jitter.brightness), strength(jitter.contrast), strength(jitter.saturation),
                strength(jitter.hue, 0.0)),
        grayscale_p=gray.p, blur_p=blur.p if blur else None)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_recipe_builds_what_its_source_says(name):
    args, model, optimizer, ops = built_from(["--recipe", name])
    want = dict(EXPECTED[name])
    assert args.batch_size == want.pop("batch")
    got = read_back(model, optimizer, ops)
    assert got.pop("lr") == pytest.approx(want.pop("lr"))
    assert got == want
    assert optimizer.param_groups[1]["name"] == "predictor" and optimizer.param_groups[1]["fix_lr"]


def test_every_recipe_sets_the_same_options():
    keys = {k for kind in train.RECIPE_KEYS.values() for k in kind}
    assert all(set(r) == keys for r in train.RECIPES.values()) and set(train.RECIPES) == set(EXPECTED)


def test_the_default_is_the_fmnist_recipe():
    assert train.parse_args([]).recipe == "fmnist"
    default, named = train.parse_args([]), train.parse_args(["--recipe", "fmnist"])
    assert vars(default) == vars(named)


def test_explicit_flags_win_over_the_recipe():
    argv = ["--recipe", "cifar", "--no-small-stem", "--proj-layers", "3", "--dim", "256", "--pred-dim", "64",
            "-b", "64", "--lr", "0.1", "--wd", "1e-5", "--momentum", "0.8", "--min-crop-scale", "0.6",
            "--jitter-p", "0.5", "--jitter", "0.3,0.2,0,0", "--grayscale-p", "0", "--blur-p", "0.25"]
    args, model, optimizer, ops = built_from(argv)
    assert args.batch_size == 64
    got = read_back(model, optimizer, ops)
    assert got.pop("lr") == pytest.approx(0.1 * 64 / 256)
    assert got == dict(conv1=7, maxpool=True, proj=[(512, 256), (256, 256), (256, 256)], pred=[(256, 64), (64, 256)],
                       wd=1e-5, momentum=0.8, crop=(0.6, 1.0), jitter_p=0.5, jitter=(0.3, 0.2, 0.0, 0.0),
                       grayscale_p=0.0, blur_p=0.25)
    assert train.recipe_line(args).startswith("recipe cifar") and "--lr 0.1" in train.recipe_line(args)
    # one flag changes one thing: the rest stays the recipe's
    args, model, optimizer, ops = built_from(["--recipe", "imagenet", "--small-stem", "--blur-p", "0"])
    got = read_back(model, optimizer, ops)
    assert (got["conv1"], got["maxpool"], got["blur_p"]) == (3, False, None)
    assert got["proj"] == EXPECTED["imagenet"]["proj"] and got["wd"] == 1e-4 and got["grayscale_p"] == 0.2


@pytest.mark.parametrize("argv,message", [
    (["--recipe", "mnist"], "invalid choice: 'mnist'"),
    (["--blur-p", "1.5"], "--blur-p must be a probability in [0, 1]"),
    (["--min-crop-scale", "0"], "--min-crop-scale must be in (0, 1]"),
    (["--jitter", "0.4,0.4"], "want four non-negative numbers B,C,S,H"),
])
def test_bad_recipe_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_names_what_each_recipe_sets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # argparse wraps at the terminal width; no breaks inside names
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "appendix D" in text and "main_simsiam.py" in text and "2026-12-03-default-search" in text
    for flag, values in [("--lr", "fmnist 0.2, imagenet 0.05, cifar 0.03"), ("--wd", "fmnist 0.0005, imagenet 0.0001, cifar 0.0005"),
                         ("--proj-layers", "fmnist 2, imagenet 3, cifar 2"), ("--blur-p", "fmnist 0, imagenet 0.5, cifar 0"),
                         ("--small-stem", "fmnist off, imagenet off, cifar on")]:
        assert f"(default: from --recipe: {values})" in text, flag


def test_a_short_run_of_the_default_recipe_beats_random_init(fmnist_slice, tmp_path):
    """The default recipe's stem, head, optimiser and augmentation, CI-sized: 300 images at 16 px,
    batch 32 (lr scaled by the recipe's B/256 rule), 2 epochs. kNN is the score that can move on
    300 images: a 512-d probe fitted on 300 features scores about the same before and after."""
    summary = train.main(["--data", str(fmnist_slice), "--out", str(tmp_path), "--image-size", "16", "-b", "32",
                          "--epochs", "2", "--knn-bank", "300", "-j", "0", "--no-progress"])
    init, first, last = summary["history"]
    assert last["loss"] < first["loss"] < 0
    assert last["knn_top1"] > init["knn_top1"] + 5
