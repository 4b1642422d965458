"""Trainer settings, written once: a config dataclass whose fields carry their default,
help text, choices and bounds, and everything else made from it.

    @dataclass
    class RewardConfig(Config):
        epochs: int = field(default=1, metadata={"help": "passes over the training pairs", "label": "Epochs"})

        def problems(self):                         # the config's own check: (field, bad?, why)
            yield "epochs", self.epochs < 1, "must be at least 1"

    add_config_arguments(parser, RewardConfig)      # --epochs, --config FILE.json, --help text
    cfg, explicit = config_from_namespace(RewardConfig, parser.parse_args())
    cfg.check()                                     # ConfigError: "--epochs must be at least 1"
    cfg = config_from_values(RewardConfig, form)    # a form's or a file's values, typed or refused

Fields use `dataclasses.field(default=..., metadata={...})` (TRL style). Metadata keys:
"help" (required: the flag's --help sentence), "choices", "metavar", "flag" (the option
strings, when not --field-name), "label" (what the Train tab calls it; errors shown there
name the field by it), "required" (the command line refuses to run without it).

The command line follows the annotation: int, float, str, Optional[...] (a blank value is
None), `bool` with default False is a store_true flag, with default True a `--no-x` flag,
Optional[bool] is `--x/--no-x` (None: decided by the trainer). `--config FILE.json` reads
settings from a file; flags given on the command line override it. Which settings were
given (file keys and flags that differ from the default) is returned too: a resumed run
takes only those over the ones it started with.

Only the main trainer processes import this; it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from trainer.errors import PreflabError, exit_code

CONFIG_FLAG_HELP = (
    'a JSON file of settings (field names as keys, e.g. {"lr": 1e-5}); '
    "flags given on the command line override it"
)
GIVEN = "_given_settings"  # namespace attribute: the settings the command line named


class ConfigError(PreflabError, ValueError):
    """Settings a trainer cannot run with. `problems` is [(field, why)]; the message names
    each field by its flag: "--epochs must be at least 1"."""

    def __init__(self, problems: list[tuple[str, str]], config_class: type | None = None):
        self.problems = problems
        self.config_class = config_class
        super().__init__("; ".join(f"{flag_of(config_class, name)} {why}" for name, why in problems))

    def labelled(self) -> str:
        """The message in the words of the Train tab: "Epochs: must be at least 1"."""
        return "; ".join(f"{label_of(self.config_class, name)}: {why}" for name, why in self.problems)


class Config:
    """Base of the trainers' config dataclasses: the check every source of settings (the
    command line, a file, the Train tab) goes through."""

    def problems(self) -> Iterable[tuple[str, bool, str]]:
        """(field, is it bad, why) for each rule; subclasses yield theirs."""
        return ()

    def check(self) -> None:
        """Raise ConfigError (naming every bad field) unless the settings can run."""
        found, seen = [], set()
        for name, meta in field_meta(type(self)).items():
            choices = meta.get("choices")
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("-"):
                # No model, path, store or choice starts with "-"; such a value is a flag
                # in disguise (`-x`, `--run-dir=...`) wherever it is put on a command line.
                found.append((name, f"{value[:60]!r} starts with '-'; give a name or a path, not a flag"))
                seen.add(name)
            elif choices and value is not None and value not in choices:
                found.append((name, f"must be one of {', '.join(map(str, choices))}"))
                seen.add(name)
        for name, bad, why in self.problems():
            if bad and name not in seen:
                found.append((name, why))
                seen.add(name)
        if found:
            raise self.error(found, type(self))

    error = ConfigError  # the class check() raises; a trainer may name its own subclass


# --------------------------------------------------------------------------------------
# What the dataclass says about a field
# --------------------------------------------------------------------------------------


def field_meta(config_class: type) -> dict[str, dict[str, Any]]:
    return {f.name: dict(f.metadata) for f in dataclasses.fields(config_class)}


def field_types(config_class: type) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def defaults(config_class: type) -> dict[str, Any]:
    return dataclasses.asdict(config_class())


def flags_of(config_class: type | None, name: str) -> list[str]:
    meta = field_meta(config_class).get(name, {}) if config_class else {}
    flag = meta.get("flag")
    if flag:
        return [flag] if isinstance(flag, str) else list(flag)
    dashed = name.replace("_", "-")
    if (
        config_class is not None
        and _base_type(field_types(config_class)[name])[0] is bool
        and getattr(config_class(), name) is True
    ):
        return [f"--no-{dashed}"]  # on by default: the flag turns it off
    return [f"--{dashed}"]


def flag_of(config_class: type | None, name: str) -> str:
    """How errors name a field: its option name, --field-name."""
    return f"--{name.replace('_', '-')}"


def label_of(config_class: type | None, name: str) -> str:
    meta = field_meta(config_class).get(name, {}) if config_class else {}
    return meta.get("label") or flag_of(config_class, name)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type, may it be None) of an annotation: int, float, str, bool, Optional[...]."""
    args = typing.get_args(annotation)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0]), False
    return annotation, False


def _literal_choices(annotation: Any) -> tuple | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def _given(namespace) -> set[str]:
    given = getattr(namespace, GIVEN, None)
    if given is None:
        given = set()
        setattr(namespace, GIVEN, given)
    return given


class _Store(argparse.Action):
    """store / store_true / store_false that also records that the setting was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        _given(namespace).add(self.dest)


class _BooleanOptional(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _given(namespace).add(self.dest)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with "(default: X)" only where it tells something: not for on/off flags
    (the flag's name says what it changes), not for None, and not twice when the help
    text names its default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or "default" in text
            or action.nargs == 0
        ):
            return text
        return super()._get_help_string(action)


def add_config_arguments(
    parser: argparse.ArgumentParser, config_class: type, *, config_file: bool = True
) -> None:
    """One flag per field of `config_class` (see the module docstring), and --config FILE."""
    if config_file:
        parser.add_argument("--config", default=None, metavar="FILE.json", help=CONFIG_FLAG_HELP)
    types, default = field_types(config_class), config_class()
    for f in dataclasses.fields(config_class):
        meta, value = f.metadata, getattr(default, f.name)
        kind, optional = _base_type(types[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": value, "help": meta.get("help") or None}
        if meta.get("required"):
            kwargs["required"] = True
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        flags = flags_of(config_class, f.name)
        if kind is bool and optional:
            parser.add_argument(*flags, action=_BooleanOptional, **kwargs)
            continue
        if kind is bool:
            parser.add_argument(*flags, action=_Store, nargs=0, const=not value, **kwargs)
            continue
        choices = meta.get("choices") or _literal_choices(types[f.name])
        if choices:
            kwargs["choices"] = tuple(choices)
        parser.add_argument(*flags, action=_Store, type=kind if kind in (int, float) else str, **kwargs)


def config_from_namespace(config_class: type, args) -> tuple[Any, set[str]]:
    """A trainer's config from its parsed arguments (and --config FILE), and which
    settings were given: the file's keys and the flags that differ from the defaults.
    On a resume only those may override the run's own settings."""
    default = config_class()
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)
    }
    given = getattr(args, GIVEN, None)
    changed = {k for k, v in values.items() if v != getattr(default, k)}
    path = getattr(args, "config", None)
    if not path:
        return config_class(**values), changed
    from_file = read_config_file(config_class, path)
    # Flags on the command line win over the file; without a record of which flags were
    # typed (a namespace made by hand), those that differ from the default.
    flags = {k: values[k] for k in (given if given is not None else changed) if k in values}
    merged = {**values, **from_file, **flags}
    return config_class(**merged), set(from_file) | changed


RUN_LOCATION = ("run_dir", "runs_dir", "run_id")  # where a run is, not how it runs


def settings_for_run(
    cfg: Any, explicit: set[str], *, prefix: str, resumable: Iterable[str], keep_saved: bool | None = None
) -> tuple[Any, Path]:
    """(config to run, run dir) for a trainer: `cfg.run_dir`, or a new `<runs_dir>/<run_id>`
    (default `<prefix>-<time>-<pid>`). A run dir that already holds a config is that run:
    its settings win over the command line, except the `resumable` ones given explicitly
    (a note says what was ignored). `keep_saved` False (a reward run with no checkpoint yet,
    which starts over) lets every explicit setting win."""
    import os
    import sys
    import time

    from trainer.runs import CONFIG_FILE, read_json

    if cfg.run_dir:
        path = Path(cfg.run_dir)
    else:
        run_id = cfg.run_id or time.strftime(f"{prefix}-%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"
        path = Path(cfg.runs_dir) / run_id
    saved = read_json(path / CONFIG_FILE).get("config")
    if saved:
        resumable = set(resumable)
        merged = {**saved}
        for key in explicit:
            value = getattr(cfg, key)
            if keep_saved is not False and key not in resumable and value != saved.get(key):
                if key not in RUN_LOCATION:
                    print(
                        f"note: {key}={value!r} ignored: resuming {path}, which runs with {key}={saved.get(key)!r}",
                        file=sys.stderr,
                    )
                continue
            merged[key] = value
        names = {f.name for f in dataclasses.fields(type(cfg))}
        cfg = type(cfg)(**{k: v for k, v in merged.items() if k in names})
    cfg.run_dir = str(path)
    return cfg, path


def read_config_file(config_class: type, path: str | Path) -> dict[str, Any]:
    """The settings of a JSON config file, typed; ConfigError naming the file or the key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError([("config", f"{path}: cannot read it ({e.strerror or e})")]) from None
    except ValueError as e:
        raise ConfigError([("config", f"{path}: not JSON ({e})")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([("config", f"{path}: must hold a JSON object of settings")])
    unknown = sorted(set(raw) - set(field_meta(config_class)))
    if unknown:
        raise ConfigError(
            [("config", f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")]
        )
    return typed_values(config_class, raw)


def write_config_file(config, path: str | Path, names: Iterable[str] | None = None) -> Path:
    """The config (or only the fields `names`) as a JSON file `--config` reads back."""
    from trainer.runs import write_json

    values = dataclasses.asdict(config)
    write_json(Path(path), values if names is None else {k: values[k] for k in names})
    return Path(path)


# --------------------------------------------------------------------------------------
# Values from a form or a file
# --------------------------------------------------------------------------------------


def typed_values(config_class: type, raw: dict[str, Any]) -> dict[str, Any]:
    """Each value turned into its field's type (a form's "2" into 2); ConfigError naming
    every field whose value is not of its type."""
    types, out, problems = field_types(config_class), {}, []
    for name, value in raw.items():
        if name not in types:
            problems.append((name, "is not a setting of this trainer"))
            continue
        try:
            out[name] = typed_value(types[name], value)
            if isinstance(out[name], str) and field_meta(config_class)[name].get("choices"):
                out[name] = out[name].lower()  # "Include" is include
        except ValueError as e:
            problems.append((name, str(e)))
    if problems:
        raise getattr(config_class, "error", ConfigError)(problems, config_class)
    return out


def config_from_values(config_class: type, raw: dict[str, Any]) -> Any:
    """config_class(**typed_values(...)), checked: what a form's values become."""
    config = config_class(**typed_values(config_class, raw))
    config.check()
    return config


def typed_value(annotation: Any, value: Any) -> Any:
    """One value as `annotation` wants it; ValueError saying what is wrong with it."""
    kind, optional = _base_type(annotation)
    blank = value is None or (isinstance(value, str) and not value.strip())
    if blank and optional:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{value!r} is not true or false")
    if kind is int:
        if blank:
            raise ValueError("give a whole number")
        number = _number(value)
        if number != int(number):
            raise ValueError(f"{value!r} is not a whole number")
        return int(number)
    if kind is float:
        if blank:
            raise ValueError("give a number")
        return _number(value)
    if blank:
        return "" if value is not None else None
    text = str(value).strip()
    return text.lower() if _literal_choices(annotation) else text


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _cached_hub_model(repo_id: str) -> bool:
    """A Hugging Face model whose config is in the local cache (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # no hub library, or an id it refuses: not a cached model
        return False


def model_problem(value: str | None) -> Iterator[str]:
    """Why `value` cannot name a model (nothing when it can): smollm2 / tiny, a model
    directory, or an org/name Hugging Face id (looked up in the local cache by the trainer)."""
    from trainer.models import DEFAULT_ALIASES, TINY_MODEL
    from trainer.runs import is_model_dir

    text = (value or "").strip()
    if not text:
        yield "give a model: smollm2 (the default), tiny, a model directory or a Hugging Face id"
        return
    if text.lower() in DEFAULT_ALIASES or text.lower() == TINY_MODEL:
        return
    path = Path(text).expanduser()
    if path.is_dir():
        if not is_model_dir(path):
            yield f"{text} is a directory but not a model (no config.json)"
        return
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return  # an org/name id; the trainer says clearly if it is not cached
    if re.fullmatch(r"[\w-][\w.-]*", text) and _cached_hub_model(text):
        return  # a legacy id without an org (gpt2), already in the local cache
    yield f"{text!r} is not smollm2, tiny, a model directory or a Hugging Face id"


# ---- the training scripts' command line (trainer/reward.py, policy.py, dpo.py) ---------------


def script_config(config_class: type, args) -> tuple[Any, set[str]]:
    """A training script's config from its parsed flags (config_from_namespace), with the
    environment every trainer wants: offline (no hub downloads at run time) and the
    tokenizers' own thread pool off (it forks badly under DataLoader workers and DDP)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return config_from_namespace(config_class, args)


def script_main(module: str, doc: str, config_class: type, run, argv: list[str] | None) -> int:
    """`python -m MODULE`: the config class's flags, then run(args); a bad --config file or
    bad input is one line and exit 2 (trainer.errors.exit_code)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc.split("\n")[0], formatter_class=HelpFormatter
    )
    add_config_arguments(parser, config_class)
    return exit_code(run, parser.parse_args(argv))
