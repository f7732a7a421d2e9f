"""The wheel: one ``qpass`` namespace (kernels/ and passes/ install as qpass.kernels and qpass.passes)."""

import importlib.metadata
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_one_namespace_and_imports(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("qpass-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.startswith("qpass-")}
    assert top_level == {"qpass"}, top_level
    assert "qpass/kernels/ops.py" in names and "qpass/passes/quantize_linears.py" in names
    # every source file is packaged: qpass/** as is, kernels/ and passes/ under qpass/
    sources = [p.relative_to(ROOT).as_posix() for p in ROOT.glob("qpass/**/*.py")]
    sources += ["qpass/" + p.relative_to(ROOT).as_posix()
                for d in ("kernels", "passes") for p in (ROOT / d).glob("*.py")]
    missing = sorted(set(sources) - set(names))
    assert not missing, f"not in the wheel: {missing}"

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -S: no site-packages .pth files (so not the editable install); torch from this environment only.
    env = {"PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    code = (
        "import qpass, torch; assert qpass.__file__.startswith(%r), qpass.__file__; "
        "m = qpass.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), 'nf4'); print(m(torch.randn(2, 64)).shape)"
    ) % str(site)
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 64])" in out.stdout


def test_the_kernels_folder_imported_as_a_top_level_package_stands_aside_for_the_installed_one():
    """With the repository root on sys.path (``python -m pytest``, ``python -c`` in a checkout), the kernels/
    folder is a top-level package "kernels", the name of the Hugging Face package that transformers
    (>= 5.25) requires and imports. ``import kernels`` must give the installed package, so transformers
    loads, and must not register the qpass ops a second time, from a second copy of their module: the op
    bodies would read that copy's globals, and patching qpass.kernels.ops (as the tests do) would no
    longer reach them."""
    try:
        installed = str(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
    except importlib.metadata.PackageNotFoundError:  # transformers < 5.25 does not require it
        pytest.skip("the Hugging Face kernels package is not installed: nothing to stand aside for "
                    "(the next test covers that case)")
    assert Path(installed).is_file() and Path(installed).parent != ROOT / "kernels", installed
    code = (
        "import sys, torch, qpass; from qpass.kernels import ops; from qpass.formats import quantize_weight\n"
        "import transformers.models.bert.modeling_bert\n"  # transformers >= 5.25: from kernels import ...
        "import kernels\n"
        "assert kernels.__file__ == %r, kernels.__file__\n"
        "def consulted(x): raise LookupError('consulted')\n"
        "ops.use_triton = consulted\n"
        "layout, t = quantize_weight(torch.randn(8, 64), qpass.NF4Config())\n"
        "op, args = layout.linear_call(torch.randn(2, 64), t, None)\n"
        "try:\n    op(*args)\nexcept LookupError:\n    print('qpass.kernels.ops runs the op')\n"
    ) % installed
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)  # -c: root on path
    assert out.returncode == 0, out.stderr
    assert "qpass.kernels.ops runs the op" in out.stdout, out.stdout


def test_the_kernels_folder_imported_as_a_top_level_package_is_empty_when_no_other_is_installed():
    """With no other "kernels" to be found (site-packages left off sys.path), ``import kernels`` in a
    checkout gives the folder itself, as an empty package that registers no op."""
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "import kernels\n"
        "assert kernels.__file__ == %r, kernels.__file__\n"
        "assert kernels.__all__ == [] and 'kernels.ops' not in sys.modules and 'torch' not in sys.modules\n"
        "print('empty')\n"
    ) % str(ROOT / "kernels" / "__init__.py")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)  # -c: root on path
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "empty", out.stdout
