"""Packaging: declared dependencies equal the imports, the fairseq-free core imports without
fairseq, and the stack shims can be switched off."""
import ast
import subprocess
import sys

from helpers import REPO

# import name -> distribution name, where they differ
DISTRIBUTION = {"faiss": "faiss-cpu", "sklearn": "scikit-learn", "yaml": "pyyaml"}
# installed by scripts/setup.sh (fairseq-fixed --no-deps), not declared in setup.py
INSTALLED_SEPARATELY = {"fairseq", "fairseq_cli"}


def _imported_top_level(root) -> set:
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _declared(keyword: str) -> set:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    value = next(k.value for k in call.keywords if k.arg == keyword)
    reqs = ast.literal_eval(value)
    if isinstance(reqs, dict):
        reqs = [r for group in reqs.values() for r in group]
    names = set()
    for req in reqs:
        for sep in "<>=!~[; ":
            req = req.split(sep)[0]
        names.add(req.lower())
    return names


def _third_party(names: set) -> set:
    return {DISTRIBUTION.get(n, n).lower().replace("_", "-")
            for n in names - set(sys.stdlib_module_names) - INSTALLED_SEPARATELY - {"trime_fairseq", "__future__"}}


def test_install_requires_equals_package_imports():
    assert _third_party(_imported_top_level(REPO / "trime_fairseq")) == _declared("install_requires")


def test_test_imports_are_declared():
    # the repository's own modules: tests, examples and benchmarks (imported by file or package)
    local = {p.stem for d in ("tests", "examples", "benchmarks") for p in (REPO / d).glob("*.py")}
    local |= {"examples", "benchmarks"}
    needed = _third_party(_imported_top_level(REPO / "tests")) - {n.replace("_", "-") for n in local}
    assert needed <= _declared("install_requires") | _declared("extras_require")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env})


def test_memory_core_imports_without_fairseq():
    proc = _python(
        "import sys; sys.modules['fairseq'] = None\n"
        "import importlib, pkgutil, trime_fairseq.memory as m\n"
        "for info in pkgutil.iter_modules(m.__path__): importlib.import_module('trime_fairseq.memory.' + info.name)\n"
        "import trime_fairseq; assert not trime_fairseq.HAS_FAIRSEQ\n"
        "print(sorted(k for k, v in sys.modules.items() if k.startswith('fairseq') and v is not None))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_shims_can_be_switched_off():
    code = ("import trime_fairseq\nfrom fairseq.data import data_utils\n"
            "print(getattr(data_utils.batch_by_size, '_trime_keeps_last', False))")
    assert _python(code, TRIME_FAIRSEQ_SHIMS="0").stdout.strip() == "False"
    assert _python(code).stdout.strip() == "True"


def test_code_passes_the_linter():
    """``ruff check .`` with the repository's ruff.toml (unused imports, undefined names, ...)."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
