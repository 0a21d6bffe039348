"""Find the `deitlab …` commands written in docs and configs, and check each one with the CLI's own parsers.

Nothing is string-matched: the click tree behind `deitlab` (typer.main.get_command) resolves the subcommands and
parses the leaf's options and arguments, so an unknown option, a missing argument or a bad value fails exactly as it
would for a user. `deitlab bench step` hands its arguments to argparse (deitlab.step_bench.parser), which checks them.

Where commands are looked for:
  Markdown      fenced code blocks (every line) and inline code spans
  YAML          every string value (line by line), a container's command + args, and the comments
  Dockerfile    RUN / CMD / ENTRYPOINT (shell or exec form) and the comments
  shell (.sh)   every line
In a line, a command starts where the shell would start one: at the start, after `&&`, `||`, `;`, `|`, `(`, after
`--` (`kubectl exec … -- deitlab …`, `ray job submit … -- deitlab …`), after `VAR=value` prefixes, or as
`python -m deitlab`; `.venv/bin/deitlab` counts too. The program name alone (`deitlab`, also a Kubernetes name
here) is a name, not a command. In inline code and comments a command may be a *mention* — `deitlab sweep plan`
in a sentence: then only its subcommands must exist; once it has more words it is parsed in full.

Docs write placeholders; each becomes "1" (a valid path, string and number alike) before parsing:
  an upper-case word (SPEC, SWEEP, NAME, N, DIR)    <name>    $VAR, ${VAR}, "$VAR"    a lone … or ...
and synopsis notation is read as the command it stands for:
  [--opt VALUE] -> --opt VALUE      SPEC… -> SPEC      a|b|c or a\\|b\\|c (inline code only) -> a
Paths need not exist: path parameters declared with exists=True are relaxed while parsing, and nothing is opened.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

try:  # typer >= 0.2x parses with its own copy of click (typer._click); plain click matters for plain-click trees
    import click
except ImportError:  # pragma: no cover - the check then relies on the copy that the command tree is built on
    click = None

PROGRAM = "deitlab"
DUMMY = "1"

_SEPARATORS = frozenset({"&&", "||", ";", "|", "(", ")", "&", ";;", "|&"})
_WRAPPERS = frozenset({"exec", "time", "nohup", "env", "command"})
_PYTHON = re.compile(r"(\S*/)?python3?(\.\d+)?")
_PROGRAM_PATH = re.compile(r"(\S*/)?bin/deitlab")
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|\$.*|…|\.\.\.")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


class CommandError(Exception):
    """A command the CLI rejects; the message is the parser's own."""


@dataclass(frozen=True)
class Command:
    source: str               # file:line where it is written
    text: str                 # the command as written (synopsis notation resolved)
    args: tuple[str, ...]     # what follows the program name, placeholders replaced
    mention: bool = False     # named in prose: only its subcommands must exist


# --------------------------------------------------------------------------------------------------- extraction
def _synopsis(text: str, inline: bool) -> str:
    """Usage notation -> the command it stands for (see the module doc)."""
    if inline:  # alternatives: `--format table|json|html`; in Markdown tables the pipes are escaped
        text = re.sub(r"(\w[\w.-]*)(?:\\?\|[\w.-]+)+", r"\1", text)
    text = re.sub(r"\[(?=[-A-Z<.…$])([^\[\]]*)\]", r" \1 ", text)  # [--workers N], [SPEC…]; not seeds=[0,1]
    text = re.sub(r"(?<=\S)(…|\.\.\.)(?=\s|$)", "", text)           # SPEC… -> SPEC (a lone … stays a value)
    return re.sub(r"<[A-Za-z][\w.:-]*>", DUMMY, text)                # <name>, never a redirection


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote, usually an apostrophe in prose ("Ray's"): words will do
        return text.split()


def _is_program(token: str) -> bool:
    return token == PROGRAM or bool(_PROGRAM_PATH.fullmatch(token))


def _argv(tokens: list[str], start: int) -> list[str]:
    """The arguments from `start` to the end of the simple command (a separator or a redirection)."""
    args: list[str] = []
    for token in tokens[start:]:
        if token in _SEPARATORS or set(token) <= set("<>&|;()"):
            if args and args[-1].isdigit() and token.startswith((">", "<")):
                args.pop()  # the 2 of 2>/dev/null
            break
        args.append(token)
    return args


def _commands_in_tokens(tokens: list[str]) -> Iterator[list[str]]:
    """Each `deitlab` command in a token stream, as its argument list (program name excluded)."""
    at_start = True
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in _SEPARATORS or token == "--":
            at_start = True
        elif at_start and (_ASSIGNMENT.fullmatch(token) or token in _WRAPPERS):
            pass  # VAR=value deitlab …, exec deitlab …
        elif at_start and _is_program(token):
            yield _argv(tokens, i + 1)
            at_start = False
        elif at_start and _PYTHON.fullmatch(token) and tokens[i + 1:i + 2] == ["-m"] and i + 2 < len(tokens):
            module, rest = tokens[i + 2], _argv(tokens, i + 3)
            if module == PROGRAM:
                yield rest
            elif module == f"{PROGRAM}.step_bench":  # the same parser as `deitlab bench step`
                yield ["bench", "step", *rest]
            at_start = False
        elif at_start and token in ("bash", "sh") and tokens[i + 1:i + 2] == ["-c"] and i + 2 < len(tokens):
            yield from _commands_in_tokens(_tokens(tokens[i + 2]))
            at_start = False
        else:
            at_start = False
        i += 1


def commands_in_text(text: str, source: str, *, inline: bool = False, mention: bool = False) -> list[Command]:
    """Commands in one line of shell-like text."""
    found = []
    for raw in _commands_in_tokens(_tokens(_synopsis(text, inline))):
        while mention and raw and raw[-1] in ("…", "...") and (len(raw) == 1 or not raw[-2].startswith("-")):
            raw.pop()  # `deitlab …`, `deitlab sweep …` in prose: "and the rest", not a value
        if not raw:
            continue  # the program's name, not a command
        args = tuple(DUMMY if _PLACEHOLDER.fullmatch(a) else a for a in raw)
        found.append(Command(source, " ".join([PROGRAM, *raw]), args, mention))
    return found


def _logical_lines(text: str, first_line: int = 1) -> Iterator[tuple[int, str]]:
    """(line number, line) with backslash continuations joined."""
    pending, start = "", first_line
    for number, line in enumerate(text.splitlines(), first_line):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def _comment(text: str, source: str) -> list[Command]:
    """A comment: `code spans` may mention commands; a command may also start the comment's text."""
    found = []
    for span in re.findall(r"`([^`]+)`", text):
        found += commands_in_text(span, source, inline=True, mention=True)
    return found + commands_in_text(re.sub(r"`[^`]*`", " ", text), source)


def commands_in_markdown(path: Path, name: str) -> list[Command]:
    found: list[Command] = []
    fence: str | None = None
    block: list[str] = []
    block_start = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        marker = re.match(r"\s*(```|~~~)", line)
        if marker and (fence is None or marker.group(1) == fence):
            if fence is None:
                fence, block, block_start = marker.group(1), [], number + 1
            else:
                for at, text in _logical_lines("\n".join(block), block_start):
                    found += commands_in_text(text, f"{name}:{at}")
                fence = None
            continue
        if fence is not None:
            block.append(line)
            continue
        for span in re.findall(r"(`+)(.+?)\1", line):
            found += commands_in_text(span[1], f"{name}:{number}", inline=True, mention=True)
    return found


def _argv_commands(argv: list[str], source: str) -> list[Command]:
    return [Command(source, " ".join([PROGRAM, *raw]), tuple(DUMMY if _PLACEHOLDER.fullmatch(a) else a for a in raw))
            for raw in _commands_in_tokens(argv) if raw]


def _yaml_node_commands(node, name: str, found: list[Command], seen: set[int]) -> None:
    """Walk a composed YAML node: string scalars line by line, and a container's command + args as one argv."""
    import yaml

    if id(node) in seen:  # an alias: already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        fields = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        command = fields.get("command")
        if isinstance(command, yaml.SequenceNode):
            args = fields.get("args")
            argv = [n.value for n in command.value + (args.value if isinstance(args, yaml.SequenceNode) else [])]
            found += _argv_commands(argv, f"{name}:{command.start_mark.line + 1}")
        for key, value in node.value:
            _yaml_node_commands(value, name, found, seen)
    elif isinstance(node, yaml.SequenceNode):
        for value in node.value:
            _yaml_node_commands(value, name, found, seen)
    elif isinstance(node, yaml.ScalarNode) and node.tag.endswith(":str"):
        first = node.start_mark.line + 1 + (node.style == "|")  # a literal block starts on the next line
        for offset, line in _logical_lines(node.value, 0):
            at = first + offset if node.style == "|" else first
            found += commands_in_text(line, f"{name}:{at}")


def commands_in_yaml(path: Path, name: str) -> list[Command]:
    import yaml

    text = path.read_text(encoding="utf-8")
    found: list[Command] = []
    for doc in yaml.compose_all(text):
        _yaml_node_commands(doc, name, found, set())
    for number, line in enumerate(text.splitlines(), 1):
        comment = re.match(r"\s*#(.*)", line) or re.search(r"\s#\s(.*)$", line)
        if comment:
            found += _comment(comment.group(1), f"{name}:{number}")
    return found


def commands_in_dockerfile(path: Path, name: str) -> list[Command]:
    found: list[Command] = []
    for number, line in _logical_lines(path.read_text(encoding="utf-8")):
        source = f"{name}:{number}"
        if re.match(r"\s*#", line):
            found += _comment(line.split("#", 1)[1], source)
            continue
        instruction = re.match(r"\s*(RUN|CMD|ENTRYPOINT)\s+(.*)", line, re.IGNORECASE)
        if not instruction:
            continue
        body = instruction.group(2).strip()
        if body.startswith("["):  # exec form: a JSON array
            argv = json.loads(body)
            found += _argv_commands(argv, source)
        else:
            found += commands_in_text(body, source)
    return found


def commands_in_shell(path: Path, name: str) -> list[Command]:
    found: list[Command] = []
    for number, line in _logical_lines(path.read_text(encoding="utf-8")):
        found += commands_in_text(line, f"{name}:{number}")
    return found


def commands_in_file(path: Path, name: str | None = None) -> list[Command]:
    """Every deitlab command written in `path` (Markdown, YAML, Dockerfile or shell); [] for other files."""
    name = name or str(path)
    if path.suffix == ".md":
        return commands_in_markdown(path, name)
    if path.suffix in (".yaml", ".yml"):
        return commands_in_yaml(path, name)
    if path.name == "Dockerfile" or path.name.startswith("Dockerfile.") and not path.name.endswith(".dockerignore"):
        return commands_in_dockerfile(path, name)
    if path.suffix == ".sh":
        return commands_in_shell(path, name)
    return []


# ------------------------------------------------------------------------------------------------------ checking
@functools.lru_cache(maxsize=1)
def cli():
    """The click command tree behind `deitlab`."""
    import deitlab.cli
    import typer.main

    return typer.main.get_command(deitlab.cli.app)


def _exceptions(root) -> tuple[type, tuple[type, ...]]:
    """(usage errors, exits) of the click that `root` is built on: typer >= 0.2x runs its own copy (typer._click),
    so the `click` package's classes would not match."""
    core = next(k.__module__ for k in type(root).__mro__ if k.__module__.endswith("click.core"))
    errors = importlib.import_module(core.rsplit(".", 1)[0] + ".exceptions")
    exits = [errors.Exit] if hasattr(errors, "Exit") else []
    with contextlib.suppress(ImportError):
        import typer.exceptions

        exits.append(typer.exceptions.Exit)  # what typer raises after --help
    if click is not None:
        exits.append(click.exceptions.Exit)
    return errors.ClickException, tuple(exits)


def _is_group(command) -> bool:
    return hasattr(command, "commands") and hasattr(command, "resolve_command")


@contextlib.contextmanager
def _paths_need_not_exist(command):
    """Parse without the file system: relax exists=True on path parameters (typer keeps it in the parameter's
    info, plain click in its type) for the duration of the parse."""
    relaxed = []
    for param in command.params:
        descriptor = getattr(param, "type_descriptor", None)
        plain_file = click is not None and isinstance(getattr(param, "type", None), click.File)
        if getattr(descriptor, "file_annotation", None) is not None or plain_file:
            raise CommandError(f"{command.name}: parameter '{param.name}' opens a file when parsed; teach"
                               " tests/cli_commands.py to parse it without opening it")
        for holder in (getattr(descriptor, "parameter_info", None), getattr(param, "type", None)):
            if getattr(holder, "exists", False) is True:
                holder.exists = False
                relaxed.append(holder)
    try:
        yield
    finally:
        for holder in relaxed:
            holder.exists = True


def _step_bench_parser():
    from deitlab.bench.step import parser

    return parser()


# Leaf commands that forward their arguments to another parser.
FORWARDED = {f"{PROGRAM} bench step": _step_bench_parser}


def _argparse(parser, args: list[str]) -> None:
    def error(message: str):
        raise CommandError(f"{parser.prog}: {message}")

    parser.error = error  # argparse reports every bad argument through error(): raise instead of exiting
    try:
        parser.parse_args(args)
    except SystemExit as exit_:  # --help
        if exit_.code not in (0, None):
            raise CommandError(f"{parser.prog}: exit {exit_.code}") from None


def check(command: Command) -> None:
    """Parse the command with deitlab's CLI; CommandError with the parser's message when it is not valid."""
    check_args(list(command.args), mention=command.mention)


def check_args(args: list[str], mention: bool = False, root=None, program: str = PROGRAM) -> None:
    """Resolve the subcommands of `program args` through the groups, then parse the leaf command's options and
    arguments (make_context), as click does before running it. `root`: another click/typer command tree."""
    root = cli() if root is None else root
    usage_error, exits = _exceptions(root)
    command, ctx, name = root, None, program

    def context(command, name, args, parent):
        try:
            return command.make_context(name, list(args), parent=parent)
        except exits:  # --help: printed, and valid
            return None
        except usage_error as err:
            where = err.ctx.command_path if getattr(err, "ctx", None) else name
            raise CommandError(f"{where}: {err.format_message()}") from None

    while _is_group(command):
        if not args:
            if mention:
                return
            raise CommandError(f"{f'{ctx.command_path} {name}' if ctx else name}: missing a command")
        ctx = context(command, name, args, ctx)
        if ctx is None:
            return
        # click >= 8.2 keeps the subcommand's name in _protected_args; older click in protected_args
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        try:
            name, command, args = command.resolve_command(ctx, [*protected, *ctx.args])
        except usage_error as err:
            raise CommandError(f"{ctx.command_path}: {err.format_message()}") from None
    if mention and not args:
        return
    with _paths_need_not_exist(command):
        leaf = context(command, name, args, ctx)
    if leaf is not None and leaf.command_path in FORWARDED:
        _argparse(FORWARDED[leaf.command_path](), list(leaf.args))
