"""Shell completion scripts for bash, zsh and fish, generated from the argparse tree.

``hearth completion bash|zsh|fish`` prints one; nothing is registered at run time and
no dependency is added (argcomplete would need both). The scripts complete the
subcommands (nested ones too: ``hearth models pu<TAB>``), each command's options,
the values of options and arguments with fixed choices, and fall back to file names
elsewhere (a MODEL may be a path). They are static: regenerate after an upgrade.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

SHELLS = ("bash", "zsh", "fish")


@dataclass
class Option:
    flags: list[str]
    help: str
    takes_value: bool
    choices: list[str]


@dataclass
class Node:
    """One command (``()`` is ``hearth`` itself, ``("models", "pull")`` a nested one)."""

    path: tuple[str, ...]
    commands: list[tuple[str, str]] = field(default_factory=list)  # (name, help), aliases included
    options: list[Option] = field(default_factory=list)
    words: list[str] = field(default_factory=list)  # fixed choices of its positional arguments


def _help(text: str | None) -> str:
    if not text or text == argparse.SUPPRESS:
        return ""
    return " ".join(text.replace("%%", "%").split())


def tree(parser: argparse.ArgumentParser) -> list[Node]:
    """Every visible command of ``parser``, parents first. Hidden subparsers (no help,
    such as the daemon's own ``serve-foreground``) are left out."""
    nodes: list[Node] = []

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        node = Node(path)
        nodes.append(node)
        children: list[tuple[str, argparse.ArgumentParser]] = []
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                visible = {id(a.choices[c.dest]): _help(c.help) for c in a._choices_actions}
                for name, sub in a.choices.items():
                    if id(sub) in visible:
                        node.commands.append((name, visible[id(sub)]))
                        children.append((name, sub))
            elif a.option_strings:
                if a.help == argparse.SUPPRESS:
                    continue
                node.options.append(Option(list(a.option_strings), _help(a.help), a.nargs != 0,
                                           [str(c) for c in a.choices or ()]))
            elif a.choices:
                node.words += [str(c) for c in a.choices]
        for name, sub in children:
            walk(sub, (*path, name))

    walk(parser, ())
    return nodes


def script(shell: str, parser: argparse.ArgumentParser, prog: str = "hearth") -> str:
    if shell not in SHELLS:
        raise ValueError(f"unknown shell {shell!r} (known: {', '.join(SHELLS)})")
    nodes = tree(parser)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](nodes, prog)


def _fn(prog: str) -> str:
    return "_" + "".join(c if c.isalnum() else "_" for c in prog)


def _sq(text: str) -> str:
    """Single-quoted for bash, zsh and fish alike (no backslash escapes inside)."""
    return "'" + text.replace("'", "'\\''") + "'"


def _fish_sq(text: str) -> str:
    """Single-quoted for fish, where backslash and quote are escaped inside quotes."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key(path: tuple[str, ...]) -> str:
    return " ".join(path)


# -- bash (zsh's bashcompinit would run it too, but zsh gets its own with descriptions) ----


def _bash(nodes: list[Node], prog: str) -> str:
    f = _fn(prog)
    subs, opts, values = [], [], []
    for n in nodes:
        k = _sq(_key(n.path))
        words = [c for c, _ in n.commands] + n.words
        if words:
            subs.append(f"        {k}) echo {_sq(' '.join(words))} ;;")
        opts.append(f"        {k}) echo {_sq(' '.join(s for o in n.options for s in o.flags))} ;;")
        for o in n.options:
            if o.takes_value:
                pattern = "|".join(_sq(f"{_key(n.path)}\t{s}") for s in o.flags)
                values.append(f"        {pattern}) echo {_sq(' '.join(o.choices) or '@any')} ;;")
    return f"""# bash completion for {prog}: eval "$({prog} completion bash)" (in ~/.bashrc), or save it as
# ~/.local/share/bash-completion/completions/{prog}
{f}_words() {{
    case "$1" in
{chr(10).join(subs)}
    esac
}}
{f}_options() {{
    case "$1" in
{chr(10).join(opts)}
    esac
}}
{f}_values() {{
    case "$1"$'\\t'"$2" in
{chr(10).join(values)}
    esac
}}
{f}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local path="" word i values
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        [[ "$word" == -* ]] && continue
        if [[ " $({f}_words "$path") " == *" $word "* ]]; then
            path="${{path:+$path }}$word"
        fi
    done
    values="$({f}_values "$path" "$prev")"
    if [[ -n "$values" ]]; then
        [[ "$values" != "@any" ]] && COMPREPLY=($(compgen -W "$values" -- "$cur"))
        return 0
    fi
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$({f}_options "$path")" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$({f}_words "$path")" -- "$cur"))
    fi
}}
complete -o bashdefault -o default -F {f} {prog}
"""


# -- zsh --------------------------------------------------------------------------------


def _zsh_item(name: str, desc: str) -> str:
    return _sq(name.replace(":", "\\:") + (":" + desc if desc else ""))


def _zsh(nodes: list[Node], prog: str) -> str:
    f = _fn(prog)
    words, cmds, opts, values = [], [], [], []
    for n in nodes:
        k = _sq(_key(n.path))
        names = [c for c, _ in n.commands] + n.words
        if names:
            words.append(f"        {k}) print -r -- {' '.join(_sq(w) for w in names)} ;;")
        items = [_zsh_item(c, h) for c, h in n.commands] + [_zsh_item(w, "") for w in n.words]
        if items:
            cmds.append(f"        {k}) reply=({' '.join(items)}) ;;")
        oitems = [_zsh_item(s, o.help) for o in n.options for s in o.flags]
        opts.append(f"        {k}) reply=({' '.join(oitems)}) ;;")
        for o in n.options:
            if o.takes_value:
                pattern = "|".join(_sq(f"{_key(n.path)} {s}") for s in o.flags)
                values.append(f"        {pattern}) reply=({' '.join(_sq(c) for c in o.choices) or _sq('@any')}) ;;")
    return f"""#compdef {prog}
# zsh completion for {prog}: eval "$({prog} completion zsh)" (in ~/.zshrc, after compinit),
# or save it as _{prog} in a directory on $fpath
{f}_words() {{
    case "$1" in
{chr(10).join(words)}
    esac
}}
{f}_commands() {{
    reply=()
    case "$1" in
{chr(10).join(cmds)}
    esac
}}
{f}_options() {{
    reply=()
    case "$1" in
{chr(10).join(opts)}
    esac
}}
{f}_values() {{
    reply=()
    case "$1 $2" in
{chr(10).join(values)}
    esac
}}
{f}() {{
    local path="" word i
    local -a reply subs
    for ((i = 2; i < CURRENT; i++)); do
        word="${{words[i]}}"
        [[ "$word" == -* ]] && continue
        subs=(${{=$({f}_words "$path")}})
        if (( ${{subs[(Ie)$word]}} )); then
            path="${{path:+$path }}$word"
        fi
    done
    {f}_values "$path" "${{words[CURRENT-1]}}"
    if (( ${{#reply}} )); then
        [[ "${{reply[1]}}" != "@any" ]] && compadd -a reply
        return
    fi
    if [[ "${{words[CURRENT]}}" == -* ]]; then
        {f}_options "$path"
        _describe -t options option reply
        return
    fi
    {f}_commands "$path"
    if (( ${{#reply}} )); then
        _describe -t commands command reply
    else
        _files
    fi
}}
if [[ "$funcstack[1]" == "{f}" ]]; then
    {f} "$@"
else
    compdef {f} {prog}
fi
"""


# -- fish -------------------------------------------------------------------------------


def _fish(nodes: list[Node], prog: str) -> str:
    f = "__" + _fn(prog).lstrip("_")
    cases, lines = [], []
    for n in nodes:
        names = [c for c, _ in n.commands] + n.words
        if names:
            cases.append(f"        case {_fish_sq(_key(n.path))}\n            printf '%s\\n' "
                         + " ".join(_fish_sq(w) for w in names))
    for n in nodes:
        at = _fish_sq(f"{f}_at {_fish_sq(_key(n.path))}")
        for c, h in n.commands:
            lines.append(f"complete -c {prog} -n {at} -f -a {_fish_sq(c)} -d {_fish_sq(h)}")
        if n.words:
            lines.append(f"complete -c {prog} -n {at} -f -a {_fish_sq(' '.join(n.words))}")
        for o in n.options:
            parts = [f"complete -c {prog} -n {at}"]
            for s in o.flags:
                if s.startswith("--"):
                    parts.append(f"-l {_fish_sq(s[2:])}")
                elif len(s) == 2:
                    parts.append(f"-s {_fish_sq(s[1:])}")
                else:  # llama.cpp's one-dash long options: -ngl, -ctk
                    parts.append(f"-o {_fish_sq(s[1:])}")
            if o.takes_value:
                parts.append("-r")
                if o.choices:
                    parts.append(f"-f -a {_fish_sq(' '.join(o.choices))}")
            if o.help:
                parts.append(f"-d {_fish_sq(o.help)}")
            lines.append(" ".join(parts))
    return f"""# fish completion for {prog}: {prog} completion fish > ~/.config/fish/completions/{prog}.fish
function {f}_words
    switch "$argv[1]"
{chr(10).join(cases)}
    end
end
function {f}_path
    set -l path
    for word in (commandline -opc)[2..-1]
        string match -q -- '-*' $word; and continue
        if contains -- $word ({f}_words (string join ' ' $path))
            set path $path $word
        end
    end
    string join ' ' $path
end
function {f}_at
    set -l path ({f}_path)
    test "$path" = "$argv[1]"
end
{chr(10).join(lines)}
"""
