"""Numbers in the config file are never YAML switches.

YAML reads a bare on, off, yes, no, true or false as a boolean, and pydantic takes a
boolean as 1 or 0 where a number goes: `port: on` would be port 1, `weight: yes` a
weight of 1. Every number the file may hold refuses them (`NOT_A_SWITCH`).
"""

from __future__ import annotations

from pydantic import BeforeValidator


def not_a_switch(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError(
            "must be a number, not a switch (YAML reads on, off, yes, no, true and false as one)"
        )
    return value


NOT_A_SWITCH = BeforeValidator(not_a_switch)
