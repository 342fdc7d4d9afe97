"""Guard rails of a bundle run, called from configs/inference.json before any work starts: options the configs do
not know, an unknown method, half of the shipped sample pair, an output folder that cannot take the results; then
the run itself, written as one result set (``scripts.data.result_set``).

Each problem ends the run with ``UsageExit``: one line, exit status 1, no traceback, nothing written.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import scripts as bundle_scripts

from scripts.data.result_set import ResultSet, ResultSetError
from scripts.inferers.io_transforms import run_reporting_input_errors
from scripts.inferers.methods import METHODS

logger = logging.getLogger(__name__)

ID_SEPARATOR = "#"


class UsageExit(SystemExit):
    """Ends a bundle run on a usage mistake with one line naming the option and the problem. A SystemExit, so that
    MONAI's config machinery passes it through instead of wrapping it in a traceback."""


def run_arguments() -> set[str]:
    """The arguments of ``monai.bundle run`` itself (not config overrides): config_file, meta_file, run_id ..."""
    names = set()
    for function in (bundle_scripts.run, bundle_scripts.create_workflow, ConfigWorkflow.__init__):
        names |= {
            name
            for name, parameter in inspect.signature(function).parameters.items()
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) and name != "self"
        }
    return names


def _is_bundle_run(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is ``python -m monai.bundle run ...`` (not pytest, batch QA or another program)."""
    if len(argv) < 2 or argv[1] != "run":
        return False
    parts = Path(argv[0]).parts
    return len(parts) >= 3 and parts[-3:] == ("monai", "bundle", "__main__.py")


def command_line_options(argv: Sequence[str]) -> Dict[str, Optional[str]]:
    """``--key value`` / ``--key=value`` pairs of a fire command line (a flag without a value maps to None)."""
    options: Dict[str, Optional[str]] = {}
    tokens = list(argv)
    for i, token in enumerate(tokens):
        if not token.startswith("--") or token == "--":
            continue
        name, equals, value = token[2:].partition("=")
        if not equals:
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            value = None if following is None or following.startswith("--") else following
        options[name] = value
    return options


def _config_files(value: str) -> str | List[str]:
    """A config_file argument as ``ConfigParser.load_config_files`` takes it: fire passes a list as the text
    "['a.json','b.json']"; a single path or "a.json,b.json" goes through as it is (MONAI splits the commas)."""
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return text


def _known_ids(parser: ConfigParser, parent: str) -> List[str]:
    """The ids one level below ``parent`` ("" for the top level) of the loaded configs."""
    node = parser.get() if not parent else parser[parent]
    prefix = f"{parent}{ID_SEPARATOR}" if parent else ""
    if isinstance(node, dict):
        return [f"{prefix}{key}" for key in node]
    if isinstance(node, list):
        return [f"{prefix}{k}" for k in range(len(node))]
    return []


def unknown_options(config: ConfigParser, overrides: Iterable[str], allowed: Iterable[str] = ()) -> List[str]:
    """One message per override id the configs do not hold, with the closest known id.

    Args:
        config: the loaded configs (``ConfigParser`` of every config file of the run).
        overrides: the override ids (``fixed_image``, ``network_def#decoder``).
        allowed: names that are not config ids but are accepted (``monai.bundle run``'s own arguments).

    Returns:
        One line per unknown id ("unknown option --x; did you mean --y?"); empty when all are known.
    """
    allowed = set(allowed)
    problems = []
    for name in overrides:
        underscored = name.replace("-", "_")
        key = underscored if underscored in config else name
        if name in allowed or key in allowed or key in config:
            continue
        parent = key.rpartition(ID_SEPARATOR)[0]
        if parent in config and config[parent] == {}:
            continue  # a new entry of an open mapping, such as batch QA's inference_overrides
        while parent and parent not in config:
            parent = parent.rpartition(ID_SEPARATOR)[0]
        candidates = _known_ids(config, parent) + ([] if parent else sorted(allowed))
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else "; see the configs for the options"
        problems.append(f"unknown option --{name}{hint}")
    return problems


def check_options(argv: Optional[Sequence[str]] = None) -> None:
    """Refuse a ``monai.bundle run`` command line with an option the loaded configs do not hold (a typo such as
    ``--fixed_imag`` would otherwise add a new, unused key and run on the default). A no-op when the process is not
    such a command (tests, batch QA: those pass their overrides as a dictionary and check them themselves)."""
    argv = sys.argv if argv is None else argv
    if not _is_bundle_run(argv):
        return
    options = command_line_options(argv[2:])
    arguments = run_arguments()
    overrides = {k for k in options if k not in arguments}
    if options.get("args_file"):
        args = ConfigParser.load_config_file(str(options["args_file"]))
        overrides |= {k for k in args if k not in arguments}
        options.setdefault("config_file", args.get("config_file"))
    if not options.get("config_file"):
        return
    config = ConfigParser(ConfigParser.load_config_files(_config_files(options["config_file"])))
    problems = unknown_options(config, sorted(overrides), allowed=arguments)
    if problems:
        raise UsageExit("; ".join(problems))


def check_overrides(config_file: str | os.PathLike, overrides: Iterable[str]) -> None:
    """``check_options`` for overrides given as a dictionary (batch QA's ``inference_overrides``).

    Args:
        config_file: the config the overrides apply to.
        overrides: their ids.

    Raises:
        UsageExit: one line per unknown id.
    """
    config = ConfigParser(ConfigParser.load_config_files(str(config_file)))
    problems = unknown_options(config, overrides)
    if problems:
        raise UsageExit("; ".join(problems))


def check_choice(option: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else ``UsageExit`` listing them.

    Args:
        option: the option's name, for the message (``method``).
        value: the value given.
        choices: the accepted values.

    Returns:
        ``value`` as a string.
    """
    if value not in choices:
        raise UsageExit(f"unknown --{option} {value!r}; choose one of: {', '.join(choices)}")
    return str(value)


def check_sample_pair(fixed_image: str, moving_image: str, sample_fixed: str, sample_moving: str) -> None:
    """Stop a run that pairs one shipped sample image with an image of the user's: the sample is a demonstration,
    not a default (an option left out would otherwise score the user's image against the sample). The same file
    given twice is a warning.

    Args:
        fixed_image, moving_image: the run's images.
        sample_fixed, sample_moving: the shipped sample pair.

    Raises:
        UsageExit: exactly one of the two images is the shipped sample.
    """
    same = [_same_file(path, sample) for path, sample in ((fixed_image, sample_fixed), (moving_image, sample_moving))]
    if same[0] != same[1]:
        sample, other = ("fixed_image", "moving_image") if same[0] else ("moving_image", "fixed_image")
        given = moving_image if same[0] else fixed_image
        raise UsageExit(
            f"--{sample} is the shipped sample ({fixed_image if same[0] else moving_image}) but --{other} is {given}: "
            f"give both images of your pair (--fixed_image and --moving_image); the sample is only a demonstration"
        )
    if not same[0] and _same_file(fixed_image, moving_image):
        logger.warning(
            "--fixed_image and --moving_image are the same file (%s): the map shows no misalignment by " "construction",
            fixed_image,
        )


def _same_file(a: str, b: str) -> bool:
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def log_method(method: str, weights_trained: bool, checkpoint: str) -> None:
    """Say in the log which method runs, and plainly when the network has no trained weights.

    Args:
        method: the run's method.
        weights_trained: whether ``checkpoint`` exists.
        checkpoint: the network's weights file.
    """
    logger.info("method: %s%s", method, " (the default)" if method == METHODS[0] else "")
    if method == "network" and not weights_trained:
        logger.warning(
            "UNTRAINED weights: %s not found, so the map written by this run is NOT a prediction", checkpoint
        )


def open_result_set(result_set: ResultSet) -> ResultSet:
    """Probe the output folder and take the run's lock before any loading or registration (``UsageExit`` naming
    ``--output_dir`` and the reason)."""
    try:
        return result_set.open()
    except ResultSetError as error:
        raise UsageExit(str(error)) from None


def run_into_result_set(evaluator: Any, result_set: ResultSet) -> Any:
    """Run ``evaluator`` (its writers write into ``result_set.staging_dir``) and move the set into place; on any
    failure or interrupt nothing of the new set reaches its final names and the lock is released.

    Args:
        evaluator: the run's ignite evaluator (its writers write into ``result_set.staging_dir``).
        result_set: the opened result set.

    Returns:
        What ``evaluator.run()`` returns.
    """
    try:
        output = run_reporting_input_errors(evaluator)
        try:
            manifest = result_set.commit()
        except OSError as error:
            raise UsageExit(
                f"--output_dir {result_set.output_dir}: cannot move the results into place ({error})"
            ) from None
        logger.info("the run's files and their sha256 are listed in %s", manifest)
        return output
    finally:
        result_set.discard()
