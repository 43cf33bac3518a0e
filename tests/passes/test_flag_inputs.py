"""fold_flag_inputs (NOTE [Flag inputs], fxopt/passes/fold.py): None and bool inputs are their values in the graph a
specialization runs, and a call with other values gets its own specialization, with eager's results."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt


class Attention(nn.Module):  # timm's signature: optional mask and causal flag, traced as placeholders
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, attn_mask=None, is_causal=False):
        q, k, v = self.qkv(x).view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def test_default_flags_become_values_and_other_values_specialize_again():
    model, x = Attention().eval(), torch.randn(1, 6, 16)
    opt = fxopt.optimize(model, (x,), strict=True)
    record = next(r for r in opt.records if r.name == "fold_flag_inputs")
    assert record.changes == {"inputs": 2}
    assert "attn_mask = None" in opt.graph_module.code and "is_causal = False" in opt.graph_module.code
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 3:] = float("-inf")
    with torch.no_grad():
        for args, kwargs in [((x,), {}), ((x, mask), {}), ((x,), {"attn_mask": mask}), ((x, None, True), {}),
                             ((x,), {"is_causal": True}), ((x,), {})]:
            torch.testing.assert_close(opt(*args, **kwargs), model(*args, **kwargs), atol=1e-5, rtol=1e-5)
