"""The analysis notebook run headless (CI and ``gradsim analyze --execute notebooks/analysis.ipynb``)."""

from __future__ import annotations

from pathlib import Path

from gradsim.analysis.figures import load_runs


def execute_notebook(
    notebook, results_dir=None, computation_type: str = "gradient-similarity", timeout: int = 1800
) -> Path:
    """Run the notebook with nbclient on ``results_dir`` (default: the repository's data/) and write the
    executed copy beside the results, leaving the committed notebook without outputs. A cell that
    raises makes this raise (nbclient's CellExecutionError)."""
    import os

    import nbformat
    from nbclient import NotebookClient

    from gradsim.layout import default_output_dir

    results_dir = Path(results_dir or os.environ.get("GRADSIM_RESULTS_DIR") or default_output_dir()).resolve()
    runs = load_runs(results_dir, computation_type)  # a clear error before a kernel starts
    nb = nbformat.read(notebook, as_version=4)
    old = {k: os.environ.get(k) for k in ("GRADSIM_RESULTS_DIR", "GRADSIM_COMPUTATION_TYPE")}
    os.environ.update(GRADSIM_RESULTS_DIR=str(results_dir), GRADSIM_COMPUTATION_TYPE=computation_type)
    try:  # the kernel inherits this process's environment
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(Path(notebook).resolve().parent)}},
        ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = next(iter(runs.values())).path.parent / Path(notebook).name.replace(".ipynb", ".executed.ipynb")
    nbformat.write(nb, out)
    return out
