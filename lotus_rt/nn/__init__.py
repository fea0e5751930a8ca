"""PyTorch side: tensorized layers, their autograd Function, and whole-model conversion.

    >>> import torch, lotus_rt
    >>> layer = lotus_rt.TuckerConv2d(8, 16, 3, ranks=(4, 6), padding=1)
    >>> lotus_rt.offload(layer)(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 16, 10, 10])
"""
from lotus_rt.nn.convert import LayerReport, offload, offloaded_layers, tensorize
from lotus_rt.nn.group import GroupConv2d, GroupLinear, SharedNetwork, tensorize_group
from lotus_rt.nn.modules import CPConv2d, OffloadedConv2d, OffloadedLinear, TTLinear, TuckerConv2d

__all__ = ["TTLinear", "TuckerConv2d", "CPConv2d", "OffloadedLinear", "OffloadedConv2d",
           "tensorize", "offload", "offloaded_layers", "LayerReport",
           "tensorize_group", "SharedNetwork", "GroupConv2d", "GroupLinear"]
