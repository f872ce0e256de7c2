"""The package's import rules (DESIGN.md, "Architecture"), checked two ways.

- Serving loads no training or dataset code: a fresh interpreter imports the serving app
  and the predictors, and no module of ``train``, ``export`` or ``data`` (the readers, the
  sequence store, ...) may have been loaded; a failure names each such module and the import chain that
  brought it in.
- The "never" rules hold for every module of the package: its imports are parsed with
  ``ast``, at top level and inside functions alike (an import deferred to a function is
  still a dependency), and each one that breaks a rule is reported as ``file:line``.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys
from typing import Dict, Iterator, List, Optional, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "torchrec_genrec"

#: What a server imports: the HTTP app and both predictors.
SERVING_ENTRY_POINTS = ("torchrec_genrec.serving.app", "torchrec_genrec.inference",
                        "torchrec_genrec.inference.predictor", "torchrec_genrec.inference.ranker")
#: Modules (and everything under them) a server must not load: the training code, the
#: export, the dataset code (readers, the sequence store and the rest of ``data``).
NOT_FOR_SERVING = ("torchrec_genrec.train", "torchrec_genrec.export", "torchrec_genrec.data")

#: Layer -> the parts of the package it never imports. A layer is a subpackage; ``shared``
#: is every module directly under the package (tokens, config, errors, batch, ...). Nothing
#: imports the ``cli``, and ``ops`` import nothing of the package outside ``ops``
#: (:data:`ONLY`).
NEVER = {
    "modules": ("data", "train", "plans", "models", "inference", "serving", "export"),
    "models": ("data.readers", "data.store", "train", "inference", "serving", "export"),
    "plans": ("models", "train", "data", "inference", "serving", "export"),
    "data": ("models", "train", "inference", "serving", "export"),
    "train": ("inference", "serving", "export"),
    "inference": ("train", "data", "export"),
    "serving": ("train", "data", "export"),
    "export": ("serving",),
    "shared": ("modules", "models", "plans", "data", "train", "inference", "serving", "export"),
}
#: Layer -> the only part of the package it imports.
ONLY = {"ops": "ops"}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# ---------------------------------------------------------------- what serving loads
_PROBE = r"""
import json, sys

importers = {}


class _Recorder:
    # Notes, for each module of the package loaded for the first time, the frame whose
    # import statement asked for it (the first frame outside importlib's machinery).
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torchrec_genrec") and name not in importers:
            frame = sys._getframe(1)
            while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                         or frame.f_globals.get("__name__", "").startswith("importlib")):
                frame = frame.f_back
            importers[name] = ([frame.f_globals.get("__name__", "?"), frame.f_lineno] if frame is not None
                               else ["?", 0])
        return None


sys.meta_path.insert(0, _Recorder())
import importlib

for name in sys.argv[1:]:
    importlib.import_module(name)
import torchrec_genrec

print(json.dumps({"file": torchrec_genrec.__file__, "importers": importers,
                  "loaded": sorted(m for m in sys.modules if m.startswith("torchrec_genrec"))}))
"""


def _chain(name: str, importers: Dict[str, List]) -> str:
    links, seen = [name], {name}
    while name in importers:
        by, line = importers[name]
        links.append(f"{by}:{line}")
        if by in seen or not by.startswith(PACKAGE):
            break
        seen.add(by)
        name = by
    return " <- ".join(links)


def test_serving_loads_no_training_or_dataset_code():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *SERVING_ENTRY_POINTS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert pathlib.Path(report["file"]).resolve().parent == ROOT / PACKAGE, report["file"]
    offenders = [m for m in report["loaded"] if any(_under(m, p) for p in NOT_FOR_SERVING)]
    lines = [_chain(m, report["importers"]) for m in offenders]
    print("\n".join(lines) or "serving loads none of " + ", ".join(NOT_FOR_SERVING))
    assert not offenders, "serving loaded training or dataset code:\n" + "\n".join(lines)


# ---------------------------------------------------------------- the "never" rules
def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> Iterator[Tuple[int, str]]:
    """``(line, module)`` for every import of the package in ``path``, wherever it sits:
    ``from a import b`` counts as importing ``a.b`` when that is a module."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
            for target in sorted(targets):
                yield node.lineno, target


def _layer(module: str) -> Optional[str]:
    """The module's layer: its subpackage, ``shared`` for a module directly under the
    package, None for the ``cli`` (which sits on top)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "shared"
    if (ROOT / PACKAGE / parts[1]).is_dir():
        return parts[1]
    return None if parts[1] == "cli" else "shared"


def import_rule_violations() -> List[str]:
    """Every import of the package that breaks a rule, as ``file:line: what (rule)``."""
    found = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        module = _module_name(path)
        layer = _layer(module)
        if layer is None:
            continue
        for line, target in _imports(path):
            if not _under(target, PACKAGE):
                continue
            inside = target[len(PACKAGE) + 1:]
            where = f"{path.relative_to(ROOT)}:{line}: {module} imports {target}"
            if _under(inside, "cli"):
                found.append(f"{where} (nothing imports the cli)")
            elif layer in ONLY and not _under(inside, ONLY[layer]):
                found.append(f"{where} ({layer} import nothing of the package outside {ONLY[layer]})")
            found += [f"{where} ({layer} never imports {banned})"
                      for banned in NEVER.get(layer, ()) if _under(inside, banned)]
    return found


def test_import_rules_hold_for_every_module():
    found = import_rule_violations()
    print("\n".join(found) or "no import rule broken")
    assert not found, f"{len(found)} import(s) break the design's rules:\n" + "\n".join(found)


def test_the_rule_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker's own check: a deferred import, a relative one and a ``from package
    import submodule`` each count."""
    package = tmp_path / PACKAGE
    for sub in ("inference", "train", "ops"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "train" / "storage.py").write_text("")
    (package / "inference" / "loader.py").write_text(
        "def load():\n    from torchrec_genrec.train import storage\n    return storage\n")
    (package / "ops" / "kernel.py").write_text("from ..inference import loader\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = import_rule_violations()
    assert [f.split(": ")[0] for f in found] == ["torchrec_genrec/inference/loader.py:2",
                                                  "torchrec_genrec/ops/kernel.py:1"], found
