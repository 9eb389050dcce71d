"""Which UNet parameters a fine-tune trains: the parameter families and their per-unit block mask.

MemControl (Dutt et al., WACV 2025; code Raman1121/Diffusion_Memorization_HPO at 5a6afdd, cited ``AD`` =
``adaptors.py``, ``HPO`` = ``train_text_to_image_HPO.py``) searches a binary mask over the UNet's transformer
units (``down_blocks.i.attentions.j``, ``mid_block.attentions.0``, ``up_blocks.i.attentions.j``; resnets are
never masked) for one parameter-efficient family. The families, as its code defines them:

- ``attention`` (AD L683-686, L646-651, L78-81): every parameter of every transformer unit trains directly
  (not LoRA): group norm, ``proj_in``/``proj_out``, the block norms, ``attn1``, ``attn2``, ``ff``. A mask bit 0
  freezes only the unit's attention projections (parameter names containing ``attn`` inside its
  ``transformer_blocks``); its ff, norms and projections train whatever the mask says. Mask: every unit
  (16 bits on SD 1.x, AD L1534-1546).
- ``svdiff`` (SV-Diff, Han et al. 2023; AD L521-541, ``svdiff/layers.py`` L41-67, L158-169, L246-313): every
  Conv2d, Linear, GroupNorm and LayerNorm weight is re-expressed as ``U diag(relu(S + delta)) V^T`` (SVD with
  ``full_matrices=False``; a conv weight reshaped to ``out x (in*kh*kw)``; a norm's weight vector as a 1 x C
  matrix, so its ``delta`` is one scalar), ``delta`` starting at 0. Only the deltas train; weights and biases
  are frozen; norm deltas take their own learning rate, 1e-6 (``parse_args.py`` L155-159). A mask bit 0 freezes
  the deltas inside the unit's ``transformer_blocks``; deltas elsewhere (resnets, convs, time embedding, the
  units' norm and projections) always train.
- ``difffit`` (DiffFit, Xie et al. 2023; AD L1117-1163, L953-960, ``difffit/attention.py`` L267-379,
  ``difffit/attention_processor.py`` L1064-1116): scale factors, initialised to 1, on each transformer block's
  ``attn1``, ``attn2`` and ``ff`` residual branches and on each attention's ``to_q``, ``to_k``, ``to_v`` and
  ``to_out.0`` outputs; they train together with every bias and every norm parameter of the UNet. A mask bit 0
  freezes the unit's scale factors only.
- For ``svdiff`` and ``difffit`` the reference's mask has 13 bits on SD 1.x and leaves each up block's third
  unit (``attentions.2``) out of it, always trainable (AD L1409-1421, L1473-1485); diffmem keeps that: an
  up-block unit at index >= 2 is not maskable for these two families.
- ``full``: the whole UNet. ``lora``: diffmem's variant, LoRA (peft) on the attention projections of the
  masked-in units; kept under its own name, not MemControl's.

The edits are expressed with :mod:`torch.nn.utils.parametrize` (SV-Diff's recomposition, DiffFit's scale factors
folded into the linear layers whose outputs they scale, which is exact: ``g * (W x + b) = (g W) x + g b``), so
:meth:`ParameterFamily.bake` leaves a plain UNet of the input's architecture: the checkpoint loads anywhere.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from diffmem.errors import DiffmemError
from diffmem.registry import Configurable, Registry

FAMILIES: Registry[ParameterFamily] = Registry("parameter family")
UNIT_PATTERN = re.compile(r"^((down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.(\d+))$")
NORM_LR = 1e-6  # SV-Diff's 1-D (norm) deltas: parse_args.py L155-159, learning_rate_1d


def transformer_units(unet: nn.Module) -> list[str]:
    """The UNet's transformer units in MemControl's mask order: down blocks, the mid block, up blocks."""
    found = []
    for name, _ in unet.named_modules():
        m = UNIT_PATTERN.match(name)
        if m:
            part = 0 if name.startswith("down") else 2 if name.startswith("up") else 1
            found.append(((part, int(m.group(3) or 0), int(m.group(4) or m.group(5) or 0)), name))
    if not found:
        raise DiffmemError("the UNet has no transformer units (down/mid/up *.attentions.*) to mask")
    return [name for _, name in sorted(found)]


def in_unit(param_name: str, unit: str) -> bool:
    return param_name.startswith(unit + ".")


def in_transformer_blocks(param_name: str, unit: str) -> bool:
    return param_name.startswith(unit + ".transformer_blocks.")


@dataclass
class ParameterFamily(Configurable, ABC):
    """Attach trainable parameters to a UNet (:meth:`attach`), honour a block mask, then :meth:`bake` them in.

    ``mask``: unit name -> trainable (units absent from it are on); see :meth:`maskable_units`."""

    name: ClassVar[str] = "family"

    def maskable_units(self, unet: nn.Module) -> list[str]:
        """The units a mask bit exists for (the order of MemControl's mask)."""
        return transformer_units(unet)

    @abstractmethod
    def attach(self, unet: nn.Module, mask: dict[str, bool]) -> list[dict]:
        """Freeze ``unet``, add and switch on this family's parameters; return optimizer parameter groups
        (dicts with ``params`` and, where the family fixes one, ``lr``)."""

    def bake(self, unet: nn.Module) -> nn.Module:
        """The UNet with the trained parameters folded into plain weights (the default: nothing to fold)."""
        return unet


def check_mask(unet: nn.Module, mask: dict[str, bool]) -> None:
    """Refuse a mask naming a unit the UNet does not have (one line, listing the units it has)."""
    units = transformer_units(unet)
    unknown = sorted(set(mask) - set(units))
    if unknown:
        raise DiffmemError(f"--mask names {unknown}; this UNet's transformer units are {', '.join(units)}")


def _off_units(unet: nn.Module, family: ParameterFamily, mask: dict[str, bool]) -> list[str]:
    check_mask(unet, mask)
    return [u for u in family.maskable_units(unet) if not mask.get(u, True)]


@FAMILIES.register("full")
@dataclass
class FullUNet(ParameterFamily):
    """Every UNet parameter (the mask is not used)."""

    name = "full"

    def attach(self, unet: nn.Module, mask: dict[str, bool]) -> list[dict]:
        unet.requires_grad_(True)
        return [{"params": list(unet.parameters())}]


@FAMILIES.register("attention")
@dataclass
class AttentionWeights(ParameterFamily):
    """MemControl's ``attention`` family (module docstring): the transformer units' own weights."""

    name = "attention"

    def attach(self, unet: nn.Module, mask: dict[str, bool]) -> list[dict]:
        off = _off_units(unet, self, mask)
        unet.requires_grad_(False)
        params = []
        for name, p in unet.named_parameters():
            if "attentions" not in name:  # AD L646-651: names containing "attentions"
                continue
            if "attn" in name.split(".attentions.", 1)[1] and any(in_transformer_blocks(name, u) for u in off):
                continue  # AD L78-81: a mask bit 0 freezes the unit's attn* parameters
            p.requires_grad_(True)
            params.append(p)
        return [{"params": params}]


class SpectralShift(nn.Module):
    """``W = U diag(relu(S + delta)) V^T`` of the weight it was built from (SV-Diff); reshaped back to its shape."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        shape = weight.shape
        matrix = weight.detach().float().reshape(1 if weight.ndim == 1 else shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vh", vh)
        self.shape = shape
        self.delta = nn.Parameter(torch.zeros_like(s))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = self.u @ torch.diag(torch.relu(self.s + self.delta)) @ self.vh
        return w.reshape(self.shape).to(weight.dtype)


SVD_LAYERS = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)


@FAMILIES.register("svdiff", "sv-diff")
@dataclass
class SVDiff(ParameterFamily):
    """MemControl's ``svdiff`` family (module docstring): spectral shifts of every weight."""

    name = "svdiff"
    norm_lr: float = NORM_LR

    def maskable_units(self, unet: nn.Module) -> list[str]:
        return [u for u in transformer_units(unet) if not (u.startswith("up_blocks") and int(u.rsplit(".", 1)[1]) >= 2)]

    def attach(self, unet: nn.Module, mask: dict[str, bool]) -> list[dict]:
        off = _off_units(unet, self, mask)
        unet.requires_grad_(False)
        matrices, norms = [], []
        for name, module in list(unet.named_modules()):
            if not isinstance(module, SVD_LAYERS) or getattr(module, "weight", None) is None:
                continue
            shift = SpectralShift(module.weight)
            parametrize.register_parametrization(module, "weight", shift, unsafe=True)
            frozen = any(in_transformer_blocks(name + ".weight", u) for u in off)
            shift.delta.requires_grad_(not frozen)
            if not frozen:
                (norms if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) else matrices).append(shift.delta)
        return [{"params": matrices}, {"params": norms, "lr": self.norm_lr}]

    def bake(self, unet: nn.Module) -> nn.Module:
        """Fold every non-zero shift into its weight; a layer whose delta stayed 0 gets its original weight back
        bit for bit (the SVD round trip is not exact), so untouched weights stay untouched."""
        for module in list(unet.modules()):
            if parametrize.is_parametrized(module, "weight"):
                shift = module.parametrizations.weight[0]
                changed = bool((shift.delta != 0).any())
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=changed)
        return unet


class Scaled(nn.Module):
    """``g * tensor`` along dim 0 (an output row scale); ``g`` is a product of shared scale factors."""

    def __init__(self, *scales: nn.Parameter):
        super().__init__()
        self.scales = nn.ParameterList(scales)

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        g = self.scales[0]
        for s in self.scales[1:]:
            g = g * s
        return tensor * g.view(-1, *([1] * (tensor.ndim - 1))).to(tensor.dtype)


def _scale(linear: nn.Linear, *scales: nn.Parameter) -> None:
    for attr in ("weight", "bias"):
        if getattr(linear, attr, None) is not None:
            parametrize.register_parametrization(linear, attr, Scaled(*scales), unsafe=True)


@FAMILIES.register("difffit")
@dataclass
class DiffFit(ParameterFamily):
    """MemControl's ``difffit`` family (module docstring): biases, norms and scale factors."""

    name = "difffit"

    maskable_units = SVDiff.maskable_units

    def attach(self, unet: nn.Module, mask: dict[str, bool]) -> list[dict]:
        from diffusers.models.attention import BasicTransformerBlock

        off = _off_units(unet, self, mask)
        unet.requires_grad_(False)
        params = []
        for name, p in unet.named_parameters():  # AD L953-960: names containing bias or norm train
            if name.endswith("bias") or "norm" in name:
                p.requires_grad_(True)
                params.append(p)
        for name, block in list(unet.named_modules()):
            if not isinstance(block, BasicTransformerBlock):
                continue
            frozen = any(in_transformer_blocks(name + ".x", u) for u in off)
            ff_out = block.ff.net[-1]
            gamma_ff = nn.Parameter(torch.ones(ff_out.out_features), requires_grad=not frozen)
            _scale(ff_out, gamma_ff)
            gammas = [gamma_ff]
            for attn in (block.attn1, block.attn2):
                if attn is None:
                    continue
                branch = nn.Parameter(torch.ones(attn.to_out[0].out_features), requires_grad=not frozen)
                per = {k: nn.Parameter(torch.ones(getattr(attn, k).out_features), requires_grad=not frozen)
                       for k in ("to_q", "to_k", "to_v")}
                out = nn.Parameter(torch.ones(attn.to_out[0].out_features), requires_grad=not frozen)
                for k, g in per.items():
                    _scale(getattr(attn, k), g)
                _scale(attn.to_out[0], out, branch)  # gamma_fnn on to_out.0, gamma_attn on the branch
                gammas += [branch, out, *per.values()]
            if not frozen:
                params += gammas
        return [{"params": params}]

    def bake(self, unet: nn.Module) -> nn.Module:
        for module in list(unet.modules()):
            for attr in ("weight", "bias"):
                if parametrize.is_parametrized(module, attr):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        return unet


@FAMILIES.register("lora")
@dataclass
class LoRAAttention(ParameterFamily):
    """diffmem's variant, not MemControl's: LoRA (peft) of rank ``rank`` on the attention projections of the
    masked-in units; fused into the weights by :meth:`bake`."""

    name = "lora"
    rank: int = 4

    def attach(self, unet: nn.Module, mask: dict[str, bool]) -> list[dict]:
        from peft import LoraConfig

        off = _off_units(unet, self, mask)
        unet.requires_grad_(False)
        targets = [n for n, _ in unet.named_modules()
                   if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n)
                   and any(in_unit(n, u) for u in self.maskable_units(unet) if u not in off)]
        if not targets:
            raise DiffmemError("the block mask leaves no attention projection for LoRA to train")
        unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.rank, init_lora_weights="gaussian",
                                    target_modules=targets))
        return [{"params": [p for p in unet.parameters() if p.requires_grad]}]

    def bake(self, unet: nn.Module) -> nn.Module:
        unet.fuse_lora()
        unet.unload_lora()
        return unet


def make_family(name: str, **options) -> ParameterFamily:
    return FAMILIES.create(name, **options)
