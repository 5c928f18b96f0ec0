"""`ambientctl completion bash|zsh`: a completion script derived from the argparse tree
(every subcommand, its options, the choices of its arguments, the kinds of get/describe),
so it never falls behind the commands. zsh runs the bash one through bashcompinit."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from ambientctl.kinds import spellings

EPILOG = """\
examples:
  source <(ambientctl completion bash)                      # this shell
  ambientctl completion bash > /etc/bash_completion.d/ambientctl
  source <(ambientctl completion zsh)                       # zsh (through bashcompinit)
"""


def register(sub: Any, root: argparse.ArgumentParser) -> None:
    """`completion`, for the tree under `root` (complete once every command is in it)."""
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script for ambientctl; source it in your shell.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell: bash or zsh")
    p.set_defaults(fn=lambda args: run(root, args), no_cluster=True)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the tree with its path of subcommand names (the root's is ())."""
    yield path, parser
    for name, child in subcommands(parser).items():
        yield from walk(child, (*path, name))


def words(path: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    """What may come next at this level: subcommands, options, choices of arguments."""
    out: list[str] = list(subcommands(parser))
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            continue
        out.extend(s for s in a.option_strings if s.startswith("--") or len(a.option_strings) == 1)
        if a.choices is not None and not a.option_strings:
            out.extend(str(c) for c in a.choices)
    if path and path[-1] in ("get", "describe", "delete"):
        out.extend(spellings())
    return sorted(dict.fromkeys(out))


def bash_script(parser: argparse.ArgumentParser) -> str:
    tree = list(walk(parser))
    steps = "\n".join(
        f'            "{" ".join(path[:-1])}:{path[-1]}") path="{" ".join(path)}" ;;'
        for path, _ in tree
        if path
    )
    cases = "\n".join(
        f'        "{" ".join(path)}") opts="{" ".join(words(path, p))}" ;;' for path, p in tree
    )
    return f"""# ambientctl completion (bash): source <(ambientctl completion bash)
_ambientctl() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" opts="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "$path:${{COMP_WORDS[i]}}" in
{steps}
        esac
    done
    case "$path" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -o default -o bashdefault -F _ambientctl ambientctl
"""


def zsh_script(parser: argparse.ArgumentParser) -> str:
    return (
        "# ambientctl completion (zsh): source <(ambientctl completion zsh)\n"
        "autoload -U +X bashcompinit && bashcompinit\n" + bash_script(parser)
    )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    print(bash_script(parser) if args.shell == "bash" else zsh_script(parser), end="")
    return 0
