"""The sbatch options a job (or a backend's config) may give as ``attributes``: an
allow-list, each option with the kind of value it takes.

Why an allow-list: sbatch parses its command line with ``getopt_long``, which takes any
unambiguous prefix of a long option (``--wra`` is ``--wrap``), clustered short options
(``-vo FILE`` is ``-v -o FILE``) and, for a flag given a value as a second argument, that
value as the next argument (``--hold x.sh`` makes ``x.sh`` the script; ``--`` ends the
options). A deny-list of names cannot keep up with that; so only the options below reach
sbatch, each as **one** argument ``--name=value`` (a flag: ``--name`` alone), its value
checked against its kind (no leading ``-``, no control character, bounded). A short form
(``-q``) is its long name; anything else is refused by name.

Left out on purpose (they would take the job away from psik, or reach past the job):
``--wrap`` (another script), ``--output``/``--error``/``--input``/``--open-mode`` (the
console is psik's, in the job directory), ``--chdir``, ``--array`` (many runs of one),
``--wait``/``--test-only``/``--parsable``/``--quiet``/``--verbose`` (sbatch's answer is the
job id the server records), ``--uid``/``--gid`` (another user), ``--export``/
``--export-file``/``--get-user-env``/``--propagate`` (the environment is the spec's),
``--clusters`` (a job on a cluster the server does not ask), ``--nodefile``/``--bbf``/
``--container`` (files the server's user can read), ``--reboot``, ``--ignore-pbs``.
The list follows sbatch 22.05 (Debian 12's slurm-client); the Slurm tests check that
this sbatch knows every name in it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .. import AttributeRefused

#: Backend attributes psik itself reads; never sbatch options.
PSIK_ATTRIBUTES = frozenset({"psik_python"})

#: The longest attribute value sbatch is given.
MAX_VALUE = 1024


@dataclass(frozen=True)
class ValueKind:
    """What an option's value may be: ``pattern`` (fully matched), described as ``what``.
    ``flag``: the option takes no value; ``optional``: none, or one matching ``pattern``."""

    what: str
    pattern: re.Pattern[str] | None = None
    optional: bool = False

    @property
    def flag(self) -> bool:
        return self.pattern is None


def _kind(what: str, pattern: str, *, optional: bool = False) -> ValueKind:
    return ValueKind(what, re.compile(pattern, re.ASCII), optional)


FLAG = ValueKind("a flag: give it an empty value")
COUNT = _kind("a whole number", r"[0-9]{1,9}")
NODES = _kind("a node count or range (2, 2-4)", r"[0-9]{1,9}(-[0-9]{1,9})?")
TIME_LIMIT = _kind(
    "a time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM[:SS], UNLIMITED)",
    r"([0-9]{1,5}-)?[0-9]{1,7}(:[0-9]{1,2}){0,2}|(?i:unlimited|infinite)",
)
WHEN = _kind("a time (now+1hour, 16:00, 2026-12-24T18:00, tomorrow)", r"[A-Za-z0-9][A-Za-z0-9:+/.T-]{0,63}")
MEMORY = _kind("a memory size (4096, 4G)", r"[0-9]{1,12}[KMGTkmgt]?")
#: Account, partition, QOS, reservation names: comma lists of Slurm names.
NAMES = _kind(
    "a name or comma list of names",
    r"[A-Za-z0-9_][A-Za-z0-9_.@%+-]{0,127}(,[A-Za-z0-9_][A-Za-z0-9_.@%+-]{0,127})*",
)
#: Constraints, dependencies, GRES, host lists, signals...: Slurm's own little languages.
SPEC = _kind(
    "a Slurm specification (letters, digits and _.:,;@%+*=!&|?()[]-)",
    r"[A-Za-z0-9_.:,;@%+*=!&|?()\[\]][A-Za-z0-9_.:,;@%+*=!&|?()\[\]-]*",
)
#: Free text (a comment, a job name): printable, one line.
TEXT = _kind("one line of printable text", r"[^\x00-\x1f\x7f-]" + r"[^\x00-\x1f\x7f]*")
EXCLUSIVE = _kind("empty, 'user' or 'mcs'", r"user|mcs", optional=True)
NICE = _kind("empty or a whole number", r"[0-9]{1,9}", optional=True)
YES_NO = _kind("'yes' or 'no'", r"yes|no")

#: The allow-list: long name -> kind of value.
SBATCH_OPTIONS: dict[str, ValueKind] = {
    "--account": NAMES,
    "--acctg-freq": SPEC,
    "--begin": WHEN,
    "--cluster-constraint": SPEC,
    "--comment": TEXT,
    "--constraint": SPEC,
    "--contiguous": FLAG,
    "--core-spec": COUNT,
    "--cores-per-socket": COUNT,
    "--cpu-freq": SPEC,
    "--cpus-per-gpu": COUNT,
    "--cpus-per-task": COUNT,
    "--deadline": WHEN,
    "--delay-boot": COUNT,
    "--dependency": SPEC,
    "--distribution": SPEC,
    "--exclude": SPEC,
    "--exclusive": EXCLUSIVE,
    "--extra-node-info": SPEC,
    "--gpu-bind": SPEC,
    "--gpu-freq": SPEC,
    "--gpus": SPEC,
    "--gpus-per-node": SPEC,
    "--gpus-per-socket": SPEC,
    "--gpus-per-task": SPEC,
    "--gres": SPEC,
    "--gres-flags": SPEC,
    "--hint": SPEC,
    "--hold": FLAG,
    "--job-name": TEXT,
    "--kill-on-invalid-dep": YES_NO,
    "--licenses": SPEC,
    "--mail-type": SPEC,
    "--mail-user": NAMES,
    "--mcs-label": NAMES,
    "--mem": MEMORY,
    "--mem-bind": SPEC,
    "--mem-per-cpu": MEMORY,
    "--mem-per-gpu": MEMORY,
    "--mincpus": COUNT,
    "--network": SPEC,
    "--nice": NICE,
    "--no-kill": FLAG,
    "--no-requeue": FLAG,
    "--nodelist": SPEC,
    "--nodes": NODES,
    "--ntasks": COUNT,
    "--ntasks-per-core": COUNT,
    "--ntasks-per-gpu": COUNT,
    "--ntasks-per-node": COUNT,
    "--ntasks-per-socket": COUNT,
    "--overcommit": FLAG,
    "--oversubscribe": FLAG,
    "--partition": NAMES,
    "--power": SPEC,
    "--priority": COUNT,
    "--profile": SPEC,
    "--qos": NAMES,
    "--requeue": FLAG,
    "--reservation": NAMES,
    "--signal": SPEC,
    "--sockets-per-node": COUNT,
    "--spread-job": FLAG,
    "--switches": SPEC,
    "--thread-spec": COUNT,
    "--threads-per-core": COUNT,
    "--time": TIME_LIMIT,
    "--time-min": TIME_LIMIT,
    "--tmp": MEMORY,
    "--use-min-nodes": FLAG,
    "--wckey": NAMES,
}

#: sbatch's one-letter spellings of allowed options (the others are refused).
SHORT_OPTIONS: dict[str, str] = {
    "-A": "--account",
    "-b": "--begin",
    "-B": "--extra-node-info",
    "-c": "--cpus-per-task",
    "-C": "--constraint",
    "-d": "--dependency",
    "-G": "--gpus",
    "-H": "--hold",
    "-J": "--job-name",
    "-k": "--no-kill",
    "-L": "--licenses",
    "-m": "--distribution",
    "-n": "--ntasks",
    "-N": "--nodes",
    "-O": "--overcommit",
    "-p": "--partition",
    "-q": "--qos",
    "-s": "--oversubscribe",
    "-S": "--core-spec",
    "-t": "--time",
    "-w": "--nodelist",
    "-x": "--exclude",
}


def _option(name: str) -> str:
    """The allowed long option ``name`` spells; AttributeRefused if none."""
    option = SHORT_OPTIONS.get(name, name)
    if option in SBATCH_OPTIONS:
        return option
    if not name.startswith("-"):
        why = f"is not an sbatch option (write it as sbatch does: '--{name[:100]}')"
    elif name.lstrip("-") and f"--{name.lstrip('-')}" in SBATCH_OPTIONS:
        # The seed README's own example has "---gpu-bind", which sbatch refuses.
        why = f"is not an sbatch option: write it '--{name.lstrip('-')}'"
    else:
        why = (
            "is not an sbatch option psik-api passes: give the whole long name of one "
            "(no abbreviation, no clustered short options, the value as the attribute's value); "
            "options that would move the job's script, console, directory, user or environment "
            "away from psik are never passed"
        )
    raise AttributeRefused(name, why)


def _argument(name: str, option: str, value: str) -> str:
    """``--option=value`` (``--option`` for a flag) once ``value`` is checked."""
    kind = SBATCH_OPTIONS[option]
    if value == "" and (kind.flag or kind.optional):
        return option
    if kind.flag:
        raise AttributeRefused(name, f"is a flag of sbatch's ({option}): its value must be empty")
    if value == "":
        raise AttributeRefused(name, f"needs a value for sbatch's {option}: {kind.what}")
    if len(value) > MAX_VALUE:
        raise AttributeRefused(name, f"has a value longer than {MAX_VALUE} characters")
    if value.startswith("-"):
        raise AttributeRefused(name, "has a value that must not start with '-'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise AttributeRefused(name, "has a control character in its value")
    assert kind.pattern is not None
    if not kind.pattern.fullmatch(value):
        raise AttributeRefused(name, f"has a value that is not {kind.what} (sbatch's {option})")
    return f"{option}={value}"


def sbatch_options(attributes: Mapping[str, str]) -> list[str]:
    """The sbatch arguments the ``attributes`` (a job's, merged with its backend's) make,
    one ``--name=value`` each, in order; psik's own left out. Raises
    :class:`AttributeRefused` naming the first attribute that sbatch must not get."""
    out: list[str] = []
    for name, value in attributes.items():
        if name in PSIK_ATTRIBUTES:
            continue
        out.append(_argument(name, _option(name), value))
    return out
