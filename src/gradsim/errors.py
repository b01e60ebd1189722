"""One exception type for bad input: the CLI turns it into a one-line message and exit code 2."""


class GradsimError(Exception):
    """A user-facing problem: the message names what is wrong and what to do about it."""

    exit_code = 2


def refuse_missing(wanted: list, have, what: str, where: str) -> None:
    """Refuse a list that names items ``have`` lacks: "<where>: N of its M <what> (e.g. X) <are not ...>"; ``what``
    is the items' name, ``where`` what to say of them after the count (a sentence ending in what to do)."""
    missing = [x for x in wanted if x not in have]
    if missing:
        raise GradsimError(f"{len(missing)} of its {len(wanted)} {what} (e.g. {missing[0]}) {where}")


def check_choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GradsimError(f"unknown {flag} {value!r}: choose one of {', '.join(allowed)}")


def check_at_least(minimum: float, requirement: str, flags) -> None:
    """Refuse the first (flag, value) whose value is below ``minimum`` (None: not given), saying
    "<flag> must be <requirement>, got <value>"."""
    for flag, value in flags:
        if value is not None and value < minimum:
            raise GradsimError(f"{flag} must be {requirement}, got {value}")
