"""Reading and writing OpenPhenom checkpoint directories (`config.json` + `model.safetensors`).

The official `model.safetensors` is not a safetensors file: the official `save_pretrained` writes
`torch.save({"state_dict": ...})`, a torch zip. Copies re-saved as genuine safetensors also exist. Both are read
by their magic bytes; pickled code is never run (`weights_only=True`).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint directory or file camae cannot load; the message names the file and the fix."""


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory holding config.json and "
                              "model.safetensors")
    hint = ""
    if not str(path).startswith((".", "/", "~")) and str(path).count("/") == 1:
        hint = (f" It looks like a Hugging Face id: camae never downloads weights. Download '{path}' yourself "
                "(e.g. `huggingface-cli download recursionpharma/OpenPhenom --local-dir ./OpenPhenom`) and pass "
                "that directory.")
    raise CheckpointError(f"checkpoint directory {p} does not exist.{hint}")


def read_config_json(path: str | os.PathLike) -> dict:
    """The config dict of a checkpoint directory, or of a config.json path."""
    p = Path(path).expanduser()
    file = p if p.suffix == ".json" and p.is_file() else _checkpoint_dir(p) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; an OpenPhenom directory holds config.json and model.safetensors")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); re-download the checkpoint's config.json") from err


def read_state_dict(path: str | os.PathLike, map_location="cpu") -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file in either container, by magic bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; an OpenPhenom directory holds config.json and model.safetensors")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(ZIP_MAGIC):
        return _read_torch_zip(path, map_location)
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        from safetensors import SafetensorError

        try:
            return load_file(path, device=str(map_location))
        except SafetensorError as err:
            raise cut_short(path, f"safetensors: {err}") from err
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path} is a Git LFS pointer, not the weights; fetch the real file "
                              "(`git lfs pull` in the cloned repo, or download it directly)")
    raise cut_short(path, f"neither a torch zip archive nor a safetensors file; starts with {head[:16]!r}")


def cut_short(path: Path, why: str) -> CheckpointError:
    """The one message for a weights file that is not whole: a download cut short, or an HTML error page."""
    return CheckpointError(f"{path} is not a complete checkpoint ({why}); the download was probably cut short or "
                           "saved an error page: download it again")


def _read_torch_zip(path: Path, map_location) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as f:  # a file object: torch >= 2.13 sends '*.safetensors' paths to safetensors
            obj = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds objects other than tensors, and camae never runs pickled code "
                              f"(weights_only=True): {str(err).splitlines()[0]}") from err
    except (RuntimeError, OSError, EOFError) as err:  # a cut zip: miniz errors, or OSError EINVAL on a short seek
        raise cut_short(path, f"torch zip: {str(err).splitlines()[0][:160]}") from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (the official format is "
                              "{'state_dict': {key: tensor}})")
    return dict(state)


def check_state_dict(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path) -> None:
    """Raise CheckpointError listing missing, unexpected and mismatched keys, with what to do."""
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    mismatched = [f"{k}: checkpoint {list(loaded[k].shape)} vs model {list(expected[k].shape)}"
                  for k in expected if k in loaded and loaded[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{path} does not match the model its config.json describes:"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            lines.append(f"  {len(items)} {label}: {shown}")
    prefixes = {k.split(".", 1)[0] for k in unexpected}
    if unexpected and missing and len(prefixes) == 1 and prefixes.pop() in ("module", "model", "_orig_mod"):
        lines.append("  The keys carry a wrapper prefix (DDP / torch.compile / Lightning): strip it before saving.")
    lines.append("  Check that config.json belongs to these weights (encoder/decoder dims, depth), and that the "
                 "file is an OpenPhenom CA-MAE checkpoint; a fine-tuned export from camae holds the same keys.")
    raise CheckpointError("\n".join(lines))


def write_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict,
                     container: str = "torch") -> None:
    """Write config.json and model.safetensors: "torch" = the official torch zip {"state_dict": ...},
    "safetensors" = a genuine safetensors file."""
    if container not in ("torch", "safetensors"):
        raise ValueError(f"container={container!r}; choose 'torch' (official) or 'safetensors'")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if container == "torch":
        torch.save({"state_dict": tensors}, out / "model.safetensors")
    else:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
