"""The package imports without circles: every module can be imported first, on its own."""

import importlib
import pkgutil
import subprocess
import sys

import ciscr

MODULES = ["ciscr.cli", "ciscr.commands", "ciscr.predict", "ciscr.report", "ciscr.timing.bench",
           "ciscr.visualize", "ciscr.export", "ciscr.demo", "ciscr.runner", "ciscr.methods",
           "ciscr.pipeline", "ciscr.online", "ciscr.engine.online", "ciscr.run_services",
           "ciscr.run_setup", "ciscr.stage_plans", "ciscr.loading", "ciscr.predict_io",
           "ciscr.run_facts", "ciscr.engine.streams"]


def test_every_module_imports_first_in_a_fresh_interpreter():
    # A circle (a imports b imports a) shows up as an ImportError / AttributeError when one of
    # its modules is the FIRST to be imported; so each module gets its own interpreter.
    known = {m.name for m in pkgutil.walk_packages(ciscr.__path__, "ciscr.")}
    assert set(MODULES) <= known
    # All at once: each interpreter mostly waits on importing torch, and CI has 2 cores.
    procs = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name in MODULES}  # fmt: skip
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-1500:])


def test_command_modules_do_not_import_the_cli():
    # The sub-commands register in ciscr.commands; only the CLI imports them (no circle).
    for mod in ("predict", "report", "timing.bench", "timing.profiling", "visualize", "export",
                "demo", "runner"):
        source = importlib.util.find_spec(f"ciscr.{mod}").origin
        text = open(source).read()
        assert "from ciscr.cli import" not in text and "import ciscr.cli" not in text, mod
