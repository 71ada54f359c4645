import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\n(.+?)\n```", quick, re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    demo, tests = _commands()
    assert "kneebatch demo" in demo and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci.splitlines()


def test_no_pickle_or_runtime_downloads_in_the_package():
    import ast

    for path in (ROOT / "kneebatch").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        assert "urllib.request" not in text and "requests.get" not in text, path
        # torch.load only as weights (tensors, containers, numbers), never unpickling code
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = [k for k in node.keywords if k.arg == "weights_only" and ast.unparse(k.value) == "True"]
                assert safe, f"{path}:{node.lineno}: torch.load without weights_only=True"


def test_the_column_reference_is_made_from_the_schema():
    from kneebatch.measure import columns_markdown, measurement_schema

    schema = measurement_schema()
    assert all(f.metadata and f.metadata[b"doc"] for f in schema)  # every column says what it is
    assert (ROOT / "docs" / "columns.md").read_text() == columns_markdown(schema), \
        "regenerate: kneebatch columns --markdown > docs/columns.md"


def test_the_readme_is_a_front_page_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 8192
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), (doc.name, target)


def test_importing_kneebatch_sets_no_global_state():
    """A library imported into someone's notebook or pipeline leaves their logging, warnings and
    matplotlib backend as they were (kneebatch quietens pydicom when it reads DICOM, not before)."""
    import subprocess
    import sys

    probe = """
import importlib, logging, pkgutil, sys, warnings
import matplotlib
# the libraries first: their own imports add warning filters and set their loggers' levels
for lib in ("numpy", "scipy.ndimage", "torch", "zarr", "pydicom", "nibabel", "dask", "distributed", "monai",
            "onnx", "onnxruntime", "pyarrow", "pandas", "statsmodels.api", "skimage", "trimesh", "highdicom",
            "rich", "safetensors", "array_api_compat", "numcodecs"):
    importlib.import_module(lib)
state = lambda: (list(warnings.filters), {n: logging.getLogger(n).level for n in ("pydicom", "nibabel", "distributed")},
                 matplotlib.rcParams._get_backend_or_none(), "matplotlib.pyplot" in sys.modules)
before = state()
import kneebatch
for m in pkgutil.walk_packages(kneebatch.__path__, "kneebatch."):
    if m.name == "kneebatch.__main__":  # the command line itself
        continue
    importlib.import_module(m.name)
assert state() == before, (before, state())
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
