"""CPU linear layers on oneDNN with prepacked weights, while generating."""

from __future__ import annotations

import contextlib
from collections import Counter


@contextlib.contextmanager
def packed_linears(model, batch_size: int):
    """On CPU, the model's plain float linear layers run on oneDNN with their weights packed once into
    its blocked layout (what torch.compile's CPU weight prepacking does). On this kind of CPU that is
    2-3x faster than the default kernel, and it is exact fp32/bf16 arithmetic. The packed copies live
    only while generating; meanwhile they stand in for the layers' own weights, which are freed and
    restored exactly from them afterwards (weights shared with another layer, such as a tied output
    layer, are kept), so the model is not held twice. Anything else (GPU, quantized or hooked layers,
    no oneDNN) is left as is."""
    import torch

    packed = {}
    if model.device.type == "cpu" and torch.backends.mkldnn.is_available():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if type(module) is torch.nn.Linear and "forward" not in vars(module) and \
                    weight.dtype in (torch.float32, torch.bfloat16):
                packed[module] = packed_forward(weight.detach(), module.bias, batch_size)
        if not all(packed.values()):  # oneDNN cannot run them here
            packed = {}
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    freed = [m for m in packed if uses[id(m.weight)] == 1]
    with torch.inference_mode(False):
        for module, forward in packed.items():
            module.forward = forward
        for module in freed:
            module.weight.data = module.weight.new_empty(0)
        if freed:  # the others may still point into the checkpoint's file mapping: with copies of their
            for p in model.parameters():  # own, the mapping, and with it the freed weights, is released
                if p.numel():
                    p.data = p.data.clone()
    try:
        yield
    finally:
        with torch.inference_mode(False):  # trainable again afterwards
            for module in freed:
                module.weight.data = packed[module].weight.to_dense()
                del module.forward, packed[module]  # one at a time: never two full copies
            for module in packed:
                del module.forward


def packed_forward(weight, bias, batch_size: int):
    """``F.linear(x, weight, bias)`` on a oneDNN-packed copy of ``weight``, or None if that fails here."""
    import torch

    linear = torch.ops.mkldnn._linear_pointwise
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)
        b = None if bias is None else bias.detach()
        x = torch.ones(2, weight.shape[1], dtype=weight.dtype)
        expected = torch.nn.functional.linear(x, weight, b).float()
        if (linear(x, w, b, "none", [None], "").float() - expected).abs().max() > 1e-2 * (1 + expected.abs().max()):
            return None  # not the same function: keep the default kernel
    except (RuntimeError, AttributeError):
        return None

    def forward(x):
        if x.shape[:-1].numel() == 1:  # oneDNN runs one row on another kernel: run it as two rows, so
            return linear(x.expand(*x.shape[:-2], 2, x.shape[-1]), w, b, "none", [None], "")[..., :1, :]
        return linear(x, w, b, "none", [None], "")  # that a row's result does not depend on its batch

    forward.weight = w
    return forward
