"""Every kernel module has a runtime caller through kernels/dispatch.py, and nothing else in qforge
picks a kernel module: dispatch is the one place that chooses an implementation by device."""
import re
from pathlib import Path

import pytest

import qforge
from qforge.kernels import dispatch

KERNELS = Path(qforge.__file__).parent / "kernels"
SOURCE = (KERNELS / "dispatch.py").read_text()
MODULES = sorted(p.stem for p in KERNELS.glob("*.py") if p.stem not in ("__init__", "dispatch"))
SHARED = {"triton_util"}  # helpers of the Triton modules, reached through them


def _dispatched_calls() -> dict[str, set[str]]:
    """{module: functions dispatch calls on it}: `cpu.f(` / `reference.f(` and `_triton("m").f(`
    (or `_triton_dequant().f(`)."""
    calls: dict[str, set[str]] = {}
    for mod, fn in re.findall(r'_triton\("(\w+)"\)\.(\w+)\(', SOURCE):
        calls.setdefault(mod, set()).add(fn)
    for fn in re.findall(r"_triton_dequant\(\)\.(\w+)\(", SOURCE):
        calls.setdefault("triton_dequant", set()).add(fn)
    for mod in ("cpu", "reference"):
        for fn in re.findall(rf"\b{mod}\.(\w+)\(", SOURCE):
            calls.setdefault(mod, set()).add(fn)
    return calls


def test_every_kernel_module_is_called_through_dispatch():
    calls = _dispatched_calls()
    assert set(MODULES) - SHARED <= set(calls), f"modules without a dispatch caller: {set(MODULES) - SHARED - set(calls)}"
    for mod in SHARED:  # imported by a module that dispatch calls
        users = [m for m in calls if m.startswith("triton_") and f"from .{mod} import" in (KERNELS / f"{m}.py").read_text()]
        assert users, f"{mod} is used by no dispatched module"


def test_the_functions_dispatch_calls_exist():
    pytest.importorskip("triton")
    for mod, fns in _dispatched_calls().items():
        module = dispatch._triton(mod) if mod.startswith("triton_") else getattr(dispatch, mod)
        assert module is not None, f"qforge.kernels.{mod} does not import"
        for fn in fns:
            assert callable(getattr(module, fn, None)), f"dispatch calls {mod}.{fn}, which does not exist"


def test_only_dispatch_picks_a_kernel_module():
    """Outside qforge/kernels, code imports dispatch (and the device-independent reference's helpers),
    never a CPU or Triton kernel module."""
    pattern = re.compile(r"(?:from\s+\S*kernels\s+import\s+([\w, ]+))|(?:from\s+\S*kernels\.(\w+)\s+import)")
    offenders = []
    for path in Path(qforge.__file__).parent.rglob("*.py"):
        if path.parent == KERNELS:
            continue
        for names, module in pattern.findall(path.read_text()):
            used = {n.strip() for n in names.split(",") if n.strip()} | ({module} if module else set())
            if used - {"dispatch", "reference"}:
                offenders.append(f"{path.relative_to(KERNELS.parent)}: {sorted(used)}")
    assert not offenders, offenders
