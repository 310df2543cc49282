"""What every command line shares: ``--help`` that marks required options and shows defaults,
refusals that name only the settings that differ (not two whole dicts), and the sampler as
``sample.py`` flags (for callers that drive it, like the demo).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of every entry point: required options say so, and every set default is shown.

    argparse's own ArgumentDefaultsHelpFormatter also prints "(default: None)" for options
    whose default is decided later (by the run, the device): those stay as their help says.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)".strip()
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        shown = not unset and action.option_strings
        if shown and "default" not in text and "%(default)" not in text:
            text = f"{text} (default: %(default)s)".strip()
        return text


def int_at_least(low: int):
    """argparse type for counts and sizes: a refusal names the value and the bound at the command
    line, not a failure deep in the job (``int_at_least(1)`` for counts, ``(0)`` where 0 means none)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value
    return parse


def differences(old: Mapping, new: Mapping, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """``key.sub: old -> new`` for every leaf that differs, dotted through nested dicts.

    Why: a refusal that prints two whole settings dicts hides the one value that changed;
    ``skip`` names dotted keys that may differ (a moved source folder, say).
    """
    diffs: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        name, a, b = f"{prefix}{key}", old.get(key), new.get(key)
        if name in skip:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += differences(a, b, f"{name}.", skip)
        elif a != b:
            diffs.append(f"{name}: {'(absent)' if key not in old else repr(a)} -> {'(absent)' if key not in new else repr(b)}")
    return diffs


def sampler_flags(sampler: Any) -> list[str]:
    """Flags that make ``sample.py`` use exactly ``sampler`` (a ``config.SamplerConfig``), whatever the
    checkpoint recommends: each field ``x_y`` is sample.py's ``--x-y``.

    Why: a caller that holds its own sampler (the demo after its config changed, a sweep) must not
    inherit any field from the run's config.yaml: every field is passed over the EDM base."""
    flags = ["--preset", "edm"]
    for f in dataclasses.fields(sampler):
        value = getattr(sampler, f.name)
        if value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            flags += ["--" + f.name.replace("_", "-"), text]
    return flags
