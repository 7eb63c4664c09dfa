"""ciscr: semi-supervised semantic segmentation with CISC-R.

Command line: ``ciscr --help``. Library layers, bottom to top: ``ciscr.data`` ->
``ciscr.models`` -> ``ciscr.cisc`` (the method's maths) -> ``ciscr.engine`` ->
``ciscr.pseudo`` / ``ciscr.selection`` -> ``ciscr.run_services`` -> the method families
(``ciscr.pipeline``, ``ciscr.online``) -> ``ciscr.methods`` (docs/DESIGN.md, tests/test_layers.py).
"""

__version__ = "0.1.0"
