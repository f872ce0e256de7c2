"""`genrec doctor`: the tested stack, an older one known to load (reported as untested, not
a failure: the GPU check goes on with it), and a stack that does not import at all."""

import json
import os
import subprocess
import sys

from conftest import ROOT
from torchrec_genrec import stack


def _with_versions(monkeypatch, versions):
    monkeypatch.setattr(stack, "_dist_version", lambda *names: next((versions[n] for n in names if n in versions),
                                                                    None))


def _by_name(checks):
    return {c.name: c for c in checks}


def test_the_known_to_load_stack_is_untested_not_broken(monkeypatch):
    _with_versions(monkeypatch, {"torch": "2.11.0+cu130", "fbgemm-gpu": "1.6.0", "torchrec": "1.6.1",
                                 "torchx": "0.7.0"})
    checks = _by_name(stack.run_checks())
    for name in ("torch", "fbgemm-gpu", "torchrec"):
        assert checks[name].ok and checks[name].untested, checks[name]
        assert "known to load" in checks[name].detail
    assert checks["torchx"].ok and not checks["torchx"].untested


def test_an_untried_version_is_named_as_such(monkeypatch):
    _with_versions(monkeypatch, {"torch": "2.13.0", "fbgemm-gpu-cpu": "1.8.0", "torchrec": "1.7.0",
                                 "torchx": "0.7.0"})
    checks = _by_name(stack.run_checks())
    assert checks["torchrec"].untested and "untried" in checks["torchrec"].detail
    assert not checks["torch"].untested
    _with_versions(monkeypatch, {"torch": "2.13.0", "fbgemm-gpu-cpu": "1.8.0", "torchx": "0.7.0"})
    missing = _by_name(stack.run_checks())["torchrec"]
    assert not missing.ok and "not installed" in missing.detail


def test_doctor_reports_a_torchrec_that_does_not_import(tmp_path):
    """The doctor runs before anything imports torchrec, so a broken one is a report line
    (exit 1), not a traceback; --report records the exit status."""
    report = tmp_path / "report.json"
    code = ("import sys; sys.modules['torchrec'] = None\n"
            "from torchrec_genrec import cli\n"
            f"sys.exit(cli.main(['--report', {str(report)!r}, 'doctor']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 1, out.stderr
    assert "BAD       torchrec import" in out.stdout and "Traceback" not in out.stderr
    assert json.loads(report.read_text())["exit"] == 1
