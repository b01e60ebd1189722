"""gradsim run (main.py): parse flags over .env defaults, run the study, print the summary."""

from __future__ import annotations

from typing import Optional

from gradsim.cli.common import config_from_args, format_cost, format_summary, reports_errors


@reports_errors
def main(argv: Optional[list[str]] = None) -> int:
    from gradsim.study.run import run

    result = run(config_from_args(argv))
    results = list(result["settings"].values()) if "settings" in result else [result]
    for r in results:
        print(format_summary(r))
    if results[0].get("cost"):
        print(format_cost(results[0]["cost"]))
    return 0
