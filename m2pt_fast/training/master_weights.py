"""The fp32 master values of parameters that DeepSpeed trains in reduced precision.

With "bf16": {"enabled": true} DeepSpeed computes with bf16 module parameters and keeps an fp32
master copy of each trainable one inside its optimizer wrapper; the optimizer updates the master and
rounds it into the bf16 copy. The master is the trained value: a bf16 copy keeps 8 of its 24
significand bits, and an update smaller than the rounding step moves the master but not the copy.
Where the master lives depends on the ZeRO stage:

  ZeRO-0     FP16_UnfusedOptimizer (DeepSpeed's "DDP bf16" wrapper around a torch optimizer):
             whole fp32 copies, `fp32_groups[g][i]` for `fp16_groups[g][i]`, on every rank
  ZeRO-1, 2  one fp32 partition per rank, linked from each parameter through `_hp_mapping`
  ZeRO-3     one fp32 partition per rank, found through the parameter's `ds_id`

`deepspeed.utils.safe_get_full_fp32_param` assembles the ZeRO-1/2/3 ones (a collective: an all-reduce
or all-gather over the data-parallel group) and returns None for ZeRO-0's, which are read directly.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)


def _zero0_masters(optimizer) -> dict[torch.Tensor, torch.Tensor]:
    """{low-precision parameter: its fp32 copy} of a DeepSpeed FP16_UnfusedOptimizer-like wrapper."""
    low_groups, master_groups = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not isinstance(low_groups, list) or not isinstance(master_groups, list):
        return {}
    masters = {}
    for low_group, master_group in zip(low_groups, master_groups):
        if not isinstance(master_group, list):  # FP16_Optimizer (fused) keeps flat buffers instead
            continue
        masters.update(zip(low_group, master_group))
    return masters


def fp32_master_values(optimizer, params: Iterable[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
    """{parameter: its fp32 value} for each of `params`, from the DeepSpeed `optimizer`'s masters.

    An fp32 parameter is its own master (the optimizer updates it in place or copies the fp32 result
    back bit for bit) and maps to itself. A reduced-precision one without a master found in the
    optimizer maps to its own value upcast, with a warning: the file is then written anyway rather
    than losing a finished run.

    Collective: under ZeRO 1-3 every rank must call this with the same parameters in the same order.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    zero0 = _zero0_masters(optimizer)
    values = {}
    for param in params:
        if param.dtype == torch.float32:
            values[param] = param
            continue
        master = safe_get_full_fp32_param(param)
        if master is None:
            master = zero0.get(param)
        if master is None:
            log.warning("no fp32 master copy of a %s parameter %s in %s: its %s value is saved",
                        param.dtype, tuple(param.shape), type(optimizer).__name__, param.dtype)
            master = param
        values[param] = master.detach().float()
    return values
