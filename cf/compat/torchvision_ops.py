"""Make `import torchvision` work on the CPU-only torch wheel.

torchvision 0.28 is the release that pins torch 2.13, but its compiled ops are built against the
CUDA torch libraries. On the CPU wheel the C extension does not load, and torchvision's
fake-tensor registrations for `torchvision::nms` / `torchvision::qnms` then fail with
``operator torchvision::nms does not exist``. Because torchmetrics, lightning, open_clip, timm and
lpips all import torchvision, everything fails with it.

Declaring the two op schemas before torchvision is first imported lets every import succeed
(models, transforms, LPIPS, open_clip); only `torchvision.ops.nms` itself stays unusable, which cf
never calls. `make install` writes a ``.pth`` file that installs an import hook, so the schemas are
declared lazily at the first `import torchvision` of any interpreter in the environment.

On a CUDA torch (or any build whose torchvision extension loads) this is a no-op.
"""

from __future__ import annotations

import importlib.abc
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "cf_torchvision_ops.pth"
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_state = {"applied": False, "library": None}


def _extension_loads() -> bool:
    """True if torchvision's compiled ops would register themselves."""
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        return True
    return False


def declare_missing_ops() -> bool:
    """Declare the op schemas torchvision expects; returns True if anything was declared."""
    if _state["applied"]:
        return False
    _state["applied"] = True
    if _extension_loads():
        return False
    import torch

    declared = False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if torch._C._dispatch_has_kernel(f"torchvision::{name}") or _schema_exists(name):
            continue
        lib.define(schema)
        declared = True
    _state["library"] = lib  # a Library object must stay alive for its definitions to stay
    return declared


def _schema_exists(name: str) -> bool:
    import torch

    try:
        return torch._C._jit_get_schemas_for_operator(f"torchvision::{name}") != []
    except RuntimeError:
        return False


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """Runs `declare_missing_ops` just before torchvision is imported, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionHook)]
            declare_missing_ops()
        return None  # let the normal finders import it


def install_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionHook())


def write_pth(site_packages: str | None = None) -> Path:
    """Write the .pth file that installs the hook at interpreter start-up (idempotent)."""
    site = Path(site_packages or sysconfig.get_paths()["purelib"])
    pth = site / PTH_NAME
    line = "import cf.compat.torchvision_ops as _m; _m.install_hook()\n"
    if not pth.exists() or pth.read_text() != line:
        pth.write_text(line)
    return pth


if __name__ == "__main__":
    path = write_pth()
    print(f"torchvision CPU fix: import hook installed at {path}")
