"""Files written by ``torch.save`` (``.pth``, ``.pt``, ``.bin``): the zip format and the legacy (pre-1.6) one.

Read only through ``torch.load(path, map_location="cpu", weights_only=True)``: its restricted unpickler builds
tensors and plain containers and refuses any other Python object, so a file carrying a payload (an object whose
``__reduce__`` runs a command) fails before anything runs. The state dict may be wrapped, as training scripts save
it: ``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``, ``{"module": ...}``.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings

import torch

from vggnet.base.errors import CheckpointError

WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net", "ema")
#: torch's weights-only unpickler warns (on stderr, with its source line) about any pickle protocol but 2.
_PROTOCOL_WARNING = r"Detected pickle protocol \d+ in the checkpoint"
_GLOBAL = re.compile(r"(unsupported\s+GLOBAL\s+[\w.]+|Unsupported global:\s*GLOBAL\s+[\w.]+)", re.IGNORECASE)


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file, unwrapped to the state dict; CheckpointError (one line, naming the
    file) for code-carrying pickles, truncated or corrupt files and anything that is not a state dict."""
    try:
        with warnings.catch_warnings():  # a file's pickle protocol is no concern of the user's: errors say what matters
            warnings.filterwarnings("ignore", message=_PROTOCOL_WARNING, category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found or "Weights only load failed" in str(err):
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} holds Python objects besides tensors{what}, which could run code when unpickled; vggnet "
                "loads torch files only with weights_only=True and refused it: save a plain state dict "
                "(torch.save(model.state_dict(), path)) from code you trust") from None
        raise CheckpointError(f"{path} is a corrupt torch file ({' '.join(str(err).split())[:200]})") from None
    except (EOFError, RuntimeError, ValueError, OSError, KeyError, AttributeError, IndexError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"{path} is truncated or corrupt: torch cannot read it ({reason}); download or save it "
                              "again") from None
    if _is_state(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in WRAPPERS:
            if _is_state(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(sorted(map(str, obj))[:6])
        raise CheckpointError(f"{path} holds a dict with keys [{keys}], not a state dict of tensors (looked inside "
                              f"{', '.join(WRAPPERS)} too)")
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
