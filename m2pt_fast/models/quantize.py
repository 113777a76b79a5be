"""A LLaVA with its frozen backbone in NF4: quantize a model in memory, save and load quantized models.

- `quantize_model(model)` replaces the nn.Linear layers of the vision tower and the language model by
  `NF4Linear`, one layer at a time (peak memory: the quantized model plus one dense layer), leaving
  the projector, lm_head, embeddings and norms as they are (configurable through `QuantizeConfig`).
- `save_quantized(model, directory)` writes our format: config.json + one safetensors file holding
  every parameter and buffer (NF4 layers as their packed codes and statistics) and a manifest.
- `load_quantized(directory)` loads our format, a bitsandbytes 4-bit checkpoint as transformers
  writes it (`weight` + `weight.absmax` / `weight.quant_map` / `weight.nested_*` /
  `weight.quant_state.bitsandbytes__nf4`), or a plain float checkpoint, which it quantizes tensor by
  tensor while streaming the shards (a bf16 7B never sits in memory whole).

The format itself and the kernels are in m2pt_kernels (nf4_format.py, nf4.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from m2pt_fast.compat import no_init_weights
from m2pt_fast.errors import MissingInput, UserError
from m2pt_fast.models.layers import LinearProjector
from m2pt_kernels import NF4Weight, nf4_dequantize, nf4_linear, nf4_quantize
from m2pt_kernels.nf4_format import BLOCKSIZES

log = logging.getLogger(__name__)

FORMAT_NAME = "m2pt-nf4"
FORMAT_VERSION = 1
WEIGHTS_FILE = "nf4_model.safetensors"


# ---- configuration -------------------------------------------------------------------------------
@dataclass
class QuantizeConfig:
    """Which layers become NF4 and how.

    targets: a Linear is quantized when its qualified name contains one of these fragments
             (the vision tower and the decoder: LLaVA's vision_tower and language_model in
             transformers 5, the Qwen-VL models' visual and language_model).
    skip:    ... unless its name also contains one of these (the interaction layer is tuned by M²PT:
             LLaVA's projector, the Qwen models' merger and deepstack mergers; lm_head stays dense,
             as bitsandbytes-through-transformers leaves it).
    """

    blocksize: int = 64
    double_quant: bool = True
    targets: tuple = ("vision_tower", "visual", "language_model")
    skip: tuple = ("multi_modal_projector", "merger", "lm_head")

    def __post_init__(self):
        if self.blocksize not in BLOCKSIZES:
            raise UserError(f"QuantizeConfig.blocksize={self.blocksize} is not supported; use one of {BLOCKSIZES}")
        self.targets, self.skip = tuple(self.targets), tuple(self.skip)
        if not self.targets:
            raise UserError("QuantizeConfig.targets is empty: nothing would be quantized; "
                            "e.g. targets=('vision_tower', 'language_model')")

    def wants(self, name: str) -> bool:
        return any(t in name for t in self.targets) and not any(s in name for s in self.skip)


@dataclass
class QuantizeReport:
    """What quantize_model did. Bytes count unique parameter and buffer storage of the model."""

    quantized: list = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        mib = 2**20
        return (f"NF4: quantized {len(self.quantized)} linear layers; model tensors "
                f"{self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB")


# ---- the module ----------------------------------------------------------------------------------
class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4; computes in the input's dtype.

    Buffers (they follow .to(device) and land in state_dict): weight_packed, weight_absmax, and with
    double quantization weight_nested_absmax, weight_nested_offset. The bias, if any, stays a (frozen)
    floating-point Parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, weight_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.weight_dtype = blocksize, double_quant, weight_dtype
        n = in_features * out_features
        nblocks = -(-n // blocksize)
        # empty placeholders with the right shapes; filled by from_nf4 or a loader
        self.register_buffer("weight_packed", torch.empty((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("weight_absmax", torch.empty(nblocks, dtype=torch.uint8, device=device))
            nested = torch.empty(-(-nblocks // 256), dtype=torch.float32, device=device)
            self.register_buffer("weight_nested_absmax", nested)
            self.register_buffer("weight_nested_offset", torch.empty((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("weight_absmax", torch.empty(nblocks, dtype=torch.float32, device=device))
            self.weight_nested_absmax = self.weight_nested_offset = None
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=weight_dtype, device=device), requires_grad=False)

    @classmethod
    def from_nf4(cls, q: NF4Weight, bias: torch.Tensor | None = None) -> NF4Linear:
        out_features, in_features = q.shape
        m = cls(in_features, out_features, bias is not None, blocksize=q.blocksize, double_quant=q.double_quant,
                weight_dtype=q.dtype, device="meta")
        m.set_nf4(q)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        return cls.from_nf4(nf4_quantize(linear.weight.detach(), blocksize, double_quant), linear.bias)

    def set_nf4(self, q: NF4Weight) -> None:
        if tuple(q.shape) != (self.out_features, self.in_features) or q.double_quant != self.double_quant:
            raise UserError(f"NF4 weight {q} does not fit NF4Linear({self.in_features}, {self.out_features}, "
                            f"double_quant={self.double_quant})")
        self.blocksize, self.weight_dtype = q.blocksize, q.dtype
        self.weight_packed, self.weight_absmax = q.packed, q.absmax
        if q.double_quant:
            self.weight_nested_absmax, self.weight_nested_offset = q.nested_absmax, q.nested_offset

    @property
    def logical_numel(self) -> int:
        """Weight elements represented (the packed buffer holds half as many bytes): for parameter
        counts, which do not see buffers."""
        return self.in_features * self.out_features

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.weight_packed, self.weight_absmax, (self.out_features, self.in_features),
                         self.weight_dtype, self.blocksize, self.weight_nested_absmax, self.weight_nested_offset)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, dequantized on every access: for code that reads `.weight` (dtype and
        device checks, F.linear on it). Calling the module never materializes it for small batches."""
        return nf4_dequantize(self.nf4_weight())

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() / .bfloat16() (DeepSpeed's bf16 mode does this) cast floating
        # buffers too; the fp32 statistics are part of the format, so they follow the device only
        stats = {name: buf for name, buf in self._buffers.items()
                 if name.startswith("weight_") and buf is not None and buf.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, original in stats.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = original.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return nf4_linear(x, self.nf4_weight(), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}, dtype={self.weight_dtype}")


# ---- quantizing a model in memory ----------------------------------------------------------------
def _tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, config: QuantizeConfig | None = None, **overrides) -> QuantizeReport:
    """Replace the targeted nn.Linear layers of `model` by NF4Linear, in place, one at a time.

    Each weight is quantized on its own device and the dense copy dropped before the next layer, so
    peak memory stays near the quantized size plus one layer. Keyword overrides set QuantizeConfig
    fields (`quantize_model(model, blocksize=128)`). Returns a QuantizeReport (also logged).
    """
    if config is not None and not isinstance(config, QuantizeConfig):
        raise TypeError(f"quantize_model(model, config) takes a QuantizeConfig, got {type(config).__name__}")
    config = dataclasses.replace(config, **overrides) if config is not None else QuantizeConfig(**overrides)
    report = QuantizeReport(bytes_before=_tensor_bytes(model))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and config.wants(n)]
    if not names:
        raise UserError(f"quantize_model found no nn.Linear whose name contains one of {config.targets} "
                        f"(and none of {config.skip}); is this a LLaVA, or already quantized?")
    for name in names:
        linear = model.get_submodule(name)
        _set_submodule(model, name, NF4Linear.from_linear(linear, config.blocksize, config.double_quant))
        linear.weight = None  # drop the dense copy now, not when the loop ends
        report.quantized.append(name)
    report.bytes_after = _tensor_bytes(model)
    log.info("%s", report)
    return report


# ---- building an empty model ---------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device but real buffers (rotary tables, position
    ids: they are computed at construction and absent from checkpoints). transformers' no_init_weights
    skips the initialization, so each parameter costs one uninitialized allocation, freed at once."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = original


def _empty_model(config_dict: dict, class_name: str | None = None) -> nn.Module:
    config = transformers.AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "quantization_config"})
    name = class_name or (config_dict.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise UserError(f"cannot tell which model class to build (architectures={config_dict.get('architectures')}); "
                        "pass model_class='LlavaForConditionalGeneration'")
    with _parameters_on_meta():
        model = cls(config)
        # LLaVA's own layout, loaded through m2pt_fast.models.llava_original and saved here: a linear projector,
        # and an lm_head that keeps the original vocabulary's rows (the image token's row is input only)
        if getattr(config, "m2pt_linear_projector", False):
            model.model.multi_modal_projector = LinearProjector(config.vision_config.hidden_size,
                                                                config.text_config.hidden_size)
        rows = getattr(config, "m2pt_lm_head_rows", None)
        if rows is not None:
            model.lm_head = nn.Linear(config.text_config.hidden_size, rows, bias=False)
    return model


# ---- saving ---------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, directory) -> Path:
    """Write `model` (after quantize_model) to `directory`: config.json and nf4_model.safetensors
    (all parameters and buffers, persistent or not; tensors shared between modules stored once)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen and t.numel() > 0:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    layers = {n: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                  "blocksize": m.blocksize, "double_quant": m.double_quant,
                  "dtype": str(m.weight_dtype).replace("torch.", "")}
              for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "model_class": type(model).__name__,
            "nf4_layers": json.dumps(layers), "aliases": json.dumps(aliases)}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata=meta)
    if hasattr(model, "config"):
        model.config.save_pretrained(directory)
    return directory


# ---- loading --------------------------------------------------------------------------------------
# Checkpoints written before transformers 5 name LLaVA's parts differently; the same renames
# transformers applies when it loads them.
_LEGACY_KEYS = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\."), "model.language_model."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
]


def _rename(key: str, known) -> str:
    if key in known:
        return key
    for pattern, repl in _LEGACY_KEYS:
        new = pattern.sub(repl, key)
        if new != key and new in known:
            return new
    return key


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a truncated/corrupt header
        raise UserError(f"cannot read {path}: {exc} (truncated or corrupt checkpoint? re-download or re-save "
                        f"it)") from exc


def _shards(directory: Path) -> list:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / f for f in files]
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise MissingInput(f"no safetensors checkpoint in {directory} (expected {WEIGHTS_FILE}, model.safetensors "
                       "or model.safetensors.index.json)")


def _read_tensors(path: Path) -> Iterator[tuple]:
    f = _open_safetensors(path)
    with f:
        for key in f.keys():
            try:
                yield key, f.get_tensor(key)
            except Exception as exc:
                raise UserError(f"cannot read tensor {key!r} from {path}: {exc} (truncated or corrupt "
                                f"checkpoint?)") from exc


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        if old is not None and old.shape != tensor.shape:
            raise UserError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(old.shape)}")
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise KeyError(f"checkpoint tensor {name} matches nothing in {type(model).__name__}")


def _check_complete(model: nn.Module, source) -> None:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    missing = [n for n, t in tensors if t is not None and t.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"checkpoint {source} is incomplete: no values for {shown} (truncated download or wrong "
                        f"model?)")


def _nf4_layer(model: nn.Module, name: str, spec: dict) -> NF4Linear:
    layer = NF4Linear(spec["in_features"], spec["out_features"], spec["bias"], blocksize=spec["blocksize"],
                      double_quant=spec["double_quant"], weight_dtype=getattr(torch, spec["dtype"]), device="meta")
    _set_submodule(model, name, layer)
    return layer


def load_quantized(directory, config: QuantizeConfig | None = None, *, model_class: str | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Load a quantized model from a local directory; returns it on the CPU, in eval mode.

    Recognized, in this order: our format (nf4_model.safetensors), a bitsandbytes 4-bit NF4
    checkpoint (config.json with a bitsandbytes quantization_config), or a float checkpoint, which is
    quantized per `config` as its tensors stream in. `dtype` casts the floating-point tensors that
    stay dense (norms, embeddings, projector, lm_head).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise MissingInput(f"{config_path} not found: load_quantized needs a model directory")
    config_dict = json.loads(config_path.read_text())
    shards = _shards(directory)
    if shards[0].name == WEIGHTS_FILE:
        model = _load_ours(shards[0], config_dict, model_class)
    else:
        qc = config_dict.get("quantization_config") or {}
        if qc.get("quant_method") == "bitsandbytes" and (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
            if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
                raise UserError(f"{directory} is a bitsandbytes {qc.get('bnb_4bit_quant_type')} checkpoint; only "
                                f"nf4 loads")
            model = _load_bnb(shards, config_dict, model_class)
        elif qc:
            raise UserError(f"{directory}: quantization_config {qc.get('quant_method')!r} is not supported")
        else:
            model = _load_float(shards, config_dict, model_class, config or QuantizeConfig())
    _check_complete(model, directory)
    for m in model.modules():
        if isinstance(m, NF4Linear) and m.bias is not None:
            m.bias.requires_grad_(False)  # frozen like the weight, as quantize_model leaves it
    if dtype is not None:
        for m in model.modules():
            for key, p in m._parameters.items():
                if p is not None and p.is_floating_point():
                    m._parameters[key] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
    return model.eval()


def _load_ours(path: Path, config_dict: dict, model_class: str | None) -> nn.Module:
    f = _open_safetensors(path)
    with f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not an {FORMAT_NAME} file (metadata format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(f"{path} uses {FORMAT_NAME} version {meta['format_version']}; this m2pt-fast reads up to "
                        f"{FORMAT_VERSION}: upgrade m2pt-fast")
    model = _empty_model(config_dict, model_class or meta.get("model_class"))
    for name, spec in json.loads(meta["nf4_layers"]).items():
        _nf4_layer(model, name, spec)
    loaded = {}
    for key, tensor in _read_tensors(path):
        _assign(model, key, tensor)
        loaded[key] = tensor
    for name, target in json.loads(meta.get("aliases", "{}")).items():
        if target not in loaded:
            raise UserError(f"{path}: {name} aliases {target}, which the file lacks (corrupt checkpoint)")
        _assign(model, name, loaded[target])
    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.nf4_weight()  # validates sizes: a mismatched or hand-edited file fails here, not mid-forward
    return model


def _load_bnb(shards: list, config_dict: dict, model_class: str | None) -> nn.Module:
    """transformers' bitsandbytes 4-bit serialization: a Linear's `weight` holds the packed codes and
    `weight.*` keys its statistics; a layer is rebuilt once all its keys have been seen."""
    model = _empty_model(config_dict, model_class)
    known = {n for n, _ in list(model.named_parameters()) + list(model.named_buffers())}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pending: dict = {}  # layer name -> its weight.* tensors, until the layer is complete
    for shard in shards:
        for key, tensor in _read_tensors(shard):
            match = re.match(r"^(.*)\.weight(\..*)?$", key)
            layer = _rename(match.group(1) + ".weight", known)[: -len(".weight")] if match else None
            # a quantized layer's `weight` holds packed codes, shape (bytes, 1), uint8 or another
            # dtype (bnb_4bit_quant_storage); its `weight.*` keys hold the statistics
            packed = match and not match.group(2) and tensor.dim() == 2 and tensor.shape[1] == 1 and (
                tensor.dtype == torch.uint8 or (layer in linears and linears[layer].in_features != 1))
            if match and layer in linears and (match.group(2) or packed):
                pending.setdefault(layer, {})["weight" + (match.group(2) or "")] = tensor
                continue
            _assign(model, _rename(key, known), tensor)
    for layer, tensors in pending.items():
        if "weight.quant_state.bitsandbytes__nf4" not in tensors:
            raise UserError(f"bitsandbytes checkpoint: {layer}.weight is stored as uint8 but has no "
                            "quant_state.bitsandbytes__nf4 entry (fp4, 8-bit or truncated checkpoint?)")
        q = NF4Weight.from_bnb_state_dict(tensors, "weight")
        linear = linears[layer]
        nf4 = NF4Linear(q.shape[1], q.shape[0], linear.bias is not None, blocksize=q.blocksize,
                        double_quant=q.double_quant, weight_dtype=q.dtype, device="meta")
        nf4.set_nf4(q)
        nf4.bias = linear.bias  # already loaded (or still meta, then reported as missing)
        _set_submodule(model, layer, nf4)
    return model


def _load_float(shards: list, config_dict: dict, model_class: str | None, config: QuantizeConfig) -> nn.Module:
    """A float checkpoint, quantized while streaming: each targeted weight is quantized as soon as it
    is read and its dense copy dropped, so peak memory is the quantized model plus one tensor."""
    model = _empty_model(config_dict, model_class)
    known = {n for n, _ in list(model.named_parameters()) + list(model.named_buffers())}
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and config.wants(n)}
    for shard in shards:
        for key, tensor in _read_tensors(shard):
            name = _rename(key, known)
            layer, _, leaf = name.rpartition(".")
            if layer in targets:
                linear = targets[layer]
                if leaf == "weight":
                    nf4 = NF4Linear.from_nf4(nf4_quantize(tensor, config.blocksize, config.double_quant))
                    nf4.bias = linear.bias
                    targets[layer] = nf4
                    _set_submodule(model, layer, nf4)
                    continue
                if leaf == "bias" and isinstance(linear, NF4Linear):
                    linear.bias = nn.Parameter(tensor, requires_grad=False)
                    continue
            _assign(model, name, tensor)
    unquantized = [n for n, m in targets.items() if not isinstance(m, NF4Linear)]
    if unquantized:
        raise UserError(f"float checkpoint lacks the weights of {unquantized[:5]} (truncated checkpoint?)")
    return model
