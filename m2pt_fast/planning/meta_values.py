"""Meta tensors that answer the host's questions: values for integer and boolean tensors.

Meta tensors carry shapes and dtypes but no memory and no values, so a model "runs" on them at full
size on any machine: the memory planner (m2pt_fast.planning.memory) and the work counts in bench/ run whole
training steps that way. Two things stop plain meta tensors, and `MetaValues` answers both:
- values read on the host: `int()` / `bool()` / `.item()` of a tensor (the image-token count check,
  transformers' "is this mask all ones?" test, the fused path's padding check);
- data-dependent shapes: `nonzero`, so boolean-mask indexing (the fused loss's `hidden[keep]`).
Both read only integer and boolean tensors (token ids, masks, labels, positions), which are small.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
META = torch.device("meta")
# Integer/bool tensors up to this many elements get CPU values (the fused reference attention's
# B × N × (P + N) masks included); larger ones, and every floating-point tensor, stay value-less.
MAX_TRACKED_NUMEL = 1 << 24


def _is_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _trackable(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex()) and t.numel() <= MAX_TRACKED_NUMEL


class MetaValues(TorchDispatchMode):
    """Meta tensors that keep a CPU copy of the values of their integer and boolean tensors.

    A CPU tensor moved to meta keeps its values, and so does an integer/bool factory on meta
    (`arange`, `ones`); an op whose every meta input has values and whose outputs are integer/bool
    runs on the CPU copies (this answers `nonzero` and `.item()`, which meta cannot); indexing a
    value-less tensor by a boolean mask becomes indexing by the mask's nonzero positions, as ATen
    does on real devices. Floating-point tensors (weights, activations, logits) stay on meta.
    """

    def __init__(self):
        super().__init__()
        self.values = WeakIdKeyDictionary()

    def _twin(self, value: torch.Tensor) -> torch.Tensor:
        twin = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=META)
        self.values[twin] = value
        return twin

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        metas = [t for t in tree_flatten((args, kwargs))[0] if _is_meta(t)]
        has_values = all(t in self.values for t in metas)

        if func is aten._local_scalar_dense.default and _is_meta(args[0]):
            if not has_values:
                raise RuntimeError("MetaValues: .item() of a meta tensor without values (a float activation?)")
            return self.values[args[0]].item()

        if metas and has_values:
            owners = {id(self.values[t]): t for t in metas}  # in-place ops return their own input
            cpu_args, cpu_kwargs = tree_map(lambda t: self.values[t] if _is_meta(t) else t, (args, kwargs))
            if cpu_kwargs.get("device") == META:
                cpu_kwargs["device"] = torch.device("cpu")
            out = func(*cpu_args, **cpu_kwargs)
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            if all(_trackable(o) for o in outs):
                return tree_map(lambda o: (owners.get(id(o)) or self._twin(o)) if isinstance(o, torch.Tensor) else o,
                                out)
            # A float result of integer inputs (positions cast for RoPE): meta, without values.
            return tree_map(lambda o: o.to(META) if isinstance(o, torch.Tensor) else o, out)

        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            indices = []
            for index in args[1]:
                if index is not None and index.dtype == torch.bool:
                    indices.extend(self._twin(i) for i in self.values[index].nonzero().unbind(1))
                else:
                    indices.append(index)
            return func(args[0], indices)

        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and _trackable(out) and (
            (not metas and kwargs.get("device") == META)  # a factory on meta: make its values on CPU
            or func is aten._to_copy.default and not _is_meta(args[0])  # a CPU tensor moved to meta
        ):
            source = func(*args, **{**kwargs, "device": torch.device("cpu")})
            self.values[out] = source
        return out
