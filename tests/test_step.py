"""The training step: no host reads in the steady state, non-finite steps skipped on the device,
gradient accumulation equal to the mean of the micro-batch gradients."""
import copy

import torch

from host_reads import count_host_reads
from model.distributed import DistContext
from model.loss import SimSiamLoss
from model.precision import Precision
from model.simsiam import SimSiam
from model.step import StatsReadback, train_step
from model.training import recipe_sgd
from pipeline import build_loader, recipe


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return SimSiam("resnet18", dim=64, pred_dim=16, small_image=True)


def test_twenty_steps_make_no_host_read_and_one_readback_makes_one(fmnist_slice):
    loader = build_loader("torch", source=fmnist_slice / "train", aug=recipe(8), batch_size=16, workers=0)
    batches = list(loader)[:4]  # decoded up front: the loader's own work is not the step's
    model = tiny_model()
    opt, prec, crit = recipe_sgd(model, lr=0.05), Precision("off", torch.device("cpu")), SimSiamLoss()
    readback = StatsReadback(DistContext())
    train_step(model, crit, iter(batches), opt, prec)  # first step: lazy state (momentum buffers, scaler)
    with count_host_reads() as counts:
        for step in range(20):
            readback.add(step, train_step(model, crit, iter([batches[step % 4]]), opt, prec))
    assert sum(counts.values()) == 0, counts
    with count_host_reads() as counts:
        rows, (flag,) = readback.read((True,))
    assert sum(counts.values()) == 1 and counts["tolist"] == 1
    assert [r[0] for r in rows] == list(range(20)) and flag is True
    assert all(-1 <= loss <= 1 and z > 0 and not bad for _, loss, z, bad in rows)


def test_non_finite_step_is_skipped_on_the_device(fmnist_slice):
    loader = build_loader("torch", source=fmnist_slice / "train", aug=recipe(8), batch_size=16, workers=0)
    good = next(iter(loader))
    bad = good._replace(view1=good.view1.clone())
    bad.view1[0, 0, 0, 0] = float("nan")
    for amp in ("off", "bf16"):
        model = tiny_model()
        opt, prec, crit = recipe_sgd(model, lr=0.05), Precision(amp, torch.device("cpu")), SimSiamLoss()
        before = copy.deepcopy(model.state_dict())
        stats = train_step(model, crit, iter([bad]), opt, prec)
        assert stats.nonfinite.item() == 1.0
        after = model.state_dict()
        for k in before:  # no update, and BN statistics aside, nothing moved
            if "running" not in k and "num_batches" not in k:
                assert torch.equal(before[k], after[k]), (amp, k)
        assert prec.scaler.get_scale() == 1.0  # a skipped step does not shrink later gradients
        stats = train_step(model, crit, iter([good]), opt, prec)
        assert stats.nonfinite.item() == 0.0
        assert not torch.equal(before["backbone.conv1.weight"], model.state_dict()["backbone.conv1.weight"])


def test_accumulation_gradient_is_the_mean_of_the_micro_batch_gradients(fmnist_slice):
    loader = build_loader("torch", source=fmnist_slice / "train", aug=recipe(8), batch_size=16, workers=0)
    it = iter(loader)
    micro = [next(it), next(it)]
    model = tiny_model()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, SimSiamLoss(), iter(micro), opt, Precision("off", torch.device("cpu")), accum=2)
    per = []
    for b in micro:
        m = copy.deepcopy(reference)
        SimSiamLoss()(*m(b.view1, b.view2)).backward()
        per.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, (per[0][n] + per[1][n]) / 2, atol=1e-6), n
