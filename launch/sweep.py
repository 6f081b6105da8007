"""Grid sweeps over `--config.` overrides of the main job.

    .venv/bin/python launch/sweep.py --config=configs/pretrain.py:model=base \\
        --grid model.manager.type=AAUE,SAUE --grid model.manager.weight_type=vector,scalar \\
        --grid model.manager.num_layers=3,6 --set total_steps=1000 \\
        --workdir_root=runs/sweep --launcher=slurm --dry_run

expands to the cartesian product of the grid (8 runs here), each in its own workdir named
after its grid values (runs/sweep/manager.type=SAUE,manager.weight_type=scalar,...), with
the --set overrides shared by all. Every key and value is checked against the loaded config
first (unknown keys, values that do not parse as the field's type), then every run's whole
config as the run itself will check it (train.run_checks.check_run: task and losses, model,
training values): nothing is launched unless all pass. Tuple fields take Python literals
(--set "losses=('mlm','itm','itc')"); a --grid whose values hold commas separates them with
'|' (--grid "losses=('mlm','itm')|('mlm','itm','itc')"). Launchers:
  local    runs the runs one after another here (launch/local.sh main ...)
  tpu_pod  runs them one after another on the TPU of launch/tpu_pod.sh (its variables come from
           this environment; CONFIG and WORKDIR are set per run)
           (both stop at the first run that fails; main resumes each rerun from its workdir's
           newest checkpoint)
  slurm    writes COMMANDS (one line of mtower_jax.main arguments per run, default
           WORKDIR_ROOT/commands.txt) and submits one job array,
           `sbatch --array=0-(N-1) launch/slurm.sbatch`, whose task I runs line I+1
--dry_run prints the commands (+ ...) instead of running them; for slurm it still writes the
COMMANDS file and prints it.
Importable: plan() and the launch_* functions take the parsed arguments.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
_BOOLS = ("true", "false", "1", "0")  # spellings absl's boolean parser also takes


class SweepError(ValueError):
    """A sweep that must not launch; the message says why."""


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    workdir: str
    overrides: tuple[tuple[str, str], ...]  # (config key, value), grid keys then --set keys

    def override_args(self) -> list[str]:
        return [f"--config.{key}={value}" for key, value in self.overrides]


def load_config(spec: str):
    """configs/FILE.py[:ARG] -> get_config(ARG), the way mtower_jax.main loads it."""
    path, _, arg = spec.partition(":")
    file = Path(path) if Path(path).is_absolute() else REPO / path
    if not file.is_file():
        raise SweepError(f"config file {path} not found")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # config files import mtower_jax
    module_spec = importlib.util.spec_from_file_location(f"_sweep_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(arg or None)
    except ValueError as e:  # get_config's own argument errors (config_args.parse_arg)
        raise SweepError(f"--config={spec}: {e}") from None


def _leaves(node, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every field of a ConfigDict (groups recursed into)."""
    out = {}
    for key, value in node.items():
        if hasattr(value, "items"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_value(text: str, default: Any) -> Any:
    """`text` as a value of the field whose current value is `default`, as absl's
    --config.KEY=VALUE parses it; ValueError if it is not one."""
    kind = type(default)
    if kind is str:
        return text
    if kind is bool:
        if text.lower() not in _BOOLS:
            raise ValueError(text)
        return text.lower() in ("true", "1")
    if kind in (int, float):
        return kind(text)
    if kind in (tuple, list):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(text) from None
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        kinds = {type(x) for x in default}
        if kinds and not all(type(x) in kinds for x in value):
            raise ValueError(text)
        return kind(value)
    raise TypeError(kind)


def _type_problem(key: str, text: str, default: Any) -> str | None:
    """Why `text` is not a value of the field's type (its current value's), or None."""
    try:
        parse_value(text, default)
        return None
    except TypeError:
        return (f"{key} is a {type(default).__name__} field; a sweep sets int, float, bool, "
                "str and tuple fields")
    except ValueError:
        return (f"{key}={text!r} does not parse as {type(default).__name__} (the field's "
                f"value is {default!r})")


def run_problem(config, overrides: Sequence[tuple[str, str]]) -> str | None:
    """What the run of `config` with `overrides` (keys and values already type-checked)
    would stop on at start, or None: the checks mtower_jax.main makes before writing."""
    from mtower_jax.train.run_checks import check_run

    config = copy.deepcopy(config)
    leaves = _leaves(config)
    for key, text in overrides:
        *groups, leaf = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[leaf] = parse_value(text, leaves[key])
    try:
        check_run(config)
    except ValueError as e:
        return str(e).replace("\n", "\n    ")
    return None


def check(config, overrides: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """Every problem with the (key, values) overrides against `config`, as messages."""
    leaves = _leaves(config)
    groups = {key.rsplit(".", i)[0] for key in leaves for i in range(1, key.count(".") + 1)}
    problems = []
    for key, values in overrides:
        if key in leaves:
            found = filter(None, (_type_problem(key, v, leaves[key]) for v in values))
            problems += dict.fromkeys(found)  # one message per problem, in order
        elif key in groups:
            fields = sorted(k for k in leaves if k.startswith(key + "."))
            problems.append(f"{key} is a group of fields, not a field: {', '.join(fields)}")
        else:
            close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            problems.append(f"unknown config key {key}{hint}")
    return problems


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("config.")
    if not sep or not key:
        raise SweepError(f"{flag} {text!r}: expected KEY=VALUE")
    return key, value.strip()


def _short(keys: Sequence[str]) -> list[str]:
    """Keys for run names: the top-level group dropped from keys 3+ deep
    (model.manager.type -> manager.type), unless that makes two keys the same."""
    short = [key.split(".", 1)[1] if key.count(".") >= 2 else key for key in keys]
    return short if len(set(short)) == len(short) else list(keys)


def _name_value(text: str) -> str:
    """A value as a run name shows it: a tuple literal's items joined by '+'."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return "+".join(map(str, value)) if isinstance(value, (tuple, list)) else text


def run_name(pairs: Sequence[tuple[str, str]]) -> str:
    """'k=v,k=v', with characters that are unsafe in a path replaced; long names are cut
    and made unique with a hash (a file name has at most 255 bytes)."""
    name = ",".join(f"{key}={_name_value(value)}" for key, value in pairs)
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name).lstrip(".") or "run"
    if len(safe) > 200:
        safe = f"{safe[:180]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return safe


def plan(args: argparse.Namespace) -> list[Run]:
    """The runs of the sweep; SweepError (naming every problem) if any override is bad."""
    grid = [(key, [value.strip() for value in values.split("|" if "|" in values else ",")])
            for key, values in (parse_assignment(text, "--grid") for text in args.grid)]
    fixed = [parse_assignment(text, "--set") for text in args.set]
    keys = [key for key, _ in grid + fixed]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise SweepError(f"given more than once in --grid/--set: {', '.join(duplicates)}")
    for key, values in grid:
        if "" in values:
            raise SweepError(f"--grid {key}: empty value in {','.join(values)!r}")
    config = load_config(args.config)
    problems = check(config, grid + [(key, [value]) for key, value in fixed])
    if args.launcher == "slurm" and "://" in args.workdir_root and not args.commands_file:
        problems.append("--launcher=slurm with a remote --workdir_root: pass --commands_file")
    if problems:
        raise SweepError("nothing launched:\n  " + "\n  ".join(problems))

    grid_keys = [key for key, _ in grid]
    names = _short(grid_keys)
    runs = []
    for values in itertools.product(*(values for _, values in grid)):
        name = run_name(list(zip(names, values))) if grid else "run"
        runs.append(Run(name=name, workdir=f"{args.workdir_root.rstrip('/')}/{name}",
                        overrides=tuple(zip(grid_keys, values)) + tuple(fixed)))
    if len({run.workdir for run in runs}) != len(runs):
        raise SweepError("two runs got the same workdir; make the grid values distinct")
    failing = [(run.name, run_problem(config, run.overrides)) for run in runs]
    failing = [f"run {name}: {problem}" for name, problem in failing if problem]
    if failing:
        raise SweepError(f"nothing launched: {len(failing)} of {len(runs)} runs would stop at "
                         "start:\n  " + "\n  ".join(failing))
    return runs


def _trace(cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
    prefix = "".join(f"{key}={shlex.quote(value)} " for key, value in (env or {}).items())
    print(f"+ {prefix}{shlex.join(cmd)}", flush=True)


def _execute(cmd: Sequence[str], dry_run: bool, env: dict[str, str] | None = None) -> None:
    _trace(cmd, env)
    if not dry_run:
        subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, check=True)


def launch_local(args, runs: Sequence[Run]) -> None:
    for run in runs:
        _execute(["launch/local.sh", "main", f"--config={args.config}",
                  f"--workdir={run.workdir}", *run.override_args()], args.dry_run)


def launch_tpu_pod(args, runs: Sequence[Run]) -> None:
    for run in runs:
        _execute(["launch/tpu_pod.sh", *run.override_args()], args.dry_run,
                 env={"CONFIG": args.config, "WORKDIR": run.workdir})


def launch_slurm(args, runs: Sequence[Run]) -> None:
    commands = REPO / (args.commands_file or f"{args.workdir_root}/commands.txt")
    lines = [shlex.join([f"--config={args.config}", f"--workdir={run.workdir}",
                         *run.override_args()]) for run in runs]
    commands.parent.mkdir(parents=True, exist_ok=True)
    commands.write_text("".join(line + "\n" for line in lines))
    if args.dry_run:
        print(f"# {commands} ({len(lines)} lines; array task I runs line I+1):")
        print("\n".join(lines))
    # COMMANDS rides in --export (sbatch's default exports everything, but sites may change
    # the default); the job's working directory is the submit directory, the repository.
    _execute(["sbatch", f"--array=0-{len(runs) - 1}", f"--export=ALL,COMMANDS={commands}",
              *args.sbatch_arg, "launch/slurm.sbatch"], args.dry_run)


LAUNCHERS = {"local": launch_local, "tpu_pod": launch_tpu_pod, "slurm": launch_slurm}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", required=True, help="config file[:args], as for main")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a config key and its values (repeat for more axes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override shared by every run (repeatable)")
    parser.add_argument("--workdir_root", required=True,
                        help="parent of the runs' workdirs (gs://... for tpu_pod); relative "
                             "paths are relative to the repository root")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
    parser.add_argument("--commands_file", default="",
                        help="slurm: where to write the runs' arguments "
                             "(default: WORKDIR_ROOT/commands.txt; relative to the repository)")
    parser.add_argument("--sbatch_arg", action="append", default=[], metavar="ARG",
                        help="slurm: an extra sbatch option, e.g. --sbatch_arg=--nodes=4")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands instead of running them")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = plan(args)
    except SweepError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2
    try:
        LAUNCHERS[args.launcher](args, runs)
    except subprocess.CalledProcessError as e:
        print(f"sweep.py: error: {shlex.join(e.cmd)} exited with {e.returncode}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
