"""The model zoo: parameter counts against the spec, shapes, dense/MPO builds, rebuild from config."""
import pytest
import torch

from torchtn import MPOConv2d, MPOLinear
from torchtn.core import tt_num_params
from torchtn.models import FC2, VGG16, DenseNet, LeNet5, ResNet18, build_model


def mpo_weights(model):
    return sum(m.num_weight_params for m in model.modules() if isinstance(m, (MPOLinear, MPOConv2d)))


def test_fc2_counts_follow_gao():
    for d in (2, 4):  # Gao's count 32D + 56D² + 8D + 44D²: 480 and 1,760
        model = FC2(784, 256, 10, bias=False, layers="mpo", rank=d)
        assert mpo_weights(model) == (32 * d + 56 * d * d) + (8 * d + 44 * d * d)
    # at D = 8 the second layer's outer bonds cannot usefully exceed 4 (its outer sites have 4 entries): torchtn
    # clips them (conventions), so 5,280 weights instead of the 6,720 of Gao's code, which keeps every bond at D
    clipped = FC2(784, 256, 10, bias=False, layers="mpo", rank=8)
    assert clipped.fc2.ranks == (1, 4, 8, 4, 1) and mpo_weights(clipped) == 3_840 + 1_440
    dense = FC2(784, 256, 10, bias=False)
    assert sum(p.numel() for p in dense.parameters()) == 203_264
    x = torch.randn(3, 1, 28, 28)
    assert FC2(784, layers="mpo")(x).shape == (3, 10)


def test_lenet5_counts_follow_gao():
    mpo, dense = LeNet5(layers="mpo"), LeNet5()
    assert mpo_weights(mpo) == 1_792 + 944 + 124 == 2_860
    assert [tt_num_params(m.in_shape, m.out_shape, m.ranks) for m in (mpo.fc1, mpo.fc2, mpo.fc3)] == [1_792, 944, 124]
    assert sum(m.weight.numel() for m in (dense.fc1, dense.fc2, dense.fc3)) == 58_920
    total_mpo, total_dense = (sum(p.numel() for p in m.parameters()) for m in (mpo, dense))
    assert total_dense / total_mpo > 6  # the three fully connected maps hold most of LeNet-5's weights
    x = torch.randn(2, 1, 28, 28)
    assert mpo(x).shape == dense(x).shape == (2, 10)
    with pytest.raises(ValueError, match="28×28"):
        mpo(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("build", [lambda: VGG16(layers="mpo"), lambda: VGG16(layers="mpo", mpo_convs=True),
                                   lambda: ResNet18(layers="mpo", mpo_stages=(3, 4)),
                                   lambda: DenseNet(layers="mpo"),
                                   lambda: DenseNet(depth=40, growth=12, bottleneck=True, compression=0.5)])
def test_cifar_models_run_and_rebuild_from_config(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    twin = build_model(model.config())
    assert type(twin) is type(model) and twin.config() == model.config()
    assert sorted(k for k, _ in twin.state_dict().items()) == sorted(model.state_dict())


def test_vgg_and_densenet_mpo_maps_follow_the_paper():
    vgg = VGG16(layers="mpo")
    assert [m.num_weight_params for m in vgg.classifier if isinstance(m, MPOLinear)] == [1_376, 2_432, 928]
    dn = DenseNet(layers="mpo")
    assert dn.fc.in_features == 448 and dn.fc.in_shape == (4, 4, 7, 4)


def test_cifar_alexnet_and_zfnet_dense_mpo_adtn_and_vggs_two_adtn_maps():
    from torchtn.layers import ADTNLinear
    from torchtn.models import AlexNet, ZFNet

    x = torch.randn(2, 3, 32, 32)
    for cls in (AlexNet, ZFNet):
        dense = cls(num_classes=100)
        fc_in = dense.classifier[0].in_features
        assert fc_in == {"alexnet": 256 * 4 * 4, "zfnet": 256 * 2 * 2}[cls.name]
        assert dense(x).shape == (2, 100)
        for layers in ("mpo", "adtn"):
            model = cls(num_classes=100, layers=layers, adtn_depth=3)
            assert model(x).shape == (2, 100)
            again = build_model(model.config())
            assert again.config() == model.config() and type(again) is cls
    vgg = VGG16(layers="adtn", adtn_depth=2)
    gens = [m for m in vgg.modules() if isinstance(m, ADTNLinear)]
    # the 512→4096 and 4096→4096 maps (2^21 and 2^24 entries: Q = 21, 24), 16·depth·(Q−1) gate entries + 1 scale each
    assert [m.param_report["generator"] for m in gens] == [16 * 2 * 20 + 1, 16 * 2 * 23 + 1]
    assert isinstance(vgg.classifier[-1], torch.nn.Linear) and vgg.config()["adtn_depth"] == 2


def test_build_model_errors():
    with pytest.raises(ValueError, match="'googlenet' is not in the zoo"):
        build_model({"name": "googlenet"})
    with pytest.raises(ValueError, match="invalid"):
        build_model({"name": "fc2", "in_features": 4, "colour": "red"})
    with pytest.raises(ValueError, match="layers='tt'"):
        FC2(16, layers="tt")
