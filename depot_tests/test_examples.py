"""The walk-throughs in examples/ run as written against a real Depot.

Each ```console block holds commands after ``$ `` and the output they print.
The test runs every command with bash, in order, in one working directory,
and compares the output with the text, after masking what changes from run
to run (times, dates, ports). Addresses and paths are rewritten to the test's
Depot: ``localhost:8443`` to its port, ``~/.local/share/depot`` to its data
directory and the registry port 5000 to a free port.
"""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

from conftest import free_port

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
VOLATILE = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"), "<time>"),
    (re.compile(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT"), "<date>"),
]


def console_blocks(text):
    """(command, expected output) pairs of a walk-through, in order."""
    steps = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        command, output = None, []
        for line in block.splitlines():
            if line.startswith("$ "):
                if command is not None:
                    steps.append((command, "\n".join(output)))
                command, output = line[2:], []
            elif command is not None and command.endswith("\\"):
                command = command[:-1] + "\n" + line
            else:
                output.append(line)
        if command is not None:
            steps.append((command, "\n".join(output)))
    return steps


def mask(text):
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text.strip()


def run_walkthrough(name, depot, tmp_path, registry_port=None):
    work = tmp_path / "session"
    work.mkdir()
    rewrites = [("localhost:8443", "localhost:%d" % depot.port),
                ("~/.local/share/depot", str(depot.data_dir))]
    if registry_port:
        rewrites.append(("5000", str(registry_port)))
    env = dict(os.environ)
    for command, expected in console_blocks((EXAMPLES / name).read_text()):
        real = command
        for old, new in rewrites:
            real = real.replace(old, new)
        export = re.fullmatch(r"export (\w+)=(\S+)", real)
        if export:
            env[export.group(1)] = os.path.expanduser(export.group(2))
            continue
        done = subprocess.run(["bash", "-c", real], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        output = done.stdout
        for old, new in rewrites:
            output = output.replace(new, old)
        output = output.replace("\r\n", "\n")
        assert mask(output) == mask(expected), command
    return work


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_raw_files_walkthrough(depot, tmp_path):
    run_walkthrough("raw-files.md", depot, tmp_path)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_docker_registry_walkthrough_curl_parts(depot, tmp_path):
    """The registry walk-through's curl commands (docker commands aside)."""
    text = (EXAMPLES / "docker-registry.md").read_text()
    assert "```console" in text
    run_walkthrough("docker-registry.md", depot, tmp_path,
                    registry_port=free_port())
