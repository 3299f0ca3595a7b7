"""The ssh stand-in: how an MPI launcher starts a process on an emulated host.

MPI launchers start their per-host daemons (MPICH: hydra_pmi_proxy, Open MPI: prted) with
`ssh [options] HOST COMMAND...`. Pointed at this agent instead (Hydra: -launcher-exec,
Open MPI: plm_ssh_agent), it does what ssh would on a real cluster:

- skips the options the launcher puts before the host name (-x, -q, -o ..., ...);
- joins the rest into one command line for a shell, as ssh does;
- runs it inside the host's namespaces (network, hostname, mount, PID) with a clean
  environment (`env -i` plus what a login shell sets), as the user who called sudo.

So a variable a real cluster would not carry to the remote side is not carried here either:
only what the launcher forwards itself (Hydra forwards the whole environment; Open MPI its
OMPI_* variables and those named with -x).

    python -m ringsync.cluster.agent STATE_FILE [ssh options] HOST COMMAND...
"""
from __future__ import annotations

import json
import os
import pwd
import sys
from pathlib import Path

# ssh's options that take a value (the next argument): the rest are flags.
SSH_OPTIONS_WITH_VALUE = set("BbcDEeFIiJLlmOopQRSWw")


def split_ssh_args(args: list[str], hosts: set[str]) -> tuple[str, list[str]]:
    """(host, command words) from ssh's argument list: options, then the host, then the rest."""
    i = 0
    while i < len(args):
        word = args[i]
        if word in hosts:
            return word, args[i + 1:]
        if word.startswith("-") and len(word) == 2 and word[1] in SSH_OPTIONS_WITH_VALUE:
            i += 2
        elif word.startswith("-"):
            i += 1
        else:
            break
    raise SystemExit(f"ringsync-cluster agent: no known host in {args!r} (hosts: {sorted(hosts)})")


def login_environment(uid: int) -> list[str]:
    """What sshd gives a login shell: PATH (with this Python's bin first, as a user's
    profile that activates their venv would), HOME, USER, LOGNAME, SHELL."""
    try:
        entry = pwd.getpwuid(uid)
        home, user = entry.pw_dir, entry.pw_name
    except KeyError:
        home, user = "/", str(uid)
    path = f"{os.path.dirname(sys.executable)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return [f"PATH={path}", f"HOME={home}", f"USER={user}", f"LOGNAME={user}", "SHELL=/bin/sh"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    state = json.loads(Path(argv[0]).read_text())
    by_name = {}
    for h in state["hosts"]:
        by_name[h["hostname"]] = by_name[h["address"]] = h
    name, words = split_ssh_args(argv[1:], set(by_name))
    host = by_name[name]
    uid, gid = state["uid"], state["gid"]
    command = " ".join(words) or "exec $SHELL"
    enter = ["nsenter", "-t", str(host["init"]), "--net", "--uts", "--mount", "--pid",
             f"--wd={os.getcwd()}"]
    if uid != os.geteuid():
        enter += ["-S", str(uid), "-G", str(gid)]
    os.execvp("nsenter", [*enter, "env", "-i", *login_environment(uid), "sh", "-c", command])


if __name__ == "__main__":
    main()
