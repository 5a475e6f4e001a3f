"""Shell completion for `orch`, for bash and zsh: `eval "$(orch --install-completion)"` (zsh: `... zsh`).

Commands complete from a fixed list; `orch run|plan|sweep KEY=...` asks Hydra's own completion (`-sc query=bash`),
with the line rewritten as Hydra expects it (the app name, then overrides: Hydra would take `run` for an override);
`orch ls|cp` complete the config options. Hydra's `-sc install=bash` cannot serve: it registers the completion for
the program name, which for `orch run` is two words.
"""

from __future__ import annotations

COMMANDS = "run plan sweep ui submit status logs stop list ls cp"

BASH = r"""_orch_complete()
{
    local word="${COMP_WORDS[COMP_CWORD]}"
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "%(commands)s --install-completion --help" -- "$word"))
        return
    fi
    case "${COMP_WORDS[1]}" in
        run|plan|sweep)
            local rest="${COMP_LINE#*${COMP_WORDS[1]}}"
            local choices
            choices=$(COMP_LINE="orch${rest}" COMP_POINT=$(( ${#rest} + 4 )) orch "${COMP_WORDS[1]}" -sc query=bash 2>/dev/null)
            COMPREPLY=($(compgen -o nospace -W "$choices" -- "$word"))
            ;;
        ls|cp)
            COMPREPLY=($(compgen -W "$(orch ls --names 2>/dev/null | sed 's|=|/|')" -- "$word"))
            ;;
    esac
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _orch_complete orch
"""


def script(shell: str) -> str:
    body = BASH % {"commands": COMMANDS}
    if shell == "bash":
        return body
    if shell == "zsh":  # zsh runs bash completion functions through bashcompinit
        return "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n" + body
    from orchestrator.cli.output import fail

    fail(f"--install-completion {shell}: expected bash or zsh")
