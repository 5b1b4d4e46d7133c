"""ART options of the SGLang hook: one definition, read from a launcher's command line, the
environment or a config file, validated before any model loads.

Every option has a flag ``--art-NAME`` (the ``art-sglang`` launcher) and an environment
variable ``ART_NAME`` (plain ``sglang serve``); ``ART_CONFIG=path.json`` or ``.toml`` names a
file of ``{"NAME": value}``. Precedence: launcher flag > environment variable > config file >
default. The launcher writes the flags it was given into the environment, which is how they
reach SGLang's scheduler processes (spawned, so they inherit ``os.environ``): every process
then resolves the same options with :func:`resolve_options`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from art_runtime.policies import PagePolicy, get as get_policy
from art_runtime.policies.dense import ORDERS as DENSE_ORDERS
from art_runtime.stats import check_loopback
from art_runtime.termination import MODES, RELATIVE_TO, TerminationConfig

CONFIG_ENV = "ART_CONFIG"
ENV_PREFIX = "ART_"
FLAG_PREFIX = "--art-"
POLICIES = ("none", "dense", "quest", "streaming_llm", "snapkv", "h2o")
TERMINATION_FIELDS = ("mode", "tau_mag", "tau_dir", "patience", "eps", "min_pages", "relative_to", "block_pages")


def flag(name: str) -> str:
    """``"tau_mag"`` -> ``"--art-tau-mag"``."""
    return FLAG_PREFIX + name.replace("_", "-")


def env_var(name: str) -> str:
    """``"tau_mag"`` -> ``"ART_TAU_MAG"``."""
    return ENV_PREFIX + name.upper()


def where(name: str) -> str:
    """How a user sets option ``name``, for error messages."""
    return f"{flag(name)} / {env_var(name)}"


def _parse_int(text: str) -> int:
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("", "none") else _parse_float(text)


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none") else int(text)


def _parse_optional_str(text: str) -> str | None:
    return None if text.lower() in ("", "none") else text


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


_DEFAULT_TERMINATION = TerminationConfig()


@dataclass(frozen=True)
class ARTOptions:
    """The ART settings of one SGLang server (every process of it resolves the same ones).

    Attributes
    ----------
    policy : {"none", "dense", "quest", "streaming_llm", "snapkv", "h2o"}
        Page selection (``art_runtime.policies``), eager and inside CUDA graphs alike.
        ``none``: every page, recency order (sink, current page, newest to oldest), no page
        metadata needed. ``dense``: every page in the ``order`` given. ``quest``: the
        ``budget`` pages with the highest Quest bound, in that order. ``streaming_llm``: the
        sink page plus ``budget - 1`` recent pages. ``snapkv``: the prompt pages the prompt's
        last 32 queries attend to most, plus every decode page, ``budget`` in all. ``h2o``:
        the pages with the most attention mass so far plus the 8 newest, ``budget`` in all.
        ``snapkv`` and ``h2o`` keep their state per KV page
        (:mod:`~art_runtime.integrations.sglang.page_state`) and need the radix cache off.
    budget : int or None
        Pages per (request, KV head) that the policies other than ``none`` and ``dense`` keep
        (sink and current page included); ``None``: the policy's default.
    order : {"auto", "mass", "quest", "recency"} or None
        Visit order of ``dense`` (``art_runtime.policies.DensePolicy``); ``None``: its default,
        ``auto`` (Quest order under ``stability``, the mass order otherwise).
    mode, tau_mag, tau_dir, patience, eps, min_pages, relative_to, block_pages
        ``art_runtime.TerminationConfig`` (same defaults, same validation).
    stats_address : str or None
        ZMQ endpoint to publish termination statistics on (``art_runtime.stats``); ``None``:
        not published. Loopback, ``ipc://`` or ``inproc://`` unless ``stats_allow_remote``.
        Rank ``r`` of a multi-GPU server binds TCP port ``PORT + r`` (``ipc://PATH.r``).
    stats_interval : int
        Decode steps per stats message (per layer).
    stats_allow_remote : bool
        Allow a non-loopback ``stats_address``.
    """

    policy: str = "none"
    budget: int | None = None
    order: str | None = None
    mode: str = _DEFAULT_TERMINATION.mode
    tau_mag: float = _DEFAULT_TERMINATION.tau_mag
    tau_dir: float = _DEFAULT_TERMINATION.tau_dir
    patience: int = _DEFAULT_TERMINATION.patience
    eps: float | None = None  # the mode's default (termination.DEFAULT_EPS)
    min_pages: int = _DEFAULT_TERMINATION.min_pages
    relative_to: str = _DEFAULT_TERMINATION.relative_to
    block_pages: int | None = _DEFAULT_TERMINATION.block_pages
    stats_address: str | None = None
    stats_interval: int = 16
    stats_allow_remote: bool = False

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"{where('policy')}: must be one of {POLICIES}, got {self.policy!r}")
        try:
            self.termination()
        except ValueError as exc:  # TerminationConfig's messages start with the field's name
            name = str(exc).split()[0]
            raise ValueError(f"{where(name) if name in TERMINATION_FIELDS else 'ART termination'}: {exc}") from None
        if self.order is not None and (self.policy != "dense" or self.order not in DENSE_ORDERS):
            raise ValueError(f"{where('order')}: one of {DENSE_ORDERS}, with {flag('policy')} dense only; "
                             f"got {self.order!r} with {flag('policy')} {self.policy}")
        try:
            self.build_policy()
        except ValueError as exc:
            raise ValueError(f"{where('budget')} with {flag('policy')} {self.policy}: {exc}") from None
        if self.stats_address is not None:
            try:
                check_loopback(self.stats_address, self.stats_allow_remote)
            except ValueError as exc:
                raise ValueError(f"{where('stats_address')}: {exc} ({flag('stats-allow-remote')} allows it)") from None
        if self.stats_interval < 1:
            raise ValueError(f"{where('stats_interval')}: must be >= 1, got {self.stats_interval}")

    def termination(self) -> TerminationConfig:
        """The validated ``TerminationConfig``."""
        return TerminationConfig(**{name: getattr(self, name) for name in TERMINATION_FIELDS})

    def build_policy(self) -> PagePolicy | None:
        """A fresh policy object (``None`` for ``none``: the decode wrapper's dense order)."""
        if self.policy == "none":
            if self.budget is not None:
                raise ValueError("policy 'none' reads every page and takes no budget")
            return None
        if self.policy == "dense":
            if self.budget is not None:
                raise ValueError("policy 'dense' reads every page and takes no budget")
            return get_policy("dense") if self.order is None else get_policy("dense", order=self.order)
        if self.policy in ("quest", "snapkv", "h2o"):
            return get_policy(self.policy) if self.budget is None else get_policy(self.policy, budget=self.budget)
        if self.budget is None:
            return get_policy("streaming_llm")
        if not isinstance(self.budget, int) or self.budget < 2:
            raise ValueError(f"budget must be an int >= 2 (the sink page plus the window), got {self.budget!r}")
        return get_policy("streaming_llm", sink_pages=1, window_pages=self.budget - 1)


PARSERS = {
    "policy": str, "budget": _parse_optional_int, "order": _parse_optional_str, "mode": str, "tau_mag": _parse_float,
    "tau_dir": _parse_float, "patience": _parse_int, "eps": _parse_optional_float, "min_pages": _parse_int,
    "relative_to": str, "block_pages": _parse_optional_int, "stats_address": _parse_optional_str,
    "stats_interval": _parse_int, "stats_allow_remote": _parse_bool,
}
HELP = {
    "policy": f"page selection, one of {POLICIES} (default none: every page, recency order)",
    "budget": "pages per (request, KV head) kept by quest / streaming_llm / snapkv / h2o (default: the policy's)",
    "order": "visit order of --art-policy dense: auto (default: quest under stability, else mass), mass, quest or recency",
    "mode": f"termination criterion, one of {MODES} (default {_DEFAULT_TERMINATION.mode})",
    "tau_mag": "stability: largest relative change of |o| between blocks",
    "tau_dir": "stability: largest 1 - cos between consecutive block outputs",
    "patience": "stability: consecutive stable blocks needed to stop",
    "eps": "bound: certified error, relative to --art-relative-to; mass: estimated unread softmax share "
           "(default: the mode's, termination.DEFAULT_EPS)",
    "min_pages": "visit-order positions always read",
    "relative_to": f"bound: what eps is relative to, one of {RELATIVE_TO}",
    "block_pages": "pages per termination check (default: 64 tokens' worth for stability, 128 for mass and bound)",
    "stats_address": "ZMQ endpoint of the stats stream, e.g. tcp://127.0.0.1:5557 (default: off)",
    "stats_interval": "decode steps per stats message",
    "stats_allow_remote": "allow a non-loopback --art-stats-address",
}
assert set(PARSERS) == set(HELP) == {f.name for f in fields(ARTOptions)}


def _parse(name: str, value, source: str):
    try:
        return PARSERS[name](str(value).strip())
    except ValueError as exc:
        raise ValueError(f"{where(name)} (from {source}): cannot parse {value!r}: {exc}") from None


def _read_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{CONFIG_ENV}: no such file {path!r}")
    text = file.read_text()
    if file.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif file.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{CONFIG_ENV}: {path!r} must end in .json or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_ENV}: {path!r} must hold a table of option: value")
    return data


def resolve_options(environ=None) -> ARTOptions:
    """The options set by ``ART_*`` environment variables over the ``ART_CONFIG`` file.

    Raises
    ------
    ValueError
        Naming the option (flag and variable) and where its bad value came from.
    """
    environ = os.environ if environ is None else environ
    values = {}
    config = environ.get(CONFIG_ENV)
    if config:
        for key, value in _read_config(config).items():
            name = str(key).replace("-", "_")
            if name not in PARSERS:
                raise ValueError(f"{CONFIG_ENV} {config!r}: unknown ART option {key!r}; known: {sorted(PARSERS)}")
            values[name] = _parse(name, value, config)
    known = {env_var(name): name for name in PARSERS}
    for key, value in environ.items():
        if key in known:
            values[known[key]] = _parse(known[key], value, "the environment")
    return ARTOptions(**values)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The ``--art-*`` flags (values as strings; ``resolve_options`` parses them)."""
    group = parser.add_argument_group("ART (Attention Run-time Termination)")
    for name in PARSERS:
        group.add_argument(flag(name), dest=name, default=None, metavar=name.upper(), help=HELP[name])
    group.add_argument("--art-config", dest="config", default=None, metavar="PATH",
                       help=f"JSON or TOML file of ART options (environment: {CONFIG_ENV})")


def split_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Separate the ``--art-*`` flags from the rest of a command line.

    Returns
    -------
    tuple
        ``({ENV_VAR: value} for every ART flag given, the remaining arguments for SGLang)``.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_cli_args(parser)
    parsed, rest = parser.parse_known_args(argv)
    env = {env_var(name): getattr(parsed, name) for name in PARSERS if getattr(parsed, name) is not None}
    if parsed.config is not None:
        env[CONFIG_ENV] = parsed.config
    stray = [arg for arg in rest if arg.startswith(FLAG_PREFIX)]
    if stray:
        raise ValueError(f"unknown ART option {stray[0]!r}; known: {sorted(flag(n) for n in PARSERS)}")
    return env, rest
