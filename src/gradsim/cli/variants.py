"""gradsim paraphrase (paraphrase.py): build the paraphrased and model-generated variant datasets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from gradsim.cli.common import reports_errors
from gradsim.config import env_defaults
from gradsim.options import Parser, add_quiet_flag, from_args, parse_flags

if TYPE_CHECKING:
    from gradsim.variants.paraphrase import Options


def build_parser() -> Parser:
    from gradsim.variants.paraphrase import Options

    p = Parser(
        prog="paraphrase.py",
        description="Build the variant datasets: 'paraphrased' (user and assistant messages paraphrased separately "
        "by an LLM) and 'model-generated' (the paraphrased prompt + the analysed model's greedy answer). "
        "Resumable: rerun the same command after an interruption.",
    )
    p.add_options(Options)
    add_quiet_flag(p)
    return p


def options_from_args(argv: Optional[list[str]] = None) -> Options:
    from gradsim.variants.paraphrase import Options

    args = parse_flags(build_parser(), argv)
    env = env_defaults()  # MT_MODEL_NAME and MT_DEVICE, as main.py reads them
    return from_args(Options, args, fallback={"model": env.get("model_name"), "device": env.get("device")})


@reports_errors
def paraphrase_main(argv: Optional[list[str]] = None) -> int:
    from gradsim.variants.paraphrase import run

    results = run(options_from_args(argv))
    for kind, c in results.items():
        print(f"{kind}: {c['rows']} rows written, {c['failed']} failed, of {c['inputs']} -> {c['output']}")
    return 0
