"""Writing a new pipeline folder from a loaded model with some components replaced: what every command that
changes weights (``diffmem mitigate`` for weight-level methods, ``diffmem finetune``) writes.

The input folder is never written to: an output equal to, inside or containing it is refused, as is an
existing folder diffmem did not write (unless ``force``, which still only replaces diffmem's own files); the
folder is built in a temporary sibling and renamed into place (:func:`diffmem.outputs.staged`). Replaced
components keep the dtype the input stored them in (an fp16 input stays fp16), so the output loads wherever
the input did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from diffmem.errors import DiffmemError
from diffmem.io import atomic_write_text
from diffmem.models.model import DiffusionModel
from diffmem.outputs import check_output_dir, staged


def stored_dtype(component: Path) -> torch.dtype | None:
    """The floating dtype of a component folder's safetensors weights (None when there are none)."""
    from safetensors import safe_open

    for f in sorted(component.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                t = fh.get_slice(key)
                dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(t.get_dtype())
                if dtype is not None:
                    return dtype
    return None


def cast_safetensors(component: Path, dtype: torch.dtype) -> None:
    """Rewrite every safetensors file of ``component`` with its floating tensors cast to ``dtype``."""
    from safetensors.torch import load_file, save_file

    for f in sorted(component.glob("*.safetensors")):
        tensors = load_file(str(f))
        if all(not t.is_floating_point() or t.dtype == dtype for t in tensors.values()):
            continue
        save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}, str(f),
                  metadata={"format": "pt"})


def write_checkpoint(out_dir: str | Path, model: DiffusionModel, components: dict[str, Any], command: str,
                     record_name: str, record: dict[str, Any], force: bool = False) -> Path:
    """A new pipeline folder at ``out_dir``: ``components`` (name -> module with ``save_pretrained``) saved in
    the input's stored dtype, every other entry of ``model.folder`` copied, ``record`` written as
    ``record_name`` (JSON). Returns ``out_dir``."""
    if model.folder is None:
        raise DiffmemError("writing a new checkpoint needs a model loaded from a folder")
    out = Path(out_dir)
    input_names = [p.name for p in model.folder.iterdir()]
    check_output_dir(out, command, [model.folder], force, writes=[*input_names, record_name])
    with staged(out, command) as staging:
        shutil.copytree(model.folder, staging, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if Path(d) == model.folder and n in components])
        for name, module in components.items():
            stored = stored_dtype(model.folder / name)
            module.save_pretrained(staging / name, safe_serialization=True)
            if stored is not None:
                cast_safetensors(staging / name, stored)
        atomic_write_text(staging / record_name, json.dumps(record, indent=2, default=str))
    return out
