"""What the command lines share: one `error:` line instead of a traceback,
absl flag parsing that explains a bad --config, a stdout that holds only the
result, and the library log chatter filtered out.

Used by train.py, eval.py and the `python -m addernet_jax.*` tools; the
training and evaluation code itself raises ordinary exceptions.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging as std_logging
import math
import os
import pickle
import re
import sys
import traceback
from typing import Any, Callable, Iterable, Iterator, NoReturn

from absl import flags
from absl import logging as log
import jax
import ml_collections
import numpy as np

from addernet_jax import checkpoint as ckpt_lib
from addernet_jax import data as data_lib


class _LibraryChatterFilter(std_logging.Filter):
  """Drops Orbax's INFO records, the warnings it gives for every checkpoint
  opened read-only (as evaluation opens them, on purpose), and JAX's INFO
  "Unable to initialize backend" records; other warnings and errors pass."""

  _READ_ONLY = ("CheckpointManagerOptions.read_only=True, setting",
                "Given directory is read only")

  def filter(self, record: std_logging.LogRecord) -> bool:
    orbax = "orbax" in (record.pathname or "")
    if record.levelno >= std_logging.ERROR:
      return True
    if record.levelno >= std_logging.WARNING:
      return not (orbax and str(record.msg).startswith(self._READ_ONLY))
    return not (orbax or
                str(record.msg).startswith("Unable to initialize backend"))


def quiet_library_logs() -> None:
  """Drops two libraries' chatter from the log: Orbax's INFO (dozens of lines
  per checkpoint) and read-only warnings, and JAX's "Unable to initialize
  backend 'tpu'/'proxy'" for the backends it probes and does not find (every
  CPU or GPU run printed them, and they read like failures; the training
  loops' device line says what a run uses). Other warnings and errors show."""
  for name in ("absl", "jax._src.xla_bridge"):
    logger = std_logging.getLogger(name)
    if not any(isinstance(f, _LibraryChatterFilter) for f in logger.filters):
      logger.addFilter(_LibraryChatterFilter())


# Errors caused by the user's input: the command line prints them as one
# line ("error: ...") and exits non-zero, without a traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, ckpt_lib.CheckpointError,
               # a file or folder missing, unreadable, in the way; disk full
               OSError,
               # a file that is not a readable PyTorch checkpoint
               pickle.UnpicklingError,
               # config.data_dir unset and TFDS cannot provide the dataset
               data_lib.DataUnavailableError,
               # a worker process of the input pipeline died
               data_lib.DataWorkerError)



def json_line(result: Any) -> str:
  """`result` as one line of strict JSON: NaN and Inf become null (bare NaN,
  which json.dumps writes by default, is refused by strict parsers)."""
  def strict(x: Any) -> Any:
    if isinstance(x, dict):
      return {k: strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [strict(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
      return strict(np.asarray(x).tolist())  # a 0-d array: its number
    if isinstance(x, np.generic):  # bfloat16 (ml_dtypes) included
      x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x
  return json.dumps(strict(result), allow_nan=False)


@contextlib.contextmanager
def stdout_kept_for_the_result() -> Iterator[Callable[[str], None]]:
  """Within: everything written to file descriptor 1 goes to stderr, so that
  the entry points' stdout holds only what they mean to print there. Native
  libraries print to it too (Gloo's "[Gloo] Rank 0 is connected to 1 peer
  ranks ..." in a multi-process CPU run) and broke `train.py > result.json`.
  Nothing changes where `sys.stdout` is not file descriptor 1 (pytest's
  capture, Jupyter, `contextlib.redirect_stdout`) or there is no stdout.

  Yields:
    `print_line(text)`: writes one line to the real stdout (e.g. the rows of
    a table printed as they come).
  """
  def plain(text: str) -> None:
    print(text, flush=True)

  try:
    real = sys.stdout is not None and sys.stdout.fileno() == 1
  except (AttributeError, OSError, ValueError):
    real = False
  if not real:
    yield plain
    return
  sys.stdout.flush()
  try:
    saved = os.dup(1)
  except OSError:
    yield plain
    return

  def print_line(text: str) -> None:
    sys.stdout.flush()
    os.write(saved, (text + "\n").encode())

  os.dup2(2, 1)
  try:
    yield print_line
  finally:
    if sys.stdout is not None:
      sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def print_error(message: Any) -> int:
  """Prints `error: message` (one line) to stderr; returns exit status 1."""
  text = str(message.args[0]) if isinstance(message, KeyError) and \
      message.args else str(message)
  print(f"error: {' '.join(text.split())}", file=sys.stderr, flush=True)
  return 1


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser for `app.run`: a bad flag, an unknown config key or a
  wrong value type becomes one `error: ...` line and exit status 2."""
  quiet_library_logs()
  _make_config_package_importable(_config_path(argv))
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      # ml_collections defers a config file's loading error until first use.
      config = flags.FLAGS["config"].value
      # (A file that failed to load raises its error on any attribute.)
      if config is not None and getattr(config, "to_dict", None) is None:
        print_error(f"cannot load the --config file {_config_path(argv)!r}: "
                  f"its get_config() returned a {type(config).__name__}, not "
                  f"an ml_collections.ConfigDict")
        sys.exit(2)
      if config is not None:
        config.to_dict()
    return remaining
  except (AttributeError, KeyError) as e:  # ConfigDict: no such field
    # ConfigDict wraps KeyError("'key'\nDid you mean ...?") in an
    # AttributeError: unwrap it, or the line shows escaped quotes and "\n".
    outer = e
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    lines = [l.strip() for l in str(e.args[0] if e.args else e).splitlines()
             if l.strip()] or [""]
    key, hint = lines[0].strip("\"' "), " ".join(lines[1:])
    culprits = _overrides_setting(argv, key) if key else []
    if not culprits:
      # Not an override's key: the file itself failed (no get_config, or
      # get_config read a missing field).
      _config_file_error(outer, argv)
    print_error(f"unknown config key {key!r} in {' '.join(culprits)} (not a "
              f"field of the config file; see configs/default.py) {hint}")
    sys.exit(2)
  except OSError as e:  # the config file could not be loaded
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print_error(f"cannot load the --config file: {lines[-1]}")
    sys.exit(2)
  except flags.UnrecognizedFlagError as e:
    print_error(_unknown_flag_text(e.flagname))
    sys.exit(2)
  except (flags.Error, *USER_ERRORS) as e:
    path = _config_path(argv)
    text = str(e)
    if "Error whilst parsing config file" in text:
      # ml_collections folds the traceback of calling get_config() into the
      # message: keep its last line (the exception).
      lines = [l.strip() for l in text.splitlines() if l.strip()]
      call = "calling its get_config() failed: " if any(
          "get_config(" in l for l in lines) else ""
      text = f"cannot load the --config file {path!r}: {call}{lines[-1]}"
    elif path and "--config must have a value other than None" in text:
      text = (f"cannot load the --config file {path!r}: its get_config() "
              f"returned None (a missing return statement?)")
    else:
      missing = _MISSING_FLAG.findall(text)
      if missing:
        text = _missing_flags_text(missing)
    print_error(text)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    _config_file_error(e, argv)  # running the file failed (SyntaxError...)


_MISSING_FLAG = re.compile(r"Flag --(\w+) must have a value other than None")


def _program() -> str:
  """How the user ran this program: 'train.py' or 'python -m module'."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return (f"python -m {spec.name}" if spec is not None
          else os.path.basename(sys.argv[0]))


def _missing_flags_text(names: list[str]) -> str:
  """The error for required flags left out (absl: "flag --config=None: Flag
  --config must have a value other than None." for each), with their help."""
  names = list(dict.fromkeys(names))
  described = "; ".join(
      f"--{n}: {flags.FLAGS[n].help.rstrip('.')}" if n in flags.FLAGS
      else f"--{n}"
      for n in names)
  return (f"{_program()} needs {' and '.join('--' + n for n in names)} "
          f"({described}); --help says more")


def _unknown_flag_text(name: str) -> str:
  """The error for an unknown --name: close matches among the program's own
  flags (absl's own suggestions come from every flag, absl's logging ones
  included: 'workdir' drew 'log_dir'), and the list of those flags."""
  own = sorted(f.name for f in flags.FLAGS.get_key_flags_for_module(
      sys.argv[0]))
  close = difflib.get_close_matches(name, own, n=2, cutoff=0.6)
  hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close \
      else ""
  return (f"unknown command line flag --{name}{hint} ({_program()} takes "
          f"{', '.join('--' + f for f in own)}; --help says what each "
          f"does)")


def _overrides_setting(argv: list[str], key: str) -> list[str]:
  """The `--config.*` overrides in `argv` whose key path passes through the
  unknown field `key` (`--config.optim.lr` for `optim`); of several
  (`--config.weight` beside a valid `--config.pkkd.weight`), those whose path
  up to `key` the config file's own config lacks."""
  def prefixes(arg: str) -> list[str]:  # "a.key" of "--config.a.key.b=1"
    parts = arg.split("=")[0][len("--config."):].split(".")
    return [".".join(parts[:i + 1]) for i, part in enumerate(parts)
            if part == key]
  culprits = [a for a in argv if a.startswith("--config.") and prefixes(a)]
  if len(culprits) < 2:
    return culprits
  try:  # the file's config as loaded before the overrides
    config = flags.FLAGS["config"].parser.parse(_config_path(argv))
    known = {path for path, _ in _field_paths(config)}
  except Exception:  # pylint: disable=broad-except
    return culprits
  unknown = [a for a in culprits
             if any(p not in known for p in prefixes(a))]
  return unknown or culprits


def _make_config_package_importable(path: str | None) -> None:
  """The shipped configs import their siblings as `configs.<name>`, which
  works from the checkout root (or `python train.py`, whose folder is on
  sys.path) but not for `python -m ...` run elsewhere: put the folder above
  a config package on sys.path, after everything already there."""
  if not path:
    return
  file = path if os.path.exists(path) else path.split(":", 1)[0]  # path:arg
  folder = os.path.dirname(os.path.abspath(file))
  root = os.path.dirname(folder)
  if (os.path.isfile(os.path.join(folder, "__init__.py"))
      and root not in sys.path):
    sys.path.append(root)


def _config_path(argv: list[str]) -> str | None:
  """The --config value on the command line, or None."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
              None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  return path


def missing_config_field(e: BaseException) -> str | None:
  """The field name if `e` is a ConfigDict's error for reading a field it
  lacks (an AttributeError wrapping a KeyError), else None."""
  inner = e.args[0] if isinstance(e, AttributeError) and e.args else None
  if isinstance(inner, KeyError) and inner.args:
    return str(inner.args[0]).splitlines()[0].strip("\"' ")
  return None


@contextlib.contextmanager
def missing_config_fields_named() -> Iterator[None]:
  """Turns a config field read but absent (a config file not built on
  configs/default.py) into a ValueError naming it, for the CLIs' one line."""
  try:
    yield
  except AttributeError as e:
    field = missing_config_field(e)
    if field is None:
      raise
    raise ValueError(f"the config has no field {field!r}: a config file's "
                     f"get_config() should start from configs/default.py's "
                     f"and change what it needs") from e


def _config_file_error(e: BaseException, argv: list[str]) -> NoReturn:
  """One line for a --config file that could not be run, then exit 2."""
  path = _config_path(argv)
  where = ""
  for frame in traceback.extract_tb(e.__traceback__):
    if path and os.path.basename(frame.filename) == os.path.basename(
        path.split(":")[0]):
      where = f" (line {frame.lineno})"
  if isinstance(e, SyntaxError) and e.lineno:
    where = f" (line {e.lineno})"
  text = " ".join(str(e.msg if isinstance(e, SyntaxError) else e).split())
  field = missing_config_field(e)
  if isinstance(e, AttributeError) and "get_config" in text:
    text = "it defines no get_config() function"
  elif field is not None:
    text = f"it reads the field {field!r}, which is not set"
  else:
    text = f"{type(e).__name__}: {text}"
  print_error(f"cannot load the --config file {path!r}{where}: {text}")
  sys.exit(2)


def exit_if_peer_failed(error: BaseException) -> None:
  """In a run of several processes, a failed cross-process computation
  (`JaxRuntimeError`: another process stopped or died) prints one `error:`
  line and leaves at once with status 1: a traceback, then minutes in JAX's
  shutdown barrier waiting for the missing process, before. Returns
  otherwise."""
  if not (isinstance(error, jax.errors.JaxRuntimeError)
          and jax.process_count() > 1):
    return
  first = (str(error).strip().splitlines() or [""])[0]
  print_error(f"process {jax.process_index()}: a computation shared with the "
            f"other processes failed ({first[:200]}): another process "
            f"probably stopped or died. Rerun the same command on every host "
            f"to resume from the last checkpoint")
  sys.stdout.flush()
  os._exit(1)  # pylint: disable=protected-access


def _field_paths(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in config.items():
    yield prefix + key, value
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _field_paths(value, f"{prefix}{key}.")


def unknown_config_fields(config: ml_collections.ConfigDict,
                          references: Iterable[ml_collections.ConfigDict]
                          ) -> list[str]:
  """The fields of `config` ("pkkd.tau" for nested ones) that none of the
  `references` (e.g. the shipped configs) has, each with a close known name
  where there is one ("learning_rte (did you mean learning_rate?)"): a typo
  in a config file is otherwise ignored without a word."""
  known = {path for ref in references for path, _ in _field_paths(ref)}
  unknown = []
  for path, _ in _field_paths(config):
    parent = path.rpartition(".")[0]
    if path in known or (parent and parent not in known):
      continue  # known, or inside an unknown field already reported
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(path, siblings, n=1)
    unknown.append(path + (f" (did you mean {close[0]}?)" if close else ""))
  return unknown


def warn_unknown_config_fields(config: ml_collections.ConfigDict,
                               references: Iterable[ml_collections.ConfigDict]
                               ) -> None:
  """Logs one warning naming the fields `unknown_config_fields` finds."""
  unknown = unknown_config_fields(config, references)
  if unknown:
    log.warning("the config has field(s) no shipped config has, which are "
                "not read: %s", ", ".join(unknown))
