import pytest
import torch

import fxopt
from fxopt import models


@pytest.mark.parametrize("name", models.names())
def test_zoo_model_optimizes_and_matches_eager(name):
    model, inputs = models.get(name).build()
    opt = fxopt.optimize(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
        actual = opt(*inputs)
    assert fxopt.verify.compare(actual, expected) is None
    assert all(r.status != "rolled back" for r in opt.records), opt.summary()


def test_zoo_registry_errors():
    with pytest.raises(KeyError, match="known: "):
        models.get("resnet9000")
    with pytest.raises(ValueError, match="already registered"):
        models.register(models.get("simple_cnn"))


def test_simple_cnn_is_the_reference_case_study():
    m = models.SimpleCNN()
    layers = [(n, type(c).__name__) for n, c in m.named_children()]
    assert layers == [("conv1", "Conv2d"), ("conv2", "Conv2d"), ("pool", "MaxPool2d"), ("fc1", "Linear"),
                      ("fc2", "Linear")]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
