import os

# Before torch loads libgomp (which reads this once): with the default active waiting, threads of one process spin
# at every barrier for a sibling that another process has descheduled, so two gradsim runs (or a run and a
# notebook) sharing a 2-core machine each ran about 4x slower than one alone; passive waiting costs a run alone
# nothing measurable (docs/benchmarks.md, "Two runs at once"). A value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
