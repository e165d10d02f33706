"""SimSiam model and loss: shapes, frozen bias, the loss against hand computation, stop-gradient."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from model.backbones import backbone_state_dict, build_backbone
from model.loss import SimSiamLoss, collapse_threshold, z_std
from model.simsiam import SimSiam


@pytest.mark.parametrize("arch,small,size,feat", [("resnet18", True, 16, 512), ("resnet50", False, 64, 2048)])
def test_output_shapes_and_frozen_bias(arch, small, size, feat):
    model = SimSiam(arch, dim=256, pred_dim=64, small_image=small)
    x1, x2 = torch.randn(4, 3, size, size), torch.randn(4, 3, size, size)
    out = model(x1, x2)
    assert model.feat_dim == feat
    for t in out:
        assert t.shape == (4, 256)
    assert model.backbone(x1).shape == (4, feat)
    last_linear, last_bn = model.projector[-2], model.projector[-1]
    assert not last_linear.bias.requires_grad and last_linear.weight.requires_grad
    assert last_bn.weight is None and last_bn.bias is None  # affine-free output BN
    assert isinstance(model.predictor[-1], torch.nn.Linear)  # nothing after the predictor's output fc
    assert model.predictor[0].out_features == 64
    # the frozen bias is not handed to the optimiser
    names = {id(p) for g in model.param_groups(True) for p in g["params"]}
    assert id(last_linear.bias) not in names


def test_default_widths_and_small_stem():
    model = SimSiam("resnet18", small_image=True)
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [2048, 2048, 2048]
    assert model.predictor[0].out_features == 512 and model.predictor[-1].out_features == 2048
    assert model.backbone.conv1.kernel_size == (3, 3) and isinstance(model.backbone.maxpool, torch.nn.Identity)
    two = SimSiam("resnet18", dim=128, pred_dim=32, small_image=True, proj_layers=2)
    assert sum(isinstance(m, torch.nn.Linear) for m in two.projector) == 2


def test_predictor_ablations():
    ident = SimSiam("resnet18", dim=64, pred_dim=16, small_image=True, predictor_mode="identity")
    assert isinstance(ident.predictor, torch.nn.Identity) and len(ident.param_groups(True)) == 1
    fixed = SimSiam("resnet18", dim=64, pred_dim=16, small_image=True, predictor_mode="fixed")
    assert not any(p.requires_grad for p in fixed.predictor.parameters())
    with pytest.raises(ValueError, match="predictor mode"):
        SimSiam("resnet18", predictor_mode="momentum")
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vgg16")


def test_backbone_export_loads_into_torchvision():
    model = SimSiam("resnet18", dim=64, pred_dim=16)
    state = backbone_state_dict(model.backbone)
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(net.layer4[1].conv2.weight, model.backbone.layer4[1].conv2.weight)


def test_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(8, 16, generator=g) for _ in range(4))

    def d(p, z):  # paper eq. (1), written out
        return -((p / p.norm(dim=1, keepdim=True)) * (z / z.norm(dim=1, keepdim=True))).sum(1).mean()

    expected = 0.5 * d(p1, z2) + 0.5 * d(p2, z1)
    assert torch.allclose(SimSiamLoss()(p1, p2, z1, z2), expected, atol=1e-6)
    assert torch.allclose(SimSiamLoss(symmetric=False)(p1, p2, z1, z2), d(p1, z2), atol=1e-6)
    ce = -(F.softmax(z2, 1) * F.log_softmax(p1, 1)).sum(1).mean() / 2 - (F.softmax(z1, 1) * F.log_softmax(p2, 1)).sum(1).mean() / 2
    assert torch.allclose(SimSiamLoss(similarity="cross-entropy")(p1, p2, z1, z2), ce, atol=1e-6)
    assert SimSiamLoss()(p1, p1, p1, p1).item() == pytest.approx(-1.0, abs=1e-6)


def test_stop_gradient_blocks_z():
    p = torch.randn(8, 16, requires_grad=True)
    z = torch.randn(8, 16, requires_grad=True)
    SimSiamLoss(stop_gradient=True)(p, p, z, z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0
    p.grad = None
    SimSiamLoss(stop_gradient=False)(p, p, z, z).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_loss_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = SimSiam("resnet18", dim=128, pred_dim=32, small_image=True)
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    ref = SimSiamLoss()(*model(x1, x2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x1, x2)
        loss = SimSiamLoss()(*out)
    assert out.p1.dtype == torch.bfloat16  # autocast really ran in bf16
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-3


def test_z_std_metric():
    dim = 512
    healthy = torch.randn(4096, dim)
    assert z_std(healthy).item() == pytest.approx(1 / math.sqrt(dim), rel=0.05)
    collapsed = torch.ones(4096, dim) + 1e-4 * torch.randn(4096, dim)
    assert z_std(collapsed).item() < collapse_threshold(dim)


@pytest.mark.parametrize("arch,small", [("resnet18", False), ("resnet18", True), ("resnet34", False),
                                        ("resnet50", False)])
def test_exported_backbone_loads_strictly_into_torchvision(arch, small):
    # issue 10 item 7: drop the fc (and, for the small stem, swap conv1 and maxpool) and strict=True loads
    torch.manual_seed(0)
    model = SimSiam(arch, dim=64, pred_dim=16, small_image=small)
    net = getattr(torchvision.models, arch)()
    net.fc = torch.nn.Identity()
    if small:
        net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = torch.nn.Identity()
    net.load_state_dict(backbone_state_dict(model.backbone), strict=True)
    x = torch.randn(2, 3, 32, 32)
    model.backbone.eval(), net.eval()
    assert torch.equal(net(x), model.backbone(x))
