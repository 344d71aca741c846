"""train.optimizer_step's report, as metrics.jsonl and the NaN check take it."""
import json

import torch

from recipes.lib import train


class Optimizer:
    """The surface of megatron's optimizer that optimizer_step uses; step() returns the gradient
    norm as given."""
    param_groups = [{"lr": 3e-4}]

    def __init__(self, grad_norm):
        self.grad_norm = grad_norm

    def zero_grad(self):
        pass

    def step(self):
        return True, self.grad_norm, None


class Model:
    def zero_grad_buffer(self):
        pass


class Schedule:
    def step(self, increment):
        pass


def test_a_tensor_gradient_norm_is_reported_as_a_float():
    """With Transformer Engine installed, megatron's get_grad_norm_fp32 returns the norm as a
    one-element GPU tensor (no host sync in the clip), elsewhere a float: on the H200 with TE the
    first metrics.jsonl row failed json.dumps and every GPU training stage stopped at step 1."""
    for given in (torch.tensor([0.65]), 0.65):
        _, ok, grad_norm, lr = train.optimizer_step(Model(), Optimizer(given), Schedule(),
                                                    lambda batches, training: [], [])
        assert type(grad_norm) is float and abs(grad_norm - 0.65) < 1e-6 and lr == 3e-4 and ok
        json.dumps({"grad_norm": grad_norm})
    assert train.optimizer_step(Model(), Optimizer(None), Schedule(),
                                lambda batches, training: [], [])[2] is None
