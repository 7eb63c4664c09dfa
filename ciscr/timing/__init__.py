"""The timing tools, one subpackage with one face.

    stages.py     where a finished run's time went, from its own records (the time-per-stage
                  table of the run summary, the report and ``ciscr profile``)
    bench.py      ``ciscr bench``: ST vs CISC-R steps, pseudo-labelling, selection, loading
    profiling.py  ``ciscr profile``: real runs stage by stage (timed, profiled)
    steptime.py   ``ciscr profile``'s interleaved pass: training stages side by side
    common.py     written once: the rounds, result rows, the machine and its noise, the report
                  header, tables and files, the command-line checks

Only the stage-time table is imported here (it needs no torch): ``ciscr.runner`` and
``ciscr.report`` use it. The commands register through ``ciscr.timing.bench`` /
``ciscr.timing.profiling`` (``register_cli``).
"""

from ciscr.timing.stages import (
    CATEGORIES,
    NOTE,
    STAGE_ORDER,
    category_totals,
    format_time_table,
    last_iteration,
    median_step_seconds,
    stage_kind,
    stage_time_rows,
    time_table,
)

__all__ = ["CATEGORIES", "NOTE", "STAGE_ORDER", "category_totals", "format_time_table",
           "last_iteration", "median_step_seconds", "stage_kind", "stage_time_rows", "time_table"]
