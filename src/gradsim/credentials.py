"""The secrets gradsim reads (HF_TOKEN, OPENAI_API_KEY): read only where they are needed, never stored in a
Config, a record or a log; ``redact`` takes them out of any text that may reach one."""

from __future__ import annotations

import os
from typing import Optional


def hf_token() -> Optional[str]:
    """The Hugging Face token, read only where needed and never stored in a Config or written anywhere."""
    return os.environ.get("HF_TOKEN") or None


def redact(text: str) -> str:
    """Remove secrets from text that may reach a log or an error message."""
    for name in ("HF_TOKEN", "OPENAI_API_KEY"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
